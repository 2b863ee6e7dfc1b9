"""Shared fixtures: tiny random-init backbones and small datasets, all offline."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _test_threads() -> int:
    """torch intra-op threads for the suite: ``GENDD_TEST_THREADS`` if set, else min(2, available)."""
    raw = os.environ.get("GENDD_TEST_THREADS", "").strip()
    if not raw:
        return min(2, torch.get_num_threads())
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"GENDD_TEST_THREADS must be a positive integer, got {raw!r}")
    return int(raw)


torch.set_num_threads(_test_threads())

# ------------------------------------------------------------------ float32 comparison tolerances
# Results that reach the same value through float32 sums taken in another order (another batch size,
# thread count, CPU ISA / BLAS kernel, code path, or a float64 reference) differ by rounding. The worst
# case for a length-n sum is about n * eps32 relative to the magnitude of its terms, so tolerances are
# derived from the reduction length instead of being picked by hand; bitwise checks (torch.equal) are
# kept only where the code runs the same operations in the same order.
EPS32 = torch.finfo(torch.float32).eps


def f32_tol(n: int, scale: float = 1.0, k: float = 4) -> tuple[float, float]:
    """``(rtol, atol)`` for float32 values computed through reductions of total length ``n``.

    ``rtol = k * n * eps32`` (``k`` is a safety factor); ``atol = rtol * scale`` with ``scale`` the
    magnitude of the values compared, for elements near 0 (cancellation). For a network, ``n`` is the
    sum of the reduction lengths (conv ``C*kh*kw``, matmul inner dimension) along its forward path.
    """
    rtol = k * n * EPS32
    return rtol, rtol * float(scale)


def dit_n(hidden: int = 64, layers: int = 2, heads: int = 2, tokens: int = 16, in_patch: int = 16,
          freq: int = 256) -> int:
    """Summed dot-product lengths along a DiT forward (``tiny_backbone``'s defaults: 1584): patch
    embedding, timestep MLP, per block adaLN + q/k/v + QK^T + attention-weighted sum + out-proj + MLP
    (4x hidden), final adaLN + projection."""
    block = hidden + hidden + hidden // heads + tokens + hidden + hidden + 4 * hidden
    return in_patch + freq + hidden + layers * block + 2 * hidden


def convnet_n(channels: int, width: int = 128, depth: int = 3) -> int:
    """Summed conv reduction lengths (C*3*3) of a ConvNet-``depth`` embedding."""
    return 9 * channels + (depth - 1) * 9 * width


TINY_DIT_N = dit_n()


def _magnitude(x) -> float:
    t = torch.as_tensor(x).detach()
    return float(t.abs().max()) if t.numel() else 0.0


def assert_close_f32(actual, expected, n: int, scale: float | None = None, k: float = 4, **kw) -> None:
    """``torch.testing.assert_close`` with :func:`f32_tol` tolerances (``scale`` defaults to
    ``max |expected|``); extra keywords (``check_dtype=False``, ``msg``) are passed on."""
    rtol, atol = f32_tol(n, _magnitude(expected) if scale is None else scale, k)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kw)


def approx_f32(expected, n: int, scale: float | None = None, k: float = 4):
    """``pytest.approx`` with :func:`f32_tol` tolerances for float32 scalars (``scale`` defaults to
    ``max |expected|``)."""
    rtol, atol = f32_tol(n, _magnitude(expected) if scale is None else scale, k)
    return pytest.approx(expected, rel=rtol, abs=atol)


@pytest.fixture(scope="session")
def tiny_bb():
    from gendd.backbone import tiny_backbone

    return tiny_backbone(num_classes=4, image_size=16, channels=1, pad=2, vae_channels=(32, 32))


@pytest.fixture(scope="session")
def tiny_bb_sigma():
    from gendd.backbone import tiny_backbone

    return tiny_backbone(num_classes=4, image_size=16, channels=3, vae_channels=(32, 32), learned_sigma=True)


def ddim_roundtrip_error(bb, z0, y, steps: int) -> float:
    """Relative error of a full DDIM inversion (``steps``, CFG 1) sampled back to ``z0``; the inverted latents
    must look like N(0, I) draws."""
    from gendd.backbone import SamplerConfig, ddim_invert, sample

    sc = SamplerConfig("ddim", steps, cfg_scale=1.0)
    zT = ddim_invert(bb, z0, y, steps, sc)
    assert abs(float(zT.std()) - 1.0) < 0.15
    return float((sample(bb, zT, y, sc) - z0).norm() / z0.norm())


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
