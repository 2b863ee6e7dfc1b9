"""One sampling loop for every method: CFG, DDPM-respaced or DDIM, a start step, and hooks.

Notation: a :class:`Schedule` is a decreasing list of model timesteps ``t_0 > ... > t_{N-1}``; step
``i`` moves a latent from level ``abar_i = abar[t_i]`` to ``abar_prev_i`` (the level of ``t_{i+1}``,
or of the final clean sample). With ``eps`` the (guided) noise prediction:

* ``x0_hat = (x_t - sqrt(1 - abar_i) eps) / sqrt(abar_i)``
* DDIM (Song et al. 2021, eta = 0): ``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps``
* DDPM (Ho et al. 2020) on the respaced chain (Nichol & Dhariwal 2021; DiT's ``space_timesteps``):
  ``beta_i = 1 - abar_i / abar_prev``, posterior mean
  ``mu = beta_i sqrt(abar_prev) / (1 - abar_i) x0_hat + (1 - abar_prev) sqrt(1 - beta_i) / (1 - abar_i) x_t``,
  variance ``sigma^2 = beta_i (1 - abar_prev) / (1 - abar_i)`` (fixed small), or DiT's learned
  range ``log sigma^2 = f log beta_i + (1 - f) log sigma~^2`` with ``f = (v + 1) / 2``;
  ``x_prev = mu + sigma z`` (no noise at the last step).

Hooks see a :class:`StepState` and may replace the predicted noise (before ``x0_hat`` is formed)
or the posterior mean. A method that adds nothing passes no hook, so plain sampling is one code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import ClassVar, Literal, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from gendd.config import Validated, check
from gendd.errors import ConfigError, NumericalError

#: The sampling chains :func:`make_schedule` builds.
SAMPLERS = ("ddpm", "ddim")


def check_cfg_interval(value) -> None:
    """Refuse anything but ``[lo, hi]`` with ``0 <= lo < hi`` (``hi`` may be ``inf``) or None."""
    ok = value is None or (isinstance(value, (tuple, list)) and len(value) == 2
                           and all(isinstance(v, Real) and not isinstance(v, bool) for v in value)
                           and 0 <= value[0] < value[1] and not math.isnan(value[1]))
    if not ok:
        raise ConfigError("use [lo, hi] with 0 <= lo < hi (hi may be inf) or None")


@dataclass
class SamplerConfig(Validated):
    """How to sample.

    Attributes:
        sampler: ``ddpm`` (ancestral, respaced as DiT/Minimax/MGD3 do) or ``ddim`` (eta 0, diffusers'
            DDIMScheduler timesteps, as D3HR does).
        num_steps: number of denoising steps (50 in every reference).
        cfg_scale: classifier-free guidance scale ``s`` (1 = conditional only).
        cfg_channels: guide only the first k latent channels (3 = DiT's quirk); None = all.
        cfg_interval: ``(lo, hi)``: guide only the steps whose noise level ``sigma = sqrt((1 - abar) / abar)``
            lies in ``(lo, hi]``, the conditional prediction elsewhere (Kynkäänniemi et al. 2024, "Applying
            Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models"; guidance
            at high noise collapses diversity); None = every step.
        batch_size: latents denoised together.
    """

    config_what: ClassVar[str] = "sampler"

    sampler: Literal["ddpm", "ddim"] = field(default="ddpm", metadata=check(choices=SAMPLERS))
    num_steps: int = field(default=50, metadata=check(Integral, ge=1))
    cfg_scale: float = field(default=4.0, metadata=check(Real))
    cfg_channels: int | None = field(default=None, metadata=check(Integral, ge=1, optional=True))
    cfg_interval: tuple[float, float] | None = field(default=None, metadata=check(
        tuple, optional=True, test=check_cfg_interval))
    batch_size: int = field(default=256, metadata=check(Integral, ge=1))

    def scale_at(self, abar: float) -> float:
        """The guidance scale of a step at level ``abar`` (``cfg_scale`` inside ``cfg_interval``, else 1)."""
        if self.cfg_interval is None:
            return self.cfg_scale
        lo, hi = self.cfg_interval
        return self.cfg_scale if lo < math.sqrt((1.0 - abar) / abar) <= hi else 1.0


@dataclass
class Schedule:
    """Timesteps and noise levels of one sampling chain (see the module docstring)."""

    kind: str
    timesteps: torch.Tensor  # (N,) int64, decreasing
    abar: torch.Tensor  # (N,) float64, level of step i
    abar_prev: torch.Tensor  # (N,) float64, level after step i

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """``x_t = sqrt(abar) z0 + sqrt(1 - abar) noise`` at the level of ``step``."""
        a = float(self.abar[step])
        return math.sqrt(a) * z0 + math.sqrt(1 - a) * noise


def dit_respaced_timesteps(num_train: int, num_steps: int) -> list[int]:
    """DiT / improved-diffusion ``space_timesteps(T, [N])``: N evenly strided indices of 0..T-1.

    Stride ``(T - 1) / (N - 1)``, each index rounded; first 0, last T - 1.
    """
    if num_steps == 1:
        return [0]
    stride = (num_train - 1) / (num_steps - 1)
    return sorted({round(i * stride) for i in range(num_steps)})


def make_schedule(backbone, sampler: str = "ddpm", num_steps: int = 50) -> Schedule:
    """Build the chain for ``sampler`` from the backbone's training schedule.

    ``ddpm``: DiT's respacing (the sampling of Minimax, MGD3 and the memory paper); the last step
    lands on the clean sample (``abar_prev = 1``). ``ddim``: the timesteps of diffusers'
    ``DDIMScheduler.set_timesteps`` and its ``final_alpha_cumprod`` for the last step.
    """
    abar_all = backbone.alphas_cumprod.cpu().double()
    if sampler == "ddpm":
        ts = dit_respaced_timesteps(backbone.num_train_timesteps, num_steps)[::-1]
        timesteps = torch.tensor(ts, dtype=torch.long)
        abar = abar_all[timesteps]
        abar_prev = torch.cat([abar[1:], torch.ones(1, dtype=torch.float64)])
    elif sampler == "ddim":
        sched = backbone.make_scheduler("ddim")
        sched.set_timesteps(num_steps)
        timesteps = sched.timesteps.clone().long()
        ratio = sched.config.num_train_timesteps // sched.num_inference_steps
        prev = timesteps - ratio
        final = float(sched.final_alpha_cumprod)
        abar = abar_all[timesteps]
        abar_prev = torch.tensor([float(abar_all[p]) if p >= 0 else final for p in prev.tolist()],
                                 dtype=torch.float64)
    else:
        raise ConfigError(f"unknown sampler {sampler!r}; use ddpm or ddim")
    return Schedule(sampler, timesteps, abar, abar_prev)


@dataclass
class StepState:
    """What a hook sees at one step. ``mean``/``sigma`` are None until the eps hook has run."""

    step: int  # index into the schedule
    t: int  # model timestep
    x: torch.Tensor
    labels: torch.Tensor
    eps: torch.Tensor
    x0_hat: torch.Tensor
    abar: float
    abar_prev: float
    mean: torch.Tensor | None = None
    sigma: torch.Tensor | float | None = None
    index: torch.Tensor | None = None  # positions of this batch in the full request


class SamplingHook(Protocol):
    """Per-step callback. Either method may return None (no change) or a replacement tensor."""

    def modify_eps(self, state: StepState) -> torch.Tensor | None: ...

    def modify_mean(self, state: StepState) -> torch.Tensor | None: ...


class Hook:
    """Convenience base: a hook that changes nothing."""

    def modify_eps(self, state: StepState) -> torch.Tensor | None:
        return None

    def modify_mean(self, state: StepState) -> torch.Tensor | None:
        return None


@dataclass
class GroupedGenerator:
    """The rows of one request drawn from several generators: the first ``n_1`` rows from ``g_1``, the next
    ``n_2`` from ``g_2``, ... (one group per class), so each class's noise is what it would draw alone, whichever
    classes share its batch."""

    groups: list[tuple[int, torch.Generator]]

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        if sum(n for n, _ in self.groups) != shape[0]:
            raise ConfigError(f"generator groups cover {sum(n for n, _ in self.groups)} rows, the request {shape[0]}")
        return torch.cat([torch.randn((n, *shape[1:]), generator=g, dtype=torch.float32) for n, g in self.groups])


def standard_normal(shape: Sequence[int], generator: "torch.Generator | GroupedGenerator | None") -> torch.Tensor:
    """``N(0, I)`` of ``shape`` on the CPU from one generator or from a :class:`GroupedGenerator`."""
    if isinstance(generator, GroupedGenerator):
        return generator.randn(shape)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def _x0(x, eps, abar):
    return (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)


def _posterior_var(abar: float, abar_prev: float) -> float:
    return (1.0 - abar / abar_prev) * (1.0 - abar_prev) / (1.0 - abar)


def ddpm_posterior(x: torch.Tensor, x0_hat: torch.Tensor, abar: float, abar_prev: float,
                   v: torch.Tensor | None = None, clip_level: tuple[float, float] | None = None):
    """Posterior ``q(x_prev | x_t, x0_hat)`` mean and std on the respaced chain (module docstring).

    With ``v`` (DiT's learned range) the log-variance interpolates between ``log beta_i`` and the
    clipped log posterior variance; the last step's posterior variance is 0, so DiT clips it to the
    variance of the step before, whose ``(abar, abar_prev)`` is ``clip_level``.
    """
    beta = 1.0 - abar / abar_prev
    coef_x0 = beta * math.sqrt(abar_prev) / (1.0 - abar)
    coef_xt = (1.0 - abar_prev) * math.sqrt(1.0 - beta) / (1.0 - abar)
    mean = coef_x0 * x0_hat + coef_xt * x
    var = _posterior_var(abar, abar_prev)
    if v is None:
        return mean, math.sqrt(max(var, 0.0))
    if var <= 0.0:
        var = _posterior_var(*clip_level) if clip_level is not None else beta
    frac = (v.float() + 1.0) / 2.0
    log_var = frac * math.log(beta) + (1.0 - frac) * math.log(var)
    return mean, torch.exp(0.5 * log_var)


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NumericalError(f"{what} contains NaN or Inf; lower the guidance scale or check the "
                             "backbone weights")


@torch.no_grad()
def sample(backbone, noise: torch.Tensor, labels: torch.Tensor, config: SamplerConfig | None = None,
           *, start_step: int = 0, hooks: Sequence[SamplingHook] = (),
           generator: "torch.Generator | GroupedGenerator | None" = None, schedule: Schedule | None = None,
           progress: bool = False) -> torch.Tensor:
    """Denoise ``noise`` (a latent at the level of ``start_step``) into clean latents.

    Args:
        backbone: a :class:`gendd.backbone.Backbone`.
        noise: ``(B, C, h, w)`` latents at step ``start_step`` (pure noise for ``start_step=0``).
        labels: ``(B,)`` conditioning labels (backbone label space).
        config: sampler, steps, CFG; ``schedule`` overrides the chain built from it.
        start_step: first step to run (D3HR/D4M start mid-chain).
        hooks: per-step callbacks (MGD3's mode guidance is one).
        generator: randomness of DDPM's per-step noise (drawn on the CPU, so results do not depend
            on the device), or a :class:`GroupedGenerator` (one per class of a multi-class request);
            unused by DDIM.

    Returns:
        ``(B, C, h, w)`` float32 clean latents.
    """
    config = config or SamplerConfig()
    schedule = schedule or make_schedule(backbone, config.sampler, config.num_steps)
    if not 0 <= start_step <= len(schedule):
        raise ConfigError(f"start_step {start_step} outside 0..{len(schedule)}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape[0] != noise.shape[0]:
        raise ConfigError(f"{noise.shape[0]} latents but {labels.shape[0]} labels")
    bs = max(1, config.batch_size)
    n = noise.shape[0]
    x_all = noise.to(backbone.device, torch.float32).clone()
    labels = labels.to(backbone.device)
    steps = range(start_step, len(schedule))
    bar = tqdm(total=len(steps) * math.ceil(n / bs), desc="sampling", disable=not progress, leave=False)
    for i in steps:
        t = int(schedule.timesteps[i])
        abar, abar_prev = float(schedule.abar[i]), float(schedule.abar_prev[i])
        # DDPM noise of this step is drawn for the whole request at once, so the result does not
        # depend on the batch size (same seed -> same samples whatever batch_size is).
        z = (standard_normal(noise.shape, generator)
             if schedule.kind == "ddpm" and i < len(schedule) - 1 else None)
        for b0 in range(0, n, bs):
            sl = slice(b0, b0 + bs)
            x, y = x_all[sl], labels[sl]
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=backbone.device)
            eps, v = backbone.predict(x, tt, y, config.scale_at(abar), config.cfg_channels)
            state = StepState(step=i, t=t, x=x, labels=y, eps=eps, x0_hat=_x0(x, eps, abar),
                              abar=abar, abar_prev=abar_prev, index=torch.arange(n)[sl])
            for h in hooks:
                new = h.modify_eps(state)
                if new is not None:
                    state.eps = new
                    state.x0_hat = _x0(x, new, abar)
            if schedule.kind == "ddim":
                state.mean = math.sqrt(abar_prev) * state.x0_hat + math.sqrt(1 - abar_prev) * state.eps
                state.sigma = 0.0
            else:
                clip = (float(schedule.abar[i - 1]), float(schedule.abar_prev[i - 1])) if i > 0 else None
                state.mean, state.sigma = ddpm_posterior(x, state.x0_hat, abar, abar_prev, v, clip)
            for h in hooks:
                new = h.modify_mean(state)
                if new is not None:
                    state.mean = new
            x_new = state.mean
            if z is not None:
                x_new = x_new + state.sigma * z[sl].to(x_new.device)
            x_all[sl] = x_new
            bar.update(1)
    bar.close()
    check_finite(x_all, "sampled latents")
    return x_all.float().cpu()


@torch.no_grad()
def ddim_invert(backbone, z0: torch.Tensor, labels: torch.Tensor, num_inversion_steps: int,
                config: SamplerConfig | None = None, *, schedule: Schedule | None = None,
                return_all: bool = False, progress: bool = False):
    """DDIM inversion (Song et al. 2021; Mokady et al. 2023): run the DDIM chain backwards.

    Inverting sampling step ``i`` (from ``abar_i`` down to ``abar_prev_i``) maps a latent at
    ``abar_prev_i`` to ``abar_i`` with the noise predicted at the current latent and timestep
    ``t_i`` (the usual approximation ``eps(x_{t_i}, t_i) ~ eps(x_{t_{i+1}}, t_i)``; the same one as
    diffusers' ``DDIMInverseScheduler``):
    ``x_{t_i} = sqrt(abar_i) x0_hat + sqrt(1 - abar_i) eps`` with
    ``x0_hat = (x - sqrt(1 - abar_prev_i) eps) / sqrt(abar_prev_i)``.

    ``num_inversion_steps = n`` inverts the last ``n`` sampling steps, so the result is ready for
    :func:`sample` with ``start_step = N - n`` (``n = 0`` is the identity). CFG (D3HR inverts with
    CFG 4.0) follows ``config.cfg_scale`` (and ``cfg_interval``, judged at the level of ``t_i``).

    Returns the inverted latents, or with ``return_all`` a list of the latents after each
    inversion step (index j = after j + 1 steps).
    """
    config = config or SamplerConfig(sampler="ddim")
    schedule = schedule or make_schedule(backbone, "ddim", config.num_steps)
    n_total = len(schedule)
    if not 0 <= num_inversion_steps <= n_total:
        raise ConfigError(f"num_inversion_steps {num_inversion_steps} outside 0..{n_total}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    bs = max(1, config.batch_size)
    finals, trails = [], []
    for b0 in range(0, z0.shape[0], bs):
        x = z0[b0:b0 + bs].to(backbone.device, torch.float32)
        y = labels[b0:b0 + bs].to(backbone.device)
        trail = []
        for i in tqdm(range(n_total - 1, n_total - 1 - num_inversion_steps, -1), desc="inverting",
                      disable=not progress, leave=False):
            t = int(schedule.timesteps[i])
            a_from, a_to = float(schedule.abar_prev[i]), float(schedule.abar[i])
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=backbone.device)
            eps, _ = backbone.predict(x, tt, y, config.scale_at(a_to), config.cfg_channels)
            x0_hat = (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
            x = math.sqrt(a_to) * x0_hat + math.sqrt(1 - a_to) * eps
            if return_all:
                trail.append(x.float().cpu())
        check_finite(x, "inverted latents")
        finals.append(x.float().cpu())
        trails.append(trail)
    if return_all:
        return [torch.cat([tr[j] for tr in trails]) for j in range(num_inversion_steps)]
    return torch.cat(finals) if finals else z0.clone()
