"""Training loops of the ImageNet-style protocols: IDC hard-label and RDED/D3HR soft-label.

:func:`evaluate_protocol` is what :func:`gendd.evaluate.train.evaluate_distilled` calls for an
:class:`~gendd.evaluate.protocols.IDCHardProtocol` or a
:class:`~gendd.evaluate.protocols.SoftLabelProtocol`; the per-student functions
:func:`train_idc_hard` and :func:`train_soft_label` return the same result dict as
:func:`gendd.evaluate.train.train_student` (``final_acc``, ``best_acc``, ``best_epoch``,
``history`` [(epoch, acc)], ``lrs`` (lr of each epoch), ``final_loss``, ``seconds``,
``eval_seconds``, ``epochs``, ``seed``) plus ``resolved`` (batch size, lr, image size, test
transform actually used). Epochs in ``history`` count completed epochs (1..E), so the last entry is
``E``, the accuracy after the final epoch.

Images: the distilled set is kept as uint8 at its own resolution and every batch is augmented and
then normalised with the test dataset's ``mean``/``std`` (as the DSA loop does). Size rule:
:func:`gendd.evaluate.protocols.train_image_size` (224 px for ImageNet-size data, the dataset's
side below that). Test images: ``Resize(size) + CenterCrop(size)`` (IDC) or ``Resize(size // 7 *
8) + CenterCrop(size)`` (RDED/D3HR: load the test split at 256 px to get exactly the references'
256 -> 224 crop) for ImageNet-size data; used as they are for small data.

Loss equations (``s`` student logits, ``t`` teacher logits, ``T`` temperature):

* hard (IDC): ``ratio * CE(s, y) + (1 - ratio) * CE(s, y[perm])`` on a CutMix-ed batch,
  ``ratio = 1 - box_area / (H W)``; plain ``CE(s, y)`` when the batch is not mixed.
* soft (RDED/D3HR): ``KL(softmax(t / T) || softmax(s / T))`` averaged over the batch
  (``KLDivLoss(reduction="batchmean")``), i.e. ``CE(softmax(t / T), s / T) - H(softmax(t / T))``.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gendd.data.base import ImageDataset
from gendd.errors import ConfigError, DataError, NumericalError
from gendd.evaluate.augment import DSAugment
from gendd.evaluate.imagenet_aug import TrainAugment, cutmix, resize_center_crop
from gendd.evaluate.protocols import (
    IMAGENET_SIZE,
    IDCHardProtocol,
    SoftLabelProtocol,
    train_image_size,
)
from gendd.evaluate.students import build_student
from gendd.evaluate.teacher import Teacher, load_teacher
from gendd.evaluate.train import labels_in_test_order, summarise_runs
from gendd.hardware import autocast, resolve_precision

TestU8 = tuple[torch.Tensor, torch.Tensor]


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


# --------------------------------------------------------------------------------------- data

def load_distilled(train_ds: ImageDataset, test_ds: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The distilled set as uint8 ``(n, C, S, S)`` (its own resolution) and labels in test-class
    order. The channel count must match the test split; the size may differ (resized per batch)."""
    if train_ds.channels != test_ds.channels:
        raise DataError(f"distilled images have {train_ds.channels} channel(s) but the test split has "
                        f"{test_ds.channels}")
    images = train_ds.load(list(range(len(train_ds))))
    return images, labels_in_test_order(train_ds, test_ds)


def eval_transform(protocol: IDCHardProtocol | SoftLabelProtocol, test_side: int) -> tuple[int, int, str]:
    """``(resize_to, crop, description)`` of the test images for this protocol and test side."""
    size = train_image_size(protocol, test_side)
    imagenet = test_side >= IMAGENET_SIZE or protocol.image_size is not None
    if not imagenet and size == test_side:
        return test_side, test_side, f"none ({test_side} px as stored)"
    resize_to = size // 7 * 8 if isinstance(protocol, SoftLabelProtocol) else size
    return resize_to, size, f"Resize({resize_to}) + CenterCrop({size}) of {test_side} px images"


def prepare_test_u8(test_ds: ImageDataset, protocol: IDCHardProtocol | SoftLabelProtocol,
                    chunk: int = 1024) -> TestU8:
    """Test images after the protocol's test transform, uint8, and their labels."""
    from gendd.evaluate.train import balanced_indices

    idx = (np.arange(len(test_ds)) if protocol.test_limit is None
           else balanced_indices(test_ds.labels, protocol.test_limit, test_ds.num_classes))
    resize_to, crop, _ = eval_transform(protocol, test_ds.image_size)
    x = torch.empty((len(idx), test_ds.channels, crop, crop), dtype=torch.uint8)
    for a in range(0, len(idx), chunk):
        part = test_ds.load(idx[a:a + chunk].tolist())
        x[a:a + len(part)] = resize_center_crop(part, resize_to, crop)
    return x, torch.from_numpy(test_ds.labels[idx].copy())


