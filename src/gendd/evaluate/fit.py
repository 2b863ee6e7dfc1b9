"""The one loop that fits a student: every evaluation protocol family and teacher training.

:func:`fit_student` owns what every family shares: the seed streams (initialisation, batch order,
augmentation, mixing), torch's thread count, the resolved precision, building (and optionally compiling)
the student, the optimiser steps with the NaN check, the per-pass learning rate, periodic tests, progress,
checkpoints, and one typed result (:class:`StudentRun`). A :class:`Recipe` is the family's half: its
optimiser, learning rate of a pass, how a batch becomes a loss (augmentation, mixing, hard or soft
labels), when and how the student is tested. Recipes are built by :func:`recipe_for` from the
protocol's ``family`` (see :mod:`gendd.evaluate.recipes`).

History convention (all families): ``history`` holds ``(passes completed, test accuracy)``, so its last
entry of a DSA run with ``epochs = E`` is ``E + 1`` (the reference makes ``E + 1`` passes) and that of the
other families ``E``; ``best_epoch`` counts the same way. Results saved before this convention (DSA runs
recorded the 0-based pass) are migrated on reading (:func:`migrate_run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gendd.errors import NumericalError
from gendd.hardware import autocast, resolve_precision

#: ``history_unit`` of runs recorded under the convention of this module.
HISTORY_UNIT = "passes"


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Temporarily set torch's intra-op thread count; yields the count in effect."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def seed_streams(seed: int, k: int = 4) -> list[int]:
    """``k`` independent 63-bit seeds derived from ``seed`` (numpy SeedSequence; the first ``j`` of ``k``
    do not depend on ``k``)."""
    state = np.random.SeedSequence([seed, 0x6E0D]).generate_state(k, dtype=np.uint64)
    return [int(v) >> 1 for v in state]


@dataclass
class Generators:
    """The per-student random streams a recipe draws from (``init`` seeds the student's weights)."""

    shuffle: torch.Generator
    aug: torch.Generator
    mix: torch.Generator
    init: int

    @classmethod
    def from_seed(cls, seed: int) -> "Generators":
        s_init, s_shuffle, s_aug, s_mix = seed_streams(seed, 4)
        return cls(torch.Generator().manual_seed(s_shuffle), torch.Generator().manual_seed(s_aug),
                   torch.Generator().manual_seed(s_mix), s_init)

    def state(self) -> dict:
        return {"shuffle": self.shuffle.get_state(), "aug": self.aug.get_state(), "mix": self.mix.get_state()}

    def load(self, state: dict) -> None:
        for name in ("shuffle", "aug", "mix"):
            getattr(self, name).set_state(state[name])


class OnDevice(nn.Module):
    """``net`` on ``device`` behind a CPU interface: inputs are moved there, the forward runs under the
    device's autocast for ``precision``, logits come back to the CPU. Data, augmentation and every random
    stream stay on the CPU as before, so a student's batches do not depend on where it trains; on the CPU
    this is the plain ``net``."""

    def __init__(self, net: nn.Module, device: torch.device, precision: str) -> None:
        super().__init__()
        self.net, self.device, self.precision = net, device, precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            return self.net(x.to(self.device, non_blocking=True)).cpu()


def on_device(net: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """``net`` itself on the CPU, else :class:`OnDevice`."""
    return net if device.type == "cpu" else OnDevice(net, device, precision)


class Recipe:
    """One protocol family's training of one student on one training set (resolved sizes and data).

    Subclasses set ``passes``, ``epochs``, ``batch_size``, ``num_items`` and the student's geometry and implement
    :meth:`optimizer`, :meth:`lr_at`, :meth:`loss`, :meth:`tests_after` and :meth:`test`."""

    #: Who is trained, in messages ("student", "teacher").
    what: ClassVar[str] = "student"
    #: What to try when the loss diverges.
    nan_hint: ClassVar[str] = "check the distilled images for NaN/Inf values or lower the learning rate"

    passes: int
    epochs: int  # the protocol's figure, recorded in the result (DSA: passes - 1)
    batch_size: int
    num_items: int
    student: str
    channels: int
    num_classes: int
    image_size: int
    resolved: dict | None = None

    def optimizer(self, net: nn.Module) -> torch.optim.Optimizer:  # pragma: no cover - abstract
        raise NotImplementedError

    def lr_at(self, ep: int) -> float:  # pragma: no cover - abstract
        """Learning rate of 0-based pass ``ep``."""
        raise NotImplementedError

    def bind(self, net: nn.Module) -> None:
        """Called once with the built student (before compiling), e.g. to look at its layers."""

    def place(self, device: torch.device, precision: str) -> None:
        """Called once with where the student trains, e.g. to move a teacher there (:func:`on_device`)."""

    def loss(self, fwd: nn.Module, idx: torch.Tensor, gens: Generators, precision: str) -> torch.Tensor:
        """The loss of the batch of items ``idx`` (augmented, mixed, forwarded)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def after_pass(self, ep: int, opt: torch.optim.Optimizer, net: nn.Module) -> torch.optim.Optimizer:
        """The optimiser for the next pass (DSA re-creates it after its decay pass)."""
        return opt

    def tests_after(self, ep: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def test(self, fwd: nn.Module, precision: str) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class StudentRun:
    """What one fitted student reports. ``history``: ``(passes completed, accuracy %)``; ``lrs`` and
    ``losses``: the lr and mean training loss of every pass; ``epochs``: the protocol's epochs."""

    seed: int
    final_acc: float
    best_acc: float
    best_epoch: int
    epochs: int
    history: list[tuple[int, float]]
    lrs: list[float]
    losses: list[float]
    final_loss: float
    seconds: float
    eval_seconds: float
    precision: str
    resolved: dict | None = None
    history_unit: str = HISTORY_UNIT
    device: str = "cpu"
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self, with_model: bool = False) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        if self.resolved is None:
            del out["resolved"]
        if with_model:
            out["model"] = self.model
        return out


def migrate_run(run: dict, family: str | None) -> dict:
    """A saved run in this module's history convention: DSA runs saved before it (no ``history_unit``)
    recorded the 0-based pass index, one less than the passes completed."""
    if "history_unit" in run:
        return run
    run = dict(run)
    if family == "dsa":
        run["history"] = [[int(e) + 1, a] for e, a in run.get("history", [])]
        if "best_epoch" in run:
            run["best_epoch"] = int(run["best_epoch"]) + 1
    run["history_unit"] = HISTORY_UNIT
    return run


class Checkpoint:
    """Where :func:`fit_student` saves its state after every pass and resumes from (teachers)."""

    def load(self) -> dict | None:  # pragma: no cover - interface
        raise NotImplementedError

    def save(self, state: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def fit_student(recipe: Recipe, seed: int, *, precision: str = "fp32", num_threads: int | None = None,
                compile: bool = False, device: str | torch.device | None = None, progress: bool = True,
                desc: str | None = None,
                checkpoint: Checkpoint | None = None,
                return_model: bool = False, on_pass: Callable[[int, float, float | None], None] | None = None
                ) -> StudentRun:
    """Fit a freshly initialised ``recipe.student`` under ``recipe`` with the streams of ``seed``.

    ``precision`` is a policy (:func:`gendd.hardware.resolve_precision`), resolved for ``device`` (default
    :func:`gendd.distributed.default_device`: ``$GENDD_DEVICE``, else this rank's GPU, else the CPU). The student is
    initialised on the CPU and moved there (:class:`OnDevice`), so its initial weights and batches are the same
    on every device. With a ``checkpoint`` the state after every pass is saved there and a saved state is resumed
    from. The returned model is on the CPU.

    Raises:
        NumericalError: the training loss became NaN/Inf.
    """
    from gendd.distributed import default_device
    from gendd.evaluate.students import build_student

    gens = Generators.from_seed(seed)
    device = torch.device(default_device() if device is None else device)
    with threads(num_threads):
        precision = resolve_precision(precision, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gens.init)
            net = build_student(recipe.student, recipe.channels, recipe.num_classes, recipe.image_size)
        recipe.bind(net)
        net.to(device)
        recipe.place(device, precision)
        fwd: nn.Module = on_device(torch.compile(net) if compile else net, device, precision)
        opt = recipe.optimizer(net)
        start, history, lrs, losses = 0, [], [], []
        state = checkpoint.load() if checkpoint is not None else None
        if state is not None:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gens.load(state["generators"])
            start, lrs, losses = int(state["passes"]), list(state["lrs"]), list(state["losses"])
            history = [tuple(h) for h in state["history"]]
        n, bs = recipe.num_items, recipe.batch_size
        eval_seconds, loss_mean = 0.0, float("nan")
        t0 = time.perf_counter()
        bar = tqdm(range(start, recipe.passes), desc=desc or f"{recipe.what} seed {seed}", disable=not progress,
                   initial=start, total=recipe.passes, leave=False, dynamic_ncols=True)
        for ep in bar:
            lr = recipe.lr_at(ep)
            for group in opt.param_groups:
                group["lr"] = lr
            lrs.append(lr)
            net.train()
            loss_sum = 0.0
            perm = torch.randperm(n, generator=gens.shuffle)
            for a in range(0, n, bs):
                idx = perm[a:a + bs]
                loss = recipe.loss(fwd, idx, gens, precision)
                value = float(loss.detach())
                if not np.isfinite(value):
                    raise NumericalError(f"{recipe.what} training loss became {value} at epoch {ep} (seed {seed}, "
                                         f"lr {lr}); {recipe.nan_hint}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += value * len(idx)
            loss_mean = loss_sum / n
            losses.append(loss_mean)
            opt = recipe.after_pass(ep, opt, net)
            acc = None
            if recipe.tests_after(ep):
                t1 = time.perf_counter()
                acc = recipe.test(fwd, precision)
                eval_seconds += time.perf_counter() - t1
                history.append((ep + 1, acc))
            bar.set_postfix(loss=f"{loss_mean:.4f}", acc="-" if acc is None else f"{acc:.1f}")
            if checkpoint is not None:
                checkpoint.save({"passes": ep + 1, "model": net.state_dict(), "optimizer": opt.state_dict(),
                                 "generators": gens.state(), "history": history, "lrs": lrs, "losses": losses})
            if on_pass is not None:
                on_pass(ep, loss_mean, acc)
        seconds = time.perf_counter() - t0
        bar.close()
    if not history or history[-1][0] != recipe.passes:
        raise RuntimeError(f"{type(recipe).__name__}.tests_after must test after the last pass "
                           f"({recipe.passes}); the history ends at {history[-1][0] if history else None}")
    net.to("cpu")
    best_epoch, best_acc = max(history, key=lambda h: (h[1], -h[0]))
    return StudentRun(seed=seed, final_acc=history[-1][1], best_acc=best_acc, best_epoch=best_epoch,
                      epochs=recipe.epochs, history=history, lrs=lrs,
                      losses=losses, final_loss=losses[-1] if losses else loss_mean, seconds=seconds,
                      eval_seconds=eval_seconds, precision=precision,
                      resolved=None if recipe.resolved is None else {**recipe.resolved, "precision": precision},
                      device=device.type, model=net if return_model else None)
