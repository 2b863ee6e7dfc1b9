"""Run a method over every class and write the distilled set.

Output folder::

    out/<class>/<i>.png            # ImageFolder, dataset geometry
    out/latents/<class>.safetensors  # {"latents": ..., plus method tensors such as modes}
    out/manifest.json              # method, config, seeds, versions, backbone, dataset, sha256 per file

Each class is written into ``out/.partial-<class>/`` and renamed to ``out/<class>/`` once complete;
the rename is the commit point, so an interrupted run leaves no half-written class and a re-run
resumes at the first class that is missing. The manifest is rewritten (atomically) after each class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from gendd.data.base import ImageDataset, to_uint8
from gendd.errors import ConfigError, DataError, GenddError
from gendd.methods.base import ClassContext, ClassResult, Method, seed_for
from gendd.artifacts import commit_dir, save_safetensors, write_json
from gendd.distributed import World, current_world

MANIFEST = "manifest.json"
RECORDS = ".records"  # per-class records the manifest is assembled from


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("gendd", "torch", "diffusers", "numpy", "safetensors", "scikit-learn", "Pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_png(image: torch.Tensor, path: Path) -> None:
    """uint8 (C, H, W) -> PNG (greyscale for C = 1, RGB for C = 3)."""
    arr = image.cpu().numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    Image.fromarray(arr).save(path, format="PNG")


def save_grid(images: torch.Tensor, nrow: int, path: str | os.PathLike, pad: int = 2) -> None:
    """uint8 (N, C, H, W) -> one PNG grid, ``nrow`` images per row."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    save_png(grid, Path(path))


def check_ipc(ipc: Any) -> int:
    """``ipc`` if it is an integer >= 1, else ConfigError (checked before any data is read)."""
    if isinstance(ipc, bool) or not isinstance(ipc, Integral) or ipc < 1:
        raise ConfigError(f"IPC must be an integer >= 1, got {ipc!r}")
    return int(ipc)


def _run_identity(method: Method, dataset: ImageDataset, ipc: int, backbone) -> dict[str, Any]:
    """What must match for a re-run to resume into the same folder."""
    return {"method": method.name, "config": dataclasses.asdict(method.config), "ipc": ipc,
            "dataset": {"name": dataset.name, "split": dataset.split, "fingerprint": dataset.fingerprint(),
                        "classes": list(dataset.classes)},
            "backbone": None if backbone is None else {
                "path": getattr(backbone, "source_path", None), "hash": backbone.content_hash(),
                **backbone.execution()}}


def distill(method: Method, dataset: ImageDataset, ipc: int, out: str | os.PathLike, *, backbone=None,
            cache=None, classes: list[int] | None = None, progress: bool = True,
            overwrite: bool = False, class_batch: int = 1) -> dict[str, Any]:
    """Distil ``dataset`` into ``ipc`` items per class with ``method`` and export to ``out``.

    Args:
        classes: restrict to these local class indices (default all); a later call with the rest
            completes the same folder.
        overwrite: delete an existing folder of a different run instead of refusing.
        class_batch: classes a sampling method denoises in one request (:meth:`Method.distill_classes`; a GPU
            throughput knob, not part of the run's identity). 1 (default) is one class at a time, whose results
            the code guarantees bit for bit; a larger batch equals them up to float rounding. Each class is still
            committed on its own.

    A user error (GenddError) after this call created ``out`` removes ``out`` again; a folder that existed
    before (a resumed run) keeps its finished classes. An interruption (Ctrl-C) keeps them too, to resume.

    Returns the manifest dict.
    """
    ipc = check_ipc(ipc)
    if isinstance(class_batch, bool) or not isinstance(class_batch, int) or class_batch < 1:
        raise ConfigError(f"class_batch must be an integer >= 1, got {class_batch!r}")
    if method.needs_backbone and backbone is None:
        raise ConfigError(f"method {method.name!r} needs a backbone (--backbone)")
    if method.needs_cache and cache is None:
        raise ConfigError(f"method {method.name!r} needs the latent cache of the dataset")
    classes = list(range(dataset.num_classes)) if classes is None else list(classes)
    for c in classes:  # fail before writing anything
        n = len(dataset.class_indices(c))
        if method.selects_real and ipc > n:
            raise DataError(f"IPC {ipc} exceeds the {n} images of class {dataset.classes[c]!r}")
    out = Path(out)
    identity = _run_identity(method, dataset, ipc, backbone)
    mpath = out / MANIFEST
    world = current_world()
    if mpath.exists():
        old = json.loads(mpath.read_text())
        same = {k: old.get(k) for k in identity} == json.loads(json.dumps(identity, default=str))
        if not same:
            if not overwrite:
                raise ConfigError(f"{out} holds a different distillation run; choose another --out "
                                  "or pass --overwrite")
            world.barrier()  # every rank has read the old manifest before rank 0 removes it
            if world.is_main:
                shutil.rmtree(out)
    created = not out.exists()
    try:
        return _export(method, dataset, ipc, out, identity, classes, backbone, cache, progress, world, class_batch)
    except GenddError:
        if created and world.is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _export(method: Method, dataset: ImageDataset, ipc: int, out: Path, identity: dict, classes: list[int],
            backbone, cache, progress: bool, world: World, class_batch: int = 1) -> dict[str, Any]:
    """The class loop of :func:`distill` (arguments checked there). Each class is written to
    ``out/.partial-<class>``, its record (seed, seconds, method facts, file hashes) to ``out/.records/<class>.json``,
    and then the folder is renamed into place: the commit point. The manifest is assembled from the records
    (by rank 0 under torch.distributed, after every rank has committed its classes)."""
    mpath = out / MANIFEST
    records = out / RECORDS
    world.barrier()  # rank 0 may have removed an old run
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "latents").mkdir(exist_ok=True)
        records.mkdir(exist_ok=True)
        for stale in out.glob(".partial-*"):  # left by an interrupted run
            shutil.rmtree(stale)
    world.barrier()
    todo = [c for c in classes if not (out / dataset.classes[c]).is_dir()]
    world.barrier()  # every rank has listed the same classes before any is committed
    mine = world.shard(todo)
    manifest = _base_manifest(method, identity, mpath, dataset, backbone)
    bar = tqdm(total=len(mine), desc=f"{method.name} ipc={ipc}" + (f" rank {world.rank}" if world.size > 1 else ""),
               disable=not progress)
    for g0 in range(0, len(mine), class_batch):
        group = mine[g0:g0 + class_batch]
        t0 = time.time()
        ctxs = [ClassContext.create(dataset, c, ipc, method.config.seed, backbone=backbone, cache=cache,
                                    progress=progress) for c in group]
        results = method.distill_classes(ctxs) if len(ctxs) > 1 else [method.distill_class(ctxs[0])]
        seconds = (time.time() - t0) / len(group)
        for c, res in zip(group, results):
            _commit_class(method, dataset, ipc, out, backbone, c, res, seconds, world, manifest)
            bar.update(1)
    bar.close()
    world.barrier()
    if world.is_main:
        for c in range(dataset.num_classes):
            name = dataset.classes[c]
            if (out / name).is_dir() and (records / f"{name}.json").is_file():
                _add_record(manifest, name, json.loads((records / f"{name}.json").read_text()))
        manifest["complete"] = all((out / dataset.classes[c]).is_dir() for c in range(dataset.num_classes))
        manifest["seconds_total"] = round(sum(v["seconds"] for v in manifest["classes_done"].values()), 3)
        write_json(mpath, manifest)
    world.barrier()
    return json.loads(mpath.read_text()) if not world.is_main else manifest


