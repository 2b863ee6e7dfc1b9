"""One validation step for every typed config (gendd.config), run before any work.

Contract over every registered method, every evaluation profile and the other user-facing configs: every
field declares a check, and a wrong type, NaN (numeric fields) and an out-of-range value (fields with a
range or a set of choices) each raise one ConfigError naming the option. Then the CLI: a bad option or IPC is
one ``error:`` line, exit status 2, before any dataset or backbone is read, with no folder left behind; and a
set's manifest records where its data was, so ``gendd evaluate OUT`` finds it (and notices when it moved).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gendd.config import build_config, field_check
from gendd.errors import ConfigError, DataError

NAN = float("nan")


# ------------------------------------------------------------------------------ probes from the declarations

def _wrong_types(chk) -> list:
    if chk.choices is not None:
        return [12345]
    types = set(chk.types)
    if types & {Real, Integral}:
        return ["fifty", True]
    if bool in types:
        return ["fifty", 1]
    return [12345]


def _out_of_range(chk, current):
    """A value outside the field's declared range or choices (None if it declares neither)."""
    if chk.choices is not None:
        return "not-a-choice"
    bounds = [(chk.ge, -1), (chk.gt, 0), (chk.le, 1), (chk.lt, 0)]
    for bound, step in bounds:
        if bound is not None:
            v = bound + step
            return int(v) if Integral in chk.types and Real not in chk.types else float(v)
    if chk.items is not None and isinstance(current, (tuple, list)) and current:
        inner = _out_of_range(chk.items, current[0])
        if inner is not None:
            return type(current)([inner, *current[1:]])
    return None


def _probes(chk, current) -> list[tuple[str, object]]:
    out = [("wrong type", v) for v in _wrong_types(chk)]
    if set(chk.types) & {Real, Integral}:
        out.append(("NaN", NAN))
    bad = _out_of_range(chk, current)
    if bad is not None:
        out.append(("out of range", bad))
    return out


def _violations(base, rebuild) -> list[str]:
    """Every (field, probe) of ``base`` that ``rebuild(field, value)`` accepts, or refuses without naming it."""
    problems = []
    for f in dataclasses.fields(base):
        if not f.init:
            continue
        chk = field_check(f)
        if chk is None:
            problems.append(f"{f.name}: declares no check")
            continue
        for kind, value in _probes(chk, getattr(base, f.name)):
            try:
                rebuild(f.name, value)
            except ConfigError as err:
                if f.name not in str(err):
                    problems.append(f"{f.name} ({kind} {value!r}): error does not name it: {err}")
            else:
                problems.append(f"{f.name} ({kind} {value!r}): accepted")
    return problems


def _methods() -> list[str]:
    from gendd.methods import available_methods

    return available_methods()


def _profiles() -> list[str]:
    from gendd.evaluate import PROFILES

    return sorted(PROFILES)


@pytest.mark.parametrize("name", _methods())
def test_every_method_option_is_validated(name):
    from gendd.methods import build_method, get_method

    cls = get_method(name).config_class
    base = build_method(name).config
    # the CLI / TOML path (build_config: strings coerced by the declared type) and the Python path
    assert _violations(base, lambda f, v: build_method(name, **{f: v})) == []
    assert _violations(base, lambda f, v: cls(**{f: v})) == []


@pytest.mark.parametrize("name", _profiles())
def test_every_protocol_field_is_validated(name):
    from gendd.evaluate import PROFILES

    base = PROFILES[name]
    assert _violations(base, lambda f, v: base.with_overrides(**{f: v})) == []


def _other_configs():
    from gendd.backbone.finetune import FinetuneConfig
    from gendd.backbone.sampling import SamplerConfig
    from gendd.backbone.train import BackboneTrainConfig
    from gendd.bench import BenchConfig
    from gendd.evaluate.teacher import TeacherConfig

    return {"finetune": FinetuneConfig(), "backbone-train": BackboneTrainConfig(), "teacher": TeacherConfig(),
            "sampler": SamplerConfig(), "bench": BenchConfig(methods=["random", "dit"], ipc=[1, 10])}


@pytest.mark.parametrize("name", ["finetune", "backbone-train", "teacher", "sampler", "bench"])
def test_every_other_config_field_is_validated(name):
    base = _other_configs()[name]
    assert _violations(base, lambda f, v: dataclasses.replace(base, **{f: v})) == []


