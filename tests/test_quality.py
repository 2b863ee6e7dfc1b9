"""`gendd backbone quality` on a tiny backbone: reconstruction error, the ceiling on the same subset, sample
rows per CFG scale, the downstream sweep, resume, and its one-line config errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import make_dataset
from test_bench import make_bench_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_bench_world(tmp_path_factory.mktemp("quality-world"))


def _cfg(world, tmp_path, **kw):
    from gendd.quality import QualityConfig

    data, bb = world
    base = dict(backbone=str(bb), data="imagefolder", data_root=str(data), cache_dir=str(tmp_path / "cache"),
                recon_per_class=3, ceiling_ipc=(2,), cfg_scales=(1.0, 2.0), samples_per_class=3, sweep_ipc=(1,),
                num_steps=2, repeats=1, classifier_epochs=1, metrics_k=2,
                protocol_overrides={"epochs": 1, "test_limit": 9, "eval_every": 0, "precision": "fp32"})
    base.update(kw)
    return QualityConfig(**base)


def _class_images(folder, name):
    import numpy as np
    from PIL import Image

    files = sorted((folder / name).glob("*.png"), key=lambda p: int(p.stem))
    return torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files])).permute(0, 3, 1, 2)


def test_quality_report_parts_and_resume(world, tmp_path, monkeypatch):
    from gendd.data import get_dataset
    from gendd.data.base import to_float, to_uint8
    from gendd.pipeline import resolve_backbone
    from gendd.quality import run_quality

    cfg = _cfg(world, tmp_path, cfg_interval=[0.0, 5.0])
    report = run_quality(cfg, tmp_path / "q", progress=False)
    assert report["backbone"]["cfg_interval"] == (0.0, 5.0)

    rec = report["reconstruction"]
    assert set(rec["per_class"]) == {"k0", "k1", "k2"} and rec["split"] == "test"
    for v in rec["per_class"].values():
        assert v["images"] == 3 and v["psnr"] == pytest.approx(10 * math.log10(4 / v["mse"]))

    # the ceiling compares the same subset: same indices, and the second set is the first one's reconstruction
    ceiling = tmp_path / "q" / "ceiling" / "sets"
    real_m = json.loads((ceiling / "random-ipc2" / "manifest.json").read_text())
    vae_m = json.loads((ceiling / "random-vae-ipc2" / "manifest.json").read_text())
    assert vae_m["config"]["reconstruct"] is True and real_m["config"]["reconstruct"] is False
    bb = resolve_backbone(world[1])
    train = get_dataset("imagefolder", "train", root=str(world[0]))
    for name in ("k0", "k1", "k2"):
        assert real_m["classes_done"][name]["indices"] == vae_m["classes_done"][name]["indices"]
        picked = train.load(real_m["classes_done"][name]["indices"])
        assert torch.equal(_class_images(ceiling / "random-ipc2", name), picked)
        # the method's operations in the same order on the same tensor (same memory layout: a permuted view
        # may take another conv kernel and round differently): exact
        want = to_uint8(bb.decode(bb.encode(to_float(picked))))
        assert torch.equal(_class_images(ceiling / "random-vae-ipc2", name), want)
    (row,) = report["ceiling"]
    assert row["ipc"] == 2 and row["students"] == 1
    assert row["gap"] == pytest.approx(row["real"] - row["reconstructed"])

    samples = report["samples"]["rows"]
    assert [r["set"] for r in samples] == ["real", "dit-cfg1", "dit-cfg2"]
    assert [r["cfg_scale"] for r in samples] == [None, 1.0, 2.0]
    for r in samples:
        assert 0 <= r["label_agreement"] <= 100 and set(r["agreement_per_class"]) == {"k0", "k1", "k2"}
        assert 0 <= r["coverage"] <= 1 and r["fd"] >= 0 and 0 <= r["latent_diversity"] <= 2
    sample_m = json.loads((tmp_path / "q" / "samples" / "sets" / "dit-cfg2-ipc3" / "manifest.json").read_text())
    assert sample_m["config"]["cfg_scale"] == 2.0 and sample_m["ipc"] == 3
    assert sample_m["config"]["cfg_interval"] == [0.0, 5.0]

    assert [(r["cfg_scale"], r["ipc"], r["students"]) for r in report["sweep"]] == [(1.0, 1, 1), (2.0, 1, 1)]
    md = (tmp_path / "q" / "quality.md").read_text()
    for heading in ("VAE reconstruction", "Reconstruction ceiling", "Samples (3 per class)", "Downstream accuracy"):
        assert heading in md
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["sweep"] == report["sweep"]

    # a re-run recomputes nothing: no set is distilled, no student or classifier trained
    import gendd.bench
    import gendd.evaluate
    import gendd.evaluate.teacher

    def refuse(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(gendd.bench, "run_distill", refuse)
    monkeypatch.setattr(gendd.evaluate, "evaluate_distilled", refuse)
    monkeypatch.setattr(gendd.evaluate.teacher, "_accuracy", refuse)  # every teacher training tests
    again = run_quality(cfg, tmp_path / "q", progress=False)
    assert again["ceiling"] == report["ceiling"] and again["sweep"] == report["sweep"]
    assert again["samples"] == report["samples"]


def test_parts_are_skipped_by_their_lists(world, tmp_path):
    from gendd.quality import run_quality

    report = run_quality(_cfg(world, tmp_path, recon_per_class=0, ceiling_ipc=(), samples_per_class=0,
                              sweep_ipc=()), tmp_path / "q", progress=False)
    assert not {"reconstruction", "ceiling", "samples", "sweep"} & set(report)
    assert not (tmp_path / "q" / "classifier").exists()


def test_reconstruction_error_is_the_mean_of_class_mses(tiny_bb):
    from gendd.data.base import to_float
    from gendd.quality import reconstruction_error

    ds = make_dataset(size=12)
    rec = reconstruction_error(tiny_bb, ds, per_class=4, batch_size=3)  # batches of 3 then 1
    for c, name in enumerate(ds.classes):
        x = to_float(ds.load(ds.class_indices(c)[:4]))
        # the network in the same batches (a batch of 4 may round differently); float64 sums regrouped
        err = torch.cat([tiny_bb.decode(tiny_bb.encode(x[a:a + 3])).clamp(-1, 1) - x[a:a + 3] for a in (0, 3)])
        assert rec["per_class"][name]["mse"] == pytest.approx(float((err ** 2).double().mean()), rel=1e-12)
    assert rec["mse"] == pytest.approx(sum(v["mse"] for v in rec["per_class"].values()) / 4)


@pytest.mark.parametrize("option,message", [
    ("cfg_scales=[1,1]", "cfg_scales has duplicates"),
    ("cfg_interval=[2,1]", "cfg_interval"),
    ("ceiling_ipc=[0]", "ceiling_ipc"),
    ("profile=nope", "unknown protocol 'nope'"),
    ("nope=1", "has no option(s) nope"),
])
def test_cli_config_errors_are_one_line(tmp_path, option, message):
    r = subprocess.run([sys.executable, "-m", "gendd.cli", "backbone", "quality", "--out", str(tmp_path / "q"),
                        "--set", option], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert not (tmp_path / "q").exists()
