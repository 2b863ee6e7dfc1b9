"""Student networks that evaluate a distilled set, and a small name -> builder registry.

``convnet3`` is the ConvNet of the DC/DSA/DM benchmark (Zhao et al., ICLR'21; reference
``VICO-UoE/DatasetCondensation``, ``networks.py`` ``ConvNet`` with ``get_default_convnet_setting``):
``depth`` blocks of ``conv3x3(width 128) -> instance norm (GroupNorm(128, 128), affine) -> ReLU ->
AvgPool2d(2)``, then ``flatten -> Linear(num_classes)``.

One detail of the reference is kept: for single-channel inputs the first convolution pads by 3
instead of 1, so a 28x28 image becomes 32x32 after it (28 + 2*3 - 2) and the feature map is
128 x 4 x 4 after three poolings, exactly as for 32x32 RGB inputs. The feature size is computed
from ``image_size``, so any square size whose feature map stays non-empty works.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gendd.errors import ConfigError

StudentBuilder = Callable[[int, int, int], nn.Module]

#: name -> ``builder(channels, num_classes, image_size)``; fill it with :func:`register_student`.
STUDENTS: dict[str, StudentBuilder] = {}


def register_student(name: str) -> Callable[[StudentBuilder], StudentBuilder]:
    """Decorator: register ``builder(channels, num_classes, image_size) -> nn.Module`` as ``name``."""

    def deco(builder: StudentBuilder) -> StudentBuilder:
        if name in STUDENTS:
            raise ConfigError(f"student {name!r} is registered twice; pick another name")
        STUDENTS[name] = builder
        return builder

    return deco


def build_student(name: str, channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised student (torch's default init, drawn from the global RNG).

    Seed it by calling this inside ``torch.random.fork_rng()`` after ``torch.manual_seed``.
    """
    try:
        builder = STUDENTS[name]
    except KeyError:
        raise ConfigError(f"unknown student {name!r}; choose one of {sorted(STUDENTS)}") from None
    return builder(channels, num_classes, image_size)


class ConvNet(nn.Module):
    """DC's ConvNet: ``depth`` x [conv3x3 -> instance norm -> ReLU -> avgpool2] -> linear.

    Shapes: first conv pads ``3`` if ``channels == 1`` else ``1`` (reference rule), so its output
    side is ``s1 = image_size + 2*pad - 2``; each block then halves it (floor), giving
    ``s_d = s1 // 2**depth`` and ``width * s_d**2`` features for the classifier.
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
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
            side //= 2
            in_ch = width
        if side < 1:
            raise ConfigError(f"images of {image_size}px are too small for a depth-{depth} "
                              f"ConvNet (feature map vanishes); use a shallower student")
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


# Depth 3 is the 28/32 px benchmark student; 4, 5 and 6 are the usual choices for 64, 128 and
# 256 px in later DD work (depth 6 needs images of at least 64 px).
for _depth in (3, 4, 5, 6):
    register_student(f"convnet{_depth}")(_convnet_builder(_depth))
del _depth
