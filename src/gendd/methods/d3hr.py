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
``model_label`` are saved beside the latents, so :func:`regenerate_from_statistics` can rebuild the
images at any IPC from them and the backbone alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import ClassVar, Literal, Sequence

import torch
from tqdm.auto import tqdm

from gendd.backbone.sampling import SAMPLERS, SamplerConfig, ddim_invert, sample
from gendd.blocks.group_sampling import select_group
from gendd.config import check
from gendd.errors import ConfigError, DataError
from gendd.methods.base import ClassContext, ClassResult, Method, seed_for
from gendd.methods.dit import DiTConfig


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
    :func:`regenerate_from_statistics`, so equal inputs give bit-identical latents.
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
        from safetensors.torch import load_file, save_file

        cfg = self.config
        inv = cfg.inversion_config(ctx.backbone)
        path = None
        if ctx.cache is not None and getattr(ctx.cache, "root", None) is not None:
            bb_hash = self._hashes.get(id(ctx.backbone))
            if bb_hash is None:
                bb_hash = self._hashes[id(ctx.backbone)] = ctx.backbone.content_hash()
            ident = json.dumps({"backbone": bb_hash, "inversion_steps": cfg.inversion_steps,
                                "sampler": dataclasses.asdict(inv), "label": ctx.model_label,
                                "latents": hashlib.sha256(z0.contiguous().numpy().tobytes()).hexdigest()},
                               sort_keys=True, default=str)
            key = hashlib.sha256(ident.encode()).hexdigest()[:16]
            path = Path(ctx.cache.root) / f"d3hr-{key}.safetensors"
            if path.exists():
                d = load_file(str(path))
                return d["mean"], d["variance"]
        labels = torch.full((z0.shape[0],), ctx.model_label, dtype=torch.long)
        zt = ddim_invert(ctx.backbone, z0, labels, cfg.inversion_steps, inv, progress=ctx.progress)
        mean, var = class_statistics(zt)
        if path is not None:
            tmp = path.with_suffix(".tmp")
            save_file({"mean": mean.contiguous(), "variance": var.contiguous()}, str(tmp))
            os.replace(tmp, path)
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


def _statistics_files(statistics: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(statistics, (str, os.PathLike)):
        root = Path(statistics)
        if root.is_file():
            return [root]
        if (root / "latents").is_dir():  # a distilled output folder
            root = root / "latents"
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise DataError(f"no .safetensors statistics in {root}; pass a d3hr output folder or its latents/")
        return files
    return [Path(p) for p in statistics]


def regenerate_from_statistics(statistics: str | os.PathLike | Sequence[str | os.PathLike], backbone, ipc: int,
                               out: str | os.PathLike, *, seed: int | None = None,
                               config: D3HRConfig | None = None, classes: Sequence[str] | None = None,
                               progress: bool = False, **options) -> dict:
    """Rebuild a d3hr ImageFolder ``out/<class>/<i>.png`` from saved statistics and the backbone alone.

    ``statistics``: a d3hr output folder (or its ``latents/``) or ``.safetensors`` files holding
    ``mean``, ``variance``, ``label`` and ``model_label`` (as :class:`D3HR` saves them); the file stem is
    the class name. Each class uses the generator seed of the export (``seed_for(seed, label)``), so with
    the same config, seed and IPC the PNGs are bit-identical to the method's; any other IPC works too.
    ``config``/``options`` as for the method (``num_candidates``, ``skew_axis``, ...); ``seed`` overrides
    ``config.seed``. Each class is written to ``out/.partial-<class>`` and renamed when complete.

    Returns (and writes to ``out/regenerate.json``) the config, seed and per-class score statistics.
    """
    from safetensors.torch import load_file

    from gendd.data.base import to_uint8
    from gendd.export import save_png

    if ipc < 1:
        raise ConfigError(f"IPC must be >= 1, got {ipc}")
    config = config or D3HRConfig()
    if options:
        config = dataclasses.replace(config, **options)
    if seed is not None:
        config = dataclasses.replace(config, seed=int(seed))
    files = _statistics_files(statistics)
    if classes is not None:
        wanted = set(classes)
        files = [f for f in files if f.stem in wanted]
        missing = wanted - {f.stem for f in files}
        if missing:
            raise DataError(f"no statistics for class(es) {', '.join(sorted(missing))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"method": "d3hr", "source": "statistics", "config": dataclasses.asdict(config), "ipc": ipc,
              "classes_done": {}}
    for f in tqdm(files, desc="d3hr regenerate", disable=not progress):
        t = load_file(str(f))
        missing = {"mean", "variance", "label", "model_label"} - set(t)
        if missing:
            raise DataError(f"{f} lacks {', '.join(sorted(missing))}; it was not written by gendd's d3hr")
        t0 = time.time()
        label, model_label = int(t["label"].reshape(-1)[0]), int(t["model_label"].reshape(-1)[0])
        class_seed = seed_for(config.seed, label)
        gen = torch.Generator().manual_seed(class_seed)
        z, _, stats = generate_from_statistics(backbone, t["mean"], t["variance"], model_label, ipc, gen, config,
                                               progress=progress)
        images = torch.cat([to_uint8(backbone.decode(z[i:i + 64])) for i in range(0, z.shape[0], 64)])
        part, final = out / f".partial-{f.stem}", out / f.stem
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        for i, img in enumerate(images):
            save_png(img, part / f"{i}.png")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(part, final)
        report["classes_done"][f.stem] = {"label": label, "model_label": model_label, "seed": class_seed,
                                          "seconds": round(time.time() - t0, 3), "group_score": stats}
    (out / "regenerate.json").write_text(json.dumps(report, indent=2))
    return report
