"""Mode discovery on constructed clusters: k well-separated Gaussian blobs in latent shape."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_f32, f32_tol

from gendd.blocks.modes import MODE_METHODS, discover_modes
from gendd.errors import ConfigError, DataError

K, PER, SHAPE = 4, 20, (2, 3, 3)


def _blobs(k=K, per=PER, seed=0, spread=5.0, std=0.1):
    """k blobs of ``per`` points: centres ~ N(0, spread^2 I), points = centre + N(0, std^2 I)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, *SHAPE, generator=g) * spread
    x = (centres[:, None] + std * torch.randn(k, per, *SHAPE, generator=g)).reshape(k * per, *SHAPE)
    labels = torch.arange(k).repeat_interleave(per)
    return x, labels, x.reshape(k, per, -1).mean(1)


def _matching(modes, means):
    """For each mode, (index of the nearest blob mean, distance)."""
    d = torch.cdist(modes.reshape(modes.shape[0], -1), means)
    return d.argmin(1).tolist(), d.min(1).values


def _is_row_of(modes, x, idx):
    return torch.equal(modes, x[idx])


def _mean_tol(x, per=PER):
    """Distance within which float32 means of ``per`` points of ``x`` (as ``_blobs``' ``means``) lie from
    the exact ones: the per-coordinate f32_tol, over the sqrt(d) coordinates of a latent."""
    return f32_tol(per, scale=float(x.abs().max()))[1] * math.sqrt(x[0].numel())


@pytest.mark.parametrize("method", ["kmeans", "gmm", "spectral"])
def test_cluster_means_recover_blob_means(method):
    x, labels, means = _blobs()
    r = discover_modes(x, K, method, seed=0)
    assert r.modes.shape == (K, *SHAPE) and r.modes.dtype == torch.float32 and r.method == method
    near, dist = _matching(r.modes, means)
    assert sorted(near) == list(range(K))  # one mode per blob
    assert float(dist.max()) < _mean_tol(x)  # the means themselves (blobs are perfectly separated)
    # assignments are the blob partition, up to relabelling
    a = r.assignments
    assert a.shape == (K * PER,)
    for b in range(K):
        assert a[labels == b].unique().numel() == 1
    assert a.unique().numel() == K


def test_kmeans_closest_are_distinct_real_points_nearest_the_centroids():
    x, _, means = _blobs()
    r = discover_modes(x, K, "kmeans-closest", seed=0)
    assert r.indices.shape == (K,) and r.indices.unique().numel() == K
    assert _is_row_of(r.modes, x, r.indices)
    near, _ = _matching(r.modes, means)
    assert sorted(near) == list(range(K))
    centroids = discover_modes(x, K, "kmeans", seed=0).modes.reshape(K, -1)
    flat = x.reshape(len(x), -1)
    for c in range(K):  # each is the nearest real latent of its centroid
        j = int(torch.cdist(r.modes[c].reshape(1, -1), centroids).argmin())
        # distances in float64 (as the code): float32 cdist of 80 rows takes the |x|^2 + |y|^2 - 2xy
        # route, whose rounding (~1e-4 here) is not far below the gap between the two nearest latents
        near_j = torch.cdist(centroids[j:j + 1].double(), flat.double()).argmin()
        assert torch.equal(r.modes[c].reshape(-1), flat[near_j])


def test_kmeans_closest_with_k_equal_n_uses_every_latent_once():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1], [20.0]]).reshape(5, 1, 1, 1)
    r = discover_modes(x, 5, "kmeans-closest", seed=0)
    assert sorted(r.indices.tolist()) == [0, 1, 2, 3, 4]


def test_dbscan_finds_the_blobs_and_excludes_noise():
    x, labels, means = _blobs()
    outlier = torch.full((1, *SHAPE), 100.0)
    r = discover_modes(torch.cat([x, outlier]), K, "dbscan", seed=0)
    near, dist = _matching(r.modes, means)
    assert sorted(near) == list(range(K))
    assert float(dist.max()) < 0.1  # blob std 0.1 in 18 dims: the mean of the clustered members
    a = r.assignments
    assert int(a[-1]) == -1  # the outlier is noise and is in no mode
    for b in range(K):
        got = a[:-1][labels == b]
        assert got[got >= 0].unique().numel() == 1


