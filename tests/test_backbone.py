"""Backbone wrapper, sampling loop and DDIM inversion on tiny random-init or analytic models."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DIT_N, assert_close_f32, ddim_roundtrip_error

from gendd.backbone import Backbone, Hook, SamplerConfig, ddim_invert, make_schedule, sample
from gendd.errors import ConfigError


class AnalyticBackbone(Backbone):
    """Exact eps-prediction for data ``x0 ~ N(mu, s^2 I)`` (independent of the label):
    ``eps*(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)``."""

    def __init__(self, base: Backbone, mu: torch.Tensor, s: float) -> None:
        super().__init__(base.vae, base.transformer, base.scheduler_config, base.meta)
        self.mu, self.s = mu, s

    def model_output(self, z, t, y):
        abar = self.alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (z - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)


def _latents(bb, n, seed=0):
    return torch.randn((n, *bb.latent_shape), generator=torch.Generator().manual_seed(seed))


def test_geometry_and_vae_roundtrip_shapes(tiny_bb):
    assert tiny_bb.latent_shape == (4, 8, 8)
    assert tiny_bb.num_classes == 4 and tiny_bb.null_label == 4
    x = torch.rand(3, 1, 12, 12) * 2 - 1  # dataset geometry: 12 + 2 * pad = 16
    z = tiny_bb.encode(x)
    assert z.shape == (3, 4, 8, 8)
    assert tiny_bb.decode(z).shape == (3, 1, 12, 12)


def test_cfg_scale_one_is_conditional_prediction(tiny_bb):
    z, y = _latents(tiny_bb, 3), torch.tensor([0, 1, 3])
    t = torch.tensor([500, 10, 999])
    eps, v = tiny_bb.predict(z, t, y, cfg_scale=1.0)
    assert v is None
    assert torch.equal(eps, tiny_bb.model_output(z, t, y)[:, :4])
    # scale s: eps_u + s (eps_c - eps_u), and the 3-channel quirk keeps channel 3 conditional
    c = tiny_bb.model_output(z, t, y)
    u = tiny_bb.model_output(z, t, torch.full_like(y, 4))
    # predict runs one batch of 6 ([z, z]), c and u batches of 3: float32 rounding of a DiT forward,
    # amplified by the guidance combination (|1 - s| + |s| = 7 times the magnitude of c and u)
    amp = 7 * max(float(c.detach().abs().max()), float(u.detach().abs().max()))
    eps4, _ = tiny_bb.predict(z, t, y, cfg_scale=4.0)
    assert_close_f32(eps4, u + 4 * (c - u), n=TINY_DIT_N, scale=amp)
    eps3, _ = tiny_bb.predict(z, t, y, cfg_scale=4.0, cfg_channels=3)
    assert_close_f32(eps3[:, :3], (u + 4 * (c - u))[:, :3], n=TINY_DIT_N, scale=amp)
    assert_close_f32(eps3[:, 3:], c[:, 3:], n=TINY_DIT_N)  # batch of 6 vs batch of 3


def test_learned_sigma_outputs_split(tiny_bb_sigma):
    z = _latents(tiny_bb_sigma, 2)
    eps, v = tiny_bb_sigma.predict(z, torch.tensor([3, 4]), torch.tensor([0, 1]), cfg_scale=2.0)
    assert eps.shape == (2, 4, 8, 8) and v.shape == (2, 4, 8, 8)
    out = sample(tiny_bb_sigma, z, torch.tensor([0, 1]), SamplerConfig("ddpm", 4, cfg_scale=2.0),
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_dit_respacing_matches_reference_rule(tiny_bb):
    s = make_schedule(tiny_bb, "ddpm", 50)
    ts = s.timesteps.tolist()
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts[1] == 979  # round(48 * 999/49) = 979
    assert float(s.abar_prev[-1]) == 1.0
    d = make_schedule(tiny_bb, "ddim", 50)
    assert d.timesteps.tolist()[:2] == [980, 960] and d.timesteps.tolist()[-1] == 0


def test_ddim_step_matches_diffusers_scheduler(tiny_bb):
    sched = tiny_bb.make_scheduler("ddim")
    sched.set_timesteps(10)
    z, y = _latents(tiny_bb, 2), torch.tensor([1, 2])
    ref = z.clone()
    for t in sched.timesteps:
        eps, _ = tiny_bb.predict(ref, t.expand(2), y, cfg_scale=1.0)
        ref = sched.step(eps, t, ref).prev_sample
    ours = sample(tiny_bb, z, y, SamplerConfig("ddim", 10, cfg_scale=1.0))
    # two implementations of the update: rounding differences re-enter the DiT at each of the 10 steps
    assert_close_f32(ours, ref, n=10 * TINY_DIT_N)


def test_same_seed_bit_identical_and_batch_size_invariant(tiny_bb):
    z, y = _latents(tiny_bb, 5), torch.tensor([0, 1, 2, 3, 0])
    cfg = SamplerConfig("ddpm", 6, cfg_scale=3.0, batch_size=5)
    a = sample(tiny_bb, z, y, cfg, generator=torch.Generator().manual_seed(7))
    b = sample(tiny_bb, z, y, cfg, generator=torch.Generator().manual_seed(7))
    c = sample(tiny_bb, z, y, SamplerConfig("ddpm", 6, cfg_scale=3.0, batch_size=2),
               generator=torch.Generator().manual_seed(7))
    d = sample(tiny_bb, z, y, cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    # batch size changes only the float32 summation order (BLAS blocking), at each of the 6 steps
    assert_close_f32(a, c, n=6 * TINY_DIT_N)
    assert not torch.equal(a, d)


def test_noop_hook_is_bit_identical(tiny_bb):
    class Zero(Hook):
        def modify_eps(self, state):
            return state.eps - 0.0 * state.x0_hat

        def modify_mean(self, state):
            return state.mean + 0.0 * state.sigma * state.x0_hat

    z, y = _latents(tiny_bb, 3), torch.tensor([0, 1, 2])
    for kind in ("ddpm", "ddim"):
        cfg = SamplerConfig(kind, 5, cfg_scale=2.0)
        a = sample(tiny_bb, z, y, cfg, generator=torch.Generator().manual_seed(1))
        b = sample(tiny_bb, z, y, cfg, hooks=[Zero()], generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)


def test_hook_sees_state_and_can_steer(tiny_bb):
    target = torch.full((1, *tiny_bb.latent_shape), 0.5)
    seen, sizes = [], [0.5]

    class Pull(Hook):
        def modify_mean(self, state):
            seen.append((state.step, state.t, state.mean.shape))
            sizes.append(float(state.mean.abs().max()))
            return state.mean + (target - state.mean)  # force the mean onto the target

    z = _latents(tiny_bb, 1)
    out = sample(tiny_bb, z, torch.tensor([0]), SamplerConfig("ddpm", 4, cfg_scale=1.0), hooks=[Pull()],
                 start_step=1, generator=torch.Generator().manual_seed(0))
    assert [s[0] for s in seen] == [1, 2, 3]
    # last step adds no noise; m + (target - m) rounds twice, relative to the size of m
    assert_close_f32(out, target, n=2, scale=max(sizes))


def test_ddim_inversion_then_sampling_reconstructs(tiny_bb, record_property):
    """Invert with DDIM, sample back: the error is the O(1/N) of the eps(x_{t_{i+1}}, t_i) approximation."""
    mu = torch.randn(tiny_bb.latent_shape, generator=torch.Generator().manual_seed(3)) * 0.5
    bb = AnalyticBackbone(tiny_bb, mu, s=0.8)
    z0 = mu + 0.8 * _latents(bb, 6, seed=4)
    y = torch.zeros(6, dtype=torch.long)
    errors = {}
    for steps in (10, 50):
        cfg = SamplerConfig("ddim", steps, cfg_scale=1.0)
        errors[steps] = ddim_roundtrip_error(bb, z0, y, steps)
        record_property(f"relative_error_ddim{steps}", errors[steps])
        print(f"DDIM-{steps} inversion -> sampling relative error: {errors[steps]:.3e}")
        # partial inversion pairs with start_step = N - n and is more accurate than the full one
        zk = ddim_invert(bb, z0, y, steps // 2, cfg)
        rec2 = sample(bb, zk, y, cfg, start_step=steps - steps // 2)
        assert float((rec2 - z0).norm() / z0.norm()) < errors[steps]
    assert errors[50] < 0.05
    assert errors[50] < errors[10] / 3  # first-order convergence in the number of steps


def test_inversion_zero_steps_is_identity(tiny_bb):
    z = _latents(tiny_bb, 2)
    assert torch.equal(ddim_invert(tiny_bb, z, torch.tensor([0, 1]), 0, SamplerConfig("ddim", 10)), z)


def test_save_load_roundtrip(tiny_bb_sigma, tmp_path):
    tiny_bb_sigma.meta.class_names = ["a", "b", "c", "d"]
    tiny_bb_sigma.save_pretrained(tmp_path / "bb")
    assert (tmp_path / "bb" / "model_index.json").exists()
    bb2 = Backbone.from_pretrained(tmp_path / "bb")
    assert bb2.content_hash() == tiny_bb_sigma.content_hash()
    assert bb2.meta == tiny_bb_sigma.meta and bb2.learned_sigma
    z = _latents(bb2, 2)
    cfg = SamplerConfig("ddpm", 3, cfg_scale=2.0)
    a = sample(tiny_bb_sigma, z, torch.tensor([0, 1]), cfg, generator=torch.Generator().manual_seed(0))
    b = sample(bb2, z, torch.tensor([0, 1]), cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # a separate VAE folder overrides the pipeline's vae/ (as with stabilityai/sd-vae-ft-ema)
    tiny_bb_sigma.vae.save_pretrained(tmp_path / "vae-only")
    bb3 = Backbone.from_pretrained(tmp_path / "bb", vae=tmp_path / "vae-only")
    assert bb3.content_hash() == tiny_bb_sigma.content_hash()


def test_diffusers_pipeline_reads_our_folder(tiny_bb_sigma, tmp_path):
    from diffusers import DiTPipeline

    tiny_bb_sigma.save_pretrained(tmp_path / "bb")
    pipe = DiTPipeline.from_pretrained(tmp_path / "bb")
    assert pipe.transformer.config.num_embeds_ada_norm == 4


def test_bad_backbone_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Backbone.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="transformer"):
        Backbone.from_pretrained(tmp_path / "empty")


def test_bad_sampler_options(tiny_bb):
    with pytest.raises(ConfigError):
        SamplerConfig(sampler="euler")
    with pytest.raises(ConfigError):
        sample(tiny_bb, _latents(tiny_bb, 2), torch.tensor([0]), SamplerConfig("ddim", 3))


@pytest.mark.parametrize("method,want_release", [("dit", 3), ("mgd3", 3), ("minimax", 3), ("memory", 3),
                                                 ("d3hr", None), ("d4m", None)])
def test_cfg_channels_auto_follows_each_reference_on_dit_releases(tiny_bb, tiny_bb_sigma, method, want_release):
    """DiT-XL/2's forward_with_cfg guides three channels: "auto" reproduces that for the methods whose
    reference samples with it; gendd's own backbones (no learned sigma) guide every channel."""
    from gendd.methods import build_method

    cfg = build_method(method).config
    assert cfg.cfg_channels == "auto"
    assert cfg.resolved_cfg_channels(tiny_bb_sigma) == want_release
    assert cfg.resolved_cfg_channels(tiny_bb) is None
    assert build_method(method, cfg_channels=2).config.resolved_cfg_channels(tiny_bb_sigma) == 2
    assert build_method(method, cfg_channels=None).config.resolved_cfg_channels(tiny_bb_sigma) is None


