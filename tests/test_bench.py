"""`gendd bench` on a tiny ImageFolder dataset and a tiny backbone: grid, resume after a kill, workers, config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gendd.errors import ConfigError


def make_bench_world(root: Path) -> tuple[Path, Path]:
    """3 classes of 16 px RGB images (6 train, 3 val each) and a tiny 3-class backbone folder."""
    from gendd.backbone import tiny_backbone

    data = root / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for k in range(3):
            (data / split / f"k{k}").mkdir(parents=True)
            for i in range(n):
                arr = (rng.random((16, 16, 3)) * 200 + k * 25).astype(np.uint8)
                Image.fromarray(arr).save(data / split / f"k{k}" / f"{i}.png")
    tiny_backbone(num_classes=3, image_size=16, channels=3, vae_channels=(32, 32)).save_pretrained(root / "bb")
    return data, root / "bb"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_bench_world(tmp_path_factory.mktemp("bench-world"))


def tiny_config(world, tmp: Path, **kw):
    from gendd.bench import BenchConfig

    data, bb = world
    base = dict(methods=["random", "dit"], ipc=[1, 2], students=["convnet3"], protocols=["quick"], repeats=2,
                data="imagefolder", data_root=str(data), backbone=str(bb), cache_dir=str(tmp / "cache"),
                method={"dit": {"num_steps": 2}},
                protocol={"quick": {"epochs": 1, "test_limit": 9, "eval_every": 0, "precision": "fp32"}},
                metrics=True, metrics_real_per_class=6, tsne_real_per_class=6, real_images_per_class=3,
                real_accuracy={"convnet3": 90.0})
    base.update(kw)
    return BenchConfig(**base)


def _strip(rows):
    """Rows without timings, NaN -> None (NaN != NaN)."""
    return [{k: (None if v != v else v) for k, v in r.items() if k not in ("seconds_per_student", "distill_seconds")}
            for r in rows]


def test_bench_grid_resumes_after_a_kill_without_recomputing(world, tmp_path, monkeypatch):
    import gendd.bench as bench
    import gendd.evaluate as ev

    cfg = tiny_config(world, tmp_path)
    real_eval, real_distill = ev.evaluate_distilled, bench.run_distill
    trained, distilled = [], []

    def counting_eval(train, test, protocol, seeds=None, progress=True):
        if limit is not None and len(trained) >= limit:
            raise KeyboardInterrupt("simulated kill")
        res = real_eval(train, test, protocol, seeds=seeds, progress=progress)
        trained.append((train.name, protocol.student, tuple(seeds)))
        return res

    def counting_distill(method, *a, **k):
        distilled.append((method, a[1]))
        return real_distill(method, *a, **k)

    monkeypatch.setattr(ev, "evaluate_distilled", counting_eval)
    monkeypatch.setattr(bench, "run_distill", counting_distill)
    limit = 3  # the bench is killed while the 4th of 8 students trains
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(cfg, tmp_path / "b", progress=False)
    assert len(trained) == 3 and sorted(distilled) == [("dit", 1), ("dit", 2), ("random", 1), ("random", 2)]
    limit, distilled_before = None, len(distilled)
    rows = bench.run_bench(cfg, tmp_path / "b", progress=False)
    assert len(distilled) == distilled_before  # sets are not distilled again
    assert len(trained) == 8 and len(set(trained)) == 8  # every student trained exactly once
    assert [(r["method"], r["ipc"], r["n"]) for r in rows] == [
        ("random", 1, 2), ("random", 2, 2), ("dit", 1, 2), ("dit", 2, 2)]
    # a third run computes nothing; an uninterrupted run elsewhere gives the same results
    assert _strip(bench.run_bench(cfg, tmp_path / "b", progress=False)) == _strip(rows) and len(trained) == 8
    fresh = bench.run_bench(cfg, tmp_path / "fresh", progress=False)
    assert _strip(fresh) == _strip(rows) and len(trained) == 16

    out = tmp_path / "b"
    r = rows[2]
    assert r["protocol"] == "quick" and r["student"] == "convnet3" and r["repeats"] == 2
    assert 0 <= r["final_mean"] <= 100 and r["git_rev"] and len(r["config_hash"]) == 12
    assert r["config_hash"] == cfg.config_hash() and r["ior"] == r["final_mean"] - rows[0]["final_mean"]
    assert 0 <= r["lrs"] <= 1 and 0 <= r["latent_coverage"] <= 1 and r["latent_fd"] >= 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["config_hash"] == cfg.config_hash() and len(saved["rows"]) == 4
    assert set(saved["set_metrics"]) == {"random-ipc1", "random-ipc2", "dit-ipc1", "dit-ipc2"}
    assert saved["set_metrics"]["dit-ipc1"]["latent_source"] == "stored"
    md = (out / "results.md").read_text()
    assert "| random | 1 | convnet3 | quick |" in md and cfg.config_hash() in md
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"method", "ipc", "student", "protocol", "final_mean", "final_std", "best_mean", "best_std", "n",
            "seconds_per_student", "git_rev", "config_hash", "latent_mmd2"} <= set(header)
    assert len(list((out / "real" / "k0").glob("*.png"))) == 3
    assert (out / "metrics" / "real-latents.safetensors").exists()
    # collect-only with one more IPC: nothing is distilled or trained, the new IPC shows as empty rows
    more = tiny_config(world, tmp_path, ipc=[1, 2, 3])
    n_distilled = len(distilled)
    collected = bench.run_bench(more, tmp_path / "b", progress=False, collect_only=True)
    assert len(distilled) == n_distilled and len(trained) == 16
    assert [(r["ipc"], r["n"]) for r in collected if r["method"] == "dit"] == [(1, 2), (2, 2), (3, 0)]
    assert _strip(collected[:2]) == [{**x, "config_hash": more.config_hash()} for x in _strip(rows[:2])]

    # workers do not change results: same results from the pool path (2 spawn processes, one set)
    cfg2 = tiny_config(world, tmp_path, methods=["random"], ipc=[1], metrics=False, workers=2)
    monkeypatch.undo()
    par = bench.run_bench(cfg2, tmp_path / "par", progress=False)
    assert par[0]["n"] == 2 and par[0]["final_mean"] == rows[0]["final_mean"]
    runs = json.loads(next((tmp_path / "par" / "sets" / "random-ipc1").glob("eval-*.partial.json")).read_text())
    assert [r["seed"] for r in runs["runs"]] == [0, 1]


def test_bench_config_validation(world, tmp_path):
    from gendd.bench import BenchConfig

    def err(**kw):
        with pytest.raises(ConfigError) as e:
            tiny_config(world, tmp_path, **kw)
        return str(e.value)

    assert "unknown method 'nope'" in err(methods=["nope"])
    assert "unknown student 'resnet99'" in err(students=["resnet99"])
    assert "unknown protocol 'fast'" in err(protocols=["fast"])
    assert "unknown profile 'slow'" in err(protocols=["x"], protocol={"x": {"profile": "slow"}})
    assert "unknown field(s) epoch" in err(protocol={"quick": {"epoch": 3}})
    assert "has no option(s) cfg" in err(method={"dit": {"cfg": 1}})
    assert "ipc[0] must be >= 1, got 0" in err(ipc=[0])
    with pytest.raises(ConfigError, match="unknown key"):
        BenchConfig.from_dict({"methods": ["random"], "ipc": 1, "ipcs": [2]})
    with pytest.raises(ConfigError, match="needs 'ipc'"):
        BenchConfig.from_dict({"methods": ["random"]})
    # a variant label of a registered method, and the shipped example grid
    cfg = tiny_config(world, tmp_path, methods=["dit-ddim"], method={"dit-ddim": {"method": "dit", "sampler": "ddim"}})
    assert cfg.method_specs()[0].method == "dit" and cfg.method_specs()[0].options == {"sampler": "ddim"}
    grid = Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "fmnist_small.toml"
    example = BenchConfig.from_toml(grid)
    assert example.methods == ["random", "dit"] and example.ipc == [1, 10] and example.protocols == ["quick"]
    # the hash ignores execution knobs only
    assert example.config_hash() == BenchConfig.from_dict({**example.__dict__, "workers": 7}).config_hash()
    assert example.config_hash() != BenchConfig.from_dict({**example.__dict__, "seed": 1}).config_hash()


def test_cli_bench_and_report(world, tmp_path):
    """`gendd bench CONFIG.toml --out DIR` then `gendd report DIR`, as a user runs them; a bad config is a
    one-line error with exit status 2."""
    import subprocess
    import sys

    def gendd(*args):
        return subprocess.run([sys.executable, "-m", "gendd.cli", *args], capture_output=True, text=True,
                              timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})

    data, bb = world
    bad = tmp_path / "bad.toml"
    bad.write_text('methods = ["nope"]\nipc = [1]\n')
    r = gendd("bench", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: bench config: method 'nope': unknown method")
    good = tmp_path / "grid.toml"
    good.write_text("\n".join([
        'methods = ["random"]', "ipc = [1]", "repeats = 1", 'data = "imagefolder"',
        f"data_root = {json.dumps(str(data))}", f"backbone = {json.dumps(str(bb))}",
        f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}", "real_images_per_class = 2",
        "[protocol.quick]", "epochs = 1", "test_limit = 6", "eval_every = 0", "precision = \"fp32\"", ""]))
    r = gendd("bench", str(good), "--out", str(tmp_path / "b"), "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "| random | 1 | convnet3 | quick |" in r.stdout and (tmp_path / "b" / "results.csv").exists()
    r = gendd("report", str(tmp_path / "b"), "--no-tsne")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip().splitlines()[-1]) == tmp_path / "b" / "report.html"
    assert (tmp_path / "b" / "report.html").stat().st_size > 1000


def test_finetuned_set_with_backbone_defaults_is_recognised_as_done(world, tmp_path, monkeypatch):
    """A fine-tuning method's manifest records options resolved with the backbone folder's defaults; the
    bench must see that set as done rather than distil it again."""
    import shutil

    import gendd.bench as bench

    data, bb = world
    bb2 = tmp_path / "bb-ft"
    shutil.copytree(bb, bb2)
    (bb2 / "gendd_finetune.json").write_text(json.dumps({"steps": 2, "batch_size": 4}))
    monkeypatch.setenv("GENDD_FINETUNE", str(tmp_path / "ft"))
    cfg = tiny_config(world, tmp_path, methods=["memory"], ipc=[1], backbone=str(bb2), metrics=False, repeats=1,
                      method={"memory": {"num_steps": 2}}, real_accuracy={})
    distilled = []
    real_distill = bench.run_distill
    monkeypatch.setattr(bench, "run_distill", lambda m, *a, **k: distilled.append(m) or real_distill(m, *a, **k))
    bench.run_bench(cfg, tmp_path / "b", progress=False)
    man = json.loads((tmp_path / "b" / "sets" / "memory-ipc1" / "manifest.json").read_text())
    assert man["config"]["finetune"]["steps"] == 2 and distilled == ["memory"]
    bench.run_bench(cfg, tmp_path / "b", progress=False)
    assert distilled == ["memory"]


def test_a_rerun_with_other_backbone_weights_is_refused(world, tmp_path):
    """Set manifests name options, not weights: the bench records its backbone's hash and refuses a re-run into the
    same folder from a backbone retrained under the same name (or, for folders written before the hash, a
    backbone folder of another name), instead of tabulating the old sets as the new backbone's."""
    import shutil

    from gendd.backbone import tiny_backbone
    from gendd.bench import run_bench

    data, bb = world
    mine = tmp_path / "bb"
    shutil.copytree(bb, mine)
    cfg = tiny_config(world, tmp_path, methods=["dit"], ipc=[1], backbone=str(mine), protocols=[], metrics=False,
                      real_accuracy={})
    run_bench(cfg, tmp_path / "b", progress=False)
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["backbone_hash"]
    run_bench(cfg, tmp_path / "b", progress=False)  # same weights: fine
    tiny_backbone(num_classes=3, image_size=16, channels=3, vae_channels=(32, 32), seed=1).save_pretrained(mine)
    with pytest.raises(ConfigError, match="from another backbone"):
        run_bench(cfg, tmp_path / "b", progress=False)
    del saved["backbone_hash"]  # a folder from before the hash was recorded
    (tmp_path / "b" / "config.json").write_text(json.dumps(saved))
    other = tmp_path / "bb-other"
    shutil.copytree(bb, other)
    with pytest.raises(ConfigError, match="from backbone 'bb'"):
        run_bench(tiny_config(world, tmp_path, methods=["dit"], ipc=[1], backbone=str(other), protocols=[],
                              metrics=False, real_accuracy={}), tmp_path / "b", progress=False)


