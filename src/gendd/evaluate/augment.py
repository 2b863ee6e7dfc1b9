"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML'21), vectorised, seeded.

Behaviour follows the reference ``VICO-UoE/DatasetCondensation`` ``utils.py`` (``ParamDiffAug``,
``DiffAugment`` and the ``rand_*`` ops, themselves adapted from mit-han-lab/data-efficient-gans):

* The ops act on *normalised* images (``(x/255 - mean) / std``); padding and cut-out fill with 0,
  i.e. with the dataset mean colour.
* ``strategy`` is an ``_``-joined list of op groups: ``color`` (= brightness, saturation,
  contrast, in that order), ``crop``, ``cutout``, ``flip``, ``scale``, ``rotate``.
* ``aug_mode="S"`` (reference default): each call draws ONE group uniformly at random and applies
  only that group to the whole batch. ``aug_mode="M"``: every group, in strategy order.
* Per-sample randomness: with the reference's ``seed=-1`` (how ``evaluate_synset`` trains students)
  every image of the batch gets its own parameters. ``siamese=True`` reproduces the seeded
  ("Siamese") mode used while distilling: one parameter draw shared by the whole batch, so two
  batches augmented from equally seeded generators get the same transformation.

Randomness comes only from the ``torch.Generator`` passed in (drawn on the CPU), never from the
global RNG. Every op is differentiable with respect to the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gendd.errors import ConfigError

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAParams:
    """Strengths of the ops; defaults are the reference ``ParamDiffAug`` values."""

    scale: float = 1.2        # ratio_scale: sx, sy ~ U(1/1.2, 1.2)
    rotate: float = 15.0      # ratio_rotate: angle ~ U(-15, 15) degrees
    crop_pad: float = 0.125   # ratio_crop_pad: shift ~ U{-round(0.125 H), ..., +round(0.125 H)}
    cutout: float = 0.5       # ratio_cutout: square of side round(0.5 H)
    brightness: float = 1.0   # x + (u - 0.5) * 1.0
    saturation: float = 2.0   # factor u * 2.0
    contrast: float = 0.5     # factor u + 0.5
    flip: float = 0.5         # prob_flip


def _uniform(n: int, gen: torch.Generator | None, x: torch.Tensor) -> torch.Tensor:
    """``n`` draws of U[0, 1) on the CPU generator, moved to ``x``'s device and dtype."""
    return torch.rand(n, generator=gen).to(device=x.device, dtype=x.dtype)


