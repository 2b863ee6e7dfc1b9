"""Train gendd's own backbone: first the VAE, then a class-conditional DiT on its latents.

Stage 1 (VAE, Kingma & Welling 2014): ``L = ||D(E(x)) - x||^2 + kl_weight * KL(q(z|x) || N(0, I))``.
The latent scaling factor is then set to ``1 / std(z)`` over the training set (the role 0.18215
plays for Stable Diffusion's VAE), so latents have unit variance.

Stage 2 (DiT, Peebles & Xie 2023; DDPM eps-objective, Ho et al. 2020):
``L = E_{t, eps} ||eps - eps_theta(sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t, y)||^2`` with the label
replaced by the null label with probability ``label_dropout`` (classifier-free guidance training).
Weights used for sampling are an exponential moving average of the trained ones.

Learning rates are constant (v1) or follow a cosine decay to zero over the stage's steps,
``lr_t = lr * (1 + cos(pi * t / T)) / 2`` (Loshchilov & Hutter 2017, without restarts).

Training runs where :func:`gendd.distributed.default_device` says (``$GENDD_DEVICE``, else the GPU when there is
one); batches, noise and label dropout are drawn on the CPU, so a run draws the same batches on any device and
resumes on another one. Both stages checkpoint every ``checkpoint_every`` steps (model, EMA, optimiser, RNG, step) with an
atomic rename, and resume from the last checkpoint when re-run with the same output folder. The finished VAE
(with its scaling factor) is written to ``checkpoints/vae`` before the DiT stage starts, so it can be measured
(``gendd backbone quality --set vae=...``) while the DiT trains.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from gendd.backbone.backbone import Backbone, BackboneMeta, _diffusers
from gendd.config import Validated, check
from gendd.data.base import ImageDataset, to_float
from gendd.distributed import default_device
from gendd.errors import ConfigError, NumericalError
from gendd.hardware import PRECISIONS, autocast, resolve_precision
from gendd.artifacts import commit_dir, same_identity, save_torch

LR_SCHEDULES = ("constant", "cosine")
#: DDPM's training schedule (Ho et al. 2020; DiT's too): linear betas 1e-4 .. 0.02 over 1000 steps.
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
             "clip_sample": False}


@dataclass
class BackboneTrainConfig(Validated):
    """Architecture and schedule of a small latent DiT backbone (defaults: Fashion-MNIST).

    Attributes:
        image_size: VAE input side; dataset images are padded by ``(image_size - dataset size) / 2``.
        vae_channels: AutoencoderKL ``block_out_channels``; downsampling ``2 ** (len - 1)``.
        latent_channels: VAE latent channels.
        vae_steps, vae_batch_size, vae_lr, kl_weight: VAE optimisation (AdamW).
        dit_hidden, dit_layers, dit_heads, patch_size: DiT width/depth (hidden = heads * head dim).
        dit_steps, dit_batch_size, dit_lr, ema_decay, label_dropout: DiT optimisation (AdamW).
        lr_schedule: ``"constant"`` or ``"cosine"`` (both stages).
        vae_precision, dit_precision: precision policies (:mod:`gendd.hardware`) of each stage's steps.
        default_cfg_scale: guidance scale recorded with the backbone as its default.
        checkpoint_every: steps between checkpoints.
        seed: seeds initialisation, batches, noise and label dropout.
        num_threads: torch threads (None = torch default).
        init_from: a backbone folder of the same architecture whose VAE and DiT weights start the two
            stages (continued training: ``vae_steps``/``dit_steps`` more steps, a fresh schedule, the EMA
            starting at the loaded DiT); None = random initialisation. Its content hash enters the run's
            identity.
        init_dit: whether ``init_from`` starts the DiT too; False = its VAE only, and a new DiT (of any size)
            trained from random initialisation on that VAE's latents.
    """

    config_what: ClassVar[str] = "backbone train"

    image_size: int = field(default=32, metadata=check(Integral, ge=1))
    vae_channels: tuple[int, ...] = field(default=(32, 64, 64),
                                          metadata=check(tuple, min_length=1, items=check(Integral, ge=1)))
    latent_channels: int = field(default=4, metadata=check(Integral, ge=1))
    vae_steps: int = field(default=400, metadata=check(Integral, ge=0))
    vae_batch_size: int = field(default=128, metadata=check(Integral, ge=1))
    vae_lr: float = field(default=2e-3, metadata=check(Real, gt=0))
    kl_weight: float = field(default=1e-6, metadata=check(Real, ge=0))
    dit_hidden: int = field(default=128, metadata=check(Integral, ge=1))
    dit_layers: int = field(default=6, metadata=check(Integral, ge=1))
    dit_heads: int = field(default=4, metadata=check(Integral, ge=1))
    patch_size: int = field(default=2, metadata=check(Integral, ge=1))
    dit_steps: int = field(default=6000, metadata=check(Integral, ge=0))
    dit_batch_size: int = field(default=128, metadata=check(Integral, ge=1))
    dit_lr: float = field(default=3e-4, metadata=check(Real, gt=0))
    ema_decay: float = field(default=0.999, metadata=check(Real, ge=0, lt=1))
    label_dropout: float = field(default=0.1, metadata=check(Real, ge=0, lt=1))
    lr_schedule: str = field(default="constant", metadata=check(str, choices=LR_SCHEDULES))
    vae_precision: str = field(default="fp32", metadata=check(str, choices=PRECISIONS))
    dit_precision: str = field(default="fp32", metadata=check(str, choices=PRECISIONS))
    default_cfg_scale: float = field(default=3.0, metadata=check(Real))
    checkpoint_every: int = field(default=200, metadata=check(Integral, ge=1))
    seed: int = field(default=0, metadata=check(Integral))
    num_threads: int | None = field(default=None, metadata=check(Integral, ge=1, optional=True))
    init_from: str | None = field(default=None, metadata=check(str, min_length=1, optional=True))
    init_dit: bool = field(default=True, metadata=check(bool))

    def _check_fields(self) -> None:
        if self.dit_hidden % self.dit_heads:
            raise ConfigError(f"dit_hidden ({self.dit_hidden}) must be a multiple of dit_heads ({self.dit_heads})")


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def q_sample(z0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Forward noising ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4);
    ``abar_t`` holds one level per sample and is broadcast over the latent dimensions."""
    a = abar_t.view(-1, *([1] * (z0.dim() - 1)))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def disable_builtin_label_dropout(transformer) -> None:
    """diffusers' ``LabelEmbedding`` drops labels with the global RNG in train mode; gendd drops
    them itself with an explicit generator (reproducible, resumable), so switch that off."""
    from diffusers.models.embeddings import LabelEmbedding

    for m in transformer.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0