def test_build_config_coerces_cli_strings_and_names_the_config():
    from gendd.backbone.finetune import FinetuneConfig
    from gendd.methods.mgd3 import MGD3Config

    cfg = build_config(MGD3Config, {"num_steps": "20", "mode_guidance_scale": "0.5", "stop_step": "none",
                                    "flip_augment": "false", "cfg_scale": "3"}, "method 'mgd3'")
    assert (cfg.num_steps, cfg.mode_guidance_scale, cfg.stop_step, cfg.flip_augment, cfg.cfg_scale) == \
        (20, 0.5, None, False, 3.0)
    with pytest.raises(ConfigError, match=r"^method 'mgd3': num_steps must be an integer >= 1, got 'fifty'$"):
        build_config(MGD3Config, {"num_steps": "fifty"}, "method 'mgd3'")
    with pytest.raises(ConfigError, match=r"^method 'mgd3': mode_guidance_scale must be a finite number, got nan$"):
        build_config(MGD3Config, {"mode_guidance_scale": "nan"}, "method 'mgd3'")
    with pytest.raises(ConfigError, match="num_steps must be an integer >= 1, got True"):
        build_config(MGD3Config, {"num_steps": True}, "method 'mgd3'")
    with pytest.raises(ConfigError, match=r"has no option\(s\) bogus; options: batch_size, cfg_channels"):
        build_config(MGD3Config, {"bogus": 1}, "method 'mgd3'")
    # a cross-field rule runs after the per-field checks and is named as the caller names the config
    with pytest.raises(ConfigError, match="^method 'mgd3': guidance_form 'mean' scales by the posterior std"):
        build_config(MGD3Config, {"sampler": "ddim", "guidance_form": "mean"}, "method 'mgd3'")
    # Python construction is validated too; lists become tuples in tuple fields
    with pytest.raises(ConfigError, match="^finetune: ema_decay must be in"):
        FinetuneConfig(ema_decay=1.0)
    from gendd.evaluate import PROFILES

    assert PROFILES["idc-hard"].with_overrides(rrc_scale=[0.2, 0.9]).rrc_scale == (0.2, 0.9)


def test_nested_finetune_options_are_validated():
    from gendd.methods import build_method

    with pytest.raises(ConfigError, match=r"^method 'minimax': finetune: steps must be an integer >= 1"):
        build_method("minimax", finetune={"steps": "fifty"})
    with pytest.raises(ConfigError, match="unknown fine-tuning option"):
        build_method("memory", finetune={"stepz": 3})


# ------------------------------------------------------------------------------ the CLI: validation before work

def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``gendd ARGS`` in this process, as :func:`gendd.cli.main` runs it: (exit status, stdout, stderr)."""
    import gendd.cli

    monkeypatch.setattr(sys, "argv", ["gendd", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        gendd.cli.main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any dataset or backbone load fails the test: errors must come first."""
    import gendd.data
    import gendd.pipeline

    def loaded(*args, **kwargs):
        raise AssertionError("a dataset or backbone was loaded before the options were validated")

    monkeypatch.setattr(gendd.data, "get_dataset", loaded)
    monkeypatch.setattr(gendd.pipeline, "resolve_backbone", loaded)


@pytest.mark.parametrize("args, names", [
    (["--set", "num_steps=fifty"], "num_steps must be an integer"),
    (["--set", "cfg_scale=nan"], "cfg_scale must be a finite number"),
    (["--set", "cfg_scale=true"], "cfg_scale must be a finite number"),
    (["--ipc", "0"], "IPC must be an integer >= 1"),
    (["--set", "sampler=ddim2"], "sampler must be one of"),
])
def test_distill_refuses_bad_options_before_loading_anything(args, names, tmp_path, monkeypatch, capsys,
                                                             nothing_loads):
    out = tmp_path / "X"
    code, _, err = _cli(monkeypatch, capsys, "distill", "dit", "--ipc", "10", "--out", out, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], err
    assert not out.exists()


def test_other_commands_refuse_bad_arguments_before_loading_anything(tmp_path, monkeypatch, capsys,
                                                                     nothing_loads):
    for args, names in [
        (["backbone", "train", "--out", tmp_path / "b", "--dit-heads", "0"], "dit_heads must be"),
        (["backbone", "train", "--out", tmp_path / "b", "--dit-heads", "3"], "dit_hidden (128) must be a multiple"),
        (["teacher", "train", "--out", tmp_path / "t", "--lr", "nan"], "lr must be a finite number"),
        (["teacher", "train", "--out", tmp_path / "t", "--student", "vgg"], "unknown student 'vgg'"),
        (["finetune", "--out", tmp_path / "f", "--set", "steps=fifty"], "steps must be an integer"),
        (["d3hr-regenerate", tmp_path, "--out", tmp_path / "d", "--set", "w_skew=-1"], "w_skew must be >= 0"),
        (["d3hr-regenerate", tmp_path, "--out", tmp_path / "d", "--ipc", "0"], "IPC must be"),
        (["run", "--out", tmp_path / "r", "--ipc", "0"], "IPC must be"),
        (["run", "--out", tmp_path / "r", "--methods", "random,nope"], "unknown method 'nope'"),
        (["run", "--out", tmp_path / "r", "--profile", "fast"], "unknown evaluation profile 'fast'"),
        (["backbone", "sample", "--out", tmp_path / "g.png", "--steps", "0"], "num_steps must be >= 1"),
        (["backbone", "sample", "--out", tmp_path / "g.png", "--cfg-scale", "nan"], "cfg_scale must be a finite"),
        (["backbone", "sample", "--out", tmp_path / "g.png", "--per-class", "0"], "--per-class must be >= 1"),
    ]:
        code, _, err = _cli(monkeypatch, capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_evaluate_override_comes_before_the_data(tmp_path, monkeypatch, capsys, nothing_loads):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "manifest.json").write_text(json.dumps({"dataset": {"name": "fashion-mnist"}}))
    code, _, err = _cli(monkeypatch, capsys, "evaluate", tmp_path / "set", "--epochs", "-3")
    assert code == 2 and err.startswith("error: evaluation protocol 'dsa': epochs must be >= 0, got -3"), err


