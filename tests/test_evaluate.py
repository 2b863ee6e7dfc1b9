"""Offline tests of gendd.evaluate: ConvNet students, DSA ops, protocol and training loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_close_f32

from gendd.data.base import ImageDataset
from gendd.errors import ConfigError, DataError, NumericalError
from gendd.evaluate import (
    AUGMENT_GROUPS,
    PROFILES,
    STUDENTS,
    ConvNet,
    DSAParams,
    DSAProtocol,
    DSAugment,
    build_student,
    evaluate_distilled,
    format_result,
    prepare_test,
    train_student,
)
from gendd.evaluate import augment as A



def make_ds(images: torch.Tensor, labels, name="toy", split="train", mean=(0.5,), std=(0.5,)):
    """ImageDataset backed by an in-memory uint8 tensor."""
    n_cls = int(np.max(labels)) + 1
    return ImageDataset(name=name, split=split, classes=[f"c{i}" for i in range(n_cls)],
                        labels=np.asarray(labels), channels=images.shape[1],
                        image_size=images.shape[2], loader=lambda idx: images[list(idx)],
                        mean=mean, std=std)


def bars(n_per_class: int, size: int = 16, classes: int = 4, seed: int = 0):
    """Easy task: class k = bright horizontal bar in row band k (flip/cutout tolerant)."""
    g = torch.Generator().manual_seed(seed)
    band = size // classes
    x = torch.randint(0, 60, (n_per_class * classes, 1, size, size), generator=g)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    for i, k in enumerate(y.tolist()):
        x[i, :, k * band:(k + 1) * band, :] += 180
    return x.clamp(0, 255).to(torch.uint8), y


# ---------------------------------------------------------------- students

@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_convnet3_forward_backward(channels, size):
    net = build_student("convnet3", channels, 10, size)
    x = torch.randn(2, channels, size, size)
    out = net(x)
    assert out.shape == (2, 10)
    # Both geometries end on a 128 x 4 x 4 map (1-channel first conv pads 3: 28 -> 32).
    assert net.embed(x).shape == (2, 128 * 4 * 4)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_convnet3_param_count():
    c, w, k, classes, depth = 3, 128, 3, 10, 3
    side = 32 // 2 ** depth
    conv = (k * k * c * w + w) + (depth - 1) * (k * k * w * w + w)
    norm = depth * 2 * w                      # instance-norm affine weight + bias
    head = w * side * side * classes + classes
    expected = conv + norm + head
    net = build_student("convnet3", c, classes, 32)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert 0.31e6 < expected < 0.33e6


def test_student_registry_errors():
    assert {"convnet3", "convnet6"} <= set(STUDENTS)
    with pytest.raises(ConfigError):
        build_student("resnet1000", 3, 10, 32)
    # 32 px would vanish after 6 poolings: the last block skips its pooling (128 x 1 x 1 features)
    assert build_student("convnet6", 3, 10, 32).feature_shape == (128, 1, 1)
    assert isinstance(build_student("convnet6", 3, 10, 64), ConvNet)


# ---------------------------------------------------------------- DSA ops

OPS = [A.rand_scale, A.rand_rotate, A.rand_flip, A.rand_brightness, A.rand_saturation,
       A.rand_contrast, A.rand_crop, A.rand_cutout]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_dsa_op_shape_seed_grad_and_per_sample(op):
    p = DSAParams()
    x = torch.randn(1, 3, 16, 16).repeat(16, 1, 1, 1).requires_grad_(True)
    out = op(x, p, 16, _g(1))
    assert out.shape == x.shape
    assert torch.equal(out, op(x, p, 16, _g(1)))             # same seed -> same output
    assert not torch.equal(out, op(x, p, 16, _g(2)))         # other seed -> other output
    # per-sample randomness: identical inputs, different outputs within the batch
    assert any(not torch.equal(out[0], out[i]) for i in range(1, 16))
    # Siamese draw (n=1): one transformation for the whole batch
    sia = op(x, p, 1, _g(1))
    assert all(torch.equal(sia[0], sia[i]) for i in range(16))
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("op,zero", [
    (A.rand_scale, dict(scale=1.0)), (A.rand_rotate, dict(rotate=0.0)),
    (A.rand_crop, dict(crop_pad=0.0)), (A.rand_cutout, dict(cutout=0.0)),
    (A.rand_brightness, dict(brightness=0.0)), (A.rand_flip, dict(flip=0.0)),
], ids=lambda v: getattr(v, "__name__", ""))
def test_dsa_op_identity_at_zero_strength(op, zero):
    x = torch.randn(4, 3, 16, 16)
    out = op(x, DSAParams(**zero), 4, _g())
    # scale/rotate resample through affine_grid + grid_sample: float32 grid coordinates are off by
    # ~eps * 16 px, which mixes in neighbours (differences up to 2 max|x|)
    assert_close_f32(out, x, n=16, scale=2 * float(x.abs().max()))


def test_saturation_identity_on_grey_and_contrast_keeps_mean():
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(A.rand_saturation(x, DSAParams(), 4, _g()), x)
    y = A.rand_contrast(x, DSAParams(), 4, _g())
    # float32 means over 16 * 16 pixels of values below 2 max|x| (contrast factors up to 1.5)
    assert_close_f32(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), n=16 * 16, scale=2 * float(x.abs().max()))


def test_flip_really_flips():
    x = torch.randn(4, 2, 8, 8)
    torch.testing.assert_close(A.rand_flip(x, DSAParams(flip=1.0), 4, _g()), x.flip(3))
    out = A.rand_flip(x, DSAParams(), 4, _g(3))
    for a, b in zip(out, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))


def test_crop_is_integer_translation_with_zero_fill():
    x = torch.rand(6, 1, 16, 16) + 1.0                       # strictly positive
    out = A.rand_crop(x, DSAParams(), 6, _g(5))
    s = 2                                                    # round(0.125 * 16)
    for a, b in zip(out[:, 0], x[:, 0]):
        found = False
        for tx in range(-s, s + 1):
            for ty in range(-s, s + 1):
                ref = torch.zeros_like(b)
                src = b[max(tx, 0):16 + min(tx, 0), max(ty, 0):16 + min(ty, 0)]
                ref[max(-tx, 0):16 + min(-tx, 0), max(-ty, 0):16 + min(-ty, 0)] = src
                found |= torch.equal(a, ref)
        assert found


def test_cutout_zeroes_a_clipped_square():
    x = torch.ones(32, 1, 16, 16)
    out = A.rand_cutout(x, DSAParams(), 32, _g(0))
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert (zeros > 0).all() and (zeros <= 8 * 8).all()     # side round(0.5 * 16) = 8
    assert (zeros == 64).any()                               # unclipped squares occur


def test_dsaugment_single_mode_applies_one_group():
    x = torch.rand(8, 1, 16, 16) + 1.0
    kinds = set()
    for seed in range(16):
        out = DSAugment("flip_cutout", aug_mode="S")(x, _g(seed))
        if (out == 0).any():                                 # cutout only: no flips
            kinds.add("cutout")
            assert torch.equal(out[out != 0], x[out != 0])
        else:                                                # flip only
            kinds.add("flip")
            assert all(torch.equal(a, b) or torch.equal(a, b.flip(2)) for a, b in zip(out, x))
    assert kinds == {"flip", "cutout"}
    out_m = DSAugment("flip_cutout", aug_mode="M")(x, _g(0))
    assert (out_m == 0).any()


def test_dsaugment_config():
    assert set(AUGMENT_GROUPS) == {"color", "crop", "cutout", "flip", "scale", "rotate"}
    x = torch.randn(2, 3, 8, 8)
    assert DSAugment("none")(x) is x
    with pytest.raises(ConfigError):
        DSAugment("color_warp")
    with pytest.raises(ConfigError):
        DSAugment(aug_mode="X")
    aug = DSAugment()
    torch.testing.assert_close(aug(x, _g(7)), aug(x, _g(7)))


# ---------------------------------------------------------------- protocol and loop

def _tiny(**kw) -> DSAProtocol:
    base = dict(epochs=3, repeats=2, test_batch_size=64, eval_every=1, num_threads=1)
    base.update(kw)
    return DSAProtocol(**base)


def test_protocol_defaults_and_profiles():
    p = PROFILES["paper"]
    assert (p.epochs, p.lr, p.momentum, p.weight_decay, p.batch_size) == (1000, 0.01, 0.9, 5e-4, 256)
    assert p.decay_epoch == 501 and p.eval_interval == 200 and p.student == "convnet3"
    assert p.precision == "fp32" and p.repeats == 5  # the reference: fp32, 5 students
    assert DSAProtocol().eval_interval == 100  # default: about 10 evaluations
    assert p.dsa_strategy == "color_crop_cutout_flip_scale_rotate" and p.name == "dsa"
    assert p.lr_at(501) == 0.01 and p.lr_at(502) == pytest.approx(0.001)
    q = PROFILES["quick"]
    assert (q.epochs, q.repeats, q.decay_epoch, q.precision) == (300, 3, 151, "auto")
    with pytest.raises(ConfigError):
        DSAProtocol(lr=-1.0)


def test_lr_schedule_four_epochs():
    x, y = bars(2, size=8)
    test = (x.float()[:8] / 255, y[:8])
    r = train_student(x.float() / 255, y, test, _tiny(epochs=4), seed=0, progress=False)
    # decay epoch = 4 // 2 + 1 = 3: passes 0..3 at lr, pass 4 at lr / 10 (epochs + 1 passes)
    assert r["lrs"] == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.001])
    assert [e for e, _ in r["history"]] == [2, 3, 4, 5]  # passes completed; tests after passes 1..4 (0-based)
    assert r["final_acc"] == r["history"][-1][1]


def test_determinism_same_seed():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 28, 28, generator=g)
    y = torch.arange(20) % 10
    test = (torch.randn(64, 1, 28, 28, generator=g), torch.arange(64) % 10)
    runs = [train_student(x, y, test, _tiny(), seed=s, progress=False, return_model=True)
            for s in (3, 3, 4)]
    assert runs[0]["final_acc"] == runs[1]["final_acc"]
    assert runs[0]["history"] == runs[1]["history"]
    sd0, sd1, sd2 = (r["model"].state_dict() for r in runs)
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert not all(torch.equal(sd0[k], sd2[k]) for k in sd0)


def test_loop_learns_easy_task():
    x, y = bars(10)
    xt, yt = bars(20, seed=1)
    train = make_ds(x, y.numpy())
    test = make_ds(xt, yt.numpy(), split="test")
    proto = _tiny(epochs=40, repeats=1, eval_every=0, lr=0.05)
    res = evaluate_distilled(train, test, proto, progress=False)
    assert res["final_mean"] >= 90.0, res["runs"][0]["history"]
    assert res["test_size"] == 80 and res["train_size"] == 40
    assert res["train_class_counts"] == [10, 10, 10, 10]


def test_nan_input_and_exploding_lr_raise():
    x, y = bars(2, size=8)
    test = (x.float() / 255, y)
    bad = x.float() / 255
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match="epoch 0"):
        train_student(bad, y, test, _tiny(), seed=0, progress=False)
    with pytest.raises(NumericalError, match="epoch"):
        train_student(x.float() / 255, y, test, _tiny(lr=1e30, epochs=20), seed=0,
                      progress=False)


def test_evaluate_distilled_summary_and_format():
    x, y = bars(1, size=8)
    xt, yt = bars(5, size=8, seed=2)
    res = evaluate_distilled(make_ds(x, y.numpy()), make_ds(xt, yt.numpy(), split="test"),
                             _tiny(epochs=1, test_limit=8), progress=False)
    finals = np.array([r["final_acc"] for r in res["runs"]])
    assert res["num_runs"] == 2 and res["final_std"] == pytest.approx(finals.std())
    assert res["test_size"] == 8 and res["test_split"] == "test"
    assert res["protocol"] == dataclasses.asdict(_tiny(epochs=1, test_limit=8))
    assert {"torch_version", "num_threads", "seconds_per_run"} <= set(res)
    line = format_result(res)
    assert line.startswith("final ") and "| best " in line and "(2 runs, 1 epochs)" in line


def test_prepare_test_balanced_and_class_checks():
    xt, yt = bars(5, size=8)
    ds = make_ds(xt, yt.numpy(), split="test", mean=(0.25,), std=(0.5,))
    x, y = prepare_test(ds, limit=8)
    assert np.bincount(y.numpy()).tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(x[0], (xt[0].float() / 255 - 0.25) / 0.5)
    other = make_ds(xt[:, :, :4, :4].contiguous(), yt.numpy())
    with pytest.raises(DataError):
        evaluate_distilled(other, ds, _tiny(), progress=False)
