"""Dataset loaders: Fashion-MNIST IDX parsing, image folders, exported sets, class lists."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gendd.data import DATASET_NAMES, ImageDataset, get_dataset
from gendd.data.fashion_mnist import CLASSES, load_fashion_mnist, read_idx
from gendd.data.imagefolder import (SUBSET_FILES, center_crop_arr, load_image_dir,
                                    load_imagefolder, read_wnid_list)
from gendd.errors import ConfigError, DataError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
SUBSETS_DIR = Path(__file__).resolve().parents[1] / "src" / "gendd" / "data" / "subsets"


# ----------------------------------------------------------------------------- class lists

def _lines(name: str) -> list[str]:
    return (SUBSETS_DIR / name).read_text().split()


def test_imagenet1k_list_is_1000_sorted_unique_wnids():
    wnids = _lines("imagenet1k.txt")
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert wnids == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids[0] == "n01440764" and wnids[207] == "n02099601" and wnids[999] == "n15075141"


def test_imagenet1k_names_follow_the_wnid_list():
    rows = [line.split("\t") for line in (SUBSETS_DIR / "imagenet1k_names.txt").read_text().splitlines()]
    assert [r[0] for r in rows] == _lines("imagenet1k.txt") and all(len(r) == 2 and r[1].strip() for r in rows)
    assert rows[0][1] == "tench, Tinca tinca" and rows[207][1] == "golden retriever"


@pytest.mark.parametrize("name,count,is_sorted", [
    ("imagenette", 10, True), ("imagewoof", 10, True), ("imageidc", 10, True),
    ("imagenet-100", 100, False),
])
def test_subset_lists(name, count, is_sorted):
    all_wnids = set(_lines("imagenet1k.txt"))
    wnids = read_wnid_list(name)
    assert wnids == _lines(SUBSET_FILES[name])
    assert len(wnids) == count and len(set(wnids)) == count
    assert set(wnids) <= all_wnids
    assert (wnids == sorted(wnids)) == is_sorted


def test_imageidc_is_first_ten_of_imagenet100_sorted():
    assert read_wnid_list("imageidc") == sorted(read_wnid_list("imagenet-100")[:10])
    assert read_wnid_list("imagenet-100")[0] == "n02869837"


def test_unknown_class_list():
    with pytest.raises(ConfigError, match="unknown class list 'imagenet-21k'"):
        read_wnid_list("imagenet-21k")


# ----------------------------------------------------------------------------- Fashion-MNIST

def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fake_fmnist(root: Path, prefix: str, n: int, seed: int = 0,
                       mtime: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x803), mtime=mtime))
    (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels, 0x801), mtime=mtime))
    return images, labels


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    train = load_fashion_mnist("train", DEBIAN_FMNIST)
    test = load_fashion_mnist("test", DEBIAN_FMNIST)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.classes == CLASSES and train.num_classes == 10
    assert (train.channels, train.image_size) == (1, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.labels.min() == 0 and train.labels.max() == 9
    batch = train.load([0, 59999, 5])
    assert batch.shape == (3, 1, 28, 28) and batch.dtype == torch.uint8
    assert train.load_class(3).shape == (6000, 1, 28, 28)
    assert abs(train.load(range(0, 60000, 7)).float().mean().item() / 255 - train.mean[0]) < 0.01
    assert train.fingerprint() != test.fingerprint()


def test_fashion_mnist_default_root_env(tmp_path, monkeypatch):
    images, labels = _write_fake_fmnist(tmp_path, "t10k", 20)
    monkeypatch.setenv("GENDD_FASHION_MNIST_ROOT", str(tmp_path))
    ds = get_dataset("fashion-mnist", "test")
    assert isinstance(ds, ImageDataset) and len(ds) == 20 and ds.name == "fashion-mnist"
    assert np.array_equal(ds.labels, labels)
    assert torch.equal(ds.load([3, 1])[:, 0], torch.from_numpy(images[[3, 1]]))
    assert ds.mean == (0.2861,) and ds.std == (0.3530,)


def test_fashion_mnist_fingerprint_tracks_content(tmp_path):
    # gzip stamps its header with a time: same content written at different times
    _write_fake_fmnist(tmp_path / "a", "train", 20, seed=0, mtime=1)
    _write_fake_fmnist(tmp_path / "b", "train", 20, seed=0, mtime=2)
    _write_fake_fmnist(tmp_path / "c", "train", 20, seed=1, mtime=1)
    assert (tmp_path / "a/train-images-idx3-ubyte.gz").read_bytes() != \
        (tmp_path / "b/train-images-idx3-ubyte.gz").read_bytes()
    fa, fb, fc = (load_fashion_mnist("train", tmp_path / x).fingerprint() for x in "abc")
    assert fa == fb != fc


def test_fashion_mnist_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError,
                       match="does not exist.*dataset-fashion-mnist or pass --data-root"):
        load_fashion_mnist("train", tmp_path / "nowhere")
    _write_fake_fmnist(tmp_path, "t10k", 10)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz not found"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(ConfigError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist("val", tmp_path)


def test_idx_wrong_magic(tmp_path):
    _write_fake_fmnist(tmp_path, "train", 10)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    # An images file where a labels file is expected.
    labels.write_bytes((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match="magic number 0x00000803, expected 0x00000801"):
        load_fashion_mnist("train", tmp_path)


def test_idx_truncated_payload(tmp_path):
    _write_fake_fmnist(tmp_path, "train", 10)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_fashion_mnist("train", tmp_path)


def test_idx_truncated_gzip(tmp_path):
    _write_fake_fmnist(tmp_path, "train", 10)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="not a valid gzip file"):
        load_fashion_mnist("train", tmp_path)


def test_idx_not_gzip_and_short_header(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_idx(bad, 0x801)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(struct.pack(">I", 0x803) + b"\0\0"))
    with pytest.raises(DataError, match="incomplete IDX header"):
        read_idx(short, 0x803)


def test_idx_label_mismatch_and_range(tmp_path):
    _write_fake_fmnist(tmp_path, "train", 10)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(_idx_bytes(np.zeros(9, np.uint8), 0x801)))
    with pytest.raises(DataError, match="10 images but .* 9 labels"):
        load_fashion_mnist("train", tmp_path)
    labels.write_bytes(gzip.compress(_idx_bytes(np.full(10, 12, np.uint8), 0x801)))
    with pytest.raises(DataError, match="label 12, expected 0..9"):
        load_fashion_mnist("train", tmp_path)


# ----------------------------------------------------------------------------- image folders

def _save(path: Path, size: tuple[int, int] = (16, 16), value: int = 0, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _make_folder(root: Path, classes: list[str], per_class: int = 2, splits=("train", "val"),
                 size: tuple[int, int] = (16, 16), ext: str = "png") -> None:
    for split in splits:
        for c, cls in enumerate(classes):
            for i in range(per_class):
                _save(root / split / cls / f"img{i}.{ext}", size, value=10 * c + i)


def test_imagefolder_plain_layout(tmp_path):
    _make_folder(tmp_path, ["cat", "dog", "ant"], per_class=3)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored")
    ds = load_imagefolder(tmp_path)
    assert ds.classes == ["ant", "cat", "dog"] and ds.name == "imagefolder"
    assert ds.model_labels == [0, 1, 2]  # not WNIDs: local labels
    assert len(ds) == 9 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert (ds.channels, ds.image_size) == (3, 16)
    batch = ds.load([0, 8])
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.uint8
    expected = np.asarray(Image.open(tmp_path / "train" / "dog" / "img2.png"))
    assert np.array_equal(batch[1].permute(1, 2, 0).numpy(), expected)
    gray = load_imagefolder(tmp_path, channels=1)
    assert gray.load([0]).shape == (1, 1, 16, 16)
    test = load_imagefolder(tmp_path, "test")  # no test/ -> val/
    assert len(test) == 9 and test.split == "test"


def test_imagefolder_prefers_test_folder(tmp_path):
    _make_folder(tmp_path, ["a", "b"], splits=("train", "val"))
    _make_folder(tmp_path, ["a", "b"], per_class=1, splits=("test",))
    assert len(load_imagefolder(tmp_path, "test")) == 2


def test_imagefolder_jpeg_extensions(tmp_path):
    _make_folder(tmp_path, ["a"], ext="JPEG", splits=("train",))
    _save(tmp_path / "train" / "a" / "x.jpg")
    assert len(load_imagefolder(tmp_path)) == 3


def test_imagefolder_subset_labels(tmp_path):
    nette = read_wnid_list("imagenette")
    imagenet = _lines("imagenet1k.txt")
    extra = "n01443537"  # goldfish: not in Imagenette, must be ignored
    _make_folder(tmp_path, list(reversed(nette)) + [extra], per_class=1)
    ds = get_dataset("imagenette", "train", root=tmp_path)
    assert ds.name == "imagenette" and ds.classes == nette
    assert ds.model_labels == [imagenet.index(w) for w in nette]
    assert ds.model_labels[0] == 0  # n01440764 tench
    assert len(ds) == 10
    # Without a subset every folder counts; all are WNIDs so model labels are ImageNet indices.
    full = load_imagefolder(tmp_path)
    assert full.classes == sorted(nette + [extra])
    assert full.model_labels == [imagenet.index(w) for w in full.classes]


def test_imagefolder_imagenet100_file_order(tmp_path):
    in100 = read_wnid_list("imagenet-100")
    _make_folder(tmp_path, in100, per_class=1, splits=("train",), size=(8, 8))
    ds = get_dataset("imagenet-100", root=tmp_path)
    assert ds.classes == in100 and ds.num_classes == 100
    assert ds.model_labels[0] == _lines("imagenet1k.txt").index("n02869837")


def test_imagefolder_subset_missing_wnid(tmp_path):
    woof = read_wnid_list("imagewoof")
    _make_folder(tmp_path, woof[:8], per_class=1)
    with pytest.raises(DataError, match=f"lacks 2 of the 10 imagewoof class folders \\({woof[8]}"):
        load_imagefolder(tmp_path, subset="imagewoof")
    with pytest.raises(ConfigError, match="unknown subset 'woof'"):
        load_imagefolder(tmp_path, subset="woof")


def test_imagefolder_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass --data-root"):
        load_imagefolder(tmp_path / "nope")
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=r"split folder .*train does not exist"):
        load_imagefolder(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        load_imagefolder(tmp_path)
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        load_imagefolder(tmp_path, "dev")


def test_imagefolder_empty_class(tmp_path):
    _make_folder(tmp_path, ["a", "b"], splits=("train",))
    (tmp_path / "train" / "empty_cls").mkdir()
    (tmp_path / "train" / "empty_cls" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"class folder .*empty_cls has no images"):
        load_imagefolder(tmp_path)


def test_imagefolder_corrupt_image(tmp_path):
    _make_folder(tmp_path, ["a", "b"], splits=("train",))
    (tmp_path / "train" / "b" / "img1.png").write_bytes(b"\x89PNG garbage, not an image")
    ds = load_imagefolder(tmp_path)  # first image of each class is fine
    assert ds.load([0, 1, 2]).shape == (3, 3, 16, 16)
    with pytest.raises(DataError, match=r"cannot read image .*b/img1\.png"):
        ds.load([3])
    # Corrupt first image: caught while checking the common size.
    (tmp_path / "train" / "a" / "img0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read image .*a/img0\.png"):
        load_imagefolder(tmp_path)


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    _save(tmp_path / "train" / "a" / "0.png", (16, 16))
    _save(tmp_path / "train" / "b" / "0.png", (20, 20))
    with pytest.raises(DataError, match="different sizes.*pass --image-size"):
        load_imagefolder(tmp_path)
    ds = load_imagefolder(tmp_path, image_size=8)
    assert ds.image_size == 8 and ds.load([0, 1]).shape == (2, 3, 8, 8)
    # A later, differently sized image in a class is caught when loaded.
    _save(tmp_path / "train" / "b" / "1.png", (16, 16))
    _save(tmp_path / "train" / "b" / "0.png", (16, 16))
    _save(tmp_path / "train" / "b" / "2.png", (12, 12))
    ds = load_imagefolder(tmp_path)
    with pytest.raises(DataError, match=r"b/2\.png is 12x12, expected 16x16"):
        ds.load([3])


def test_imagefolder_non_square_needs_image_size(tmp_path):
    _save(tmp_path / "train" / "a" / "0.png", (20, 10))
    with pytest.raises(DataError, match="not square.*--image-size"):
        load_imagefolder(tmp_path)
    ds = load_imagefolder(tmp_path, image_size=6)
    assert ds.load([0]).shape == (1, 3, 6, 6)


def test_imagefolder_fingerprint(tmp_path):
    _make_folder(tmp_path, ["a", "b"], splits=("train",))
    base = load_imagefolder(tmp_path).fingerprint()
    assert load_imagefolder(tmp_path).fingerprint() == base
    assert load_imagefolder(tmp_path, image_size=8).fingerprint() != base
    _save(tmp_path / "train" / "b" / "img9.png")
    assert load_imagefolder(tmp_path).fingerprint() != base


def test_center_crop_matches_adm_recipe():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 700, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # Hand-run of the recipe: 700x300 -> BOX halve twice (175x75) -> BICUBIC 149x64 -> crop.
    ref = img.resize((350, 150), Image.Resampling.BOX).resize((175, 75), Image.Resampling.BOX)
    ref = np.asarray(ref.resize((round(175 * 64 / 75), 64), Image.Resampling.BICUBIC))
    left = (ref.shape[1] - 64) // 2
    assert np.array_equal(out, ref[:, left:left + 64])
    square = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")
    assert np.array_equal(center_crop_arr(square, 32), np.asarray(square))
    assert center_crop_arr(Image.new("RGB", (10, 30)), 16).shape == (16, 16, 3)  # upscales


# ----------------------------------------------------------------------------- exported sets

def test_load_image_dir_order_and_extras(tmp_path):
    classes = ["b_cls", "a_cls"]
    for c, cls in enumerate(classes):
        for i in [10, 2, 0, 1]:
            _save(tmp_path / cls / f"{i}.png", (8, 8), value=100 * c + i)
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents" / "b_cls.pt").write_bytes(b"x")
    (tmp_path / "unrelated_cls").mkdir()
    _save(tmp_path / "unrelated_cls" / "0.png", (8, 8))
    ds = load_image_dir(tmp_path, classes, channels=3)
    assert ds.classes == classes and ds.labels.tolist() == [0] * 4 + [1] * 4
    assert (ds.channels, ds.image_size, ds.split) == (3, 8, "train")
    expected = [np.asarray(Image.open(tmp_path / "b_cls" / f"{i}.png")) for i in [0, 1, 2, 10]]
    got = ds.load_class(0).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))
    assert load_image_dir(tmp_path, classes, channels=1).load([0]).shape == (1, 1, 8, 8)
    assert load_image_dir(tmp_path, classes, 3, image_size=4).load([0]).shape == (1, 3, 4, 4)


def test_load_image_dir_lexicographic_when_not_numeric(tmp_path):
    for stem in ["b", "a10", "a2"]:
        _save(tmp_path / "c" / f"{stem}.png", (4, 4), value=len(stem) + ord(stem[-1]))
    ds = load_image_dir(tmp_path, ["c"], channels=3)
    first = np.asarray(Image.open(tmp_path / "c" / "a10.png"))
    assert np.array_equal(ds.load([0])[0].permute(1, 2, 0).numpy(), first)


def test_load_image_dir_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_dir(tmp_path / "nope", ["a"], channels=3)
    _save(tmp_path / "a" / "0.png", (8, 8))
    with pytest.raises(DataError, match="no folder for class 'b'"):
        load_image_dir(tmp_path, ["a", "b"], channels=3)
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*b has no images"):
        load_image_dir(tmp_path, ["a", "b"], channels=3)
    _save(tmp_path / "b" / "0.png", (6, 6))
    with pytest.raises(DataError, match="different sizes.*--image-size"):
        load_image_dir(tmp_path, ["a", "b"], channels=3)
    (tmp_path / "b" / "0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read image .*b/0\.png"):
        load_image_dir(tmp_path, ["a", "b"], channels=3)


# ----------------------------------------------------------------------------- get_dataset

def test_get_dataset_names_and_errors(tmp_path):
    assert DATASET_NAMES == ("fashion-mnist", "imagefolder", "imagenette", "imagewoof",
                             "imageidc", "imagenet-100")
    with pytest.raises(ConfigError, match="unknown dataset 'cifar10'; choose one of: fashion-mnist, imagefolder"):
        get_dataset("cifar10")
    for name in DATASET_NAMES[1:]:
        with pytest.raises(ConfigError, match=f"dataset {name} needs its image folder"):
            get_dataset(name)
    with pytest.raises(ConfigError, match="fashion-mnist images are 28x28"):
        get_dataset("fashion-mnist", image_size=32)
    _make_folder(tmp_path, ["x", "y"], splits=("train",))
    ds = get_dataset("imagefolder", root=tmp_path, image_size=8)
    assert ds.name == "imagefolder" and ds.image_size == 8
