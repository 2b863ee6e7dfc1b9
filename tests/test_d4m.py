"""D4M: prototypes, the img2img start-step convention, strength 0 / 1 limits, export, backbones."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import gendd.methods.d4m as d4m_module
from conftest import make_dataset
from gendd.backbone import tiny_backbone
from gendd.backbone.sampling import make_schedule
from gendd.blocks.modes import discover_modes
from gendd.cache import EncodeSpec
from gendd.errors import ConfigError
from gendd.export import distill
from gendd.methods import build_method, seed_for
from gendd.methods.d4m import img2img_start_step
from conftest import method_cache, method_ctx
from test_backbone import AnalyticBackbone


_cache, _ctx = method_cache, method_ctx


def test_start_step_follows_diffusers_img2img():
    # init_timestep = min(int(N * strength), N); t_start = N - init_timestep
    assert img2img_start_step(50, 0.7) == 15  # D4M's scripts: 35 of 50 steps denoised
    assert img2img_start_step(50, 0.75) == 13  # argparse default: int(37.5) = 37
    assert img2img_start_step(50, 0.0) == 50 and img2img_start_step(50, 1.0) == 0
    assert img2img_start_step(4, 0.5) == 2


def test_prototypes_are_d4m_minibatch_kmeans(toy_dataset, tiny_bb, tmp_path):
    m = build_method("d4m", num_steps=4, cfg_scale=2.0, strength=0.0, km_expand=2, seed=4)
    assert m.encode_spec() == EncodeSpec(sample=True, flip=False)
    assert build_method("d4m", encode_sample=False).encode_spec() == EncodeSpec()
    cache = _cache(toy_dataset, tiny_bb, tmp_path, m)
    r = m.distill_class(_ctx(m, toy_dataset, tiny_bb, cache, c=1))
    expect = discover_modes(cache.latents(1), 2, "minibatch-kmeans", seed=4, batch_size=4).modes
    assert torch.equal(r.tensors["prototypes"], expect)
    full = build_method("d4m", num_steps=4, cfg_scale=2.0, strength=0.0, minibatch=False, seed=4)
    r_full = full.distill_class(_ctx(full, toy_dataset, tiny_bb, cache, c=1))
    assert torch.equal(r_full.tensors["prototypes"], discover_modes(cache.latents(1), 2, "kmeans", seed=4).modes)
    assert r.extra["prototypes"] == "minibatch-kmeans" and r_full.extra["prototypes"] == "kmeans"


def test_strength_zero_returns_the_prototypes(toy_dataset, tiny_bb, tmp_path):
    m = build_method("d4m", num_steps=4, cfg_scale=2.0, strength=0.0)
    cache = _cache(toy_dataset, tiny_bb, tmp_path, m)
    distill(m, toy_dataset, 2, tmp_path / "o", backbone=tiny_bb, cache=cache, progress=False)
    saved = load_file(str(tmp_path / "o" / "latents" / "c0.safetensors"))
    assert torch.equal(saved["latents"], saved["prototypes"])
    facts = json.loads((tmp_path / "o" / "manifest.json").read_text())["classes_done"]["c0"]
    assert facts["start_step"] == 4 and facts["denoising_steps"] == 0


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_strength_one_is_dit(toy_dataset, tiny_bb, tmp_path, sampler):
    common = dict(sampler=sampler, num_steps=4, cfg_scale=2.0, seed=2)
    m = build_method("d4m", **common, strength=1.0)
    dit = build_method("dit", **common)
    cache = _cache(toy_dataset, tiny_bb, tmp_path, m)
    a = m.distill_class(_ctx(m, toy_dataset, tiny_bb, cache, c=2, ipc=3)).latents
    b = dit.distill_class(_ctx(dit, toy_dataset, tiny_bb, cache, c=2, ipc=3)).latents
    assert torch.equal(a, b)


def test_img2img_noises_the_prototypes_to_the_start_step(toy_dataset, tiny_bb, tmp_path, monkeypatch):
    calls = []
    real = d4m_module.sample

    def spy(backbone, noise, labels, config, **kw):
        calls.append((noise.clone(), labels.clone(), kw["start_step"]))
        return real(backbone, noise, labels, config, **kw)

    monkeypatch.setattr(d4m_module, "sample", spy)
    m = build_method("d4m", num_steps=10, cfg_scale=2.0, strength=0.7)
    cache = _cache(toy_dataset, tiny_bb, tmp_path, m)
    ctx = _ctx(m, toy_dataset, tiny_bb, cache, c=3)
    r = m.distill_class(ctx)
    x, labels, start = calls[0]
    assert start == 3 and labels.tolist() == [3, 3]
    noise = torch.randn((2, *tiny_bb.latent_shape), generator=torch.Generator().manual_seed(seed_for(0, 3)))
    sched = make_schedule(tiny_bb, "ddim", 10)
    torch.testing.assert_close(x, sched.add_noise(r.tensors["prototypes"], noise, 3), rtol=0, atol=0)
    assert torch.isfinite(r.latents).all() and r.extra["denoising_steps"] == 7


def test_more_strength_moves_further_from_the_prototypes(toy_dataset, tiny_bb, tmp_path):
    """With an exact denoiser for N(mu, s^2 I) data far from the prototypes, img2img keeps more of the
    prototype the later it starts: the distance to the prototypes grows with the strength."""
    bb = AnalyticBackbone(tiny_bb, torch.full(tiny_bb.latent_shape, 2.0), s=0.5)
    cache = _cache(toy_dataset, bb, tmp_path, build_method("d4m"))
    dists = []
    for strength in (0.0, 0.1, 0.3, 0.6, 1.0):
        m = build_method("d4m", num_steps=20, cfg_scale=1.0, strength=strength)
        r = m.distill_class(_ctx(m, toy_dataset, bb, cache))
        dists.append(float((r.latents - r.tensors["prototypes"]).norm()))
    assert dists[0] == 0.0 and dists == sorted(dists) and dists[1] < dists[-1] / 4


def test_config_errors():
    with pytest.raises(ConfigError, match=r"strength must be in \[0, 1\]"):
        build_method("d4m", strength=1.5)
    with pytest.raises(ConfigError, match="km_expand must be >= 1"):
        build_method("d4m", km_expand=0)


def test_dit_xl2_family_backbone(tmp_path):
    bb = tiny_backbone(num_classes=1000, image_size=32, channels=3, vae_channels=(32, 32, 32, 32),
                       learned_sigma=True)
    ds = make_dataset(num_classes=2, per_class=3, size=32, channels=3)
    ds.model_labels = [207, 360]
    for sampler in ("ddim", "ddpm"):
        m = build_method("d4m", sampler=sampler, num_steps=4, cfg_scale=4.0, cfg_channels=3, strength=0.5)
        cache = _cache(ds, bb, tmp_path, m)
        manifest = distill(m, ds, 2, tmp_path / sampler, backbone=bb, cache=cache, progress=False)
        assert manifest["complete"] and len(list((tmp_path / sampler / "c1").glob("*.png"))) == 2
        saved = load_file(str(tmp_path / sampler / "latents" / "c1.safetensors"))
        assert saved["prototypes"].shape == saved["latents"].shape == (2, 4, 4, 4)
        assert torch.isfinite(saved["latents"]).all()
