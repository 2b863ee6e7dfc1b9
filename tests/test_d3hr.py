"""D3HR: group score against direct NumPy/SciPy formulas, group selection (exhaustive minimum, seed and
chunk-size contract), inversion pairing on an analytic model, export, regeneration from statistics."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_DIT_N, approx_f32, assert_close_f32, make_dataset, method_cache, method_ctx
from scipy.stats import skew as scipy_skew
from test_backbone import AnalyticBackbone

from gendd.backbone import SamplerConfig, ddim_invert, make_schedule, sample, tiny_backbone
from gendd.blocks.group_sampling import group_score, groups_per_chunk, select_group
from gendd.cache import EncodeSpec, LatentCache
from gendd.errors import ConfigError, DataError
from gendd.export import distill, sha256_file
from gendd.methods import ClassContext, build_method, get_method
from gendd.methods.d3hr import D3HRConfig, class_statistics


def _np_score(x, mu, sigma, w, axis):
    """The score written out per the paper/reference, in float64 NumPy."""
    x, mu, sigma = (np.asarray(a, dtype=np.float64) for a in (x, mu, sigma))
    m, n, d = x.shape
    mean = x.mean(1)
    score = np.linalg.norm(mean - mu, axis=1)
    if n < 2:
        return score
    std = x.std(1, ddof=1)
    score += np.linalg.norm(std - sigma, axis=1)
    z = (x - mean[:, None]) / std[:, None]
    if axis == "reference":  # cubed z-scores summed over features, factor of the feature dimension
        sk = (z**3).sum(2) * d / ((d - 1) * (d - 2))
    else:  # per-dimension sample skewness across members
        sk = (z**3).sum(1) * n / ((n - 1) * (n - 2)) if n > 2 else np.zeros((m, d))
    return score + w * np.linalg.norm(sk, axis=1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("axis", ["reference", "per-dim"])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_group_score_matches_numpy(axis, n):
    g = _gen(0)
    x = torch.randn(7, n, 12, generator=g) * 2 + 1
    mu, sigma = torch.randn(12, generator=g), torch.rand(12, generator=g) + 0.5
    got = group_score(x, mu, sigma, 0.3, axis).double().numpy()
    # float32 vs float64: reductions over the n * 12 numbers of a group
    assert_close_f32(got, _np_score(x.numpy(), mu.numpy(), sigma.numpy(), 0.3, axis), n=n * 12)


def test_per_dim_skew_is_scipy_unbiased_skewness():
    g = _gen(1)
    x = torch.randn(3, 6, 10, generator=g).exp()  # skewed
    mu, sigma = x.mean((0, 1)), x.std((0, 1))
    base = group_score(x, mu, sigma, 0.0, "per-dim")
    sk = scipy_skew(x.double().numpy(), axis=1, bias=False)  # (3, 10)
    expect = base.double().numpy() + 2.0 * np.linalg.norm(sk, axis=1)
    # float32 skew term vs scipy's float64 one: reductions over the 6 * 10 numbers of a group
    assert_close_f32(group_score(x, mu, sigma, 2.0, "per-dim").double().numpy(), expect, n=6 * 10)


def test_constant_dimension_contributes_no_skew():
    g = _gen(2)
    mu, sigma = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.2
    sigma[3] = 0.0
    x = mu + sigma * torch.randn(5, 4, 8, generator=g)
    for axis in ("reference", "per-dim"):
        s = group_score(x, mu, sigma, 1.0, axis)
        keep = [i for i in range(8) if i != 3]
        xk = x[..., keep]
        ref = _np_score(xk.numpy(), mu[keep].numpy(), sigma[keep].numpy(), 0.0, axis)
        assert torch.isfinite(s).all()
        sk_only = s - torch.from_numpy(ref).float()
        # the skew term equals the one of the 7 live dimensions (reference: feature factor of d = 8)
        z = (xk - xk.mean(1, keepdim=True)) / xk.std(1, keepdim=True)
        if axis == "reference":
            exp = (z**3).sum(2).mul(8 / (7 * 6)).norm(dim=1)
        else:
            exp = (z**3).sum(1).mul(4 / (3 * 2)).norm(dim=1)
        # s - ref cancels: the float32 rounding is relative to the whole score s (4 * 8 numbers a group)
        assert_close_f32(sk_only, exp, n=4 * 8, scale=float(s.abs().max()))


@pytest.mark.parametrize("axis", ["reference", "per-dim"])
@pytest.mark.parametrize("ipc,d", [(1, 20), (3, 36), (10, 64)])
def test_select_group_is_the_exhaustive_minimum(axis, ipc, d):
    g = _gen(3)
    mu, sigma = torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.1
    m = 257
    best, best_score, stats = select_group(mu, sigma, ipc, m, _gen(11), chunk_size=10, w_skew=0.5, skew_axis=axis)
    cand = mu + sigma * torch.randn(m, ipc, d, generator=_gen(11))  # the documented candidates
    scores = group_score(cand, mu, sigma, 0.5, axis)
    i = int(scores.argmin())
    assert torch.equal(best, cand[i])  # the same RNG draws, bit for bit (16-number blocks)
    # scores of chunks of 10 groups vs of all 257 at once: float32 reductions over a group's ipc * d numbers
    assert best_score == approx_f32(float(scores[i]), n=ipc * d)
    assert stats["num_candidates"] == m
    assert stats["worst_score"] == approx_f32(float(scores.max()), n=ipc * d)
    assert stats["mean_score"] == approx_f32(float(scores.double().mean()), n=ipc * d + m)
    assert stats["groups_per_chunk"] <= 12 and stats["seconds"] >= 0


def test_same_seed_same_group_whatever_the_chunk_size():
    # ipc * d = 108 is not a multiple of 16: chunks are rounded to multiples of 4 groups
    mu, sigma = torch.randn(36, generator=_gen(4)), torch.rand(36, generator=_gen(5)) + 0.1
    ref, ref_score, _ = select_group(mu, sigma, 3, 103, _gen(7))
    for cs in (1, 3, 5, 8, 64, 10_000):
        best, score, _ = select_group(mu, sigma, 3, 103, _gen(7), chunk_size=cs)
        # the candidates are the same draws bit for bit; their scores are reduced in chunks of other
        # shapes, so they agree to float32 rounding over a group's 3 * 36 numbers
        assert torch.equal(best, ref) and score == approx_f32(ref_score, n=3 * 36)
    best, _, st = select_group(mu, sigma, 3, 103, _gen(7), max_bytes=1)  # smallest chunks
    assert torch.equal(best, ref) and st["groups_per_chunk"] == 4
    assert not torch.equal(select_group(mu, sigma, 3, 103, _gen(8))[0], ref)
    # a last chunk under 16 numbers joins the previous one (torch draws < 16 numbers differently)
    mu4, s4 = torch.zeros(4), torch.ones(4)
    one = select_group(mu4, s4, 1, 10, _gen(9), chunk_size=10)[0]
    assert torch.equal(select_group(mu4, s4, 1, 10, _gen(9), chunk_size=4)[0], one)


def test_chunk_memory_bound():
    for ipc, d, mb in [(10, 256, 8 << 20), (50, 4096, 64 << 20), (3, 36, 5000), (20, 4096, 1)]:
        per = groups_per_chunk(ipc, d, mb)
        assert per >= 1 and (per * ipc * d) % 16 == 0
        assert per * 12 * ipc * d <= max(mb, 12 * ipc * d) + 12 * 16
    assert groups_per_chunk(10, 256, 8 << 20, chunk_size=5) == 5


def test_select_group_rejects_bad_input():
    with pytest.raises(ConfigError, match="skew_axis"):
        select_group(torch.zeros(4), torch.ones(4), 2, 5, _gen(0), skew_axis="kurtosis")
    with pytest.raises(ConfigError, match="num_candidates"):
        select_group(torch.zeros(4), torch.ones(4), 2, 0, _gen(0))
    from gendd.errors import NumericalError
    with pytest.raises(NumericalError, match="sigma"):
        select_group(torch.zeros(4), torch.full((4,), float("nan")), 2, 5, _gen(0))


class _Cache:
    def __init__(self, z):
        self.z = z

    def latents(self, c):
        return self.z


def _ctx(bb, z, ipc, seed=0, label=0, model_label=0):
    return ClassContext(label=label, name="c", model_label=model_label, ipc=ipc, dataset=None,
                        generator=_gen(seed), backbone=bb, cache=_Cache(z))


def test_zero_inversion_steps_samples_the_group_from_raw_statistics(tiny_bb):
    z0 = torch.randn(9, *tiny_bb.latent_shape, generator=_gen(1))
    y = torch.zeros(9, dtype=torch.long)
    assert torch.equal(ddim_invert(tiny_bb, z0, y, 0, SamplerConfig("ddim", 5)), z0)
    m = build_method("d3hr", num_steps=5, inversion_steps=0, num_candidates=40, cfg_scale=2.0)
    assert m.config.start_step == 5
    res = m.distill_class(_ctx(tiny_bb, z0, 3, seed=4))
    mean, var = class_statistics(z0)
    # float64 sums (class_statistics) vs float32 ones over the 9 latents
    assert_close_f32(res.tensors["mean"], z0.mean(0), n=9, scale=float(z0.abs().max()))
    assert_close_f32(res.tensors["variance"], z0.var(0), n=9, scale=float(z0.abs().max()) ** 2)
    best, _, _ = select_group(mean, var.sqrt(), 3, 40, _gen(4))
    assert torch.equal(res.latents, best.view(3, *tiny_bb.latent_shape))  # no denoising step left
    assert torch.equal(res.tensors["group"], res.latents)
    assert res.extra["group_score"]["num_candidates"] == 40 and res.extra["start_step"] == 5


def test_gaussian_data_statistics_and_step_pairing(tiny_bb):
    """Data N(mu, s^2 I) under the exact eps: the inverted class is roughly N(sqrt(abar) mu,
    abar s^2 + 1 - abar) at the level of sampling step N - n, the denoised group is back near
    N(mu, s^2), and resuming at N - n reconstructs better than the reference's N - n - 1."""
    mu = torch.randn(tiny_bb.latent_shape, generator=_gen(3)) * 0.5
    bb = AnalyticBackbone(tiny_bb, mu, s=0.6)
    z0 = mu + 0.6 * torch.randn(300, *bb.latent_shape, generator=_gen(4))
    m = build_method("d3hr", num_steps=20, inversion_steps=6, num_candidates=200, cfg_scale=1.0)
    res = m.distill_class(_ctx(bb, z0, 20, seed=1))
    abar = float(make_schedule(bb, "ddim", 20).abar[m.config.start_step])
    assert (res.tensors["mean"] - math.sqrt(abar) * mu).abs().mean() < 0.06
    assert float(res.tensors["variance"].mean()) == pytest.approx(abar * 0.36 + 1 - abar, rel=0.15)
    assert (res.latents.mean(0) - mu).abs().mean() < 0.2
    assert float(res.latents.std(0).mean()) == pytest.approx(0.6, rel=0.15)
    cfg = m.config.sampler_config(bb)
    y = torch.zeros(300, dtype=torch.long)
    zt = ddim_invert(bb, z0, y, 6, cfg)
    err = [float((sample(bb, zt, y, cfg, start_step=14 - shift) - z0).norm() / z0.norm()) for shift in (0, 1)]
    assert err[0] < 0.06 and err[0] < err[1] / 1.5


