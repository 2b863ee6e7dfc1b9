"""Evaluation protocols: how a student is trained on a distilled set and tested.

``DSAProtocol()`` is the DC/DSA/DM benchmark protocol as coded in the reference
``VICO-UoE/DatasetCondensation`` (``utils.py`` ``evaluate_synset``, ``main.py``, ``main_DM.py``):
ConvNet-3 (instance norm), SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, DSA
augmentation ``color_crop_cutout_flip_scale_rotate`` on every training batch, ``Epoch = 1000``,
lr x 0.1 once at epoch ``Epoch // 2 + 1``, cross-entropy, test accuracy after the last epoch.

Loop semantics copied from ``evaluate_synset`` (see :func:`gendd.evaluate.train.train_student`):
``for ep in range(Epoch + 1)`` -- so ``epochs + 1`` passes over the set -- and *after* pass
``ep == lr_decay_epoch`` the lr is multiplied by 0.1 and the SGD optimizer is re-created
(momentum buffers reset). With ``epochs=1000``: passes 0..501 at lr 0.01, 502..1000 at 0.001.

The published figure is the accuracy after the final pass (``final``); we also record the best
accuracy over periodic test evaluations (``best``, optimistic: it selects on the test set).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gendd.errors import ConfigError
from gendd.evaluate.augment import DEFAULT_STRATEGY


@dataclass(frozen=True)
class DSAProtocol:
    """DC/DSA/DM student-training protocol (defaults = reference values).

    Attributes:
        name: protocol family identifier, ``"dsa"``.
        student: registered student name (:mod:`gendd.evaluate.students`).
        epochs: reference ``epoch_eval_train`` (``Epoch``); ``epochs + 1`` passes are made.
        lr, momentum, weight_decay: SGD settings.
        batch_size: reference ``batch_train``; sets are reshuffled each pass, last batch kept.
        lr_decay_epoch: pass after which lr *= 0.1 (momentum reset); ``None`` = ``epochs//2 + 1``.
        dsa_strategy: DSA op groups (``"none"`` disables augmentation; drop ``flip`` for MNIST).
        repeats: students trained from independent seeds (reference: ``num_eval``).
        eval_every: passes between test evaluations for the best-over-training figure;
            ``None`` = ``max(1, epochs // 10)`` (about 10 evaluations), ``0`` = final only.
            The final pass is always evaluated.
        test_batch_size: images per forward pass when testing.
        autocast_bf16: run forward passes under CPU bf16 autocast (about 1.7x faster on CPUs
            with AVX512-BF16; accuracy within noise in our timings).
        compile: wrap the student in ``torch.compile`` (about 1.3-1.5x faster fp32 steps and
            test passes on CPU, after a one-off ~15-20 s compilation per process; needs a C++
            compiler).
        num_threads: torch intra-op threads during the run (``None`` = leave as is).
        test_limit: evaluate on a class-balanced subset of this many test images (tests only).
    """

    name: str = "dsa"
    student: str = "convnet3"
    epochs: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_decay_epoch: int | None = None
    dsa_strategy: str = DEFAULT_STRATEGY
    repeats: int = 5
    eval_every: int | None = None
    test_batch_size: int = 500
    autocast_bf16: bool = False
    compile: bool = False
    num_threads: int | None = None
    test_limit: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, "epochs must be >= 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.momentum >= 0, "momentum must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.repeats >= 1, "repeats must be >= 1"),
            (self.test_batch_size >= 1, "test_batch_size must be >= 1"),
            (self.eval_every is None or self.eval_every >= 0, "eval_every must be >= 0 or None"),
            (self.lr_decay_epoch is None or self.lr_decay_epoch >= 0,
             "lr_decay_epoch must be >= 0 or None"),
            (self.num_threads is None or self.num_threads >= 1, "num_threads must be >= 1"),
            (self.test_limit is None or self.test_limit >= 1, "test_limit must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"invalid evaluation protocol: {msg}")

    @property
    def decay_epoch(self) -> int:
        """Pass index after which the lr is divided by 10 (reference ``Epoch // 2 + 1``)."""
        return self.epochs // 2 + 1 if self.lr_decay_epoch is None else self.lr_decay_epoch

    @property
    def eval_interval(self) -> int:
        """Passes between intermediate test evaluations (0 = final only)."""
        return max(1, self.epochs // 10) if self.eval_every is None else self.eval_every

    def lr_at(self, ep: int) -> float:
        """Learning rate used during pass ``ep`` (0-based)."""
        return self.lr * (0.1 if ep > self.decay_epoch else 1.0)

    def with_overrides(self, **kwargs: object) -> "DSAProtocol":
        """A copy with some fields replaced (validated again)."""
        return replace(self, **kwargs)


#: Named protocols. ``"paper"`` is the reference protocol (fp32, 1000 epochs, 5 students); it
#: evaluates on the test split every 200 epochs for the best-over-training figure (the final-epoch
#: figure is the published one). ``"quick"`` is gendd's fast profile, NOT a published protocol:
#: 300 epochs (lr / 10 after pass 151), 3 students, bf16 autocast on the CPU, test evaluations at
#: epochs 100, 200 and 300. Its numbers are comparable with each other, not with DC/DSA tables;
#: BENCHMARKS.md shows both profiles side by side at IPC 10.
PROFILES: dict[str, DSAProtocol] = {
    "paper": DSAProtocol(eval_every=200),
    "quick": DSAProtocol(epochs=300, repeats=3, eval_every=100, autocast_bf16=True),
}


def get_profile(name: str) -> DSAProtocol:
    """The protocol registered as ``name`` in :data:`PROFILES`."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown evaluation profile {name!r}; choose one of "
                          f"{sorted(PROFILES)}") from None
