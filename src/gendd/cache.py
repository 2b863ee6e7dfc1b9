"""Latent cache: a dataset encoded once per (dataset, backbone, transform), one safetensors file a class.

Layout::

    <cache_dir>/<key>/meta.json
    <cache_dir>/<key>/class_0000.safetensors   # {"latents": (n, C, h, w) float32, "indices": (n,) int64}

``key`` is a sha256 over the dataset fingerprint, the backbone's content hash and the transform
(padding, flip, posterior mean vs sample). A class file appears only once complete (written to a
temporary name, then renamed), so an interrupted encode resumes at the first missing class.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from gendd.data.base import ImageDataset, to_float
from gendd.errors import ConfigError
from gendd.artifacts import save_safetensors, write_text
from gendd.distributed import current_world


def default_cache_dir() -> Path:
    """``$GENDD_CACHE`` or ``~/.cache/gendd/latents``."""
    return Path(os.environ.get("GENDD_CACHE", Path.home() / ".cache" / "gendd" / "latents"))


@dataclass(frozen=True)
class EncodeSpec:
    """How images become cached latents.

    Attributes:
        sample: draw ``z ~ q(z|x)`` instead of taking the posterior mean (MGD3 and the references
            use the mean for modes; D3HR samples).
        flip: also store the horizontally flipped copy of every image (MGD3's reference loader
            flips at random; storing both halves is its deterministic equivalent).
        random_flip: instead, store each image once, horizontally flipped with probability 1/2 (a
            seeded draw per class): what the reference loader's ``RandomHorizontalFlip`` gives in one
            pass, at half the encoding cost of ``flip``.
        seed: randomness of ``sample=True`` and of ``random_flip``.
    """

    sample: bool = False
    flip: bool = False
    random_flip: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.flip and self.random_flip:
            raise ConfigError("EncodeSpec: flip (both orientations) and random_flip exclude each other")


def cache_key(dataset: ImageDataset, backbone, spec: EncodeSpec) -> str:
    h = hashlib.sha256(json.dumps({"dataset": dataset.fingerprint(), "backbone": backbone.content_hash(),
                                   "pad": backbone.meta.pad, "spec": asdict(spec)}, sort_keys=True).encode())
    return h.hexdigest()[:20]


class LatentCache:
    """Per-class latents of one dataset under one backbone. Build with :meth:`build`."""

    def __init__(self, root: Path, num_classes: int) -> None:
        self.root = Path(root)
        self.num_classes = num_classes

    def class_file(self, c: int) -> Path:
        return self.root / f"class_{c:04d}.safetensors"

    def is_complete(self) -> bool:
        return all(self.class_file(c).exists() for c in range(self.num_classes))

    def load(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, dataset indices)`` of class ``c``; a flipped copy shares its source index."""
        d = load_file(str(self.class_file(c)))
        return d["latents"], d["indices"]

    def latents(self, c: int) -> torch.Tensor:
        return self.load(c)[0]

    @classmethod
    def build(cls, dataset: ImageDataset, backbone, cache_dir: str | os.PathLike | None = None,
              spec: EncodeSpec = EncodeSpec(), batch_size: int = 256, progress: bool = True) -> "LatentCache":
        """Encode every class not yet cached; return the cache."""
        key = cache_key(dataset, backbone, spec)
        root = Path(cache_dir or default_cache_dir()) / key
        root.mkdir(parents=True, exist_ok=True)
        meta = {"dataset": dataset.name, "split": dataset.split, "fingerprint": dataset.fingerprint(),
                "backbone": backbone.content_hash(), "spec": asdict(spec), "classes": dataset.classes}
        write_text(root / "meta.json", json.dumps(meta, indent=2))
        cache = cls(root, dataset.num_classes)
        world = current_world()
        todo = [c for c in range(dataset.num_classes) if not cache.class_file(c).exists()]
        world.barrier()  # every rank has listed the same classes before any is written
        todo = world.shard(todo)
        gen = torch.Generator().manual_seed(spec.seed)
        views = [lambda x: x, lambda x: x.flip(-1)] if spec.flip else [lambda x: x]
        bar = tqdm(total=len(views) * sum(len(dataset.class_indices(c)) for c in todo), desc="encoding",
                   disable=not progress or not todo)
        for c in todo:
            idx = dataset.class_indices(c)
            gen.manual_seed(spec.seed * 100_003 + c)  # per class: resuming gives the same latents
            batches = [dataset.load(idx[b0:b0 + batch_size]) for b0 in range(0, len(idx), batch_size)]
            if spec.random_flip:
                flips = (torch.rand(len(idx), generator=gen) < 0.5).split(batch_size)
                batches = [torch.where(f.view(-1, 1, 1, 1), b.flip(-1), b) for b, f in zip(batches, flips)]
            zs = []
            for view in views:  # all originals, then all flips: images are read from disk once
                for images in batches:
                    zs.append(backbone.encode(view(to_float(images)), generator=gen, sample=spec.sample))
                    bar.update(len(images))
            z = torch.cat(zs)
            ind = torch.as_tensor(idx, dtype=torch.long).repeat(len(views))
            save_safetensors(cache.class_file(c), {"latents": z.contiguous(), "indices": ind.contiguous()},
                             metadata={"class": dataset.classes[c]})
        bar.close()
        world.barrier()  # every class file exists before anyone reads the cache
        return cache
