"""``d4m``: prototypes in latent space + img2img (Su et al., "D4M: Dataset Distillation via
Disentangled Diffusion Model", CVPR 2024; suduo94/D4M).

1. Prototypes (distillation/gen_prototype.py): ``k = IPC`` cluster centres of the class's VAE
   latents, ``MiniBatchKMeans(n_clusters=ipc, random_state=seed, batch_size=km_expand * ipc,
   n_init="auto")`` fed chunk by chunk with ``partial_fit`` (:mod:`gendd.blocks.modes`,
   ``minibatch-kmeans``); ``minibatch=False`` uses full k-means. D4M encodes with a posterior
   *sample* ``z ~ q(z|x)`` (``latent_dist.sample()``), without flips; ``encode_sample`` follows it.
2. Synthesis (distillation/gen_syn_image.py): img2img from each prototype with diffusers'
   convention ``init = min(int(N * strength), N)``, ``start_step = N - init`` (strength 0.7 of 50
   steps starts at step 15 and denoises 35 steps): ``x = sqrt(abar_s) p + sqrt(1 - abar_s) eps``
   with ``eps`` the class generator's noise, then CFG sampling from ``start_step``.
   ``strength = 0`` returns the prototypes themselves; ``strength = 1`` samples from pure noise
   (identical to ``dit``; diffusers would keep ``sqrt(abar_0) p``, about 0.006 p, in the start).

On a Stable Diffusion backbone (:mod:`gendd.backbone.text`) this is D4M as published: prototypes in
the SD VAE's latent space, img2img with the class's ImageNet names as prompt (``"{names}"``: "tench,
Tinca tinca"), negative prompt "cartoon, anime, painting" and the backbone's CFG 8. One difference
remains: D4M samples with SD's PNDM scheduler as shipped, gendd with DDIM (eta 0, deterministic, the
same timesteps). On a class-conditional DiT gendd conditions on the class label with the backbone's CFG
scale (4.0 for DiT-XL/2) instead of a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import ClassVar, Literal

import torch

from gendd.backbone.sampling import SAMPLERS, make_schedule, sample
from gendd.blocks.modes import discover_modes
from gendd.config import check
from gendd.errors import DataError
from gendd.methods.base import ClassContext, ClassResult, Method
from gendd.methods.dit import DiTConfig, initial_noise


def img2img_start_step(num_steps: int, strength: float) -> int:
    """diffusers' img2img: ``init = min(int(N * strength), N)``; the first step run is ``N - init``."""
    return num_steps - min(int(num_steps * strength), num_steps)


@dataclass
class D4MConfig(DiTConfig):
    """Attributes (besides dit's; sampler defaults to ddim): strength (img2img noise level in
    [0, 1]), minibatch (MiniBatchKMeans as D4M; False = full k-means), km_expand (the minibatch is
    ``km_expand * ipc`` latents), encode_sample (cache posterior samples as D4M, not means),
    mode_seed (random_state of the clustering; None = ``seed``; D4M uses 0)."""

    config_what: ClassVar[str] = "d4m"
    reference_cfg_channels: ClassVar[int | None] = None  # reference: Stable Diffusion, no channel quirk
    reference_prompt: ClassVar[str] = "{names}"
    reference_negative_prompt: ClassVar[str | None] = "cartoon, anime, painting"

    sampler: Literal["ddpm", "ddim"] = field(default="ddim", metadata=check(choices=SAMPLERS))
    strength: float = field(default=0.7, metadata=check(Real, ge=0, le=1))
    minibatch: bool = field(default=True, metadata=check(bool))
    km_expand: int = field(default=1, metadata=check(Integral, ge=1))
    encode_sample: bool = field(default=True, metadata=check(bool))
    mode_seed: int | None = field(default=None, metadata=check(Integral, optional=True))


class D4M(Method):
    name = "d4m"
    config_class = D4MConfig
    needs_backbone = True
    needs_cache = True
    summary = "k-means prototypes of the class latents, noised and re-denoised img2img-style (D4M)"

    def encode_spec(self):
        from gendd.cache import EncodeSpec

        return EncodeSpec(sample=self.config.encode_sample, flip=False)  # cache seed 0, shared by all run seeds

    def prototypes(self, ctx: ClassContext):
        """The class's prototypes (:class:`gendd.blocks.modes.Modes`)."""
        cfg: D4MConfig = self.config
        latents = ctx.class_latents()
        if ctx.ipc > latents.shape[0]:
            raise DataError(f"IPC {ctx.ipc} exceeds the {latents.shape[0]} cached latents of class "
                            f"{ctx.name!r}; lower the IPC")
        seed = cfg.seed if cfg.mode_seed is None else cfg.mode_seed
        if cfg.minibatch:
            return discover_modes(latents, ctx.ipc, "minibatch-kmeans", seed=seed, batch_size=cfg.km_expand * ctx.ipc)
        return discover_modes(latents, ctx.ipc, "kmeans", seed=seed)

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        cfg: D4MConfig = self.config
        noise = initial_noise(ctx)  # first draw of the class generator, as dit
        protos = self.prototypes(ctx).modes
        start = img2img_start_step(cfg.num_steps, cfg.strength)
        labels = torch.full((ctx.ipc,), ctx.model_label, dtype=torch.long)
        sc = cfg.sampler_config(ctx.backbone)
        if start >= cfg.num_steps:
            z = protos.clone()
        elif start == 0:
            z = sample(ctx.backbone, noise, labels, sc, generator=ctx.generator, progress=ctx.progress)
        else:
            schedule = make_schedule(ctx.backbone, sc.sampler, sc.num_steps)
            x = schedule.add_noise(protos, noise, start)
            z = sample(ctx.backbone, x, labels, sc, start_step=start, schedule=schedule,
                       generator=ctx.generator, progress=ctx.progress)
        extra = {"prototypes": "minibatch-kmeans" if cfg.minibatch else "kmeans",
                 "start_step": start, "denoising_steps": cfg.num_steps - start}
        return ClassResult(latents=z, extra=extra, tensors={"prototypes": protos})
