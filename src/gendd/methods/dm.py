"""``dm``: Distribution Matching (Zhao & Bilen, WACV'23), pixel-space dataset condensation.

``ipc`` synthetic images per class, in the dataset's geometry and normalised as the students see
them (``(x/255 - mean) / std``), are optimised so that their mean embedding under a *randomly
initialised, untrained* ConvNet matches that of the real class, under one shared (Siamese) DSA
augmentation draw per class and iteration:

    L_it = sum_c || mean_{x in B_c} psi_it(A_{it,c}(x)) - mean_{s in S_c} psi_it(A_{it,c}(s)) ||^2

``psi_it`` = ``embed`` (features before the classifier) of a fresh ConvNet-3 every iteration (no
training, default torch init, parameters frozen), ``B_c`` = ``batch_real`` real images of class
``c`` drawn without replacement (all of them if the class is smaller), ``A`` = DSA with strategy
``color_crop_cutout_flip_scale_rotate`` (aug_mode "S": one op group per call). One SGD step on the
images per iteration (lr_img 1.0, momentum 0.5), init from a random draw of real images.

Reference: ``VICO-UoE/DatasetCondensation`` ``main_DM.py`` (defaults Iteration 20000, lr_img 1.0,
batch_real 256, init real, dsa_strategy as above, SGD momentum 0.5, net ``ConvNet`` in train mode
with ``requires_grad=False``; the real embedding is detached). Differences, all deliberate:

* Per class instead of joint. The reference sums the class terms and steps all images with one
  optimiser and one net per iteration. Class ``c``'s images enter only term ``c`` and SGD acts
  elementwise, so optimising each class alone with the *same sequence of nets* gives the same
  images. The net of iteration ``it`` is therefore seeded by :func:`net_seed` from ``config.seed``
  and ``it`` (not from the class generator); the real batches, the augmentation seeds and the
  initialisation come from the class generator.
* ``iterations`` counts optimiser steps. The reference loops ``range(Iteration + 1)`` and saves
  after step 20001 (its last evaluation sees 20000 steps).
* The reference seeds DSA from the wall clock (``time.time()``); here each (class, iteration)
  draws a 62-bit augmentation seed from the class generator and applies it to both batches.
* Output. The reference evaluates the float tensors as optimised (no clamping). gendd exports
  uint8 PNGs: ``round(255 * clamp(x * std + mean, 0, 1))``, so values outside [0, 1] are clipped
  and the rest quantised to 1/255 (``torchvision.save_image``, which the reference uses for its
  pictures, does the same). With ``save_float`` the exact optimised normalised floats are also saved
  as ``dm_images`` in ``latents/<class>.safetensors``, with the per-iteration loss (``dm_loss``).

Cost: every iteration embeds ``batch_real`` real images per class with a fresh ConvNet-3, about
0.6 s per class and iteration on one CPU core at 28 px (measured), so the reference's 20000
iterations on Fashion-MNIST's 10 classes take about a day and a half of CPU time; run it on a GPU
(``device="cuda"``, where convolution backward is not bit-reproducible) or lower ``iterations``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import ClassVar, Literal, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gendd.config import check
from gendd.errors import ConfigError, DataError, NumericalError
from gendd.evaluate.augment import DEFAULT_STRATEGY, DSAugment
from gendd.evaluate.students import STUDENTS, build_student
from gendd.hardware import PRECISIONS, autocast, resolve_precision
from gendd.methods.base import ClassContext, ClassResult, Method, MethodConfig


def _parse_device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError("not a torch device; use cpu, cuda or cuda:<index>") from None


@dataclass
class DMConfig(MethodConfig):
    """Attributes (reference ``main_DM.py`` defaults): iterations (20000 SGD steps on the images),
    lr_img (1.0), momentum (0.5), batch_real (256 real images per class and iteration), init
    ("real": a random draw of real images; "noise": N(0, 1) in normalised space), dsa_strategy
    ("none" disables augmentation), net (a registered student with ``embed``; "convnet3"), device
    ("cpu" or "cuda"), save_float (also save the unquantised images and the loss curve), precision
    (of the embedding forwards: fp32 as the reference, bf16, or auto, :mod:`gendd.hardware`)."""

    config_what: ClassVar[str] = "dm"

    iterations: int = field(default=20000, metadata=check(Integral, ge=0))
    lr_img: float = field(default=1.0, metadata=check(Real, gt=0))
    momentum: float = field(default=0.5, metadata=check(Real, ge=0, lt=1))
    batch_real: int = field(default=256, metadata=check(Integral, ge=1))
    init: Literal["real", "noise"] = field(default="real", metadata=check(choices=("real", "noise")))
    dsa_strategy: str = field(default=DEFAULT_STRATEGY, metadata=check(str, test=DSAugment))
    net: str = field(default="convnet3", metadata=check(choices=lambda: tuple(sorted(STUDENTS))))
    device: str = field(default="cpu", metadata=check(str, test=_parse_device))
    save_float: bool = field(default=True, metadata=check(bool))
    precision: str = field(default="fp32", metadata=check(choices=PRECISIONS))


def net_seed(seed: int, iteration: int) -> int:
    """Seed of the embedding net of ``iteration``: a function of ``(seed, iteration)`` only, so all
    classes see the same nets (and a longer run starts with the nets of a shorter one)."""
    state = np.random.SeedSequence([int(seed), int(iteration), 0x444D]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) % (2**63)


def embedding_net(name: str, channels: int, num_classes: int, image_size: int, seed: int,
                  device: str | torch.device = "cpu") -> nn.Module:
    """A freshly initialised student (torch default init under ``torch.manual_seed(seed)``, built on
    the CPU, global RNG untouched), frozen, in train mode as in the reference."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_student(name, channels, num_classes, image_size)
    if not hasattr(net, "embed"):
        raise ConfigError(f"net {name!r} has no embed(); DM needs a student with a feature embedding")
    return net.to(device).requires_grad_(False).train()


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> ``(x/255 - mean) / std`` (``mean``/``std`` shaped (1, C, 1, 1), on x's device)."""
    return (x.float() / 255.0 - mean) / std


def denormalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised float images -> uint8 ``round(255 * clamp(x * std + mean, 0, 1))`` on the CPU."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    y = x.detach().float().cpu() * s + m
    return (y.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def class_term(net: nn.Module, syn: torch.Tensor, real_u8: torch.Tensor, mean: torch.Tensor,
               std: torch.Tensor, batch_real: int, augment: DSAugment,
               generator: torch.Generator, precision: str = "fp32") -> torch.Tensor:
    """One class's DM loss ``|| mean embed(A(B)) - mean embed(A(syn)) ||^2`` for one iteration.

    Draws from ``generator`` (CPU), in order: the real batch ``B`` (``batch_real`` distinct images
    of ``real_u8``) and one augmentation seed; ``A`` is applied with that seed, Siamese (one
    parameter draw per batch), to the real and the synthetic batch, so both get the same transform.
    """
    n = real_u8.shape[0]
    idx = torch.randperm(n, generator=generator)[:batch_real].to(real_u8.device)
    aug_seed = int(torch.randint(2**62, (1,), generator=generator))
    real = _normalize(real_u8[idx], mean, std)
    if augment.groups:
        real = augment(real, torch.Generator().manual_seed(aug_seed), siamese=True)
        syn = augment(syn, torch.Generator().manual_seed(aug_seed), siamese=True)
    with autocast(precision, syn.device):
        with torch.no_grad():
            target = net.embed(real).float().mean(0)
        return ((target - net.embed(syn).float().mean(0)) ** 2).sum()


def initial_images(ctx: ClassContext, init: str, real_u8: torch.Tensor, mean: torch.Tensor,
                   std: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """The starting synthetic set (normalised) and, for ``init="real"``, the dataset indices used.

    Drawn first from the class generator: ``randperm(class size)[:ipc]`` or ``randn``.
    """
    if init == "noise":
        shape = (ctx.ipc, *real_u8.shape[1:])
        return torch.randn(shape, generator=ctx.generator).to(real_u8.device), None
    n = real_u8.shape[0]
    if ctx.ipc > n:
        raise DataError(f"IPC {ctx.ipc} exceeds the {n} images of class {ctx.name!r}; use init='noise'")
    pos = torch.randperm(n, generator=ctx.generator)[:ctx.ipc]
    idx = ctx.dataset.class_indices(ctx.label)[pos.numpy()]
    return _normalize(real_u8[pos.to(real_u8.device)], mean, std), [int(i) for i in idx]


class DistributionMatching(Method):
    name = "dm"
    config_class = DMConfig
    summary = "Distribution Matching: pixels matching real mean embeddings of random ConvNets"

    def _device(self) -> torch.device:
        dev = torch.device(self.config.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is available; use device='cpu'")
        return dev

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        cfg, ds = self.config, ctx.dataset
        dev = self._device()
        precision = resolve_precision(cfg.precision, dev)
        mean = torch.tensor(ds.mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(ds.std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        real_u8 = ds.load(ds.class_indices(ctx.label)).to(dev)
        x0, init_idx = initial_images(ctx, cfg.init, real_u8, mean, std)
        syn = x0.clone().requires_grad_(True)
        opt = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum)
        augment = DSAugment(cfg.dsa_strategy)
        losses = []
        bar = tqdm(range(cfg.iterations), desc=f"dm {ctx.name}", disable=not ctx.progress, leave=False,
                   dynamic_ncols=True)
        for it in bar:
            net = embedding_net(cfg.net, ds.channels, ds.num_classes, ds.image_size, net_seed(cfg.seed, it), dev)
            loss = class_term(net, syn, real_u8, mean, std, cfg.batch_real, augment, ctx.generator, precision)
            lv = float(loss.detach())
            if not np.isfinite(lv):
                raise NumericalError(f"DM loss became {lv} at iteration {it} of class {ctx.name!r}; "
                                     "lower lr_img or check the dataset mean/std")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(lv)
            if it % 50 == 0:
                bar.set_postfix(loss=f"{lv:.4g}")
        bar.close()
        images = denormalize_uint8(syn, ds.mean, ds.std)
        tail = losses[-max(1, len(losses) // 10):] if losses else []
        extra = {"init_indices": init_idx, "iterations": cfg.iterations, "precision": precision,
                 "loss_first": losses[0] if losses else None,
                 "loss_last10pct": float(np.mean(tail)) if tail else None}
        tensors = {}
        if cfg.save_float:
            tensors["dm_images"] = syn.detach().cpu().contiguous()
            if losses:
                tensors["dm_loss"] = torch.tensor(losses, dtype=torch.float32)
        return ClassResult(images=images, extra=extra, tensors=tensors)
