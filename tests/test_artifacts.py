"""The artifact layer (gendd.artifacts): atomic writes leave the old file or the new one, never a part; a
staged folder replaces the old one; one identity rule (execution knobs never enter a key)."""

from __future__ import annotations

import json

import pytest

from gendd.artifacts import (atomic_write, commit_dir, identity, identity_hash, same_identity, save_torch,
                             write_json)


def test_atomic_write_commits_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})

    def half(p):
        p.write_text('{"v": ')
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"v": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}


def test_save_torch_round_trip(tmp_path):
    import torch

    save_torch(tmp_path / "t.pt", {"x": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "t.pt")["x"], torch.arange(3))


def test_commit_dir_replaces_the_old_folder(tmp_path):
    old, new = tmp_path / "c0", tmp_path / ".partial-c0"
    old.mkdir()
    (old / "stale.png").write_text("old")
    new.mkdir()
    (new / "0.png").write_text("new")
    commit_dir(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["0.png"] and not new.exists()


def test_identity_drops_execution_knobs_at_any_depth():
    run = {"config": {"lr": 0.1, "num_threads": 4, "compile": True, "nested": {"workers": 2, "seed": 1}},
           "data": ("a", "b")}
    assert identity(run) == {"config": {"lr": 0.1, "nested": {"seed": 1}}, "data": ["a", "b"]}
    other = {**run, "config": {**run["config"], "num_threads": 1, "checkpoint_every": 7}}
    assert same_identity(run, other) and identity_hash(run) == identity_hash(other)
    assert not same_identity(run, {**run, "config": {**run["config"], "lr": 0.2}})
    assert not same_identity(None, run)
    assert identity({"out": "x", "a": 1}, drop=("out",)) == {"a": 1}
