"""dm: Siamese augmentation, real initialisation, determinism, loss decrease, per-class == joint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_close_f32
from gendd.errors import ConfigError, NumericalError
from gendd.evaluate.augment import DEFAULT_STRATEGY, DSAugment
from gendd.export import distill
from gendd.methods import ClassContext, build_method, seed_for
from gendd.methods.dm import class_term, embedding_net, initial_images, net_seed

FAST = dict(batch_real=4, iterations=3)


def _ctx(ds, c, ipc, seed=0):
    return ClassContext(label=c, name=ds.classes[c], model_label=c, ipc=ipc, dataset=ds,
                        generator=torch.Generator().manual_seed(seed_for(seed, c)))


def _stats(ds):
    return (torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1))


def test_siamese_same_seed_same_transform_for_two_batches():
    aug = DSAugment(DEFAULT_STRATEGY)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 12, 12, generator=g), torch.randn(2, 3, 12, 12, generator=g)
    groups = set()
    for s in range(40):  # covers every op group
        gen = torch.Generator().manual_seed(s)
        groups.add(aug.groups[int(torch.randint(len(aug.groups), (1,), generator=gen))])
        both = aug(torch.cat([a, b]), torch.Generator().manual_seed(s), siamese=True)
        sep = torch.cat([aug(a, torch.Generator().manual_seed(s), siamese=True),
                         aug(b, torch.Generator().manual_seed(s), siamese=True)])
        # one batch of 7 vs batches of 5 and 2: float32 rounding; the longest reduction is the
        # contrast op's per-image mean over 3 * 12 * 12 values
        assert_close_f32(both, sep, n=3 * 12 * 12)
    assert groups == set(aug.groups)


def test_zero_iterations_returns_real_init_exactly(toy_dataset):
    ds = toy_dataset
    res = build_method("dm", iterations=0).distill_class(_ctx(ds, 2, 3))
    idx = res.extra["init_indices"]
    assert len(set(idx)) == 3 and all(ds.labels[i] == 2 for i in idx)
    assert res.images.dtype == torch.uint8 and torch.equal(res.images, ds.load(idx))
    # the same draw as a fresh class generator's randperm
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed_for(0, 2)))[:3]
    assert idx == [int(i) for i in ds.class_indices(2)[perm.numpy()]]
    noise = build_method("dm", iterations=0, init="noise").distill_class(_ctx(ds, 2, 3))
    expect = torch.randn((3, 1, 12, 12), generator=torch.Generator().manual_seed(seed_for(0, 2)))
    assert noise.extra["init_indices"] is None and torch.equal(noise.tensors["dm_images"], expect)


def test_export_shapes_determinism(toy_dataset, tmp_path):
    ds = toy_dataset
    m = distill(build_method("dm", seed=1, **FAST), ds, 2, tmp_path / "a", progress=False)
    same = distill(build_method("dm", seed=1, **FAST), ds, 2, tmp_path / "b", progress=False)
    other = distill(build_method("dm", seed=2, **FAST), ds, 2, tmp_path / "c", progress=False)
    assert m["files"] == same["files"] and m["files"] != other["files"]  # sha256 of every file
    assert m["complete"] and m["classes_done"]["c0"]["iterations"] == 3
    img = np.array(Image.open(tmp_path / "a" / "c1" / "0.png"))
    assert img.shape == (12, 12) and img.dtype == np.uint8
    t = load_file(str(tmp_path / "a" / "latents" / "c1.safetensors"))
    assert t["dm_images"].shape == (2, 1, 12, 12) and t["dm_loss"].shape == (3,)
    # the PNG is the clamped, quantised float image
    mean, std = ds.mean[0], ds.std[0]
    q = (t["dm_images"][0, 0] * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    assert np.array_equal(img, q)
    # images moved away from the real initialisation
    init = ds.load(m["classes_done"]["c1"]["init_indices"])
    assert not torch.equal(torch.from_numpy(img), init[0, 0])


def _gap(ds, c, images_norm, nets):
    """Mean over fixed nets of || mean embed(real class) - mean embed(images) ||^2, no augmentation."""
    mean, std = _stats(ds)
    real = (ds.load_class(c).float() / 255 - mean) / std
    with torch.no_grad():
        return float(np.mean([float(((n.embed(real).mean(0) - n.embed(images_norm).mean(0)) ** 2).sum())
                              for n in nets]))


def test_loss_decreases(toy_dataset):
    ds = toy_dataset
    nets = [embedding_net("convnet3", 1, 4, 12, 10_000 + k) for k in range(6)]
    for c in (0, 1):
        before = build_method("dm", iterations=0).distill_class(_ctx(ds, c, 1)).tensors["dm_images"]
        res = build_method("dm", iterations=25, batch_real=6).distill_class(_ctx(ds, c, 1))
        after = res.tensors["dm_images"]
        assert _gap(ds, c, after, nets) < 0.95 * _gap(ds, c, before, nets)
        loss = res.tensors["dm_loss"]
        assert loss[-5:].mean() < loss[:5].mean()


def test_per_class_equals_joint_optimisation(toy_dataset):
    """The reference's joint loop (one net per iteration, summed class terms, one SGD over all
    images) gives the same images as distilling each class alone with the same net seeds."""
    ds, ipc, iters, seed = toy_dataset, 2, 4, 3
    method = build_method("dm", seed=seed, iterations=iters, batch_real=4)
    per_class = [method.distill_class(_ctx(ds, c, ipc, seed)).tensors["dm_images"] for c in range(4)]

    mean, std = _stats(ds)
    ctxs = [_ctx(ds, c, ipc, seed) for c in range(4)]
    reals = [ds.load_class(c) for c in range(4)]
    syn = torch.cat([initial_images(ctxs[c], "real", reals[c], mean, std)[0] for c in range(4)])
    syn.requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
    aug = DSAugment(DEFAULT_STRATEGY)
    for it in range(iters):
        net = embedding_net("convnet3", 1, 4, 12, net_seed(seed, it))
        loss = sum(class_term(net, syn[c * ipc:(c + 1) * ipc], reals[c], mean, std, 4, aug, ctxs[c].generator)
                   for c in range(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    joint = syn.detach()
    # exact: each class term runs the same ops on the same batches as alone, and only reaches its own
    # slice of syn (the other terms add exact zeros to its gradient); SGD is elementwise
    assert torch.equal(torch.cat(per_class), joint)


def test_net_seeds_are_shared_and_nets_frozen():
    assert net_seed(0, 5) == net_seed(0, 5) and net_seed(0, 5) != net_seed(0, 6) != net_seed(1, 6)
    a, b = embedding_net("convnet3", 1, 4, 12, 42), embedding_net("convnet3", 1, 10, 12, 42)
    # the classifier size does not change the features
    assert all(torch.equal(p, q) for p, q in zip(a.features.parameters(), b.features.parameters()))
    assert not any(p.requires_grad for p in a.parameters())
    state = torch.random.get_rng_state()
    embedding_net("convnet3", 1, 4, 12, 1)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_nan_and_config_errors(toy_dataset):
    ds = toy_dataset
    ds.std = (0.0,)  # normalisation divides by zero -> non-finite loss
    with pytest.raises(NumericalError, match="DM loss became"):
        build_method("dm", iterations=2).distill_class(_ctx(ds, 0, 1))
    with pytest.raises(ConfigError, match="iterations must be"):
        build_method("dm", iterations=-1)
    with pytest.raises(ConfigError, match="unknown DSA op"):
        build_method("dm", dsa_strategy="color_blur")
    with pytest.raises(ConfigError, match="net must be one of 'convnet3', .*got 'resnet'"):
        build_method("dm", net="resnet")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            build_method("dm", device="cuda", iterations=1).distill_class(_ctx(toy_dataset, 0, 1))


def test_rgb_32px_with_dit_family_backbone(tmp_path):
    """DM ignores the backbone; it runs on a 3-channel 32 px ImageNet-labelled dataset."""
    from conftest import make_dataset

    from gendd.backbone import tiny_backbone

    bb = tiny_backbone(num_classes=1000, image_size=32, channels=3, vae_channels=(32, 32, 32, 32),
                       learned_sigma=True)
    ds = make_dataset(num_classes=2, per_class=4, size=32, channels=3)
    ds.model_labels = [1, 980]
    ds.mean, ds.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m = distill(build_method("dm", iterations=2, batch_real=4), ds, 2, tmp_path / "o", backbone=bb,
                progress=False)
    assert m["complete"]
    img = np.array(Image.open(tmp_path / "o" / "c1" / "1.png"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
