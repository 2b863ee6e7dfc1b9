"""MGD3: exact reduction to dit, convergence to the modes, the stop-step mapping, export, backbones."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_dataset
from gendd.backbone import tiny_backbone
from gendd.backbone.sampling import SamplerConfig, sample
from gendd.blocks.modes import discover_modes
from gendd.cache import EncodeSpec
from gendd.errors import ConfigError, DataError
from gendd.export import distill
from gendd.methods import build_method
from gendd.methods.mgd3 import MGD3Config, ModeGuidance
from conftest import method_cache, method_ctx
from test_backbone import AnalyticBackbone


_cache, _ctx = method_cache, method_ctx


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_no_guidance_is_bit_identical_to_dit(toy_dataset, tiny_bb, tmp_path, sampler):
    common = dict(sampler=sampler, num_steps=4, cfg_scale=2.0, seed=3)
    dit = build_method("dit", **common)
    cache = _cache(toy_dataset, tiny_bb, tmp_path, build_method("mgd3"))
    ref = dit.distill_class(_ctx(dit, toy_dataset, tiny_bb, cache, c=1, ipc=3)).latents
    for opts in ({"mode_guidance_scale": 0.0}, {"stop_step": 0}):
        m = build_method("mgd3", **common, **opts)
        assert torch.equal(m.distill_class(_ctx(m, toy_dataset, tiny_bb, cache, c=1, ipc=3)).latents, ref)
    guided = build_method("mgd3", **common, mode_guidance_scale=0.5)
    assert not torch.equal(guided.distill_class(_ctx(guided, toy_dataset, tiny_bb, cache, c=1, ipc=3)).latents, ref)


def test_large_guidance_drives_each_sample_to_its_mode(toy_dataset, tiny_bb, tmp_path):
    """On data N(mu, s^2 I) the exact denoiser pulls every sample to mu = 3 (far from the class's
    latents, whose modes lie near 0). Mode guidance adds ``lambda sigma_t (m_i - x0_hat)`` to the
    posterior mean at each step; it is a contraction towards m_i while ``lambda sigma_t < 2`` (about
    lambda < 10 for DDPM-50). With lambda = 10 on all 50 steps the output (= x0_hat of the last step,
    whose sigma is 0) lies within 5% of ||m_i - mu|| of m_i; without guidance it is ~||m_i - mu||
    away. Rows are split over batches (batch_size 2, 3 modes) to check that row i follows mode i."""
    mu = torch.full(tiny_bb.latent_shape, 3.0)
    bb = AnalyticBackbone(tiny_bb, mu, s=0.5)
    cache = _cache(toy_dataset, bb, tmp_path, build_method("mgd3"))

    def run(lam, stop):
        m = build_method("mgd3", num_steps=50, cfg_scale=1.0, mode_guidance_scale=lam, stop_step=stop, batch_size=2)
        r = m.distill_class(_ctx(m, toy_dataset, bb, cache, ipc=3))
        modes = r.tensors["modes"]
        dist = (r.latents - modes).flatten(1).norm(dim=1) / (modes - mu).flatten(1).norm(dim=1)
        return r.latents, modes, dist

    out, modes, d10 = run(10.0, 50)
    assert float(d10.max()) < 0.05
    assert torch.cdist(out.flatten(1), modes.flatten(1)).argmin(1).tolist() == [0, 1, 2]
    d0, d1, d_stop = run(0.0, 50)[2], run(1.0, 50)[2], run(10.0, None)[2]
    assert float(d0.min()) > 0.9
    assert (d0 > d1).all() and (d1 > d10).all()  # closer to the mode as lambda grows
    assert (d_stop > d10).all()  # stopping half-way lets the denoiser pull back towards mu


def test_default_stop_step_maps_the_reference_stop_t(tiny_bb):
    """Reference: respaced t = 49..0, guided while t > stop_t = 25 (24 steps); gendd step i = 49 - t."""
    cfg = MGD3Config(num_steps=50)
    assert cfg.resolved_stop_step() == 24
    assert MGD3Config(num_steps=10).resolved_stop_step() == 4  # stop_t = N // 2 = 5 -> 9 - 5
    assert MGD3Config(num_steps=10, stop_step=99).resolved_stop_step() == 10
    seen = []

    class Recording(ModeGuidance):
        def modify_mean(self, state):
            out = super().modify_mean(state)
            if out is not None:
                seen.append(state.step)
            return out

    bb = AnalyticBackbone(tiny_bb, torch.zeros(tiny_bb.latent_shape), s=0.5)
    z = torch.randn((1, *bb.latent_shape), generator=torch.Generator().manual_seed(0))
    sample(bb, z, torch.tensor([0]), SamplerConfig("ddpm", 50, cfg_scale=1.0),
           hooks=[Recording(torch.zeros_like(z), 0.1, cfg.resolved_stop_step(), "mean")],
           generator=torch.Generator().manual_seed(0))
    assert seen == list(range(24))
    assert [49 - i for i in seen] == list(range(49, 25, -1))  # reference t with t > 25


def test_guidance_forms_differ_and_auto_follows_the_sampler(toy_dataset, tiny_bb, tmp_path):
    cache = _cache(toy_dataset, tiny_bb, tmp_path, build_method("mgd3"))
    outs = {}
    for form in ("mean", "eps", "auto"):
        m = build_method("mgd3", num_steps=4, cfg_scale=2.0, mode_guidance_scale=0.5, guidance_form=form)
        outs[form] = m.distill_class(_ctx(m, toy_dataset, tiny_bb, cache)).latents
    assert not torch.allclose(outs["mean"], outs["eps"])
    assert torch.equal(outs["auto"], outs["mean"])
    assert MGD3Config(sampler="ddim").resolved_form() == "eps"
    with pytest.raises(ConfigError, match="posterior std, which is 0 for DDIM"):
        MGD3Config(sampler="ddim", guidance_form="mean")


def test_export_saves_modes_and_facts(toy_dataset, tiny_bb, tmp_path):
    m = build_method("mgd3", num_steps=3, cfg_scale=2.0, seed=1)
    cache = _cache(toy_dataset, tiny_bb, tmp_path, m)
    manifest = distill(m, toy_dataset, 2, tmp_path / "o", backbone=tiny_bb, cache=cache, progress=False)
    saved = load_file(str(tmp_path / "o" / "latents" / "c2.safetensors"))
    assert saved["latents"].shape == saved["modes"].shape == (2, *tiny_bb.latent_shape)
    assert torch.equal(saved["modes"], discover_modes(cache.latents(2), 2, "kmeans", seed=1).modes)
    facts = json.loads((tmp_path / "o" / "manifest.json").read_text())["classes_done"]["c2"]
    assert facts["mode_method"] == "kmeans" and facts["guidance_form"] == "mean"
    assert facts["stop_step"] == 1 and facts["guided_steps"] == 1  # (3 - 1) // 2
    assert manifest["complete"]
    # real-latent modes record which dataset images they are
    r = build_method("mgd3", num_steps=2, cfg_scale=2.0, mode_method="random")
    res = r.distill_class(_ctx(r, toy_dataset, tiny_bb, cache, c=3, ipc=4))
    idx = res.extra["mode_dataset_indices"]
    assert len(idx) == 4 and all(toy_dataset.labels[i] == 3 for i in idx)


def test_flip_spec_and_mode_pool(toy_dataset, tiny_bb, tmp_path):
    assert build_method("mgd3").encode_spec() == EncodeSpec(sample=False, flip=True)
    assert build_method("mgd3", flip_augment=False).encode_spec() == EncodeSpec()
    assert build_method("mgd3", flip_augment="random").encode_spec() == EncodeSpec(random_flip=True)
    m = build_method("mgd3", num_steps=2, cfg_scale=2.0)
    cache = _cache(toy_dataset, tiny_bb, tmp_path, m)
    assert cache.latents(0).shape[0] == 12  # 6 images + their flips
    assert m.distill_class(_ctx(m, toy_dataset, tiny_bb, cache, ipc=12)).latents.shape[0] == 12
    with pytest.raises(DataError, match="IPC 13 exceeds the 12 cached latents of class 'c0'"):
        m.distill_class(_ctx(m, toy_dataset, tiny_bb, cache, ipc=13))


def test_config_errors():
    with pytest.raises(ConfigError, match="mode_method must be one of 'dbscan', .*'kmeans'.*got 'kmedoids'"):
        build_method("mgd3", mode_method="kmedoids")
    with pytest.raises(ConfigError, match="stop_step must be >= 0"):
        build_method("mgd3", stop_step=-1)
    with pytest.raises(ConfigError, match="guidance_form must be one of 'mean', 'eps', 'auto', got 'x0'"):
        build_method("mgd3", guidance_form="x0")
    with pytest.raises(ConfigError, match="needs the latent cache"):
        distill(build_method("mgd3"), make_dataset(), 1, "/nonexistent", backbone=object(), progress=False)


def test_dit_xl2_family_backbone(tmp_path):
    """Learned sigma, 1000 classes, 3-channel 8x VAE; ImageNet labels (207 golden retriever, 360 otter)."""
    bb = tiny_backbone(num_classes=1000, image_size=32, channels=3, vae_channels=(32, 32, 32, 32),
                       learned_sigma=True)
    ds = make_dataset(num_classes=2, per_class=3, size=32, channels=3)
    ds.model_labels = [207, 360]
    m = build_method("mgd3", num_steps=3, cfg_scale=4.0, cfg_channels=3, stop_step=2)
    cache = _cache(ds, bb, tmp_path, m)
    manifest = distill(m, ds, 2, tmp_path / "o", backbone=bb, cache=cache, progress=False)
    assert manifest["complete"] and len(list((tmp_path / "o" / "c1").glob("*.png"))) == 2
    saved = load_file(str(tmp_path / "o" / "latents" / "c1.safetensors"))
    assert saved["modes"].shape == (2, 4, 4, 4) and torch.isfinite(saved["latents"]).all()
    dit = build_method("dit", num_steps=3, cfg_scale=4.0, cfg_channels=3)
    ref = dit.distill_class(_ctx(dit, ds, bb, cache, c=1)).latents
    assert not torch.equal(saved["latents"], ref)  # learned-sigma mean form moved the samples
