"""gendd's own backbone training (gendd.backbone.train): a tiny run end to end, resume after an
interruption, the config guard, and the forward-noising formula."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import approx_f32, make_dataset
from gendd.backbone import Backbone
from gendd.backbone.train import BackboneTrainConfig, _Stage, q_sample, train_backbone
from gendd.errors import ConfigError


def _tiny_cfg(**kw) -> BackboneTrainConfig:
    base = dict(image_size=16, vae_channels=(32, 32), latent_channels=4, vae_steps=4, vae_batch_size=8,
                dit_hidden=32, dit_layers=1, dit_heads=2, patch_size=2, dit_steps=5, dit_batch_size=8,
                checkpoint_every=2, ema_decay=0.9, seed=3)
    base.update(kw)
    return BackboneTrainConfig(**base)


def _state(path) -> dict[str, torch.Tensor]:
    bb = Backbone.from_pretrained(path)
    return {**{f"vae.{k}": v for k, v in bb.vae.state_dict().items()},
            **{f"dit.{k}": v for k, v in bb.transformer.state_dict().items()}}


def test_q_sample_is_the_ddpm_marginal():
    z0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    abar = torch.tensor([0.9, 0.5, 0.01])
    zt = q_sample(z0, eps, abar)
    for i in range(3):
        want = abar[i].sqrt() * z0[i] + (1 - abar[i]).sqrt() * eps[i]
        assert torch.equal(zt[i], want)  # the same elementwise ops in the same order: exact


def test_tiny_training_writes_a_loadable_backbone(tmp_path):
    ds = make_dataset(size=12)
    bb = train_backbone(ds, tmp_path / "bb", _tiny_cfg(), progress=False)
    loaded = Backbone.from_pretrained(tmp_path / "bb")
    assert loaded.content_hash() == bb.content_hash()
    assert loaded.meta.pad == 2 and loaded.meta.class_names == list(ds.classes)
    # the VAE written before the DiT stage is the final backbone's VAE
    early = Backbone.from_pretrained(tmp_path / "bb", vae=tmp_path / "bb" / "checkpoints" / "vae")
    assert early.content_hash() == bb.content_hash()
    log = [json.loads(line) for line in (tmp_path / "bb" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "vae"][-1] == 4
    assert [r["step"] for r in log if r["stage"] == "dit"][-1] == 5
    # the latent scaling factor makes the training latents unit-variance
    lat = torch.load(tmp_path / "bb" / "checkpoints" / "train_latents.pt")
    # torch's full std accumulates in float64: what is left is the float32 rounding of the std,
    # of 1 / std, of the products and of the final std (n = 4); a biased std would be off by 1 / (2N)
    assert float((lat["z"] * lat["scaling_factor"]).std()) == approx_f32(1.0, n=4)


@pytest.mark.parametrize("stage,at", [("vae", 3), ("dit", 3)])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, stage, at):
    ds = make_dataset(size=12)
    train_backbone(ds, tmp_path / "whole", _tiny_cfg(), progress=False)

    update = _Stage.update

    def crash(self, loss):
        if self.name == stage and self.step == at:
            raise KeyboardInterrupt
        update(self, loss)

    monkeypatch.setattr(_Stage, "update", crash)
    with pytest.raises(KeyboardInterrupt):
        train_backbone(ds, tmp_path / "split", _tiny_cfg(), progress=False)
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / f"{stage}.pt", weights_only=False)
    assert ckpt["step"] == 2  # the last checkpoint before the crash
    done = []

    def count(self, loss):
        done.append(self.name)
        update(self, loss)

    monkeypatch.setattr(_Stage, "update", count)
    train_backbone(ds, tmp_path / "split", _tiny_cfg(), progress=False)
    # only the steps after the checkpoint were trained again
    assert done == (["vae"] * 2 + ["dit"] * 5 if stage == "vae" else ["dit"] * 3)

    a, b = _state(tmp_path / "whole"), _state(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rerun_with_another_config_is_refused(tmp_path):
    ds = make_dataset(size=12)
    train_backbone(ds, tmp_path / "bb", _tiny_cfg(dit_steps=2), progress=False)
    with pytest.raises(ConfigError, match="different config"):
        train_backbone(ds, tmp_path / "bb", _tiny_cfg(dit_steps=3), progress=False)
    with pytest.raises(ConfigError, match="image_size"):
        train_backbone(ds, tmp_path / "odd", _tiny_cfg(image_size=15), progress=False)


def test_cosine_schedule_sets_each_step_lr_and_resumes(tmp_path):
    """lr_t = lr (1 + cos(pi t / T)) / 2 at update t (0-based), read from the step, so a resumed stage
    continues the same schedule."""
    import math

    w = torch.nn.Linear(2, 1)
    stage = _Stage("s", w, 0.1, tmp_path, None, 0, "cosine", 4)
    seen = []
    for _ in range(4):
        stage.update(w(torch.ones(1, 2)).sum())
        seen.append(stage.opt.param_groups[0]["lr"])
    assert seen == [0.1 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    const = _Stage("c", torch.nn.Linear(2, 1), 0.1, tmp_path, None, 0)
    const.update(const.model(torch.ones(1, 2)).sum())
    assert const.opt.param_groups[0]["lr"] == 0.1


def _interrupted_then_resumed(tmp_path, monkeypatch, first, second):
    """Train ``first`` into split/ until the DiT's step 3 (a Ctrl-C), resume with ``second``; return the states of
    an uninterrupted ``first`` run and of the resumed one."""
    ds = make_dataset(size=12)
    train_backbone(ds, tmp_path / "whole", first, progress=False)
    update = _Stage.update

    def crash(self, loss):
        if self.name == "dit" and self.step == 3:
            raise KeyboardInterrupt
        update(self, loss)

    monkeypatch.setattr(_Stage, "update", crash)
    with pytest.raises(KeyboardInterrupt):
        train_backbone(ds, tmp_path / "split", first, progress=False)
    monkeypatch.setattr(_Stage, "update", update)
    train_backbone(ds, tmp_path / "split", second, progress=False)
    return _state(tmp_path / "whole"), _state(tmp_path / "split")


def test_cosine_bf16_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = _tiny_cfg(lr_schedule="cosine", vae_precision="bf16")
    a, b = _interrupted_then_resumed(tmp_path, monkeypatch, cfg, cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same steps in the same order


def test_resume_with_other_threads_and_checkpoint_interval(tmp_path, monkeypatch):
    """num_threads and checkpoint_every say how a run executes: a run resumes under other recorded values
    (here the same actual thread count, N then None = leave as is, so the steps are the same: exact)."""
    a, b = _interrupted_then_resumed(tmp_path, monkeypatch, _tiny_cfg(num_threads=torch.get_num_threads()),
                                     _tiny_cfg(checkpoint_every=1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_continues_a_backbone_and_enters_the_identity(tmp_path):
    """init_from with 0 further steps reproduces the source backbone exactly (weights copied, the same scaling
    factor computed from the same weights and images); another architecture or another source is refused."""
    ds = make_dataset(size=12)
    src = train_backbone(ds, tmp_path / "src", _tiny_cfg(), progress=False)
    cont = _tiny_cfg(vae_steps=0, dit_steps=0, init_from=str(tmp_path / "src"))
    assert train_backbone(ds, tmp_path / "cont", cont, progress=False).content_hash() == src.content_hash()
    record = json.loads((tmp_path / "cont" / "train_config.json").read_text())
    assert record["init_hash"] == src.content_hash()
    more = train_backbone(ds, tmp_path / "more", _tiny_cfg(vae_steps=1, dit_steps=1, init_from=str(tmp_path / "src")),
                          progress=False)
    assert more.content_hash() != src.content_hash()
    with pytest.raises(ConfigError, match="another architecture"):
        train_backbone(ds, tmp_path / "wide", _tiny_cfg(dit_hidden=64, init_from=str(tmp_path / "src")),
                       progress=False)
    with pytest.raises(ConfigError, match="not a backbone folder"):
        train_backbone(ds, tmp_path / "none", _tiny_cfg(init_from=str(tmp_path / "missing")), progress=False)
    # init_dit=False: the source's VAE exactly, under a new DiT of another size
    wide = train_backbone(ds, tmp_path / "wide2", _tiny_cfg(vae_steps=0, dit_hidden=64, init_dit=False,
                                                            init_from=str(tmp_path / "src")), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(wide.vae.state_dict().values(), src.vae.state_dict().values()))
    assert wide.transformer.config.attention_head_dim * wide.transformer.config.num_attention_heads == 64
    train_backbone(ds, tmp_path / "src2", _tiny_cfg(seed=4), progress=False)
    shutil.rmtree(tmp_path / "src")
    shutil.copytree(tmp_path / "src2", tmp_path / "src")  # same path, other weights: not the same run
    with pytest.raises(ConfigError, match="different config"):
        train_backbone(ds, tmp_path / "cont", cont, progress=False)


def test_snapshot_of_a_run_is_its_backbone_at_the_last_dit_checkpoint(tmp_path, monkeypatch):
    """A run interrupted after the DiT's checkpoint at step 2 snapshots to that checkpoint's EMA weights; a
    finished run snapshots to exactly its final backbone; a run without a DiT checkpoint is refused."""
    from gendd.backbone.train import snapshot_backbone

    ds = make_dataset(size=12)
    final = train_backbone(ds, tmp_path / "bb", _tiny_cfg(), progress=False)
    snap = snapshot_backbone(ds, tmp_path / "bb", tmp_path / "snap")
    assert snap.content_hash() == final.content_hash()
    assert Backbone.from_pretrained(tmp_path / "snap").content_hash() == final.content_hash()
    assert json.loads((tmp_path / "snap" / "snapshot.json").read_text())["dit_step"] == 5
    state = torch.load(tmp_path / "bb" / "checkpoints" / "dit.pt", weights_only=False)
    state["step"], state["ema"] = 2, {k: v + 1 for k, v in state["ema"].items()}
    torch.save(state, tmp_path / "bb" / "checkpoints" / "dit.pt")
    mid = snapshot_backbone(ds, tmp_path / "bb", tmp_path / "snap")  # replaces the older snapshot
    assert torch.equal(mid.transformer.state_dict()["proj_out_2.bias"], state["ema"]["proj_out_2.bias"])
    assert json.loads((tmp_path / "snap" / "snapshot.json").read_text())["dit_step"] == 2
    (tmp_path / "bb" / "checkpoints" / "dit.pt").unlink()
    with pytest.raises(ConfigError, match="no DiT checkpoint yet"):
        snapshot_backbone(ds, tmp_path / "bb", tmp_path / "snap2")
    with pytest.raises(ConfigError, match="another dataset"):
        snapshot_backbone(make_dataset(size=12, seed=9), tmp_path / "bb", tmp_path / "snap2")
    assert not (tmp_path / "snap2").exists()
