"""ImageNet-style training augmentations in plain torch, seeded by a ``torch.Generator``.

What the hard- and soft-label evaluation protocols of generative DD apply to every training batch
(:mod:`gendd.evaluate.train_protocols`), written for uint8/float ``(n, C, H, W)`` tensors:

* :func:`random_resized_crop` -- torchvision's ``RandomResizedCrop`` sampling rule (10 tries of
  area ``~ U(scale) * H * W`` and log-uniform aspect ratio in ``ratio``, else a centre crop clamped
  to ``ratio``), each crop resized bilinearly (antialiased) to ``size``.
* :func:`random_flip` -- horizontal flip with probability 0.5 per image.
* :func:`color_jitter` -- the tensor ``ColorJitter`` of IDC (``snu-mllab/Efficient-Dataset-
  Condensation``, ``utils.py``, from PyramidNet): brightness, contrast and saturation, each
  ``x <- x + alpha * (target - x)`` with ``alpha ~ U(-v, v)``, in a random order per image; targets
  0 (brightness), the mean grey level (contrast) and the grey image ``0.299 R + 0.587 G + 0.114 B``
  (saturation). No clamping, as the reference.
* :func:`lighting` -- AlexNet PCA lighting (IDC ``Lighting(0.1, eigval, eigvec)``): adds
  ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, alphastd^2)`` per image, to the RGB channels.
* :func:`shuffle_patches` -- RDED's ``ShufflePatches(factor)`` (``validation/utils.py``): cut the
  width into ``factor`` strips of ``W // factor`` columns, permute them, then the same for rows.
* :func:`cutmix` / :func:`rand_bbox` -- CutMix (Yun et al., 2019) as IDC/RDED code it:
  ``lam ~ Beta(beta, beta)``, a box of side ``int(side * sqrt(1 - lam))`` centred at a uniform
  pixel and clipped to the image, pasted from a random permutation of the batch;
  ``ratio = 1 - box_area / (H * W)`` is the weight of the original labels.

One-channel images (Fashion-MNIST): saturation is the identity on a grey image (its grey image is
itself) and is skipped; PCA lighting is defined by RGB eigenvectors and has no grey analogue, so it
is skipped too; brightness and contrast apply unchanged.

Randomness comes only from the generator passed in, so a run is reproducible under a seed. The
references use PIL/torchvision resampling; here every resize is ``F.interpolate(bilinear,
antialias=True)``, which differs from PIL by rounding-level amounts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gendd.errors import ConfigError

#: ImageNet PCA lighting constants (AlexNet; IDC ``data.py`` ``transform_imagenet``).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
#: ITU-R 601 luma weights of IDC's ``Grayscale``.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _u(gen: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=gen)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a square float batch to ``size`` x ``size``."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``CenterCrop``: offset ``int(round((side - size) / 2))``."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ConfigError(f"cannot centre-crop {h}x{w} images to {size}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def resize_center_crop(images: torch.Tensor, resize_to: int, crop: int,
                       chunk: int = 256) -> torch.Tensor:
    """``Resize(resize_to) + CenterCrop(crop)`` of square uint8 images -> uint8, as the test (and
    IDC's train) transforms do on PIL images (which stay 8-bit after resizing)."""
    if images.shape[-1] == crop and resize_to == crop:
        return images
    out = torch.empty((images.shape[0], images.shape[1], crop, crop), dtype=torch.uint8)
    for a in range(0, images.shape[0], chunk):
        part = resize(images[a:a + chunk].float(), resize_to)
        out[a:a + chunk] = center_crop(part, crop).round_().clamp_(0, 255).to(torch.uint8)
    return out


def rrc_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
               gen: torch.Generator | None) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of one random resized crop (torchvision's sampling rule)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * float(_u(gen, 1)))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(_u(gen, 1)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(x: torch.Tensor, size: int, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-image ``RandomResizedCrop(size, scale, ratio)`` of a float batch -> ``(n, C, size, size)``."""
    n, c, h, w = x.shape
    out = torch.empty((n, c, size, size), dtype=x.dtype)
    for i in range(n):
        top, left, ch, cw = rrc_params(h, w, scale, ratio, gen)
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True)[0]
    return out


def random_flip(x: torch.Tensor, gen: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = _u(gen, x.shape[0]) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def gray(x: torch.Tensor) -> torch.Tensor:
    """``(n, 1, H, W)`` luma ``0.299 R + 0.587 G + 0.114 B`` (the image itself if 1 channel)."""
    if x.shape[1] == 1:
        return x
    wts = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * wts).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, gen: torch.Generator | None, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4) -> torch.Tensor:
    """IDC's ColorJitter: the three ops in a random order per image, ``alpha ~ U(-v, v)`` each.

    ``brightness``: ``x (1 - a)``; ``contrast``: ``x + a (mean(gray(x)) - x)``; ``saturation``:
    ``x + a (gray(x) - x)`` (skipped for 1 channel, where it is the identity).
    """
    n = x.shape[0]
    order = torch.argsort(_u(gen, n, 3), dim=1)             # a random permutation per image
    alpha = (2.0 * _u(gen, n, 3) - 1.0) * torch.tensor([brightness, contrast, saturation])
    for k in range(3):
        op = order[:, k]
        a = alpha.gather(1, op[:, None])[:, 0].view(n, 1, 1, 1).to(x.dtype)
        g = gray(x)
        target_c = g.mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
        target_s = g.expand_as(x)
        target = torch.where((op == 0).view(n, 1, 1, 1), torch.zeros_like(x),
                             torch.where((op == 1).view(n, 1, 1, 1), target_c, target_s))
        if x.shape[1] == 1:  # saturation of a grey image is the identity
            a = torch.where((op == 2).view(n, 1, 1, 1), torch.zeros_like(a), a)
        x = x + a * (target - x)
    return x