def _commit_class(method: Method, dataset: ImageDataset, ipc: int, out: Path, backbone, c: int, res: ClassResult,
                  seconds: float, world: World, manifest: dict) -> None:
    """Decode, write and commit one class's result (the commit point is the rename of its folder);
    ``seconds``: its share of the method's time, to which its decoding and writing are added."""
    t0 = time.time()
    name = dataset.classes[c]
    images = res.images
    if images is None:
        if res.latents is None:
            raise ConfigError(f"method {method.name} returned neither images nor latents")
        images = torch.cat([to_uint8(backbone.decode(res.latents[i:i + 64]))
                            for i in range(0, res.latents.shape[0], 64)])
    if images.shape[0] != ipc:
        raise ConfigError(f"method {method.name} returned {images.shape[0]} items for class {name}, "
                          f"expected {ipc}")
    part = out / f".partial-{name}"
    part.mkdir()
    for i, img in enumerate(images):
        save_png(img, part / f"{i}.png")
    files = {f"{name}/{i}.png": sha256_file(part / f"{i}.png") for i in range(ipc)}
    tensors = dict(res.tensors)
    if res.latents is not None:
        tensors["latents"] = res.latents.float().cpu()
    if tensors:
        lat = out / "latents" / f"{name}.safetensors"
        save_safetensors(lat, {k: v.contiguous() for k, v in tensors.items()})
        files[f"latents/{name}.safetensors"] = sha256_file(lat)
    record = {"seed": seed_for(method.config.seed, c), "seconds": round(seconds + time.time() - t0, 3),
              **res.extra, "files": files}
    write_json(out / RECORDS / f"{name}.json", record)
    commit_dir(part, out / name)  # commit point
    if world.size == 1:  # one process: the manifest follows every class
        _add_record(manifest, name, record)
        write_json(out / MANIFEST, manifest)


def _base_manifest(method: Method, identity: dict, mpath: Path, dataset: ImageDataset, backbone) -> dict[str, Any]:
    """The saved manifest (a resumed run) or a new one, with where the data was read and resolved options."""
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {
        **identity, "seed_rule": "class generator seed = (seed * 1000003 + class index) mod 2**63",
        "versions": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "classes_done": {}, "files": {}}
    # where the data was read (not part of the run's identity: a moved copy of the same data resumes);
    # `gendd evaluate` finds the test split there without --data-root
    manifest["dataset_root"] = dataset.root
    resolve = getattr(method.config, "resolved", None)
    if resolve is not None and backbone is not None:  # what "auto"/None options became for this backbone
        manifest["resolved"] = resolve(backbone)
    if getattr(backbone, "text_conditioned", False):  # how images entered the RGB VAE and left it
        manifest["geometry"] = backbone.geometry()
    return manifest


def _add_record(manifest: dict, name: str, record: dict) -> None:
    record = dict(record)
    manifest["files"].update(record.pop("files", {}))
    manifest["classes_done"][name] = record