def test_cli_error_is_one_line_in_a_real_process(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "gendd.cli", "distill", "dit", "--ipc", "10", "--out",
                        str(tmp_path / "X"), "--set", "num_steps=fifty"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: method 'dit': num_steps must be an integer >= 1, got 'fifty'"
    assert not (tmp_path / "X").exists()


def _image_folder(root: Path, classes=("a", "b"), n=3, size=16) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 2)):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                arr = (rng.random((size, size, 3)) * 60 + 90 * k).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resumed_folder_is_unchanged_by_a_bad_option(tmp_path, monkeypatch, capsys):
    root = _image_folder(tmp_path / "data")
    out = tmp_path / "o"
    common = ["distill", "random", "--data", "imagefolder", "--data-root", root, "--ipc", "1", "--out", out, "--quiet"]
    code, _, err = _cli(monkeypatch, capsys, *common)
    assert code == 0, err
    before = _snapshot(out)
    import gendd.data

    monkeypatch.setattr(gendd.data, "get_dataset", lambda *a, **k: pytest.fail("data read before validation"))
    for bad in (["--set", "seed=fifty"], ["--ipc", "0"], ["--set", "bogus=1"]):
        code, _, err = _cli(monkeypatch, capsys, *common, *bad)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
        assert _snapshot(out) == before


class _FailsAt:
    """``random``, but class ``label`` fails with a user error (as a corrupt image would)."""

    def __new__(cls, label):
        from gendd.methods.random import RandomSubset

        class Failing(RandomSubset):
            name = "failing"

            def distill_class(self, ctx):
                if ctx.label == label:
                    raise DataError(f"class {ctx.name} is broken")
                return super().distill_class(ctx)

        return Failing()


def test_a_user_error_removes_only_what_this_call_created(toy_dataset, tmp_path):
    from gendd.export import distill

    with pytest.raises(DataError, match="c2 is broken"):
        distill(_FailsAt(2), toy_dataset, 1, tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()
    # a folder that existed (a resumed run) keeps the classes it had
    distill(_FailsAt(None), toy_dataset, 1, tmp_path / "resumed", classes=[0, 1], progress=False)
    before = _snapshot(tmp_path / "resumed")
    with pytest.raises(DataError, match="c2 is broken"):
        distill(_FailsAt(2), toy_dataset, 1, tmp_path / "resumed", progress=False)
    assert {k: v for k, v in _snapshot(tmp_path / "resumed").items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


# ------------------------------------------------------------------------------ evaluate finds the set's data

def test_evaluate_finds_the_image_folder_from_the_manifest(tmp_path):
    from gendd.pipeline import evaluation_done_seeds, run_distill, run_evaluate

    root = _image_folder(tmp_path / "data")
    m = run_distill("random", "imagefolder", 2, tmp_path / "set", data_root=root, progress=False)
    assert m["dataset_root"] == str(root.resolve())
    over = {"epochs": 1, "repeats": 1, "eval_every": 0}
    s = run_evaluate(tmp_path / "set", profile="quick", overrides=over, progress=False)  # no data_root given
    assert s["test_size"] == 4 and s["train_size"] == 4 and not math.isnan(s["final_mean"])
    # the folder moved: a clear error, not "pass --data-root" for a dataset the manifest names
    root.rename(tmp_path / "moved")
    with pytest.raises(DataError, match=r"was distilled from .*data, which no longer exists; pass --data-root"):
        evaluation_done_seeds(tmp_path / "set", overrides=over)
    assert evaluation_done_seeds(tmp_path / "set", data_root=tmp_path / "moved", overrides=over) == {0}
    # the folder changed: the train split's fingerprint no longer matches
    (tmp_path / "moved").rename(root)
    Image.new("RGB", (16, 16)).save(root / "train" / "a" / "9.png")
    with pytest.raises(DataError, match="changed since .* was distilled"):
        evaluation_done_seeds(tmp_path / "set", overrides=over)