def test_group_device_backbone_is_seeded(tiny_bb):
    z0 = torch.randn(6, *tiny_bb.latent_shape, generator=_gen(1))
    m = build_method("d3hr", num_steps=3, inversion_steps=1, num_candidates=20, group_device="backbone")
    a, b = (m.distill_class(_ctx(tiny_bb, z0, 2, seed=4)).latents for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, build_method("d3hr", num_steps=3, inversion_steps=1, num_candidates=20)
                           .distill_class(_ctx(tiny_bb, z0, 2, seed=4)).latents)


def test_config_validation_and_pairing():
    with pytest.raises(ConfigError, match="sampler=ddim"):
        build_method("d3hr", sampler="ddpm")
    with pytest.raises(ConfigError, match="inversion_steps"):
        build_method("d3hr", num_steps=10, inversion_steps=11)
    with pytest.raises(ConfigError, match="skew_axis"):
        build_method("d3hr", skew_axis="x")
    c = D3HRConfig()
    assert (c.num_steps, c.inversion_steps, c.start_step) == (50, 31, 19)
    assert D3HRConfig(start_step_shift=1).start_step == 18  # the reference's 48 - i at i = 30
    assert get_method("d3hr")().encode_spec() == EncodeSpec(sample=True)
    with pytest.raises(DataError, match=">= 2 images"):
        class_statistics(torch.zeros(1, 4, 2, 2))


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*.png"))}


