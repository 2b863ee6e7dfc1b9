"""Shared fixtures: tiny random-init backbones and small datasets, all offline."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_bb():
    from gendd.backbone import tiny_backbone

    return tiny_backbone(num_classes=4, image_size=16, channels=1, pad=2, vae_channels=(32, 32))


@pytest.fixture(scope="session")
def tiny_bb_sigma():
    from gendd.backbone import tiny_backbone

    return tiny_backbone(num_classes=4, image_size=16, channels=3, vae_channels=(32, 32), learned_sigma=True)


def make_dataset(num_classes=4, per_class=6, size=12, channels=1, seed=0, name="toy"):
    from gendd.data.base import ImageDataset

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_classes * per_class, channels, size, size), generator=g, dtype=torch.uint8)
    labels = np.repeat(np.arange(num_classes), per_class)
    return ImageDataset(name=name, split="train", classes=[f"c{i}" for i in range(num_classes)], labels=labels,
                        channels=channels, image_size=size, loader=lambda idx: images[list(idx)],
                        fingerprint_parts=[str(seed)])


@pytest.fixture
def toy_dataset():
    return make_dataset()


def method_cache(ds, bb, tmp_path, method):
    """The latent cache a method reads (built with its own encode spec)."""
    from gendd.cache import LatentCache

    return LatentCache.build(ds, bb, tmp_path / "cache", method.encode_spec(), progress=False)


def method_ctx(method, ds, bb, cache, c=0, ipc=2):
    """The ClassContext `export.distill` would give ``method`` for class ``c``."""
    from gendd.methods import ClassContext

    return ClassContext.create(ds, c, ipc, method.config.seed, backbone=bb, cache=cache)
