"""``herding`` and ``kcenter``: coreset selection baselines of the DC/DSA/DM tables.

Both pick ``ipc`` real images per class from a feature vector per image, greedily and without
replacement (no duplicates; ties go to the lowest position, so the result is deterministic):

* **Herding** (Welling, ICML'09; the greedy mean-matching form of iCaRL, Rebuffi et al. CVPR'17,
  used as a DD baseline by Zhao et al. ICLR'21): with class mean ``mu`` and the ``k - 1`` features
  already chosen, pick ``argmin_j || mu - (x_j + sum_{i<k} x_i) / k ||``, i.e. the item that brings
  the running mean of the selection closest to the class mean. The order is a prefix order: the
  first ``m`` picks of an IPC-``n`` run are the IPC-``m`` selection.
  Note: ``PatrickZH/DeepCore`` ``herding.py`` takes the ``argmax`` of this distance (farthest item),
  which contradicts the method; we follow the paper (``argmin``).
* **k-center greedy** (Sener & Savarese, ICLR'18, "core-set" farthest-first traversal): after a
  start item, repeatedly add ``argmax_j min_{i in S} || x_j - x_i ||``. Start rule (``start``):
  ``"mean"`` (default) the item closest to the class mean, seed-free; ``"random"`` a uniform draw
  from the class generator, as ``DeepCore`` ``kCenterGreedy.py`` and Google's active-learning
  ``kcenter_greedy.py`` do when nothing is selected yet.

Feature spaces (``feature_space``): ``"latent"`` the cached VAE latents (posterior mean, flattened;
needs a backbone and the latent cache), ``"pixel"`` the raw pixels (flattened, [0, 1]; no
backbone). The DC paper ran both baselines on features of a ConvNet trained on the full data;
``"teacher"`` is reserved for that and is refused until a feature extractor exists.
Distances are Euclidean, computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch

from gendd.config import check
from gendd.data.base import to_float
from gendd.errors import ConfigError, DataError
from gendd.methods.base import ClassContext, ClassResult, Method, MethodConfig

FEATURE_SPACES = ("latent", "pixel")


def _check_k(n: int, k: int) -> None:
    if k < 1:
        raise ConfigError(f"need at least 1 item to select, got {k}")
    if k > n:
        raise DataError(f"cannot select {k} items from {n}; lower the IPC")


def herding_order(features: torch.Tensor, k: int) -> list[int]:
    """Positions of ``k`` rows of ``features (n, d)`` chosen by herding, in selection order.

    Step ``t`` (1-based) picks ``argmin_j ||t * mu - s - x_j||^2 = argmin_j ||x_j||^2 - 2 x_j.(t mu - s)``
    over unselected ``j`` (``s`` = sum of the chosen rows), the same as minimising the distance of
    the new running mean to ``mu``.
    """
    x = features.reshape(features.shape[0], -1).double()
    n = x.shape[0]
    _check_k(n, k)
    mu = x.mean(0)
    sq = (x * x).sum(1)
    s = torch.zeros_like(mu)
    taken = torch.zeros(n, dtype=torch.bool)
    order: list[int] = []
    for t in range(1, k + 1):
        score = sq - 2.0 * (x @ (t * mu - s))
        score[taken] = float("inf")
        j = int(torch.argmin(score))
        order.append(j)
        taken[j] = True
        s += x[j]
    return order


def kcenter_order(features: torch.Tensor, k: int, start: str = "mean",
                  generator: torch.Generator | None = None) -> list[int]:
    """Positions of ``k`` rows of ``features (n, d)`` by k-center greedy (farthest-first), in order.

    ``start="mean"``: first the row closest to the mean; ``"random"``: a uniform draw from
    ``generator``. Then ``argmax_j min_{i in S} ||x_j - x_i||`` over unselected ``j``.
    """
    if start not in ("mean", "random"):
        raise ConfigError(f"k-center start must be 'mean' or 'random', got {start!r}")
    x = features.reshape(features.shape[0], -1).double()
    n = x.shape[0]
    _check_k(n, k)
    sq = (x * x).sum(1)

    def dist2(v: torch.Tensor) -> torch.Tensor:  # ||x_j - v||^2 for all j
        return (sq - 2.0 * (x @ v) + (v * v).sum()).clamp_(min=0.0)

    if start == "mean":
        first = int(torch.argmin(dist2(x.mean(0))))
    else:
        first = int(torch.randint(n, (1,), generator=generator))
    order = [first]
    taken = torch.zeros(n, dtype=torch.bool)
    taken[first] = True
    mins = dist2(x[first])
    for _ in range(k - 1):
        score = mins.masked_fill(taken, -1.0)
        j = int(torch.argmax(score))
        order.append(j)
        taken[j] = True
        mins = torch.minimum(mins, dist2(x[j]))
    return order


@dataclass
class SelectionConfig(MethodConfig):
    """Attributes: feature_space ("latent": cached VAE latents, needs a backbone; "pixel": raw pixels;
    "teacher": reserved, not available yet)."""

    config_what: ClassVar[str] = "herding"

    feature_space: Literal["latent", "pixel"] = field(default="latent", metadata=check(choices=FEATURE_SPACES))


@dataclass
class KCenterConfig(SelectionConfig):
    """Adds start: "mean" (item closest to the class mean; default) or "random" (DeepCore's rule)."""

    config_what: ClassVar[str] = "kcenter"

    start: Literal["mean", "random"] = field(default="mean", metadata=check(choices=("mean", "random")))


class _Selection(Method):
    """Shared part: class features -> positions -> real images (+ latents)."""

    config_class = SelectionConfig
    selects_real = True

    # The cache (and so the backbone) is needed only in latent space; export.distill and the pipeline
    # read these on the instance.
    @property
    def needs_cache(self) -> bool:  # type: ignore[override]
        return self.config.feature_space == "latent"

    @property
    def needs_backbone(self) -> bool:  # type: ignore[override]
        return self.config.feature_space == "latent"

    def order(self, features: torch.Tensor, ctx: ClassContext) -> list[int]:  # pragma: no cover
        raise NotImplementedError

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        latents = None
        if self.config.feature_space == "latent":
            if ctx.cache is None:
                raise ConfigError(f"{self.name} with feature_space='latent' needs the latent cache; "
                                  "run it with a backbone or use feature_space='pixel'")
            z, ind = ctx.cache.load(ctx.label)
            ind = ind.numpy()
            _, first = np.unique(ind, return_index=True)  # drop flipped copies (they repeat an index)
            rows = np.sort(first)
            z, ind = z[rows], ind[rows]
            if ctx.ipc > len(ind):
                raise DataError(f"IPC {ctx.ipc} exceeds the {len(ind)} images of class {ctx.name!r}")
            pos = self.order(z.flatten(1), ctx)
            pick = ind[pos]
            latents = z[pos]
            images = ctx.dataset.load(pick)
        else:
            idx = ctx.dataset.class_indices(ctx.label)
            if ctx.ipc > len(idx):
                raise DataError(f"IPC {ctx.ipc} exceeds the {len(idx)} images of class {ctx.name!r}")
            feats = ctx.dataset.load(idx).flatten(1).double().div_(255.0)
            pos = self.order(feats, ctx)
            pick = idx[pos]
            images = ctx.dataset.load(pick)
            if ctx.backbone is not None:  # as `random`: latents of the chosen images when a backbone is given
                latents = ctx.backbone.encode(to_float(images))
        return ClassResult(latents=latents, images=images, extra={"indices": [int(i) for i in pick]})


class Herding(_Selection):
    name = "herding"
    config_class = SelectionConfig
    summary = "herding: real images whose running feature mean tracks the class mean"

    def order(self, features: torch.Tensor, ctx: ClassContext) -> list[int]:
        return herding_order(features, ctx.ipc)


class KCenter(_Selection):
    name = "kcenter"
    config_class = KCenterConfig
    summary = "k-center greedy: farthest-first real images in feature space"

    def order(self, features: torch.Tensor, ctx: ClassContext) -> list[int]:
        return kcenter_order(features, ctx.ipc, self.config.start, ctx.generator)
