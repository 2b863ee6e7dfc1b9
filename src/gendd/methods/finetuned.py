"""Sampling from a fine-tuned DiT: ``minimax``, ``memory`` and ``memory+mgd3``.

* ``minimax`` (Gu et al., CVPR 2024): fine-tune with Minimax's representativeness/diversity memories
  and FIFO eviction, then sample as ``dit`` (DDPM-50, CFG).
* ``memory`` (Li et al., ICIP 2025, "Diversity-driven generative dataset distillation based on
  diffusion model with self-adaptive memory"): the same fine-tune with max-similarity eviction, then
  sample as ``dit``.
* ``memory+mgd3``: the ``memory`` fine-tune, then MGD3's mode-guided sampling (:mod:`gendd.methods.mgd3`).

The fine-tune (:mod:`gendd.backbone.finetune`) is a per-dataset step: :meth:`prepare` runs it once
before the class loop (or loads ``finetuned_backbone``) and returns the backbone to sample with. A
fine-tune is stored under ``<work_dir>/<key>``, ``key`` a hash of the dataset, the base backbone and
the fine-tuning config, so every IPC and every method with the same fine-tuning options reuses it
(``memory`` and ``memory+mgd3`` share one). With ``class_chunk`` there is one model per chunk and each
class samples from its chunk's model. The per-class part is ``dit``'s / ``mgd3``'s, unchanged: the
same seed gives the same starting noise as ``dit``. The fine-tune has its own seed (``finetune.seed``,
default 0), independent of the sampling ``seed``: as in the references, one fine-tuned model serves
every generated set. The VAE is not fine-tuned, so a latent cache built with the base backbone serves
``memory+mgd3``'s mode discovery unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from gendd.backbone.finetune import (FinetuneConfig, FinetunedChunk, FinetuneResult, default_finetune_dir,
                                     finetune_dataset, finetune_key, load_finetuned, load_finetuned_backbone)
from gendd.config import check, config_error
from gendd.errors import ConfigError
from gendd.methods.base import ClassContext, ClassResult
from gendd.methods.dit import DiTConfig, DiTSampling
from gendd.methods.mgd3 import MGD3, MGD3Config


@dataclass
class _FinetuneOptions:
    """Attributes: finetuned_backbone (a finished ``gendd`` fine-tune folder, or a diffusers DiT folder,
    to sample with; None = fine-tune first), finetune (:class:`FinetuneConfig` options as a dict,
    merged onto the method's defaults, e.g. ``{"steps": 1500, "batch_size": 32}``).

    Options not given in the dict take the backbone folder's ``gendd_finetune.json`` values when it has
    one (the shipped Fashion-MNIST backbone does: a step count that fits a small DiT), else the
    :class:`FinetuneConfig` defaults (the reference's DiT-XL/2 values). A :class:`FinetuneConfig`
    object is used as given. The resolved options are what the manifest records."""

    finetuned_backbone: str | None = field(default=None, metadata=check(str, os.PathLike, optional=True))
    finetune: Any = field(default=None, metadata=check(dict, FinetuneConfig, optional=True))

    default_eviction: ClassVar[str] = "fifo"

    def __post_init__(self) -> None:
        super().__post_init__()  # validates every field (MethodConfig is later in the MRO)
        if not isinstance(self.finetune, FinetuneConfig):
            given = set(self.finetune or {})
            try:
                self.finetune = FinetuneConfig.from_options(self.finetune, eviction=self.default_eviction)
            except ConfigError as err:
                raise config_error(self._config_what(), f"finetune: {getattr(err, 'config_detail', err)}") from None
        else:
            given = {f.name for f in dataclasses.fields(FinetuneConfig)}
        object.__setattr__(self, "_finetune_given", given)  # not a field: stays out of the manifest

    def resolve_finetune(self, backbone: Any) -> FinetuneConfig:
        """``finetune`` with the backbone's fine-tuning defaults filled in where the user set nothing."""
        given = getattr(self, "_finetune_given", set())
        extra = {k: v for k, v in getattr(backbone, "finetune_defaults", {}).items()
                 if k not in given and k != "eviction"}
        return dataclasses.replace(self.finetune, **extra) if extra else self.finetune


@dataclass
class MinimaxConfig(_FinetuneOptions, DiTConfig):
    """dit's options plus finetuned_backbone and finetune (see ``_FinetuneOptions``); eviction fifo."""

    config_what: ClassVar[str] = "minimax"
    default_eviction: ClassVar[str] = "fifo"


@dataclass
class MemoryConfig(_FinetuneOptions, DiTConfig):
    """dit's options plus finetuned_backbone and finetune; eviction max-similarity."""

    config_what: ClassVar[str] = "memory"
    default_eviction: ClassVar[str] = "max-similarity"


@dataclass
class MemoryMGD3Config(_FinetuneOptions, MGD3Config):
    """mgd3's options plus finetuned_backbone and finetune; eviction max-similarity."""

    config_what: ClassVar[str] = "memory+mgd3"
    default_eviction: ClassVar[str] = "max-similarity"


class _FromFinetuned:
    """Mixin: :meth:`prepare` fine-tunes (or loads) once; :meth:`distill_class` samples from the
    model of the class's chunk with the parent method."""

    needs_backbone = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._result: FinetuneResult | None = None
        self._chunk_of: dict[str, FinetunedChunk] = {}
        self._base = None
        self._loaded: tuple[Path, Any] | None = None

    def prepare(self, dataset, backbone, *, cache_dir: str | os.PathLike | None = None,
                work_dir: str | os.PathLike | None = None, progress: bool = True):
        """Fine-tune ``backbone`` on ``dataset`` (resumable; skipped when already done or when
        ``finetuned_backbone`` is set) and return the backbone to sample with: the fine-tuned one,
        or ``backbone`` itself when classes are spread over several chunk models (each class then
        samples from its own; all share ``backbone``'s VAE).

        Args:
            cache_dir: root of the latent cache the fine-tune encodes into (default: gendd's).
            work_dir: root of the fine-tune folders (default ``$GENDD_FINETUNE`` or
                ``~/.cache/gendd/finetuned``); the run goes to ``<work_dir>/<key>``.
        """
        cfg = self.config
        if backbone.text_conditioned:
            raise ConfigError(f"{self.name} fine-tunes a class-conditional DiT; a text-to-image backbone cannot be "
                              "fine-tuned by gendd (use dit, mgd3, d4m or d3hr with it)")
        if cfg.finetuned_backbone is not None:
            result = load_finetuned(cfg.finetuned_backbone)
        else:
            cfg.finetune = cfg.resolve_finetune(backbone)
            root = Path(work_dir) if work_dir is not None else default_finetune_dir()
            out = root / finetune_key(dataset, backbone, cfg.finetune)
            result = finetune_dataset(dataset, backbone, out, cfg.finetune, cache_dir=cache_dir, progress=progress)
        chunk_of = {}
        for name in dataset.classes:
            chunk = result.chunk_for(name)
            if chunk is None:
                raise ConfigError(f"the fine-tune in {result.out} has no model for class {name!r}; fine-tune "
                                  "on this dataset or leave finetuned_backbone unset")
            chunk_of[name] = chunk
        self._result, self._chunk_of, self._base, self._loaded = result, chunk_of, backbone, None
        paths = {ch.path for ch in chunk_of.values()}
        return self._backbone_at(paths.pop()) if len(paths) == 1 else backbone

    def _backbone_at(self, path: Path):
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = (path, load_finetuned_backbone(self._base, path))
        return self._loaded[1]

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        return self.distill_classes([ctx])[0]

    def distill_classes(self, ctxs: list[ClassContext]) -> list[ClassResult]:
        if self._result is None:  # not prepared by the pipeline: fine-tune with the default folders
            self.prepare(ctxs[0].dataset, ctxs[0].backbone, progress=ctxs[0].progress)
        results = []
        for path, group in itertools.groupby(ctxs, key=lambda c: self._chunk_of[c.name].path):
            bb = self._backbone_at(path)  # consecutive classes of one chunk are sampled together
            for res in super().distill_classes([dataclasses.replace(c, backbone=bb) for c in group]):
                res.extra["finetuned_backbone"] = str(path)
                results.append(res)
        return results


class Minimax(_FromFinetuned, DiTSampling):
    name = "minimax"
    config_class = MinimaxConfig
    summary = "DiT fine-tuned with Minimax's representativeness/diversity memories (FIFO), then sampled"


class MemoryFinetuned(_FromFinetuned, DiTSampling):
    name = "memory"
    config_class = MemoryConfig
    summary = "DiT fine-tuned with self-adaptive (max-similarity) memories, then sampled (Li et al. 2025)"


class MemoryMGD3(_FromFinetuned, MGD3):
    name = "memory+mgd3"
    config_class = MemoryMGD3Config
    summary = "self-adaptive-memory fine-tune, then MGD3 mode-guided sampling"
