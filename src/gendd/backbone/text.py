"""Text-to-image backbone: Stable Diffusion's VAE + ``UNet2DConditionModel`` + CLIP text encoder.

The same sampling loop, DDIM inversion and latent cache as the DiT path run on it, because it answers the
same calls: :meth:`TextBackbone.predict` gives the (CFG-guided) noise prediction for a latent, a timestep
and a *label*. A label stands for a prompt: :meth:`TextBackbone.for_dataset` encodes one prompt per class
of the dataset (model label -> row of prompt embeddings) and the unconditional branch of CFG uses the
negative prompt, or the empty prompt when there is none (diffusers' ``StableDiffusionPipeline``).

Prompts come from a template per class, ``"{name}"`` by default (the references pass bare class names):

* ``{name}``: the class name — for ImageNet WNID folders the first lemma of the ILSVRC-2012 class
  ("tench" for ``n01440764``), else the folder / class name with ``_`` as a space;
* ``{names}``: every lemma of an ImageNet class ("tench, Tinca tinca", the line D4M prompts with);
* ``{wnid}``: the class folder name as it is.

Geometry. SD's VAE is RGB at ``meta.image_size`` px (the UNet's ``sample_size`` times 8: 512 for v1.5,
768 for 2.x-768; a ``gendd_backbone.json`` in the folder may lower it, e.g. ``{"image_size": 256}``).
Dataset images are resized to it (bilinear; D4M resizes with torchvision's ``Resize((512, 512))``) and a
grayscale image enters as three equal channels; decoded images are resized back to the dataset's side
(bilinear with antialiasing) and a grayscale dataset gets the luma ``0.299 R + 0.587 G + 0.114 B`` (ITU-R
BT.601, PIL's ``convert("L")``). :meth:`TextBackbone.geometry` records it in the manifest.

``v_prediction`` UNets (SD 2.x at 768 px) are turned into noise predictions,
``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t`` (Salimans & Ho 2022).

On disk: a diffusers ``StableDiffusionPipeline`` folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; v1.x and 2.x share the layout); the safety checker and
feature extractor are not loaded. gendd downloads nothing: a hub id is looked up in the local cache only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gendd.backbone.backbone import BACKBONE_META, BackboneMeta, LatentBackbone, _diffusers
from gendd.errors import ConfigError

#: CFG scale of the text-to-image references (D4M's and the SD MGD3 code's guidance 8).
TEXT_CFG_SCALE = 8.0
DEFAULT_PROMPT = "{name}"
#: ITU-R BT.601 luma weights (PIL's ``convert("L")``).
LUMA = (0.299, 0.587, 0.114)
_TEMPLATE_FIELDS = ("name", "names", "wnid")


def is_text_backbone_folder(path: str | os.PathLike) -> bool:
    """A diffusers Stable Diffusion folder: it has ``unet/`` (a DiT folder has ``transformer/``)."""
    return (Path(path) / "unet").is_dir()


@functools.lru_cache(maxsize=1)
def imagenet_lemmas() -> dict[str, str]:
    """WNID -> the ILSVRC-2012 class's WordNet lemmas (``data/subsets/imagenet1k_names.txt``)."""
    path = Path(__file__).resolve().parents[1] / "data" / "subsets" / "imagenet1k_names.txt"
    pairs = (line.split("\t", 1) for line in path.read_text().splitlines() if line.strip())
    return {wnid: names for wnid, names in pairs}


def class_prompt_fields(class_name: str) -> dict[str, str]:
    """The template fields of one class (module docstring)."""
    lemmas = imagenet_lemmas().get(class_name)
    if lemmas is not None:
        return {"name": lemmas.split(",")[0].strip(), "names": lemmas, "wnid": class_name}
    plain = class_name.replace("_", " ")
    return {"name": plain, "names": plain, "wnid": class_name}


def check_prompt_template(template: str) -> None:
    """A ``str.format`` template over :data:`_TEMPLATE_FIELDS`; raises ConfigError otherwise."""
    try:
        template.format(**{k: "x" for k in _TEMPLATE_FIELDS})
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"prompt template {template!r} is not valid: use the fields "
                          f"{', '.join('{' + k + '}' for k in _TEMPLATE_FIELDS)} ({err})") from None


