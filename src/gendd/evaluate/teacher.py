"""Teachers for the soft-label protocols: train one on a real training split, save, load.

The soft-label protocols (:class:`gendd.evaluate.protocols.SoftLabelProtocol`) need a network
trained on the *real* data. RDED and D3HR use torchvision's ImageNet-pretrained ResNet-18 for
ImageNet (methods.md 5.3, 7.2) and their own checkpoints ``pretrain_models/{dataset}_{arch}.pth``
for other datasets; neither reference ships the recipe, so :class:`TeacherConfig` is gendd's
choice, a standard one: SGD (lr 0.1, momentum 0.9, weight decay 5e-4), batch 256, lr
``0.1 * 0.5 (1 + cos(pi e / E))`` per epoch, cross-entropy; augmentation: random crop with 4 px
zero padding + flip for images below 224 px (the CIFAR recipe), ``RandomResizedCrop(0.08, 1)`` +
flip at 224 px (the torchvision ImageNet recipe); test at ``Resize(size // 7 * 8) +
CenterCrop(size)`` for ImageNet-size data, as is otherwise.

``train_teacher`` writes ``<out>/teacher.ckpt`` after every epoch (model, optimizer, generator
state, history) and resumes from it when re-run with the same settings; at the end it writes
``<out>/teacher.pt`` atomically: ``{"format": "gendd-teacher-1", "state_dict", "student",
"channels", "num_classes", "image_size", "mean", "std", "test_acc", "config", "classes",
"dataset", "history"}``.

``load_teacher`` reads that file, or a plain torchvision-format ResNet-18 ``state_dict`` (e.g.
``resnet18(weights=...).state_dict()`` saved with ``torch.save``; optionally nested under
``"state_dict"``/``"model"``, ``module.`` prefixes allowed), which it loads into ``resnet18_bn``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gendd.config import Validated, check
from gendd.data.base import ImageDataset
from gendd.errors import ConfigError, DataError
from gendd.evaluate.imagenet_aug import TrainAugment, random_flip, resize_center_crop
from gendd.evaluate.protocols import IMAGENET_SIZE
from gendd.evaluate.fit import Checkpoint, Generators, Recipe, fit_student
from gendd.evaluate.students import build_student, student_builder, torchvision_resnet18_shapes
from gendd.hardware import PRECISIONS, autocast
from gendd.artifacts import same_identity, save_torch

TEACHER_FILE = "teacher.pt"
CHECKPOINT_FILE = "teacher.ckpt"
FORMAT = "gendd-teacher-1"


@dataclass(frozen=True)
class TeacherConfig(Validated):
    """How a teacher is trained (gendd's recipe; see the module docstring).

    Attributes:
        epochs, batch_size, lr, momentum, weight_decay: SGD with a per-epoch cosine lr to 0.
        image_size: training side; ``None`` = 224 for datasets of >= 224 px, else the dataset's.
        pad: zero padding of the random crop for small images (0 = no crop).
        flip: random horizontal flips.
        eval_every: epochs between test evaluations (0 = the last only).
        test_limit: class-balanced test subset (tests only).
        seed: init, batch order and augmentation.
        num_threads: torch threads during training (``None`` = leave as is).
        precision: of the forward passes: ``auto`` (bf16 only with native hardware support,
            :mod:`gendd.hardware`), ``fp32`` or ``bf16``; the one used is saved with the teacher.
    """

    config_what: ClassVar[str] = "teacher config"

    epochs: int = field(default=30, metadata=check(Integral, ge=1))
    batch_size: int = field(default=256, metadata=check(Integral, ge=1))
    lr: float = field(default=0.1, metadata=check(Real, gt=0))
    momentum: float = field(default=0.9, metadata=check(Real, ge=0))
    weight_decay: float = field(default=5e-4, metadata=check(Real, ge=0))
    image_size: int | None = field(default=None, metadata=check(Integral, ge=8, optional=True))
    pad: int = field(default=4, metadata=check(Integral, ge=0))
    flip: bool = field(default=True, metadata=check(bool))
    eval_every: int = field(default=5, metadata=check(Integral, ge=0))
    test_limit: int | None = field(default=None, metadata=check(Integral, ge=1, optional=True))
    seed: int = field(default=0, metadata=check(Integral))
    precision: str = field(default="auto", metadata=check(choices=PRECISIONS))
    num_threads: int | None = field(default=None, metadata=check(Integral, ge=1, optional=True))

    def lr_at(self, ep: int) -> float:
        """``lr * 0.5 (1 + cos(pi ep / epochs))`` for 0-based epoch ``ep``."""
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * ep / self.epochs))


@dataclass
class Teacher:
    """A loaded, frozen teacher in eval mode and what is known about it.

    ``mean``/``std`` are the normalisation its inputs expect (``None``: unknown, e.g. a plain
    state_dict -- the data's own normalisation is used); ``classes`` its class names if recorded.
    """

    model: nn.Module
    student: str
    channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    test_acc: float | None
    source: str
    path: str
    classes: list[str] | None = None
    config: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (no weights)."""
        return {"path": self.path, "source": self.source, "student": self.student,
                "channels": self.channels, "num_classes": self.num_classes,
                "image_size": self.image_size, "test_acc": self.test_acc}


def teacher_path(path: str | os.PathLike) -> Path:
    """``path`` itself if a file, ``path/teacher.pt`` if a folder; ConfigError if neither exists."""
    p = Path(path)
    if p.is_dir():
        p = p / TEACHER_FILE
    if not p.is_file():
        raise ConfigError(f"teacher checkpoint {p} does not exist; train one with `gendd teacher train "
                          f"--data DATA --out DIR` and pass DIR/{TEACHER_FILE}")
    return p


def _size_for(ds: ImageDataset, config: TeacherConfig) -> int:
    if config.image_size is not None:
        return config.image_size
    return IMAGENET_SIZE if ds.image_size >= IMAGENET_SIZE else ds.image_size


def _pad_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``H x W`` crops of the zero-padded batch (torchvision ``RandomCrop(size, padding)``)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (ox[:, None] + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
    return torch.gather(torch.gather(xp, 2, rows), 3, cols)


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def _test_tensor(test_ds: ImageDataset, size: int, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from gendd.evaluate.data import balanced_indices

    idx = (np.arange(len(test_ds)) if limit is None
           else balanced_indices(test_ds.labels, limit, test_ds.num_classes))
    return _test_resize(test_ds.load(idx.tolist()), size), torch.from_numpy(test_ds.labels[idx].copy())


def _test_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """The teacher's test transform of uint8 images: ``Resize(size // 7 * 8) + CenterCrop(size)`` for
    ImageNet-size teachers, a plain resize to ``size`` when the sizes differ, else as is."""
    if x.shape[-1] != size or size >= IMAGENET_SIZE:
        x = resize_center_crop(x, size // 7 * 8 if size >= IMAGENET_SIZE else size, size)
    return x


def _accuracy(net: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, mean, std, batch: int = 256) -> float:
    net.eval()
    correct = 0
    with torch.inference_mode():
        for a in range(0, x_u8.shape[0], batch):
            xb = _normalize(x_u8[a:a + batch].float() / 255.0, mean, std)
            correct += int((net(xb).argmax(1) == y[a:a + batch]).sum())
    net.train()
    return 100.0 * correct / max(1, x_u8.shape[0])


class TeacherRecipe(Recipe):
    """A teacher is a student fitted on the real training split: :class:`TeacherConfig`'s recipe."""

    what = "teacher"
    nan_hint = "lower --lr"

    def __init__(self, config: TeacherConfig, student: str, train: ImageDataset, test: tuple, size: int) -> None:
        self.c, self.ds, (self.test_x, self.test_y) = config, train, test
        self.passes = self.epochs = config.epochs
        self.batch_size, self.num_items = config.batch_size, len(train)
        self.student, self.channels, self.num_classes, self.image_size = (student, train.channels,
                                                                          train.num_classes, size)
        self.mean, self.std = tuple(train.mean), tuple(train.std)
        self.labels = torch.from_numpy(train.labels.copy())
        self.big = train.image_size >= IMAGENET_SIZE or train.image_size != size
        self.rrc = TrainAugment(size, scale=(0.08, 1.0), flip=config.flip)

    def optimizer(self, net):
        return torch.optim.SGD(net.parameters(), lr=self.c.lr, momentum=self.c.momentum,
                               weight_decay=self.c.weight_decay)

    def lr_at(self, ep: int) -> float:
        return self.c.lr_at(ep)

    def loss(self, fwd, idx, gens: Generators, precision: str) -> torch.Tensor:
        xb = self.ds.load(idx.tolist())
        if self.big:
            xb = self.rrc(xb, gens.aug, self.mean, self.std)
        else:
            xb = xb.float() / 255.0
            if self.c.pad > 0:
                xb = _pad_crop(xb, self.c.pad, gens.aug)
            if self.c.flip:
                xb = random_flip(xb, gens.aug)
            xb = _normalize(xb, self.mean, self.std)
        with autocast(precision):
            out = fwd(xb)
        return F.cross_entropy(out.float(), self.labels[idx])

    def tests_after(self, ep: int) -> bool:
        return ep == self.c.epochs - 1 or bool(self.c.eval_every and (ep + 1) % self.c.eval_every == 0)

    def test(self, fwd, precision: str) -> float:
        return _accuracy(fwd, self.test_x, self.test_y, self.mean, self.std)


class _TeacherCheckpoint(Checkpoint):
    def __init__(self, path: Path, identity: dict) -> None:
        self.path, self.identity = path, identity

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not same_identity(state.get("identity"), self.identity) or "generators" not in state:
            raise ConfigError(f"{self.path} is an interrupted teacher run with other settings (or of an older "
                              "gendd); pass another --out or delete the folder")
        return state

    def save(self, state: dict) -> None:
        save_torch(self.path, {"identity": self.identity, **state})


def train_teacher(dataset_train: ImageDataset, dataset_test: ImageDataset, student_name: str,
                  config: TeacherConfig | None = None, out: str | os.PathLike = "teacher",
                  progress: bool = True) -> Teacher:
    """Train ``student_name`` on the real ``dataset_train``, test on ``dataset_test``, save
    ``<out>/teacher.pt``; resumable (re-run the same call). Returns the loaded :class:`Teacher`.

    Raises:
        ConfigError: unknown student, or ``out`` holds a run with other settings.
        DataError: train and test splits differ in classes or geometry.
        NumericalError: the loss became NaN/Inf.
    """
    config = config or TeacherConfig()
    student_builder(student_name)
    if dataset_train.classes != dataset_test.classes or dataset_train.channels != dataset_test.channels:
        raise DataError(f"teacher train split ({dataset_train.channels} channels, {dataset_train.num_classes} "
                        f"classes) and test split ({dataset_test.channels} channels, "
                        f"{dataset_test.num_classes} classes) do not match")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = _size_for(dataset_train, config)
    identity = {"student": student_name, "config": dataclasses.asdict(config),
                "train_fingerprint": dataset_train.fingerprint(), "image_size": size}
    final = out / TEACHER_FILE
    if final.exists():
        saved = torch.load(final, map_location="cpu", weights_only=True)
        if same_identity(saved.get("identity"), identity):
            return load_teacher(final)
        raise ConfigError(f"{final} holds a teacher trained with other settings; pass another --out "
                          "or delete it")
    ckpt = out / CHECKPOINT_FILE
    recipe = TeacherRecipe(config, student_name, dataset_train, _test_tensor(dataset_test, size, config.test_limit),
                           size)
    run = fit_student(recipe, config.seed, precision=config.precision, num_threads=config.num_threads,
                      progress=progress, desc=f"teacher {student_name}",
                      checkpoint=_TeacherCheckpoint(ckpt, identity), return_model=True)
    save_torch(final, {"format": FORMAT, "state_dict": run.model.state_dict(), "student": student_name,
                  "channels": dataset_train.channels, "num_classes": dataset_train.num_classes, "image_size": size,
                  "mean": list(recipe.mean), "std": list(recipe.std), "test_acc": run.final_acc,
                  "config": dataclasses.asdict(config), "classes": list(dataset_train.classes),
                  "dataset": dataset_train.name, "test_split": dataset_test.split,
                  "history": [list(h) for h in run.history], "losses": run.losses, "seconds": run.seconds,
                  "identity": identity, "precision": run.precision})
    ckpt.unlink(missing_ok=True)
    return load_teacher(final)


def _teacher_inputs(teacher: Teacher, images: torch.Tensor, mean, std, batch_size: int):
    """Batches of uint8 images under the teacher's test transform and normalisation."""
    images = _test_resize(images, teacher.image_size)
    m, s = teacher.mean or mean, teacher.std or std
    if m is None or s is None:
        raise ConfigError(f"teacher {teacher.path} records no input normalisation; pass mean and std")
    for a in range(0, len(images), batch_size):
        yield _normalize(images[a:a + batch_size].float() / 255.0, m, s)


def teacher_features(teacher: Teacher, images: torch.Tensor, mean=None, std=None,
                     batch_size: int = 256) -> torch.Tensor:
    """Penultimate-layer features of uint8 images ``(n, C, H, W)`` under ``teacher`` (float32 ``(n, d)``).

    The images get the teacher's test transform (``Resize(size // 7 * 8) + CenterCrop(size)`` for
    ImageNet-size teachers, a plain resize when the sizes differ, as is otherwise) and its normalisation
    (``mean``/``std`` when the checkpoint does not record one). This is the feature space of the
    set metrics "in the teacher's space" (:func:`gendd.metrics.set_metrics`)."""
    from gendd.metrics import embed_images

    feats = [embed_images(teacher.model, x, batch_size)
             for x in _teacher_inputs(teacher, images, mean, std, batch_size)]
    return torch.cat(feats) if feats else torch.zeros(0)


def teacher_logits(teacher: Teacher, images: torch.Tensor, mean=None, std=None,
                   batch_size: int = 256) -> torch.Tensor:
    """Class logits (float32 ``(n, classes)``) of uint8 images under ``teacher``, with the input transform of
    :func:`teacher_features`."""
    was_training = teacher.model.training
    teacher.model.eval()
    try:
        with torch.no_grad():
            out = [teacher.model(x).float() for x in _teacher_inputs(teacher, images, mean, std, batch_size)]
    finally:
        teacher.model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _plain_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """A torchvision-style state_dict inside ``obj`` (``module.`` prefixes stripped), else None."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
            return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    return None


def load_teacher(path: str | os.PathLike, student: str | None = None) -> Teacher:
    """Load a teacher: gendd's ``teacher.pt`` (or its folder), or a torchvision-format ResNet-18
    state_dict (``student`` must then be ``None`` or ``"resnet18_bn"``). The model is frozen and in
    eval mode.

    Raises:
        ConfigError: missing file, unreadable content, or weights that do not fit the student.
    """
    p = teacher_path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise ConfigError(f"cannot read teacher checkpoint {p} ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        name = obj["student"]
        if student is not None and student != name:
            raise ConfigError(f"teacher {p} is a {name}, not a {student}")
        model = build_student(name, int(obj["channels"]), int(obj["num_classes"]), int(obj["image_size"]))
        _load_into(model, obj["state_dict"], p)
        meta = dict(student=name, channels=int(obj["channels"]), num_classes=int(obj["num_classes"]),
                    image_size=int(obj["image_size"]), mean=tuple(obj["mean"]), std=tuple(obj["std"]),
                    test_acc=obj.get("test_acc"), source="gendd", classes=obj.get("classes"),
                    config=obj.get("config"))
    else:
        sd = _plain_state_dict(obj)
        if sd is None or "conv1.weight" not in sd or "fc.weight" not in sd:
            raise ConfigError(f"{p} is neither a gendd teacher.pt nor a torchvision ResNet-18 state_dict "
                              "(no conv1.weight / fc.weight)")
        if student not in (None, "resnet18_bn"):
            raise ConfigError(f"a plain torchvision state_dict loads only into resnet18_bn, not {student!r}")
        conv1 = sd["conv1.weight"]
        channels, kernel, num_classes = int(conv1.shape[1]), int(conv1.shape[-1]), int(sd["fc.weight"].shape[0])
        image_size = IMAGENET_SIZE if kernel == 7 else 32
        expected = torchvision_resnet18_shapes(channels, num_classes, small_stem=kernel != 7)
        bad = sorted(k for k in expected if k in sd and tuple(sd[k].shape) != expected[k])
        if bad:
            raise ConfigError(f"{p}: shapes of {bad[:3]} do not match a torchvision ResNet-18")
        model = build_student("resnet18_bn", channels, num_classes, image_size)
        _load_into(model, sd, p)
        meta = dict(student="resnet18_bn", channels=channels, num_classes=num_classes, image_size=image_size,
                    mean=None, std=None, test_acc=None, source="torchvision-state-dict", classes=None,
                    config=None)
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return Teacher(model=model, path=str(p), **meta)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], p: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ConfigError(f"teacher weights in {p} do not fit the network: "
                          f"{' '.join(first[:3])[:400]}") from None
