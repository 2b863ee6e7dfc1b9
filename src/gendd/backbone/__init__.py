"""Latent diffusion backbone: model wrapper, sampling loop with hooks, DDIM inversion, training."""

from gendd.backbone.backbone import Backbone, BackboneMeta, tiny_backbone
from gendd.backbone.sampling import (Hook, SamplerConfig, Schedule, StepState, ddim_invert, make_schedule,
                                     sample)

__all__ = ["Backbone", "BackboneMeta", "tiny_backbone", "Hook", "SamplerConfig", "Schedule", "StepState",
           "ddim_invert", "make_schedule", "sample"]
