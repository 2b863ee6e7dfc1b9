"""Train students on a (distilled) image set and measure their test accuracy.

One loop, following ``evaluate_synset`` of the reference ``VICO-UoE/DatasetCondensation``
(``utils.py``); see :mod:`gendd.evaluate.protocols` for the protocol values:

    for ep in 0..epochs:                                   # epochs + 1 passes, as the reference
        for each shuffled batch (size batch_size, last batch kept):
            loss = CE(student(DSA(x_batch)), y_batch); SGD step (momentum, weight decay)
        if ep == decay_epoch: lr *= 0.1; re-create SGD      # momentum buffers reset
        if ep % eval_every == 0 or ep == epochs: test accuracy -> history

``final_acc`` is the accuracy after the last pass (what DC/DSA/DM publish); ``best_acc`` is the
maximum over ``history`` (test-set selection, optimistic). Accuracies are in percent.

Images are normalised as in the reference: ``(x / 255 - mean) / std`` per channel with the real
dataset's statistics (the test dataset's ``mean``/``std``), for training and test images alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gendd.data.base import ImageDataset
from gendd.errors import DataError, NumericalError
from gendd.evaluate.augment import DSAugment
from gendd.evaluate.protocols import DSAProtocol, Protocol
from gendd.evaluate.students import build_student
from gendd.hardware import autocast, precision_label, resolve_precision

TestData = tuple[torch.Tensor, torch.Tensor]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(n, C, H, W)`` -> float32 ``(x / 255 - mean_c) / std_c``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return images.float().div_(255.0).sub_(m).div_(s)


def balanced_indices(labels: np.ndarray, limit: int, num_classes: int) -> np.ndarray:
    """The first ``max(1, limit // num_classes)`` items of every class, in dataset order."""
    per_class = max(1, limit // num_classes)
    idx = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(idx))


def prepare_test(test_ds: ImageDataset, limit: int | None = None,
                 chunk: int = 2048) -> TestData:
    """Load and normalise a test split once: ``(x float32 (n, C, H, W), y int64 (n,))``.

    ``limit`` keeps a class-balanced subset (:func:`balanced_indices`; for tests). Reuse the
    result across students: pass it as ``test`` to :func:`train_student`.
    """
    idx = (np.arange(len(test_ds)) if limit is None
           else balanced_indices(test_ds.labels, limit, test_ds.num_classes))
    c, s = test_ds.channels, test_ds.image_size
    x = torch.empty((len(idx), c, s, s), dtype=torch.float32)
    for a in range(0, len(idx), chunk):
        part = idx[a:a + chunk]
        x[a:a + len(part)] = normalize(test_ds.load(part.tolist()), test_ds.mean, test_ds.std)
    y = torch.from_numpy(test_ds.labels[idx].copy())
    return x, y


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[int]:
    """Temporarily set torch's intra-op thread count; yields the count in effect."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def _seed_streams(seed: int, k: int) -> list[int]:
    """``k`` independent 63-bit seeds derived from ``seed`` (numpy SeedSequence)."""
    state = np.random.SeedSequence([seed, 0x6E0D]).generate_state(k, dtype=np.uint64)
    return [int(v) >> 1 for v in state]


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             precision: str = "fp32") -> float:
    """Top-1 accuracy in percent of ``net`` on pre-normalised ``(x, y)`` (inference mode), at a
    resolved ``precision`` (:mod:`gendd.hardware`)."""
    was_training = net.training
    net.eval()
    correct = 0
    with torch.inference_mode(), autocast(precision):
        for a in range(0, x.shape[0], batch_size):
            pred = net(x[a:a + batch_size]).argmax(1)
            correct += int((pred == y[a:a + batch_size]).sum())
    net.train(was_training)
    return 100.0 * correct / max(1, x.shape[0])


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


def labels_in_test_order(train_ds: ImageDataset, test_ds: ImageDataset) -> torch.Tensor:
    """The distilled set's labels as indices of the test split's classes (matched by name)."""
    if train_ds.classes == test_ds.classes:
        labels = train_ds.labels
    elif sorted(train_ds.classes) == sorted(test_ds.classes):
        remap = np.array([test_ds.classes.index(c) for c in train_ds.classes], dtype=np.int64)
        labels = remap[train_ds.labels]
    else:
        raise DataError(f"distilled classes {train_ds.classes} do not match the test classes "
                        f"{test_ds.classes}; name the class folders like the test classes")
    return torch.from_numpy(np.ascontiguousarray(labels))


def _train_arrays(train_ds: ImageDataset, test_ds: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Distilled set as normalised floats (test statistics) and labels in test-class order."""
    if (train_ds.channels, train_ds.image_size) != (test_ds.channels, test_ds.image_size):
        raise DataError(f"distilled images are {train_ds.channels}x{train_ds.image_size}px but "
                        f"the test split is {test_ds.channels}x{test_ds.image_size}px; "
                        "resize the distilled set to the test resolution")
    images = normalize(train_ds.load(list(range(len(train_ds)))), test_ds.mean, test_ds.std)
    return images, labels_in_test_order(train_ds, test_ds)


def evaluate_distilled(train_ds: ImageDataset, test_ds: ImageDataset, protocol: Protocol,
                       seeds: Sequence[int] | None = None, progress: bool = True) -> dict:
    """Train ``protocol.repeats`` students (seeds ``0..repeats-1`` unless given) on ``train_ds``.

    Dispatches on the protocol type: a :class:`DSAProtocol` runs :func:`train_student` (below);
    an ``IDCHardProtocol`` or ``SoftLabelProtocol`` runs
    :func:`gendd.evaluate.train_protocols.evaluate_protocol` (same return format, plus
    ``image_size``, ``test_transform`` and ``teacher``).

    Returns a dict with ``runs`` (per-student results of :func:`train_student`), ``final_mean``,
    ``final_std``, ``best_mean``, ``best_std`` (percent; population std, ddof=0, as the reference's
    ``np.std``), ``seconds_per_run``, ``seconds_total``, ``protocol`` (dict), ``dataset``,
    ``test_split``, ``test_size``, ``train_size``, ``train_class_counts``, ``torch_version``
    and ``num_threads``.
    """
    if not isinstance(protocol, DSAProtocol):
        from gendd.evaluate.train_protocols import evaluate_protocol

        return evaluate_protocol(train_ds, test_ds, protocol, seeds=seeds, progress=progress)
    seeds = list(range(protocol.repeats)) if seeds is None else list(seeds)
    if not seeds:
        raise DataError("evaluate_distilled needs at least one seed")
    x, y = _train_arrays(train_ds, test_ds)
    test = prepare_test(test_ds, protocol.test_limit)
    runs = []
    t0 = time.perf_counter()
    with _threads(protocol.num_threads) as threads:
        for i, s in enumerate(seeds):
            runs.append(train_student(x, y, test, protocol, s, progress,
                                      num_classes=test_ds.num_classes,
                                      desc=f"student {i + 1}/{len(seeds)}"))
    return summarise_runs(runs, protocol, test_ds, int(test[0].shape[0]), y, test_ds.num_classes, t0, threads)


def run_statistics(runs: list[dict]) -> dict:
    """Mean ± population std (``np.std``, ddof 0, as the references) of the students' final and best
    accuracies, their number, mean seconds, and the precision they ran at (``"mixed: ..."`` when they
    differ; ``"unrecorded"`` for students saved before precisions were recorded)."""
    final = np.array([r["final_acc"] for r in runs])
    best = np.array([r["best_acc"] for r in runs])
    return {"final_mean": float(final.mean()), "final_std": float(final.std()),
            "best_mean": float(best.mean()), "best_std": float(best.std()), "num_runs": len(runs),
            "seconds_per_run": float(np.mean([r["seconds"] for r in runs])),
            "precision": precision_label([r.get("precision", "unrecorded") for r in runs])}


def summarise_runs(runs: list[dict], protocol, test_ds: ImageDataset, test_size: int, train_labels: torch.Tensor,
                   num_classes: int, t0: float, threads: int | None, **extra) -> dict:
    """The result of an evaluation: :func:`run_statistics`, the runs, the protocol, the test split and the
    training set's class counts; ``extra`` fields are added (e.g. the teacher)."""
    return {
        **run_statistics(runs),
        "seconds_total": time.perf_counter() - t0,
        "runs": runs,
        "protocol": dataclasses.asdict(protocol),
        "dataset": test_ds.name,
        "test_split": test_ds.split,
        "test_size": test_size,
        "train_size": int(train_labels.shape[0]),
        "train_class_counts": np.bincount(train_labels.numpy(), minlength=num_classes).tolist(),
        **extra,
        "torch_version": torch.__version__,
        "num_threads": threads,
    }


def format_result(result: dict) -> str:
    """One line: ``final 84.1 ± 0.3 | best 84.9 ± 0.2 (5 runs, 1000 epochs)``."""
    return (f"final {result['final_mean']:.1f} ± {result['final_std']:.1f} | "
            f"best {result['best_mean']:.1f} ± {result['best_std']:.1f} "
            f"({result['num_runs']} runs, {result['protocol']['epochs']} epochs)")
