"""IDC hard-label and RDED/D3HR soft-label protocols: schedules, augmentations, losses, teachers,
tiny end-to-end runs (a few 12-16 px images, 1-3 epochs)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import approx_f32, assert_close_f32, make_dataset
from gendd.errors import ConfigError
from gendd.evaluate import (
    PROFILES,
    DSAProtocol,
    IDCHardProtocol,
    SoftLabelProtocol,
    TeacherConfig,
    evaluate_distilled,
    get_profile,
    ipc_epochs,
    load_teacher,
    soft_batch_size,
    train_teacher,
)
from gendd.evaluate import imagenet_aug as A
from gendd.evaluate import teacher as teacher_mod
from gendd.evaluate.students import build_student
from gendd.evaluate.data import eval_transform, prepare_test_u8
from gendd.evaluate.recipes import adamw_param_groups, cutmix_ce_loss, soft_label_loss, teacher_class_map

RUN_KEYS = {"final_acc", "best_acc", "best_epoch", "history", "lrs", "losses", "final_loss", "seconds",
            "eval_seconds", "epochs", "seed", "precision", "history_unit"}


def _split(ds, split):
    return dataclasses.replace(ds, split=split)


@pytest.fixture(scope="module")
def tiny():
    """3 classes, 1 channel, 12 px: 4 distilled images per class, 5 real train/test per class."""
    distilled = make_dataset(num_classes=3, per_class=4, size=12, channels=1, seed=1)
    real = _split(make_dataset(num_classes=3, per_class=5, size=12, channels=1, seed=2), "train")
    test = _split(make_dataset(num_classes=3, per_class=5, size=12, channels=1, seed=3), "test")
    return distilled, real, test


@pytest.fixture(scope="module")
def teacher_dir(tiny, tmp_path_factory):
    _, real, test = tiny
    out = tmp_path_factory.mktemp("teacher")
    train_teacher(real, test, "convnet3", TeacherConfig(epochs=2, batch_size=8, eval_every=1), out,
                  progress=False)
    return out


# ------------------------------------------------------------------------------ profiles

def test_profiles_registered_and_dsa_unchanged():
    assert PROFILES["paper"] == DSAProtocol(eval_every=200)
    assert PROFILES["quick"] == DSAProtocol(epochs=300, repeats=3, eval_every=100, precision="auto")
    for name in ("idc-hard", "idc-hard-small", "idc-hard-quick", "rded-soft", "d3hr-soft", "rded-soft-small",
                 "rded-soft-quick"):
        p = get_profile(name)
        for field in ("student", "repeats", "num_threads", "compile", "test_limit", "epochs"):
            assert hasattr(p, field)
        p.with_overrides(epochs=2, repeats=1, compile=False, num_threads=1, test_limit=3)
    assert isinstance(get_profile("idc-hard"), IDCHardProtocol)
    assert get_profile("idc-hard").student == "resnet_ap10"
    d3 = get_profile("d3hr-soft")
    assert isinstance(d3, SoftLabelProtocol) and d3.rrc_scale == (0.08, 1.0) and d3.shuffle_factor == 1
    assert get_profile("rded-soft").rrc_scale == (0.5, 1.0) and get_profile("rded-soft").shuffle_factor == 2
    small = get_profile("rded-soft-small")  # RDED's --factor 1: no patch shuffling, no crop, 300 epochs
    assert (small.shuffle_factor, small.rrc_scale, small.epochs, small.student) == (1, (1.0, 1.0), 300, "convnet3")
    for name in ("quick", "idc-hard", "rded-soft"):  # one way to refuse an unknown field, for every family
        with pytest.raises(ConfigError, match="no option"):
            get_profile(name).with_overrides(bogus=1)
    with pytest.raises(ConfigError, match="temperature"):
        SoftLabelProtocol(temperature=0)


# ------------------------------------------------------------------------------ schedules

def test_idc_epochs_and_optimiser_rules():
    assert [ipc_epochs(i, 10) for i in (1, 2, 10, 11, 50, 100, 200, 500, 1000)] == \
        [3000, 2000, 2000, 1500, 1500, 1000, 1000, 500, 300]
    assert ipc_epochs(10, 100) == 1300 and ipc_epochs(50, 100) == 1000 and ipc_epochs(1, 100) == 2000
    p = IDCHardProtocol()
    assert p.resolved_epochs(10, 10) == 2000 and p.with_overrides(epochs=7).resolved_epochs(10, 10) == 7
    assert p.resolved_optim(10) == (0.01, 5e-4, 64) and p.resolved_optim(100) == (0.01, 5e-4, 64)
    assert p.resolved_optim(1000) == (0.1, 1e-4, 128)


def test_idc_lr_schedule_matches_multistep():
    p = IDCHardProtocol()
    assert p.milestone_epochs(2000) == [1333, 1666]
    assert [p.lr_at(e, 2000, 0.01) for e in (0, 1332, 1333, 1665, 1666, 1999)] == \
        pytest.approx([0.01, 0.01, 0.002, 0.002, 0.0004, 0.0004])
    E = 60
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2 * E // 3, 5 * E // 6], gamma=0.2)
    for e in range(E):
        assert p.lr_at(e, E, 0.01) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_soft_lr_schedules_match_lambdalr():
    p = SoftLabelProtocol()
    E = 300
    assert p.lr_at(0, E) == pytest.approx(1e-3)
    assert p.lr_at(150, E) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert p.lr_at(299, E) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 299 / 600)))
    assert p.lr_at(299, E) > 0.5e-3                       # half-cosine ends near half the lr
    assert p.with_overrides(schedule="cosine").lr_at(150, E) == pytest.approx(0.5e-3)
    E = 20
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / E / 2)) if s <= E else 0)
    for e in range(E):
        assert p.lr_at(e, E) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_soft_batch_rules_and_eval_epochs():
    assert soft_batch_size("rded", 10, 1000) == 100 and soft_batch_size("rded", 50, 10) == 100
    assert soft_batch_size("rded", 1, 10) == 10 and soft_batch_size("rded", 10, 100) == 100
    assert soft_batch_size("d3hr", 10, 1000) == 50 and soft_batch_size("d3hr", 10, 100) == 100
    assert soft_batch_size("d3hr", 1, 10) == 10 and soft_batch_size("d3hr", 2, 10) == 15
    assert soft_batch_size("rded", 4, 3) == 10 and soft_batch_size("rded", 2, 3) == 6   # capped
    rded, d3hr = get_profile("rded-soft"), get_profile("d3hr-soft")
    assert [e for e in range(300) if rded.evaluates(e, 300)] == list(range(249, 300, 10))
    assert [e for e in range(300) if d3hr.evaluates(e, 300)] == list(range(291, 300))
    idc = IDCHardProtocol()
    assert [e + 1 for e in range(2000) if idc.evaluates(e, 2000)][:3] == [20, 40, 60]
    assert [e for e in range(1000) if get_profile("idc-hard-small").evaluates(e, 1000)] == [999]


# --------------------------------------------------------------------------- augmentation

def test_train_augment_shapes_and_determinism():
    g = torch.Generator().manual_seed(0)
    x3 = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    x1 = torch.randint(0, 256, (4, 1, 28, 28), generator=g, dtype=torch.uint8)
    idc = A.TrainAugment(24, scale=(0.5, 1.0), jitter=0.4, lighting=0.1)
    rded = A.TrainAugment(24, scale=(0.5, 1.0), shuffle_factor=2)
    for aug in (idc, rded):
        for x, mean, std in ((x3, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)), (x1, (0.3,), (0.35,))):
            a = aug(x, torch.Generator().manual_seed(5), mean, std)
            b = aug(x, torch.Generator().manual_seed(5), mean, std)
            c = aug(x, torch.Generator().manual_seed(6), mean, std)
            assert a.shape == (4, x.shape[1], 24, 24) and a.dtype == torch.float32
            assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_resized_crop_parameters_within_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = A.rrc_params(40, 40, (0.5, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top <= 40 - h and 0 <= left <= 40 - w
        assert 0.5 * 1600 * 0.85 <= h * w <= 1600          # area in scale range (up to rounding)
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(A.random_resized_crop(x, 4, (1.0, 1.0), (1.0, 1.0), g), x)   # full crop = identity


def test_color_ops_on_grey_and_rgb():
    g = torch.Generator().manual_seed(0)
    x1 = torch.rand(3, 1, 8, 8, generator=g)
    assert torch.equal(A.color_jitter(x1, torch.Generator().manual_seed(1), 0.0, 0.0, 0.4), x1)
    assert torch.equal(A.lighting(x1, g, 0.1), x1)              # RGB PCA: skipped for one channel
    grey3 = x1.expand(3, 3, 8, 8).contiguous()                  # saturation of a grey RGB image
    y = A.color_jitter(grey3, torch.Generator().manual_seed(1), 0.0, 0.0, 0.4)
    # gray() is a 3-term weighted sum (weights summing to 1 up to rounding): float32 rounding only
    assert_close_f32(y, grey3, n=3, scale=float(grey3.abs().max()))
    x3 = torch.rand(2, 3, 8, 8, generator=g)
    lit = A.lighting(x3, torch.Generator().manual_seed(2), 0.1) - x3
    # (x + off) - x rounds twice, relative to the size of x + off
    assert_close_f32(lit, lit[:, :, :1, :1].expand_as(lit), n=2,
                     scale=float((x3 + lit).abs().max()))   # one offset per channel
    bright = A.color_jitter(x3, torch.Generator().manual_seed(3), 0.4, 0.0, 0.0)
    ratio = bright / x3                                        # brightness: x (1 - a), a ~ U(-.4, .4)
    # x + a (0 - x), then / x: three float32 roundings of values up to 1.4
    assert_close_f32(ratio, ratio[:, :1, :1, :1].expand_as(ratio), n=3, scale=1.4)
    assert ((ratio >= 0.6 - 1e-6) & (ratio <= 1.4 + 1e-6)).all()


def test_shuffle_patches_permutes_quadrants():
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    y = A.shuffle_patches(x, 2, torch.Generator().manual_seed(0))
    for i in range(2):
        quads = lambda t: sorted(t[0, r:r + 2, c:c + 2].flatten().tolist() for r in (0, 2) for c in (0, 2))
        assert quads(y[i]) == quads(x[i])
    assert A.shuffle_patches(torch.zeros(1, 1, 5, 5), 2, None).shape == (1, 1, 4, 4)  # remainder dropped


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_ratio_matches_box_area(seed):
    x = torch.randn(5, 2, 16, 12)
    cm = A.cutmix(x, torch.Generator().manual_seed(seed), beta=1.0)
    r1, c1, r2, c2 = cm.box
    inside = torch.zeros(16, 12, dtype=torch.bool)
    inside[r1:r2, c1:c2] = True
    assert cm.ratio == pytest.approx(1 - inside.sum().item() / (16 * 12))
    assert torch.equal(cm.images[:, :, inside], x[cm.perm][:, :, inside])
    assert torch.equal(cm.images[:, :, ~inside], x[:, :, ~inside])
    again = A.cutmix(x, torch.Generator().manual_seed(seed), beta=1.0)
    assert torch.equal(again.images, cm.images) and again.box == cm.box


def test_eval_transform_rules():
    idc, soft = IDCHardProtocol(), SoftLabelProtocol()
    assert eval_transform(idc, 256) == (224, 224, "Resize(224) + CenterCrop(224) of 256 px images")
    assert eval_transform(soft, 256)[:2] == (256, 224)
    assert eval_transform(soft, 28)[:2] == (28, 28) and eval_transform(idc, 32)[:2] == (32, 32)
    big = _split(make_dataset(num_classes=2, per_class=2, size=256, channels=3, seed=0), "test")
    x, y = prepare_test_u8(big, soft)
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.uint8 and y.tolist() == [0, 0, 1, 1]
    raw = big.load([0])
    assert torch.equal(x[0], raw[0, :, 16:240, 16:240])          # 256 -> 256 resize is exact; crop 16


# -------------------------------------------------------------------------------- losses

def test_soft_label_loss_with_one_hot_teacher_is_hard_ce():
    """Teacher logits 1e4 * onehot(y): softmax(t / T) is exactly one-hot in float32, its entropy is
    0, so KL(p_t || softmax(s / T)) must equal CE(s / T, y) (to float rounding)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    t = 1e4 * F.one_hot(y, 5).float()
    for T in (1.0, 4.0, 20.0):
        assert torch.equal(F.softmax(t / T, dim=1), F.one_hot(y, 5).float())
        # KL vs cross-entropy code paths: float32 sums over 6 rows x 5 classes
        assert soft_label_loss(s, t, T).item() == approx_f32(F.cross_entropy(s / T, y).item(), n=6 * 5)
    # in general: KL = CE(p_t, s / T) - H(p_t), the entropy term being constant in the student
    t = torch.randn(6, 5, generator=g)
    p = F.softmax(t / 4.0, dim=1)
    ce = -(p * F.log_softmax(s / 4.0, dim=1)).sum(1).mean()
    ent = -(p * p.log()).sum(1).mean()
    # ce - ent cancels: the rounding is relative to |ce| + |ent|
    assert soft_label_loss(s, t, 4.0).item() == approx_f32((ce - ent).item(), n=6 * 5,
                                                           scale=abs(ce.item()) + abs(ent.item()))


