"""Pipeline stages on a DiT-XL/2-family backbone folder and an ImageNet-subset ImageFolder (all tiny)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gendd.backbone import Backbone, tiny_backbone
from gendd.data.imagefolder import read_wnid_list
from gendd.pipeline import parse_options, run_distill, run_evaluate


@pytest.fixture(scope="module")
def nette_root(tmp_path_factory):
    """ImageNette's 10 WNID folders, 2 train + 2 val images each, 32 px RGB."""
    root = tmp_path_factory.mktemp("nette")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, wnid in enumerate(read_wnid_list("imagenette")):
            (root / split / wnid).mkdir(parents=True)
            for i in range(2):
                arr = (rng.random((32, 32, 3)) * 60 + k * 19).astype(np.uint8)
                Image.fromarray(arr).save(root / split / wnid / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def xl_family_folder(tmp_path_factory):
    """A tiny model of DiT-XL/2's configuration family: 1000 classes, learned sigma, 8x VAE, saved as a
    diffusers folder, with the VAE also saved alone (as sd-vae-ft-ema is distributed)."""
    root = tmp_path_factory.mktemp("xl")
    bb = tiny_backbone(num_classes=1000, image_size=32, channels=3, vae_channels=(32, 32, 32, 32), learned_sigma=True)
    bb.save_pretrained(root / "dit")
    bb.vae.save_pretrained(root / "vae")
    return root


def test_dit_on_xl_family_folder_with_separate_vae(nette_root, xl_family_folder, tmp_path):
    m = run_distill("dit", "imagenette", 2, tmp_path / "o", data_root=nette_root,
                    backbone=str(xl_family_folder / "dit"), vae=str(xl_family_folder / "vae"),
                    options={"num_steps": 3, "cfg_channels": 3, "cfg_scale": 4.0}, progress=False)
    assert m["complete"] and m["dataset"]["name"] == "imagenette"
    assert m["backbone"]["hash"] == Backbone.from_pretrained(xl_family_folder / "dit").content_hash()
    first = read_wnid_list("imagenette")[0]
    img = Image.open(tmp_path / "o" / first / "0.png")
    assert img.size == (32, 32) and img.mode == "RGB"


def test_evaluate_resumes_per_student(nette_root, tmp_path, monkeypatch):
    run_distill("random", "imagenette", 2, tmp_path / "r", data_root=nette_root, progress=False)
    over = {"epochs": 2, "repeats": 2, "eval_every": 1}
    s = run_evaluate(tmp_path / "r", data_root=nette_root, profile="quick", overrides=over, progress=False)
    assert s["num_runs"] == 2 and s["test_size"] == 20 and s["train_size"] == 20
    assert 0 <= s["final_mean"] <= 100 and s["test_split"] == "test"
    saved = json.loads((tmp_path / "r" / "eval-quick-epochs2-eval_every1.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1]
    # a re-run with one more repeat trains only the new student
    import gendd.evaluate as ev

    calls = []
    real = ev.evaluate_distilled

    def counting(*a, **k):
        calls.append(k.get("seeds"))
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate_distilled", counting)
    s3 = run_evaluate(tmp_path / "r", data_root=nette_root, profile="quick", overrides={**over, "repeats": 3},
                      progress=False)
    assert calls == [[2]]  # seeds 0 and 1 were not retrained
    assert s3["num_runs"] == 3
    assert [r["final_acc"] for r in s3["runs"][:2]] == [r["final_acc"] for r in saved["runs"]]
    # an interrupted call keeps its finished students: fewer repeats reuse the saved ones
    calls.clear()
    assert run_evaluate(tmp_path / "r", data_root=nette_root, profile="quick", overrides=over,
                        progress=False)["num_runs"] == 2 and calls == []


def test_parse_options():
    assert parse_options(["cfg_scale=3", "sampler=ddim", "cfg-channels=null"]) == {
        "cfg_scale": 3, "sampler": "ddim", "cfg_channels": None}


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").exists(),
                    reason="dataset-fashion-mnist not installed")
def test_main_job_end_to_end_tiny_profile(tmp_path, capsys):
    """The README's main job on the shipped backbone, with a 1-epoch profile and 100 test images; the
    students run in two processes and each prints one line when it finishes."""
    from gendd.bench import main_job

    # fp32: "auto" decides by a short timing probe per process, which a loaded machine can tip either way
    over = {"epochs": 1, "repeats": 2, "test_limit": 100, "precision": "fp32"}
    rows = main_job(tmp_path, methods=("random", "dit"), ipc=1, profile="quick", progress=True, workers=2,
                    overrides=over)
    assert [r["method"] for r in rows] == ["random", "dit"]
    assert all(r["n"] == 2 and r["precision"] == "fp32" for r in rows)
    table = (tmp_path / "results.md").read_text()
    assert "| random | 1 | convnet3 | quick |" in table and "| dit | 1 | convnet3 | quick |" in table
    assert len(list((tmp_path / "sets" / "dit-ipc1").glob("*/0.png"))) == 10
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " student " in ln and "final" in ln]
    assert len(lines) == 4 and sum("left" in ln for ln in lines) == 3
    assert any("dit-ipc1 quick convnet3 student 2/2: final" in ln for ln in lines)


def test_fashion_mnist_v1_stays_loadable_by_name():
    """Published numbers were made with v1: its weights stay in the package, unchanged, under a fixed name."""
    import hashlib

    from gendd.pipeline import SHIPPED_BACKBONES, resolve_backbone, shipped_backbone_path

    folder = shipped_backbone_path("fashion-mnist-v1")
    sums = {part: hashlib.sha256((folder / part / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
            for part in ("transformer", "vae")}
    assert sums == {"transformer": "ed3ef8a27bb7372071aed892385184f259e3e16480909e7b91206cb5da8e6971",
                    "vae": "bab20701a4f3a06d70cb1f575b3a5f56b7be3c0f531f5d0171b7ddf75232b8c0"}
    bb = resolve_backbone("fashion-mnist-v1")
    assert tuple(bb.latent_shape) == (4, 8, 8) and bb.meta.default_cfg_scale == 3.0
    assert "fashion-mnist" in SHIPPED_BACKBONES  # the dataset's default backbone


def test_fashion_mnist_v2_loads_by_name():
    from gendd.pipeline import resolve_backbone

    bb = resolve_backbone("fashion-mnist-v2")
    assert tuple(bb.latent_shape) == (8, 8, 8) and bb.meta.pad == 2 and not bb.learned_sigma
    assert bb.content_hash() != resolve_backbone("fashion-mnist-v1").content_hash()


def test_fashion_mnist_v3_loads_by_name_and_continues_v2():
    import json

    from gendd.pipeline import backbone_folder, resolve_backbone

    bb = resolve_backbone("fashion-mnist-v3")
    assert tuple(bb.latent_shape) == (8, 8, 8) and bb.meta.pad == 2 and not bb.learned_sigma
    record = json.loads((backbone_folder("fashion-mnist-v3") / "train_config.json").read_text())
    assert record["init_hash"] == resolve_backbone("fashion-mnist-v2").content_hash()
    # v3 is the dataset's default backbone, at the guidance chosen by downstream accuracy (BENCHMARKS.md §11):
    # CFG 5.0 at noise levels sigma <= 1 only
    assert resolve_backbone("fashion-mnist").content_hash() == bb.content_hash()
    assert bb.meta.default_cfg_scale == 5.0 and bb.meta.default_cfg_interval == [0.0, 1.0]
