"""The pipeline stages the CLI calls: resolve a backbone, distil, evaluate (resumable), main job.

data -> backbone -> latent cache -> method -> export -> evaluate -> report
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gendd.errors import ConfigError, DataError

#: Backbones shipped with the package, by name.
SHIPPED_BACKBONES = {"fashion-mnist": "fashion-mnist"}


def shipped_backbone_path(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("gendd") / "assets" / "backbones" / SHIPPED_BACKBONES[name]))


def backbone_folder(spec: str | os.PathLike) -> Path:
    """The local folder a backbone spec names (a shipped name's package folder, else the path itself)."""
    return shipped_backbone_path(str(spec)) if str(spec) in SHIPPED_BACKBONES else Path(spec)


def resolve_backbone(spec: str | os.PathLike, vae: str | os.PathLike | None = None):
    """A shipped backbone name (``fashion-mnist``), a local diffusers DiT folder, or a hub id in the
    local Hugging Face cache (``facebook/DiT-XL-2-256``, with ``vae="stabilityai/sd-vae-ft-ema"``)."""
    from gendd.backbone import Backbone

    if str(spec) in SHIPPED_BACKBONES:
        path = shipped_backbone_path(str(spec))
        if not (path / "transformer").is_dir():
            raise ConfigError(f"the shipped backbone {spec!r} is missing from {path}; reinstall gendd or "
                              "train one with `gendd backbone train`")
        return Backbone.from_pretrained(path, vae=vae)
    return Backbone.from_pretrained(spec, vae=vae)


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


def run_distill(method_name: str, data: str, ipc: int, out: str | os.PathLike, *, data_root=None,
                backbone: str | None = None, vae: str | None = None, options: dict | None = None,
                cache_dir=None, progress: bool = True, overwrite: bool = False) -> dict:
    """Build everything a method needs and export its distilled set to ``out``."""
    from gendd.data import get_dataset
    from gendd.export import distill
    from gendd.methods import build_method

    method = build_method(method_name, **(options or {}))
    ds = get_dataset(data, "train", root=data_root)
    bb = None
    spec = backbone or default_backbone_for(data)
    if method.needs_backbone or method.needs_cache or backbone is not None:
        if spec is None:
            raise ConfigError(f"method {method_name!r} needs --backbone for dataset {data!r}")
        bb = resolve_backbone(spec, vae)
    cache = None
    if method.needs_cache:
        from gendd.cache import LatentCache

        cache = LatentCache.build(ds, bb, cache_dir, method.encode_spec(), progress=progress)
    if bb is not None:  # after the cache: fine-tuning changes the DiT, not the VAE the cache was made with
        bb = method.prepare(ds, bb, cache_dir=cache_dir, progress=progress)
    return distill(method, ds, ipc, out, backbone=bb, cache=cache, progress=progress, overwrite=overwrite)


def summarize_runs(runs: list[dict]) -> dict[str, float]:
    """Mean ± population std (ddof 0, as the DC/DSA reference) of final and best accuracy over students."""
    final = np.array([r["final_acc"] for r in runs])
    best = np.array([r["best_acc"] for r in runs])
    return {"final_mean": float(final.mean()), "final_std": float(final.std()),
            "best_mean": float(best.mean()), "best_std": float(best.std()), "num_runs": len(runs),
            "seconds_per_run": float(np.mean([r["seconds"] for r in runs]))}


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
    protocol = get_profile(profile)
    if overrides:
        protocol = protocol.with_overrides(**overrides)
    if compile is not None:
        protocol = protocol.with_overrides(compile=compile)
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
    key = {"protocol": {k: v for k, v in asdict(protocol).items()
                        if k not in ("repeats", "compile", "num_threads")},
           "train_fingerprint": train.fingerprint()}
    return folder, manifest, data, protocol, test, train, tag, folder / f"eval-{tag}.partial.json", key


def _saved_runs(partial_path: Path, key: dict) -> list[dict]:
    """The students saved in ``partial_path`` if its key matches ``key`` (else none)."""
    if not partial_path.exists():
        return []
    saved = json.loads(partial_path.read_text())
    old = saved.get("key", {})
    if isinstance(old.get("protocol"), dict):  # files written before compile/num_threads left the key
        old["protocol"] = {k: v for k, v in old["protocol"].items() if k not in ("compile", "num_threads")}
    return saved["runs"] if old == json.loads(json.dumps(key)) else []


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
    *_, partial_path, key = _evaluation_setup(folder, data, data_root, profile, overrides, None)
    return {int(r["seed"]) for r in _saved_runs(partial_path, key)}


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

    folder, manifest, data, protocol, test, train, tag, partial_path, key = _evaluation_setup(
        folder, data, data_root, profile, overrides, compile)
    todo = list(range(protocol.repeats)) if seeds is None else sorted({int(s) for s in seeds})
    bad = [s for s in todo if not 0 <= s < protocol.repeats]
    if bad:
        raise ConfigError(f"student seeds {bad} are outside 0..{protocol.repeats - 1} (repeats)")
    runs = _saved_runs(partial_path, key)
    t0 = time.time()
    for seed in todo:
        if any(r["seed"] == seed for r in runs):
            continue
        res = evaluate_distilled(train, test, protocol, seeds=[seed], progress=progress)
        run = {k: v for k, v in res["runs"][0].items() if k != "model"}
        run["seed"] = seed
        with _FileLock(partial_path):  # merge with students other processes saved meanwhile
            runs = [r for r in _saved_runs(partial_path, key) if r["seed"] != seed] + [run]
            runs.sort(key=lambda r: r["seed"])
            tmp = partial_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "runs": runs}, default=str))
            os.replace(tmp, partial_path)
    runs = [r for r in runs if r["seed"] < protocol.repeats]
    if not runs:
        raise DataError(f"no student of {folder} under protocol {tag!r} has been trained yet")
    summary = {**summarize_runs(runs), "profile": profile, "protocol": asdict(protocol), "dataset": data,
               "test_split": test.split, "test_size": len(test) if protocol.test_limit is None
               else protocol.test_limit, "train_size": len(train), "folder": str(folder),
               "method": manifest.get("method"), "ipc": manifest.get("ipc"), "runs": runs,
               "seconds_this_call": round(time.time() - t0, 2)}
    with _FileLock(partial_path):
        out = folder / f"eval-{tag}.json"
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, out)
    return summary


