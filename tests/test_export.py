"""Export: files, manifest, determinism, resume after interruption, refusal to mix runs."""

from __future__ import annotations

import json

import pytest

from gendd.errors import ConfigError, DataError
from gendd.export import distill, sha256_file
from gendd.methods import build_method, get_method
from gendd.methods.base import Method


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*.png"))}


def test_random_export_layout_and_manifest(toy_dataset, tmp_path):
    m = distill(build_method("random", seed=3), toy_dataset, 4, tmp_path / "o", progress=False)
    out = tmp_path / "o"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [".records", "c0", "c1", "c2", "c3", "latents"]
    assert len(list((out / "c2").glob("*.png"))) == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(m, default=str))
    assert manifest["complete"] and manifest["method"] == "random" and manifest["config"] == {"seed": 3, "reconstruct": False}
    assert {"torch", "python", "gendd"} <= set(manifest["versions"])
    for rel, digest in manifest["files"].items():
        assert sha256_file(out / rel) == digest
    # exported pixels are the chosen real images
    idx = manifest["classes_done"]["c1"]["indices"]
    from PIL import Image
    import numpy as np
    img = np.array(Image.open(out / "c1" / "0.png"))
    assert np.array_equal(img, toy_dataset.load([idx[0]])[0, 0].numpy())
    assert len(set(idx)) == 4 and all(toy_dataset.labels[i] == 1 for i in idx)


