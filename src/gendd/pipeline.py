"""The pipeline stages the CLI calls: resolve a backbone, distil, evaluate (resumable).

data -> backbone -> latent cache -> method -> export -> evaluate -> report
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gendd.artifacts import identity, write_json
from gendd.distributed import current_world, default_device
from gendd.errors import ConfigError, DataError

#: Backbones shipped with the package: name -> folder under ``gendd/assets/backbones``. A dataset's own name
#: is its default backbone; earlier versions stay loadable by their versioned names (published numbers).
SHIPPED_BACKBONES = {"fashion-mnist": "fashion-mnist-v3", "fashion-mnist-v1": "fashion-mnist-v1",
                     "fashion-mnist-v2": "fashion-mnist-v2", "fashion-mnist-v3": "fashion-mnist-v3"}


def shipped_backbone_path(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("gendd") / "assets" / "backbones" / SHIPPED_BACKBONES[name]))


def backbone_folder(spec: str | os.PathLike) -> Path:
    """The local folder a backbone spec names (a shipped name's package folder, else the path itself)."""
    return shipped_backbone_path(str(spec)) if str(spec) in SHIPPED_BACKBONES else Path(spec)


def resolve_backbone(spec: str | os.PathLike, vae: str | os.PathLike | None = None):
    """A shipped backbone name (``fashion-mnist``), a local diffusers DiT or Stable Diffusion folder, or a hub
    id in the local Hugging Face cache (``facebook/DiT-XL-2-256``, with ``vae="stabilityai/sd-vae-ft-ema"``;
    ``stable-diffusion-v1-5/stable-diffusion-v1-5``), on this rank's device
    (:func:`gendd.distributed.default_device`). Nothing is downloaded."""
    from gendd.backbone import Backbone
    from gendd.backbone.text import TextBackbone, is_text_backbone_folder

    if str(spec) in SHIPPED_BACKBONES:
        path = shipped_backbone_path(str(spec))
        if not (path / "transformer").is_dir():
            raise ConfigError(f"the shipped backbone {spec!r} is missing from {path}; reinstall gendd or "
                              "train one with `gendd backbone train`")
        return Backbone.from_pretrained(path, vae=vae).to(default_device())
    folder, vae = _local_folder(spec), None if vae is None else _local_folder(vae)
    if is_text_backbone_folder(folder):
        return TextBackbone.from_pretrained(folder, vae=vae).to(default_device())
    return Backbone.from_pretrained(folder, vae=vae).to(default_device())


def _local_folder(spec: str | os.PathLike) -> Path:
    """``spec`` as a folder: itself, or a hub id's snapshot in the local cache."""
    folder = Path(spec)
    if not folder.exists() and str(spec).count("/") == 1:
        return cached_hub_folder(str(spec))
    return folder


def cached_hub_folder(repo_id: str) -> Path:
    """The local snapshot of hub model ``repo_id`` (``local_files_only``: gendd downloads nothing)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises several kinds here
        raise ConfigError(f"backbone {repo_id!r} is neither a folder nor in the local Hugging Face cache "
                          f"({type(err).__name__}); download it yourself or pass its folder") from None


def default_backbone_for(data: str) -> str | None:
    return data if data in SHIPPED_BACKBONES else None


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["cfg_scale=3", "sampler=ddim"]`` -> ``{"cfg_scale": 3, "sampler": "ddim"}`` (JSON values)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"option {pair!r} is not key=value")
        k, v = pair.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out


def sample_preview(bb, num_classes: int, per_class: int, config, seed: int):
    """uint8 images, ``per_class`` for each of the labels ``0..num_classes-1`` in label order (``gendd backbone
    sample``). Label ``c`` is sampled alone from its own generator (:func:`gendd.methods.base.seed_for` of ``seed``
    and ``c``: the noise `gendd distill dit` draws for a class of that label), so under torchrun the labels are split
    across the ranks and the gathered images are byte for byte those of one process."""
    import torch

    from gendd.backbone import sample
    from gendd.data.base import to_uint8
    from gendd.methods.base import seed_for

    from tqdm.auto import tqdm

    world = current_world()
    mine = {}
    for c in tqdm(world.shard(range(num_classes)), desc="classes", disable=not world.is_main, leave=False):
        g = torch.Generator().manual_seed(seed_for(seed, c))
        noise = torch.randn((per_class, *bb.latent_shape), generator=g)
        z = sample(bb, noise, torch.full((per_class,), c, dtype=torch.long), config, generator=g)
        mine[c] = to_uint8(bb.decode(z)).cpu()
    rows = {c: x for part in world.gather(mine) for c, x in part.items()}
    return torch.cat([rows[c] for c in range(num_classes)])


def run_distill(method_name: str, data: str, ipc: int, out: str | os.PathLike, *, data_root=None,
                backbone: str | None = None, vae: str | None = None, options: dict | None = None,
                cache_dir=None, progress: bool = True, overwrite: bool = False, class_batch: int = 1,
                precision: str = "fp32", compile: bool = False) -> dict:
    """Build everything a method needs and export its distilled set to ``out``.

    The method's options, the IPC and the dataset name are validated before any data or model is read
    and before ``out`` is created; a user error later removes an ``out`` this call created."""
    from gendd.data import DATASETS, get_dataset
    from gendd.export import check_ipc, distill
    from gendd.methods import build_method

    method = build_method(method_name, **(options or {}))
    ipc = check_ipc(ipc)
    if isinstance(class_batch, bool) or not isinstance(class_batch, int) or class_batch < 1:
        raise ConfigError(f"--class-batch must be an integer >= 1, got {class_batch!r}")
    from gendd.backbone.backbone import EXECUTION_PRECISIONS

    if precision not in EXECUTION_PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(EXECUTION_PRECISIONS)}, got {precision!r}")
    DATASETS.get(data)
    spec = backbone or default_backbone_for(data)
    wants_backbone = method.needs_backbone or method.needs_cache or backbone is not None
    if wants_backbone and spec is None:
        raise ConfigError(f"method {method_name!r} needs --backbone for dataset {data!r}")
    ds = get_dataset(data, "train", root=data_root)
    bb = method.condition(ds, resolve_backbone(spec, vae)) if wants_backbone else None
    if bb is not None:
        bb.set_execution(precision, compile=compile)
    cache = None
    if method.needs_cache:
        from gendd.cache import LatentCache

        cache = LatentCache.build(ds, bb, cache_dir, method.encode_spec(), progress=progress)
    if bb is not None:  # after the cache: fine-tuning changes the DiT, not the VAE the cache was made with
        with current_world().main_first():  # resumable: the other ranks find it done
            bb = method.prepare(ds, bb, cache_dir=cache_dir, progress=progress)
    return distill(method, ds, ipc, out, backbone=bb, cache=cache, progress=progress, overwrite=overwrite,
                   class_batch=class_batch)


def recorded_data_root(folder: Path, manifest: dict, data: str) -> str | None:
    """The dataset folder ``folder`` was distilled from (its manifest's ``dataset_root``), checked.

    None when the manifest records none or is of another dataset than ``data``, and for Fashion-MNIST
    when the recorded folder is its default one or is gone (its files have a default place). The check
    compares the fingerprint of the train split found there with the one recorded at distillation; the
    test split was not fingerprinted then. For an ImageFolder that is a walk over file names and sizes (no
    image is decoded), small next to any evaluation.

    Raises:
        DataError: the recorded folder no longer exists, or holds other data than at distillation.
    """
    from gendd.data import get_dataset
    from gendd.data.fashion_mnist import default_root

    root, recorded = manifest.get("dataset_root"), manifest.get("dataset", {})
    if root is None or recorded.get("name") != data:
        return None
    if data == "fashion-mnist" and (not Path(root).is_dir() or Path(root) == default_root().resolve()):
        return None
    if not Path(root).is_dir():
        raise DataError(f"{folder} was distilled from {root}, which no longer exists; pass --data-root "
                        f"with the {data} folder")
    found = get_dataset(data, "train", root=root).fingerprint()
    if found != recorded.get("fingerprint"):
        raise DataError(f"the {data} data in {root} changed since {folder} was distilled (train split "
                        f"fingerprint {found}, recorded {recorded.get('fingerprint')}); pass --data-root "
                        "with the data it was distilled from")
    return root


def _evaluation_setup(folder, data, data_root, profile, overrides, compile):
    """What :func:`run_evaluate` and :func:`evaluation_done_seeds` share: the protocol, both datasets,
    the result tag, the partial file and the key its saved students must match."""
    from gendd.data import get_dataset
    from gendd.data.imagefolder import load_image_dir
    from gendd.evaluate import get_profile

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"distilled folder {folder} does not exist")
    manifest = {}
    if (folder / "manifest.json").exists():
        manifest = json.loads((folder / "manifest.json").read_text())
    data = data or manifest.get("dataset", {}).get("name")
    if data is None:
        raise ConfigError(f"{folder} has no manifest.json; pass --data")
    protocol = get_profile(profile)  # a bad profile or override fails before any data is read
    if overrides:
        protocol = protocol.with_overrides(**overrides)
    if compile is not None:
        protocol = protocol.with_overrides(compile=compile)
    if data_root is None:
        data_root = recorded_data_root(folder, manifest, data)
    test = get_dataset(data, "test", root=data_root)
    train = load_image_dir(folder, test.classes, test.channels, name=f"distilled:{folder.name}",
                           mean=test.mean, std=test.std)
    # Students are identified by their seed: the number of repeats is not part of the run's identity,
    # so raising --repeats later trains only the new students.
    shape = {k: v for k, v in (overrides or {}).items() if k != "repeats"}
    if shape.get("teacher") is not None:  # a checkpoint path: file names carry a short hash of it
        import hashlib

        shape["teacher"] = hashlib.sha256(str(Path(shape["teacher"]).resolve()).encode()).hexdigest()[:8]
    tag = profile + "".join(f"-{k}{v}" for k, v in sorted(shape.items()))
    key = {"protocol": identity(asdict(protocol), drop=("repeats",)), "train_fingerprint": train.fingerprint()}
    return folder, manifest, data, protocol, test, train, tag, folder / f"eval-{tag}.partial.json", key


def _saved_runs(partial_path: Path, key: dict, family: str) -> list[dict]:
    """The students saved in ``partial_path`` if its key matches ``key`` (else none), in the current
    history convention (:func:`gendd.evaluate.fit.migrate_run`)."""
    from gendd.evaluate.fit import migrate_run

    if not partial_path.exists():
        return []
    saved = json.loads(partial_path.read_text())
    old = saved.get("key", {})
    if isinstance(old.get("protocol"), dict):  # files written before compile/num_threads left the key
        old["protocol"] = {k: v for k, v in old["protocol"].items() if k not in ("compile", "num_threads")}
    return [migrate_run(r, family) for r in saved["runs"]] if old == json.loads(json.dumps(key)) else []


class _FileLock:
    """An exclusive ``flock`` on ``<path>.lock`` (a no-op where fcntl is missing): processes that
    evaluate different seeds of one folder merge their students into one partial file safely."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")

    def __enter__(self) -> "_FileLock":
        self.fh = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()  # closing releases the lock


def evaluation_done_seeds(folder: str | os.PathLike, *, data: str | None = None, data_root=None,
                          profile: str = "quick", overrides: dict | None = None) -> set[int]:
    """Student seeds already saved for this folder and protocol (what :func:`run_evaluate` would skip)."""
    *_, protocol, _, _, _, partial_path, key = _evaluation_setup(folder, data, data_root, profile, overrides, None)
    return {int(r["seed"]) for r in _saved_runs(partial_path, key, protocol.family)}


def run_evaluate(folder: str | os.PathLike, *, data: str | None = None, data_root=None, profile: str = "quick",
                 overrides: dict | None = None, progress: bool = True, compile: bool | None = None,
                 seeds=None) -> dict:
    """Evaluate a distilled folder under a named protocol profile; resumable per student.

    Each finished student is added to ``<folder>/eval-<tag>.partial.json`` (under a file lock, so
    processes evaluating different ``seeds`` of one folder can run at once); a re-run trains only the
    missing seeds. The summary of the students with seed < repeats goes to ``<folder>/eval-<tag>.json``.

    ``seeds`` (default ``range(repeats)``) restricts which missing students this call trains (each
    must be < repeats; ``[]`` trains none and only summarises).
    ``compile`` (None = the profile's) runs the students through ``torch.compile``: a speed knob, not
    part of the protocol, so it is left out of the run's identity (results with and without it are
    pooled; they differ only by floating-point rounding).
    """
    from gendd.evaluate import evaluate_distilled
    from gendd.evaluate.train import run_statistics

    folder, manifest, data, protocol, test, train, tag, partial_path, key = _evaluation_setup(
        folder, data, data_root, profile, overrides, compile)
    todo = list(range(protocol.repeats)) if seeds is None else sorted({int(s) for s in seeds})
    bad = [s for s in todo if not 0 <= s < protocol.repeats]
    if bad:
        raise ConfigError(f"student seeds {bad} are outside 0..{protocol.repeats - 1} (repeats)")
    runs = _saved_runs(partial_path, key, protocol.family)
    t0 = time.time()
    for seed in todo:
        if any(r["seed"] == seed for r in runs):
            continue
        res = evaluate_distilled(train, test, protocol, seeds=[seed], progress=progress)
        run = {k: v for k, v in res["runs"][0].items() if k != "model"}
        run["seed"] = seed
        with _FileLock(partial_path):  # merge with students other processes saved meanwhile
            runs = [r for r in _saved_runs(partial_path, key, protocol.family) if r["seed"] != seed] + [run]
            runs.sort(key=lambda r: r["seed"])
            write_json(partial_path, {"key": key, "runs": runs}, indent=None)
    runs = [r for r in runs if r["seed"] < protocol.repeats]
    if not runs:
        raise DataError(f"no student of {folder} under protocol {tag!r} has been trained yet")
    summary = {**run_statistics(runs), "profile": profile, "protocol": asdict(protocol), "dataset": data,
               "test_split": test.split, "test_size": len(test) if protocol.test_limit is None
               else protocol.test_limit, "train_size": len(train), "folder": str(folder),
               "method": manifest.get("method"), "ipc": manifest.get("ipc"), "runs": runs,
               "seconds_this_call": round(time.time() - t0, 2)}
    with _FileLock(partial_path):
        write_json(folder / f"eval-{tag}.json", summary)
    return summary


def format_row(summary: dict) -> str:
    epochs = summary["protocol"].get("epochs")
    if epochs is None and summary.get("runs"):  # IPC-dependent schedules (idc-hard) resolve per run
        epochs = summary["runs"][0].get("epochs")
    return (f"final {summary['final_mean']:.2f} ± {summary['final_std']:.2f} | best "
            f"{summary['best_mean']:.2f} ± {summary['best_std']:.2f} ({summary['num_runs']} runs, "
            f"{epochs} epochs, {summary.get('precision', '?')}, {summary['seconds_per_run']:.0f} s/run)")
