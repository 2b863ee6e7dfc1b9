"""Latent cache: per-class files, reuse, resume, keys."""

from __future__ import annotations

import torch

from gendd.cache import EncodeSpec, LatentCache, cache_key
from gendd.data.base import to_float


def test_cache_build_reuse_and_resume(toy_dataset, tiny_bb, tmp_path):
    cache = LatentCache.build(toy_dataset, tiny_bb, tmp_path, progress=False)
    assert cache.is_complete()
    z, idx = cache.load(1)
    assert z.shape == (6, *tiny_bb.latent_shape)
    assert torch.equal(idx, torch.as_tensor(toy_dataset.class_indices(1)))
    torch.testing.assert_close(z, tiny_bb.encode(to_float(toy_dataset.load_class(1))))
    # interrupted encode: class 2's file is missing -> only it is rebuilt, identically
    before = {c: cache.class_file(c).stat().st_mtime_ns for c in range(4)}
    saved = cache.latents(2)
    cache.class_file(2).unlink()
    again = LatentCache.build(toy_dataset, tiny_bb, tmp_path, progress=False)
    assert again.root == cache.root
    after = {c: again.class_file(c).stat().st_mtime_ns for c in range(4)}
    assert all(before[c] == after[c] for c in (0, 1, 3))
    assert torch.equal(again.latents(2), saved)


def test_cache_key_depends_on_everything(toy_dataset, tiny_bb, tiny_bb_sigma):
    from conftest import make_dataset

    k = cache_key(toy_dataset, tiny_bb, EncodeSpec())
    assert k == cache_key(toy_dataset, tiny_bb, EncodeSpec())
    assert k != cache_key(toy_dataset, tiny_bb, EncodeSpec(flip=True))
    assert k != cache_key(toy_dataset, tiny_bb_sigma, EncodeSpec())
    assert k != cache_key(make_dataset(seed=1), tiny_bb, EncodeSpec())


def test_flip_and_sampled_latents(toy_dataset, tiny_bb, tmp_path):
    c = LatentCache.build(toy_dataset, tiny_bb, tmp_path, EncodeSpec(flip=True), progress=False)
    z, idx = c.load(0)
    assert z.shape[0] == 12 and torch.equal(idx[:6], idx[6:])
    torch.testing.assert_close(z[6:], tiny_bb.encode(to_float(toy_dataset.load_class(0)).flip(-1)))
    s1 = LatentCache.build(toy_dataset, tiny_bb, tmp_path / "s1", EncodeSpec(sample=True, seed=1), progress=False)
    s2 = LatentCache.build(toy_dataset, tiny_bb, tmp_path / "s2", EncodeSpec(sample=True, seed=1), progress=False)
    assert torch.equal(s1.latents(3), s2.latents(3))
    assert not torch.equal(s1.latents(3), LatentCache.build(toy_dataset, tiny_bb, tmp_path).latents(3))


def test_random_flip_stores_each_image_once_flipped_or_not(toy_dataset, tiny_bb, tmp_path):
    """random_flip: one latent per image, each that of the image or of its mirror, seeded per class."""
    import pytest

    from gendd.errors import ConfigError

    spec = EncodeSpec(random_flip=True)
    c = LatentCache.build(toy_dataset, tiny_bb, tmp_path, spec, progress=False)
    z = c.latents(0)
    images = to_float(toy_dataset.load_class(0))
    plain, mirrored = tiny_bb.encode(images), tiny_bb.encode(images.flip(-1))
    assert z.shape[0] == images.shape[0]
    # the VAE encodes each image on its own, but batch contents differ from the cache's, so rows match
    # up to float32 rounding, far below the gap between an image's latent and its mirror's
    d_plain = (z - plain).flatten(1).abs().amax(1)
    d_mirror = (z - mirrored).flatten(1).abs().amax(1)
    tol = 1e-4 * plain.abs().max()
    assert bool(((d_plain <= tol) | (d_mirror <= tol)).all())
    assert 0 < int((d_mirror <= tol).sum()) < images.shape[0] or images.shape[0] < 4
    again = LatentCache.build(toy_dataset, tiny_bb, tmp_path / "again", spec, progress=False)
    assert torch.equal(again.latents(0), z)
    with pytest.raises(ConfigError, match="exclude"):
        EncodeSpec(flip=True, random_flip=True)
