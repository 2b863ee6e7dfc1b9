"""Mode discovery: ``k`` representative latents of one class (MGD3's stage 1, D4M's prototypes).

Every method flattens the ``(n, C, h, w)`` latents to ``(n, C*h*w)`` (float64) and returns ``k``
modes of the same shape as the input rows:

* ``kmeans``: k-means centroids, ``KMeans(n_clusters=k, random_state=seed, n_init="auto")`` as
  MGD3's reference (ManifoldGD: sample_mode_guidance.py; MGD3's default, paper App. D).
* ``kmeans-closest``: the real latent closest to each centroid (reference option ``--closest_point``);
  kept distinct by a global greedy matching (the closest centroid/latent pair first).
* ``minibatch-kmeans``: D4M's prototypes (suduo94/D4M: distillation/gen_prototype.py):
  ``MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=b, n_init="auto")`` fed with
  ``partial_fit`` on consecutive chunks of ``b`` latents (default ``b = k``, D4M's ``km_expand = 1``)
  of a seeded shuffle. D4M drops the last incomplete chunk of every class but one (a bug); here it is
  fed too.
* ``gmm``: means of a ``GaussianMixture`` with diagonal covariances (full covariances of 4096-d
  latents are neither estimable from ~1300 images nor affordable; the paper does not say which).
* ``spectral``: per-cluster means of ``SpectralClustering`` labels; RBF affinity with the median
  heuristic ``gamma = 1 / median squared distance`` (sklearn's fixed ``gamma = 1`` makes every
  affinity of 4096-d latents zero).
* ``dbscan``: per-cluster means of ``DBSCAN`` clusters (noise excluded). ``eps`` defaults to the
  ``eps_quantile`` quantile of the distances to the ``min_samples``-th neighbour (so that fraction
  of the points are core points). Fewer than k clusters: the missing modes go one at a time to the
  cluster with the most members per mode (D'Hondt rule), and each cluster is split by k-means into
  its share (a cluster with one share gives its mean). More than k clusters: the k largest are kept.
  No cluster, or fewer clustered points than k: k-means on all points.
* ``random``: k distinct real latents drawn uniformly (the paper's "Random" ablation).

The paper's ablation (App. D, ImageNette IPC 10): random 59.6, DBSCAN 61.3, spectral 64.5,
GMM 66.9, k-means closest 64.6, k-means centroid 66.4 (default).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from gendd.errors import ConfigError, DataError
from gendd.registry import Registry


@dataclass
class Modes:
    """Result of :func:`discover_modes`.

    Attributes:
        modes: ``(k, C, h, w)`` float32.
        method: the mode method's name.
        assignments: ``(n,)`` int64 index of the mode each input latent belongs to (-1: noise, or a
            cluster that was not kept); None where the method has no clustering (``random``).
        indices: ``(k,)`` int64 rows of the input that the modes are (real-latent methods only).
    """

    modes: torch.Tensor
    method: str
    assignments: torch.Tensor | None = None
    indices: torch.Tensor | None = None


# A finder maps (x (n, d) float64, k, seed, **options) to (centres (k, d), assignments | None, indices | None).
Finder = Callable[..., tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]


def _kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, None]:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit(x)
    return km.cluster_centers_, km.labels_, None


def _kmeans_closest(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centres, labels, _ = _kmeans(x, k, seed)
    d = torch.cdist(torch.from_numpy(centres), torch.from_numpy(x))  # (k, n)
    order = torch.argsort(d.flatten(), stable=True).tolist()
    n = x.shape[0]
    pick = [-1] * k
    used_point: set[int] = set()
    left = k
    for flat in order:  # greedy: the closest unmatched (centroid, latent) pair first
        c, p = divmod(flat, n)
        if pick[c] < 0 and p not in used_point:
            pick[c] = p
            used_point.add(p)
            left -= 1
            if left == 0:
                break
    idx = np.asarray(pick, dtype=np.int64)
    return x[idx], labels, idx


def _minibatch_kmeans(x: np.ndarray, k: int, seed: int,
                      batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, None]:
    from sklearn.cluster import MiniBatchKMeans

    b = k if batch_size is None else int(batch_size)
    if b < k:
        raise ConfigError(f"minibatch-kmeans batch_size {b} must be >= k = {k} (D4M: km_expand * ipc)")
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=b, n_init="auto")
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    chunks = [perm[i:i + b] for i in range(0, len(perm), b)]
    if len(chunks) > 1 and len(chunks[0]) < k:  # pragma: no cover - b >= k makes this impossible
        chunks = [perm]
    for ch in chunks:
        km.partial_fit(x[ch])
    return km.cluster_centers_, km.predict(x), None


def _gmm(x: np.ndarray, k: int, seed: int, covariance_type: str = "diag", reg_covar: float = 1e-6,
         max_iter: int = 100) -> tuple[np.ndarray, np.ndarray, None]:
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(n_components=k, covariance_type=covariance_type, reg_covar=reg_covar,
                         max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # ConvergenceWarning subclasses it
        gm.fit(x)
    return gm.means_, gm.predict(x), None


def _median_gamma(x: np.ndarray) -> float:
    t = torch.from_numpy(x)
    d2 = torch.cdist(t, t).pow(2)
    off = d2[~torch.eye(len(t), dtype=torch.bool)]
    med = float(off.median()) if off.numel() else 1.0
    return 1.0 / med if med > 0 else 1.0


def _spectral(x: np.ndarray, k: int, seed: int, affinity: str = "rbf", gamma: float | None = None,
              n_neighbors: int = 10) -> tuple[np.ndarray, np.ndarray, None]:
    from sklearn.cluster import SpectralClustering

    if k == 1:
        return x.mean(0, keepdims=True), np.zeros(len(x), dtype=np.int64), None
    g = _median_gamma(x) if gamma is None and affinity == "rbf" else (1.0 if gamma is None else gamma)
    sc = SpectralClustering(n_clusters=k, affinity=affinity, gamma=g, n_neighbors=min(n_neighbors, len(x) - 1),
                            random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # "graph is not fully connected"
        labels = sc.fit_predict(x)
    return _clusters_to_modes(x, labels, k, seed)


def _dbscan(x: np.ndarray, k: int, seed: int, eps: float | None = None, min_samples: int = 5,
            eps_quantile: float = 0.5) -> tuple[np.ndarray, np.ndarray, None]:
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import NearestNeighbors

    m = max(1, min(int(min_samples), len(x)))
    if eps is None:
        if not 0.0 < eps_quantile <= 1.0:
            raise ConfigError(f"dbscan eps_quantile must be in (0, 1], got {eps_quantile}")
        kdist = NearestNeighbors(n_neighbors=m).fit(x).kneighbors(x)[0][:, -1]  # self included, as DBSCAN
        eps = float(np.quantile(kdist, eps_quantile))
        eps = eps if eps > 0 else 1e-12
    labels = DBSCAN(eps=eps, min_samples=m).fit_predict(x)
    return _clusters_to_modes(x, labels, k, seed)


def _dhondt(sizes: list[int], k: int) -> list[int]:
    """One share per cluster, then each further share to the cluster with most members per share."""
    shares = [1] * len(sizes)
    for _ in range(k - len(sizes)):
        j = max((i for i in range(len(sizes)) if shares[i] < sizes[i]), key=lambda i: (sizes[i] / shares[i], -i))
        shares[j] += 1
    return shares


def _clusters_to_modes(x: np.ndarray, labels: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, None]:
    """Cluster labels (-1 = noise) -> exactly k means; the fill rule of the module docstring."""
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    if len(ids) == 0 or sizes.sum() < k:
        return _kmeans(x, k, seed)
    order = sorted(range(len(ids)), key=lambda i: (-sizes[i], ids[i]))[:k]  # largest first
    keep, keep_sizes = [int(ids[i]) for i in order], [int(sizes[i]) for i in order]
    shares = _dhondt(keep_sizes, k) if len(keep) < k else [1] * k
    centres, out = [], np.full(len(x), -1, dtype=np.int64)
    for cid, share in zip(keep, shares):
        members = np.flatnonzero(labels == cid)
        if share == 1:
            out[members] = len(centres)
            centres.append(x[members].mean(0))
        else:
            sub_c, sub_l, _ = _kmeans(x[members], share, seed)
            out[members] = len(centres) + sub_l
            centres.extend(sub_c)
    return np.stack(centres), out, None


def _random(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, None, np.ndarray]:
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(x.shape[0], generator=g)[:k].numpy().astype(np.int64)
    return x[idx], None, idx


#: mode-discovery algorithms by name (:class:`gendd.registry.Registry`).
MODE_METHODS: Registry[Finder] = Registry("mode method", lambda: {
    "kmeans": _kmeans,
    "kmeans-closest": _kmeans_closest,
    "minibatch-kmeans": _minibatch_kmeans,
    "gmm": _gmm,
    "spectral": _spectral,
    "dbscan": _dbscan,
    "random": _random,
})


def check_mode_method(method: str) -> None:
    MODE_METHODS.get(method)


def discover_modes(latents: torch.Tensor, k: int, method: str = "kmeans", *, seed: int | None = None,
                   generator: torch.Generator | None = None, **opts) -> Modes:
    """Find ``k`` modes of ``latents`` ``(n, C, h, w)`` with ``method`` (see the module docstring).

    Randomness comes from ``seed`` (sklearn's ``random_state``); without it, one integer is drawn
    from ``generator``; with neither, seed 0 (the references' ``random_state=0``). The same inputs
    and seed give the same modes. ``opts`` are the method's options (e.g. ``batch_size`` for
    ``minibatch-kmeans``, ``eps``/``min_samples``/``eps_quantile`` for ``dbscan``,
    ``covariance_type`` for ``gmm``, ``affinity``/``gamma``/``n_neighbors`` for ``spectral``).
    """
    check_mode_method(method)
    fn = MODE_METHODS[method]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("x", "k", "seed")]
    bad = sorted(set(opts) - set(allowed))
    if bad:
        raise ConfigError(f"mode method {method!r} has no option(s) {', '.join(bad)}; "
                          f"options: {', '.join(allowed) or 'none'}")
    if latents.dim() < 2:
        raise DataError(f"latents must be (n, ...) with n the number of latents, got shape {tuple(latents.shape)}")
    n = latents.shape[0]
    if k < 1:
        raise ConfigError(f"the number of modes must be >= 1, got {k}")
    if k > n:
        raise DataError(f"cannot find {k} modes among {n} latents; lower k (the IPC) or add images")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else 0
    x = latents.detach().reshape(n, -1).cpu().double().numpy()
    if not np.isfinite(x).all():
        raise DataError("latents contain NaN or Inf; rebuild the latent cache")
    centres, assign, idx = fn(x, k, int(seed), **opts)
    modes = torch.from_numpy(np.ascontiguousarray(centres)).float().reshape(k, *latents.shape[1:])
    if idx is not None:  # real latents: return them bit for bit
        modes = latents.detach().cpu()[torch.from_numpy(idx)].float().clone()
    return Modes(modes=modes, method=method,
                 assignments=None if assign is None else torch.as_tensor(np.asarray(assign), dtype=torch.long),
                 indices=None if idx is None else torch.from_numpy(idx))