def test_metrics_in_another_backbones_latent_space(world, tmp_path):
    """``metrics_backbone`` puts the sets in that backbone's VAE space: the stored latents (the grid backbone's
    shape) are not used, the PNGs are encoded, and the cache key names the space."""
    from gendd.backbone import tiny_backbone
    from gendd.bench import run_bench

    other = tmp_path / "bb-2ch"
    tiny_backbone(num_classes=3, image_size=16, channels=3, vae_channels=(32, 32), latent_channels=2,
                  seed=3).save_pretrained(other)
    common = dict(methods=["dit"], ipc=[2], protocols=[], real_accuracy={})
    run_bench(tiny_config(world, tmp_path, **common), tmp_path / "b", progress=False)
    own = json.loads((tmp_path / "b" / "metrics" / "dit-ipc2.json").read_text())
    run_bench(tiny_config(world, tmp_path, metrics_backbone=str(other), **common), tmp_path / "b", progress=False)
    moved = json.loads((tmp_path / "b" / "metrics" / "dit-ipc2.json").read_text())
    assert own["metrics"]["latent_source"] == "stored" and moved["metrics"]["latent_source"] == "encoded"
    assert moved["key"]["backbone"] == str(other) and moved["key"]["set_files"] == own["key"]["set_files"]
    assert moved["metrics"]["pairwise_cos"] != own["metrics"]["pairwise_cos"]


def test_soft_label_rows_lrs_and_teacher_space_metrics(world, tmp_path, monkeypatch):
    """A grid with a hard and a soft-label protocol: the soft row's LRS takes Acc(syn, hard) from the hard row
    of the same set; the teacher-space metrics are computed once per set and cached."""
    import gendd.evaluate.teacher as teacher_mod
    from gendd.bench import run_bench
    from gendd.data import get_dataset
    from gendd.evaluate import TeacherConfig, train_teacher
    from gendd.metrics import label_robust_score

    data, _ = world
    train = get_dataset("imagefolder", "train", root=str(data))
    test = get_dataset("imagefolder", "test", root=str(data))
    train_teacher(train, test, "convnet3", TeacherConfig(epochs=1, eval_every=0), out=tmp_path / "t", progress=False)
    soft = {"profile": "rded-soft-quick", "teacher": str(tmp_path / "t"), "epochs": 1, "test_limit": 9,
            "eval_every": 0}
    cfg = tiny_config(world, tmp_path, ipc=[2], protocols=["quick", "soft"], metrics=False,
                      protocol={"quick": {"epochs": 1, "test_limit": 9, "eval_every": 0, "precision": "fp32"},
                                "soft": soft},
                      metrics_teacher=str(tmp_path / "t"), real_accuracy={"convnet3": 80.0})
    calls = []
    real_features = teacher_mod.teacher_features

    def counting(*a, **k):
        calls.append(1)
        return real_features(*a, **k)

    monkeypatch.setattr(teacher_mod, "teacher_features", counting)
    rows = run_bench(cfg, tmp_path / "b", progress=False)
    idx = {(r["method"], r["protocol"]): r for r in rows}
    assert len(rows) == 4 and all(r["n"] == 2 for r in rows)
    hard, sft, base = idx[("dit", "quick")], idx[("dit", "soft")], idx[("random", "soft")]
    want = label_robust_score(80.0, hard["final_mean"], sft["final_mean"], base["final_mean"])["lrs"]
    assert sft["lrs"] == pytest.approx(want)
    assert hard["lrs"] == pytest.approx(label_robust_score(80.0, hard["final_mean"], hard["final_mean"],
                                                           idx[("random", "quick")]["final_mean"])["lrs"])
    for r in rows:
        assert 0 <= r["teacher_coverage"] <= 1 and r["teacher_fd"] >= 0 and r["teacher_pairwise_dist"] > 0
    n_calls = len(calls)
    assert n_calls == 2 * 3 + 3  # per set one call per class, and the real images once per class
    again = run_bench(cfg, tmp_path / "b", progress=False)
    assert len(calls) == n_calls and _strip(again) == _strip(rows)
    md = (tmp_path / "b" / "results.md").read_text()
    assert "div(T)" in md and "LRS" in md
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(saved["set_metrics_teacher"]) == {"random-ipc2", "dit-ipc2"}


