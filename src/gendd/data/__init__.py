"""Datasets: the :class:`ImageDataset` interface and the loaders behind ``--dataset``."""

from __future__ import annotations

from pathlib import Path

from gendd.data.base import ImageDataset, to_float, to_uint8
from gendd.data.fashion_mnist import load_fashion_mnist
from gendd.data.imagefolder import load_image_dir, load_imagefolder
from gendd.errors import ConfigError
from gendd.registry import Registry

__all__ = [
    "DATASETS", "DATASET_NAMES", "ImageDataset", "get_dataset", "load_fashion_mnist", "load_image_dir",
    "load_imagefolder", "to_float", "to_uint8",
]


def _fashion_mnist(split: str, root, image_size) -> ImageDataset:
    if image_size not in (None, 28):
        raise ConfigError(f"fashion-mnist images are 28x28, got --image-size {image_size}; "
                          "drop --image-size or pass 28")
    return load_fashion_mnist(split, root)


def _folder(subset: str | None):
    def open_(split: str, root, image_size) -> ImageDataset:
        if root is None:
            raise ConfigError(f"dataset {subset or 'imagefolder'} needs its image folder: pass --data-root "
                              "(a folder with train/<class>/ and val/<class>/)")
        return load_imagefolder(root, split, subset=subset, image_size=image_size)

    return open_


_BUILTIN = {"fashion-mnist": _fashion_mnist, "imagefolder": _folder(None),
            **{name: _folder(name) for name in ("imagenette", "imagewoof", "imageidc", "imagenet-100")}}

#: dataset name -> ``open(split, root, image_size) -> ImageDataset`` (:class:`gendd.registry.Registry`).
DATASETS: Registry = Registry("dataset", lambda: _BUILTIN)

#: The built-in dataset names, embedded data first.
DATASET_NAMES: tuple[str, ...] = tuple(_BUILTIN)


def get_dataset(name: str, split: str = "train", root: str | Path | None = None,
                image_size: int | None = None) -> ImageDataset:
    """Open dataset ``name`` (one of :data:`DATASET_NAMES`) for ``split``.

    ``fashion-mnist`` reads the Debian package's files unless ``root`` is given (28x28 only);
    the ImageNet-style names need ``root`` (a folder with ``train/`` and ``val/``).
    """
    return DATASETS.get(name)(split, root, image_size)
