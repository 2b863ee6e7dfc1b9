"""The one loop (gendd.evaluate.fit) against the four loops it replaced (tests/legacy_loops.py): the same
operations in the same order, so the same weights, accuracies and losses bit for bit; one history convention
(passes completed) and the migration of results saved under the old DSA convention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import legacy_loops as legacy
from conftest import make_dataset
from gendd.evaluate import TeacherConfig, evaluate_distilled, get_profile, train_teacher
from gendd.evaluate.data import labels_in_test_order, load_distilled, normalize, prepare_test, prepare_test_u8
from gendd.evaluate.fit import HISTORY_UNIT, migrate_run
from gendd.evaluate.teacher import load_teacher


def _split(ds, split):
    return dataclasses.replace(ds, split=split)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    distilled = make_dataset(num_classes=3, per_class=4, size=12, channels=1, seed=1)
    real = _split(make_dataset(num_classes=3, per_class=6, size=12, channels=1, seed=2), "train")
    test = _split(make_dataset(num_classes=3, per_class=5, size=12, channels=1, seed=3), "test")
    folder = tmp_path_factory.mktemp("teacher")
    train_teacher(real, test, "convnet3", TeacherConfig(epochs=2, batch_size=8, eval_every=1), folder, progress=False)
    return distilled, real, test, folder


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _legacy_history(run, shift):
    return [(e + shift, acc) for e, acc in run["history"]]


@pytest.mark.parametrize("overrides", [dict(epochs=5, eval_every=2, lr_decay_epoch=2),
                                       dict(epochs=3, eval_every=0, dsa_strategy="none", batch_size=5)])
def test_dsa_reproduces_the_old_loop(world, overrides):
    distilled, _, test, _ = world
    p = get_profile("quick").with_overrides(repeats=1, precision="fp32", **overrides)
    x = normalize(distilled.load(range(len(distilled))), test.mean, test.std)
    y = labels_in_test_order(distilled, test)
    t = prepare_test(test)
    old = legacy.train_student(x, y, t, p, seed=4, progress=False, num_classes=3, return_model=True)
    new = evaluate_distilled(distilled, test, p, seeds=[4], progress=False)["runs"][0]
    assert new["history"] == _legacy_history(old, 1)  # old: 0-based pass; now: passes completed
    assert new["best_epoch"] == old["best_epoch"] + 1 and new["history_unit"] == HISTORY_UNIT
    for k in ("final_acc", "best_acc", "lrs", "final_loss", "epochs", "precision"):
        assert new[k] == old[k], k
    assert len(new["losses"]) == p.epochs + 1 and new["losses"][-1] == new["final_loss"]


@pytest.mark.parametrize("profile,overrides", [("idc-hard-quick", dict(epochs=3, eval_every=1)),
                                               ("idc-hard-small", dict(epochs=2))])
def test_idc_hard_reproduces_the_old_loop(world, profile, overrides):
    distilled, _, test, _ = world
    p = get_profile(profile).with_overrides(repeats=1, **overrides)
    x, y = load_distilled(distilled, test)
    t = prepare_test_u8(test, p)
    old = legacy.train_idc_hard(x, y, t, p, seed=2, progress=False, num_classes=3, mean=test.mean, std=test.std)
    new = evaluate_distilled(distilled, test, p, seeds=[2], progress=False)["runs"][0]
    assert new["history"] == _legacy_history(old, 0)  # already passes completed
    for k in ("final_acc", "best_acc", "best_epoch", "lrs", "final_loss", "epochs", "resolved"):
        assert new[k] == old[k], k


@pytest.mark.parametrize("profile", ["rded-soft", "d3hr-soft"])
def test_soft_label_reproduces_the_old_loop(world, profile):
    from gendd.evaluate.recipes import teacher_class_map

    distilled, _, test, folder = world
    p = get_profile(profile).with_overrides(student="convnet3", epochs=2, repeats=1, teacher=str(folder))
    teacher = load_teacher(folder)
    x, y = load_distilled(distilled, test)
    t = prepare_test_u8(test, p)
    old = legacy.train_soft_label(x, y, t, p, seed=1, progress=False, num_classes=3, mean=test.mean, std=test.std,
                                  teacher=teacher, class_map=teacher_class_map(teacher, test))
    new = evaluate_distilled(distilled, test, p, seeds=[1], progress=False)["runs"][0]
    assert new["history"] == _legacy_history(old, 0)
    for k in ("final_acc", "best_acc", "best_epoch", "lrs", "final_loss", "epochs", "resolved"):
        assert new[k] == old[k], k


def test_teacher_is_a_fitted_student_like_the_old_loop(world, tmp_path):
    _, real, test, _ = world
    cfg = TeacherConfig(epochs=3, batch_size=8, eval_every=2)
    old = legacy.train_teacher(real, test, "convnet3", cfg, tmp_path / "old", progress=False)
    new = train_teacher(real, test, "convnet3", cfg, tmp_path / "new", progress=False)
    assert _same_weights(old.model, new.model) and old.test_acc == new.test_acc
    old_saved = torch.load(tmp_path / "old" / "teacher.pt", weights_only=True)
    new_saved = torch.load(tmp_path / "new" / "teacher.pt", weights_only=True)
    # old: (epoch, loss, acc) of every epoch; now: (epoch, acc) of the tested ones and the losses per epoch
    assert [(e, a) for e, _, a in old_saved["history"] if a is not None] == [tuple(h) for h in new_saved["history"]]
    assert [loss for _, loss, _ in old_saved["history"]] == new_saved["losses"]


def test_migrate_old_dsa_runs_once():
    old = {"seed": 0, "final_acc": 50.0, "best_acc": 60.0, "best_epoch": 100, "history": [[100, 60.0], [300, 50.0]]}
    new = migrate_run(old, "dsa")
    assert new["history"] == [[101, 60.0], [301, 50.0]] and new["best_epoch"] == 101
    assert migrate_run(new, "dsa") == new  # recorded in the current convention: unchanged
    idc = migrate_run({**old}, "idc-hard")
    assert idc["history"] == old["history"] and idc["best_epoch"] == 100 and idc["history_unit"] == HISTORY_UNIT


def test_saved_old_dsa_partials_are_read_in_the_new_convention(tmp_path):
    """A partial file written before the convention (DSA history of 0-based passes) reads back with passes
    completed; its accuracies are untouched."""
    import json

    from gendd.pipeline import _saved_runs

    run = {"seed": 0, "final_acc": 40.0, "best_acc": 45.0, "best_epoch": 1, "history": [[1, 45.0], [2, 40.0]],
           "seconds": 1.0, "precision": "fp32"}
    path = tmp_path / "eval-quick.partial.json"
    key = {"protocol": {"name": "dsa"}, "train_fingerprint": "x"}
    path.write_text(json.dumps({"key": key, "runs": [run]}))
    (got,) = _saved_runs(path, key, "dsa")
    assert got["history"] == [[2, 45.0], [3, 40.0]] and got["best_epoch"] == 2
    assert (got["final_acc"], got["best_acc"]) == (40.0, 45.0)
    assert _saved_runs(path, {**key, "train_fingerprint": "y"}, "dsa") == []


def test_on_device_wrapper_moves_inputs_and_keeps_the_cpu_interface():
    """The wrapper a student gets off the CPU (here built for the CPU itself: the same mechanics, no GPU in the
    suite): the same logits, gradients reach the wrapped net, train/eval reach it too; on the CPU fit_student
    uses the plain net (no wrapper), which is why the loops above stay bit for bit."""
    from gendd.evaluate.fit import OnDevice, on_device

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    assert on_device(net, torch.device("cpu"), "fp32") is net
    wrapped = OnDevice(net, torch.device("cpu"), "fp32")
    x = torch.randn(4, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    out = wrapped(x)
    assert torch.equal(out, net(x)) and out.device.type == "cpu"
    out.sum().backward()
    assert net[1].weight.grad is not None
    wrapped.eval()
    assert not net.training


def test_bench_workers_get_one_gpu_each(monkeypatch):
    from gendd.bench import _pin_worker, worker_devices

    monkeypatch.setenv("GENDD_DEVICE", "")  # restored after the test, whatever _pin_worker sets
    assert worker_devices(3, gpus=2, local_rank=0) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices(2, gpus=4, local_rank=1) == ["cuda:2", "cuda:3"]  # after rank 0's GPUs on the node
    assert worker_devices(2, gpus=0) == [None, None]
    import queue

    q = queue.Queue()
    q.put("cuda:1")
    _pin_worker(q)
    import os

    assert os.environ["GENDD_DEVICE"] == "cuda:1"
    assert worker_devices(2, gpus=4) == [None, None]  # an explicit GENDD_DEVICE is kept


def test_a_recipe_must_test_after_its_last_pass(world):
    """final_acc is the accuracy after the last pass: a recipe whose schedule skips that test is refused."""
    from gendd.evaluate.fit import fit_student
    from gendd.evaluate.teacher import TeacherRecipe, _test_tensor

    _, real, test, _ = world

    class Untested(TeacherRecipe):
        def tests_after(self, ep):
            return ep == 0

    recipe = Untested(TeacherConfig(epochs=2, batch_size=8), "convnet3", real, _test_tensor(test, 12, None), 12)
    with pytest.raises(RuntimeError, match="must test after the last pass"):
        fit_student(recipe, 0, progress=False)
