"""D3HR group sampling: draw many candidate groups from a diagonal Gaussian, keep the one whose
first three moments match it best (Zhao et al., ICML 2025; lin-zhao-resoLve/D3HR:
generation/group_sampling.py ``evaluate_distribution_batch`` / ``select_algorithm_batch``).

A group is ``ipc`` latents ``x_1..x_n`` (rows, ``n = ipc``) of dimension ``d``. Its score against the
target ``N(mu, diag(sigma^2))`` is::

    score = ||mean_g - mu||_2 + ||std_g - sigma||_2 + w_skew * ||skew_g||_2

with ``mean_g``/``std_g`` taken per dimension over the ``n`` members (``std`` unbiased, as the
reference's ``torch.std``). Two definitions of ``skew_g`` (``skew_axis``):

* ``"reference"`` (what ``skewness_batch`` computes): standardise every dimension across the group,
  ``z_jk = (x_jk - mean_g,k) / std_g,k``, then sum the cubed z-scores over the FEATURE axis with the
  adjusted Fisher-Pearson factor of the feature dimension:
  ``skew_g,j = d / ((d - 1)(d - 2)) * sum_k z_jk^3`` -- one value per group member ``j``, and the
  norm is over the ``n`` members. (The factor uses ``d``, not ``n``, although the standardisation is
  across members: a quirk of the reference that we reproduce exactly.)
* ``"per-dim"``: the usual sample skewness of every dimension across the members,
  ``skew_g,k = n / ((n - 1)(n - 2)) * sum_j z_jk^3`` (the reference's unused ``skewness`` helper),
  one value per dimension, norm over the ``d`` dimensions.

Conventions where the reference yields NaN: ``ipc = 1`` scores the mean term only (std and skew are
undefined); per-dim skew of ``ipc = 2`` is 0 (the two cubes cancel); a dimension with ``sigma_k = 0``
(a constant variable, whose group std is 0 up to rounding) or a group std of 0 has ``z = 0``.

:func:`select_group` never materialises candidate latents: with ``x = mu + sigma * e``,
``e ~ N(0, I)``, the mean and std terms are ``||sigma * mean(e)||`` and ``||sigma * (std(e) - 1)||``
and z-scores are invariant to the affine map, so the whole score is computed from ``e``: six
vectorised passes over a cache-sized chunk (sum, centre, square, sum, cube, weighted sum) into two
reused buffers, about 0.6-1 ns per number on one CPU core against ~3.4 ns for drawing it (the floor;
``benchmarks/d3hr_throughput.py``).
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from tqdm.auto import tqdm

from gendd.errors import ConfigError, NumericalError

SkewAxis = Literal["reference", "per-dim"]
_RNG_BLOCK = 16  # torch's CPU normal_ transforms uniforms in aligned blocks of 16 (see select_group)


def _check_axis(skew_axis: str) -> None:
    if skew_axis not in ("reference", "per-dim"):
        raise ConfigError(f"unknown skew_axis {skew_axis!r}; use reference or per-dim")


def _skew_factor(n: int) -> float:
    """Adjusted Fisher-Pearson factor ``n / ((n - 1)(n - 2))``; 0 where undefined (n < 3)."""
    return n / ((n - 1) * (n - 2)) if n > 2 else 0.0


def group_score(groups: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, w_skew: float = 0.1,
                skew_axis: SkewAxis = "reference") -> torch.Tensor:
    """Score candidate groups ``(m, ipc, d)`` against ``N(mu, diag(sigma^2))``; lower is better.

    The direct (materialised) form of the module docstring's score; returns ``(m,)`` float32.
    """
    _check_axis(skew_axis)
    x = groups.float()
    m, n, d = x.shape
    mu, sigma = mu.reshape(-1).to(x), sigma.reshape(-1).to(x)
    if mu.numel() != d or sigma.numel() != d:
        raise ConfigError(f"groups have dimension {d} but mu/sigma have {mu.numel()}/{sigma.numel()}")
    mean = x.mean(1)
    score = (mean - mu).norm(dim=1)
    if n < 2:
        return score
    dev = x - mean.unsqueeze(1)
    std = dev.square().sum(1).div(n - 1).sqrt()
    score = score + (std - sigma).norm(dim=1)
    inv = torch.where((std > 0) & (sigma > 0), std.reciprocal(), torch.zeros_like(std))
    z3 = (dev * inv.unsqueeze(1)).pow(3)
    if skew_axis == "reference":
        if d < 3:
            raise ConfigError(f"skew_axis='reference' needs latent dimension >= 3, got {d}")
        skew = z3.sum(2) * _skew_factor(d)  # (m, n)
    else:
        skew = z3.sum(1) * _skew_factor(n)  # (m, d)
    return score + w_skew * skew.norm(dim=1)


def _chunk_bounds(num: int, per_chunk: int, elems_per_group: int) -> list[tuple[int, int]]:
    """Chunk boundaries (group indices); a last chunk under 16 elements joins the previous one."""
    bounds = [(s, min(s + per_chunk, num)) for s in range(0, num, per_chunk)]
    if len(bounds) > 1 and (bounds[-1][1] - bounds[-1][0]) * elems_per_group < _RNG_BLOCK:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def groups_per_chunk(ipc: int, d: int, max_bytes: int, chunk_size: int | None = None) -> int:
    """Candidate groups drawn and scored together.

    Bounded by ``max_bytes`` for the three float32 work buffers (``3 * 4 * ipc * d`` bytes per group)
    and by ``chunk_size`` if given, then rounded down to a multiple of ``16 / gcd(ipc * d, 16)`` so
    every chunk holds a multiple of 16 numbers (needed for chunk-size-independent draws; at most 15
    numbers over the bound).
    """
    per = max(1, int(max_bytes) // (12 * ipc * d))
    if chunk_size is not None:
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        per = min(per, int(chunk_size))
    q = _RNG_BLOCK // math.gcd(ipc * d, _RNG_BLOCK)
    return max(q, per - per % q)


def select_group(mu: torch.Tensor, sigma: torch.Tensor, ipc: int, num_candidates: int,
                 generator: torch.Generator, *, chunk_size: int | None = None, w_skew: float = 0.1,
                 skew_axis: SkewAxis = "reference", max_bytes: int | None = None,
                 progress: bool = False) -> tuple[torch.Tensor, float, dict]:
    """Best of ``num_candidates`` groups ``x = mu + sigma * e`` (``e ~ N(0, I)``, shape ``(ipc, d)``).

    Candidates are the rows of one draw ``torch.randn(num_candidates, ipc, d, generator=generator)``
    taken chunk by chunk into reused buffers, scored in noise space (module docstring) and reduced to a
    running minimum (first index wins ties), so peak memory is ``O(max_bytes)`` whatever
    ``num_candidates`` is.

    Seed contract: with a CPU generator the selected group depends only on the generator state, not on
    ``chunk_size``/``max_bytes``: torch's CPU ``normal_`` fills uniforms sequentially and transforms
    them in aligned blocks of 16, so consecutive draws of multiples of 16 numbers concatenate to one
    draw; :func:`groups_per_chunk` keeps every chunk but the last a multiple of 16 numbers, and a last
    chunk under 16 numbers is merged (under 16 numbers torch uses another code path). With a CUDA
    generator (Philox) the chunk size is part of the seed contract.

    Args:
        mu, sigma: ``(d,)`` (any shape, flattened) target mean and std, on the device to score on.
        generator: the source of the candidates; its device is where they are drawn.
        chunk_size: at most this many groups per chunk; ``max_bytes`` bounds the work buffers
            (default 8 MiB on CPU, to stay in cache; 1 GiB on CUDA).

    Returns:
        ``(best (ipc, d) float32, best_score, stats)`` with stats ``num_candidates``, ``best_score``,
        ``worst_score``, ``mean_score``, ``groups_per_chunk``, ``seconds``.
    """
    _check_axis(skew_axis)
    if ipc < 1:
        raise ConfigError(f"IPC must be >= 1, got {ipc}")
    if num_candidates < 1:
        raise ConfigError(f"num_candidates must be >= 1, got {num_candidates}")
    t0 = time.perf_counter()
    mu = mu.reshape(-1).float()
    sigma = sigma.reshape(-1).to(mu)
    d = mu.numel()
    if sigma.numel() != d:
        raise ConfigError(f"mu has {d} entries but sigma has {sigma.numel()}")
    if skew_axis == "reference" and d < 3 and ipc > 1:
        raise ConfigError(f"skew_axis='reference' needs latent dimension >= 3, got {d}")
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()) or (sigma < 0).any():
        raise NumericalError("group sampling needs finite mu and a finite, non-negative sigma; check the "
                             "class statistics")
    dev_score = mu.device
    if max_bytes is None:
        max_bytes = (1 << 30) if dev_score.type == "cuda" else (8 << 20)
    per = groups_per_chunk(ipc, d, max_bytes, chunk_size)
    per = min(per, num_candidates)
    bounds = _chunk_bounds(num_candidates, per, ipc * d)
    cap = max(b - a for a, b in bounds)
    draw_dev = generator.device
    e_draw = torch.empty((cap, ipc, d), dtype=torch.float32, device=draw_dev)
    e = e_draw if draw_dev == dev_score else torch.empty((cap, ipc, d), dtype=torch.float32, device=dev_score)
    ws = _Workspace(cap, ipc, d, dev_score)
    live = (sigma > 0).to(mu)  # the constant-variable convention: no skew from sigma = 0
    factor = _skew_factor(d) if skew_axis == "reference" else _skew_factor(ipc)
    best_e = torch.empty((ipc, d), dtype=torch.float32, device=dev_score)
    best, worst, total = math.inf, -math.inf, 0.0
    for a, b in tqdm(bounds, desc="group sampling", disable=not progress, leave=False):
        c = b - a
        ed = e_draw[:c]
        ed.normal_(generator=generator)
        ec = ed if e is e_draw else e[:c].copy_(ed, non_blocking=False)
        score = _chunk_scores(ec, ws, sigma, live, factor, w_skew, skew_axis)
        lo, hi = torch.aminmax(score)
        lo_v, hi_v = float(lo), float(hi)
        total += float(score.sum(dtype=torch.float64))
        if not math.isfinite(lo_v):
            raise NumericalError("group scores contain NaN or Inf; check the class statistics")
        if lo_v < best:
            best = lo_v
            best_e.copy_(ec[int(torch.argmin(score))])
        worst = max(worst, hi_v)
    group = best_e.mul_(sigma).add_(mu)
    stats = {"num_candidates": int(num_candidates), "best_score": best, "worst_score": worst,
             "mean_score": total / num_candidates, "groups_per_chunk": int(cap),
             "seconds": round(time.perf_counter() - t0, 6)}
    return group, best, stats


class _Workspace:
    """Reused buffers of one chunk: two ``(cap, n, d)`` (centred noise, its powers), three ``(cap, d)``
    and one ``(cap, n)``; nothing is allocated per chunk."""

    def __init__(self, cap: int, n: int, d: int, device: torch.device) -> None:
        def empty(*shape):
            return torch.empty(shape, dtype=torch.float32, device=device)

        self.dev, self.pow = (empty(cap, n, d), empty(cap, n, d)) if n > 1 else (None, None)
        self.a, self.b, self.c = empty(cap, d), empty(cap, d), empty(cap, d)
        self.members = empty(cap, n)


def _chunk_scores(e: torch.Tensor, ws: _Workspace, sigma: torch.Tensor, live: torch.Tensor, factor: float,
                  w_skew: float, skew_axis: str) -> torch.Tensor:
    """Scores ``(c,)`` of the noise groups ``e`` ``(c, n, d)`` (module docstring, noise space)."""
    c, n, d = e.shape
    mean, var, std = ws.a[:c], ws.b[:c], ws.c[:c]
    torch.sum(e, 1, out=mean).div_(n)
    if n < 2:
        return mean.mul_(sigma).square_().sum(1).sqrt_()
    dev = torch.sub(e, mean.unsqueeze(1), out=ws.dev[:c])  # e - mean_g
    p = torch.mul(dev, dev, out=ws.pow[:c])  # dev^2
    torch.sum(p, 1, out=var).div_(n - 1)  # unbiased
    score = mean.mul_(sigma).square_().sum(1).sqrt_()  # ||sigma * mean(e)||
    torch.sqrt(var, out=std)
    inv3 = torch.mul(std, var, out=mean).reciprocal_().mul_(live)  # std^-3, 0 where sigma = 0
    score += std.sub_(1).mul_(sigma).square_().sum(1).sqrt_()  # ||sigma * (std(e) - 1)||
    if factor == 0.0 or w_skew == 0.0:
        return score
    p.mul_(dev)  # dev^3
    if skew_axis == "reference":  # (c, n): z^3 summed over features
        skew = torch.sum(p.mul_(inv3.unsqueeze(1)), 2, out=ws.members[:c])
    else:  # (c, d): z^3 summed over members
        skew = torch.sum(p, 1, out=std).mul_(inv3)
    return score.add_(skew.square_().sum(1).sqrt_(), alpha=w_skew * factor)