def test_export_end_to_end_and_regenerate_bit_for_bit(tiny_bb, toy_dataset, tmp_path):
    ds = toy_dataset
    m = build_method("d3hr", num_steps=4, inversion_steps=2, num_candidates=64, cfg_scale=2.0, seed=3)
    cache = LatentCache.build(ds, tiny_bb, tmp_path / "cache", spec=m.encode_spec(), progress=False)
    out = tmp_path / "o"
    man = distill(m, ds, 2, out, backbone=tiny_bb, cache=cache, progress=False)
    assert man["complete"] and len(list((out / "c1").glob("*.png"))) == 2
    from safetensors.torch import load_file
    t = load_file(str(out / "latents" / "c1.safetensors"))
    shape = tiny_bb.latent_shape
    assert t["mean"].shape == shape and t["variance"].shape == shape and t["group"].shape == (2, *shape)
    assert t["latents"].shape == (2, *shape) and int(t["label"]) == 1 and int(t["model_label"]) == 1
    # the saved statistics are those of the inverted cached latents
    z0 = cache.latents(1)
    zt = ddim_invert(tiny_bb, z0, torch.full((z0.shape[0],), 1), 2, m.config.inversion_config(tiny_bb))
    # inverted again here (2 DiT steps), then float32 vs float64 sums over the class's latents
    n = 2 * TINY_DIT_N + z0.shape[0]
    assert_close_f32(t["mean"], zt.mean(0), n=n, scale=float(zt.abs().max()))
    assert_close_f32(t["variance"], zt.var(0), n=n, scale=float(zt.abs().max()) ** 2)
    info = json.loads((out / "manifest.json").read_text())["classes_done"]["c1"]
    assert info["group_score"]["num_candidates"] == 64 and info["start_step"] == 2
    # statistics + backbone alone reproduce the export bit for bit (a method exported like any other: manifest,
    # file hashes), and serve another IPC
    opts = {k: v for k, v in dataclasses.asdict(m.config).items()}
    regen = build_method("d3hr-regenerate", **opts, statistics=str(out))
    rman = distill(regen, ds, 2, tmp_path / "r", backbone=tiny_bb, progress=False)
    assert _hashes(tmp_path / "r") == _hashes(out)
    assert rman["complete"] and rman["method"] == "d3hr-regenerate" and set(rman["files"]) >= {"c1/0.png", "c1/1.png"}
    assert rman["classes_done"]["c1"]["seed"] == info["seed"]
    assert rman["classes_done"]["c1"]["statistics_sha256"] == hashlib.sha256(
        (out / "latents" / "c1.safetensors").read_bytes()).hexdigest()
    regen3 = build_method("d3hr-regenerate", **opts, statistics=str(out / "latents"))
    distill(regen3, ds, 3, tmp_path / "r3", backbone=tiny_bb, classes=[0], progress=False)
    assert sorted(p.name for p in (tmp_path / "r3" / "c0").iterdir()) == ["0.png", "1.png", "2.png"]
    assert not (tmp_path / "r3" / "c1").exists()
    renamed = dataclasses.replace(ds, classes=["c0", "zz", "c2", "c3"])
    with pytest.raises(DataError, match="no statistics for class 'zz'"):
        distill(regen, renamed, 2, tmp_path / "x", backbone=tiny_bb, progress=False)
    assert not (tmp_path / "x").exists()