def class_prompts(class_names: list[str], template: str | None) -> list[str]:
    template = DEFAULT_PROMPT if template is None else template
    check_prompt_template(template)
    return [template.format(**class_prompt_fields(n)) for n in class_names]


@contextlib.contextmanager
def _quiet_transformers():
    """transformers draws a progress bar per loaded model; gendd's own progress is enough."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


class TextBackbone(LatentBackbone):
    """Stable Diffusion as a backbone (module docstring): VAE + UNet + CLIP text encoder + tokenizer.

    Unbound (as loaded) it encodes and decodes at the VAE's geometry and has no prompts;
    :meth:`for_dataset` returns a bound copy (the same modules) with one prompt per class and the
    dataset's geometry, which is what the methods sample with.
    """

    text_conditioned = True

    def __init__(self, vae, unet, text_encoder, tokenizer, scheduler_config: dict[str, Any],
                 meta: BackboneMeta | None = None) -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        meta = meta or BackboneMeta(image_size=int(unet.config.sample_size) * factor,
                                    channels=int(vae.config.in_channels), default_cfg_scale=TEXT_CFG_SCALE)
        super().__init__(vae, scheduler_config, meta)
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.prediction_type = str(self.scheduler_config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type {self.prediction_type!r} of the scheduler is not supported; "
                              "gendd samples epsilon and v_prediction models")
        # bound state (for_dataset)
        self.model_labels: list[int] = []
        self.prompts: list[str] = []
        self.negative_prompt: str | None = None
        self.output_size: int | None = None
        self.output_channels: int | None = None
        self.register_buffer("_embeds", torch.zeros(0), persistent=False)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def num_classes(self) -> int:
        """Prompts bound by :meth:`for_dataset` (0 before)."""
        return len(self.prompts)

    @property
    def null_label(self) -> int:
        """The label of the negative (or empty) prompt: the unconditional branch of CFG."""
        return -1

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP's last hidden state per prompt, padded to the tokenizer's ``model_max_length`` (as the
        Stable Diffusion pipelines do): ``(n, L, D)`` float32."""
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        dev = next(self.text_encoder.parameters()).device
        return self.text_encoder(tok.input_ids.to(dev)).last_hidden_state.float()

    def for_dataset(self, dataset, *, prompt: str | None = None, negative_prompt: str | None = None):
        """A copy bound to ``dataset``: one prompt per class from the template ``prompt`` (default
        ``"{name}"``), ``negative_prompt`` for the unconditional branch (None: the empty prompt), and
        decoding to the dataset's side and channels."""
        prompts = class_prompts(list(dataset.classes), prompt)
        bound = TextBackbone(self.vae, self.unet, self.text_encoder, self.tokenizer, self.scheduler_config,
                             self.meta)
        bound.finetune_defaults, bound.source_path = self.finetune_defaults, getattr(self, "source_path", None)
        bound.model_labels = [int(y) for y in dataset.model_labels]
        bound.prompts, bound.negative_prompt = prompts, negative_prompt
        bound.output_size, bound.output_channels = int(dataset.image_size), int(dataset.channels)
        if dataset.channels not in (1, self.meta.channels):
            raise ConfigError(f"{dataset.name} has {dataset.channels} channels; the text-to-image backbone takes "
                              f"grayscale or {self.meta.channels}-channel images")
        bound._embeds = self.encode_prompts(prompts + [negative_prompt or ""]).to(self.device)
        return bound

    def condition_key(self, model_label: int) -> Any:
        return {"prompt": self.prompts[self._row(model_label)], "negative_prompt": self.negative_prompt}

    def _row(self, model_label: int) -> int:
        try:
            return self.model_labels.index(int(model_label))
        except ValueError:
            raise ConfigError(f"label {model_label} has no prompt; bind the backbone to the dataset first "
                              "(TextBackbone.for_dataset)") from None

    def _rows(self, y: torch.Tensor) -> torch.Tensor:
        if not self.prompts:
            raise ConfigError("this text-to-image backbone has no prompts yet; bind it to a dataset with "
                              "for_dataset(dataset)")
        table = {lab: i for i, lab in enumerate(self.model_labels)}
        table[self.null_label] = len(self.prompts)
        try:
            return torch.tensor([table[int(v)] for v in y.tolist()], dtype=torch.long)
        except KeyError as err:
            raise ConfigError(f"label {err.args[0]} has no prompt in this backbone") from None

    def model_output(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device).reshape(-1).expand(z.shape[0]) if t.numel() == 1 else t.to(self.device)
        cond = self._embeds[self._rows(y).to(self._embeds.device)].to(self.device, self.dtype)
        out = self.run_denoiser(z.to(self.device, self.dtype), t, encoder_hidden_states=cond).sample.float()
        if self.prediction_type == "v_prediction":
            abar = self.alphas_cumprod.to(self.device)[t.long()].float().view(-1, 1, 1, 1)
            out = abar.sqrt() * out + (1 - abar).sqrt() * z.to(self.device, torch.float32)
        return out

    # ------------------------------------------------------------------ geometry
    def to_vae_images(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.meta.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        side = self.meta.image_size
        if x.shape[-1] != side or x.shape[-2] != side:
            x = torch.nn.functional.interpolate(x.float(), size=(side, side), mode="bilinear",
                                                align_corners=False, antialias=side < x.shape[-1]).to(x.dtype)
        return x

    def from_vae_images(self, x: torch.Tensor) -> torch.Tensor:
        side = self.output_size
        if side is not None and (x.shape[-1] != side or x.shape[-2] != side):
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False,
                                                antialias=side < x.shape[-1])
        if self.output_channels == 1 and x.shape[1] == 3:
            w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
        return x

    def geometry(self) -> dict[str, Any]:
        """How dataset images enter the VAE and leave it (recorded in a manifest)."""
        gray = self.output_channels == 1 and self.meta.channels == 3
        return {"vae_side": self.meta.image_size, "output_side": self.output_size,
                "resize_in": "bilinear", "resize_out": "bilinear, antialiased",
                "channels_in": "grayscale as 3 equal channels" if gray else "as is",
                "channels_out": "luma 0.299 R + 0.587 G + 0.114 B" if gray else "as is"}

    # ------------------------------------------------------------------ identity and persistence
    def components(self) -> list[tuple[str, torch.nn.Module]]:
        return [("vae", self.vae), ("unet", self.unet), ("text_encoder", self.text_encoder)]

    def _hashed_extra(self) -> list[Any]:
        vocab = self.tokenizer.get_vocab()
        return [{"tokenizer": type(self.tokenizer).__name__, "max_length": int(self.tokenizer.model_max_length),
                 "vocab": sorted(vocab.items())}]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a diffusers ``StableDiffusionPipeline`` folder (+ ``gendd_backbone.json``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with _quiet_transformers():
            self.unet.save_pretrained(path / "unet")
            self.vae.save_pretrained(path / "vae")
            self.text_encoder.save_pretrained(path / "text_encoder")
            self.tokenizer.save_pretrained(path / "tokenizer")
        self.make_scheduler("ddpm").save_pretrained(path / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers().__version__,
                 "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"]}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        (path / BACKBONE_META).write_text(json.dumps(asdict(self.meta), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, vae: str | os.PathLike | None = None,
                        torch_dtype: torch.dtype = torch.float32, **meta_overrides: Any) -> "TextBackbone":
        """Load a local diffusers Stable Diffusion folder (v1.x / 2.x layout; ``vae`` replaces its VAE)."""
        root = Path(path)
        for sub in ("unet", "vae", "text_encoder", "tokenizer"):
            if sub == "vae" and vae is not None:
                continue
            if not (root / sub).is_dir():
                what = {"text_encoder": "a CLIP text encoder", "tokenizer": "a CLIP tokenizer"}.get(sub, sub)
                raise ConfigError(f"{root} has no {sub}/ folder ({what}); a text-to-image backbone is a "
                                  "diffusers Stable Diffusion folder with unet/, vae/, text_encoder/ and tokenizer/")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:  # pragma: no cover - a declared dependency
            raise ConfigError("text-to-image backbones need the transformers package: pip install transformers") \
                from None
        d = _diffusers()
        unet = d.UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch_dtype)
        vae_model = (d.AutoencoderKL.from_pretrained(vae, torch_dtype=torch_dtype) if vae is not None else
                     d.AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch_dtype))
        with _quiet_transformers():
            text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=torch_dtype)
            tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        sched_file = root / "scheduler" / "scheduler_config.json"
        if sched_file.exists():
            sched_cfg = json.loads(sched_file.read_text())
        else:  # Stable Diffusion's training schedule: scaled-linear betas 0.00085..0.012, 1000 steps
            sched_cfg = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                         "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False,
                         "clip_sample": False}
        meta = None
        if (root / BACKBONE_META).exists():
            fields = json.loads((root / BACKBONE_META).read_text())
            factor = 2 ** (len(vae_model.config.block_out_channels) - 1)
            base = BackboneMeta(image_size=int(unet.config.sample_size) * factor,
                                channels=int(vae_model.config.in_channels), default_cfg_scale=TEXT_CFG_SCALE)
            meta = BackboneMeta(**{**asdict(base), **fields})
        bb = cls(vae_model.eval(), unet.eval(), text_encoder.eval(), tokenizer, sched_cfg, meta)
        for k, v in meta_overrides.items():
            setattr(bb.meta, k, v)
        if bb.meta.image_size % bb.vae_downsample_factor:
            raise ConfigError(f"image_size {bb.meta.image_size} is not a multiple of the VAE's downsampling "
                              f"factor {bb.vae_downsample_factor}")
        bb.source_path = str(path)
        return bb