def test_teacher_features_resize_and_normalise(tmp_path):
    """teacher_features == embed of the normalised images; other sizes are resized to the teacher's."""
    import torch
    from conftest import assert_close_f32, convnet_n

    from gendd.evaluate import build_student, normalize
    from gendd.evaluate.teacher import Teacher, teacher_features
    from gendd.metrics import embed_images

    torch.manual_seed(0)
    net = build_student("convnet3", 1, 3, 16).eval()
    t = Teacher(net, "convnet3", 1, 3, 16, (0.5,), (0.25,), None, "gendd", "x")
    x = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    got = teacher_features(t, x, batch_size=2)
    # batches of 2 vs one batch of 5: other conv blocking, so float32 rounding of the ConvNet-3 forward
    assert_close_f32(got, embed_images(net, normalize(x, (0.5,), (0.25,))), n=convnet_n(1))
    assert teacher_features(t, torch.randint(0, 256, (3, 1, 24, 24), dtype=torch.uint8)).shape == got[:3].shape
    with pytest.raises(ConfigError, match="normalisation"):
        teacher_features(Teacher(net, "convnet3", 1, 3, 16, None, None, None, "x", "x"), x)


def test_teacher_logits_use_the_feature_transform_and_restore_the_mode():
    """teacher_logits == the net's output on the normalised images; the model's train/eval mode is left as found."""
    import torch
    from conftest import assert_close_f32, convnet_n

    from gendd.evaluate import build_student, normalize
    from gendd.evaluate.teacher import Teacher, teacher_logits

    torch.manual_seed(0)
    net = build_student("convnet3", 1, 3, 16).train()
    t = Teacher(net, "convnet3", 1, 3, 16, None, None, None, "x", "x")
    x = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    got = teacher_logits(t, x, (0.5,), (0.25,), batch_size=2)
    assert net.training
    with torch.no_grad():
        want = net.eval()(normalize(x, (0.5,), (0.25,)))
    # batches of 2 vs one batch of 5: other conv blocking, so float32 rounding of the ConvNet-3 forward
    assert_close_f32(got, want, n=convnet_n(1))
    assert got.shape == (5, 3)
    with pytest.raises(ConfigError, match="normalisation"):
        teacher_logits(t, x)


def test_workers_get_one_precision_decision_from_the_parent(monkeypatch):
    import gendd.hardware as hw
    from gendd.bench import _decide_precision

    monkeypatch.setattr(hw, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(hw, "_PROBED", {})
    calls = []
    monkeypatch.setattr(hw, "_step_seconds", lambda bf16, repeats=3: calls.append(bf16) or (1.0 if bf16 else 2.0))
    jobs = [{"threads": 1}, {"threads": 1}, {"threads": 2}]
    _decide_precision(jobs)
    assert [j["cpu_bf16_faster"] for j in jobs] == [True, True, True]
    assert len(calls) == 4  # one fp32 and one bf16 timing per thread count, not per job
    monkeypatch.setattr(hw, "cpu_bf16_native", lambda: False)
    jobs = [{"threads": 1}]
    _decide_precision(jobs)
    assert "cpu_bf16_faster" not in jobs[0]  # no probe where bf16 is not native: auto is fp32 anyway
