"""Latent diffusion backbones: what they share (:class:`LatentBackbone`) and the class-conditional DiT.

The same :class:`Backbone` serves ``facebook/DiT-XL-2-256`` (+ ``stabilityai/sd-vae-ft-ema``/``-mse``)
and the small backbones gendd trains itself. On disk it is a diffusers ``DiTPipeline`` folder::

    model_index.json  transformer/  vae/  scheduler/  [gendd_backbone.json]

``gendd_backbone.json`` holds what diffusers does not store (image geometry, padding applied to the
dataset images, class names); it is optional, so a plain hub folder loads too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gendd.errors import ConfigError

BACKBONE_META = "gendd_backbone.json"
#: Optional file of a backbone folder: :class:`gendd.backbone.finetune.FinetuneConfig` options that suit
#: this backbone (e.g. a step count for a small DiT); applied where the user sets nothing else.
FINETUNE_DEFAULTS = "gendd_finetune.json"


@dataclass
class BackboneMeta:
    """Facts about a backbone that diffusers' configs do not carry.

    Attributes:
        image_size: side of the square images the VAE encodes (after ``pad``).
        channels: image channels the VAE expects.
        pad: pixels of constant padding added on every side of a dataset image to reach
            ``image_size`` (Fashion-MNIST 28 -> 32 uses ``pad=2``); export crops them off again.
        pad_value: value of the padding in [-1, 1] units.
        class_names: optional names of the conditioning classes.
        default_cfg_scale: the guidance scale methods use unless told otherwise (4.0 for DiT-XL/2).
        default_cfg_interval: the noise-level interval ``[lo, hi]`` of that guidance
            (:attr:`gendd.backbone.sampling.SamplerConfig.cfg_interval`); None = every step.
        source: free-text provenance (training command, hub id).
    """

    image_size: int = 256
    channels: int = 3
    pad: int = 0
    pad_value: float = -1.0
    class_names: list[str] = field(default_factory=list)
    default_cfg_scale: float = 4.0
    default_cfg_interval: list[float] | None = None
    source: str = ""


def _diffusers():
    # Imported lazily: diffusers takes ~3 s to import and most CLI commands never need it.
    import diffusers

    return diffusers


#: Autocast dtypes of :meth:`LatentBackbone.set_execution` (``fp32``: no autocast).
EXECUTION_PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class LatentBackbone(torch.nn.Module):
    """What every latent diffusion backbone shares: a VAE, the training noise schedule, the latent
    geometry, and classifier-free guidance over a denoiser's noise prediction.

    Notation (DDPM, Ho et al. 2020): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with
    ``abar_t = prod_{s<=t} (1 - beta_s)``. Latents are ``z = scaling_factor * VAE.encode(x)``.
    A subclass provides the denoiser (:attr:`denoiser`, :meth:`model_output`), the label that selects
    the unconditional prediction (:attr:`null_label`) and the image geometry around the VAE
    (:meth:`to_vae_images`, :meth:`from_vae_images`).
    """

    #: True for backbones conditioned on text prompts (:class:`gendd.backbone.text.TextBackbone`).
    text_conditioned: bool = False
    #: Autocast of the denoiser's forward (:meth:`set_execution`): ``fp32`` (none), ``bf16`` or ``fp16``.
    precision: str = "fp32"
    _compiled: Any = None

    def __init__(self, vae, scheduler_config: dict[str, Any], meta: BackboneMeta) -> None:
        super().__init__()
        self.vae = vae
        self.meta = meta
        # normalised to the full DDPMScheduler config, so a saved-and-loaded backbone hashes the same
        self.scheduler_config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        self.scheduler_config = {k: v for k, v in self.make_scheduler("ddpm").config.items()
                                 if not k.startswith("_")}
        #: fine-tuning defaults carried by the folder (:data:`FINETUNE_DEFAULTS`); not part of the hash
        self.finetune_defaults: dict[str, Any] = {}
        sched = self.make_scheduler("ddpm")
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.to(torch.float64), persistent=False)

    @property
    def denoiser(self) -> torch.nn.Module:  # pragma: no cover - abstract
        """The noise-predicting network (its parameters set :attr:`device` and :attr:`dtype`)."""
        raise NotImplementedError

    def set_execution(self, precision: str = "fp32", compile: bool = False) -> "LatentBackbone":
        """How the denoiser runs while sampling and inverting (GPU throughput).

        ``precision``: ``bf16`` / ``fp16`` autocast of its forward (its outputs are cast back to float32 and
        the sampler's update stays float32). It changes the numbers, so a run's identity records it.
        ``compile``: run it through ``torch.compile`` (the same operations, fused; not part of any identity).
        The weights and :meth:`content_hash` are unchanged.
        """
        if precision not in EXECUTION_PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(EXECUTION_PRECISIONS)}, got {precision!r}")
        self.precision = precision
        # not a registered submodule: the backbone's state_dict and hash stay those of its weights
        object.__setattr__(self, "_compiled", torch.compile(self.denoiser) if compile else None)
        return self

    def run_denoiser(self, *args: Any, **kwargs: Any) -> Any:
        """The denoiser's forward under :meth:`set_execution`'s precision (and compilation)."""
        net = self._compiled if self._compiled is not None else self.denoiser
        if self.precision == "fp32":
            return net(*args, **kwargs)
        with torch.autocast(self.device.type, dtype=EXECUTION_PRECISIONS[self.precision]):
            return net(*args, **kwargs)

    def execution(self) -> dict[str, Any]:
        """What of :meth:`set_execution` changes numbers (empty for float32, so older identities hold)."""
        return {} if self.precision == "fp32" else {"precision": self.precision}

    # ------------------------------------------------------------------ geometry
    @property
    def vae_downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.meta.image_size // self.vae_downsample_factor
        return (self.latent_channels, s, s)

    @property
    def learned_sigma(self) -> bool:
        """True when the denoiser also outputs the variance interpolation ``v`` (DiT-XL/2: 8 channels)."""
        return int(self.denoiser.config.out_channels) == 2 * self.latent_channels

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def make_scheduler(self, kind: str):
        """A fresh diffusers scheduler (``ddpm``, ``ddim`` or ``ddim-inverse``) from the stored config."""
        d = _diffusers()
        cls = {"ddpm": d.DDPMScheduler, "ddim": d.DDIMScheduler,
               "ddim-inverse": d.DDIMInverseScheduler}.get(kind)
        if cls is None:
            raise ConfigError(f"unknown scheduler kind {kind!r}; use ddpm, ddim or ddim-inverse")
        return cls.from_config(self.scheduler_config)

    # ------------------------------------------------------------------ VAE
    def to_vae_images(self, x: torch.Tensor) -> torch.Tensor:
        """Dataset images in [-1, 1] -> the VAE's input geometry."""
        return x

    def from_vae_images(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_vae_images` (the VAE's output -> dataset geometry)."""
        return x

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False) -> torch.Tensor:
        """``z = scaling_factor * E(x)``; the posterior mean, or a sample when ``sample=True``.

        ``x`` is in [-1, 1] at dataset geometry (:meth:`to_vae_images` is applied here).
        """
        x = self.to_vae_images(x.to(self.device, self.vae.dtype))
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return (z * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``x = D(z / scaling_factor)`` in [-1, 1] (not clamped), at dataset geometry."""
        x = self.vae.decode(z.to(self.device, self.vae.dtype) / self.scaling_factor).sample
        return self.from_vae_images(x.float())

    # ------------------------------------------------------------------ denoiser
    @property
    def null_label(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def model_output(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Raw denoiser output ``(B, out_channels, h, w)`` at timesteps ``t`` (B,) and labels ``y`` (B,),
        whose first ``latent_channels`` channels are the noise prediction."""
        raise NotImplementedError

    def predict(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float = 1.0,
                cfg_channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noise prediction with classifier-free guidance (Ho & Salimans 2022).

        ``eps = eps_u + s (eps_c - eps_u)`` with ``eps_u`` the prediction for :attr:`null_label`.
        ``cfg_channels=3`` reproduces DiT's ``forward_with_cfg`` quirk (guidance on the first three
        latent channels only, conditional prediction elsewhere). ``s = 1`` skips the unconditional
        pass, so it equals the conditional prediction exactly.

        Returns ``(eps, v)`` where ``v`` is the learned variance interpolation of the conditional
        prediction (in [-1, 1] units of DiT's ``LEARNED_RANGE``) or None for eps-only models.
        """
        c = self.latent_channels
        if cfg_scale == 1.0:
            out = self.model_output(z, t, y)
            eps = out[:, :c]
        else:
            n = z.shape[0]
            tt = t.reshape(-1).expand(n) if t.numel() == 1 else t
            out2 = self.model_output(torch.cat([z, z]), torch.cat([tt, tt]),
                                     torch.cat([y.to(self.device), torch.full_like(y, self.null_label).to(self.device)]))
            out, out_u = out2[:n], out2[n:]
            eps_c, eps_u = out[:, :c], out_u[:, :c]
            k = c if cfg_channels is None else cfg_channels
            guided = eps_u[:, :k] + cfg_scale * (eps_c[:, :k] - eps_u[:, :k])
            eps = torch.cat([guided, eps_c[:, k:]], dim=1)
        v = out[:, c:2 * c] if self.learned_sigma else None
        return eps, v

    def condition_key(self, model_label: int) -> Any:
        """What conditions class ``model_label`` beyond its label (a text backbone's prompts), for keys of
        stored per-class results; None for a class-conditional backbone."""
        return None

    def for_dataset(self, dataset, *, prompt: str | None = None, negative_prompt: str | None = None):
        """The backbone to distil ``dataset`` with. A class-conditional backbone is itself (prompts do not
        apply to it); a text backbone encodes one prompt per class (:mod:`gendd.backbone.text`)."""
        if prompt is not None or negative_prompt is not None:
            raise ConfigError("prompt and negative_prompt apply to text-to-image backbones; this backbone is "
                              "class-conditional (leave them unset)")
        return self

    # ------------------------------------------------------------------ identity
    def components(self) -> list[tuple[str, torch.nn.Module]]:
        """The named networks that make the backbone (hashed by :meth:`content_hash`)."""
        return [("vae", self.vae)]

    def _hashed_extra(self) -> list[Any]:
        return []

    def content_hash(self) -> str:
        """sha256 (16 hex) of every weight and config; identifies the backbone in caches/manifests."""
        h = hashlib.sha256()
        for name, module in self.components():
            config = module.config if isinstance(module.config, dict) else module.config.to_dict()
            config = {k: v for k, v in config.items() if not k.startswith("_")}
            h.update(json.dumps(config, sort_keys=True, default=str).encode())
            for k, v in sorted(module.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        h.update(json.dumps(self.scheduler_config, sort_keys=True, default=str).encode())
        # unset (None) fields are left out, so a field added later keeps every earlier backbone's hash
        meta = {k: v for k, v in asdict(self.meta).items() if v is not None}
        h.update(json.dumps(meta, sort_keys=True).encode())
        for extra in self._hashed_extra():
            h.update(json.dumps(extra, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


class Backbone(LatentBackbone):
    """VAE + class-conditional DiT + training noise schedule (see :class:`LatentBackbone`)."""

    def __init__(self, vae, transformer, scheduler_config: dict[str, Any],
                 meta: BackboneMeta | None = None) -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        meta = meta or BackboneMeta(image_size=int(transformer.config.sample_size) * factor,
                                    channels=int(vae.config.in_channels))
        super().__init__(vae, scheduler_config, meta)
        self.transformer = transformer

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def num_classes(self) -> int:
        """Conditioning classes; the null (unconditional) label is ``num_classes``."""
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.transformer.config.sample_size)
        return (self.latent_channels, s, s)

    def to_vae_images(self, x: torch.Tensor) -> torch.Tensor:
        """Constant padding of ``meta.pad`` pixels on every side."""
        p = self.meta.pad
        if p:
            x = torch.nn.functional.pad(x, (p, p, p, p), value=self.meta.pad_value)
        return x

    def from_vae_images(self, x: torch.Tensor) -> torch.Tensor:
        p = self.meta.pad
        return x[..., p:x.shape[-2] - p, p:x.shape[-1] - p] if p else x

    def model_output(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device).reshape(-1).expand(z.shape[0]) if t.numel() == 1 else t.to(self.device)
        return self.run_denoiser(z.to(self.device, self.dtype), timestep=t,
                                 class_labels=y.to(self.device)).sample.float()

    def components(self) -> list[tuple[str, torch.nn.Module]]:
        return [("vae", self.vae), ("transformer", self.transformer)]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a diffusers ``DiTPipeline`` folder (+ ``gendd_backbone.json``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(path / "transformer")
        self.vae.save_pretrained(path / "vae")
        self.make_scheduler("ddpm").save_pretrained(path / "scheduler")
        d = _diffusers()
        index = {"_class_name": "DiTPipeline", "_diffusers_version": d.__version__,
                 "scheduler": ["diffusers", "DDPMScheduler"],
                 "transformer": ["diffusers", "DiTTransformer2DModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        if self.meta.class_names:
            index["id2label"] = {str(i): n for i, n in enumerate(self.meta.class_names)}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        (path / BACKBONE_META).write_text(json.dumps(asdict(self.meta), indent=2))
        if self.finetune_defaults:
            (path / FINETUNE_DEFAULTS).write_text(json.dumps(self.finetune_defaults, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, vae: str | os.PathLike | None = None,
                        torch_dtype: torch.dtype = torch.float32, **meta_overrides: Any) -> "Backbone":
        """Load a diffusers DiT folder (local path or hub id already in the local cache).

        Args:
            path: folder with ``transformer/`` (and usually ``vae/``, ``scheduler/``).
            vae: a separate ``AutoencoderKL`` folder, e.g. ``stabilityai/sd-vae-ft-ema``; it
                overrides ``path/vae``.
            meta_overrides: fields of :class:`BackboneMeta` to override.
        """
        d = _diffusers()
        root = Path(path)
        if not root.exists() and not str(path).count("/") == 1:
            raise ConfigError(f"backbone folder {str(path)!r} does not exist; pass a diffusers DiT "
                              "folder (e.g. a local copy of facebook/DiT-XL-2-256)")
        if root.exists() and not (root / "transformer").is_dir():
            raise ConfigError(f"{root} has no transformer/ subfolder; it is not a diffusers DiT folder")
        transformer = d.DiTTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                              torch_dtype=torch_dtype)
        if vae is not None:
            vae_model = d.AutoencoderKL.from_pretrained(vae, torch_dtype=torch_dtype)
        else:
            vae_model = d.AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch_dtype)
        sched_file = root / "scheduler" / "scheduler_config.json"
        if root.exists() and sched_file.exists():
            sched_cfg = json.loads(sched_file.read_text())
        else:  # DiT's training schedule (Peebles & Xie 2023): linear betas 1e-4..0.02, 1000 steps
            sched_cfg = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                         "beta_schedule": "linear"}
        sched_cfg = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
        meta = None
        meta_file = root / BACKBONE_META
        if root.exists() and meta_file.exists():
            meta = BackboneMeta(**json.loads(meta_file.read_text()))
        bb = cls(vae_model.eval(), transformer.eval(), sched_cfg, meta)
        for k, v in meta_overrides.items():
            setattr(bb.meta, k, v)
        bb.finetune_defaults = read_finetune_defaults(root)
        bb.source_path = str(path)
        return bb


def read_finetune_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """The :data:`FINETUNE_DEFAULTS` options of a backbone folder (``{}`` if it has none)."""
    f = Path(path) / FINETUNE_DEFAULTS
    return dict(json.loads(f.read_text())) if f.is_file() else {}


def tiny_backbone(num_classes: int = 10, image_size: int = 32, channels: int = 1,
                  latent_channels: int = 4, hidden: int = 64, layers: int = 2, heads: int = 2,
                  learned_sigma: bool = False, pad: int = 0, vae_channels: tuple[int, ...] = (32, 32, 32),
                  seed: int = 0, scaling_factor: float = 1.0) -> Backbone:
    """A small random-init backbone built from config (tests, and the start of training).

    The VAE downsamples by ``2 ** (len(vae_channels) - 1)``; the DiT uses patch size 2.
    """
    d = _diffusers()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        n = len(vae_channels)
        vae = d.AutoencoderKL(in_channels=channels, out_channels=channels,
                              down_block_types=("DownEncoderBlock2D",) * n,
                              up_block_types=("UpDecoderBlock2D",) * n,
                              block_out_channels=tuple(vae_channels), layers_per_block=1,
                              latent_channels=latent_channels, norm_num_groups=min(32, min(vae_channels)),
                              sample_size=image_size, scaling_factor=scaling_factor)
        latent = image_size // 2 ** (n - 1)
        dit = d.DiTTransformer2DModel(sample_size=latent, in_channels=latent_channels,
                                      out_channels=latent_channels * (2 if learned_sigma else 1),
                                      patch_size=2, num_layers=layers, num_attention_heads=heads,
                                      attention_head_dim=hidden // heads, num_embeds_ada_norm=num_classes,
                                      norm_num_groups=32)
    sched = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
             "clip_sample": False}
    meta = BackboneMeta(image_size=image_size, channels=channels, pad=pad)
    return Backbone(vae.eval(), dit.eval(), sched, meta)
