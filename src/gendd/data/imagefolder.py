"""ImageNet-style image folders (``root/{train,val}/<class>/*``) and exported distilled sets.

Subset class lists live in ``gendd/data/subsets/*.txt`` (one WNID a line; see the README there).
For a subset, local label ``i`` is the WNID on line ``i`` of its list: the 10-class lists
(imagenette, imagewoof, imageidc) are stored sorted, so their local labels follow the sorted WNID
order (the order ``torchvision``'s ImageFolder would give); imagenet-100 keeps IDC's file order
(``class100.txt``), so that the usual 20-class chunks (``phase``) match the published ones.
``model_labels`` are ImageNet-1K indices, i.e. line indices in ``imagenet1k.txt`` (the labels
DiT-XL/2 is conditioned on).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from gendd.data.base import ImageDataset
from gendd.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
SUBSET_FILES = {
    "imagenette": "imagenette.txt",
    "imagewoof": "imagewoof.txt",
    "imageidc": "imageidc.txt",
    "imagenet-100": "imagenet100.txt",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SUBSETS_DIR = Path(__file__).resolve().parent / "subsets"
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_wnid_list(name: str) -> list[str]:
    """The WNIDs of a shipped class list: ``"imagenet1k"`` or a key of :data:`SUBSET_FILES`."""
    filename = "imagenet1k.txt" if name == "imagenet1k" else SUBSET_FILES.get(name)
    if filename is None:
        known = ", ".join(["imagenet1k", *SUBSET_FILES])
        raise ConfigError(f"unknown class list {name!r}; known: {known}")
    path = _SUBSETS_DIR / filename
    try:
        lines = path.read_text().splitlines()
    except OSError:
        raise DataError(f"class list {path} is missing; reinstall gendd") from None
    return [line.strip() for line in lines if line.strip()]


def imagenet_index() -> dict[str, int]:
    """WNID -> ImageNet-1K class index (line index in ``imagenet1k.txt``)."""
    return {wnid: i for i, wnid in enumerate(read_wnid_list("imagenet1k"))}


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """Square center crop following guided-diffusion's ADM preprocessing (``center_crop_arr``).

    Halves the image with BOX filtering while its short side is at least ``2 * image_size``,
    resizes with BICUBIC so the short side equals ``image_size``, then crops the center square.
    Returns an ``(image_size, image_size[, C])`` uint8 array.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size),
                         resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def _read_image(path: Path | bytes, mode: str, image_size: int | None,
                name: str) -> np.ndarray:
    """Decode one image to an ``(H, W, C)`` uint8 array, cropped when ``image_size`` is set."""
    try:
        source = io.BytesIO(path) if isinstance(path, bytes) else path
        with Image.open(source) as img:
            img = img.convert(mode)
            arr = center_crop_arr(img, image_size) if image_size else np.asarray(img)
    except _READ_ERRORS as err:
        raise DataError(f"cannot read image {name} ({type(err).__name__}: {err}); "
                        "replace or delete the file") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _to_tensor(arrays: list[np.ndarray], channels: int, size: int) -> torch.Tensor:
    """Stack ``(H, W, C)`` uint8 arrays into a ``(n, C, H, W)`` tensor."""
    if not arrays:
        return torch.empty((0, channels, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (by extension, case-insensitive)."""
    return [p for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]


def _image_size_of(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header; DataError naming the file if unreadable."""
    try:
        with Image.open(path) as img:
            return img.size
    except _READ_ERRORS as err:
        raise DataError(f"cannot read image {path} ({type(err).__name__}: {err}); "
                        "replace or delete the file") from None


def _common_size(paths: list[Path]) -> int:
    """The side of the square size shared by ``paths``; DataError otherwise."""
    first_with_size: dict[tuple[int, int], Path] = {}
    for p in paths:
        first_with_size.setdefault(_image_size_of(p), p)
    if len(first_with_size) > 1:
        examples = ", ".join(f"{p} is {w}x{h}" for (w, h), p in list(first_with_size.items())[:2])
        raise DataError(f"images have different sizes ({examples}); pass --image-size to "
                        "center-crop and resize them")
    width, height = next(iter(first_with_size))
    if width != height:
        raise DataError(f"images are {width}x{height}, not square ({paths[0]}); pass "
                        "--image-size to center-crop them")
    return width


def _split_dir(root: Path, split: str) -> Path:
    if split == "train":
        candidates = [root / "train"]
    elif split == "test":
        candidates = [root / "test", root / "val"]
    else:
        raise ConfigError(f"unknown split {split!r}; use 'train' or 'test'")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    wanted = " or ".join(str(c) for c in candidates)
    raise DataError(f"split folder {wanted} does not exist; expected the layout "
                    "ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg")


def load_imagefolder(root: str | Path, split: str = "train", subset: str | None = None,
                     image_size: int | None = None, channels: int = 3,
                     name: str | None = None) -> ImageDataset:
    """Index an ImageNet-style folder ``root/{train,val}/<class>/*.{png,jpg,...}``.

    Split ``"test"`` reads ``root/test``, or ``root/val`` when there is no ``test`` folder.
    ``subset`` (imagenette, imagewoof, imageidc, imagenet-100) keeps only that list's WNID
    folders, labelled in list order; without it every class folder is used, sorted by name.
    Images are decoded lazily by the dataset's ``loader`` (RGB for ``channels=3``, L for 1),
    center-cropped ADM-style to ``image_size`` when given; otherwise all images must share one
    square size.
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image size must be positive, got {image_size}")
    if subset is not None and subset not in SUBSET_FILES:
        raise ConfigError(f"unknown subset {subset!r}; known: {', '.join(SUBSET_FILES)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; pass --data-root pointing to "
                        "a folder with train/ and val/ class folders")
    split_dir = _split_dir(root, split)
    folders = sorted(p.name for p in split_dir.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/*.jpg")

    index = imagenet_index()
    if subset is not None:
        classes = read_wnid_list(subset)
        present = set(folders)
        missing = [c for c in classes if c not in present]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(f"{split_dir} lacks {len(missing)} of the {len(classes)} {subset} "
                            f"class folders ({shown}); point --data-root at an ImageNet-style "
                            "folder holding them")
        model_labels = [index[c] for c in classes]
    else:
        classes = folders
        model_labels = ([index[c] for c in classes] if all(c in index for c in classes)
                        else list(range(len(classes))))

    files: list[Path] = []
    labels: list[int] = []
    first_files: list[Path] = []
    for c, cls in enumerate(classes):
        class_files = sorted(_image_files(split_dir / cls), key=lambda p: p.name)
        if not class_files:
            raise DataError(f"class folder {split_dir / cls} has no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove it")
        first_files.append(class_files[0])
        files.extend(class_files)
        labels.extend([c] * len(class_files))

    size = image_size if image_size is not None else _common_size(first_files)
    mode = "RGB" if channels == 3 else "L"

    def loader(indices: Sequence[int]) -> torch.Tensor:
        arrays = []
        for i in indices:
            path = files[i]
            arr = _read_image(path, mode, image_size, str(path))
            if arr.shape[:2] != (size, size):
                raise DataError(f"image {path} is {arr.shape[1]}x{arr.shape[0]}, expected "
                                f"{size}x{size}; pass --image-size to center-crop and resize")
            arrays.append(arr)
        return _to_tensor(arrays, channels, size)

    fingerprint = [f"subset={subset}", f"image_size={image_size}"]
    fingerprint += [f"{p.relative_to(split_dir).as_posix()}:{p.stat().st_size}" for p in files]
    return ImageDataset(
        name=name or subset or "imagefolder",
        split=split,
        classes=list(classes),
        labels=np.asarray(labels, dtype=np.int64),
        channels=channels,
        image_size=size,
        loader=loader,
        model_labels=model_labels,
        mean=IMAGENET_MEAN if channels == 3 else (0.5,),
        std=IMAGENET_STD if channels == 3 else (0.5,),
        fingerprint_parts=fingerprint,
        root=str(root.resolve()),
    )


def _numeric_or_lexicographic(paths: list[Path]) -> list[Path]:
    """Sort by integer stem (0, 1, 2, ..., 10) when every stem is an integer, else by name."""
    if all(p.stem.isdigit() for p in paths):
        return sorted(paths, key=lambda p: (int(p.stem), p.name))
    return sorted(paths, key=lambda p: p.name)


def load_image_dir(path: str | Path, classes: list[str], channels: int,
                   image_size: int | None = None, *, name: str = "image-dir",
                   mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None) -> ImageDataset:
    """Load a flat ``path/<class>/*.png`` folder (gendd's export format) into memory.

    ``classes`` fixes the label order (take it from the real dataset); other entries such as
    ``manifest.json`` or ``latents/`` are ignored. Files are ordered numerically by stem when all
    stems are integers. With ``image_size`` set, images not of that size are center-cropped
    ADM-style; otherwise all images must share one square size. ``mean``/``std`` default to 0.5.
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    if not classes:
        raise ConfigError("load_image_dir needs the class list of the real dataset")
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist; check the path of the distilled set")
    mode = "RGB" if channels == 3 else "L"
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    fingerprint: list[str] = []
    for c, cls in enumerate(classes):
        folder = path / cls
        if not folder.is_dir():
            raise DataError(f"{path} has no folder for class {cls!r}; expected "
                            f"{folder}/<i>.png for every class of the real dataset")
        class_files = _numeric_or_lexicographic(_image_files(folder))
        if not class_files:
            raise DataError(f"class folder {folder} has no images; regenerate the distilled set")
        for file in class_files:
            try:
                raw = file.read_bytes()
            except OSError as err:
                raise DataError(f"cannot read image {file} ({err}); check permissions") from None
            arr = _read_image(raw, mode, image_size, str(file))
            arrays.append(arr)
            labels.append(c)
            fingerprint.append(f"{cls}/{file.name}:{hashlib.sha256(raw).hexdigest()}")

    shapes = {a.shape[:2] for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images in {path} have different sizes {sorted(shapes)[:2]}; pass "
                        "--image-size to center-crop and resize them")
    height, width = next(iter(shapes))
    if height != width:
        raise DataError(f"images in {path} are {width}x{height}, not square; pass --image-size")
    images = _to_tensor(arrays, channels, height)

    def loader(indices: Sequence[int]) -> torch.Tensor:
        return images[torch.as_tensor(list(indices), dtype=torch.long)]

    default_stats = (0.5,) * channels
    return ImageDataset(
        name=name,
        split="train",
        classes=list(classes),
        labels=np.asarray(labels, dtype=np.int64),
        channels=channels,
        image_size=height,
        loader=loader,
        mean=mean or default_stats,
        std=std or default_stats,
        fingerprint_parts=[f"image_size={image_size}", *fingerprint],
    )
