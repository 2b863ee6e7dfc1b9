"""The dataset interface every pipeline stage reads.

A dataset is a labelled set of images with a fixed resolution and channel count. Images are
returned as ``uint8`` tensors of shape ``(n, channels, image_size, image_size)``; stages that
need floats call :func:`to_float` (range [-1, 1]) themselves, so memory stays at one byte per
pixel whatever the dataset size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from gendd.errors import DataError


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


@dataclass
class ImageDataset:
    """A labelled image dataset, split already chosen.

    Attributes:
        name: dataset identifier, e.g. ``"fashion-mnist"`` or ``"imagenette"``.
        split: ``"train"`` or ``"test"``.
        classes: class names, index = local label (0..num_classes-1).
        labels: int64 array of local labels, one per item.
        channels, image_size: image geometry (square images).
        model_labels: per local class, the label a class-conditional backbone is conditioned on
            (the original ImageNet-1K index for ImageNet subsets; the local label otherwise).
        mean, std: per-channel normalisation statistics of the [0, 1] images, for students.
        loader: ``loader(indices) -> uint8 tensor (n, C, H, W)``.
        fingerprint_parts: strings that identify the content (file list, sizes, hashes); the
            cache key is derived from them.
        root: absolute path of the folder the data was read from (None when not from a folder);
            recorded in a distilled set's manifest, so evaluation finds the test split there.
    """

    name: str
    split: str
    classes: list[str]
    labels: np.ndarray
    channels: int
    image_size: int
    loader: Callable[[Sequence[int]], torch.Tensor]
    model_labels: list[int] = field(default_factory=list)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    fingerprint_parts: list[str] = field(default_factory=list)
    root: str | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not self.model_labels:
            self.model_labels = list(range(len(self.classes)))
        for c, name in enumerate(self.classes):
            if not np.any(self.labels == c):
                raise DataError(f"class {name!r} of {self.name}/{self.split} has no images; "
                                "remove the class or add images to it")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_indices(self, c: int) -> np.ndarray:
        """Indices of the items of local class ``c``, in dataset order."""
        return np.flatnonzero(self.labels == c)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 images ``(n, C, H, W)`` for the given item indices."""
        return self.loader(list(indices))

    def load_class(self, c: int) -> torch.Tensor:
        return self.load(self.class_indices(c))

    def fingerprint(self) -> str:
        """Short content hash: same files/bytes -> same fingerprint."""
        h = hashlib.sha256()
        for part in [self.name, self.split, str(self.channels), str(self.image_size),
                     *self.classes, *self.fingerprint_parts]:
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]
