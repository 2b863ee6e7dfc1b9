"""Set-level metrics of a distilled set against the real data of its class, beyond accuracy.

Every function takes feature matrices (``(n, d)`` torch tensors or numpy arrays; anything with more
than two axes is flattened after the first) and computes in float64. Two feature spaces are used by
gendd: the VAE latent space of the backbone (distilled latents from ``out/latents/<class>.safetensors``,
real ones from the latent cache; both flattened) and a student network's penultimate layer
(:func:`embed_images`). The DD-Ranking scores (:func:`label_robust_score`,
:func:`augmentation_robust_score`) are functions of accuracy numbers instead.

Notation: ``X = {x_i}`` (m points) is the distilled set, ``Y = {y_j}`` (n points) the real class,
``||.||`` the Euclidean norm.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from gendd.errors import ConfigError

__all__ = [
    "as_features", "pairwise_distances", "median_bandwidth", "rbf_kernel", "mmd2",
    "knn_radii", "prdc", "coverage", "frechet_distance", "frechet_distance_from_stats",
    "mean_pairwise_distance", "mean_pairwise_cosine_distance", "mean_nn_distance_within",
    "representativeness", "label_robust_score", "augmentation_robust_score", "set_metrics",
    "embed_images", "METRIC_NAMES",
]


def as_features(x: Any) -> torch.Tensor:
    """``(n, ...)`` tensor/array -> ``(n, d)`` float64 CPU tensor (extra axes flattened)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    t = t.detach().to("cpu", torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim > 2:
        t = t.reshape(t.shape[0], -1)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ConfigError(f"features must be a non-empty (n, d) matrix, got shape {tuple(t.shape)}")
    return t


def pairwise_distances(x: Any, y: Any | None = None) -> torch.Tensor:
    """Euclidean distance matrix ``D_ij = ||x_i - y_j||`` (``y = x`` when omitted).

    Computed from the differences in float64 (not the ``|x|^2 + |y|^2 - 2 x.y`` expansion, whose
    cancellation leaves ~1e-8 instead of 0 for coinciding points); the diagonal of ``D(x, x)`` is 0.
    """
    a = as_features(x)
    b = a if y is None else as_features(y)
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    if y is None:
        d.fill_diagonal_(0.0)
    return d


def median_bandwidth(x: Any, y: Any | None = None) -> float:
    """Median heuristic (Gretton et al., JMLR 2012, Sec. 8; Garreau et al. 2017): ``sigma = median
    {||z_i - z_j|| : i < j}`` over the pooled sample ``Z = X u Y``. Returns 1.0 if all points coincide."""
    z = as_features(x) if y is None else torch.cat([as_features(x), as_features(y)])
    return _median_from_d(pairwise_distances(z))


def _median_from_d(dz: torch.Tensor) -> float:
    iu = torch.triu_indices(len(dz), len(dz), offset=1)
    vals = dz[iu[0], iu[1]]
    vals = vals[vals > 0]
    return float(vals.median()) if len(vals) else 1.0


def rbf_kernel(x: Any, y: Any, sigma: float) -> torch.Tensor:
    """Gaussian RBF kernel ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``."""
    if not sigma > 0:
        raise ConfigError(f"RBF bandwidth must be > 0, got {sigma}")
    return torch.exp(-pairwise_distances(x, y) ** 2 / (2.0 * sigma * sigma))


def mmd2(x: Any, y: Any, sigma: float | str = "median", unbiased: bool = True) -> float:
    """Squared maximum mean discrepancy with an RBF kernel (Gretton et al., *A Kernel Two-Sample
    Test*, JMLR 2012, Lemma 6 and Eq. 3/5).

    Biased (V-statistic)::

        MMD_b^2 = 1/m^2 sum_{i,i'} k(x_i, x_i') + 1/n^2 sum_{j,j'} k(y_j, y_j') - 2/(mn) sum_{i,j} k(x_i, y_j)

    Unbiased (U-statistic) drops the diagonal terms of the within-set sums and divides them by
    ``m(m-1)`` and ``n(n-1)``; it can be negative and needs ``m, n >= 2`` (NaN otherwise).
    ``sigma="median"`` uses :func:`median_bandwidth` of the pooled sample.
    Identical sets give ``MMD_b^2 = 0``.
    """
    a, b = as_features(x), as_features(y)
    dz = pairwise_distances(torch.cat([a, b]))
    return _mmd2_from_d(dz, len(a), sigma, unbiased)


def _mmd2_from_d(dz: torch.Tensor, m: int, sigma: float | str, unbiased: bool) -> float:
    """MMD^2 from the pooled distance matrix of ``Z = [X; Y]`` (``X`` = the first ``m`` rows)."""
    s = _median_from_d(dz) if sigma == "median" else float(sigma)
    if not s > 0:
        raise ConfigError(f"RBF bandwidth must be > 0, got {s}")
    kz = torch.exp(-dz ** 2 / (2.0 * s * s))
    kxx, kyy, kxy = kz[:m, :m], kz[m:, m:], kz[:m, m:]
    n = len(dz) - m
    if unbiased:
        if m < 2 or n < 2:
            return float("nan")
        txx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        tyy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    else:
        txx, tyy = kxx.mean(), kyy.mean()
    return float(txx + tyy - 2.0 * kxy.mean())


def knn_radii(x: Any, k: int) -> torch.Tensor:
    """``r_k(x_i)``: distance from ``x_i`` to its k-th nearest neighbour in ``X`` other than itself."""
    return _knn_from_d(pairwise_distances(x), k)


def _knn_from_d(d: torch.Tensor, k: int) -> torch.Tensor:
    if not 1 <= k < len(d):
        raise ConfigError(f"k-NN radius needs 1 <= k < number of points, got k={k} for {len(d)} points")
    d = d.clone()
    d.fill_diagonal_(float("inf"))
    return d.kthvalue(k, dim=1).values


def prdc(distilled: Any, real: Any, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al., *Reliable Fidelity and Diversity Metrics
    for Generative Models*, ICML 2020; precision/recall of Kynkäänniemi et al., NeurIPS 2019).

    With ``B(c, r)`` the closed ball and ``r_k`` the k-NN radius within a set (:func:`knn_radii`),
    for distilled ``X`` (m) and real ``Y`` (n)::

        precision = 1/m sum_i 1[exists j: x_i in B(y_j, r_k(y_j))]
        recall    = 1/n sum_j 1[exists i: y_j in B(x_i, r_k(x_i))]     (radii within X)
        density   = 1/(k m) sum_i sum_j 1[x_i in B(y_j, r_k(y_j))]
        coverage  = 1/n sum_j 1[min_i ||y_j - x_i|| <= r_k(y_j)]

    ``k`` is clamped to ``n - 1`` for the real radii and to ``m - 1`` for recall's distilled radii
    (recall is NaN for a single distilled point: it has no neighbours). Naeem et al. use k = 5.
    """
    a, b = as_features(distilled), as_features(real)
    return _prdc_from_d(pairwise_distances(torch.cat([a, b])), len(a), k)


def _prdc_from_d(dz: torch.Tensor, m: int, k: int) -> dict[str, float]:
    n = len(dz) - m
    if n < 2:
        raise ConfigError("precision/recall/density/coverage need at least 2 real points")
    kr = min(k, n - 1)
    rr = _knn_from_d(dz[m:, m:], kr)  # (n,) real k-NN radii
    d = dz[:m, m:]  # (m, n)
    inside = d <= rr[None, :]
    out = {"precision": float(inside.any(1).double().mean()),
           "density": float(inside.double().sum() / (kr * m)),
           "coverage": float((d.min(0).values <= rr).double().mean())}
    if m >= 2:
        rx = _knn_from_d(dz[:m, :m], min(k, m - 1))
        out["recall"] = float((d <= rx[:, None]).any(0).double().mean())
    else:
        out["recall"] = float("nan")
    return {key: out[key] for key in ("precision", "recall", "density", "coverage")}


def coverage(distilled: Any, real: Any, k: int = 5) -> float:
    """Coverage of Naeem et al. 2020: the fraction of real points whose k-NN ball (radius within the
    real set) holds at least one distilled point (see :func:`prdc`)."""
    return prdc(distilled, real, k)["coverage"]


def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix via ``eigh`` (negative round-off eigenvalues -> 0)."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet (2-Wasserstein) distance between ``N(mu1, S1)`` and ``N(mu2, S2)`` (Dowson & Landau
    1982; the FID of Heusel et al., NeurIPS 2017, in other features)::

        FD = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^{1/2} S2 S1^{1/2})^{1/2})

    Both square roots are taken with ``eigh`` on symmetric PSD matrices (eigenvalues clipped at 0),
    so singular covariances (fewer samples than dimensions) are handled without the complex parts
    and ``sqrtm`` failures of the usual ``scipy.linalg.sqrtm(S1 @ S2)``.
    """
    m1, m2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    r1 = _sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float(((m1 - m2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def frechet_distance(x: Any, y: Any) -> float:
    """Fréchet distance between Gaussian fits (mean, unbiased covariance; a single point has zero
    covariance) of two feature sets; see :func:`frechet_distance_from_stats` for the formula.

    Computed in the sample space, exact for any ``n`` vs ``d``: with centred data
    ``A = X_c^T / sqrt(m-1)`` (d x m) and ``B = Y_c^T / sqrt(n-1)``, ``S1 = A A^T``, ``S2 = B B^T``, the
    non-zero eigenvalues of ``S1^{1/2} S2 S1^{1/2}`` equal those of ``(A^T B)(A^T B)^T``, so
    ``Tr((S1^{1/2} S2 S1^{1/2})^{1/2}) = ||A^T B||_*`` (nuclear norm: sum of singular values of an
    m x n matrix). No d x d matrix is formed and no ill-conditioned ``sqrtm`` is needed.
    """
    a, b = as_features(x), as_features(y)
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu1, mu2 = a.mean(0), b.mean(0)
    fa = (a - mu1).T / math.sqrt(len(a) - 1) if len(a) > 1 else torch.zeros(a.shape[1], 1, dtype=a.dtype)
    fb = (b - mu2).T / math.sqrt(len(b) - 1) if len(b) > 1 else torch.zeros(b.shape[1], 1, dtype=b.dtype)
    tr_sqrt = torch.linalg.svdvals(fa.T @ fb).sum()
    return float(((mu1 - mu2) ** 2).sum() + (fa * fa).sum() + (fb * fb).sum() - 2 * tr_sqrt)


def mean_pairwise_distance(x: Any) -> float:
    """Diversity: ``2/(m(m-1)) sum_{i<i'} ||x_i - x_i'||`` (NaN for one point)."""
    a = as_features(x)
    if len(a) < 2:
        return float("nan")
    iu = torch.triu_indices(len(a), len(a), offset=1)
    return float(pairwise_distances(a)[iu[0], iu[1]].mean())


def mean_pairwise_cosine_distance(x: Any) -> float:
    """Diversity: ``2/(m(m-1)) sum_{i<i'} (1 - cos(x_i, x_i'))`` (NaN for one point; a zero vector
    has cosine 0 to everything)."""
    a = as_features(x)
    if len(a) < 2:
        return float("nan")
    u = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    iu = torch.triu_indices(len(a), len(a), offset=1)
    return float((1.0 - (u @ u.T)[iu[0], iu[1]]).mean())


def mean_nn_distance_within(x: Any) -> float:
    """Diversity as MGD3 (Chan-Santiago et al., ICML 2025) reports it: the mean over samples of the
    distance to the nearest other sample of the set, ``1/m sum_i min_{i' != i} ||x_i - x_i'||``."""
    a = as_features(x)
    if len(a) < 2:
        return float("nan")
    d = pairwise_distances(a)
    d.fill_diagonal_(float("inf"))
    return float(d.min(1).values.mean())


def representativeness(distilled: Any, real: Any) -> float:
    """Mean distance of the real points to their nearest distilled point,
    ``1/n sum_j min_i ||y_j - x_i||`` (lower = the set represents its class better; the k-center
    objective of Sener & Savarese 2018 is the max instead of the mean)."""
    return float(pairwise_distances(distilled, real).min(0).values.mean())


def _exp_normalise(a: float) -> float:
    """``(e^a - e^{-1}) / (e - e^{-1})``: maps ``a`` in [-1, 1] monotonically onto [0, 1]."""
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def label_robust_score(acc_real_hard: float, acc_syn_hard: float, acc_syn_any: float, acc_random_any: float,
                       weight: float = 0.5, scale: float = 100.0) -> dict[str, float]:
    """DD-Ranking's label-robust score (Li et al., *DD-Ranking: Rethinking the Evaluation of Dataset
    Distillation*, arXiv 2505.13300; ``LabelRobustScoreHard/Soft``, ``lrs_lambda`` = ``weight``)::

        HLR   = Acc(real, hard) - Acc(syn, hard)           hard-label recovery (lower is better)
        IOR   = Acc(syn, any)   - Acc(random, any)         improvement over a random subset of the same
                                                           size, trained under the same protocol/labels
        alpha = w IOR - (1 - w) HLR
        LRS   = (e^alpha - e^{-1}) / (e - e^{-1})

    Accuracies are divided by ``scale`` (100: gendd's percentages) so that they are fractions and
    ``alpha`` lies in [-1, 1]. "any" is the method's own label type (soft labels for soft-label
    methods; with hard labels only, ``acc_syn_any = acc_syn_hard``). DD-Ranking computes the score per
    evaluation seed and averages; applied to mean accuracies this gives the score of the means.
    Returns ``hlr``, ``ior`` (fractions), ``alpha`` and ``lrs``.
    """
    hlr = (acc_real_hard - acc_syn_hard) / scale
    ior = (acc_syn_any - acc_random_any) / scale
    alpha = weight * ior - (1.0 - weight) * hlr
    return {"hlr": hlr, "ior": ior, "alpha": alpha, "lrs": _exp_normalise(alpha)}


def augmentation_robust_score(acc_syn_aug: float, acc_random_aug: float, acc_syn_noaug: float,
                              acc_random_noaug: float, weight: float = 0.5,
                              scale: float = 100.0) -> dict[str, float]:
    """DD-Ranking's augmentation-robust score (arXiv 2505.13300; ``AugmentationRobustScore``,
    ``ars_lambda`` = ``weight``): the gain over a random subset with and without the training-time
    augmentation, combined and normalised as the LRS::

        beta = w (Acc(syn, aug) - Acc(rdm, aug)) + (1 - w) (Acc(syn, no-aug) - Acc(rdm, no-aug))
        ARS  = (e^beta - e^{-1}) / (e - e^{-1})

    Accuracies are divided by ``scale`` (100 for percentages). Returns ``with_aug``, ``without_aug``
    (gains, fractions), ``beta`` and ``ars``.
    """
    with_aug = (acc_syn_aug - acc_random_aug) / scale
    without_aug = (acc_syn_noaug - acc_random_noaug) / scale
    beta = weight * with_aug + (1.0 - weight) * without_aug
    return {"with_aug": with_aug, "without_aug": without_aug, "beta": beta, "ars": _exp_normalise(beta)}


#: Keys of :func:`set_metrics` (per class and averaged), in table order.
METRIC_NAMES = ("mmd2", "mmd2_unbiased", "fd", "precision", "recall", "density", "coverage",
                "pairwise_dist", "pairwise_cos", "nn_dist", "representativeness")


def _class_metrics(x: torch.Tensor, y: torch.Tensor, k: int, sigma: float | str) -> dict[str, float]:
    m = len(x)
    dz = pairwise_distances(torch.cat([x, y]))  # one distance matrix serves every metric
    dxx, dxy = dz[:m, :m], dz[:m, m:]
    iu = torch.triu_indices(m, m, offset=1)
    nn = dxx + torch.diag(torch.full((m,), float("inf"), dtype=dz.dtype))
    out = {"mmd2": _mmd2_from_d(dz, m, sigma, False), "mmd2_unbiased": _mmd2_from_d(dz, m, sigma, True),
           "fd": frechet_distance(x, y), **_prdc_from_d(dz, m, k),
           "pairwise_dist": float(dxx[iu[0], iu[1]].mean()) if m > 1 else float("nan"),
           "pairwise_cos": mean_pairwise_cosine_distance(x),
           "nn_dist": float(nn.min(1).values.mean()) if m > 1 else float("nan"),
           "representativeness": float(dxy.min(0).values.mean())}
    return {key: out[key] for key in METRIC_NAMES}


def set_metrics(distilled_feats_by_class: Mapping[Any, Any] | Sequence[Any],
                real_feats_by_class: Mapping[Any, Any] | Sequence[Any], *, k: int = 5,
                sigma: float | str = "median") -> dict[str, Any]:
    """Every metric of this module per class (distilled vs the real points of the same class), and
    their mean over classes (NaN entries, e.g. recall or unbiased MMD at IPC 1, are skipped).

    Both arguments map a class (name or index) to an ``(n, ...)`` feature array; a sequence is
    indexed by position. Returns ``{<metric>: mean, ..., "per_class": {class: {<metric>: value}},
    "num_classes": C}`` with the keys of :data:`METRIC_NAMES`: biased and unbiased RBF ``mmd2``
    (median-heuristic bandwidth unless ``sigma`` is a number), Fréchet distance ``fd``, PRDC with
    ``k`` neighbours, diversity (``pairwise_dist``, ``pairwise_cos``, ``nn_dist``) and
    ``representativeness``.
    """
    dist = dict(distilled_feats_by_class) if isinstance(distilled_feats_by_class, Mapping) \
        else dict(enumerate(distilled_feats_by_class))
    real = dict(real_feats_by_class) if isinstance(real_feats_by_class, Mapping) \
        else dict(enumerate(real_feats_by_class))
    missing = [c for c in dist if c not in real]
    if missing:
        raise ConfigError(f"no real features for classes {missing}")
    if not dist:
        raise ConfigError("set_metrics needs at least one class")
    per_class = {c: _class_metrics(as_features(dist[c]), as_features(real[c]), k, sigma) for c in dist}
    out: dict[str, Any] = {}
    for key in METRIC_NAMES:
        vals = np.array([per_class[c][key] for c in per_class], dtype=np.float64)
        out[key] = float(vals[~np.isnan(vals)].mean()) if (~np.isnan(vals)).any() else float("nan")
    out["per_class"] = {str(c): v for c, v in per_class.items()}
    out["num_classes"] = len(per_class)
    return out


@torch.no_grad()
def embed_images(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate-layer features ``net.embed(x)`` of normalised float images ``(n, C, H, W)``
    (e.g. :func:`gendd.evaluate.normalize` of uint8 images), in eval mode and batches; returns a
    float32 CPU tensor ``(n, d)``. The network's train/eval mode is restored afterwards."""
    if not hasattr(net, "embed"):
        raise ConfigError(f"{type(net).__name__} has no embed(x) method (features before the classifier)")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    was_training = net.training
    net.eval()
    try:
        device = next(net.parameters()).device
        feats = [net.embed(images[i:i + batch_size].to(device)).flatten(1).float().cpu()
                 for i in range(0, len(images), batch_size)]
    finally:
        net.train(was_training)
    if not feats:
        raise ConfigError("embed_images got no images")
    return torch.cat(feats)