def test_dit_xl_family_backbone(tmp_path):
    bb = tiny_backbone(num_classes=1000, image_size=32, channels=3, vae_channels=(32, 32, 32, 32),
                       learned_sigma=True)
    ds = make_dataset(num_classes=2, per_class=4, size=32, channels=3, seed=1)
    ds.model_labels = [207, 980]
    m = build_method("d3hr", num_steps=3, inversion_steps=2, start_step_shift=1, num_candidates=32,
                     cfg_scale=4.0, cfg_channels=3)
    cache = LatentCache.build(ds, bb, tmp_path / "cache", spec=m.encode_spec(), progress=False)
    man = distill(m, ds, 3, tmp_path / "o", backbone=bb, cache=cache, progress=False)
    assert man["complete"] and man["classes_done"]["c1"]["start_step"] == 0
    from PIL import Image
    img = Image.open(tmp_path / "o" / "c0" / "2.png")
    assert img.size == (32, 32) and img.mode == "RGB"
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "o" / "latents" / "c1.safetensors"))
    assert int(t["model_label"]) == 980 and t["group"].shape == (3, *bb.latent_shape)


def test_class_statistics_are_stored_and_reused(toy_dataset, tiny_bb, tmp_path, monkeypatch):
    """The inversion runs once per class and settings; a second run (other IPC) reads the stored statistics."""
    import gendd.methods.d3hr as d3hr_mod

    m = build_method("d3hr", num_steps=4, inversion_steps=2, num_candidates=8, cfg_scale=1.0)
    cache = method_cache(toy_dataset, tiny_bb, tmp_path, m)
    calls = []
    real = d3hr_mod.ddim_invert
    monkeypatch.setattr(d3hr_mod, "ddim_invert", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = m.distill_class(method_ctx(m, toy_dataset, tiny_bb, cache, c=1, ipc=2))
    again = build_method("d3hr", num_steps=4, inversion_steps=2, num_candidates=8, cfg_scale=1.0)
    second = again.distill_class(method_ctx(again, toy_dataset, tiny_bb, cache, c=1, ipc=3))
    assert len(calls) == 1
    assert torch.equal(first.tensors["mean"], second.tensors["mean"])
    assert torch.equal(first.tensors["variance"], second.tensors["variance"])
    other = build_method("d3hr", num_steps=4, inversion_steps=3, num_candidates=8, cfg_scale=1.0)
    other.distill_class(method_ctx(other, toy_dataset, tiny_bb, cache, c=1, ipc=2))
    assert len(calls) == 2  # other inversion settings: computed anew


def test_max_latents_inverts_a_fixed_subset(toy_dataset, tiny_bb, tmp_path, monkeypatch):
    import gendd.methods.d3hr as d3hr_mod

    sizes = []
    real = d3hr_mod.ddim_invert
    monkeypatch.setattr(d3hr_mod, "ddim_invert", lambda bb, z0, *a, **k: sizes.append(z0.shape[0]) or real(bb, z0, *a, **k))
    kw = dict(num_steps=4, inversion_steps=2, num_candidates=8, cfg_scale=1.0, max_latents=3)
    m = build_method("d3hr", **kw)
    cache = method_cache(toy_dataset, tiny_bb, tmp_path, m)
    a = m.distill_class(method_ctx(m, toy_dataset, tiny_bb, cache, c=0, ipc=2))
    b = build_method("d3hr", **{**kw, "seed": 5})  # another run seed: same subset, stored statistics reused
    b2 = b.distill_class(method_ctx(b, toy_dataset, tiny_bb, cache, c=0, ipc=2))
    assert sizes == [3] and cache.latents(0).shape[0] > 3
    assert torch.equal(a.tensors["mean"], b2.tensors["mean"])
    with pytest.raises(ConfigError, match="max_latents"):
        build_method("d3hr", max_latents=1)


def test_cli_regenerated_set_has_a_manifest_and_evaluates_without_data(tmp_path):
    """`gendd d3hr-regenerate` finds dataset, data root and backbone in the statistics folder's manifest; its
    output is an exported set (manifest, hashes) that `gendd evaluate` reads without --data."""
    import subprocess
    import sys

    from test_bench import make_bench_world

    data, bb = make_bench_world(tmp_path)

    def gendd(*args):
        r = subprocess.run([sys.executable, "-m", "gendd.cli", *map(str, args)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    small = ["--set", "num_steps=4", "--set", "inversion_steps=2", "--set", "num_candidates=8"]
    gendd("distill", "d3hr", "--data", "imagefolder", "--data-root", data, "--backbone", bb, "--ipc", 2,
          "--out", tmp_path / "d", "--cache-dir", tmp_path / "cache", *small, "--quiet")
    gendd("d3hr-regenerate", tmp_path / "d", "--out", tmp_path / "g", "--ipc", 2, *small, "--quiet")
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert m["complete"] and m["method"] == "d3hr-regenerate" and m["dataset"]["name"] == "imagefolder"
    for name, digest in m["files"].items():
        assert sha256_file(tmp_path / "g" / name) == digest
        if name.endswith(".png"):  # the same images as the d3hr run (its latents file also holds statistics)
            assert sha256_file(tmp_path / "d" / name) == digest
    gendd("evaluate", tmp_path / "g", "--profile", "quick", "--epochs", 1, "--repeats", 1, "--quiet")
    assert list((tmp_path / "g").glob("eval-*.json"))
