"""Data the evaluation loops share: distilled and test images as tensors, test accuracy, run statistics.

Images are normalised as in the reference DC/DSA code: ``(x / 255 - mean) / std`` per channel with the real
dataset's statistics (the test dataset's ``mean``/``std``), for training and test images alike.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from gendd.data.base import ImageDataset
from gendd.errors import DataError
from gendd.evaluate.imagenet_aug import resize_center_crop
from gendd.evaluate.protocols import IMAGENET_SIZE, train_image_size
from gendd.hardware import autocast, precision_label

TestData = tuple[torch.Tensor, torch.Tensor]
TestU8 = tuple[torch.Tensor, torch.Tensor]


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


def train_arrays(train_ds: ImageDataset, test_ds: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Distilled set as normalised floats (test statistics) and labels in test-class order."""
    if (train_ds.channels, train_ds.image_size) != (test_ds.channels, test_ds.image_size):
        raise DataError(f"distilled images are {train_ds.channels}x{train_ds.image_size}px but "
                        f"the test split is {test_ds.channels}x{test_ds.image_size}px; "
                        "resize the distilled set to the test resolution")
    images = normalize(train_ds.load(list(range(len(train_ds)))), test_ds.mean, test_ds.std)
    return images, labels_in_test_order(train_ds, test_ds)


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


def load_distilled(train_ds: ImageDataset, test_ds: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The distilled set as uint8 ``(n, C, S, S)`` (its own resolution) and labels in test-class
    order. The channel count must match the test split; the size may differ (resized per batch)."""
    if train_ds.channels != test_ds.channels:
        raise DataError(f"distilled images have {train_ds.channels} channel(s) but the test split has "
                        f"{test_ds.channels}")
    images = train_ds.load(list(range(len(train_ds))))
    return images, labels_in_test_order(train_ds, test_ds)


def eval_transform(protocol, test_side: int) -> tuple[int, int, str]:
    """``(resize_to, crop, description)`` of the test images for this protocol and test side."""
    size = train_image_size(protocol, test_side)
    imagenet = test_side >= IMAGENET_SIZE or protocol.image_size is not None
    if not imagenet and size == test_side:
        return test_side, test_side, f"none ({test_side} px as stored)"
    resize_to = size // 7 * 8 if protocol.test_upscale else size
    return resize_to, size, f"Resize({resize_to}) + CenterCrop({size}) of {test_side} px images"


def prepare_test_u8(test_ds: ImageDataset, protocol,
                    chunk: int = 1024) -> TestU8:
    """Test images after the protocol's test transform, uint8, and their labels."""
    idx = (np.arange(len(test_ds)) if protocol.test_limit is None
           else balanced_indices(test_ds.labels, protocol.test_limit, test_ds.num_classes))
    resize_to, crop, _ = eval_transform(protocol, test_ds.image_size)
    x = torch.empty((len(idx), test_ds.channels, crop, crop), dtype=torch.uint8)
    for a in range(0, len(idx), chunk):
        part = test_ds.load(idx[a:a + chunk].tolist())
        x[a:a + len(part)] = resize_center_crop(part, resize_to, crop)
    return x, torch.from_numpy(test_ds.labels[idx].copy())


def norm_consts(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


def accuracy_u8(net: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float],
                std: Sequence[float], batch_size: int = 100, precision: str = "fp32") -> float:
    """Top-1 accuracy (percent) on uint8 images normalised per batch (eval mode), at a resolved
    ``precision`` (:mod:`gendd.hardware`)."""
    m, s = norm_consts(mean, std)
    was_training = net.training
    net.eval()
    correct = 0
    with torch.inference_mode(), autocast(precision):
        for a in range(0, x.shape[0], batch_size):
            xb = (x[a:a + batch_size].float() / 255.0 - m) / s
            correct += int((net(xb).argmax(1) == y[a:a + batch_size]).sum())
    net.train(was_training)
    return 100.0 * correct / max(1, x.shape[0])


def ipc_of(labels: torch.Tensor, num_classes: int) -> int:
    return int(np.bincount(labels.numpy(), minlength=num_classes).max())


def check_inputs(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise DataError(f"train images must be (n, C, S, S), got {tuple(images.shape)}")
    n = images.shape[0]
    if n == 0 or labels.shape != (n,):
        raise DataError(f"need a non-empty image set with one label per image, got {n} images and "
                        f"labels of shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DataError(f"train labels must lie in [0, {num_classes}), got "
                        f"[{int(labels.min())}, {int(labels.max())}]")
