"""The protocol families' halves of :func:`gendd.evaluate.fit.fit_student`: DSA, IDC hard labels, soft labels.

A family (:data:`FAMILIES`, keyed by a protocol's ``family``) prepares a distilled set once
(:class:`Prepared`: training tensors, test tensors, teacher) and gives a fresh :class:`~gendd.evaluate.fit.Recipe`
per student.

* ``dsa`` (:class:`DSAProtocol`; reference ``evaluate_synset`` of ``VICO-UoE/DatasetCondensation``):
  ``epochs + 1`` passes; each batch ``CE(student(DSA(x)), y)``; SGD; after pass ``decay_epoch`` the lr is
  divided by 10 and SGD re-created (momentum buffers reset); tests every ``eval_every`` passes and after the
  last. Images are normalised floats at the test resolution.
* ``idc-hard`` (:class:`IDCHardProtocol`): ImageNet augmentation (or DSA for small images) on uint8 images,
  CutMix with probability ``mix_p``, ``ratio * CE(s, y) + (1 - ratio) * CE(s, y[perm])``; SGD with MultiStep
  decay.
* ``soft-label`` (:class:`SoftLabelProtocol`, RDED / D3HR): augmented batch -> CutMix -> frozen teacher's
  ``softmax(t / T)``; loss ``KL(softmax(t / T) || softmax(s / T))`` (batchmean, no ``T^2``); AdamW without
  weight decay on biases and norm parameters; (half-)cosine lr.

Test images of the ImageNet-style families: ``Resize(size) + CenterCrop(size)`` (IDC) or
``Resize(size // 7 * 8) + CenterCrop(size)`` (RDED/D3HR) for ImageNet-size data, as stored otherwise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gendd.data.base import ImageDataset
from gendd.errors import ConfigError
from gendd.evaluate.augment import DSAugment
from gendd.evaluate.data import (accuracy, accuracy_u8, check_inputs, eval_transform, ipc_of, load_distilled,
                                 norm_consts, prepare_test, prepare_test_u8, train_arrays)
from gendd.evaluate.fit import Generators, Recipe, on_device
from gendd.evaluate.imagenet_aug import TrainAugment, cutmix, resize_center_crop
from gendd.evaluate.teacher import Teacher, load_teacher
from gendd.hardware import autocast


# ------------------------------------------------------------------------------------- losses

def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """``(1/n) sum_i KL(softmax(t_i / T) || softmax(s_i / T))`` (RDED/D3HR; no ``T^2`` factor)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    p = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


def cutmix_ce_loss(logits: torch.Tensor, y: torch.Tensor, y_b: torch.Tensor,
                   ratio: float) -> torch.Tensor:
    """IDC's CutMix loss ``ratio * CE(logits, y) + (1 - ratio) * CE(logits, y_b)``."""
    logits = logits.float()
    return F.cross_entropy(logits, y) * ratio + F.cross_entropy(logits, y_b) * (1.0 - ratio)


