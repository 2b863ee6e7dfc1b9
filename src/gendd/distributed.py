"""Scale out with ``torch.distributed``: class-sharded stages under ``torchrun``.

``torchrun --nproc-per-node N -m gendd distill ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; :func:`init_from_env` joins them into one process group (NCCL when every rank has a GPU,
gloo otherwise) and every class-wise stage then works on its share of the classes that are not done yet:
``todo[rank::world_size]``. Every class is committed atomically by the rank that made it (per-class seeds make
the result independent of who made it), so the output of N ranks is byte-identical to one process's, and a rank
that dies loses only its class in flight: rerunning the same command, with any N, does the rest. Rank 0 writes
what spans classes (the manifest) after a barrier. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing
changes: :func:`current_world` is the one-process world.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (round robin: ``items[rank::size]``)."""
        return list(items)[self.rank::self.size]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. a resumable fine-tune), the others after it, finding it done.
        Inside the block every rank works alone: :func:`current_world` is the one-process world there, so the
        block's own class-sharded stages do all of their work without waiting for the other ranks."""
        if not self.is_main:
            self.barrier()
        token = _SOLO.set(True)
        try:
            yield
        finally:
            _SOLO.reset(token)
        if self.is_main:
            self.barrier()


#: Set inside :meth:`World.main_first`: this rank works alone.
_SOLO: contextvars.ContextVar[bool] = contextvars.ContextVar("gendd_distributed_solo", default=False)


def current_world() -> World:
    """The world of the initialised default process group, else the one-process world."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return World()
    if _SOLO.get() or not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(timeout_s: float = 1800.0) -> World:
    """Join the process group ``torchrun`` describes in the environment (no-op for one process)."""
    import torch
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return current_world()
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return current_world()


def shutdown() -> None:
    """Leave the process group, if this process joined one (a gloo group left to the interpreter's exit can abort
    the process while its threads are torn down)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def default_device() -> str:
    """Where this rank's models run: ``$GENDD_DEVICE`` if set, else its GPU (``cuda:<LOCAL_RANK>``) when CUDA is
    available, else the CPU."""
    import torch

    chosen = os.environ.get("GENDD_DEVICE", "").strip()
    if chosen:
        return chosen
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % max(1, torch.cuda.device_count())}"
    return "cpu"