def _norm_consts(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


def accuracy_u8(net: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float],
                std: Sequence[float], batch_size: int = 100, precision: str = "fp32") -> float:
    """Top-1 accuracy (percent) on uint8 images normalised per batch (eval mode), at a resolved
    ``precision`` (:mod:`gendd.hardware`)."""
    m, s = _norm_consts(mean, std)
    was_training = net.training
    net.eval()
    correct = 0
    with torch.inference_mode(), autocast(precision):
        for a in range(0, x.shape[0], batch_size):
            xb = (x[a:a + batch_size].float() / 255.0 - m) / s
            correct += int((net(xb).argmax(1) == y[a:a + batch_size]).sum())
    net.train(was_training)
    return 100.0 * correct / max(1, x.shape[0])


def _ipc(labels: torch.Tensor, num_classes: int) -> int:
    return int(np.bincount(labels.numpy(), minlength=num_classes).max())


def _check_inputs(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise DataError(f"train images must be (n, C, S, S), got {tuple(images.shape)}")
    n = images.shape[0]
    if n == 0 or labels.shape != (n,):
        raise DataError(f"need a non-empty image set with one label per image, got {n} images and "
                        f"labels of shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DataError(f"train labels must lie in [0, {num_classes}), got "
                        f"[{int(labels.min())}, {int(labels.max())}]")


def _test_after_epoch(protocol, ep: int, epochs: int, fwd: nn.Module, test: tuple, precision: str,
                      history: list, bar, loss_text: str) -> float:
    """Test after 0-based epoch ``ep`` if ``protocol.evaluates(ep, epochs)``: append ``(ep + 1, acc)`` to
    ``history``, show it on ``bar``; return the seconds spent (0 when not testing).
    ``test`` = (uint8 images, labels, mean, std)."""
    if not protocol.evaluates(ep, epochs):
        return 0.0
    t0 = time.perf_counter()
    acc = accuracy_u8(fwd, *test, protocol.test_batch_size, precision)
    history.append((ep + 1, acc))
    bar.set_postfix(loss=loss_text, acc=f"{acc:.1f}")
    return time.perf_counter() - t0


def _finish(seed: int, epochs: int, history: list, lrs: list, loss: float, seconds: float,
            eval_seconds: float, resolved: dict, net: nn.Module, return_model: bool) -> dict:
    best_epoch, best_acc = max(history, key=lambda h: (h[1], -h[0]))
    result = {"seed": seed, "final_acc": history[-1][1], "best_acc": best_acc, "best_epoch": best_epoch,
              "epochs": epochs, "history": history, "lrs": lrs, "final_loss": loss, "seconds": seconds,
              "eval_seconds": eval_seconds, "resolved": resolved, "precision": resolved["precision"]}
    if return_model:
        result["model"] = net
    return result


def _nan_check(value: float, ep: int, seed: int, lr: float) -> None:
    if not np.isfinite(value):
        raise NumericalError(f"student training loss became {value} at epoch {ep} (seed {seed}, lr {lr}); "
                             "check the distilled images for NaN/Inf values or lower the learning rate")


def _sgd_step(opt: torch.optim.Optimizer, loss: torch.Tensor, ep: int, seed: int, lr: float) -> float:
    """Check the loss is finite, back-propagate, step; return the loss value."""
    value = float(loss.detach())
    _nan_check(value, ep, seed, lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


# ------------------------------------------------------------------------------------ IDC hard

def train_idc_hard(images: torch.Tensor, labels: torch.Tensor, test: TestU8,
                   protocol: IDCHardProtocol, seed: int, progress: bool = True, *, num_classes: int,
                   mean: Sequence[float], std: Sequence[float], desc: str | None = None,
                   return_model: bool = False) -> dict:
    """Train one student under the IDC hard-label protocol (see :class:`IDCHardProtocol`).

    Args:
        images: uint8 ``(n, C, S, S)`` distilled images at their own resolution.
        labels: int ``(n,)``.
        test: uint8 test images after the test transform, and labels (:func:`prepare_test_u8`).
        mean, std: normalisation (the test dataset's).
    """
    from gendd.evaluate.train import _seed_streams, _threads

    _check_inputs(images, labels, num_classes)
    test_x, test_y = test
    size = test_x.shape[-1]
    epochs = protocol.resolved_epochs(_ipc(labels, num_classes), num_classes)
    lr0, wd, batch = protocol.resolved_optim(num_classes)
    x = resize_center_crop(images, size, size)                    # Resize(size) + CenterCrop(size)
    y = labels.long()
    n = x.shape[0]
    s_init, s_shuffle, s_aug, s_mix = _seed_streams(seed, 4)
    g_shuffle = torch.Generator().manual_seed(s_shuffle)
    g_aug = torch.Generator().manual_seed(s_aug)
    g_mix = torch.Generator().manual_seed(s_mix)
    if protocol.augment == "dsa":
        m, s = _norm_consts(mean, std)
        x_norm = (x.float() / 255.0 - m) / s
        dsa = DSAugment(protocol.dsa_strategy)
    else:
        aug = TrainAugment(size, scale=protocol.rrc_scale, jitter=protocol.jitter,
                           lighting=protocol.lighting)
    resolved = {"epochs": epochs, "lr": lr0, "weight_decay": wd, "batch_size": batch,
                "milestones": protocol.milestone_epochs(epochs), "image_size": size}

    with _threads(protocol.num_threads):
        precision = resolve_precision(protocol.precision)
        resolved["precision"] = precision
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s_init)
            net = build_student(protocol.student, x.shape[1], num_classes, size)
        fwd: nn.Module = torch.compile(net) if protocol.compile else net
        opt = torch.optim.SGD(net.parameters(), lr=lr0, momentum=protocol.momentum, weight_decay=wd)
        history: list[tuple[int, float]] = []
        lrs: list[float] = []
        eval_seconds, loss_sum = 0.0, 0.0
        start = time.perf_counter()
        bar = tqdm(range(epochs), desc=desc or f"student seed {seed}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for ep in bar:
            lr = protocol.lr_at(ep, epochs, lr0)
            for group in opt.param_groups:
                group["lr"] = lr
            lrs.append(lr)
            net.train()
            loss_sum = 0.0
            perm = torch.randperm(n, generator=g_shuffle)
            for a in range(0, n, batch):
                idx = perm[a:a + batch]
                if protocol.augment == "dsa":
                    xb = dsa(x_norm[idx], g_aug)
                else:
                    xb = aug(x[idx], g_aug, mean, std)
                yb = y[idx]
                mixed = float(torch.rand(1, generator=g_mix)) < protocol.mix_p
                if mixed:
                    cm = cutmix(xb, g_mix, protocol.cutmix_beta)
                    with autocast(precision):
                        out = fwd(cm.images)
                    loss = cutmix_ce_loss(out, yb, yb[cm.perm], cm.ratio)
                else:
                    with autocast(precision):
                        out = fwd(xb)
                    loss = F.cross_entropy(out.float(), yb)
                loss_sum += _sgd_step(opt, loss, ep, seed, lr) * len(idx)
            eval_seconds += _test_after_epoch(protocol, ep, epochs, fwd, (test_x, test_y, mean, std), precision,
                                              history, bar, f"{loss_sum / n:.3f}")
        seconds = time.perf_counter() - start
        bar.close()
    return _finish(seed, epochs, history, lrs, loss_sum / n, seconds, eval_seconds, resolved, net,
                   return_model)


# ---------------------------------------------------------------------------------- soft label

def teacher_for(protocol: SoftLabelProtocol, test_ds: ImageDataset) -> Teacher:
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


def _has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def train_soft_label(images: torch.Tensor, labels: torch.Tensor, test: TestU8,
                     protocol: SoftLabelProtocol, seed: int, progress: bool = True, *,
                     num_classes: int, mean: Sequence[float], std: Sequence[float], teacher: Teacher,
                     class_map: torch.Tensor | None = None, desc: str | None = None,
                     return_model: bool = False) -> dict:
    """Train one student under a soft-label protocol (see :class:`SoftLabelProtocol`).

    ``teacher`` sees the same augmented, CutMix-ed batch; when it records its own normalisation
    the batch is re-normalised for it. ``class_map`` selects its logits for the data's classes.
    """
    from gendd.evaluate.train import _seed_streams, _threads

    _check_inputs(images, labels, num_classes)
    test_x, test_y = test
    size = test_x.shape[-1]
    if teacher.student.startswith("convnet") and teacher.image_size != size:
        raise ConfigError(f"teacher {teacher.path} is a {teacher.student} for {teacher.image_size} px images; "
                          f"this protocol trains at {size} px")
    ipc = _ipc(labels, num_classes)
    epochs = protocol.resolved_epochs(ipc, num_classes)
    batch = protocol.resolved_batch_size(ipc, num_classes)
    n = images.shape[0]
    s_init, s_shuffle, s_aug, s_mix = _seed_streams(seed, 4)
    g_shuffle = torch.Generator().manual_seed(s_shuffle)
    g_aug = torch.Generator().manual_seed(s_aug)
    g_mix = torch.Generator().manual_seed(s_mix)
    aug = TrainAugment(size, scale=protocol.rrc_scale, shuffle_factor=protocol.shuffle_factor)
    renorm = None
    if teacher.mean is not None and (tuple(teacher.mean) != tuple(mean) or tuple(teacher.std) != tuple(std)):
        m_d, s_d = _norm_consts(mean, std)
        m_t, s_t = _norm_consts(teacher.mean, teacher.std)
        renorm = (s_d / s_t, (m_d - m_t) / s_t)       # x_t = x * s_d / s_t + (m_d - m_t) / s_t
    T = protocol.temperature
    resolved = {"epochs": epochs, "lr": protocol.lr, "batch_size": batch, "image_size": size,
                "teacher": teacher.describe()}

    with _threads(protocol.num_threads):
        precision = resolve_precision(protocol.precision)
        resolved["precision"] = precision
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s_init)
            net = build_student(protocol.student, images.shape[1], num_classes, size)
        fwd: nn.Module = torch.compile(net) if protocol.compile else net
        extra_pass = protocol.extra_bn_pass and _has_batchnorm(net)
        opt = torch.optim.AdamW(adamw_param_groups(net, protocol.weight_decay), lr=protocol.lr,
                                betas=protocol.betas)
        history: list[tuple[int, float]] = []
        lrs: list[float] = []
        eval_seconds, loss_sum = 0.0, 0.0
        start = time.perf_counter()
        bar = tqdm(range(epochs), desc=desc or f"student seed {seed}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for ep in bar:
            lr = protocol.lr_at(ep, epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            lrs.append(lr)
            net.train()
            loss_sum = 0.0
            perm = torch.randperm(n, generator=g_shuffle)
            for a in range(0, n, batch):
                idx = perm[a:a + batch]
                xb = aug(images[idx], g_aug, mean, std)
                xm = cutmix(xb, g_mix, protocol.cutmix_beta).images
                with torch.no_grad(), autocast(precision):
                    if extra_pass:
                        fwd(xm)      # the references' accuracy pass: updates BN running stats only
                    t_logits = teacher.model(xm if renorm is None else xm * renorm[0] + renorm[1])
                t_logits = t_logits.float()
                if class_map is not None:
                    t_logits = t_logits[:, class_map]
                with autocast(precision):
                    out = fwd(xm)
                loss = soft_label_loss(out, t_logits, T)
                loss_sum += _sgd_step(opt, loss, ep, seed, lr) * len(idx)
            eval_seconds += _test_after_epoch(protocol, ep, epochs, fwd, (test_x, test_y, mean, std), precision,
                                              history, bar, f"{loss_sum / n:.4f}")
        seconds = time.perf_counter() - start
        bar.close()
    return _finish(seed, epochs, history, lrs, loss_sum / n, seconds, eval_seconds, resolved, net,
                   return_model)


# ------------------------------------------------------------------------------------ driver

def evaluate_protocol(train_ds: ImageDataset, test_ds: ImageDataset,
                      protocol: IDCHardProtocol | SoftLabelProtocol,
                      seeds: Sequence[int] | None = None, progress: bool = True) -> dict:
    """Train ``protocol.repeats`` students (or one per seed in ``seeds``) on ``train_ds``; test on
    ``test_ds``. Same return format as :func:`gendd.evaluate.train.evaluate_distilled`, plus
    ``image_size``, ``test_transform`` and (soft-label) ``teacher``."""
    from gendd.evaluate.train import _threads

    if not isinstance(protocol, (IDCHardProtocol, SoftLabelProtocol)):
        raise ConfigError(f"evaluate_protocol does not run {type(protocol).__name__}")
    seeds = list(range(protocol.repeats)) if seeds is None else list(seeds)
    if not seeds:
        raise DataError("evaluate_protocol needs at least one seed")
    teacher = class_map = None
    if isinstance(protocol, SoftLabelProtocol):
        teacher = teacher_for(protocol, test_ds)
        class_map = teacher_class_map(teacher, test_ds)
    x, y = load_distilled(train_ds, test_ds)
    test = prepare_test_u8(test_ds, protocol)
    mean, std = tuple(test_ds.mean), tuple(test_ds.std)
    k = test_ds.num_classes
    runs = []
    t0 = time.perf_counter()
    with _threads(protocol.num_threads) as threads:
        for i, s in enumerate(seeds):
            desc = f"student {i + 1}/{len(seeds)}"
            if teacher is None:
                runs.append(train_idc_hard(x, y, test, protocol, s, progress, num_classes=k, mean=mean,
                                           std=std, desc=desc))
            else:
                runs.append(train_soft_label(x, y, test, protocol, s, progress, num_classes=k, mean=mean,
                                             std=std, teacher=teacher, class_map=class_map, desc=desc))
    return summarise_runs(runs, protocol, test_ds, int(test[0].shape[0]), y, k, t0, threads,
                          test_transform=eval_transform(protocol, test_ds.image_size)[2],
                          image_size=int(test[0].shape[-1]),
                          teacher=None if teacher is None else teacher.describe())