def test_cfg_channels_refuses_other_words():
    from gendd.errors import ConfigError
    from gendd.methods import build_method

    with pytest.raises(ConfigError, match="auto"):
        build_method("dit", cfg_channels="three")
    with pytest.raises(ConfigError, match=">= 1"):
        build_method("dit", cfg_channels=0)


def test_cfg_interval_guides_only_the_noise_levels_inside(tiny_bb, monkeypatch):
    """Guidance in a limited interval (Kynkäänniemi et al. 2024): (0, inf) covers every step, so it is plain
    CFG bit for bit; an interval above every level is conditional sampling bit for bit; in between, exactly
    the steps with sigma = sqrt((1 - abar) / abar) in (lo, hi] are guided, in sampling and in DDIM inversion."""
    import math

    z, y = _latents(tiny_bb, 3), torch.tensor([0, 1, 3])
    plain = sample(tiny_bb, z, y, SamplerConfig("ddpm", 6, 3.0), generator=torch.Generator().manual_seed(1))
    every = sample(tiny_bb, z, y, SamplerConfig("ddpm", 6, 3.0, cfg_interval=(0.0, math.inf)),
                   generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, every)
    none = sample(tiny_bb, z, y, SamplerConfig("ddpm", 6, 3.0, cfg_interval=(1e6, 1e7)),
                  generator=torch.Generator().manual_seed(1))
    cond = sample(tiny_bb, z, y, SamplerConfig("ddpm", 6, 1.0), generator=torch.Generator().manual_seed(1))
    assert torch.equal(none, cond) and not torch.equal(none, plain)

    seen = []
    predict = tiny_bb.predict

    def spy(x, t, labels, cfg_scale=1.0, cfg_channels=None):
        seen.append((int(t[0]), cfg_scale))
        return predict(x, t, labels, cfg_scale, cfg_channels)

    monkeypatch.setattr(tiny_bb, "predict", spy)
    for kind in ("ddpm", "ddim"):
        cfg = SamplerConfig(kind, 8, 3.0, cfg_interval=(0.5, 5.0))
        sched = make_schedule(tiny_bb, kind, 8)
        sigma = {int(t): math.sqrt((1 - float(a)) / float(a)) for t, a in zip(sched.timesteps, sched.abar)}
        want = {t: 3.0 if 0.5 < s <= 5.0 else 1.0 for t, s in sigma.items()}
        assert set(want.values()) == {1.0, 3.0}  # the interval splits this chain
        seen.clear()
        sample(tiny_bb, z, y, cfg, generator=torch.Generator().manual_seed(1))
        assert dict(seen) == want and len(seen) == len(want)
    seen.clear()
    ddim_invert(tiny_bb, z, y, 8, SamplerConfig("ddim", 8, 3.0, cfg_interval=(0.5, 5.0)))
    assert dict(seen) == want and len(seen) == len(want)


def test_cfg_interval_auto_is_the_backbones_default(tiny_bb, monkeypatch):
    import dataclasses

    from gendd.methods import build_method

    cfg = build_method("dit", cfg_scale=2.0).config
    assert cfg.cfg_interval == "auto" and cfg.sampler_config(tiny_bb).cfg_interval is None
    monkeypatch.setattr(tiny_bb, "meta", dataclasses.replace(tiny_bb.meta, default_cfg_interval=[0, 2]))
    assert cfg.sampler_config(tiny_bb).cfg_interval == (0.0, 2.0)
    assert cfg.resolved(tiny_bb)["cfg_interval"] == [0.0, 2.0]
    assert build_method("dit", cfg_interval=None).config.sampler_config(tiny_bb).cfg_interval is None
    assert build_method("dit", cfg_interval=[1, 3]).config.sampler_config(tiny_bb).cfg_interval == (1.0, 3.0)
    for bad in ([2, 1], [1], "sometimes", [-1, 2]):
        with pytest.raises(ConfigError, match="cfg_interval"):
            build_method("dit", cfg_interval=bad)