def tiny_text_backbone(image_size: int = 32, latent_channels: int = 4, vae_channels: tuple[int, ...] = (16, 16),
                       unet_channels: tuple[int, ...] = (16, 32), text_dim: int = 16, max_length: int = 12,
                       vocabulary: str | os.PathLike | None = None, prediction_type: str = "epsilon",
                       seed: int = 0) -> TextBackbone:
    """A small random-init Stable-Diffusion-shaped backbone (tests): a tokenizer from ``vocabulary`` (a
    folder with ``vocab.json`` and ``merges.txt``; a byte-level one is written to a temporary folder when
    None), a 2-layer CLIP text model, a UNet with cross-attention and an RGB VAE."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = _diffusers()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(vocabulary) if vocabulary is not None else write_byte_vocabulary(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        n = len(vae_channels)
        vae = d.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                              up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(vae_channels),
                              layers_per_block=1, latent_channels=latent_channels,
                              norm_num_groups=min(8, min(vae_channels)), sample_size=image_size,
                              scaling_factor=0.18215)
        k = len(unet_channels)
        unet = d.UNet2DConditionModel(sample_size=image_size // 2 ** (n - 1), in_channels=latent_channels,
                                      out_channels=latent_channels, layers_per_block=1,
                                      block_out_channels=tuple(unet_channels),
                                      down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (k - 1),
                                      up_block_types=("UpBlock2D",) * (k - 1) + ("CrossAttnUpBlock2D",),
                                      cross_attention_dim=text_dim, attention_head_dim=4,
                                      norm_num_groups=min(8, min(unet_channels)))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=max_length,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"]))
    sched = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "prediction_type": prediction_type}
    return TextBackbone(vae.eval(), unet.eval(), text_encoder.eval(), tokenizer, sched)


def write_byte_vocabulary(folder: Path, merges: tuple[str, ...] = ("t r", "o u", "s e")) -> Path:
    """A CLIP byte-level BPE vocabulary (``vocab.json``, ``merges.txt``) with every byte, its end-of-word form,
    a few merges and the two special tokens: enough to tokenize any prompt (tests; no download)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + \
            ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder
