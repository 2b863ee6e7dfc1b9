"""gendd.metrics on constructed point sets whose answers are known by hand or in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import assert_close_f32, convnet_n
from gendd import metrics as M
from gendd.errors import ConfigError


def _gauss(n, d, seed=0, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_identical_sets_have_zero_distance_and_full_coverage():
    x = _gauss(40, 6)
    assert abs(M.mmd2(x, x, unbiased=False)) < 1e-12
    assert abs(M.frechet_distance(x, x)) < 1e-9
    p = M.prdc(x, x, k=5)
    assert p["precision"] == 1.0 and p["recall"] == 1.0 and p["coverage"] == 1.0
    assert M.coverage(x, x) == 1.0
    assert M.representativeness(x, x) == 0.0


def test_mmd_by_hand_and_median_bandwidth():
    # 1-D, sigma = 1: k(a, b) = exp(-(a - b)^2 / 2)
    k = lambda a, b: math.exp(-((a - b) ** 2) / 2)
    assert M.mmd2([[0.0]], [[1.0]], sigma=1.0, unbiased=False) == pytest.approx(2 - 2 * k(0, 1))
    assert math.isnan(M.mmd2([[0.0]], [[1.0]], sigma=1.0, unbiased=True))
    x, y = [[0.0], [1.0]], [[0.0], [2.0]]
    want = k(0, 1) + k(0, 2) - 2 * (k(0, 0) + k(0, 2) + k(1, 0) + k(1, 2)) / 4
    assert M.mmd2(x, y, sigma=1.0, unbiased=True) == pytest.approx(want)
    assert M.median_bandwidth([[0.0], [1.0], [3.0]]) == 2.0  # distances 1, 3, 2
    assert M.mmd2(x, y) == pytest.approx(M.mmd2(x, y, sigma=M.median_bandwidth(x, y)))
    # same distribution, many points: the unbiased estimate is near 0; a shifted one is not
    a, b = _gauss(400, 3, 1), _gauss(400, 3, 2)
    assert abs(M.mmd2(a, b)) < 0.01 and M.mmd2(a, b + 2.0) > 0.3


def test_frechet_closed_form_gaussians():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))  # shared eigenvectors: the matrices commute
    a, b = np.array([1.0, 2, 3, 4, 5]), np.array([4.0, 1, 9, 0.25, 2])
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    # singular covariance (rank 1) against the identity: Tr sqrt(S1^1/2 I S1^1/2) = sqrt(4)
    s1 = np.diag([4.0, 0, 0])
    assert M.frechet_distance_from_stats(np.zeros(3), s1, np.zeros(3), np.eye(3)) == pytest.approx(4 + 3 - 4)


@pytest.mark.parametrize("n1,n2,d", [(50, 60, 4), (5, 7, 20), (1, 9, 6)])
def test_frechet_from_samples_matches_the_covariance_form(n1, n2, d):
    x, y = _gauss(n1, d, 3), _gauss(n2, d, 4, shift=0.5)
    mu1, s1 = x.mean(0), (torch.cov(x.T) if n1 > 1 else torch.zeros(d, d, dtype=torch.float64))
    mu2, s2 = y.mean(0), torch.cov(y.T)
    assert M.frechet_distance(x, y) == pytest.approx(M.frechet_distance_from_stats(mu1, s1, mu2, s2), rel=1e-7)
    t = torch.arange(d, dtype=torch.float64)
    assert M.frechet_distance(x, x + t) == pytest.approx(float((t ** 2).sum()), rel=1e-9, abs=1e-9)


def test_translated_set_has_zero_precision_recall():
    x = _gauss(30, 4)
    p = M.prdc(x + 100.0, x, k=5)
    assert p == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_by_hand():
    real = [[0.0], [1.0], [2.0], [3.0]]  # k = 1: every real radius is 1
    p = M.prdc([[0.5], [10.0]], real, k=1)
    assert p["precision"] == 0.5            # 0.5 lies in a real ball, 10 does not
    assert p["density"] == 1.0              # 0.5 lies in the balls of 0 and 1: 2 / (k m)
    assert p["coverage"] == 0.5             # real 0 and 1 have a distilled point within 1
    assert p["recall"] == 1.0               # distilled radii are 9.5: every real point is inside
    assert math.isnan(M.prdc([[0.5]], real, k=1)["recall"])
    assert M.knn_radii(real, 2).tolist() == [2.0, 1.0, 1.0, 2.0]


def test_diversity_and_representativeness_on_a_line():
    x = [[0.0], [1.0], [3.0]]
    assert M.mean_pairwise_distance(x) == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    assert M.mean_nn_distance_within(x) == pytest.approx(4 / 3)  # (1 + 1 + 2) / 3
    assert M.mean_pairwise_cosine_distance([[1.0, 0], [2.0, 0], [-1.0, 0]]) == pytest.approx(4 / 3)
    assert math.isnan(M.mean_pairwise_distance([[1.0]]))
    assert M.representativeness([[0.0], [10.0]], [[0.0], [1.0], [2.0], [10.0]]) == pytest.approx(0.75)
    assert M.pairwise_distances(x).tolist() == [[0, 1, 3], [1, 0, 2], [3, 2, 0]]


def test_lrs_and_ars_by_hand():
    e = math.e
    r = M.label_robust_score(90.0, 70.0, 70.0, 50.0)  # HLR 0.2, IOR 0.2, alpha 0
    assert r["hlr"] == pytest.approx(0.2) and r["ior"] == pytest.approx(0.2) and r["alpha"] == pytest.approx(0)
    assert r["lrs"] == pytest.approx((1 - 1 / e) / (e - 1 / e))
    assert M.label_robust_score(1.0, 1.0, 1.0, 0.0, weight=1.0, scale=1.0)["lrs"] == pytest.approx(1.0)
    assert M.label_robust_score(1.0, 0.0, 0.0, 0.0, weight=0.0, scale=1.0)["lrs"] == pytest.approx(0.0)
    a = M.augmentation_robust_score(60.0, 50.0, 55.0, 50.0)  # beta = 0.5 * 0.1 + 0.5 * 0.05
    assert a["with_aug"] == pytest.approx(0.1) and a["without_aug"] == pytest.approx(0.05)
    assert a["beta"] == pytest.approx(0.075)
    assert a["ars"] == pytest.approx((math.exp(0.075) - 1 / e) / (e - 1 / e))
    assert M.augmentation_robust_score(50, 50, 50, 50)["ars"] == pytest.approx(r["lrs"])


def test_set_metrics_averages_classes_and_skips_nan():
    real = {"a": _gauss(20, 3, 0), "b": _gauss(20, 3, 1, shift=5.0)}
    dist = {"a": real["a"][:4].clone(), "b": real["b"][:1].clone()}  # class b has one item (IPC-1-like)
    out = M.set_metrics(dist, real, k=3)
    assert set(M.METRIC_NAMES) <= set(out) and out["num_classes"] == 2
    pa, pb = out["per_class"]["a"], out["per_class"]["b"]
    assert out["fd"] == pytest.approx((pa["fd"] + pb["fd"]) / 2)
    assert math.isnan(pb["recall"]) and out["recall"] == pa["recall"]
    assert pa["precision"] == 1.0 and pb["precision"] == 1.0  # subsets of the real class
    seq = M.set_metrics([dist["a"]], [real["a"]], k=3)  # sequences are indexed by position
    assert seq["per_class"]["0"]["fd"] == pytest.approx(pa["fd"])
    with pytest.raises(ConfigError):
        M.set_metrics({"z": dist["a"]}, real)


def test_embed_images_is_the_penultimate_layer_in_eval_mode():
    from gendd.evaluate import build_student

    torch.manual_seed(0)
    net = build_student("convnet3", 1, 4, 16).train()
    x = torch.randn(5, 1, 16, 16)
    f = M.embed_images(net, x, batch_size=2)
    assert f.shape == (5, net.num_features) and net.training
    with torch.no_grad():
        # batches of 2 vs one batch of 5: float32 rounding of the ConvNet-3 forward
        assert_close_f32(f, net.eval().embed(x), n=convnet_n(1))
    with pytest.raises(ConfigError):
        M.embed_images(torch.nn.Linear(2, 2), x)
