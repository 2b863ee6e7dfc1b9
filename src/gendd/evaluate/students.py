"""Student networks that evaluate a distilled set, and a small name -> builder registry.

``convnet3`` is the ConvNet of the DC/DSA/DM benchmark (Zhao et al., ICLR'21; reference
``VICO-UoE/DatasetCondensation``, ``networks.py`` ``ConvNet`` with ``get_default_convnet_setting``):
``depth`` blocks of ``conv3x3(width 128) -> instance norm (GroupNorm(128, 128), affine) -> ReLU ->
AvgPool2d(2)``, then ``flatten -> Linear(num_classes)``.

One detail of the reference is kept: for single-channel inputs the first convolution pads by 3
instead of 1, so a 28x28 image becomes 32x32 after it (28 + 2*3 - 2) and the feature map is
128 x 4 x 4 after three poolings, exactly as for 32x32 RGB inputs. The feature size is computed
from ``image_size``; deeper ConvNets on small images skip the pooling that would leave a later
block a 1x1 map (see :class:`ConvNet`), so ``convnet6`` also runs on 28/32 px images.

``convnet4``..``convnet6`` are the deeper ConvNets of later DD work (IDC evaluates ImageNet
subsets with ConvNet-6 at 224 px: ``snu-mllab/Efficient-Dataset-Condensation``, ``models/convnet.py``).
The ResNets (:class:`ResNet`) are IDC's ResNet-AP-10 and instance-norm ResNet-18 (``models/
resnet_ap.py``, ``models/resnet.py`` of the same repository) and a BatchNorm ResNet-18 with
torchvision's layout and parameter names (the student and teacher of the RDED / D3HR soft-label
protocols). Every student has ``embed(x)`` (penultimate features) and ``num_features``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gendd.errors import ConfigError
from gendd.registry import Registry

StudentBuilder = Callable[[int, int, int], nn.Module]

def _builtin_students() -> dict[str, StudentBuilder]:
    # Depth 3 is the 28/32 px benchmark student; 4, 5 and 6 are the usual choices for 64, 128 and
    # 256 px in later DD work (on smaller images the deepest blocks skip their pooling, see ConvNet).
    return {**{f"convnet{d}": _convnet_builder(d) for d in (3, 4, 5, 6)},
            "resnet_ap10": _resnet_ap10, "resnet18": _resnet18_in, "resnet18_bn": _resnet18_bn}


#: name -> ``builder(channels, num_classes, image_size)`` (:class:`gendd.registry.Registry`).
STUDENTS: Registry[StudentBuilder] = Registry("student", _builtin_students)


def register_student(name: str) -> Callable[[StudentBuilder], StudentBuilder]:
    """Decorator for a user's own student: register ``builder(channels, num_classes, image_size) -> nn.Module``
    as ``name`` (a name already taken is a ConfigError)."""

    def deco(builder: StudentBuilder) -> StudentBuilder:
        return STUDENTS.register(name, builder)

    return deco


def student_builder(name: str) -> StudentBuilder:
    """The builder registered as ``name``; ConfigError listing the registered names otherwise."""
    return STUDENTS.get(name)


def build_student(name: str, channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised student (torch's default init, drawn from the global RNG).

    Seed it by calling this inside ``torch.random.fork_rng()`` after ``torch.manual_seed``.
    """
    return student_builder(name)(channels, num_classes, image_size)