def test_cutmix_ce_loss_and_param_groups():
    g = torch.Generator().manual_seed(0)
    out, y, yb = torch.randn(4, 3, generator=g), torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 1])
    # float32 cross-entropies over 4 rows x 3 classes, mixed in another order
    assert cutmix_ce_loss(out, y, yb, 1.0).item() == approx_f32(F.cross_entropy(out, y).item(), n=4 * 3)
    mix = 0.3 * F.cross_entropy(out, y) + 0.7 * F.cross_entropy(out, yb)
    assert cutmix_ce_loss(out, y, yb, 0.3).item() == approx_f32(mix.item(), n=4 * 3)
    net = build_student("resnet18_bn", 3, 4, 32)
    decay, no_decay = adamw_param_groups(net, 0.01)
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


# ---------------------------------------------------------------------------- tiny runs

def test_idc_hard_tiny_run_is_deterministic(tiny):
    distilled, _, test = tiny
    p = get_profile("idc-hard").with_overrides(student="convnet3", epochs=3, repeats=1)
    a = evaluate_distilled(distilled, test, p, progress=False)
    b = evaluate_distilled(distilled, test, p, progress=False)
    run = a["runs"][0]
    assert RUN_KEYS <= set(run) and run["epochs"] == 3
    assert run["lrs"] == pytest.approx([p.lr_at(e, 3, 0.01) for e in range(3)])
    assert [h[0] for h in run["history"]] == [1, 2, 3]                 # E // 100 = 0 -> every epoch
    assert run["history"] == b["runs"][0]["history"] and run["final_loss"] == b["runs"][0]["final_loss"]
    assert a["test_split"] == "test" and a["test_size"] == 15 and a["image_size"] == 12
    small = get_profile("idc-hard-small").with_overrides(epochs=2, repeats=1)
    r = evaluate_distilled(distilled, test, small, progress=False)["runs"][0]
    assert [h[0] for h in r["history"]] == [2]


