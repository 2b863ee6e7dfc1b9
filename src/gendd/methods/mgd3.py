"""``mgd3``: mode-guided diffusion (Chan-Santiago et al., "Mode-Guided Dataset Distillation using
Diffusion Models", ICML 2025), training-free.

1. Mode discovery: ``k = IPC`` modes ``m_1..m_k`` of the class's VAE latents (posterior means of the
   images and of their horizontal flips, as the reference loader flips at random), k-means
   centroids by default (:mod:`gendd.blocks.modes`).
2. Mode guidance: sample ``i`` starts from the same noise as ``dit`` and is pulled towards
   ``m_i`` with ``g = m_i - x0_hat`` (``x0_hat`` from the CFG-guided noise prediction):

   * ``mean`` (the reference code, DDPM; EVLF: Inference/diffusion/gaussian_diffusion.py
     ``p_sample_with_mode_guidance``): ``mu' = mu + lambda sigma_t g``, ``sigma_t`` the step's
     posterior std (DiT's learned ``exp(0.5 logvar)`` when the backbone learns sigma). At the last
     DDPM step of a fixed-variance backbone ``sigma = 0``, so it adds nothing there.
   * ``eps`` (paper Alg. 1, DDIM): ``eps' = eps - sqrt(1 - abar_t) lambda g``, i.e.
     ``x0_hat' = x0_hat + lambda (1 - abar_t) / sqrt(abar_t) g``, then the standard step. Implemented
     as written: at the first DDIM-50 step of DiT's schedule (t = 980) the factor on ``g`` is about 130 lambda.
   * ``auto``: ``mean`` for ``ddpm``, ``eps`` for ``ddim`` (``mean`` with ``ddim`` is refused: the
     posterior std of DDIM is 0, so it would guide nothing). (The paper's Eq. 5-6 write the term on
     eps with the posterior std; the code puts it on the mean. The reference's ``ddim`` flag only
     changes the respacing and still runs the DDPM mean form; gendd's ``ddim`` is true DDIM.)
3. Stop guidance: guidance acts on sampling steps ``i < stop_step`` only. The reference counts
   respaced steps down, ``t = N-1..0``, and guides while ``t > stop_t``; gendd's step index is
   ``i = N - 1 - t``, so ``stop_step = N - 1 - stop_t``. The paper's ``stop_t = 25`` with ``N = 50``
   is ``stop_step = 24`` (steps 0..23, 24 of 50 guided). ``stop_step=None`` applies the same rule
   for any ``N`` with ``stop_t = N // 2``: ``stop_step = (N - 1) // 2``.

Defaults as the paper: lambda 0.1, k-means, DDPM-50, CFG = the backbone's default (4.0 for DiT-XL/2).
With lambda 0 or ``stop_step=0`` no hook is installed and the output equals ``dit`` bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import ClassVar, Literal

import torch

from gendd.backbone.sampling import Hook, StepState
from gendd.blocks.modes import MODE_METHODS, discover_modes
from gendd.config import check
from gendd.errors import ConfigError, DataError
from gendd.methods.base import ClassContext, ClassResult, Method
from gendd.methods.dit import DiTConfig, sample_classes


@dataclass
class MGD3Config(DiTConfig):
    """Attributes (besides dit's): mode_method (a :mod:`gendd.blocks.modes` name), mode_guidance_scale
    (lambda), stop_step (guide steps ``i < stop_step``; None = ``(num_steps - 1) // 2``, the paper's
    t_stop = 25 of 50), guidance_form (mean|eps|auto), flip_augment (true: discover modes on the
    images and their flips; "random": on one copy of each image, flipped with probability 1/2, as the
    reference loader's RandomHorizontalFlip, half the encoding; false: no flips), mode_seed (random_state of the clustering; None = ``seed``; the reference uses 0)."""

    config_what: ClassVar[str] = "mgd3"

    mode_method: str = field(default="kmeans", metadata=check(choices=lambda: tuple(MODE_METHODS)))
    mode_guidance_scale: float = field(default=0.1, metadata=check(Real))
    stop_step: int | None = field(default=None, metadata=check(Integral, ge=0, optional=True))
    guidance_form: Literal["mean", "eps", "auto"] = field(default="auto",
                                                          metadata=check(choices=("mean", "eps", "auto")))
    flip_augment: bool | str = field(default=True, metadata=check(choices=(True, False, "random")))
    mode_seed: int | None = field(default=None, metadata=check(Integral, optional=True))

    def _check_fields(self) -> None:
        super()._check_fields()
        if self.guidance_form == "mean" and self.sampler == "ddim":
            raise ConfigError("guidance_form 'mean' scales by the posterior std, which is 0 for DDIM; "
                              "use guidance_form eps or auto with sampler ddim")

    def resolved_stop_step(self) -> int:
        """Guidance acts on steps ``0..stop_step-1`` (capped at num_steps)."""
        s = (self.num_steps - 1) // 2 if self.stop_step is None else self.stop_step
        return min(s, self.num_steps)

    def resolved_form(self) -> str:
        if self.guidance_form == "auto":
            return "eps" if self.sampler == "ddim" else "mean"
        return self.guidance_form


class ModeGuidance(Hook):
    """Pulls row ``j`` of the request towards ``modes[j]`` on steps ``< stop_step`` (module docstring)."""

    def __init__(self, modes: torch.Tensor, scale: float, stop_step: int, form: str) -> None:
        self.modes, self.scale, self.stop_step, self.form = modes, float(scale), int(stop_step), form

    def _pull(self, state: StepState) -> torch.Tensor:
        m = self.modes if state.index is None else self.modes[state.index]
        return m.to(state.x.device, state.x.dtype) - state.x0_hat

    def modify_eps(self, state: StepState) -> torch.Tensor | None:
        if self.form != "eps" or state.step >= self.stop_step:
            return None
        return state.eps - math.sqrt(1.0 - state.abar) * self.scale * self._pull(state)

    def modify_mean(self, state: StepState) -> torch.Tensor | None:
        if self.form != "mean" or state.step >= self.stop_step:
            return None
        return state.mean + self.scale * state.sigma * self._pull(state)


class MGD3(Method):
    name = "mgd3"
    config_class = MGD3Config
    needs_backbone = True
    needs_cache = True
    summary = "mode-guided DiT sampling: k-means modes of the class latents pull each sample (MGD3)"

    def encode_spec(self):
        from gendd.cache import EncodeSpec

        flip = self.config.flip_augment
        return EncodeSpec(sample=False, flip=flip is True, random_flip=flip == "random")

    def class_modes(self, ctx: ClassContext):
        """The class's modes (:class:`gendd.blocks.modes.Modes`) and the clustering seed."""
        cfg: MGD3Config = self.config
        latents = ctx.class_latents()
        if ctx.ipc > latents.shape[0]:
            raise DataError(f"IPC {ctx.ipc} exceeds the {latents.shape[0]} cached latents of class "
                            f"{ctx.name!r}; lower the IPC")
        seed = cfg.seed if cfg.mode_seed is None else cfg.mode_seed
        return discover_modes(latents, ctx.ipc, cfg.mode_method, seed=seed), seed

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        return self.distill_classes([ctx])[0]

    def distill_classes(self, ctxs: list[ClassContext]) -> list[ClassResult]:
        cfg: MGD3Config = self.config
        found = [self.class_modes(ctx) for ctx in ctxs]  # the class generators are not used for the modes
        stop, form = cfg.resolved_stop_step(), cfg.resolved_form()
        modes = torch.cat([m.modes for m, _ in found])
        hooks = [ModeGuidance(modes, cfg.mode_guidance_scale, stop, form)] \
            if cfg.mode_guidance_scale != 0 and stop > 0 else []
        results = []
        for ctx, (m, seed), z in zip(ctxs, found, sample_classes(ctxs, cfg, hooks)):
            extra = {"mode_method": cfg.mode_method, "mode_seed": seed, "guidance_form": form,
                     "stop_step": stop, "guided_steps": stop if hooks else 0}
            if m.indices is not None:  # real-latent modes: their dataset images (a flip shares its source's)
                extra["mode_dataset_indices"] = [int(i) for i in ctx.cache.load(ctx.label)[1][m.indices]]
            results.append(ClassResult(latents=z, extra=extra, tensors={"modes": m.modes}))
        return results
