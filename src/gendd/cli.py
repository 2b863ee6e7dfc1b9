"""The ``gendd`` command: a thin layer that parses options, builds configs and calls the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from gendd.errors import GenddError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="gendd: generative dataset distillation with latent diffusion models.",
                  context_settings={"show_default": True})
backbone_app = typer.Typer(no_args_is_help=True, help="Train, inspect and sample latent diffusion backbones.",
                           context_settings={"show_default": True})
app.add_typer(backbone_app, name="backbone")


@backbone_app.command("train")
def backbone_train(
    out: Path = typer.Option(..., help="Output folder (diffusers format); re-run to resume."),
    data: str = typer.Option("fashion-mnist", help="Dataset name (see `gendd datasets`)."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root folder (ImageFolder datasets)."),
    image_size: int = typer.Option(32, help="VAE input side; dataset images are padded to it."),
    vae_steps: int = typer.Option(400, help="VAE optimisation steps."),
    dit_steps: int = typer.Option(6000, help="DiT optimisation steps."),
    dit_layers: int = typer.Option(6, help="DiT depth."),
    dit_hidden: int = typer.Option(128, help="DiT width."),
    dit_heads: int = typer.Option(4, help="DiT attention heads."),
    cfg_scale: float = typer.Option(3.0, help="Default guidance scale stored with the backbone."),
    checkpoint_every: int = typer.Option(200, help="Steps between checkpoints."),
    seed: int = typer.Option(0, help="Seed of initialisation, batches and noise."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train a VAE, then a class-conditional DiT on its latents (resumable)."""
    from gendd.backbone.train import BackboneTrainConfig, train_backbone
    from gendd.data import get_dataset

    ds = get_dataset(data, "train", root=data_root)
    cfg = BackboneTrainConfig(image_size=image_size, vae_steps=vae_steps, dit_steps=dit_steps,
                              dit_layers=dit_layers, dit_hidden=dit_hidden, dit_heads=dit_heads,
                              default_cfg_scale=cfg_scale, checkpoint_every=checkpoint_every, seed=seed)
    train_backbone(ds, out, cfg, progress=not quiet)
    typer.echo(f"backbone written to {out}")


def main() -> None:
    """Entry point: GenddError -> one line on stderr, exit status 2."""
    try:
        app()
    except GenddError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
