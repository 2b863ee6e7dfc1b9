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

The ImageNet-style protocols of generative DD follow below: :class:`IDCHardProtocol` (IDC /
Minimax hard labels, methods.md 7.1) and :class:`SoftLabelProtocol` (RDED soft labels, 7.2, and
D3HR's variant, 5.3); their loops are in :mod:`gendd.evaluate.train_protocols`. ``PROFILES`` names
all of them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from numbers import Integral, Real
from typing import ClassVar

from gendd.config import Validated, check
from gendd.errors import ConfigError
from gendd.evaluate.augment import DEFAULT_STRATEGY, DSAugment
from gendd.hardware import PRECISIONS
from gendd.registry import Registry


def _student_names() -> tuple[str, ...]:
    from gendd.evaluate.students import STUDENTS

    return tuple(sorted(STUDENTS))


#: Field checks the protocols share.
_COUNT = check(Integral, ge=1)
_COUNT_OR_NONE = check(Integral, ge=1, optional=True)
_PRECISION = check(choices=PRECISIONS)
_STUDENT = check(choices=_student_names)
_DSA = check(str, test=DSAugment)
_RRC = check(tuple, length=2, items=check(Real, gt=0, le=1))


@dataclass(frozen=True)
class BaseProtocol(Validated):
    """What every protocol family has; a family sets ``family`` (its recipe, :mod:`gendd.evaluate.recipes`)
    and adds its fields. Errors name the protocol: ``evaluation protocol 'rded-soft': temperature must be > 0``.

    Attributes:
        name: protocol identifier (recorded with results).
        student: registered student name (:mod:`gendd.evaluate.students`).
        repeats: students trained from independent seeds.
        test_batch_size: images per forward pass when testing.
        precision: ``fp32``, ``bf16`` (autocast on the forward passes) or ``auto`` (bf16 only where the
            hardware computes it natively and faster: :func:`gendd.hardware.resolve_precision`). Each student
            records the precision it ran at.
        compile: wrap the student in ``torch.compile`` (a speed knob outside the results' identity: about
            1.3-1.5x faster fp32 steps on CPU after a one-off ~15-20 s compilation per process; needs a C++ compiler).
        num_threads: torch intra-op threads during the run (``None`` = leave as is).
        test_limit: evaluate on a class-balanced subset of this many test images (tests only).
    """

    family: ClassVar[str] = ""
    soft_labels: ClassVar[bool] = False
    test_upscale: ClassVar[bool] = False

    name: str = field(default="", metadata=check(str, min_length=1))
    student: str = field(default="convnet3", metadata=_STUDENT)
    repeats: int = field(default=3, metadata=_COUNT)
    test_batch_size: int = field(default=100, metadata=_COUNT)
    precision: str = field(default="fp32", metadata=_PRECISION)
    compile: bool = field(default=False, metadata=check(bool))
    num_threads: int | None = field(default=None, metadata=_COUNT_OR_NONE)
    test_limit: int | None = field(default=None, metadata=_COUNT_OR_NONE)

    def _config_what(self) -> str:
        return f"evaluation protocol {self.name!r}"

    def with_overrides(self, **kwargs: object):
        """A copy with some fields replaced (validated again); an unknown field is a ConfigError."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"protocol {self.name!r} has no option(s) {unknown}; known: {sorted(names)}")
        return replace(self, **kwargs)


@dataclass(frozen=True)
class DSAProtocol(BaseProtocol):
    """DC/DSA/DM student-training protocol (defaults = reference values).

    Attributes:
        name: protocol family identifier, ``"dsa"``.
        student: registered student name (:mod:`gendd.evaluate.students`).
        epochs: reference ``epoch_eval_train`` (``Epoch``); ``epochs + 1`` passes are made.
        lr, momentum, weight_decay: SGD settings.
        batch_size: reference ``batch_train``; sets are reshuffled each pass, last batch kept.
        lr_decay_epoch: pass after which lr *= 0.1 (momentum reset); ``None`` = ``epochs//2 + 1``.
        dsa_strategy: DSA op groups (``"none"`` disables augmentation; drop ``flip`` for MNIST).
        repeats: students trained from independent seeds (reference: ``num_eval``; 5).
        eval_every: passes between test evaluations for the best-over-training figure;
            ``None`` = ``max(1, epochs // 10)`` (about 10 evaluations), ``0`` = final only.
            The final pass is always evaluated.
        test_batch_size: 500. The other shared fields (``student``, ``precision``, ``compile``,
            ``num_threads``, ``test_limit``): :class:`BaseProtocol`.
    """

    family: ClassVar[str] = "dsa"

    name: str = field(default="dsa", metadata=check(str, min_length=1))
    student: str = field(default="convnet3", metadata=_STUDENT)
    epochs: int = field(default=1000, metadata=check(Integral, ge=0))
    lr: float = field(default=0.01, metadata=check(Real, gt=0))
    momentum: float = field(default=0.9, metadata=check(Real, ge=0))
    weight_decay: float = field(default=5e-4, metadata=check(Real, ge=0))
    batch_size: int = field(default=256, metadata=_COUNT)
    lr_decay_epoch: int | None = field(default=None, metadata=check(Integral, ge=0, optional=True))
    dsa_strategy: str = field(default=DEFAULT_STRATEGY, metadata=_DSA)
    repeats: int = field(default=5, metadata=_COUNT)
    eval_every: int | None = field(default=None, metadata=check(Integral, ge=0, optional=True))
    test_batch_size: int = field(default=500, metadata=_COUNT)

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


# The DSA profiles. ``"paper"`` is the reference protocol (fp32, 1000 epochs, 5 students); it
#: evaluates on the test split every 200 epochs for the best-over-training figure (the final-epoch
#: figure is the published one). ``"quick"`` is gendd's fast profile, NOT a published protocol:
#: 300 epochs (lr / 10 after pass 151), 3 students, precision ``auto`` (bf16 autocast where the
#: hardware has native bf16, fp32 elsewhere), test evaluations at
#: epochs 100, 200 and 300. Its numbers are comparable with each other, not with DC/DSA tables;
#: BENCHMARKS.md shows both profiles side by side at IPC 10. ``"demo"`` is the main job's (``gendd
#: run``) profile, sized to finish in minutes on two cores without native bf16: ``quick`` with 60
#: epochs (lr / 10 after pass 31), 2 students and one test pass at the end; BENCHMARKS.md §10 gives
#: how far its figures are from ``quick``'s on the same sets.


def get_profile(name: str) -> "DSAProtocol | IDCHardProtocol | SoftLabelProtocol":
    """The protocol registered as ``name`` in :data:`PROFILES`."""
    return PROFILES.get(name)


# ------------------------------------------------------------------ ImageNet-style protocols

#: Training side of the ImageNet-style protocols on datasets of at least this many pixels.
IMAGENET_SIZE = 224


def _check_rrc(scale: tuple[float, float]) -> None:
    if not scale[0] <= scale[1]:
        raise ConfigError(f"rrc_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale!r}")


def train_image_size(protocol: "IDCHardProtocol | SoftLabelProtocol", test_side: int) -> int:
    """Side the student trains and tests at: ``protocol.image_size``, else 224 px for datasets of
    >= 224 px (the references' ``--size 224`` / ``input_size 224``), else the dataset's own side
    (Fashion-MNIST 28, CIFAR 32: the references evaluate small datasets at their resolution)."""
    if protocol.image_size is not None:
        return protocol.image_size
    return IMAGENET_SIZE if test_side >= IMAGENET_SIZE else test_side


def ipc_epochs(ipc: int, num_classes: int) -> int:
    """IDC's ``ipc_epoch`` (``argument.py``; Minimax's copy): IPC 1 -> 3000, <= 10 -> 2000,
    <= 50 -> 1500, <= 200 -> 1000, <= 500 -> 500, else 300; with 100 classes ``2/3`` of that,
    rounded down to a multiple of 100 (IPC 10 -> 1300)."""
    if ipc <= 1:
        epochs = 3000
    elif ipc <= 10:
        epochs = 2000
    elif ipc <= 50:
        epochs = 1500
    elif ipc <= 200:
        epochs = 1000
    elif ipc <= 500:
        epochs = 500
    else:
        epochs = 300
    if num_classes == 100:
        epochs = int(2 / 3 * epochs)
        epochs -= epochs % 100
    return epochs


@dataclass(frozen=True)
class IDCHardProtocol(BaseProtocol):
    """IDC / Minimax hard-label protocol for ImageNet subsets (methods.md 7.1; reference
    ``snu-mllab/Efficient-Dataset-Condensation`` ``train.py``, ``argument.py``, ``data.py``, as
    copied by ``vimar-gu/MinimaxDiffusion``). Used by Minimax, MGD3 and the self-adaptive memory.

    Per epoch ``e`` (0-based) of ``E``: shuffled batches (last one kept) of
    ``RandomResizedCrop(size, scale (0.5, 1)) + flip + ColorJitter(0.4, 0.4, 0.4) + Lighting(0.1)``
    on images first ``Resize(size) + CenterCrop(size)``-ed; with probability ``mix_p`` CutMix
    (``Beta(1, 1)``) and the loss ``ratio CE(y) + (1 - ratio) CE(y[perm])``, else CE; SGD
    (momentum 0.9, weight decay 5e-4, lr 0.01) with ``MultiStepLR`` milestones ``[2E // 3,
    5E // 6]``, gamma 0.2: ``lr_e = lr * 0.2 ** #{m <= e}``. Test: ``Resize(size) +
    CenterCrop(size)``, every ``E // 100`` epochs; papers report the best test accuracy over
    training, mean ± std over 3 runs.

    Attributes:
        name: protocol family, ``"idc-hard"``.
        student: registered student (reference: ``resnet_ap10``; also ``convnet6``, ``resnet18``).
        epochs: ``None`` = :func:`ipc_epochs` of the distilled set's IPC (largest class) and the
            number of classes.
        lr, weight_decay, batch_size: ``None`` = the reference's values, 0.01 / 5e-4 / 64, or for
            more than 100 classes 0.1 / 1e-4 / 128 (Minimax's ``nclass > 100`` branch).
        momentum: SGD momentum.
        milestones, gamma: MultiStep decay by ``gamma`` after epochs ``num * E // den`` for each
            ``(num, den)`` pair: ``2E // 3`` and ``5E // 6`` by default.
        augment: ``"imagenet"`` (above) or ``"dsa"``: IDC's branch for 28/32 px datasets
            (``argument.py``: ``dsa=True``, ``mix_p 0.5``, DSA without cutout, 1000 epochs) with
            ``dsa_strategy`` applied to normalised images instead of crop/jitter/lighting.
        rrc_scale, jitter, lighting: the ImageNet augmentation strengths. On one-channel images
            (Fashion-MNIST) brightness and contrast jitter apply, saturation (the identity on grey
            images) and PCA lighting (RGB eigenvectors) are skipped
            (:mod:`gendd.evaluate.imagenet_aug`).
        cutmix_beta, mix_p: CutMix ``Beta(beta, beta)`` and the probability of mixing a batch.
        image_size: training/test side; ``None`` = :func:`train_image_size`.
        eval_every: epochs between test evaluations; ``None`` = ``max(1, E // 100)`` (reference
            ``epoch_print_freq``), ``0`` = the last epoch only. The last epoch is always evaluated.
        repeats, test_batch_size, precision, compile, num_threads, test_limit: as
            :class:`DSAProtocol`.
    """

    family: ClassVar[str] = "idc-hard"  # tests at Resize(size) + CenterCrop(size)

    name: str = field(default="idc-hard", metadata=check(str, min_length=1))
    student: str = field(default="resnet_ap10", metadata=_STUDENT)
    epochs: int | None = field(default=None, metadata=_COUNT_OR_NONE)
    lr: float | None = field(default=None, metadata=check(Real, gt=0, optional=True))
    momentum: float = field(default=0.9, metadata=check(Real, ge=0))
    weight_decay: float | None = field(default=None, metadata=check(Real, ge=0, optional=True))
    batch_size: int | None = field(default=None, metadata=_COUNT_OR_NONE)
    milestones: tuple[tuple[int, int], ...] = field(
        default=((2, 3), (5, 6)), metadata=check(tuple, items=check(tuple, length=2, items=check(Integral, ge=0))))
    gamma: float = field(default=0.2, metadata=check(Real, gt=0, le=1))
    augment: str = field(default="imagenet", metadata=check(choices=("imagenet", "dsa")))
    dsa_strategy: str = field(default="color_crop_flip_scale_rotate", metadata=_DSA)
    rrc_scale: tuple[float, float] = field(default=(0.5, 1.0), metadata=_RRC)
    jitter: float = field(default=0.4, metadata=check(Real, ge=0))
    lighting: float = field(default=0.1, metadata=check(Real, ge=0))
    cutmix_beta: float = field(default=1.0, metadata=check(Real, gt=0))
    mix_p: float = field(default=1.0, metadata=check(Real, ge=0, le=1))
    image_size: int | None = field(default=None, metadata=check(Integral, ge=8, optional=True))
    eval_every: int | None = field(default=None, metadata=check(Integral, ge=0, optional=True))

    def _check_fields(self) -> None:
        if not all(m[1] > 0 for m in self.milestones):
            raise ConfigError(f"milestones must be (numerator, denominator) pairs with denominator > 0, "
                              f"got {self.milestones!r}")
        _check_rrc(self.rrc_scale)

    def resolved_epochs(self, ipc: int, num_classes: int) -> int:
        """``epochs``, or IDC's IPC rule."""
        return ipc_epochs(ipc, num_classes) if self.epochs is None else self.epochs

    def resolved_optim(self, num_classes: int) -> tuple[float, float, int]:
        """``(lr, weight_decay, batch_size)`` with the reference's class-count rule for ``None``."""
        big = num_classes > 100
        lr = self.lr if self.lr is not None else (0.1 if big else 0.01)
        wd = self.weight_decay if self.weight_decay is not None else (1e-4 if big else 5e-4)
        bs = self.batch_size if self.batch_size is not None else (128 if big else 64)
        return lr, wd, bs

    def milestone_epochs(self, epochs: int) -> list[int]:
        """``[num * E // den]`` (reference ``[2 * E // 3, 5 * E // 6]``)."""
        return [num * epochs // den for num, den in self.milestones]

    def lr_at(self, ep: int, epochs: int, lr: float) -> float:
        """lr of 0-based epoch ``ep``: ``lr * gamma ** #{milestones <= ep}`` (MultiStepLR stepped
        once after every epoch)."""
        return lr * self.gamma ** sum(1 for m in self.milestone_epochs(epochs) if m <= ep)

    def evaluates(self, ep: int, epochs: int) -> bool:
        """Whether the student is tested after 0-based epoch ``ep`` (reference: 1-based epoch
        ``% epoch_print_freq == 0``; the last epoch always)."""
        every = max(1, epochs // 100) if self.eval_every is None else self.eval_every
        return ep == epochs - 1 or (every > 0 and (ep + 1) % every == 0)


#: Soft-label batch rules, ``ipc -> batch`` then a class-count factor, capped at ``ipc * classes``.
SOFT_BATCH_RULES = ("rded", "d3hr")


def soft_batch_size(rule: str, ipc: int, num_classes: int) -> int:
    """Batch size of the soft-label protocols for a distilled set of ``ipc`` images per class.

    ``rded`` (RDED ``argument.py``): IPC 50 -> 100, 10 -> 50, 1 -> 10 (the reference defines only
    these three; gendd reads them as >= 50, >= 10, else), x2 for 100 or 1000 classes. ``d3hr``
    (D3HR ``validation/argument.py``): >= 50 -> 100, >= 10 -> 50, else 15, x2 for 100 classes only.
    Both are capped at ``ipc * num_classes``."""
    if rule == "rded":
        bs = 100 if ipc >= 50 else 50 if ipc >= 10 else 10
        if num_classes in (100, 1000):
            bs *= 2
    elif rule == "d3hr":
        bs = 100 if ipc >= 50 else 50 if ipc >= 10 else 15
        if num_classes == 100:
            bs *= 2
    else:
        raise ConfigError(f"unknown soft-label batch rule {rule!r}; choose one of {SOFT_BATCH_RULES}")
    return max(1, min(bs, ipc * num_classes))


@dataclass(frozen=True)
class SoftLabelProtocol(BaseProtocol):
    """RDED-style soft-label protocol (methods.md 7.2; ``LINs-lab/RDED`` ``validation/main.py``,
    ``validation/utils.py``, ``argument.py``) and D3HR's variant of it (methods.md 5.3;
    ``lin-zhao-resoLve/D3HR`` ``validation/validate.py``, ``argument.py``, ``utils/data_utils.py``).

    Each step: augmented batch ``x`` -> CutMix (``Beta(1, 1)``, always) -> teacher (eval mode,
    frozen) soft labels ``p = softmax(t(x_mix) / T)`` computed online, loss
    ``KL(p || softmax(s(x_mix) / T))`` with ``batchmean`` reduction and no ``T^2`` factor, T = 20.
    AdamW (lr 1e-3, betas (0.9, 0.999), weight decay 0.01 on weight matrices / conv kernels only,
    none on biases and norm parameters: reference ``get_parameters``); lr factor per epoch
    ``0.5 (1 + cos(pi e / (2E)))`` (``"half-cosine"``: ends at about half the lr) or
    ``0.5 (1 + cos(pi e / E))`` (``"cosine"``, SRe2L/FKD). Like the references, a no-grad forward of
    the (mixed) batch through the training-mode student precedes the loss forward (their accuracy
    pass); it changes nothing but BatchNorm running statistics, so it is only run for BN students
    (``extra_bn_pass``).

    ``rded-soft``: ShufflePatches(2) + RandomResizedCrop(size, scale (1/2, 1)) + flip; test every
    10 epochs in the last 20 % of training (``e % 10 == 9`` and ``e > 0.8 E``, plus the last).
    ``d3hr-soft``: no ShufflePatches, scale (0.08, 1), test every epoch ``e > 290`` of 300
    (``eval_after = 290 / 300``), D3HR's batch rule, 5 repeats. Both test at
    ``Resize(size // 7 * 8) + CenterCrop(size)`` (256 -> 224) and report the best accuracy.

    Attributes:
        teacher: path of a teacher checkpoint (``teacher.pt`` of ``gendd teacher train``, its
            folder, or a torchvision-format ResNet-18 state_dict); required to run.
        student: registered student (reference: ResNet-18 = ``resnet18_bn``).
        epochs: 300 (ImageNet-1K / Tiny in both references; D3HR uses 400 for CIFAR).
        lr, betas, weight_decay: AdamW.
        schedule: ``"half-cosine"`` (RDED, D3HR) or ``"cosine"``.
        temperature: T of the KL loss.
        batch_size: ``None`` = :func:`soft_batch_size` with ``batch_rule``.
        rrc_scale, shuffle_factor: crop scale range and ShufflePatches factor (1 = off).
        cutmix_beta: CutMix ``Beta(beta, beta)``.
        eval_every, eval_after: test after 0-based epoch ``e`` when ``(e + 1) % eval_every == 0``
            and ``e > eval_after * E`` (``eval_every`` 0: never); the last epoch always.
        extra_bn_pass: the references' extra training-mode forward (BN statistics only).
        image_size, repeats, test_batch_size, precision, compile, num_threads, test_limit: as
            :class:`IDCHardProtocol`.
    """

    family: ClassVar[str] = "soft-label"
    soft_labels: ClassVar[bool] = True
    test_upscale: ClassVar[bool] = True  # Resize(size // 7 * 8) + CenterCrop(size)

    name: str = field(default="rded-soft", metadata=check(str, min_length=1))
    student: str = field(default="resnet18_bn", metadata=_STUDENT)
    teacher: str | None = field(default=None, metadata=check(str, optional=True))
    epochs: int = field(default=300, metadata=_COUNT)
    lr: float = field(default=1e-3, metadata=check(Real, gt=0))
    betas: tuple[float, float] = field(default=(0.9, 0.999),
                                       metadata=check(tuple, length=2, items=check(Real, ge=0, lt=1)))
    weight_decay: float = field(default=0.01, metadata=check(Real, ge=0))
    schedule: str = field(default="half-cosine", metadata=check(choices=("half-cosine", "cosine")))
    temperature: float = field(default=20.0, metadata=check(Real, gt=0))
    batch_size: int | None = field(default=None, metadata=_COUNT_OR_NONE)
    batch_rule: str = field(default="rded", metadata=check(choices=SOFT_BATCH_RULES))
    rrc_scale: tuple[float, float] = field(default=(0.5, 1.0), metadata=_RRC)
    shuffle_factor: int = field(default=2, metadata=_COUNT)
    cutmix_beta: float = field(default=1.0, metadata=check(Real, gt=0))
    eval_every: int | None = field(default=10, metadata=check(Integral, ge=0, optional=True))
    eval_after: float = field(default=0.8, metadata=check(Real, ge=0, lt=1))
    extra_bn_pass: bool = field(default=True, metadata=check(bool))
    image_size: int | None = field(default=None, metadata=check(Integral, ge=8, optional=True))

    def __post_init__(self) -> None:
        if isinstance(self.teacher, os.PathLike):  # a checkpoint path is stored as text (JSON, result keys)
            object.__setattr__(self, "teacher", os.fspath(self.teacher))
        super().__post_init__()

    def _check_fields(self) -> None:
        _check_rrc(self.rrc_scale)

    def resolved_epochs(self, ipc: int, num_classes: int) -> int:
        return self.epochs

    def resolved_batch_size(self, ipc: int, num_classes: int) -> int:
        return (soft_batch_size(self.batch_rule, ipc, num_classes) if self.batch_size is None
                else self.batch_size)

    def lr_factor(self, ep: int, epochs: int) -> float:
        """LambdaLR factor of 0-based epoch ``ep`` (0 past the end, as the reference)."""
        if ep > epochs:
            return 0.0
        div = 2.0 if self.schedule == "half-cosine" else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * ep / epochs / div))

    def lr_at(self, ep: int, epochs: int) -> float:
        return self.lr * self.lr_factor(ep, epochs)

    def evaluates(self, ep: int, epochs: int) -> bool:
        """Whether the student is tested after 0-based epoch ``ep``."""
        if ep == epochs - 1:
            return True
        every = 1 if self.eval_every is None else self.eval_every
        return every > 0 and (ep + 1) % every == 0 and ep > self.eval_after * epochs


#: Any evaluation protocol.
Protocol = DSAProtocol | IDCHardProtocol | SoftLabelProtocol

#: The ImageNet-style profiles. ``idc-hard``: methods.md 7.1 defaults (ResNet-AP-10, IPC-dependent
#: epochs, 3 repeats). ``idc-hard-small``: IDC's own branch for 28/32 px datasets (``argument.py``:
#: DSA ``color_crop_flip_scale_rotate`` instead of the ImageNet augmentation, CutMix with p 0.5,
#: 1000 epochs, tested at the end; ConvNet-3). ``idc-hard-quick``: gendd's CPU-sized variant, NOT
#: a published protocol (ConvNet-3, 300 epochs, tests every 100). ``rded-soft`` / ``d3hr-soft``:
#: methods.md 7.2 / 5.3 (set ``teacher``). ``rded-soft-small``: RDED's own small-image setting
#: (``scripts/cifar10_10ipc_conv3_to_conv3_cr5.sh``, ``--factor 1``: ShufflePatches(1) = none and
#: RandomResizedCrop scale (1, 1) = the whole image, so flips only; ConvNet-3 to ConvNet-3, 300 epochs, RDED's batch
#: rule); the soft-label profile for 28/32 px data. ``rded-soft-quick``: ``rded-soft``'s ImageNet settings on a
#: ConvNet-3 for 60 epochs, CPU-sized, not published (its patch shuffling and crops were made for 2x2 mosaics
#: of 224 px images).


def _builtin_profiles() -> dict[str, BaseProtocol]:
    return {
        "paper": DSAProtocol(eval_every=200),
        "quick": DSAProtocol(epochs=300, repeats=3, eval_every=100, precision="auto"),
        "demo": DSAProtocol(epochs=60, repeats=2, eval_every=0, precision="auto"),
        "idc-hard": IDCHardProtocol(),
        "idc-hard-small": IDCHardProtocol(student="convnet3", augment="dsa", epochs=1000, mix_p=0.5,
                                          eval_every=0),
        "idc-hard-quick": IDCHardProtocol(student="convnet3", epochs=300, eval_every=100),
        "rded-soft": SoftLabelProtocol(),
        "d3hr-soft": SoftLabelProtocol(name="d3hr-soft", rrc_scale=(0.08, 1.0), shuffle_factor=1,
                                       eval_every=1, eval_after=290 / 300, batch_rule="d3hr",
                                       repeats=5),
        "rded-soft-small": SoftLabelProtocol(name="rded-soft-small", student="convnet3", shuffle_factor=1,
                                             rrc_scale=(1.0, 1.0)),
        "rded-soft-quick": SoftLabelProtocol(name="rded-soft", student="convnet3", epochs=60),
    }


#: Named protocols (:class:`gendd.registry.Registry`); see the comments above each family's profiles.
PROFILES: Registry[BaseProtocol] = Registry("evaluation profile", _builtin_profiles)
