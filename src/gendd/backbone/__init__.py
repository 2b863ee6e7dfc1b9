"""Latent diffusion backbone: model wrapper, sampling loop with hooks, DDIM inversion, training."""

from gendd.backbone.backbone import Backbone, BackboneMeta, tiny_backbone
from gendd.backbone.sampling import (GroupedGenerator, Hook, SamplerConfig, Schedule, StepState, ddim_invert,
                                     make_schedule, sample, standard_normal)

__all__ = ["Backbone", "BackboneMeta", "tiny_backbone", "GroupedGenerator", "Hook", "SamplerConfig", "Schedule",
           "StepState", "ddim_invert", "make_schedule", "sample", "standard_normal"]
