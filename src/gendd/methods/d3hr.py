"""``d3hr``: DDIM inversion + per-class Gaussian + group sampling (Zhao et al., ICML 2025, "D3HR").

Per class (lin-zhao-resoLve/D3HR: generation/dit_inversion_save_statistic.py, group_sampling.py):

1. invert the cached latents ``z_0 = E(x)`` (a posterior *sample*, as the reference's
   ``latent_dist.sample()``) ``n`` DDIM steps with CFG: ``z_0 -> z_t`` (:func:`ddim_invert`);
2. fit a diagonal Gaussian over the class: ``mu = mean_i z_t^i``, ``var = var_i z_t^i`` (unbiased);
3. draw ``num_candidates`` groups of ``ipc`` latents from ``N(mu, diag(var))`` and keep the group
   whose mean, std and skewness match best (:func:`gendd.blocks.group_sampling.select_group`);
4. denoise the chosen group with DDIM + CFG from ``start_step = num_steps - n - start_step_shift``.

Step pairing. gendd's :func:`ddim_invert` with ``n`` steps ends at the level of sampling step ``N - n``
(for DDIM-50 with ``steps_offset = 0``, timesteps ``980 - 20 s``: level ``t = 20 (n - 1)``). The
reference's inversion loop index ``i`` ends at ``t = 20 i`` (its first step starts at ``abar[0]``; gendd
adds the near-identity step ``1 -> abar[0]``), so reference ``i`` is gendd ``n = i + 1``: the
reference's statistics at ``i = 30`` (``--i_step 6``, t = 600) are ``inversion_steps = 31`` (the
default). The reference then resumes at ``start_step = 48 - i = 18`` (t = 620), one step noisier than
the level its latents are at; gendd's consistent pairing resumes at ``N - n = 19`` (t = 600).
``start_step_shift = 1`` reproduces the reference's ``48 - i`` (one extra denoising step). On data
``N(mu, s^2 I)`` with the exact noise prediction (tests/test_d3hr.py), resuming at ``N - n``
reconstructs the inverted latents about twice as accurately as ``N - n - 1``, hence the default. The
reference's DDIM also lands its last step on ``abar[1]`` instead of diffusers' final level 1.0; gendd
uses diffusers' levels (a 1e-4 difference in ``abar``).

Candidate count. The reference's ``--m 100000`` runs ``m // 10 = 10,000`` rounds of 10,000 groups,
i.e. 1e8 candidate groups per class (a result folder suggests ``m1000`` = 1e6 for Tiny-ImageNet); the
paper's value could not be checked. The default here is 10,000 groups, which costs about
``10,000 * ipc * d`` normal draws (~4 ns each on one CPU core: 0.1 s at IPC 10, d = 256;
8 s at IPC 50, d = 4096); raise it (and use ``group_device="backbone"`` on a GPU) to approach the
reference.

Storage. The class statistics (``mean``, ``variance``), the chosen ``group`` and the class ``label`` /
``model_label`` are saved beside the latents, so the ``d3hr-regenerate`` method can rebuild the
images at any IPC from them and the backbone alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import ClassVar, Literal

import torch

from gendd.backbone.sampling import SAMPLERS, SamplerConfig, ddim_invert, sample
from gendd.blocks.group_sampling import select_group
from gendd.config import check
from gendd.errors import ConfigError, DataError
from gendd.methods.base import ClassContext, ClassResult, Method
from gendd.methods.dit import DiTConfig
from gendd.artifacts import save_safetensors


@dataclass
class D3HRConfig(DiTConfig):
    """Attributes (besides :class:`DiTConfig`'s; ``sampler`` must be ``ddim``):

    inversion_steps: DDIM inversion steps ``n`` (31 = the reference's statistics at i = 30, t = 600).
    start_step_shift: resume sampling at ``num_steps - n - shift``; 1 = the reference's ``48 - i``.
    inversion_cfg_scale: CFG scale while inverting (reference: 4.0, as sampling); None = ``cfg_scale``.
    num_candidates: candidate groups scored per class (reference: 1e8; module docstring).
    w_skew: weight of the skewness term in the group score (reference 0.1).
    skew_axis: ``reference`` (the reference's feature-axis skewness) or ``per-dim``
        (:mod:`gendd.blocks.group_sampling`).
    chunk_size: at most this many candidate groups per chunk (None = from the 8 MiB buffer bound).
    max_latents: invert at most this many latents per class (a fixed random subset, the same for every
        seed and IPC; None = all, as the reference). Inversion is the costly step on a CPU (about 0.7 ms
        per latent and DiT pass with the Fashion-MNIST backbone, CFG doubling the passes).
    group_device: ``cpu`` draws candidates with the class generator on the CPU (the selected group
        does not depend on the chunk size); ``backbone`` draws them on the backbone's device with a
        generator seeded from the class generator (fast on a GPU; results depend on the device).
    """

    config_what: ClassVar[str] = "d3hr"
    reference_cfg_channels: ClassVar[int | None] = None  # reference: DDIM on all channels

    sampler: Literal["ddpm", "ddim"] = field(default="ddim", metadata=check(choices=SAMPLERS))
    inversion_steps: int = field(default=31, metadata=check(Integral, ge=0))
    start_step_shift: int = field(default=0, metadata=check(Integral, ge=0))
    inversion_cfg_scale: float | None = field(default=None, metadata=check(Real, optional=True))
    num_candidates: int = field(default=10_000, metadata=check(Integral, ge=1))
    w_skew: float = field(default=0.1, metadata=check(Real, ge=0))
    skew_axis: Literal["reference", "per-dim"] = field(default="reference",
                                                       metadata=check(choices=("reference", "per-dim")))
    chunk_size: int | None = field(default=None, metadata=check(Integral, ge=1, optional=True))
    group_device: Literal["cpu", "backbone"] = field(default="cpu", metadata=check(choices=("cpu", "backbone")))
    max_latents: int | None = field(default=None, metadata=check(Integral, ge=2, optional=True))

    def _check_fields(self) -> None:
        super()._check_fields()
        if self.sampler != "ddim":
            raise ConfigError("d3hr resumes a DDIM inversion; use sampler=ddim")
        if not self.inversion_steps <= self.num_steps:
            raise ConfigError(f"inversion_steps must be in 0..num_steps={self.num_steps}, "
                              f"got {self.inversion_steps}")
        if not self.start_step_shift <= self.num_steps - self.inversion_steps:
            raise ConfigError(f"start_step_shift must be in 0..{self.num_steps - self.inversion_steps}, "
                              f"got {self.start_step_shift}")

    @property
    def start_step(self) -> int:
        return self.num_steps - self.inversion_steps - self.start_step_shift

    def inversion_config(self, backbone) -> SamplerConfig:
        cfg = self.sampler_config(backbone)
        if self.inversion_cfg_scale is not None:
            cfg = dataclasses.replace(cfg, cfg_scale=self.inversion_cfg_scale)
        return cfg


def class_statistics(inverted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and unbiased variance over a class ``(n, C, h, w)`` (float64 sums, float32 out)."""
    if inverted.shape[0] < 2:
        raise DataError(f"d3hr fits a Gaussian per class and needs >= 2 images, got {inverted.shape[0]}")
    x = inverted.double()
    return x.mean(0).float(), x.var(0).float()


def generate_from_statistics(backbone, mean: torch.Tensor, variance: torch.Tensor, model_label: int,
                             ipc: int, generator: torch.Generator, config: D3HRConfig,
                             progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Steps 3-4: group sampling from ``N(mean, diag(variance))`` then DDIM from ``config.start_step``.

    Returns ``(latents (ipc, C, h, w), group (ipc, C, h, w), score stats)``. Shared by the method and
    ``d3hr-regenerate``, so equal inputs give bit-identical latents.
    """
    shape = tuple(backbone.latent_shape)
    if mean.numel() != variance.numel() or mean.numel() != math.prod(shape):
        raise DataError(f"statistics of {mean.numel()} / {variance.numel()} values do not fit the backbone's "
                        f"latent shape {shape}; use the backbone the statistics were computed with")
    mu, sigma = mean.reshape(-1).float(), variance.reshape(-1).float().clamp_min(0).sqrt()
    gen = generator
    if config.group_device == "backbone":
        dev = torch.device(backbone.device)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        gen = torch.Generator(device=dev).manual_seed(seed)
        mu, sigma = mu.to(dev), sigma.to(dev)
    group, _, stats = select_group(mu, sigma, ipc, config.num_candidates, gen, chunk_size=config.chunk_size,
                                   w_skew=config.w_skew, skew_axis=config.skew_axis, progress=progress)
    group = group.cpu().reshape(ipc, *shape)
    labels = torch.full((ipc,), int(model_label), dtype=torch.long)
    z = sample(backbone, group, labels, config.sampler_config(backbone), start_step=config.start_step,
               progress=progress)
    return z, group, stats


class D3HR(Method):
    name = "d3hr"
    config_class = D3HRConfig
    needs_backbone = True
    needs_cache = True
    summary = "DDIM inversion, per-class Gaussian, moment-matched group sampling, DDIM (Zhao et al. 2025)"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._hashes: dict[int, str] = {}

    def encode_spec(self):
        from gendd.cache import EncodeSpec

        return EncodeSpec(sample=True)  # the reference encodes with latent_dist.sample()

    def class_statistics(self, ctx: ClassContext, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-2 for one class: invert ``z0`` and fit ``(mean, variance)``.

        The result does not depend on the IPC or the sampling seed, so it is stored in the latent cache's
        folder (``d3hr-<key>.safetensors``, key = hash of the DiT, the inversion settings, the class label
        and its latents) and reused by every later run: IPC 1, 10 and 50 pay the inversion once.
        """
        from safetensors.torch import load_file

        cfg = self.config
        inv = cfg.inversion_config(ctx.backbone)
        path = None
        if ctx.cache is not None and getattr(ctx.cache, "root", None) is not None:
            bb_hash = self._hashes.get(id(ctx.backbone))
            if bb_hash is None:
                bb_hash = self._hashes[id(ctx.backbone)] = ctx.backbone.content_hash()
            fields = {"backbone": bb_hash, "inversion_steps": cfg.inversion_steps,
                      "sampler": dataclasses.asdict(inv), "label": ctx.model_label,
                      "latents": hashlib.sha256(z0.contiguous().numpy().tobytes()).hexdigest()}
            fields.update(ctx.backbone.execution())  # bf16/fp16 inversion: other statistics
            condition = ctx.backbone.condition_key(ctx.model_label)
            if condition is not None:  # a text backbone inverts under the class's prompt
                fields["condition"] = condition
            ident = json.dumps(fields, sort_keys=True, default=str)
            key = hashlib.sha256(ident.encode()).hexdigest()[:16]
            path = Path(ctx.cache.root) / f"d3hr-{key}.safetensors"
            if path.exists():
                d = load_file(str(path))
                return d["mean"], d["variance"]
        labels = torch.full((z0.shape[0],), ctx.model_label, dtype=torch.long)
        zt = ddim_invert(ctx.backbone, z0, labels, cfg.inversion_steps, inv, progress=ctx.progress)
        mean, var = class_statistics(zt)
        if path is not None:
            save_safetensors(path, {"mean": mean.contiguous(), "variance": var.contiguous()})
        return mean, var

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        cfg = self.config
        z0 = ctx.class_latents()
        if cfg.max_latents is not None and z0.shape[0] > cfg.max_latents:
            keep = torch.randperm(z0.shape[0], generator=torch.Generator().manual_seed(0))[:cfg.max_latents]
            z0 = z0[keep.sort().values]
        mean, var = self.class_statistics(ctx, z0)
        z, group, stats = generate_from_statistics(ctx.backbone, mean, var, ctx.model_label, ctx.ipc,
                                                   ctx.generator, cfg, progress=ctx.progress)
        tensors = {"mean": mean, "variance": var, "group": group,
                   "label": torch.tensor([ctx.label]), "model_label": torch.tensor([ctx.model_label])}
        extra = {"num_real": int(z0.shape[0]), "start_step": cfg.start_step, "group_score": stats}
        return ClassResult(latents=z, tensors=tensors, extra=extra)


def statistics_file(statistics: str | os.PathLike, name: str) -> Path:
    """The statistics file of class ``name`` in a d3hr output folder, its ``latents/`` or a folder of them."""
    root = Path(statistics)
    if (root / "latents").is_dir():  # a distilled output folder
        root = root / "latents"
    path = root / f"{name}.safetensors"
    if not path.is_file():
        raise DataError(f"no statistics for class {name!r} in {root} ({path.name} is missing); pass the d3hr "
                        "output folder the statistics were saved in")
    return path


@dataclass
class D3HRRegenerateConfig(D3HRConfig):
    """Attributes (besides d3hr's): statistics (a d3hr output folder, or its ``latents/``, holding each
    class's ``mean``/``variance``/``label``/``model_label`` as :class:`D3HR` saves them)."""

    config_what: ClassVar[str] = "d3hr-regenerate"

    statistics: str | None = field(default=None, metadata=check(str, os.PathLike, optional=True))

    def _check_fields(self) -> None:
        super()._check_fields()
        if self.statistics is not None:
            object.__setattr__(self, "statistics", os.fspath(self.statistics))


class D3HRRegenerate(Method):
    """A D3HR set from stored per-class statistics and the backbone alone (D3HR's storable form): steps 3-4
    of :class:`D3HR` with each class's saved Gaussian. With the same config, seed and IPC the images are
    bit-identical to the d3hr export's (the same class generator, ``seed_for(seed, label)``); any IPC works."""

    name = "d3hr-regenerate"
    config_class = D3HRRegenerateConfig
    needs_backbone = True
    summary = "D3HR sampling from stored per-class statistics (no data pass, no inversion)"

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        from safetensors.torch import load_file

        cfg = self.config
        if cfg.statistics is None:
            raise ConfigError("d3hr-regenerate needs statistics=FOLDER (a d3hr output folder)")
        path = statistics_file(cfg.statistics, ctx.name)
        t = load_file(str(path))
        missing = {"mean", "variance", "label", "model_label"} - set(t)
        if missing:
            raise DataError(f"{path} lacks {', '.join(sorted(missing))}; it was not written by gendd's d3hr")
        label, model_label = int(t["label"].reshape(-1)[0]), int(t["model_label"].reshape(-1)[0])
        if (label, model_label) != (ctx.label, ctx.model_label):
            raise DataError(f"{path} holds class {label} (model label {model_label}), but {ctx.name!r} is class "
                            f"{ctx.label} (model label {ctx.model_label}) of this dataset")
        z, _, stats = generate_from_statistics(ctx.backbone, t["mean"], t["variance"], model_label, ctx.ipc,
                                               ctx.generator, cfg, progress=ctx.progress)
        return ClassResult(latents=z, extra={"group_score": stats, "statistics_sha256": _sha256(path)})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