def build_models(cfg: BackboneTrainConfig, channels: int, num_classes: int):
    d = _diffusers()
    n = len(cfg.vae_channels)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        vae = d.AutoencoderKL(in_channels=channels, out_channels=channels,
                              down_block_types=("DownEncoderBlock2D",) * n,
                              up_block_types=("UpDecoderBlock2D",) * n,
                              block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
                              latent_channels=cfg.latent_channels, norm_num_groups=32,
                              sample_size=cfg.image_size)
        if cfg.dit_hidden % cfg.dit_heads:
            raise ConfigError("dit_hidden must be a multiple of dit_heads")
        dit = d.DiTTransformer2DModel(sample_size=cfg.image_size // 2 ** (n - 1),
                                      in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
                                      patch_size=cfg.patch_size, num_layers=cfg.dit_layers,
                                      num_attention_heads=cfg.dit_heads,
                                      attention_head_dim=cfg.dit_hidden // cfg.dit_heads,
                                      num_embeds_ada_norm=num_classes)
    return vae, dit


def _meta(cfg: BackboneTrainConfig, dataset: ImageDataset) -> BackboneMeta:
    pad = (cfg.image_size - dataset.image_size) // 2
    return BackboneMeta(image_size=cfg.image_size, channels=dataset.channels, pad=pad,
                        class_names=list(dataset.classes), default_cfg_scale=cfg.default_cfg_scale,
                        source=f"gendd backbone train ({dataset.name})")