class ConvNet(nn.Module):
    """DC's ConvNet: ``depth`` x [conv3x3 -> instance norm -> ReLU -> avgpool2] -> linear.

    Shapes: first conv pads ``3`` if ``channels == 1`` else ``1`` (reference rule), so its output
    side is ``s1 = image_size + 2*pad - 2``; each block then halves it (floor), giving
    ``s_d = s1 // 2**depth`` and ``width * s_d**2`` features for the classifier.

    Small inputs (gendd's rule, not in the reference, where depth 6 needs >= 64 px): instance norm
    of a 1x1 map is identically zero (each channel minus its own mean), so a block whose input were
    1x1 would output a constant and the network could not learn. A block therefore pools only if the
    pooled map keeps a side >= 2, or if it is the last block (whose pooled map goes straight to the
    classifier); otherwise its pooling is an ``nn.Identity`` (no parameters, so parameter names,
    order and the init draws are unchanged). E.g. ConvNet-6 on 28 px grayscale: 32 -> 16 -> 8 -> 4
    -> 2 -> 2 -> 1 (128 features). Depths and sizes the reference supports pool in every block,
    exactly as before.
    Parameters: ``(9*channels*width + width) + (depth-1)*(9*width**2 + width) + depth*2*width
    + (width*s_d**2 + 1)*num_classes`` (320,010 for 32x32x3, 10 classes).
    """

    def __init__(self, channels: int, num_classes: int, image_size: int,
                 width: int = 128, depth: int = 3) -> None:
        super().__init__()
        if depth < 1 or width < 1 or channels < 1 or num_classes < 1:
            raise ConfigError(f"ConvNet needs positive depth/width/channels/classes, got "
                              f"depth={depth} width={width} channels={channels} "
                              f"classes={num_classes}")
        layers: list[nn.Module] = []
        side = image_size
        in_ch = channels
        for d in range(depth):
            pad = 3 if (channels == 1 and d == 0) else 1
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=pad))
            side = side + 2 * pad - 2
            layers.append(nn.GroupNorm(width, width, affine=True))  # instance norm
            layers.append(nn.ReLU(inplace=True))
            if side // 2 >= 2 or (side >= 2 and d == depth - 1):
                layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
                side //= 2
            else:  # pooling would leave the next block's instance norm a 1x1 map (or empty it)
                layers.append(nn.Identity())
            in_ch = width
        if side < 1:
            raise ConfigError(f"images of {image_size}px are too small for a ConvNet; "
                              "use images of at least 1 px")
        self.features = nn.Sequential(*layers)
        self.feature_shape = (width, side, side)
        self.num_features = width * side * side
        self.classifier = nn.Linear(self.num_features, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features ``(n, width * s_d**2)`` before the classifier (used by DM)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _convnet_builder(depth: int) -> StudentBuilder:
    def builder(channels: int, num_classes: int, image_size: int) -> nn.Module:
        return ConvNet(channels, num_classes, image_size, width=128, depth=depth)

    builder.__doc__ = f"ConvNet-{depth}, width 128, instance norm, avg pooling."
    return builder



# ---------------------------------------------------------------------------------------- ResNets

def _size_class(image_size: int) -> str:
    """IDC's stem rule (``models/resnet.py``/``resnet_ap.py``): ``small`` <= 64 px < ``mid`` <= 128
    px < ``large``."""
    if image_size <= 64:
        return "small"
    return "mid" if image_size <= 128 else "large"


def _norm_layer(kind: str, planes: int) -> nn.Module:
    """``instance`` = ``GroupNorm(C, C)`` (IDC's ``norm_type='instance'``), ``batch`` = BatchNorm2d."""
    return nn.GroupNorm(planes, planes) if kind == "instance" else nn.BatchNorm2d(planes)


class BasicBlock(nn.Module):
    """ResNet basic block ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``.

    ``avg_pool=False``: torchvision/IDC-ResNet form, ``conv1`` strided, shortcut
    ``conv1x1(stride) -> norm``. ``avg_pool=True``: IDC's ResNet-AP form (``resnet_ap.py``), every
    conv has stride 1 and downsampling is ``avg_pool2d(stride)`` after the first ReLU; shortcut
    ``conv1x1 -> AvgPool2d(stride) -> norm``. Submodule names follow torchvision (``conv1``, ``bn1``,
    ``conv2``, ``bn2``, ``downsample.<i>``).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, norm: str, avg_pool: bool) -> None:
        super().__init__()
        conv_stride = 1 if avg_pool else stride
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = _norm_layer(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm_layer(norm, planes)
        self.pool: nn.Module = (nn.AvgPool2d(stride, stride) if avg_pool and stride != 1
                                else nn.Identity())
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            if avg_pool:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride=1, bias=False),
                    nn.AvgPool2d(stride, stride), _norm_layer(norm, planes))
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                    _norm_layer(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet of basic blocks, widths 64-128-256-512, global average pool, linear classifier.

    Args:
        layers: blocks per stage, ``(1, 1, 1, 1)`` = ResNet-10, ``(2, 2, 2, 2)`` = ResNet-18.
        norm: ``"instance"`` (``GroupNorm(C, C)``, IDC) or ``"batch"`` (torchvision).
        avg_pool: downsample by average pooling (IDC ResNet-AP) instead of strided convolutions.
        stem: ``"idc"`` -- IDC's size rule: <= 64 px ``conv3x3`` (stride 1, no pooling), <= 128 px
            ``conv3x3`` + pool, larger ``conv7x7`` + pool; the pool is ``MaxPool(3, 2, 1)`` with
            ``conv7x7`` stride 2 for the strided ResNet, and ``AvgPool(2)`` resp. ``conv7x7`` stride
            1 + ``AvgPool(4)`` for ResNet-AP. ``"torchvision"`` -- ``conv7x7/2`` + ``MaxPool(3, 2,
            1)`` above 64 px, and on <= 64 px the CIFAR-style ``conv3x3/1`` without max-pooling
            (RDED's ``resnet18_modified``).

    Init as both references: convolutions ``N(0, 2 / (k*k*out_channels))`` (kaiming, fan-out),
    norm weights 1 and biases 0, torch's default for the classifier. Parameter names are
    torchvision's (``conv1``, ``bn1``, ``layer1..4.<block>.{conv1,bn1,conv2,bn2,downsample.*}``,
    ``fc``), so a torchvision ``resnet18`` state_dict loads into ``resnet18_bn``.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int,
                 layers: tuple[int, ...] = (2, 2, 2, 2), norm: str = "batch",
                 avg_pool: bool = False, stem: str = "torchvision") -> None:
        super().__init__()
        if channels < 1 or num_classes < 1 or image_size < 1:
            raise ConfigError(f"ResNet needs positive channels/classes/image size, got "
                              f"channels={channels} classes={num_classes} size={image_size}")
        if norm not in ("instance", "batch") or stem not in ("idc", "torchvision"):
            raise ConfigError(f"unknown ResNet norm {norm!r} or stem {stem!r}")
        size = _size_class(image_size)
        if stem == "torchvision" and size == "mid":
            size = "large"
        if size == "small":
            self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
            stem_pool: nn.Module = nn.Identity()
        elif size == "mid":
            self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
            stem_pool = nn.AvgPool2d(2, 2) if avg_pool else nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(channels, 64, 7, stride=1 if avg_pool else 2, padding=3,
                                   bias=False)
            stem_pool = nn.AvgPool2d(4, 4) if avg_pool else nn.MaxPool2d(3, 2, 1)
        self.bn1 = _norm_layer(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = stem_pool
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(inplanes, planes, stride, norm, avg_pool))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes)
        self.stem = size
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled ``layer4`` features ``(n, 512)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


def _resnet_ap10(channels: int, num_classes: int, image_size: int) -> nn.Module:
    """IDC's ResNet-AP-10: blocks [1, 1, 1, 1], instance norm, average-pool downsampling."""
    return ResNet(channels, num_classes, image_size, (1, 1, 1, 1), "instance", True, "idc")


def _resnet18_in(channels: int, num_classes: int, image_size: int) -> nn.Module:
    """IDC's ResNet-18 with instance norm (``-n resnet --depth 18 --norm_type instance``)."""
    return ResNet(channels, num_classes, image_size, (2, 2, 2, 2), "instance", False, "idc")


def _resnet18_bn(channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-18 (BatchNorm); CIFAR-style stem on <= 64 px."""
    return ResNet(channels, num_classes, image_size, (2, 2, 2, 2), "batch", False, "torchvision")


def torchvision_resnet18_shapes(channels: int = 3, num_classes: int = 1000,
                                small_stem: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a torchvision ``resnet18().state_dict()`` (written out by hand, so tests
    and checkpoint checks need no torchvision). ``small_stem``: 3x3 ``conv1`` (RDED's modified)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{k}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    k = 3 if small_stem else 7
    shapes["conv1.weight"] = (64, channels, k, k)
    bn("bn1", 64)
    inplanes = 64
    for i, planes in enumerate((64, 128, 256, 512)):
        for b in range(2):
            p = f"layer{i + 1}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            if b == 0 and i > 0:
                shapes[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes)
            inplanes = planes
    shapes["fc.weight"] = (num_classes, 512)
    shapes["fc.bias"] = (num_classes,)
    return shapes
