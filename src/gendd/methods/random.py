"""``random``: a seeded random subset of real images, IPC per class (the baseline of every table)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from gendd.config import check
from gendd.data.base import to_float, to_uint8
from gendd.errors import DataError
from gendd.methods.base import ClassContext, ClassResult, Method, MethodConfig


@dataclass
class RandomConfig(MethodConfig):
    """Attributes: reconstruct (pass the chosen images through the backbone's VAE, posterior mean then
    decode: the same subset as plain ``random``, as a latent-space generator at best could give it; the
    reconstruction ceiling of ``gendd backbone quality``)."""

    config_what: ClassVar[str] = "random"

    reconstruct: bool = field(default=False, metadata=check(bool))


class RandomSubset(Method):
    """Draw ``ipc`` distinct images of the class uniformly without replacement."""

    name = "random"
    config_class = RandomConfig
    selects_real = True
    summary = "seeded random subset of real images"

    @property
    def needs_backbone(self) -> bool:  # type: ignore[override]
        return self.config.reconstruct

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        idx = ctx.dataset.class_indices(ctx.label)
        if ctx.ipc > len(idx):
            raise DataError(f"IPC {ctx.ipc} exceeds the {len(idx)} images of class {ctx.name!r}")
        pick = idx[torch.randperm(len(idx), generator=ctx.generator)[:ctx.ipc].numpy()]
        images = ctx.dataset.load(pick)
        latents = ctx.backbone.encode(to_float(images)) if ctx.backbone is not None else None
        if self.config.reconstruct:
            images = torch.cat([to_uint8(ctx.backbone.decode(latents[i:i + 64]))
                                for i in range(0, len(latents), 64)])
        return ClassResult(latents=latents, images=images, extra={"indices": [int(i) for i in pick]})