def lighting(x: torch.Tensor, gen: torch.Generator | None, alphastd: float = 0.1,
             eigval: Sequence[float] = PCA_EIGVAL,
             eigvec: Sequence[Sequence[float]] = PCA_EIGVEC) -> torch.Tensor:
    """PCA lighting: ``x_c += sum_j eigvec[c, j] * alpha_j * eigval_j``, ``alpha ~ N(0, alphastd^2)``.

    RGB only: one-channel batches are returned unchanged (no draws)."""
    if alphastd == 0 or x.shape[1] != 3:
        return x
    alpha = torch.randn((x.shape[0], 3), generator=gen) * alphastd
    vec = torch.tensor(eigvec, dtype=torch.float32)
    rgb = (alpha * torch.tensor(eigval, dtype=torch.float32)) @ vec.T   # (n, 3)
    return x + rgb.to(x.dtype)[:, :, None, None]


def shuffle_patches(x: torch.Tensor, factor: int, gen: torch.Generator | None) -> torch.Tensor:
    """RDED's ShufflePatches: permute ``factor`` column strips, then ``factor`` row strips, per
    image. Strips are ``side // factor`` wide; a remainder (odd sides) is dropped, as in the
    reference slicing."""
    if factor <= 1:
        return x
    n, c, h, w = x.shape
    th, tw = h // factor, w // factor
    out = torch.empty((n, c, th * factor, tw * factor), dtype=x.dtype)
    for i in range(n):
        img = x[i, :, :th * factor, :tw * factor]
        cols = torch.randperm(factor, generator=gen).tolist()
        img = torch.cat([img[..., k * tw:(k + 1) * tw] for k in cols], dim=-1)
        rows = torch.randperm(factor, generator=gen).tolist()
        out[i] = torch.cat([img[..., k * th:(k + 1) * th, :] for k in rows], dim=-2)
    return out


def sample_beta(a: float, b: float, gen: torch.Generator | None) -> float:
    """One ``Beta(a, b)`` draw, seeded from ``gen`` (numpy's sampler)."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(a, b))


def rand_bbox(height: int, width: int, lam: float,
              gen: torch.Generator | None) -> tuple[int, int, int, int]:
    """CutMix box ``(r1, c1, r2, c2)`` (rows ``r1:r2``, columns ``c1:c2``).

    Side ``int(side * sqrt(1 - lam))``, centre uniform over the pixels, clipped to the image
    (reference ``rand_bbox``; its ``W``/``H`` are dims 2/3 of the batch, i.e. rows/columns)."""
    cut = math.sqrt(1.0 - lam)
    cut_r, cut_c = int(height * cut), int(width * cut)
    cr = int(torch.randint(0, height, (1,), generator=gen))
    cc = int(torch.randint(0, width, (1,), generator=gen))
    r1, r2 = min(max(cr - cut_r // 2, 0), height), min(max(cr + cut_r // 2, 0), height)
    c1, c2 = min(max(cc - cut_c // 2, 0), width), min(max(cc + cut_c // 2, 0), width)
    return r1, c1, r2, c2


@dataclass(frozen=True)
class CutMixResult:
    """A CutMix-ed batch: ``images``, the partner of each image ``perm`` (labels ``y[perm]``),
    ``lam`` drawn, ``box`` ``(r1, c1, r2, c2)`` and ``ratio = 1 - box_area / (H W)``."""

    images: torch.Tensor
    perm: torch.Tensor
    lam: float
    box: tuple[int, int, int, int]
    ratio: float


def cutmix(x: torch.Tensor, gen: torch.Generator | None, beta: float = 1.0) -> CutMixResult:
    """Paste ``x[perm]``'s box into ``x`` (on a copy); draw order: lam, perm, box centre."""
    lam = sample_beta(beta, beta, gen)
    perm = torch.randperm(x.shape[0], generator=gen)
    h, w = x.shape[-2:]
    r1, c1, r2, c2 = rand_bbox(h, w, lam, gen)
    out = x.clone()
    out[:, :, r1:r2, c1:c2] = x[perm, :, r1:r2, c1:c2]
    ratio = 1.0 - (r2 - r1) * (c2 - c1) / float(h * w)
    return CutMixResult(out, perm, lam, (r1, c1, r2, c2), ratio)


@dataclass(frozen=True)
class TrainAugment:
    """One protocol's per-batch training transform, applied to uint8 images:

    ``/255 -> shuffle_patches(factor) -> RandomResizedCrop(size, scale, ratio) -> flip ->
    color_jitter(jitter) -> lighting(lighting) -> (x - mean) / std``; a factor of 1 and strengths of
    0 switch steps off.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: float = 0.0
    lighting: float = 0.0
    shuffle_factor: int = 1

    def __call__(self, images: torch.Tensor, gen: torch.Generator | None,
                 mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        x = images.float().div_(255.0)
        x = shuffle_patches(x, self.shuffle_factor, gen)
        x = random_resized_crop(x, self.size, self.scale, self.ratio, gen)
        if self.flip:
            x = random_flip(x, gen)
        if self.jitter > 0:
            x = color_jitter(x, gen, self.jitter, self.jitter, self.jitter)
        if self.lighting > 0:
            x = lighting(x, gen, self.lighting)
        m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - m) / s
