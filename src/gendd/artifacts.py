"""One artifact layer: "same run -> skip, else work in a temporary place and commit atomically".

Every stage that writes results (export, latent cache, D3HR statistics, teacher and backbone training,
fine-tuning, evaluation partials, bench cells, reports) writes through :func:`atomic_write` (a file appears
complete or not at all: written beside its final name, then ``os.replace``-d) or :func:`commit_dir` (a folder
staged as a sibling, then renamed), and decides "same run" with :func:`same_identity`.

What enters an identity: everything that changes the numbers (configs, data fingerprints, backbone hashes,
seeds). What does not (:data:`EXECUTION_KNOBS`, at any depth): how fast or where a run executes -- torch
threads, worker processes, ``torch.compile``, checkpoint intervals --, so a run resumes under other values.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

#: Keys that say how a run executes, not what it computes; never part of an identity.
EXECUTION_KNOBS = frozenset({"compile", "num_threads", "threads", "workers", "checkpoint_every"})


def canonical(obj: Any) -> Any:
    """``obj`` as plain JSON data (tuples -> lists, paths -> text, sorted keys when dumped)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def identity(obj: Any, drop: tuple[str, ...] = ()) -> Any:
    """The identity of a run description: :func:`canonical`, without :data:`EXECUTION_KNOBS` and ``drop`` at
    any depth of nested mappings."""
    skip = EXECUTION_KNOBS | set(drop)

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in skip}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(canonical(obj))


def identity_hash(obj: Any, drop: tuple[str, ...] = (), length: int = 16) -> str:
    """A short sha256 of :func:`identity` (file names of keyed artifacts)."""
    text = json.dumps(identity(obj, drop), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def same_identity(saved: Any, current: Any, drop: tuple[str, ...] = ()) -> bool:
    """Whether a saved record's identity is the current one (both through :func:`identity`, so records written
    with execution knobs in them still match)."""
    return saved is not None and identity(saved, drop) == identity(current, drop)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary sibling of ``path``, then rename it to ``path`` (atomic on POSIX); on any
    error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, default=str))


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def commit_dir(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename a completely written folder ``staging`` to ``final`` (replacing an older ``final``)."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final