def test_soft_label_tiny_runs(tiny, teacher_dir):
    distilled, _, test = tiny
    for name in ("rded-soft", "d3hr-soft"):
        p = get_profile(name).with_overrides(student="convnet3", epochs=2, repeats=1, teacher=str(teacher_dir))
        res = evaluate_distilled(distilled, test, p, progress=False)
        run = res["runs"][0]
        assert RUN_KEYS <= set(run) and run["lrs"] == pytest.approx([p.lr_at(e, 2) for e in range(2)])
        assert res["teacher"]["student"] == "convnet3" and np.isfinite(run["final_loss"])
        assert run["resolved"]["batch_size"] == soft_batch_size(p.batch_rule, 4, 3)
    p = get_profile("rded-soft").with_overrides(epochs=1, repeats=1, teacher=str(teacher_dir / "teacher.pt"))
    assert evaluate_distilled(distilled, test, p, seeds=[3], progress=False)["runs"][0]["seed"] == 3


def test_missing_teacher_errors(tiny, tmp_path):
    distilled, _, test = tiny
    p = get_profile("rded-soft").with_overrides(student="convnet3", epochs=1, repeats=1)
    with pytest.raises(ConfigError, match="needs a teacher.*gendd teacher train"):
        evaluate_distilled(distilled, test, p, progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_distilled(distilled, test, p.with_overrides(teacher=str(tmp_path / "nope.pt")),
                           progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        load_teacher(tmp_path / "junk.pt")


def test_teacher_class_maps(tiny, teacher_dir):
    _, _, test = tiny
    teacher = load_teacher(teacher_dir)
    assert teacher_class_map(teacher, test) is None
    shuffled = dataclasses.replace(teacher, classes=list(reversed(teacher.classes)))
    assert teacher_class_map(shuffled, test).tolist() == [2, 1, 0]
    imagenet = dataclasses.replace(teacher, classes=None, num_classes=1000)
    sub = dataclasses.replace(test, model_labels=[7, 300, 999])
    assert teacher_class_map(imagenet, sub).tolist() == [7, 300, 999]
    with pytest.raises(ConfigError, match="classes"):
        teacher_class_map(dataclasses.replace(teacher, classes=None, num_classes=5), test)


def test_teacher_train_load_round_trip_and_resume(tiny, teacher_dir, tmp_path, monkeypatch):
    _, real, test = tiny
    t = load_teacher(teacher_dir / "teacher.pt")
    saved = torch.load(teacher_dir / "teacher.pt", weights_only=True)
    assert saved["format"] == "gendd-teacher-1" and saved["student"] == "convnet3"
    assert (saved["channels"], saved["num_classes"], saved["image_size"]) == (1, 3, 12)
    assert saved["mean"] == list(real.mean) and 0 <= saved["test_acc"] <= 100
    assert saved["config"]["epochs"] == 2 and not (teacher_dir / "teacher.ckpt").exists()
    assert all(torch.equal(t.model.state_dict()[k], v) for k, v in saved["state_dict"].items())
    # the same call again returns the saved teacher without training
    mtime = (teacher_dir / "teacher.pt").stat().st_mtime_ns
    cfg = TeacherConfig(epochs=2, batch_size=8, eval_every=1)
    train_teacher(real, test, "convnet3", cfg, teacher_dir, progress=False)
    assert (teacher_dir / "teacher.pt").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="other settings"):
        train_teacher(real, test, "convnet3", dataclasses.replace(cfg, lr=0.05), teacher_dir, progress=False)
    # interrupt after the first epoch, resume: same weights as the uninterrupted run
    calls = {"n": 0}
    real_acc = teacher_mod._accuracy

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_acc(*args, **kwargs)

    monkeypatch.setattr(teacher_mod, "_accuracy", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(real, test, "convnet3", cfg, tmp_path, progress=False)
    assert (tmp_path / "teacher.ckpt").exists() and not (tmp_path / "teacher.pt").exists()
    monkeypatch.setattr(teacher_mod, "_accuracy", real_acc)
    resumed = train_teacher(real, test, "convnet3", cfg, tmp_path, progress=False)
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in t.model.state_dict().items())
    # interrupted after the last pass's checkpoint, before teacher.pt: the rerun trains and tests nothing more
    real_save = teacher_mod.save_torch

    def crash_on_final(path, obj):
        if Path(path).name == "teacher.pt":
            raise KeyboardInterrupt
        return real_save(path, obj)

    late = tmp_path / "late"
    monkeypatch.setattr(teacher_mod, "save_torch", crash_on_final)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(real, test, "convnet3", cfg, late, progress=False)
    assert torch.load(late / "teacher.ckpt", weights_only=True)["passes"] == cfg.epochs
    monkeypatch.setattr(teacher_mod, "save_torch", real_save)
    monkeypatch.setattr(teacher_mod, "_accuracy", flaky)  # a test or a training pass would now raise
    calls["n"] = 1

    def no_training(*args, **kwargs):
        raise AssertionError("a finished teacher run trained again")

    monkeypatch.setattr(teacher_mod.TeacherRecipe, "loss", no_training)
    done = train_teacher(real, test, "convnet3", cfg, late, progress=False)
    assert calls["n"] == 1 and done.test_acc == t.test_acc and not (late / "teacher.ckpt").exists()
    assert all(torch.equal(done.model.state_dict()[k], v) for k, v in t.model.state_dict().items())
    assert torch.load(late / "teacher.pt", weights_only=True)["history"] == saved["history"]


def test_cli_teacher_train_and_evaluate(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from gendd.cli import app

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2), ("dist", 2)):
        for c in ("a", "b"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")
    root = ["--data", "imagefolder", "--data-root", str(tmp_path)]
    runner = CliRunner()
    res = runner.invoke(app, ["teacher", "train", *root, "--student", "convnet3", "--epochs", "1",
                              "--batch-size", "4", "--lr", "0.05", "--out", str(tmp_path / "t"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t" / "teacher.pt").exists() and load_teacher(tmp_path / "t").config["lr"] == 0.05
    common = ["evaluate", str(tmp_path / "dist"), *root, "--profile", "d3hr-soft", "--epochs", "1",
              "--repeats", "1", "--student", "convnet3", "--quiet"]
    res = runner.invoke(app, common + ["--teacher", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert "1 epochs" in res.output
    res = runner.invoke(app, common)
    assert isinstance(res.exception, ConfigError) and "needs a teacher" in str(res.exception)
