"""Students: forward/backward at small and ImageNet sizes, ConvNet-3 unchanged, ResNet layouts,
torchvision state_dict compatibility of resnet18_bn (built by hand: torchvision is not installed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gendd.errors import ConfigError
from gendd.evaluate import STUDENTS, ConvNet, ResNet, build_student, load_teacher
from gendd.evaluate.students import torchvision_resnet18_shapes

SMALL = [(1, 28), (3, 32)]
NAMES = ["convnet3", "convnet4", "convnet5", "convnet6", "resnet_ap10", "resnet18", "resnet18_bn"]


def _forward_backward(net: nn.Module, x: torch.Tensor, classes: int) -> None:
    out = net(x)
    assert out.shape == (x.shape[0], classes)
    emb = net.embed(x)
    assert emb.shape == (x.shape[0], net.num_features)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels,size", SMALL)
def test_students_small_inputs(name, channels, size):
    assert name in STUDENTS
    torch.manual_seed(0)
    net = build_student(name, channels, 10, size)
    _forward_backward(net, torch.randn(2, channels, size, size), 10)


@pytest.mark.parametrize("name", ["resnet_ap10", "resnet18", "resnet18_bn", "convnet6"])
def test_students_224px(name):
    torch.manual_seed(0)
    net = build_student(name, 3, 5, 224)
    _forward_backward(net, torch.randn(1, 3, 224, 224), 5)


def test_resnet_stems_follow_the_size_rules():
    ap = build_student("resnet_ap10", 3, 10, 224)
    assert ap.conv1.kernel_size == (7, 7) and ap.conv1.stride == (1, 1)        # IDC 'large' AP stem
    assert isinstance(ap.maxpool, nn.AvgPool2d) and ap.maxpool.kernel_size == 4
    assert isinstance(ap.layer2[0].pool, nn.AvgPool2d)                          # avg-pool downsampling
    assert ap.layer2[0].conv1.stride == (1, 1)
    assert isinstance(ap.layer2[0].downsample[1], nn.AvgPool2d)
    assert isinstance(ap.bn1, nn.GroupNorm) and ap.bn1.num_groups == 64         # instance norm
    assert [len(getattr(ap, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    small = build_student("resnet_ap10", 1, 10, 28)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    r18 = build_student("resnet18", 3, 10, 224)
    assert r18.conv1.stride == (2, 2) and isinstance(r18.maxpool, nn.MaxPool2d)
    assert r18.layer2[0].conv1.stride == (2, 2) and isinstance(r18.bn1, nn.GroupNorm)
    bn = build_student("resnet18_bn", 3, 10, 32)
    assert bn.conv1.kernel_size == (3, 3) and isinstance(bn.maxpool, nn.Identity)
    assert isinstance(bn.bn1, nn.BatchNorm2d)
    assert build_student("resnet18_bn", 3, 10, 96).conv1.kernel_size == (7, 7)  # torchvision above 64 px


def test_convnet3_unchanged():
    """320,010 parameters for 32x32x3 / 10 classes; same layers, names and init draws as the
    original ConvNet-3 (rebuilt here by hand from the reference layout)."""
    c, w, k = 3, 128, 3
    expected = (k * k * c * w + w) + 2 * (k * k * w * w + w) + 3 * 2 * w + (w * 4 * 4 * 10 + 10)
    assert expected == 320_010
    torch.manual_seed(123)
    net = build_student("convnet3", 3, 10, 32)
    assert sum(p.numel() for p in net.parameters()) == 320_010
    torch.manual_seed(123)
    layers = []
    for d in range(3):
        layers += [nn.Conv2d(3 if d == 0 else w, w, 3, padding=1), nn.GroupNorm(w, w, affine=True),
                   nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
    ref_features, ref_classifier = nn.Sequential(*layers), nn.Linear(w * 16, 10)
    ref = {**{f"features.{k}": v for k, v in ref_features.state_dict().items()},
           **{f"classifier.{k}": v for k, v in ref_classifier.state_dict().items()}}
    got = net.state_dict()
    assert list(got) == list(ref)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    x = torch.randn(2, 3, 32, 32)
    # bitwise: the same layers with the same weights on the same batch run the same kernels
    assert torch.equal(net(x), ref_classifier(ref_features(x).flatten(1)))
    # 1-channel 28 px: first conv pads 3 (28 -> 32), same 128 x 4 x 4 map
    assert build_student("convnet3", 1, 10, 28).feature_shape == (128, 4, 4)


def test_deep_convnet_skips_pooling_on_small_inputs():
    net = build_student("convnet6", 1, 10, 28)          # 32 -> 16 -> 8 -> 4 -> 2 -> (no pool) 2 -> 1
    assert net.feature_shape == (128, 1, 1)
    kinds = [type(m).__name__ for m in net.features if isinstance(m, (nn.AvgPool2d, nn.Identity))]
    assert kinds == ["AvgPool2d"] * 4 + ["Identity", "AvgPool2d"]
    assert build_student("convnet6", 3, 10, 224).feature_shape == (128, 3, 3)
    assert build_student("convnet4", 3, 10, 32).feature_shape == (128, 2, 2)
    assert build_student("convnet5", 3, 10, 32).feature_shape == (128, 1, 1)  # the reference's shapes
    assert isinstance(build_student("convnet6", 3, 10, 32), ConvNet)


@pytest.mark.parametrize("name,channels,size", [("convnet6", 1, 28), ("convnet6", 3, 32), ("convnet5", 1, 28),
                                                ("convnet6", 3, 16), ("resnet_ap10", 1, 28), ("resnet18", 3, 32)])
def test_no_instance_norm_sees_a_single_pixel(name, channels, size):
    """Instance norm of a 1x1 map is identically 0: a ConvNet whose block sees one would output a constant.
    (The first ConvNet-6 at 28 px did: 10 % test accuracy on the full training split.)"""
    torch.manual_seed(0)
    net = build_student(name, channels, 10, size)
    sides = []
    for m in net.modules():
        if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
            m.register_forward_hook(lambda mod, inp, out: sides.append(inp[0].shape[-1]))
    x = torch.randn(4, channels, size, size)
    out = net(x)
    assert min(sides) >= 2
    assert (out[0] - out[1]).abs().max() > 1e-4          # different inputs, different logits
    out.sum().backward()
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad.abs().sum() > 0


def test_unknown_student():
    with pytest.raises(ConfigError, match="unknown student"):
        build_student("resnet1000", 3, 10, 32)


def _torchvision_resnet18_keys(channels: int = 3, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """torchvision ``resnet18().state_dict()`` keys and shapes, written out by hand."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (64, channels, 7, 7)}

    def bn(p: str, ch: int) -> None:
        keys.update({f"{p}.weight": (ch,), f"{p}.bias": (ch,), f"{p}.running_mean": (ch,),
                     f"{p}.running_var": (ch,), f"{p}.num_batches_tracked": ()})

    bn("bn1", 64)
    widths = [64, 128, 256, 512]
    for li, wdt in enumerate(widths, start=1):
        for b in (0, 1):
            cin = widths[li - 2] if (li > 1 and b == 0) else wdt
            keys[f"layer{li}.{b}.conv1.weight"] = (wdt, cin, 3, 3)
            bn(f"layer{li}.{b}.bn1", wdt)
            keys[f"layer{li}.{b}.conv2.weight"] = (wdt, wdt, 3, 3)
            bn(f"layer{li}.{b}.bn2", wdt)
            if li > 1 and b == 0:
                keys[f"layer{li}.{b}.downsample.0.weight"] = (wdt, cin, 1, 1)
                bn(f"layer{li}.{b}.downsample.1", wdt)
    keys["fc.weight"] = (classes, 512)
    keys["fc.bias"] = (classes,)
    return keys


