"""The `gendd` command as a user runs it: help, one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def gendd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gendd.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_help_lists_commands_and_defaults():
    r = gendd("--help")
    assert r.returncode == 0
    for cmd in ("distill", "evaluate", "run", "backbone", "cache", "methods", "datasets"):
        assert cmd in r.stdout
    r = gendd("distill", "--help")
    assert r.returncode == 0 and "default: 10" in r.stdout.replace("[", "").replace("]", "")
    assert gendd("backbone", "train", "--help").returncode == 0


def test_unknown_method_is_one_line_error(tmp_path):
    r = gendd("distill", "nope", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown method 'nope'")
    assert not (tmp_path / "o").exists()


def test_missing_dataset_folder_is_one_line_error(tmp_path):
    r = gendd("distill", "random", "--data", "imagenette", "--data-root", str(tmp_path / "none"),
              "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist not installed")
def test_ipc_larger_than_class_cli(tmp_path):
    r = gendd("distill", "random", "--ipc", "7000", "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: IPC 7000 exceeds the 6000 images of class 't-shirt_top'"
    assert not (tmp_path / "o").exists()


def test_corrupt_image_is_one_line_error(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            from PIL import Image
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / split / c / f"{i}.png")
    (root / "train" / "b" / "1.png").write_bytes(b"not a png")
    r = gendd("distill", "random", "--data", "imagefolder", "--data-root", str(root), "--ipc", "2",
              "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "1.png" in r.stderr
    # class a finished before b failed; b is not half-written
    assert not (tmp_path / "o" / "b").exists() and not list((tmp_path / "o").glob(".partial-*"))


def test_unknown_option_is_one_line_error(tmp_path):
    for args in (["distill", "dit", "--set", "guidance=3"], ["finetune", "--set", "bogus=1"]):
        r = gendd(*args, "--out", str(tmp_path / "o"))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "has no option(s)" in lines[0]
    assert not (tmp_path / "o").exists()
