"""Datasets: the :class:`ImageDataset` interface and the loaders behind ``--dataset``."""

from __future__ import annotations

from pathlib import Path

from gendd.data.base import ImageDataset, to_float, to_uint8
from gendd.data.fashion_mnist import load_fashion_mnist
from gendd.data.imagefolder import load_image_dir, load_imagefolder
from gendd.errors import ConfigError

DATASET_NAMES: tuple[str, ...] = (
    "fashion-mnist", "imagefolder", "imagenette", "imagewoof", "imageidc", "imagenet-100",
)
_SUBSETS = ("imagenette", "imagewoof", "imageidc", "imagenet-100")

__all__ = [
    "DATASET_NAMES", "ImageDataset", "get_dataset", "load_fashion_mnist", "load_image_dir",
    "load_imagefolder", "to_float", "to_uint8",
]


def get_dataset(name: str, split: str = "train", root: str | Path | None = None,
                image_size: int | None = None) -> ImageDataset:
    """Open dataset ``name`` (one of :data:`DATASET_NAMES`) for ``split``.

    ``fashion-mnist`` reads the Debian package's files unless ``root`` is given (28x28 only);
    the ImageNet-style names need ``root`` (a folder with ``train/`` and ``val/``).
    """
    if name not in DATASET_NAMES:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    if name == "fashion-mnist":
        if image_size not in (None, 28):
            raise ConfigError(f"fashion-mnist images are 28x28, got --image-size {image_size}; "
                              "drop --image-size or pass 28")
        return load_fashion_mnist(split, root)
    if root is None:
        raise ConfigError(f"dataset {name} needs its image folder: pass --data-root "
                          "(a folder with train/<class>/ and val/<class>/)")
    subset = name if name in _SUBSETS else None
    return load_imagefolder(root, split, subset=subset, image_size=image_size)