def test_ipc_larger_than_class_writes_nothing(toy_dataset, tmp_path):
    with pytest.raises(DataError, match="IPC 7 exceeds the 6 images of class 'c0'"):
        distill(build_method("random"), toy_dataset, 7, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_dit_same_seed_identical_files(toy_dataset, tiny_bb, tmp_path):
    ds = toy_dataset
    m = build_method("dit", num_steps=4, cfg_scale=2.0, seed=5)
    distill(m, ds, 2, tmp_path / "a", backbone=tiny_bb, progress=False)
    distill(m, ds, 2, tmp_path / "b", backbone=tiny_bb, progress=False)
    distill(build_method("dit", num_steps=4, cfg_scale=2.0, seed=6), ds, 2, tmp_path / "c", backbone=tiny_bb,
            progress=False)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    assert _hashes(tmp_path / "a") != _hashes(tmp_path / "c")
    from safetensors.torch import load_file
    lat = load_file(str(tmp_path / "a" / "latents" / "c0.safetensors"))["latents"]
    assert lat.shape == (2, *tiny_bb.latent_shape)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"]["cfg_channels"] == "auto"
    assert manifest["resolved"] == {"cfg_scale": 2.0, "cfg_channels": None}  # gendd's own backbone: all channels


class _Interrupting(Method):
    """dit, but raises KeyboardInterrupt at one class (a user's Ctrl-C mid-run), counting calls."""

    name = "interrupting"
    needs_backbone = True

    def __init__(self, fail_at=None):
        super().__init__(get_method("dit").config_class(num_steps=3, cfg_scale=2.0))
        self.inner = get_method("dit")(self.config)
        self.fail_at, self.calls = fail_at, []

    def distill_class(self, ctx):
        self.calls.append(ctx.label)
        if ctx.label == self.fail_at:
            raise KeyboardInterrupt
        return self.inner.distill_class(ctx)


def test_resume_after_interrupted_export(toy_dataset, tiny_bb, tmp_path):
    full = _Interrupting()
    distill(full, toy_dataset, 3, tmp_path / "ref", backbone=tiny_bb, progress=False)
    first = _Interrupting(fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        distill(first, toy_dataset, 3, tmp_path / "o", backbone=tiny_bb, progress=False)
    out = tmp_path / "o"
    assert (out / "c0").is_dir() and (out / "c1").is_dir() and not (out / "c2").exists()
    assert not list(out.glob(".partial-*"))
    assert not json.loads((out / "manifest.json").read_text()).get("complete")
    # simulate a crash while writing class 2: a partial folder is left behind
    (out / ".partial-c2").mkdir()
    (out / ".partial-c2" / "0.png").write_bytes(b"half")
    second = _Interrupting()
    m = distill(second, toy_dataset, 3, out, backbone=tiny_bb, progress=False)
    assert second.calls == [2, 3]  # finished classes are not recomputed
    assert m["complete"] and not list(out.glob(".partial-*"))
    assert _hashes(out) == _hashes(tmp_path / "ref")


def test_refuses_to_mix_runs(toy_dataset, tmp_path):
    distill(build_method("random", seed=0), toy_dataset, 2, tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="different distillation run"):
        distill(build_method("random", seed=1), toy_dataset, 2, tmp_path / "o", progress=False)
    distill(build_method("random", seed=1), toy_dataset, 2, tmp_path / "o", progress=False, overwrite=True)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["config"]["seed"] == 1


def test_method_registry_errors():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        build_method("nope")
    with pytest.raises(ConfigError, match="has no option"):
        build_method("dit", guidance=3)
    with pytest.raises(ConfigError, match="needs a backbone"):
        distill(build_method("dit"), None, 1, "/nonexistent", progress=False)


def test_grouped_generator_draws_each_class_its_own_noise():
    import torch

    from gendd.backbone import GroupedGenerator, standard_normal

    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    z = standard_normal((5, 3), GroupedGenerator([(2, gens[0]), (3, gens[1])]))
    alone = [torch.randn((2, 3), generator=torch.Generator().manual_seed(1)),
             torch.randn((3, 3), generator=torch.Generator().manual_seed(2))]
    assert torch.equal(z, torch.cat(alone))
    with pytest.raises(ConfigError, match="generator groups cover 5 rows, the request 4"):
        standard_normal((4, 3), GroupedGenerator([(2, gens[0]), (3, gens[1])]))


@pytest.mark.parametrize("name", ["dit", "mgd3"])
def test_class_batch_equals_one_class_at_a_time(name, toy_dataset, tiny_bb, tmp_path):
    """Several classes in one sampling request (DDPM, so each step's noise comes from the classes' own
    generators) give each class what it gets alone, up to the rounding of a larger batch; every class is
    still committed with its own record."""
    from safetensors.torch import load_file

    from conftest import TINY_DIT_N, assert_close_f32, method_cache

    m = build_method(name, num_steps=4, seed=5)
    cache = method_cache(toy_dataset, tiny_bb, tmp_path, m) if m.needs_cache else None
    one = distill(m, toy_dataset, 2, tmp_path / "one", backbone=tiny_bb, cache=cache, progress=False)
    three = distill(m, toy_dataset, 2, tmp_path / "three", backbone=tiny_bb, cache=cache, progress=False,
                    class_batch=3)  # one group of 3 classes, then one of 1
    assert one["complete"] and three["complete"]
    assert set(one["classes_done"]) == set(three["classes_done"]) == {"c0", "c1", "c2", "c3"}
    for c in one["classes_done"]:
        a, b = dict(one["classes_done"][c]), dict(three["classes_done"][c])
        assert a.pop("seconds") >= 0 and b.pop("seconds") >= 0
        assert a == b  # seeds, method facts (modes' dataset indices, guided steps)
        la = load_file(str(tmp_path / "one" / "latents" / f"{c}.safetensors"))
        lb = load_file(str(tmp_path / "three" / "latents" / f"{c}.safetensors"))
        assert la.keys() == lb.keys()
        # 4 denoising steps (each a DiT forward, two with CFG) through which the rounding of a
        # different batch layout can propagate: the per-forward reduction length times the steps.
        assert_close_f32(lb["latents"], la["latents"], n=8 * TINY_DIT_N)
        for k in la.keys() - {"latents"}:
            assert torch_equal(la[k], lb[k])
    with pytest.raises(ConfigError, match="class_batch must be an integer >= 1"):
        distill(m, toy_dataset, 2, tmp_path / "bad", backbone=tiny_bb, cache=cache, progress=False, class_batch=0)
    assert not (tmp_path / "bad").exists()


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_reduced_precision_sampling_is_part_of_the_run_identity(toy_dataset, tmp_path):
    """bf16 autocast of the denoiser changes the samples (within bf16 rounding), so a folder sampled in
    float32 refuses to be resumed in bf16; float32 keeps the identity older manifests recorded."""
    from safetensors.torch import load_file

    from gendd.backbone import tiny_backbone

    bb = tiny_backbone(num_classes=4, image_size=16, channels=1, pad=2, vae_channels=(32, 32))
    h, keys = bb.content_hash(), set(bb.state_dict())
    m = build_method("dit", num_steps=2, seed=1)
    ref = distill(m, toy_dataset, 2, tmp_path / "f32", backbone=bb, progress=False)
    assert "precision" not in ref["backbone"]
    import warnings

    with warnings.catch_warnings():  # torch's own import of dynamo uses a deprecated torch.jit API
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)
        bb.set_execution("bf16", compile=True)  # compiled lazily: the weights, keys and hash are unchanged
    assert bb.content_hash() == h and set(bb.state_dict()) == keys
    bb.set_execution("bf16")
    with pytest.raises(ConfigError, match="different distillation run"):
        distill(m, toy_dataset, 2, tmp_path / "f32", backbone=bb, progress=False)
    low = distill(m, toy_dataset, 2, tmp_path / "bf16", backbone=bb, progress=False)
    assert low["backbone"]["precision"] == "bf16"
    a = load_file(str(tmp_path / "f32" / "latents" / "c0.safetensors"))["latents"]
    b = load_file(str(tmp_path / "bf16" / "latents" / "c0.safetensors"))["latents"]
    assert not torch_equal(a, b)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-8 per operation); through two steps of a small
    # random DiT (latents of scale ~500) the error stays within a few percent of the latents' scale
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16"):
        bb.set_execution("int8")