def test_resnet18_bn_loads_a_torchvision_state_dict(tmp_path):
    keys = _torchvision_resnet18_keys()
    assert len(keys) == 122  # 20 convs + 20 BNs x 5 entries + fc weight/bias, as torchvision's
    assert torchvision_resnet18_shapes() == keys
    net = build_student("resnet18_bn", 3, 1000, 224)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == keys
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.tensor(7, dtype=torch.long) if k.endswith("num_batches_tracked")
              else torch.rand(shape, generator=g) + 0.1) for k, shape in keys.items()}
    net.load_state_dict(sd, strict=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)          # DataParallel-style prefix
    teacher = load_teacher(path)
    assert teacher.student == "resnet18_bn" and teacher.num_classes == 1000
    assert teacher.image_size == 224 and teacher.source == "torchvision-state-dict"
    assert all(torch.equal(teacher.model.state_dict()[k], v) for k, v in sd.items())
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(ConfigError, match="resnet18_bn"):
        load_teacher(path, student="convnet3")
    bad = dict(sd)
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="do not match"):
        load_teacher(tmp_path / "bad.pth")


def test_resnet_module_is_reusable():
    net = ResNet(3, 4, 32, layers=(1, 1, 1, 1), norm="batch", avg_pool=True, stem="idc")
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ConfigError):
        ResNet(3, 4, 32, norm="layer")
