"""gendd: generative dataset distillation with latent diffusion models."""

__version__ = "0.1.0"