def snapshot_backbone(dataset: ImageDataset, run: str | os.PathLike, dest: str | os.PathLike) -> Backbone:
    """Write the backbone of an unfinished ``train_backbone`` run in ``run`` to ``dest``: its finished VAE
    (``checkpoints/vae``) and the EMA weights of the DiT's last checkpoint, so a backbone can be measured while it
    trains. ``dataset`` is the run's training dataset (class names, geometry). Returns the backbone; its DiT step
    is recorded in ``dest/snapshot.json``.

    Raises:
        ConfigError: ``run`` is not a backbone training run, its VAE or DiT stage has no checkpoint yet, or
            ``dataset`` is not the run's.
    """
    from gendd.artifacts import write_json
    from gendd.config import build_config

    run = Path(run)
    cfg_file, ckpt, vae_folder = run / "train_config.json", run / "checkpoints" / "dit.pt", run / "checkpoints" / "vae"
    if not cfg_file.exists():
        raise ConfigError(f"{run} is not a `gendd backbone train` run (no train_config.json)")
    record = json.loads(cfg_file.read_text())
    if record.get("fingerprint") != dataset.fingerprint():
        raise ConfigError(f"{run} was trained on another dataset than {dataset.name!r}")
    if not vae_folder.is_dir() or not ckpt.exists():
        raise ConfigError(f"{run} has no DiT checkpoint yet (its VAE stage is still running); snapshot it later")
    cfg = build_config(BackboneTrainConfig, record["config"], "backbone snapshot")
    _, dit = build_models(cfg, dataset.channels, dataset.num_classes)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    dit.load_state_dict(state["ema"] if state["ema"] is not None else state["model"])
    vae = _diffusers().AutoencoderKL.from_pretrained(vae_folder)
    bb = Backbone(vae.eval(), dit.eval(), dict(SCHEDULER), _meta(cfg, dataset))
    dest = Path(dest)
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    bb.save_pretrained(staging)
    write_json(staging / "snapshot.json", {"run": str(run), "dit_step": int(state["step"]),
                                           "dit_steps": cfg.dit_steps, "content_hash": bb.content_hash()})
    commit_dir(staging, dest)
    return bb


def _load_init(folder: str | os.PathLike, vae, dit) -> str:
    """Load the VAE and DiT weights of the backbone folder ``folder`` into ``vae`` / ``dit`` (architectures must
    match; ``dit=None``: the VAE only); returns its content hash."""
    path = Path(folder)
    if not (path / "vae").is_dir() or not (path / "transformer").is_dir():
        raise ConfigError(f"init_from {str(folder)!r} is not a backbone folder (vae/ and transformer/)")
    init = Backbone.from_pretrained(path)
    for name, mine, theirs in (("VAE", vae, init.vae), ("DiT", dit, init.transformer)):
        if mine is None:
            continue
        try:
            mine.load_state_dict(theirs.state_dict())
        except RuntimeError as err:
            raise ConfigError(f"init_from {str(folder)!r}: its {name} has another architecture than this "
                              f"config's ({str(err).splitlines()[0]})") from None
    return init.content_hash()