def format_row(summary: dict) -> str:
    epochs = summary["protocol"].get("epochs")
    if epochs is None and summary.get("runs"):  # IPC-dependent schedules (idc-hard) resolve per run
        epochs = summary["runs"][0].get("epochs")
    return (f"final {summary['final_mean']:.2f} ± {summary['final_std']:.2f} | best "
            f"{summary['best_mean']:.2f} ± {summary['best_std']:.2f} ({summary['num_runs']} runs, "
            f"{epochs} epochs, {summary['seconds_per_run']:.0f} s/run)")


def _evaluate_worker(args: tuple) -> dict:
    """Process-pool entry: evaluate one folder with ``threads`` torch threads."""
    import torch

    folder, profile, overrides, threads = args
    torch.set_num_threads(threads)
    return run_evaluate(folder, profile=profile, overrides=overrides, progress=False)


def main_job(out: str | os.PathLike = "runs/main", *, methods=("random", "dit"), ipc: int = 10,
             profile: str = "quick", data: str = "fashion-mnist", progress: bool = True,
             workers: int | None = None, overrides: dict | None = None) -> list[dict]:
    """Distil ``data`` at ``ipc`` with each method, evaluate each, return the rows.

    Evaluations of the methods run in parallel processes (``workers``, default one per CPU core up to
    the number of methods), each with ``cores // workers`` torch threads: on small CPUs one student per
    core is faster than one student on all cores. Results do not depend on ``workers``'s scheduling.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    out = Path(out)
    folders, t_distill = {}, {}
    for m in methods:
        t0 = time.time()
        manifest = run_distill(m, data, ipc, out / f"{m}-ipc{ipc}", progress=progress)
        folders[m] = out / f"{m}-ipc{ipc}"
        t_distill[m] = manifest.get("seconds_total", time.time() - t0)
    cores = os.cpu_count() or 1
    workers = workers or max(1, min(len(methods), cores))
    threads = max(1, cores // workers)
    summaries = {}
    if workers == 1:
        for m in methods:
            summaries[m] = run_evaluate(folders[m], profile=profile, overrides=overrides, progress=progress)
    else:
        if progress:
            print(f"evaluating {len(methods)} distilled sets in {workers} processes x {threads} threads ...",
                  flush=True)
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_evaluate_worker, (folders[m], profile, overrides, threads)): m for m in methods}
            for fut in cf.as_completed(futures):
                m = futures[fut]
                summaries[m] = fut.result()
                if progress:
                    print(f"  {m}: {format_row(summaries[m])}", flush=True)
    rows = [{"method": m, "ipc": ipc, "distill_seconds": t_distill[m], **summaries[m]} for m in methods]
    table = ["| method | IPC | final acc % | best acc % | runs | distil s | eval s/run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['method']} | {r['ipc']} | {r['final_mean']:.2f} ± {r['final_std']:.2f} | "
                     f"{r['best_mean']:.2f} ± {r['best_std']:.2f} | {r['num_runs']} | "
                     f"{r['distill_seconds']:.1f} | {r['seconds_per_run']:.1f} |")
    (out / "results.md").write_text("\n".join(table) + "\n")
    return rows
