"""``random``: a seeded random subset of real images, IPC per class (the baseline of every table)."""

from __future__ import annotations

import torch

from gendd.data.base import to_float
from gendd.errors import DataError
from gendd.methods.base import ClassContext, ClassResult, Method, MethodConfig, register_method


@register_method
class RandomSubset(Method):
    """Draw ``ipc`` distinct images of the class uniformly without replacement."""

    name = "random"
    config_class = MethodConfig
    selects_real = True
    summary = "seeded random subset of real images"

    def distill_class(self, ctx: ClassContext) -> ClassResult:
        idx = ctx.dataset.class_indices(ctx.label)
        if ctx.ipc > len(idx):
            raise DataError(f"IPC {ctx.ipc} exceeds the {len(idx)} images of class {ctx.name!r}")
        pick = idx[torch.randperm(len(idx), generator=ctx.generator)[:ctx.ipc].numpy()]
        images = ctx.dataset.load(pick)
        latents = ctx.backbone.encode(to_float(images)) if ctx.backbone is not None else None
        return ClassResult(latents=latents, images=images, extra={"indices": [int(i) for i in pick]})
