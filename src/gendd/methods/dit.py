"""``dit``: plain class-conditional sampling with classifier-free guidance (Peebles & Xie 2023).

DDPM-50 on DiT's respaced chain is what Minimax, MGD3 and the memory paper sample with; DDIM-50 is
D3HR's sampler. ``cfg_scale=None`` takes the backbone's default (4.0 for DiT-XL/2); ``cfg_interval="auto"``
the backbone's guidance interval (:class:`gendd.backbone.sampling.SamplerConfig`; ``[0, 1]`` for
``fashion-mnist-v3``, None = every step for the other backbones).

``cfg_channels="auto"`` follows each method's reference on the original DiT release (learned sigma, 4 latent
channels: DiT-XL/2 and its family), whose ``forward_with_cfg`` guides only the first three latent channels:
3 for dit, mgd3, minimax and memory (``reference_cfg_channels``), all channels for d3hr (and d4m, whose reference
is Stable Diffusion). Any other backbone (gendd's own) guides all channels. The resolved value is recorded in
the manifest (``resolved``).

On a text-to-image backbone (:mod:`gendd.backbone.text`) the label of a class stands for its prompt:
``prompt`` is the template (None = the method's reference, ``"{name}"``: the bare class name) and
``negative_prompt`` the text of CFG's unconditional branch (None = the reference's: none, the empty prompt;
``""`` = none). Both must stay unset on a class-conditional backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import ClassVar, Literal

import torch

from gendd.backbone.sampling import SAMPLERS, GroupedGenerator, SamplerConfig, check_cfg_interval, sample
from gendd.config import check
from gendd.errors import ConfigError
from gendd.methods.base import ClassContext, ClassResult, Method, MethodConfig


def _check_cfg_channels(value) -> None:
    if isinstance(value, str) and value != "auto":
        raise ConfigError('use an integer >= 1, None (all channels) or "auto"')
    if not isinstance(value, str) and value is not None and value < 1:
        raise ConfigError("must be >= 1")


def check_cfg_interval_option(value) -> None:
    """``cfg_interval`` of a method: ``[lo, hi]``, None or "auto"."""
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError('use [lo, hi], None (every step) or "auto"')
        return
    check_cfg_interval(value)


def resolve_cfg_interval(option, backbone) -> tuple[float, float] | None:
    """The interval a ``cfg_interval`` option means on ``backbone`` ("auto" = its ``default_cfg_interval``)."""
    interval = backbone.meta.default_cfg_interval if option == "auto" else option
    return None if interval is None else (float(interval[0]), float(interval[1]))


def _check_template(value) -> None:
    from gendd.backbone.text import check_prompt_template

    check_prompt_template(value)


def is_dit_release(backbone) -> bool:
    """The original DiT family (learned sigma, 4 latent channels), whose CFG guides three channels."""
    return bool(backbone.learned_sigma) and backbone.latent_shape[0] == 4


@dataclass
class DiTConfig(MethodConfig):
    """Attributes: sampler (ddpm|ddim), num_steps, cfg_scale (None = backbone default),
    cfg_channels (guide the first k latent channels; None = all; "auto" = the method's reference on a DiT
    release, module docstring), cfg_interval (guide only noise levels in ``(lo, hi]``; None = every step;
    "auto" = the backbone's default), batch_size; on a text-to-image backbone: prompt (template), negative_prompt."""

    config_what: ClassVar[str] = "dit"
    #: channels the method's reference guides on a DiT release (``forward_with_cfg``'s three).
    reference_cfg_channels: ClassVar[int | None] = 3
    #: the prompt template and negative prompt of the method's text-to-image reference.
    reference_prompt: ClassVar[str] = "{name}"
    reference_negative_prompt: ClassVar[str | None] = None

    sampler: Literal["ddpm", "ddim"] = field(default="ddpm", metadata=check(choices=SAMPLERS))
    num_steps: int = field(default=50, metadata=check(Integral, ge=1))
    cfg_scale: float | None = field(default=None, metadata=check(Real, optional=True))
    cfg_channels: int | str | None = field(default="auto", metadata=check(Integral, str, optional=True,
                                                                          test=_check_cfg_channels))
    cfg_interval: tuple[float, float] | str | None = field(default="auto", metadata=check(
        tuple, str, optional=True, test=check_cfg_interval_option))
    batch_size: int = field(default=256, metadata=check(Integral, ge=1))
    prompt: str | None = field(default=None, metadata=check(str, optional=True, test=_check_template))
    negative_prompt: str | None = field(default=None, metadata=check(str, optional=True))

    def conditioning(self, backbone) -> dict:
        """The prompt options :meth:`gendd.backbone.backbone.LatentBackbone.for_dataset` gets."""
        if not backbone.text_conditioned:
            return {"prompt": self.prompt, "negative_prompt": self.negative_prompt}  # refused unless unset
        negative = self.reference_negative_prompt if self.negative_prompt is None else self.negative_prompt
        return {"prompt": self.reference_prompt if self.prompt is None else self.prompt,
                "negative_prompt": negative or None}

    def resolved_cfg_channels(self, backbone) -> int | None:
        if self.cfg_channels != "auto":
            return self.cfg_channels
        return self.reference_cfg_channels if is_dit_release(backbone) else None

    def sampler_config(self, backbone) -> SamplerConfig:
        scale = backbone.meta.default_cfg_scale if self.cfg_scale is None else self.cfg_scale
        return SamplerConfig(sampler=self.sampler, num_steps=self.num_steps, cfg_scale=scale,
                             cfg_channels=self.resolved_cfg_channels(backbone),
                             cfg_interval=resolve_cfg_interval(self.cfg_interval, backbone), batch_size=self.batch_size)

    def resolved(self, backbone) -> dict:
        """The values of the automatic options for ``backbone`` (recorded in the manifest)."""
        cfg = self.sampler_config(backbone)
        out = {"cfg_scale": cfg.cfg_scale, "cfg_channels": cfg.cfg_channels}
        if cfg.cfg_interval is not None:
            out["cfg_interval"] = list(cfg.cfg_interval)
        if backbone.text_conditioned:
            out.update(self.conditioning(backbone), prompts=list(backbone.prompts))
        return out


def sample_classes(ctxs: list[ClassContext], config: DiTConfig, hooks=()) -> list[torch.Tensor]:
    """Sample IPC latents for every class of ``ctxs`` in one request (they share a backbone): each class starts
    from :func:`initial_noise` and draws its DDPM noise from its own generator (:class:`GroupedGenerator`), so
    its latents do not depend on which classes share the batch but for float rounding. One class is exactly
    the plain per-class call."""
    bb = ctxs[0].backbone
    noise = torch.cat([initial_noise(c) for c in ctxs])
    labels = torch.cat([torch.full((c.ipc,), c.model_label, dtype=torch.long) for c in ctxs])
    gen = ctxs[0].generator if len(ctxs) == 1 else GroupedGenerator([(c.ipc, c.generator) for c in ctxs])
    z = sample(bb, noise, labels, config.sampler_config(bb), hooks=hooks, generator=gen, progress=ctxs[0].progress)
    return list(z.split([c.ipc for c in ctxs]))


def initial_noise(ctx: ClassContext) -> torch.Tensor:
    """``z_T ~ N(0, I)`` for the class, drawn first from the class generator (shared by every
    sampling method so that the same seed gives the same starting noise)."""
    return torch.randn((ctx.ipc, *ctx.backbone.latent_shape), generator=ctx.generator)


class DiTSampling(Method):
    name = "dit"
    config_class = DiTConfig
    needs_backbone = True
    summary = "class-conditional DiT sampling with classifier-free guidance"

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        return self.distill_classes([ctx])[0]

    def distill_classes(self, ctxs: list[ClassContext]) -> list[ClassResult]:
        return [ClassResult(latents=z) for z in sample_classes(ctxs, self.config)]