class _Stage:
    """Checkpointed optimisation of one module (model + optional EMA + AdamW + RNG + step).

    ``save(extra)`` stores any further state (e.g. fine-tuning memories) in the same atomic
    checkpoint; ``resume`` puts it back in ``self.extra``.
    """

    def __init__(self, name: str, model, lr: float, out: Path, ema_decay: float | None, seed: int,
                 schedule: str = "constant", total_steps: int = 0):
        self.name, self.model, self.out = name, model, out
        self.lr, self.schedule, self.total_steps = lr, schedule, total_steps
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        self.ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
        # parameter lists of the EMA update; resume loads state dicts in place, so they stay valid
        self._ema_lists = (list(self.ema.parameters()), list(model.parameters())) if self.ema is not None else None
        self.ema_decay = ema_decay
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0
        self.extra = None
        self.ckpt = out / "checkpoints" / f"{name}.pt"
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)

    def resume(self) -> bool:
        if not self.ckpt.exists():
            return False
        state = torch.load(self.ckpt, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.extra = state.get("extra")
        return True

    def save(self, extra=None) -> None:
        save_torch(self.ckpt, {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                               "ema": self.ema.state_dict() if self.ema is not None else None,
                               "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "step": self.step,
                               "extra": extra})

    def check(self, value: float) -> None:
        """Raise NumericalError unless ``value`` (a loss read back from the device) is finite."""
        if not math.isfinite(value):
            raise NumericalError(f"{self.name} loss is {value} by step {self.step}; lower the learning rate")

    def update(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss``. The loss is not read back here (that would wait for the device each
        step); callers :meth:`check` what they read at their log and checkpoint steps."""
        if self.schedule == "cosine":
            for group in self.opt.param_groups:
                group["lr"] = self.lr * 0.5 * (1.0 + math.cos(math.pi * self.step / max(1, self.total_steps)))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self._ema_lists is not None:
            with torch.no_grad():
                torch._foreach_lerp_(*self._ema_lists, 1.0 - self.ema_decay)
        self.step += 1


def train_backbone(dataset: ImageDataset, out: str | os.PathLike, cfg: BackboneTrainConfig | None = None,
                   progress: bool = True) -> Backbone:
    """Train VAE then DiT on ``dataset`` and write a diffusers folder to ``out``.

    Resumes from ``out/checkpoints`` when present. Writes ``out/train_log.jsonl`` (one record per
    logged step, with elapsed seconds) and ``out/train_config.json``.
    """
    cfg = cfg or BackboneTrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    pad = (cfg.image_size - dataset.image_size) // 2
    if pad < 0 or 2 * pad + dataset.image_size != cfg.image_size:
        raise ConfigError(f"image_size {cfg.image_size} must exceed the dataset's {dataset.image_size} "
                          "by an even number of pixels")
    torch.manual_seed(cfg.seed)
    vae, dit = build_models(cfg, dataset.channels, dataset.num_classes)
    init = _load_init(cfg.init_from, vae, dit if cfg.init_dit else None) if cfg.init_from is not None else None
    dev = torch.device(default_device())
    vae, dit = vae.to(dev), dit.to(dev)
    cfg_file = out / "train_config.json"
    record = {"config": asdict(cfg), "dataset": dataset.name, "fingerprint": dataset.fingerprint()}
    if init is not None:
        record["init_hash"] = init
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        if not same_identity(old, record):  # num_threads, checkpoint_every: execution knobs
            raise ConfigError(f"{out} holds a run with a different config or dataset; use another --out")
    else:
        cfg_file.write_text(json.dumps(record, indent=2))
    log = out / "train_log.jsonl"
    images = dataset.load(range(len(dataset)))  # uint8, fits in memory for the embedded data
    labels = torch.as_tensor(dataset.labels)
    meta, sched = _meta(cfg, dataset), dict(SCHEDULER)

    # ---------------- stage 1: VAE
    vae_stage = _Stage("vae", vae.train(), cfg.vae_lr, out, None, cfg.seed, cfg.lr_schedule, cfg.vae_steps)
    vae_stage.resume()
    vae_precision = resolve_precision(cfg.vae_precision, dev)
    t0 = time.time()
    bar = tqdm(total=cfg.vae_steps, initial=vae_stage.step, desc="VAE", disable=not progress)
    while vae_stage.step < cfg.vae_steps:
        idx = torch.randint(len(images), (cfg.vae_batch_size,), generator=vae_stage.gen)
        x = torch.nn.functional.pad(to_float(images[idx]), (pad,) * 4, value=-1.0).to(dev)
        with autocast(vae_precision, dev):
            dist = vae.encode(x).latent_dist
            z = dist.sample(generator=vae_stage.gen)  # drawn on the generator's CPU, moved to dev
            rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec.float(), x)
        kl = dist.kl().float().mean()  # per image, summed over latent dims
        loss = mse + cfg.kl_weight * kl / x[0].numel()  # = (SSE + kl_weight * KL) / pixels
        vae_stage.update(loss)
        bar.update(1)
        logged = vae_stage.step % 50 == 0 or vae_stage.step == cfg.vae_steps
        saved = vae_stage.step % cfg.checkpoint_every == 0 or vae_stage.step == cfg.vae_steps
        if logged or saved:
            mse_v, loss_v = mse.item(), loss.item()
            vae_stage.check(loss_v)
            bar.set_postfix(mse=f"{mse_v:.4f}")
        if logged:
            _log(log, {"stage": "vae", "step": vae_stage.step, "mse": mse_v, "kl": kl.item(),
                       "seconds": time.time() - t0})
        if saved:
            vae_stage.save()
    bar.close()
    vae.eval().requires_grad_(False)

    # ---------------- encode the training set once (latent means), fix the scaling factor
    latents_file = out / "checkpoints" / "train_latents.pt"
    if latents_file.exists():
        lat = torch.load(latents_file)
    else:
        chunks = []
        with torch.no_grad():
            for i in tqdm(range(0, len(images), 500), desc="encode", disable=not progress):
                x = torch.nn.functional.pad(to_float(images[i:i + 500]), (pad,) * 4, value=-1.0).to(dev)
                chunks.append(vae.encode(x).latent_dist.mean.cpu())
        z = torch.cat(chunks)
        lat = {"z": z, "scaling_factor": float(1.0 / z.std())}
        save_torch(latents_file, lat)
    vae.register_to_config(scaling_factor=lat["scaling_factor"])
    vae_folder = out / "checkpoints" / "vae"
    if not vae_folder.is_dir():  # usable while the DiT trains: `gendd backbone quality --set vae=<it>`
        staging = out / "checkpoints" / "vae.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        vae.save_pretrained(staging)
        commit_dir(staging, vae_folder)
    z_all = lat["z"] * lat["scaling_factor"]

    # ---------------- stage 2: DiT
    disable_builtin_label_dropout(dit)
    dit_stage = _Stage("dit", dit.train(), cfg.dit_lr, out, cfg.ema_decay, cfg.seed + 1, cfg.lr_schedule,
                       cfg.dit_steps)
    dit_stage.resume()
    dit_precision = resolve_precision(cfg.dit_precision, dev)
    bb = Backbone(vae, dit, sched, meta)
    abar = bb.alphas_cumprod.float().to(dev)
    z_all = z_all.to(dev)
    t0 = time.time()
    bar = tqdm(total=cfg.dit_steps, initial=dit_stage.step, desc="DiT", disable=not progress)
    running = None
    while dit_stage.step < cfg.dit_steps:
        g = dit_stage.gen
        idx = torch.randint(len(z_all), (cfg.dit_batch_size,), generator=g)
        y = labels[idx].clone()
        drop = torch.rand(y.shape, generator=g) < cfg.label_dropout
        y[drop] = dataset.num_classes
        t = torch.randint(0, bb.num_train_timesteps, (len(idx),), generator=g)
        noise = torch.randn((len(idx), *z_all.shape[1:]), generator=g).to(dev)
        t, y = t.to(dev), y.to(dev)
        zt = q_sample(z_all[idx.to(dev)], noise, abar[t])
        with autocast(dit_precision, dev):
            pred = dit(zt, timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        dit_stage.update(loss)
        loss = loss.detach()
        running = loss if running is None else 0.98 * running + 0.02 * loss  # stays on the device
        bar.update(1)
        logged = dit_stage.step % 100 == 0 or dit_stage.step == cfg.dit_steps
        saved = dit_stage.step % cfg.checkpoint_every == 0 or dit_stage.step == cfg.dit_steps
        if logged or saved:
            running_v = running.item()
            dit_stage.check(running_v)
            bar.set_postfix(loss=f"{running_v:.4f}")
        if logged:
            _log(log, {"stage": "dit", "step": dit_stage.step, "loss": running_v, "seconds": time.time() - t0})
        if saved:
            dit_stage.save()
    bar.close()
    final = Backbone(vae, dit_stage.ema.eval(), sched, meta)  # = snapshot_backbone at the last step
    final.save_pretrained(out)
    return final
