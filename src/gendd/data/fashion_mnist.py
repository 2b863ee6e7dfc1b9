"""Fashion-MNIST from the gzip IDX files of the Debian package ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gendd.data.base import ImageDataset
from gendd.errors import ConfigError, DataError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV_VAR = "GENDD_FASHION_MNIST_ROOT"

CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
MEAN = (0.2861,)
STD = (0.3530,)

_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x0803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x0801  # unsigned byte, 1 dimension
_HINT = "install the Debian package dataset-fashion-mnist or pass --data-root"


def default_root() -> Path:
    """``$GENDD_FASHION_MNIST_ROOT`` if set, else the Debian package's folder."""
    env = os.environ.get(ROOT_ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def _find_file(root: Path, stem: str) -> Path:
    """``root/stem.gz``, or the uncompressed ``root/stem``; DataError if neither exists."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST file {stem}.gz not found in {root}; {_HINT}")


def read_idx(path: str | Path, expected_magic: int) -> tuple[np.ndarray, str]:
    """Parse one IDX file (gzip or raw) of unsigned bytes.

    Returns the array, shaped by the header's dimensions, and the sha256 of the decompressed
    IDX bytes (gzip headers carry a timestamp, so the same content may be stored differently).
    Raises DataError when the file is unreadable, not gzip, has a wrong magic number, or its
    payload does not match the header's dimensions.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}; {_HINT}") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path} is not a valid gzip file ({err}); the file is corrupt or "
                            f"truncated: reinstall it ({_HINT})") from None
    else:
        data = raw
    if len(data) < 4:
        raise DataError(f"{path} is truncated (no IDX header); reinstall it ({_HINT})")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise DataError(f"{path} has IDX magic number 0x{magic:08x}, expected "
                        f"0x{expected_magic:08x}; the file is corrupt or not the right IDX file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (incomplete IDX header); reinstall it ({_HINT})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != count:
        raise DataError(f"{path} holds {len(data) - header} data bytes, its IDX header "
                        f"{tuple(dims)} needs {count}; the file is corrupt or truncated")
    array = np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims)
    return array, hashlib.sha256(data).hexdigest()


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> ImageDataset:
    """Load the Fashion-MNIST ``"train"`` (60k) or ``"test"`` (10k) split into memory.

    Images are a uint8 tensor ``(N, 1, 28, 28)``; the dataset's ``loader`` indexes into it.
    ``root`` defaults to :func:`default_root`.
    """
    if split not in _PREFIX:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {root} does not exist; {_HINT}")
    prefix = _PREFIX[split]
    images_path = _find_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_file(root, f"{prefix}-labels-idx1-ubyte")
    images, images_sha = read_idx(images_path, _IMAGES_MAGIC)
    labels, labels_sha = read_idx(labels_path, _LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path} holds images of size {images.shape[1:]}, expected "
                        "(28, 28); it is not a Fashion-MNIST file")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} has {images.shape[0]} images but {labels_path} has "
                        f"{labels.shape[0]} labels; reinstall the files ({_HINT})")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DataError(f"{labels_path} has label {int(labels.max())}, expected 0..9; "
                        "the file is corrupt or not a Fashion-MNIST file")
    tensor = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8

    def loader(indices: Sequence[int]) -> torch.Tensor:
        return tensor[torch.as_tensor(list(indices), dtype=torch.long)]

    return ImageDataset(
        name="fashion-mnist",
        split=split,
        classes=list(CLASSES),
        labels=labels.astype(np.int64),
        channels=1,
        image_size=28,
        loader=loader,
        mean=MEAN,
        std=STD,
        fingerprint_parts=[f"images-sha256={images_sha}", f"labels-sha256={labels_sha}"],
        root=str(root.resolve()),
    )