def _randint(low: int, high: int, n: int, gen: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    return torch.randint(low, high, (n,), generator=gen).to(device)


def _expand(p: torch.Tensor, batch: int) -> torch.Tensor:
    """Siamese draws have length 1; broadcast them to the batch."""
    return p.expand(batch) if p.shape[0] == 1 else p


def _round_half_up(v: float) -> int:
    return int(v + 0.5)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` at ``theta @ [u, v, 1]`` (normalised coords, align_corners=False),
    bilinear, zero outside, as ``F.affine_grid`` + ``F.grid_sample``."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rand_scale(x: torch.Tensor, p: DSAParams, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """Anisotropic zoom: ``theta = [[sx, 0, 0], [0, sy, 0]]``, ``sx, sy ~ U(1/r, r)``, r = 1.2.

    ``sx > 1`` samples a wider area, i.e. shrinks the content; uncovered pixels become 0.
    """
    r = p.scale
    sx = _expand(_uniform(n, gen, x) * (r - 1.0 / r) + 1.0 / r, x.shape[0])
    sy = _expand(_uniform(n, gen, x) * (r - 1.0 / r) + 1.0 / r, x.shape[0])
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def rand_rotate(x: torch.Tensor, p: DSAParams, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """Rotation about the centre: ``theta = [[cos a, -sin a, 0], [sin a, cos a, 0]]``,
    ``a ~ U(-r, r)`` degrees, r = 15; corners become 0."""
    a = _expand((_uniform(n, gen, x) - 0.5) * 2.0 * p.rotate * math.pi / 180.0, x.shape[0])
    c, s, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)
    return _affine(x, theta)


def rand_flip(x: torch.Tensor, p: DSAParams, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """Horizontal flip (last axis) with probability ``p.flip`` (0.5): ``x[..., ::-1]``."""
    flip = _expand(_uniform(n, gen, x) < p.flip, x.shape[0]).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def rand_brightness(x: torch.Tensor, p: DSAParams, n: int,
                    gen: torch.Generator | None) -> torch.Tensor:
    """Additive shift: ``x + (u - 0.5) * b``, ``u ~ U(0, 1)``, b = 1 (in normalised units)."""
    u = _expand(_uniform(n, gen, x), x.shape[0]).view(-1, 1, 1, 1)
    return x + (u - 0.5) * p.brightness


def rand_saturation(x: torch.Tensor, p: DSAParams, n: int,
                    gen: torch.Generator | None) -> torch.Tensor:
    """Saturation: ``m + (x - m) * (u * s)``, ``m`` = per-pixel mean over channels, s = 2.

    A no-op for single-channel images (``x == m``), as in the reference.
    """
    m = x.mean(dim=1, keepdim=True)
    u = _expand(_uniform(n, gen, x), x.shape[0]).view(-1, 1, 1, 1)
    return (x - m) * (u * p.saturation) + m


def rand_contrast(x: torch.Tensor, p: DSAParams, n: int,
                  gen: torch.Generator | None) -> torch.Tensor:
    """Contrast: ``m + (x - m) * (u + c)``, ``m`` = per-image mean over C, H, W, c = 0.5."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    u = _expand(_uniform(n, gen, x), x.shape[0]).view(-1, 1, 1, 1)
    return (x - m) * (u + p.contrast) + m


def rand_crop(x: torch.Tensor, p: DSAParams, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """Pad-and-crop as an integer translation: ``y[i, j] = x[i + tx, j + ty]`` (0 outside),
    ``tx ~ U{-S_h..S_h}`` (rows), ``ty ~ U{-S_w..S_w}`` (columns), ``S = round(0.125 * side)``
    (4 px at 28 and 32 px)."""
    b, c, h, w = x.shape
    sh, sw = _round_half_up(h * p.crop_pad), _round_half_up(w * p.crop_pad)
    tx = _expand(_randint(-sh, sh + 1, n, gen, x.device), b)
    ty = _expand(_randint(-sw, sw + 1, n, gen, x.device), b)
    # Index into a 1-pixel zero border: source row i + tx, shifted by +1 for the border and
    # clamped onto it when it falls outside the image.
    rows = (torch.arange(h, device=x.device) + tx[:, None] + 1).clamp_(0, h + 1)   # (b, h)
    cols = (torch.arange(w, device=x.device) + ty[:, None] + 1).clamp_(0, w + 1)   # (b, w)
    xp = F.pad(x, (1, 1, 1, 1))
    xp = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2))
    return xp.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def rand_cutout(x: torch.Tensor, p: DSAParams, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """Zero a square of side ``k = round(0.5 * side)`` (14 px at 28, 16 at 32) centred at
    ``o ~ U{0..side - (k mod 2)}``: rows/cols ``o - k//2 .. o - k//2 + k - 1``, clipped."""
    b, _, h, w = x.shape
    kh, kw = _round_half_up(h * p.cutout), _round_half_up(w * p.cutout)
    ox = _expand(_randint(0, h + (1 - kh % 2), n, gen, x.device), b)
    oy = _expand(_randint(0, w + (1 - kw % 2), n, gen, x.device), b)
    r = torch.arange(h, device=x.device) - (ox[:, None] - kh // 2)    # (b, h)
    q = torch.arange(w, device=x.device) - (oy[:, None] - kw // 2)    # (b, w)
    cut = ((r >= 0) & (r < kh))[:, :, None] & ((q >= 0) & (q < kw))[:, None, :]
    return x * (~cut).to(x.dtype)[:, None]


Op = Callable[[torch.Tensor, DSAParams, int, "torch.Generator | None"], torch.Tensor]

#: op group name -> ops applied in order (reference ``AUGMENT_FNS``).
AUGMENT_GROUPS: dict[str, tuple[Op, ...]] = {
    "color": (rand_brightness, rand_saturation, rand_contrast),
    "crop": (rand_crop,),
    "cutout": (rand_cutout,),
    "flip": (rand_flip,),
    "scale": (rand_scale,),
    "rotate": (rand_rotate,),
}


class DSAugment:
    """Callable DSA augmentation: ``aug(x, generator) -> x'`` on a float ``(n, C, H, W)`` batch.

    Args:
        strategy: ``_``-joined op groups, e.g. ``"color_crop_cutout_flip_scale_rotate"``
            (reference choice for Fashion-MNIST/CIFAR; drop ``flip`` for MNIST/SVHN), or
            ``"none"``/``""`` for the identity.
        aug_mode: ``"S"`` one random group per call (reference default) or ``"M"`` all groups.
        params: op strengths (reference defaults).
    """

    def __init__(self, strategy: str = DEFAULT_STRATEGY, aug_mode: str = "S",
                 params: DSAParams | None = None) -> None:
        if aug_mode not in ("S", "M"):
            raise ConfigError(f"DSA aug_mode must be 'S' or 'M', got {aug_mode!r}")
        groups = [] if strategy.lower() in ("", "none") else strategy.split("_")
        unknown = [g for g in groups if g not in AUGMENT_GROUPS]
        if unknown:
            raise ConfigError(f"unknown DSA op(s) {unknown} in strategy {strategy!r}; "
                              f"choose from {sorted(AUGMENT_GROUPS)}")
        self.strategy = strategy
        self.groups = groups
        self.aug_mode = aug_mode
        self.params = params or DSAParams()

    def __repr__(self) -> str:
        return f"DSAugment(strategy={self.strategy!r}, aug_mode={self.aug_mode!r}, params={self.params})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 siamese: bool = False) -> torch.Tensor:
        """Augment ``x``; ``generator`` (CPU) supplies all randomness (``None`` = global RNG).

        ``siamese=True`` draws one set of parameters for the whole batch.
        """
        if not self.groups:
            return x
        if x.dim() != 4:
            raise ConfigError(f"DSAugment expects a (n, C, H, W) batch, got shape {tuple(x.shape)}")
        n = 1 if siamese else x.shape[0]
        if self.aug_mode == "S":
            k = int(torch.randint(len(self.groups), (1,), generator=generator))
            chosen = [self.groups[k]]
        else:
            chosen = self.groups
        for g in chosen:
            for op in AUGMENT_GROUPS[g]:
                x = op(x, self.params, n, generator)
        return x.contiguous()
