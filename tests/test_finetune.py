"""Fine-tuning loop (Minimax / self-adaptive memory): trainable set, reductions, resume, saved folders,
and the ``minimax`` / ``memory`` / ``memory+mgd3`` methods on tiny backbones."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_DIT_N, assert_close_f32, make_dataset, method_cache, method_ctx

from gendd.backbone import Backbone, tiny_backbone
from gendd.backbone import train as train_mod
from gendd.backbone.finetune import (FinetuneConfig, accumulate_memory_terms, add_difffit_scales, export_transformer,
                                     finetune, load_finetuned, load_finetuned_backbone, trainable_transformer)
from gendd.errors import ConfigError
from gendd.export import distill
from gendd.methods import build_method

SMALL = {"batch_size": 4, "memory_size": 3, "checkpoint_every": 2}


def _latents(num_classes=4, per_class=6, shape=(4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {c: torch.randn(per_class, *shape, generator=g) for c in range(num_classes)}


def _run(bb, lat, out, **cfg):
    losses = []
    finetune(bb, lat, out, FinetuneConfig(**cfg), progress=False, on_step=losses.append)
    return losses, torch.load(out / "checkpoints" / "chunk_000.pt", weights_only=False)


def _predict(transformer, seed=0, num_classes=4, shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, *shape, generator=g)
    with torch.no_grad():
        return transformer(z, timestep=torch.tensor([5, 500, 990]),
                           class_labels=torch.tensor([0, num_classes - 1, num_classes])).sample


# ------------------------------------------------------------------------------------ trainable set
def test_parameter_efficient_step_changes_only_the_difffit_set(tiny_bb, tmp_path):
    cfg = FinetuneConfig(steps=1, **SMALL)
    start = trainable_transformer(tiny_bb, cfg)
    trainable = {n for n, p in start.named_parameters() if p.requires_grad}
    # biases, label tables and the scale factors of the first half of the blocks (1 of 2); no weights
    assert all(n.endswith((".bias", "class_embedder.embedding_table.weight")) or "difffit_gamma" in n
               for n in trainable)
    gammas = sorted(n for n in trainable if "difffit_gamma" in n)
    assert len(gammas) == 6 and all(n.startswith("transformer_blocks.0.") for n in gammas)
    assert not any(n.endswith(("timestep_embedder.linear_1.weight", "norm1.linear.weight"))
                   for n in trainable)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    _, ckpt = _run(tiny_bb, _latents(), tmp_path / "pe", steps=1, **{k: v for k, v in SMALL.items()})
    after = ckpt["model"]
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every DiffFit parameter moves, nothing else does

    _, full = _run(tiny_bb, _latents(), tmp_path / "full", steps=1, parameter_efficient=False, **SMALL)
    base = tiny_bb.transformer.state_dict()
    assert set(full["model"]) == set(base)  # no scale factors in full fine-tuning
    moved = {k for k in base if not torch.equal(base[k], full["model"][k])}
    assert any(k.endswith("to_q.weight") for k in moved) and len(moved) > len(trainable)


# ------------------------------------------------------------------------------------ reductions
def test_zero_lambdas_reduce_to_plain_finetuning(tiny_bb, tmp_path):
    lat = _latents()
    plain, p_ckpt = _run(tiny_bb, lat, tmp_path / "plain", steps=5, use_memory=False, **SMALL)
    zero, z_ckpt = _run(tiny_bb, lat, tmp_path / "zero", steps=5, lambda_real=0.0, lambda_gen=0.0, **SMALL)
    assert [r["loss"] for r in zero] == [r["loss"] for r in plain]
    assert zero[-1]["representativeness"] is not None  # the memory path did run
    for k in ("model", "ema"):
        assert all(torch.equal(z_ckpt[k][n], p_ckpt[k][n]) for n in p_ckpt[k])
    on, _ = _run(tiny_bb, lat, tmp_path / "on", steps=5, lambda_real=1.0, lambda_gen=1.0, **SMALL)
    assert [r["loss"] for r in on][1:] != [r["loss"] for r in plain][1:]


def test_accumulation_modes_on_constructed_terms():
    t1, t2, t3 = torch.tensor(0.5), torch.tensor(0.25), torch.tensor(2.0)
    assert accumulate_memory_terms([t1], "paper") == accumulate_memory_terms([t1], "reference") == 0.5
    assert accumulate_memory_terms([None, t1, t2], "paper") == 0.75
    assert accumulate_memory_terms([None, t1, t2], "reference") == 0.5 + 0.75  # 0 + T1 + (T1 + T2)
    assert accumulate_memory_terms([t1, None, t2, t3], "reference") == 0.5 + 0.5 + 0.75 + 2.75
    assert accumulate_memory_terms([None, None], "reference") == 0.0


def test_reference_and_paper_accumulation_differ_only_with_several_classes(tiny_bb, tmp_path):
    one = {0: _latents(1, 12)[0]}
    common = dict(steps=4, lambda_real=0.5, lambda_gen=0.5, **SMALL)
    a, a_ck = _run(tiny_bb, one, tmp_path / "one-paper", **common)
    b, b_ck = _run(tiny_bb, one, tmp_path / "one-ref", loss_accumulation="reference", **common)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert all(torch.equal(a_ck["model"][k], b_ck["model"][k]) for k in a_ck["model"])
    two = _latents(2, 6)
    c, _ = _run(tiny_bb, two, tmp_path / "two-paper", **common)
    d, _ = _run(tiny_bb, two, tmp_path / "two-ref", loss_accumulation="reference", **common)
    assert c[0]["loss"] == d[0]["loss"]  # empty memories at the first step
    assert c[1]["diffusion"] == d[1]["diffusion"] and c[1]["loss"] != d[1]["loss"]
    assert d[1]["loss"] > c[1]["loss"]  # the first class's term counted twice


# ------------------------------------------------------------------------------------ resume, saving
def test_interrupted_finetune_resumes_to_identical_weights(tiny_bb, tmp_path, monkeypatch):
    lat = _latents()
    cfg = dict(steps=4, eviction="max-similarity", lambda_real=0.5, lambda_gen=0.5, **SMALL)
    straight, ref = _run(tiny_bb, lat, tmp_path / "a", **cfg)

    update = train_mod._Stage.update

    def crash_at_step_3(self, loss):
        if self.step == 3:  # steps 1-3 done, checkpoint at step 2
            raise KeyboardInterrupt
        update(self, loss)

    monkeypatch.setattr(train_mod._Stage, "update", crash_at_step_3)
    first = []
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_bb, lat, tmp_path / "b", FinetuneConfig(**cfg), progress=False, on_step=first.append)
    assert not (tmp_path / "b" / "transformer").exists()
    monkeypatch.setattr(train_mod._Stage, "update", update)
    resumed, got = _run(tiny_bb, lat, tmp_path / "b", **cfg)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in first[:2] + resumed] == [r["loss"] for r in straight]
    for k in ("model", "ema"):
        assert all(torch.equal(got[k][n], ref[k][n]) for n in ref[k])
    for kind in ("real", "gen"):
        assert all(torch.equal(got["extra"][kind][c], ref["extra"][kind][c]) for c in range(4))
    a = Backbone.from_pretrained(tmp_path / "a").transformer.state_dict()
    b = Backbone.from_pretrained(tmp_path / "b").transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished run is not repeated; a different config in the same folder is refused
    again, _ = _run(tiny_bb, lat, tmp_path / "b", **cfg)
    assert again == []
    with pytest.raises(ConfigError, match="different config"):
        finetune(tiny_bb, lat, tmp_path / "b", FinetuneConfig(**{**cfg, "steps": 5}), progress=False)


def test_scale_factors_fold_into_the_saved_diffusers_folder(tiny_bb, tmp_path):
    model = trainable_transformer(tiny_bb, FinetuneConfig()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "difffit_gamma" in n or n.endswith(".bias"):
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
    expected = _predict(model)
    plain = export_transformer(model)
    assert set(plain.state_dict()) == set(tiny_bb.transformer.state_dict())
    # folded weights (gamma * W) vs scale hooks (gamma * (W x)): float32 rounding of a DiT forward
    assert_close_f32(_predict(plain), expected, n=TINY_DIT_N)
    Backbone(tiny_bb.vae, plain, tiny_bb.scheduler_config, tiny_bb.meta).save_pretrained(tmp_path / "bb")
    loaded = Backbone.from_pretrained(tmp_path / "bb")
    assert_close_f32(_predict(loaded.transformer), expected, n=TINY_DIT_N)
    with pytest.raises(ConfigError, match="already carries"):
        add_difffit_scales(model)


def test_finetuned_folder_reloads_with_the_in_memory_predictions(tiny_bb, tmp_path):
    """No EMA and a large step size, so the scale factors move far from 1; the checkpoint's model
    (with hooks) and the saved diffusers folder predict the same."""
    cfg = FinetuneConfig(steps=3, ema_decay=0.0, lr=0.05, **SMALL)
    res = finetune(tiny_bb, _latents(), tmp_path / "ft", cfg, progress=False)
    assert [c.path for c in res.chunks] == [tmp_path / "ft"]
    state = torch.load(tmp_path / "ft" / "checkpoints" / "chunk_000.pt", weights_only=False)
    assert state["ema"] is None
    model = trainable_transformer(tiny_bb, cfg).eval()
    model.load_state_dict(state["model"])
    gam = [p for n, p in model.named_parameters() if "difffit_gamma" in n]
    assert max(float((p.detach() - 1).abs().max()) for p in gam) > 0.05
    expected = _predict(model)
    loaded = Backbone.from_pretrained(tmp_path / "ft")
    # folded weights vs scale hooks: float32 rounding of a DiT forward
    assert_close_f32(_predict(loaded.transformer), expected, n=TINY_DIT_N)
    assert loaded.meta.pad == tiny_bb.meta.pad and "gendd finetune" in loaded.meta.source
    via = load_finetuned_backbone(tiny_bb, load_finetuned(tmp_path / "ft").chunks[0].path)
    assert via.vae is tiny_bb.vae
    assert_close_f32(_predict(via.transformer), expected, n=TINY_DIT_N)


def test_class_chunks_give_one_model_per_chunk(tiny_bb, tmp_path):
    res = finetune(tiny_bb, _latents(), tmp_path / "ft", FinetuneConfig(steps=2, class_chunk=3, **SMALL),
                   model_labels=[3, 2, 1, 0], class_names=["a", "b", "c", "d"], progress=False)
    assert [(c.path.name, c.labels, c.model_labels) for c in res.chunks] == \
        [("chunk_000", [0, 1, 2], [3, 2, 1]), ("chunk_001", [3], [0])]
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["complete"]
    assert load_finetuned(tmp_path / "ft").chunk_for("d").path == tmp_path / "ft" / "chunk_001"
    for c in res.chunks:
        Backbone.from_pretrained(c.path)
    with pytest.raises(ConfigError, match="outside the backbone"):
        finetune(tiny_bb, _latents(), tmp_path / "bad", FinetuneConfig(steps=1), model_labels=[0, 1, 2, 4],
                 progress=False)


# ------------------------------------------------------------------------------------ methods
def test_methods_finetune_once_and_sample_like_dit(toy_dataset, tiny_bb, tmp_path):
    kw = {"cache_dir": tmp_path / "cache", "work_dir": tmp_path / "work", "progress": False}
    ft = {"steps": 2, "batch_size": 4}
    mem = build_method("memory", num_steps=3, cfg_scale=2.0, seed=1, finetune=ft)
    assert mem.config.finetune.eviction == "max-similarity"
    assert build_method("minimax", finetune=ft).config.finetune.eviction == "fifo"
    bb = mem.prepare(toy_dataset, tiny_bb, **kw)
    assert bb.content_hash() != tiny_bb.content_hash() and bb.vae is tiny_bb.vae
    (folder,) = list((tmp_path / "work").iterdir())
    man = distill(mem, toy_dataset, 2, tmp_path / "out", backbone=bb, progress=False)
    assert man["complete"] and man["classes_done"]["c1"]["finetuned_backbone"] == str(folder)
    # sampling is dit's, on the fine-tuned backbone: same latents as dit with the same seed
    dit = build_method("dit", num_steps=3, cfg_scale=2.0, seed=1)
    ref = dit.distill_class(method_ctx(dit, toy_dataset, bb, None, c=1, ipc=2)).latents
    got = mem.distill_class(method_ctx(mem, toy_dataset, bb, None, c=1, ipc=2)).latents
    assert torch.equal(got, ref)
    # memory+mgd3 shares the memory fine-tune (same options -> same folder, not re-run); no guidance = memory
    ckpt = folder / "checkpoints" / "chunk_000.pt"
    stamp = ckpt.stat().st_mtime_ns
    mm = build_method("memory+mgd3", num_steps=3, cfg_scale=2.0, seed=1, finetune=ft, mode_guidance_scale=0.0)
    bb2 = mm.prepare(toy_dataset, tiny_bb, **kw)
    assert list((tmp_path / "work").iterdir()) == [folder] and ckpt.stat().st_mtime_ns == stamp
    assert bb2.content_hash() == bb.content_hash()  # a re-run resumes the same export
    cache = method_cache(toy_dataset, tiny_bb, tmp_path, mm)
    assert torch.equal(mm.distill_class(method_ctx(mm, toy_dataset, bb2, cache, c=1, ipc=2)).latents, ref)
    # minimax (fifo) is a different fine-tune
    mini = build_method("minimax", finetune=ft)
    mini.prepare(toy_dataset, tiny_bb, **kw)
    assert len(list((tmp_path / "work").iterdir())) == 2


def test_given_finetuned_backbone_is_used_without_training(toy_dataset, tiny_bb, tmp_path):
    tiny_bb.save_pretrained(tmp_path / "plain")  # a plain diffusers folder serves every class
    m = build_method("minimax", num_steps=2, cfg_scale=1.0, finetuned_backbone=str(tmp_path / "plain"))
    bb = m.prepare(toy_dataset, tiny_bb, work_dir=tmp_path / "work", progress=False)
    assert not (tmp_path / "work").exists()
    dit = build_method("dit", num_steps=2, cfg_scale=1.0)
    assert torch.equal(m.distill_class(method_ctx(m, toy_dataset, bb, None)).latents,
                       dit.distill_class(method_ctx(dit, toy_dataset, tiny_bb, None)).latents)
    with pytest.raises(ConfigError, match="neither"):
        build_method("minimax", finetuned_backbone=str(tmp_path)).prepare(toy_dataset, tiny_bb, progress=False)
    with pytest.raises(ConfigError, match="unknown fine-tuning option"):
        build_method("memory", finetune={"stpes": 3})


def test_chunked_finetune_samples_each_class_from_its_chunk(toy_dataset, tiny_bb, tmp_path, monkeypatch):
    monkeypatch.setenv("GENDD_FINETUNE", str(tmp_path / "work"))
    monkeypatch.setenv("GENDD_CACHE", str(tmp_path / "cache"))
    m = build_method("memory", num_steps=2, finetune={"steps": 1, "batch_size": 4, "class_chunk": 2})
    # not prepared: the first class fine-tunes with the default folders
    man = distill(m, toy_dataset, 1, tmp_path / "out", backbone=tiny_bb, progress=False)
    used = {c: man["classes_done"][c]["finetuned_backbone"] for c in toy_dataset.classes}
    assert used["c0"] == used["c1"] != used["c2"] == used["c3"] and used["c3"].endswith("chunk_001")
    assert m.prepare(toy_dataset, tiny_bb, progress=False) is tiny_bb  # several models: base for decoding


def test_dit_xl_family_backbone(tmp_path):
    """Learned sigma, 1000 classes, 3-channel 8x VAE; ImageNet labels 207 and 360. DiffFit moves only
    the label-table rows of the conditioning labels and the null label."""
    bb = tiny_backbone(num_classes=1000, image_size=32, channels=3, vae_channels=(32, 32, 32, 32),
                       learned_sigma=True)
    ds = make_dataset(num_classes=2, per_class=6, size=32, channels=3)
    ds.model_labels = [207, 360]
    m = build_method("memory+mgd3", num_steps=2, finetune={"steps": 2, "batch_size": 4})
    ft_bb = m.prepare(ds, bb, cache_dir=tmp_path / "cache", work_dir=tmp_path / "work", progress=False)
    cache = method_cache(ds, bb, tmp_path, m)
    man = distill(m, ds, 2, tmp_path / "out", backbone=ft_bb, cache=cache, progress=False)
    assert man["complete"] and len(list((tmp_path / "out" / "c1").glob("*.png"))) == 2
    (folder,) = list((tmp_path / "work").iterdir())
    state = torch.load(folder / "checkpoints" / "chunk_000.pt", weights_only=False)["model"]
    key = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    moved = (state[key] != bb.transformer.state_dict()[key]).any(1).nonzero().flatten().tolist()
    assert set(moved) <= {207, 360, 1000} and {207, 360} <= set(moved)
    assert ft_bb.learned_sigma and ft_bb.predict(torch.zeros(1, *bb.latent_shape), torch.tensor([3]),
                                                 torch.tensor([207]), cfg_scale=4.0)[1] is not None


def test_backbone_finetune_defaults_fill_unset_options(toy_dataset, tiny_bb, tmp_path):
    """A folder's gendd_finetune.json survives save/load and fills the options the user left unset."""
    tiny_bb.finetune_defaults = {"steps": 3, "batch_size": 4, "eviction": "fifo"}
    tiny_bb.save_pretrained(tmp_path / "bb")
    loaded = Backbone.from_pretrained(tmp_path / "bb")
    assert loaded.finetune_defaults == tiny_bb.finetune_defaults
    assert loaded.content_hash() == tiny_bb.content_hash()  # defaults are not part of the identity
    m = build_method("memory", num_steps=2, finetune={"batch_size": 2})
    ft = m.config.resolve_finetune(loaded)
    # unset -> backbone value; set by the user -> kept; the method's eviction is never overridden
    assert (ft.steps, ft.batch_size, ft.eviction) == (3, 2, "max-similarity")
    m.prepare(toy_dataset, loaded, cache_dir=tmp_path / "cache", work_dir=tmp_path / "work", progress=False)
    assert m.config.finetune.steps == 3  # what the manifest records is the resolved config
    explicit = build_method("minimax", finetune=FinetuneConfig(steps=7))
    assert explicit.config.resolve_finetune(loaded).steps == 7


def test_epochs_count_images_not_cached_flipped_copies(toy_dataset, tiny_bb, tmp_path):
    """An epoch is one pass over the images (the reference flips on the fly): a flip-doubled cache of 24
    images at batch 4 gives 6 steps per epoch, not 12."""
    from gendd.cache import LatentCache

    steps = {}
    for flip in (True, False):
        cfg = FinetuneConfig(epochs=1, batch_size=4, memory_size=3, flip=flip, checkpoint_every=100)
        cache = LatentCache.build(toy_dataset, tiny_bb, tmp_path / "cache", cfg.encode_spec(), progress=False)
        assert sum(cache.latents(c).shape[0] for c in range(4)) == (48 if flip else 24)
        res = finetune(tiny_bb, cache, tmp_path / f"ft-{flip}", cfg, progress=False)
        steps[flip] = res.chunks[0].steps
    assert steps == {True: 6, False: 6}
    assert FinetuneConfig(epochs=2, batch_size=4).steps_for(48, 24) == 12
    assert FinetuneConfig(epochs=2, batch_size=4, steps=5).steps_for(48, 24) == 5
