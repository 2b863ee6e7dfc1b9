"""Per-class memories and the two memory losses of Minimax fine-tuning and the self-adaptive memory.

Minimax diffusion (Gu et al., CVPR 2024; vimar-gu/MinimaxDiffusion: train_dit.py) keeps, for every
class ``c``, a memory of real latents ``M_r[c]`` and one of the model's predicted clean latents
``M_g[c]`` (``x0_hat``, detached), both at most ``memory_size`` flattened items, and adds to the
diffusion loss, for the predicted latents ``z_hat`` (b, d) of the class's batch samples:

* representativeness ``L_r = 1 - min_{i,j} cos(z_hat_i, M_r[c]_j)`` (:func:`representativeness_loss`),
* diversity ``L_d = max_{i,j} cos(z_hat_i, M_g[c]_j)`` (:func:`diversity_loss`).

Eviction when a memory exceeds ``memory_size`` (one item at a time, recomputed after each removal):

* ``fifo`` (Minimax): drop the oldest item.
* ``max-similarity`` (the "self-adaptive memory" of Li et al., ICIP 2025, "Diversity-driven generative
  dataset distillation based on diffusion model with self-adaptive memory";
  SumomoTaku/diversityDDwithSSMemory: train_dit.py ``update_memory(..., strategy="max")``):
  ``S = cos(M, M)`` (n x n, self-similarity included), ``s_i = sum_j S_ij``, drop ``argmax_i s_i``,
  the most redundant item.
* ``min-similarity``: drop ``argmin_i s_i`` (implemented in the reference, unused there).

Ties go to the first index, as the reference's ``list.index(max(...))``. Cosines are computed as
``<a, b> / max(|a| |b|, 1e-12)`` (the reference divides without a floor; equal for non-zero vectors).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gendd.errors import ConfigError
from gendd.registry import Registry

_EPS = 1e-12


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``S_ij = <a_i, b_j> / (|a_i| |b_j|)`` for ``a`` (n, d), ``b`` (m, d) -> (n, m)."""
    norms = a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True).T
    return (a @ b.T) / norms.clamp_min(_EPS)


def representativeness_loss(z_hat: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``L_r = 1 - min_{i,j} cos(z_hat_i, M_j)`` for ``z_hat`` (b, d) and the real memory ``M`` (n, d).

    The single least similar (prediction, real item) pair is pulled together (Minimax train_dit.py).
    """
    return 1.0 - cosine_matrix(z_hat, memory).min()


def diversity_loss(z_hat: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``L_d = max_{i,j} cos(z_hat_i, M_j)`` for ``z_hat`` (b, d) and the generated memory ``M`` (n, d).

    The single most similar (prediction, past prediction) pair is pushed apart (Minimax train_dit.py).
    """
    return cosine_matrix(z_hat, memory).max()


def _evict_fifo(items: torch.Tensor) -> int:
    return 0


def _evict_max_similarity(items: torch.Tensor) -> int:
    return int(cosine_matrix(items, items).sum(1).argmax())


def _evict_min_similarity(items: torch.Tensor) -> int:
    return int(cosine_matrix(items, items).sum(1).argmin())


#: eviction policy name -> ``f(items (n, d)) -> index of the item to drop``
EVICTION_POLICIES: Registry[Callable[[torch.Tensor], int]] = Registry("memory eviction", lambda: {
    "fifo": _evict_fifo,
    "max-similarity": _evict_max_similarity,
    "min-similarity": _evict_min_similarity,
})


def check_eviction(name: str) -> None:
    EVICTION_POLICIES.get(name)


class ClassMemory:
    """At most ``memory_size`` flattened, detached items of one class, oldest first.

    :meth:`add` appends items and then evicts one item at a time with the named policy while the
    memory is longer than ``memory_size`` (module docstring).
    """

    def __init__(self, memory_size: int, eviction: str = "fifo") -> None:
        check_eviction(eviction)
        if memory_size < 1:
            raise ConfigError(f"memory_size must be >= 1, got {memory_size}")
        self.memory_size, self.eviction = int(memory_size), eviction
        self.items: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, items: torch.Tensor) -> list[int]:
        """Append ``items`` (n, ...) (flattened, detached), evict; returns the evicted positions
        (indices into the memory at the moment of each removal)."""
        self.items.extend(items.detach().flatten(1).unbind(0))
        policy = EVICTION_POLICIES[self.eviction]
        evicted = []
        while len(self.items) > self.memory_size:
            i = 0 if self.eviction == "fifo" else policy(torch.stack(self.items))
            self.items.pop(i)
            evicted.append(i)
        return evicted

    def tensor(self) -> torch.Tensor:
        """The items stacked, (n, d); raises on an empty memory."""
        if not self.items:
            raise ConfigError("the memory is empty")
        return torch.stack(self.items)

    def state(self) -> torch.Tensor | None:
        """Stacked items on the CPU (for checkpoints), or None when empty."""
        return torch.stack(self.items).cpu() if self.items else None

    def load_state(self, state: torch.Tensor | None, device: torch.device | str | None = None) -> None:
        self.items = [] if state is None else list(state.to(device).unbind(0))
