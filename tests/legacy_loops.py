"""The evaluation loops as they were before the one loop (gendd.evaluate.fit), kept verbatim as the reference
the new loop must reproduce bit for bit (tests/test_fit.py). Not used by gendd itself."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gendd.data.base import ImageDataset
from gendd.errors import ConfigError, DataError, NumericalError
from gendd.evaluate.augment import DSAugment
from gendd.evaluate.data import norm_consts as _norm_consts, accuracy, accuracy_u8, prepare_test
from gendd.evaluate.data import check_inputs as _check_inputs, ipc_of as _ipc
from gendd.evaluate.fit import seed_streams as _seed_streams, threads as _threads
from gendd.evaluate.imagenet_aug import TrainAugment, cutmix, random_flip, resize_center_crop
from gendd.evaluate.data import TestData, TestU8
from gendd.evaluate.protocols import IMAGENET_SIZE, DSAProtocol, IDCHardProtocol, SoftLabelProtocol
from gendd.evaluate.recipes import _has_batchnorm, adamw_param_groups, cutmix_ce_loss, soft_label_loss
from gendd.evaluate.students import build_student, student_builder
from gendd.evaluate.teacher import (CHECKPOINT_FILE, FORMAT, TEACHER_FILE, TeacherConfig, _accuracy,
                                    _normalize, _pad_crop, _size_for, _test_tensor, Teacher,
                                    load_teacher)
from gendd.hardware import autocast, resolve_precision


def _atomic_save(obj, path):
    from gendd.artifacts import save_torch

    save_torch(path, obj)


def train_student(train_images: torch.Tensor, train_labels: torch.Tensor,
                  test: ImageDataset | TestData, protocol: DSAProtocol, seed: int,
                  progress: bool = True, *, num_classes: int | None = None,
                  desc: str | None = None, return_model: bool = False) -> dict:
    """Train one freshly initialised student on normalised images; test it.

    Args:
        train_images: float ``(n, C, H, W)``, normalised like the test images.
        train_labels: int ``(n,)`` class indices.
        test: an :class:`ImageDataset` (loaded and normalised here) or ``prepare_test`` output.
        protocol: training/testing settings.
        seed: determines the student init, batch order and augmentation draws.
        num_classes: classifier size (default: the test dataset's, else 1 + max label seen).
        return_model: also return the trained module under ``"model"``.

    Returns:
        ``final_acc``, ``best_acc`` (percent), ``best_epoch``, ``history`` [(pass, acc)],
        ``lrs`` (lr of each pass), ``final_loss`` (mean train loss of the last pass),
        ``seconds`` (wall time, incl. testing), ``eval_seconds``, ``epochs``, ``seed``,
        ``precision`` (``fp32`` or ``bf16``: the protocol's policy resolved on this machine).

    Raises:
        NumericalError: the training loss became NaN/Inf.
    """
    if isinstance(test, ImageDataset):
        if num_classes is None:
            num_classes = test.num_classes
        test_x, test_y = prepare_test(test, protocol.test_limit)
    else:
        test_x, test_y = test
    if train_images.dim() != 4 or train_images.shape[2] != train_images.shape[3]:
        raise DataError(f"train images must be (n, C, S, S), got {tuple(train_images.shape)}")
    n = train_images.shape[0]
    if n == 0 or train_labels.shape != (n,):
        raise DataError(f"need a non-empty image set with one label per image, got {n} images "
                        f"and labels of shape {tuple(train_labels.shape)}")
    if tuple(test_x.shape[1:]) != tuple(train_images.shape[1:]):
        raise DataError(f"train images {tuple(train_images.shape[1:])} and test images "
                        f"{tuple(test_x.shape[1:])} differ in shape")
    x = train_images.detach().float().contiguous()
    y = train_labels.detach().long()
    if num_classes is None:
        num_classes = int(max(int(y.max()), int(test_y.max()))) + 1
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(f"train labels must lie in [0, {num_classes}), got "
                        f"[{int(y.min())}, {int(y.max())}]")

    s_init, s_shuffle, s_aug = _seed_streams(seed, 3)
    g_shuffle = torch.Generator().manual_seed(s_shuffle)
    g_aug = torch.Generator().manual_seed(s_aug)
    augment = DSAugment(protocol.dsa_strategy)
    eval_every = protocol.eval_interval
    decay_epoch = protocol.decay_epoch

    with _threads(protocol.num_threads):
        precision = resolve_precision(protocol.precision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s_init)
            net = build_student(protocol.student, x.shape[1], num_classes, x.shape[2])
        fwd: nn.Module = torch.compile(net) if protocol.compile else net

        def make_opt(lr: float) -> torch.optim.SGD:
            return torch.optim.SGD(net.parameters(), lr=lr, momentum=protocol.momentum,
                                   weight_decay=protocol.weight_decay)

        lr = protocol.lr
        opt = make_opt(lr)
        history: list[tuple[int, float]] = []
        lrs: list[float] = []
        eval_seconds = 0.0
        loss_sum = 0.0
        start = time.perf_counter()
        bar = tqdm(range(protocol.epochs + 1), desc=desc or f"student seed {seed}",
                   disable=not progress, leave=False, dynamic_ncols=True)
        for ep in bar:
            net.train()
            lrs.append(lr)
            loss_sum = 0.0
            perm = torch.randperm(n, generator=g_shuffle)
            for a in range(0, n, protocol.batch_size):
                idx = perm[a:a + protocol.batch_size]
                xb = augment(x[idx], g_aug)
                with autocast(precision):
                    out = fwd(xb)
                loss = F.cross_entropy(out.float(), y[idx])
                lv = float(loss.detach())
                if not np.isfinite(lv):
                    raise NumericalError(
                        f"student training loss became {lv} at epoch {ep} (seed {seed}, lr {lr}); "
                        "check the distilled images for NaN/Inf values or lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += lv * len(idx)
            if ep == decay_epoch:
                lr *= 0.1
                opt = make_opt(lr)  # reference re-creates SGD: momentum buffers reset
            if ep == protocol.epochs or (eval_every and ep > 0 and ep % eval_every == 0):
                t0 = time.perf_counter()
                acc = accuracy(fwd, test_x, test_y, protocol.test_batch_size, precision)
                eval_seconds += time.perf_counter() - t0
                history.append((ep, acc))
                bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{acc:.1f}")
        seconds = time.perf_counter() - start
        bar.close()

    best_epoch, best_acc = max(history, key=lambda h: (h[1], -h[0]))
    result = {
        "seed": seed,
        "final_acc": history[-1][1],
        "best_acc": best_acc,
        "best_epoch": best_epoch,
        "epochs": protocol.epochs,
        "history": history,
        "lrs": lrs,
        "final_loss": loss_sum / n,
        "seconds": seconds,
        "eval_seconds": eval_seconds,
        "precision": precision,
    }
    if return_model:
        result["model"] = net
    return result


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


def train_soft_label(images: torch.Tensor, labels: torch.Tensor, test: TestU8,
                     protocol: SoftLabelProtocol, seed: int, progress: bool = True, *,
                     num_classes: int, mean: Sequence[float], std: Sequence[float], teacher: Teacher,
                     class_map: torch.Tensor | None = None, desc: str | None = None,
                     return_model: bool = False) -> dict:
    """Train one student under a soft-label protocol (see :class:`SoftLabelProtocol`).

    ``teacher`` sees the same augmented, CutMix-ed batch; when it records its own normalisation
    the batch is re-normalised for it. ``class_map`` selects its logits for the data's classes.
    """
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
        if saved.get("identity") == identity:
            return load_teacher(final)
        raise ConfigError(f"{final} holds a teacher trained with other settings; pass another --out "
                          "or delete it")
    mean, std = tuple(dataset_train.mean), tuple(dataset_train.std)
    c, k = dataset_train.channels, dataset_train.num_classes
    s_init, s_shuffle, s_aug = _seed_streams(config.seed, 3)
    g_shuffle = torch.Generator().manual_seed(s_shuffle)
    g_aug = torch.Generator().manual_seed(s_aug)
    big = dataset_train.image_size >= IMAGENET_SIZE or dataset_train.image_size != size
    rrc = TrainAugment(size, scale=(0.08, 1.0), flip=config.flip)
    n = len(dataset_train)
    labels = torch.from_numpy(dataset_train.labels.copy())

    with _threads(config.num_threads):
        precision = resolve_precision(config.precision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s_init)
            net = build_student(student_name, c, k, size)
        opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        start, history = 0, []
        ckpt = out / CHECKPOINT_FILE
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if state.get("identity") != identity:
                raise ConfigError(f"{ckpt} is an interrupted teacher run with other settings; pass another "
                                  "--out or delete the folder")
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            g_shuffle.set_state(state["g_shuffle"])
            g_aug.set_state(state["g_aug"])
            start, history = int(state["epoch"]), [tuple(h) for h in state["history"]]
        test_x, test_y = _test_tensor(dataset_test, size, config.test_limit)
        t0 = time.perf_counter()
        bar = tqdm(range(start, config.epochs), desc=f"teacher {student_name}", disable=not progress,
                   initial=start, total=config.epochs, leave=False, dynamic_ncols=True)
        for ep in bar:
            lr = config.lr_at(ep)
            for group in opt.param_groups:
                group["lr"] = lr
            net.train()
            perm = torch.randperm(n, generator=g_shuffle)
            loss_sum = 0.0
            for a in range(0, n, config.batch_size):
                idx = perm[a:a + config.batch_size]
                xb = dataset_train.load(idx.tolist())
                if big:
                    xb = rrc(xb, g_aug, mean, std)
                else:
                    xb = xb.float() / 255.0
                    if config.pad > 0:
                        xb = _pad_crop(xb, config.pad, g_aug)
                    if config.flip:
                        xb = random_flip(xb, g_aug)
                    xb = _normalize(xb, mean, std)
                with autocast(precision):
                    out = net(xb)
                loss = F.cross_entropy(out.float(), labels[idx])
                lv = float(loss.detach())
                if not np.isfinite(lv):
                    raise NumericalError(f"teacher loss became {lv} at epoch {ep}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += lv * len(idx)
            acc = None
            if ep == config.epochs - 1 or (config.eval_every and (ep + 1) % config.eval_every == 0):
                acc = _accuracy(net, test_x, test_y, mean, std)
            history.append((ep + 1, loss_sum / n, acc))
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc="-" if acc is None else f"{acc:.1f}")
            _atomic_save({"identity": identity, "epoch": ep + 1, "model": net.state_dict(),
                          "optimizer": opt.state_dict(), "g_shuffle": g_shuffle.get_state(),
                          "g_aug": g_aug.get_state(), "history": history}, ckpt)
        bar.close()
        if not history or history[-1][2] is None:
            history.append((config.epochs, float("nan"), _accuracy(net, test_x, test_y, mean, std)))
    _atomic_save({"format": FORMAT, "state_dict": net.state_dict(), "student": student_name,
                  "channels": c, "num_classes": k, "image_size": size, "mean": list(mean),
                  "std": list(std), "test_acc": history[-1][2], "config": dataclasses.asdict(config),
                  "classes": list(dataset_train.classes), "dataset": dataset_train.name,
                  "test_split": dataset_test.split, "history": [list(h) for h in history],
                  "seconds": time.perf_counter() - t0, "identity": identity, "precision": precision}, final)
    ckpt.unlink(missing_ok=True)
    return load_teacher(final)