def adamw_param_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """RDED's ``get_parameters``: weight decay only on parameters named ``*weight*`` with more than
    one dimension (conv kernels, linear weights); biases and norm affine parameters get none."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (decay if "weight" in name and p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


# ------------------------------------------------------------------------------------- recipes

class DSARecipe(Recipe):
    """DC/DSA/DM: normalised float images ``x`` at the test resolution (module docstring)."""

    def __init__(self, protocol, x: torch.Tensor, y: torch.Tensor, test: tuple, num_classes: int) -> None:
        self.p, self.x, self.y, (self.test_x, self.test_y) = protocol, x, y, test
        self.passes, self.batch_size, self.num_items = protocol.epochs + 1, protocol.batch_size, x.shape[0]
        self.epochs = protocol.epochs
        self.student, self.channels, self.num_classes, self.image_size = (protocol.student, x.shape[1],
                                                                          num_classes, x.shape[2])
        self.augment = DSAugment(protocol.dsa_strategy)
        self.every = protocol.eval_interval

    def optimizer(self, net: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=self.p.lr if lr is None else lr, momentum=self.p.momentum,
                               weight_decay=self.p.weight_decay)

    def lr_at(self, ep: int) -> float:
        return self.p.lr_at(ep)

    def loss(self, fwd, idx, gens: Generators, precision: str) -> torch.Tensor:
        xb = self.augment(self.x[idx], gens.aug)
        with autocast(precision):
            out = fwd(xb)
        return F.cross_entropy(out.float(), self.y[idx])

    def after_pass(self, ep, opt, net):
        return self.optimizer(net, self.lr_at(ep + 1)) if ep == self.p.decay_epoch else opt

    def tests_after(self, ep: int) -> bool:
        return ep == self.p.epochs or bool(self.every and ep > 0 and ep % self.every == 0)

    def test(self, fwd, precision: str) -> float:
        return accuracy(fwd, self.test_x, self.test_y, self.p.test_batch_size, precision)


class IDCHardRecipe(Recipe):
    """IDC / Minimax hard labels on uint8 images ``Resize + CenterCrop``-ed to the test side."""

    def __init__(self, protocol, images: torch.Tensor, labels: torch.Tensor, test: tuple, num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        check_inputs(images, labels, num_classes)
        self.p, (self.test_x, self.test_y), self.mean, self.std = protocol, test, mean, std
        size = self.test_x.shape[-1]
        self.epochs = protocol.resolved_epochs(ipc_of(labels, num_classes), num_classes)
        self.lr0, wd, batch = protocol.resolved_optim(num_classes)
        self.wd = wd
        self.x = resize_center_crop(images, size, size)
        self.y = labels.long()
        self.passes, self.batch_size, self.num_items = self.epochs, batch, self.x.shape[0]
        self.student, self.channels, self.num_classes, self.image_size = (protocol.student, self.x.shape[1],
                                                                          num_classes, size)
        if protocol.augment == "dsa":
            m, s = norm_consts(mean, std)
            self.x_norm = (self.x.float() / 255.0 - m) / s
            self.dsa = DSAugment(protocol.dsa_strategy)
        else:
            self.aug = TrainAugment(size, scale=protocol.rrc_scale, jitter=protocol.jitter,
                                    lighting=protocol.lighting)
        self.resolved = {"epochs": self.epochs, "lr": self.lr0, "weight_decay": wd, "batch_size": batch,
                         "milestones": protocol.milestone_epochs(self.epochs), "image_size": size}

    def optimizer(self, net):
        return torch.optim.SGD(net.parameters(), lr=self.lr0, momentum=self.p.momentum, weight_decay=self.wd)

    def lr_at(self, ep: int) -> float:
        return self.p.lr_at(ep, self.epochs, self.lr0)

    def loss(self, fwd, idx, gens: Generators, precision: str) -> torch.Tensor:
        if self.p.augment == "dsa":
            xb = self.dsa(self.x_norm[idx], gens.aug)
        else:
            xb = self.aug(self.x[idx], gens.aug, self.mean, self.std)
        yb = self.y[idx]
        if float(torch.rand(1, generator=gens.mix)) < self.p.mix_p:
            cm = cutmix(xb, gens.mix, self.p.cutmix_beta)
            with autocast(precision):
                out = fwd(cm.images)
            return cutmix_ce_loss(out, yb, yb[cm.perm], cm.ratio)
        with autocast(precision):
            out = fwd(xb)
        return F.cross_entropy(out.float(), yb)

    def tests_after(self, ep: int) -> bool:
        return self.p.evaluates(ep, self.epochs)

    def test(self, fwd, precision: str) -> float:
        return accuracy_u8(fwd, self.test_x, self.test_y, self.mean, self.std, self.p.test_batch_size, precision)


class SoftLabelRecipe(Recipe):
    """RDED / D3HR soft labels from a frozen ``teacher`` that sees the same CutMix-ed batch (re-normalised
    for it when it records its own statistics; ``class_map`` selects its logits for the data's classes)."""

    def __init__(self, protocol, images: torch.Tensor, labels: torch.Tensor, test: tuple, num_classes: int,
                 mean: Sequence[float], std: Sequence[float], teacher: Teacher,
                 class_map: torch.Tensor | None = None) -> None:
        check_inputs(images, labels, num_classes)
        self.p, (self.test_x, self.test_y), self.mean, self.std = protocol, test, mean, std
        self.teacher, self.class_map = teacher, class_map
        size = self.test_x.shape[-1]
        if teacher.student.startswith("convnet") and teacher.image_size != size:
            raise ConfigError(f"teacher {teacher.path} is a {teacher.student} for {teacher.image_size} px images; "
                              f"this protocol trains at {size} px")
        ipc = ipc_of(labels, num_classes)
        self.epochs = protocol.resolved_epochs(ipc, num_classes)
        batch = protocol.resolved_batch_size(ipc, num_classes)
        self.images = images
        self.passes, self.batch_size, self.num_items = self.epochs, batch, images.shape[0]
        self.student, self.channels, self.num_classes, self.image_size = (protocol.student, images.shape[1],
                                                                          num_classes, size)
        self.aug = TrainAugment(size, scale=protocol.rrc_scale, shuffle_factor=protocol.shuffle_factor)
        self.renorm = None
        if teacher.mean is not None and (tuple(teacher.mean) != tuple(mean) or tuple(teacher.std) != tuple(std)):
            m_d, s_d = norm_consts(mean, std)
            m_t, s_t = norm_consts(teacher.mean, teacher.std)
            self.renorm = (s_d / s_t, (m_d - m_t) / s_t)       # x_t = x * s_d / s_t + (m_d - m_t) / s_t
        self.extra_pass = False
        self.teacher_fwd = teacher.model
        self.resolved = {"epochs": self.epochs, "lr": protocol.lr, "batch_size": batch, "image_size": size,
                         "teacher": teacher.describe()}

    def bind(self, net: nn.Module) -> None:
        self.extra_pass = self.p.extra_bn_pass and _has_batchnorm(net)

    def place(self, device: torch.device, precision: str) -> None:
        model = self.teacher.model
        self.teacher_fwd = model if device.type == "cpu" else on_device(copy.deepcopy(model).to(device), device,
                                                                         precision)

    def optimizer(self, net):
        return torch.optim.AdamW(adamw_param_groups(net, self.p.weight_decay), lr=self.p.lr, betas=self.p.betas)

    def lr_at(self, ep: int) -> float:
        return self.p.lr_at(ep, self.epochs)

    def loss(self, fwd, idx, gens: Generators, precision: str) -> torch.Tensor:
        xb = self.aug(self.images[idx], gens.aug, self.mean, self.std)
        xm = cutmix(xb, gens.mix, self.p.cutmix_beta).images
        with torch.no_grad(), autocast(precision):
            if self.extra_pass:
                fwd(xm)      # the references' accuracy pass: updates BN running stats only
            t_logits = self.teacher_fwd(xm if self.renorm is None else xm * self.renorm[0] + self.renorm[1])
        t_logits = t_logits.float()
        if self.class_map is not None:
            t_logits = t_logits[:, self.class_map]
        with autocast(precision):
            out = fwd(xm)
        return soft_label_loss(out, t_logits, self.p.temperature)

    def tests_after(self, ep: int) -> bool:
        return self.p.evaluates(ep, self.epochs)

    def test(self, fwd, precision: str) -> float:
        return accuracy_u8(fwd, self.test_x, self.test_y, self.mean, self.std, self.p.test_batch_size, precision)


# ------------------------------------------------------------------------------------- families

def teacher_for(protocol, test_ds: ImageDataset) -> Teacher:
    """Load ``protocol.teacher`` and check it fits ``test_ds``; ConfigError with what to do if not."""
    if protocol.teacher is None:
        raise ConfigError(f"protocol {protocol.name!r} needs a teacher: set teacher=PATH (a teacher.pt, "
                          "its folder, or a torchvision ResNet-18 state_dict); train one with "
                          "`gendd teacher train --data DATA --out DIR`")
    teacher = load_teacher(protocol.teacher)
    if teacher.channels != test_ds.channels:
        raise ConfigError(f"teacher {teacher.path} takes {teacher.channels}-channel images, the data has "
                          f"{test_ds.channels}")
    return teacher


def teacher_class_map(teacher: Teacher, test_ds: ImageDataset) -> torch.Tensor | None:
    """Columns of the teacher's logits that correspond to the test classes, or None (identity).

    Same classes -> None; the same class names in another order -> that permutation; a 1000-class
    (ImageNet-1K) teacher on an ImageNet subset -> the subset's original ImageNet indices
    (``model_labels``), as RDED/D3HR slice the teacher's classifier for subsets."""
    k = test_ds.num_classes
    if teacher.classes is not None and list(teacher.classes) != list(test_ds.classes):
        if sorted(teacher.classes) == sorted(test_ds.classes):
            return torch.tensor([teacher.classes.index(c) for c in test_ds.classes])
        raise ConfigError(f"teacher {teacher.path} was trained on classes {teacher.classes[:5]}..., not "
                          f"on {test_ds.classes[:5]}...")
    if teacher.num_classes == k:
        return None
    if teacher.num_classes == 1000 and len(test_ds.model_labels) == k and max(test_ds.model_labels) < 1000:
        return torch.tensor(list(test_ds.model_labels))
    raise ConfigError(f"teacher {teacher.path} has {teacher.num_classes} classes but the data has {k}")


@dataclass
class Prepared:
    """A distilled set made ready for one protocol: ``recipe()`` is a fresh recipe per student."""

    recipe: Callable[[], Recipe]
    labels: torch.Tensor
    test_size: int
    extra: dict[str, Any] = field(default_factory=dict)


def _prepare_dsa(protocol, train_ds: ImageDataset, test_ds: ImageDataset) -> Prepared:
    x, y = train_arrays(train_ds, test_ds)
    test = prepare_test(test_ds, protocol.test_limit)
    return Prepared(lambda: DSARecipe(protocol, x, y, test, test_ds.num_classes), y, int(test[0].shape[0]))


def _prepare_u8(protocol, train_ds: ImageDataset, test_ds: ImageDataset, make, **extra) -> Prepared:
    """The ImageNet-style families: uint8 images at their own size, the protocol's test transform;
    ``make(x, y, test, num_classes, mean, std)`` builds a student's recipe."""
    x, y = load_distilled(train_ds, test_ds)
    test = prepare_test_u8(test_ds, protocol)
    mean, std = tuple(test_ds.mean), tuple(test_ds.std)
    return Prepared(lambda: make(x, y, test, test_ds.num_classes, mean, std), y, int(test[0].shape[0]),
                    {"test_transform": eval_transform(protocol, test_ds.image_size)[2],
                     "image_size": int(test[0].shape[-1]), **extra})


def _prepare_idc(protocol, train_ds: ImageDataset, test_ds: ImageDataset) -> Prepared:
    return _prepare_u8(protocol, train_ds, test_ds, lambda *a: IDCHardRecipe(protocol, *a))


def _prepare_soft(protocol, train_ds: ImageDataset, test_ds: ImageDataset) -> Prepared:
    teacher = teacher_for(protocol, test_ds)
    class_map = teacher_class_map(teacher, test_ds)
    return _prepare_u8(protocol, train_ds, test_ds, lambda *a: SoftLabelRecipe(protocol, *a, teacher, class_map),
                       teacher=teacher.describe())


#: protocol ``family`` -> how a distilled set is prepared for it.
FAMILIES: dict[str, Callable[[Any, ImageDataset, ImageDataset], Prepared]] = {
    "dsa": _prepare_dsa, "idc-hard": _prepare_idc, "soft-label": _prepare_soft}


def prepare(protocol, train_ds: ImageDataset, test_ds: ImageDataset) -> Prepared:
    try:
        family = FAMILIES[protocol.family]
    except (AttributeError, KeyError):
        raise ConfigError(f"no evaluation family for protocol {getattr(protocol, 'name', protocol)!r}") from None
    return family(protocol, train_ds, test_ds)