def test_dbscan_fewer_clusters_than_k_splits_the_largest():
    x, labels, means = _blobs(k=2, per=30)
    big = torch.cat([x[:30], x[30:40]])  # blob 0: 30 points, blob 1: 10 points
    r = discover_modes(big, 4, "dbscan", seed=0, eps=2.0, min_samples=3)
    near, dist = _matching(r.modes, means)
    # D'Hondt: 30/1 -> 30/2 = 15 -> 10/1 = 10 vs 30/3: blob 0 gets 3 modes, blob 1 one
    assert sorted(near) == [0, 0, 0, 1]
    assert float(dist.max()) < 0.5
    assert torch.unique(r.modes.reshape(4, -1), dim=0).shape[0] == 4
    # more clusters than k: the largest are kept
    r1 = discover_modes(big, 1, "dbscan", seed=0, eps=2.0, min_samples=3)
    # float64 mean (the code) vs a float32 one over 30 latents
    assert_close_f32(r1.modes.reshape(1, -1), big[:30].reshape(30, -1).mean(0, keepdim=True), n=30,
                     scale=float(big.abs().max()))
    assert (r1.assignments[30:] == -1).all()


def test_dbscan_all_noise_falls_back_to_kmeans():
    x, _, _ = _blobs()
    r = discover_modes(x, K, "dbscan", seed=0, eps=1e-6, min_samples=2)
    torch.testing.assert_close(r.modes, discover_modes(x, K, "kmeans", seed=0).modes)


def test_random_are_distinct_real_points_and_seeded():
    x, _, _ = _blobs()
    a = discover_modes(x, K, "random", seed=1)
    assert a.indices.unique().numel() == K and _is_row_of(a.modes, x, a.indices)
    assert a.assignments is None
    b = discover_modes(x, K, "random", seed=2)
    assert not torch.equal(a.indices, b.indices)


def test_minibatch_kmeans_streams_chunks_and_finds_blobs_with_full_batches():
    x, _, means = _blobs()
    r = discover_modes(x, K, "minibatch-kmeans", seed=0)  # D4M's batch = k: a rough one-pass estimate
    near, _ = _matching(r.modes, means)
    assert r.modes.shape == (K, *SHAPE) and torch.isfinite(r.modes).all()
    whole = discover_modes(x, K, "minibatch-kmeans", seed=0, batch_size=len(x))  # one k-means++ + one step
    near, dist = _matching(whole.modes, means)
    assert sorted(near) == list(range(K)) and float(dist.max()) < _mean_tol(x)
    with pytest.raises(ConfigError, match="batch_size 2 must be >= k = 4"):
        discover_modes(x, K, "minibatch-kmeans", batch_size=2)


@pytest.mark.parametrize("method", sorted(MODE_METHODS))
def test_deterministic_under_the_seed(method):
    x, _, _ = _blobs(spread=1.0, std=1.0)  # overlapping blobs: seeds matter
    a = discover_modes(x, K, method, seed=3)
    b = discover_modes(x, K, method, seed=3)
    assert torch.equal(a.modes, b.modes)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(discover_modes(x, K, method, generator=g1).modes,
                       discover_modes(x, K, method, generator=g2).modes)


def test_errors():
    x, _, _ = _blobs()
    with pytest.raises(ConfigError, match="unknown mode method 'kmedoids'; choose one of: dbscan, gmm, kmeans, kmeans-closest"):
        discover_modes(x, K, "kmedoids")
    with pytest.raises(DataError, match="cannot find 81 modes among 80 latents"):
        discover_modes(x, 81)
    with pytest.raises(ConfigError, match=">= 1"):
        discover_modes(x, 0)
    with pytest.raises(ConfigError, match="has no option"):
        discover_modes(x, K, "kmeans", eps=1.0)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        discover_modes(bad, K)
