"""``dit``: plain class-conditional sampling with classifier-free guidance (Peebles & Xie 2023).

DDPM-50 on DiT's respaced chain is what Minimax, MGD3 and the memory paper sample with; DDIM-50 is
D3HR's sampler. ``cfg_scale=None`` takes the backbone's default (4.0 for DiT-XL/2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import ClassVar, Literal

import torch

from gendd.backbone.sampling import SAMPLERS, SamplerConfig, sample
from gendd.config import check
from gendd.methods.base import ClassContext, ClassResult, Method, MethodConfig, register_method


@dataclass
class DiTConfig(MethodConfig):
    """Attributes: sampler (ddpm|ddim), num_steps, cfg_scale (None = backbone default),
    cfg_channels (3 = DiT's guide-three-channels quirk; None = all), batch_size."""

    config_what: ClassVar[str] = "dit"

    sampler: Literal["ddpm", "ddim"] = field(default="ddpm", metadata=check(choices=SAMPLERS))
    num_steps: int = field(default=50, metadata=check(Integral, ge=1))
    cfg_scale: float | None = field(default=None, metadata=check(Real, optional=True))
    cfg_channels: int | None = field(default=None, metadata=check(Integral, ge=1, optional=True))
    batch_size: int = field(default=256, metadata=check(Integral, ge=1))

    def sampler_config(self, backbone) -> SamplerConfig:
        scale = backbone.meta.default_cfg_scale if self.cfg_scale is None else self.cfg_scale
        return SamplerConfig(sampler=self.sampler, num_steps=self.num_steps, cfg_scale=scale,
                             cfg_channels=self.cfg_channels, batch_size=self.batch_size)


def initial_noise(ctx: ClassContext) -> torch.Tensor:
    """``z_T ~ N(0, I)`` for the class, drawn first from the class generator (shared by every
    sampling method so that the same seed gives the same starting noise)."""
    return torch.randn((ctx.ipc, *ctx.backbone.latent_shape), generator=ctx.generator)


@register_method
class DiTSampling(Method):
    name = "dit"
    config_class = DiTConfig
    needs_backbone = True
    summary = "class-conditional DiT sampling with classifier-free guidance"

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        noise = initial_noise(ctx)
        labels = torch.full((ctx.ipc,), ctx.model_label, dtype=torch.long)
        z = sample(ctx.backbone, noise, labels, self.config.sampler_config(ctx.backbone),
                   generator=ctx.generator, progress=ctx.progress)
        return ClassResult(latents=z)
