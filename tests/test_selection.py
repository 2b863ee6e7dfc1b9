"""herding / kcenter: known answers on constructed points, and end to end through export.distill."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from gendd.cache import LatentCache
from gendd.errors import ConfigError, DataError
from gendd.export import distill
from gendd.methods import ClassContext, build_method
from gendd.methods.selection import herding_order, kcenter_order


def _col(values):
    return torch.tensor(values, dtype=torch.float64).view(-1, 1)


def test_herding_1d_known_order():
    # mean 3.25: 2 is nearest; then the item making the pair mean nearest 3.25 (1 -> 1.5 vs 10 -> 6),
    # then 10 (mean 13/3 vs 1), then 0
    assert herding_order(_col([0.0, 1.0, 2.0, 10.0]), 4) == [2, 1, 3, 0]
    assert herding_order(_col([0.0, 1.0, 2.0, 10.0]), 2) == [2, 1]  # prefix property


def test_herding_matches_brute_force_running_mean():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu = x.mean(0)
    chosen: list[int] = []
    for _ in range(5):
        rest = [j for j in range(9) if j not in chosen]
        chosen.append(min(rest, key=lambda j: float((x[chosen + [j]].mean(0) - mu).norm())))
    assert herding_order(x, 5) == chosen


def test_kcenter_line_picks_extremes():
    values = [3.0, 10.0, 5.0, 0.0, 7.0, 1.0, 9.0, 2.0, 8.0, 4.0, 6.0]  # 0..10 shuffled, mean 5
    order = kcenter_order(_col(values), 4)
    assert values[order[0]] == 5.0                       # start: closest to the mean
    assert {values[order[1]], values[order[2]]} == {0.0, 10.0}  # then the two extremes
    assert values[order[3]] in (2.0, 3.0, 7.0, 8.0)      # then a midpoint of a half (distance 2.5 -> 2 or 3)


def test_kcenter_random_start_and_covering_radius():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = kcenter_order(x, 5, "random", torch.Generator().manual_seed(7))
    b = kcenter_order(x, 5, "random", torch.Generator().manual_seed(7))
    assert a == b and a[0] == int(torch.randint(30, (1,), generator=torch.Generator().manual_seed(7)))
    # greedy 2-approximation: its covering radius is at most twice the best one (brute force, k = 3)
    order = kcenter_order(x, 3)
    radius = lambda s: float(torch.cdist(x, x[list(s)]).min(1).values.max())  # noqa: E731
    best = min(radius(s) for s in itertools.combinations(range(30), 3))
    assert radius(order) <= 2 * best + 1e-9


@pytest.mark.parametrize("fn", [herding_order, kcenter_order])
def test_no_duplicates_and_too_many(fn):
    same = torch.ones(5, 3)  # all points equal: every pick ties, still distinct positions
    assert sorted(fn(same, 5)) == [0, 1, 2, 3, 4]
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    assert len(set(fn(x, 7))) == 7
    with pytest.raises(DataError, match="cannot select 8 items from 7"):
        fn(x, 8)


def test_config_errors():
    with pytest.raises(ConfigError, match="feature_space must be one of 'latent', 'pixel', got 'teacher'"):
        build_method("herding", feature_space="teacher")
    with pytest.raises(ConfigError, match="feature_space must be one of"):
        build_method("kcenter", feature_space="pixels")
    with pytest.raises(ConfigError, match="start must be"):
        build_method("kcenter", start="first")
    assert build_method("herding", feature_space="pixel").needs_cache is False
    assert build_method("herding").needs_cache is True and build_method("kcenter").needs_backbone is True


def test_pixel_space_end_to_end(toy_dataset, tmp_path):
    ds = toy_dataset
    for name in ("herding", "kcenter"):
        m = distill(build_method(name, feature_space="pixel"), ds, 3, tmp_path / name, progress=False)
        for c in range(ds.num_classes):
            idx = m["classes_done"][f"c{c}"]["indices"]
            cls = ds.class_indices(c)
            feats = ds.load(cls).flatten(1).double() / 255
            expect = herding_order(feats, 3) if name == "herding" else kcenter_order(feats, 3)
            assert idx == [int(cls[p]) for p in expect]
            for i, j in enumerate(idx):
                img = np.array(Image.open(tmp_path / name / f"c{c}" / f"{i}.png"))
                assert np.array_equal(img, ds.load([j])[0, 0].numpy())
    with pytest.raises(DataError, match="IPC 7 exceeds"):
        distill(build_method("herding", feature_space="pixel"), ds, 7, tmp_path / "x", progress=False)
    ctx = ClassContext(label=0, name="c0", model_label=0, ipc=7, dataset=ds, generator=torch.Generator())
    with pytest.raises(DataError, match="IPC 7 exceeds"):
        build_method("kcenter", feature_space="pixel").distill_class(ctx)


def test_latent_space_end_to_end(toy_dataset, tiny_bb, tmp_path):
    from safetensors.torch import load_file

    ds = toy_dataset
    with pytest.raises(ConfigError, match="needs a backbone"):
        distill(build_method("herding"), ds, 2, tmp_path / "none", progress=False)
    cache = LatentCache.build(ds, tiny_bb, tmp_path / "cache", progress=False)
    for name in ("herding", "kcenter"):
        out = tmp_path / name
        m = distill(build_method(name), ds, 2, out, backbone=tiny_bb, cache=cache, progress=False)
        for c in range(ds.num_classes):
            z, ind = cache.load(c)
            expect = herding_order(z.flatten(1), 2) if name == "herding" else kcenter_order(z.flatten(1), 2)
            idx = m["classes_done"][f"c{c}"]["indices"]
            assert idx == [int(ind[p]) for p in expect]
            saved = load_file(str(out / "latents" / f"c{c}.safetensors"))["latents"]
            assert torch.equal(saved, z[expect])
            img = np.array(Image.open(out / f"c{c}" / "1.png"))
            assert np.array_equal(img, ds.load([idx[1]])[0, 0].numpy())
        assert json.loads((out / "manifest.json").read_text())["config"]["feature_space"] == "latent"


def test_dit_family_backbone_latent_selection(tmp_path):
    from conftest import make_dataset

    from gendd.backbone import tiny_backbone

    bb = tiny_backbone(num_classes=1000, image_size=32, channels=3, vae_channels=(32, 32, 32, 32),
                       learned_sigma=True)
    ds = make_dataset(num_classes=3, per_class=4, size=32, channels=3)
    ds.model_labels = [1, 207, 980]
    cache = LatentCache.build(ds, bb, tmp_path / "cache", progress=False)
    for name in ("herding", "kcenter"):
        m = distill(build_method(name), ds, 2, tmp_path / name, backbone=bb, cache=cache, progress=False)
        assert m["complete"]
        for c in range(3):
            idx = m["classes_done"][f"c{c}"]["indices"]
            assert len(set(idx)) == 2 and all(ds.labels[i] == c for i in idx)
            img = np.array(Image.open(tmp_path / name / f"c{c}" / "0.png"))
            assert img.shape == (32, 32, 3)
            assert np.array_equal(img, ds.load([idx[0]])[0].permute(1, 2, 0).numpy())
