"""Fine-tune a DiT on a dataset's latents with Minimax's memory terms (and the self-adaptive memory).

One step (Minimax diffusion, Gu et al., CVPR 2024, vimar-gu/MinimaxDiffusion: train_dit.py; the memory
paper, Li et al., ICIP 2025, SumomoTaku/diversityDDwithSSMemory: train_dit.py) on a batch of cached real
latents ``z_0`` with local labels ``c`` and model labels ``y``:

* ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``; ``y`` replaced
  by the null label with probability ``label_dropout`` (gendd's own draw; diffusers' built-in label
  dropout is switched off, as in :mod:`gendd.backbone.train`).
* ``eps_hat = eps_theta(z_t, t, y)``; ``L_diff = ||eps - eps_hat||^2`` (mean). Learned-sigma models: MSE on
  the eps half only. The reference also adds DiT's variational-bound term for the variance half;
  diffusers has no such loss and it is not reproduced (the variance output is left as it is).
* ``x0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)`` (no clipping, as the reference).
* For each class ``c`` in the batch (``K`` classes, in ascending order; the reference iterates a Python
  set of the labels, which is ascending for small labels in most cases) whose memories are non-empty, with
  ``z_hat`` the flattened ``x0_hat`` of its samples: ``T_c = (lambda_real L_r(z_hat, M_r[c]) +
  lambda_gen L_d(z_hat, M_g[c])) / K`` (:mod:`gendd.blocks.memory`).
* ``loss_accumulation="paper"`` (Minimax; the paper's intent): ``L = L_diff + sum_c T_c``.
  ``"reference"`` (the memory repo's quirk, methods.md 3.1 (i)): inside the per-class loop the running
  sums are added to the loss after every class, including classes with empty memories, so
  ``L = L_diff + sum_k sum_{j<=k} T_{c_j}``: the term of the j-th class counts ``K - j + 1`` times.
  The two agree when the batch holds one class.
* After the update, each present class's real memory receives its real latents and its generated
  memory the detached ``x0_hat``; the eviction policy keeps at most ``memory_size`` items.

Batches: epochs of a seeded permutation of the chunk's latents, ``batch_size`` per step, last partial
batch dropped (DistributedSampler + ``drop_last`` in the reference); the permutation of epoch ``e`` is a
function of (seed, chunk, e) only, so a resumed run sees the same batches.

Under ``torchrun`` (:func:`gendd.distributed.current_world` of N > 1 ranks) a chunk trains with
DistributedDataParallel, as the reference ``train_dit.py``: every rank draws the same global batch (indices,
label dropout, ``t``, noise: the same generator) and runs the forward pass on its slice of ``batch_size / N``
items; DDP averages the gradients of the local diffusion losses (the global mean, as slices are equal). The
memory terms take a min / max over the whole class batch, so they are computed on the *gathered* ``x0_hat`` of
the global batch, identically on every rank; :class:`_GatherSlices` gives each rank the gradient of its own slice
times N, which DDP's average turns into the single-process gradient. The memories receive the global batch on
every rank, so they stay identical across ranks without further communication (they are sharded neither by
class nor by rank). Rank 0 writes the checkpoints, logs and the final folder; every rank resumes from the same
checkpoint. The result equals one process's on the same global batch up to float32 rounding (the forward runs on
smaller batches, the gradients are summed across ranks).

Parameter-efficient fine-tuning (DiffFit, Xie et al. 2023; Minimax models.py ``mark_difffit_trainable``):
only biases, normalisation parameters, the class embedding and added scale factors train. The reference
DiT multiplies, in the first half of the blocks, the q/k/v projections by ``gamma_qkv``, the attention
output projection by ``gamma_proj``, and the two residual branches by ``gamma_1``/``gamma_2`` (per
channel, initialised to 1). diffusers' DiT has no such factors, so they are added here as parameters
of the Linear layers whose output they scale (``to_q``/``to_k``/``to_v``: ``difffit_gamma``;
``to_out.0``: ``difffit_gamma`` and ``difffit_gamma_branch``; the feed-forward output Linear:
``difffit_gamma_branch``) with a forward hook ``out -> out * gamma``. The adaLN gate multiplies the
branch output channel-wise, so every factor commutes with it and folds exactly into that Linear:
``W <- diag(gamma) W``, ``b <- gamma * b`` (:func:`merge_difffit_scales`), done on a copy of the EMA
weights before ``save_pretrained``: the saved folder is a plain diffusers DiT. diffusers keeps one
copy of DiT's timestep and label embedders per block (the checkpoint conversion duplicated them);
under DiffFit the per-block label tables and embedder biases train independently.

Output folder (one chunk: ``out`` itself is the diffusers folder; ``class_chunk``: ``out/chunk_000/``...)::

    out/finetune_config.json    # config + what was fine-tuned (refuses a different run)
    out/finetune.json           # chunks done: classes, model labels, folder, steps; "complete"
    out/finetune_log.jsonl      # running losses every 50 steps, elapsed seconds
    out/checkpoints/chunk_000.pt  # model, EMA, AdamW, memories, generator, step (atomic)
    out/[chunk_000/]transformer/ vae/ scheduler/ model_index.json gendd_backbone.json  (EMA weights)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from gendd.backbone.backbone import Backbone, _diffusers
from gendd.backbone.train import _log, _Stage, disable_builtin_label_dropout, q_sample
from gendd.blocks.memory import EVICTION_POLICIES, ClassMemory, diversity_loss, representativeness_loss
from gendd.config import Validated, build_config, check
from gendd.errors import ConfigError, DataError
from gendd.artifacts import write_json
from gendd.distributed import current_world

FINETUNE_RECORD = "finetune.json"
_LOG_EVERY = 50


@dataclass
class FinetuneConfig(Validated):
    """Fine-tuning options (defaults: the references' DiT-XL/2 settings, run.sh of both repos).

    The references run 8 epochs at batch 8 on ~13k ImageWoof images and sample from the step-12000
    checkpoint. For gendd's Fashion-MNIST backbone (trained on the same images, posterior std ~0.015
    of a unit-variance latent) ``steps=12000, latent_sample=False`` keeps the reference's step count,
    batch, EMA horizon (``0.9999 ** 12000 = 0.30``) and memory turnover, and shares MGD3's latent cache.

    Attributes:
        epochs: passes over each chunk's images (reference 8; a cached flipped copy is not another image,
            so with ``flip`` an epoch is half a pass over the cache); ignored when ``steps`` is set.
        steps: optimiser steps per chunk (None = ``round(epochs * (images // batch_size))``).
        batch_size: latents per step (reference 8).
        lr: AdamW learning rate, weight decay 0 (reference 1e-3).
        ema_decay: EMA of the weights, used for sampling (reference 0.9999); 0 = no EMA (last weights).
        label_dropout: probability of the null label (DiT's class_dropout_prob 0.1).
        lambda_real, lambda_gen: weights of representativeness and diversity (0.002, 0.008).
        memory_size: items per class and memory (64).
        eviction: ``fifo`` (Minimax), ``max-similarity`` (self-adaptive memory) or ``min-similarity``.
        loss_accumulation: ``paper`` or ``reference`` (module docstring).
        use_memory: False = plain diffusion fine-tuning (no memories, no memory terms).
        parameter_efficient: True = DiffFit (module docstring); False = every DiT weight trains.
        scaled_blocks: DiffFit scale factors on the first k blocks (None = half, as the reference's 14 of 28).
        class_chunk: fine-tune one model per this many classes (the Minimax author's 20-class phases
            for large label sets); None = one model for all classes.
        latent_sample, flip: the latent cache fine-tuned on: one posterior draw per image (the reference
            draws ``latent_dist.sample()``) and the flipped copies (its RandomHorizontalFlip).
        checkpoint_every: steps between checkpoints.
        seed: seeds batches, timesteps, noise, label dropout and the latent draw.
    """

    config_what: ClassVar[str] = "finetune"

    epochs: float = field(default=8.0, metadata=check(Real))
    steps: int | None = field(default=None, metadata=check(Integral, ge=1, optional=True))
    batch_size: int = field(default=8, metadata=check(Integral, ge=1))
    lr: float = field(default=1e-3, metadata=check(Real, gt=0))
    ema_decay: float = field(default=0.9999, metadata=check(Real, ge=0, lt=1))
    label_dropout: float = field(default=0.1, metadata=check(Real, ge=0, lt=1))
    lambda_real: float = field(default=0.002, metadata=check(Real))
    lambda_gen: float = field(default=0.008, metadata=check(Real))
    memory_size: int = field(default=64, metadata=check(Integral, ge=1))
    eviction: str = field(default="fifo", metadata=check(choices=lambda: tuple(EVICTION_POLICIES)))
    loss_accumulation: str = field(default="paper", metadata=check(choices=("paper", "reference")))
    use_memory: bool = field(default=True, metadata=check(bool))
    parameter_efficient: bool = field(default=True, metadata=check(bool))
    scaled_blocks: int | None = field(default=None, metadata=check(Integral, ge=0, optional=True))
    class_chunk: int | None = field(default=None, metadata=check(Integral, ge=1, optional=True))
    latent_sample: bool = field(default=True, metadata=check(bool))
    flip: bool = field(default=True, metadata=check(bool))
    checkpoint_every: int = field(default=500, metadata=check(Integral, ge=1))
    seed: int = field(default=0, metadata=check(Integral))

    def _check_fields(self) -> None:
        if self.steps is None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0 (or set steps), got {self.epochs}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **defaults: Any) -> FinetuneConfig:
        """``defaults`` overridden by ``options``; unknown keys raise ConfigError."""
        merged = {**defaults, **dict(options or {})}
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(merged) - known)
        if bad:
            raise ConfigError(f"unknown fine-tuning option(s) {', '.join(bad)}; options: {', '.join(sorted(known))}")
        return build_config(cls, merged, cls.config_what)

    def encode_spec(self):
        """The latent cache fine-tuned on (``gendd.cache.EncodeSpec``)."""
        from gendd.cache import EncodeSpec

        return EncodeSpec(sample=self.latent_sample, flip=self.flip, seed=self.seed)

    def steps_for(self, num_items: int, num_images: int | None = None) -> int:
        """Optimiser steps for a chunk of ``num_items`` cached latents made from ``num_images`` images
        (fewer when the cache holds flipped copies): an epoch is one pass over the images, as the
        reference's on-the-fly RandomHorizontalFlip sees each image once per epoch."""
        if num_items < self.batch_size:
            raise DataError(f"a fine-tuning chunk has {num_items} latents, fewer than batch_size "
                            f"{self.batch_size}; lower batch_size or use larger class chunks")
        if self.steps is not None:
            return self.steps
        images = num_items if num_images is None else num_images
        return max(1, round(self.epochs * (images // self.batch_size)))


@dataclass
class FinetunedChunk:
    """One fine-tuned model: the local ``labels`` (and ``classes`` names, ``model_labels``) it was
    fine-tuned on, its diffusers folder ``path`` and the number of ``steps``. ``classes=None``: a
    plain diffusers folder used for every class."""

    path: Path
    classes: list[str] | None = None
    labels: list[int] | None = None
    model_labels: list[int] | None = None
    steps: int = 0


@dataclass
class FinetuneResult:
    out: Path
    chunks: list[FinetunedChunk] = field(default_factory=list)

    def chunk_for(self, class_name: str) -> FinetunedChunk | None:
        """The chunk fine-tuned on ``class_name`` (a whole-model chunk serves every class)."""
        for ch in self.chunks:
            if ch.classes is None or class_name in ch.classes:
                return ch
        return None


# --------------------------------------------------------------------------------------------- DiffFit
_SCALES = "_difffit_scales"


def _scale_output(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    for name in getattr(module, _SCALES, ()):
        output = output * getattr(module, name)
    return output


def add_difffit_scales(transformer, num_blocks: int | None = None) -> list[str]:
    """Add DiffFit's per-channel scale factors (init 1) to the first ``num_blocks`` blocks
    (None = half); returns the new parameter names (module docstring)."""
    blocks = transformer.transformer_blocks
    n = len(blocks) // 2 if num_blocks is None else min(num_blocks, len(blocks))
    names = []
    for b in range(n):
        block = blocks[b]
        attn = block.attn1
        ff_out = [m for m in block.ff.net if isinstance(m, torch.nn.Linear)][-1]
        targets = [("attn1.to_q", attn.to_q, ("difffit_gamma",)), ("attn1.to_k", attn.to_k, ("difffit_gamma",)),
                   ("attn1.to_v", attn.to_v, ("difffit_gamma",)),
                   ("attn1.to_out.0", attn.to_out[0], ("difffit_gamma", "difffit_gamma_branch")),
                   ("ff.out", ff_out, ("difffit_gamma_branch",))]
        for label, lin, pnames in targets:
            if getattr(lin, _SCALES, ()):
                raise ConfigError("the transformer already carries DiffFit scale factors")
            w = lin.weight
            for pn in pnames:
                lin.register_parameter(pn, torch.nn.Parameter(torch.ones(lin.out_features, device=w.device,
                                                                          dtype=w.dtype)))
                names.append(f"transformer_blocks.{b}.{label}.{pn}")
            setattr(lin, _SCALES, tuple(pnames))
            if not getattr(lin, "_difffit_hooked", False):
                lin.register_forward_hook(_scale_output)
                lin._difffit_hooked = True
    return names


@torch.no_grad()
def merge_difffit_scales(transformer) -> None:
    """Fold every scale factor into its Linear (``W <- diag(g) W``, ``b <- g b``) and remove it; the
    hook stays as a no-op, the state dict becomes that of a plain diffusers DiT."""
    for m in transformer.modules():
        names = getattr(m, _SCALES, ())
        if not names:
            continue
        g = torch.ones_like(getattr(m, names[0]))
        for name in names:
            g = g * getattr(m, name)
        m.weight.mul_(g[:, None])
        if m.bias is not None:
            m.bias.mul_(g)
        for name in names:
            delattr(m, name)
        setattr(m, _SCALES, ())


def mark_difffit_trainable(transformer) -> list[str]:
    """``requires_grad`` only for biases, parameters of normalisation layers (class name containing
    ``Norm``), label-embedding tables and DiffFit scale factors; returns the trainable names.

    The reference selects by name (``bias``, ``norm``, ``gamma``, ``y_embed``); diffusers nests the
    adaLN and timestep-embedder weights under ``norm1``, so the rule here goes by module type."""
    from diffusers.models.embeddings import LabelEmbedding

    tables = {id(m.embedding_table.weight) for m in transformer.modules() if isinstance(m, LabelEmbedding)}
    trainable = []
    for mname, m in transformer.named_modules():
        is_norm = "Norm" in type(m).__name__
        for pname, p in m.named_parameters(recurse=False):
            ok = pname == "bias" or pname.startswith("difffit_gamma") or is_norm or id(p) in tables
            p.requires_grad_(ok)
            if ok:
                trainable.append(f"{mname}.{pname}" if mname else pname)
    return trainable


def trainable_transformer(backbone: Backbone, config: FinetuneConfig):
    """A float32 copy of the backbone's DiT set up for fine-tuning (label dropout off, DiffFit or full)."""
    model = copy.deepcopy(backbone.transformer).float()
    disable_builtin_label_dropout(model)
    if config.parameter_efficient:
        add_difffit_scales(model, config.scaled_blocks)
        mark_difffit_trainable(model)
    else:
        model.requires_grad_(True)
    return model.train()


def export_transformer(model):
    """A plain diffusers DiT (scale factors folded) from a fine-tuned copy, in eval mode."""
    out = copy.deepcopy(model).eval().requires_grad_(False)
    merge_difffit_scales(out)
    return out


# --------------------------------------------------------------------------------------------- losses
def accumulate_memory_terms(terms: Sequence[torch.Tensor | None], mode: str) -> torch.Tensor:
    """Combine the per-class terms ``T_c`` (in class order; None = empty memory, contributes nothing).

    ``paper``: ``sum_c T_c``. ``reference``: after every class (empty or not) the running sum is
    added, ``sum_k sum_{j<=k} T_j`` (module docstring)."""
    total = torch.zeros(())
    running = torch.zeros(())
    for term in terms:
        if term is not None:
            running = running + term
            if mode == "paper":
                total = total + term
        if mode == "reference":
            total = total + running
    return total


# --------------------------------------------------------------------------------------------- DDP
class _GatherSlices(torch.autograd.Function):
    """``all_gather`` of every rank's equal-sized slice (rank order). Backward: this rank's slice of the
    gradient times the world size — every rank computes the same function of the gathered tensor, so the
    sum over ranks of their (equal) gradients, which DDP then averages, is that slice's full gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous())
        ctx.rank, ctx.size, ctx.n = rank, size, local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lo = ctx.rank * ctx.n
        return grad[lo:lo + ctx.n] * ctx.size, None, None


def _mean_across(value: torch.Tensor, world) -> float:
    """The mean of a scalar over the ranks (for logs)."""
    if world.size == 1:
        return float(value.item())
    import torch.distributed as dist

    v = value.detach().float().reshape(1).clone()
    dist.all_reduce(v)
    return float(v.item()) / world.size


# --------------------------------------------------------------------------------------------- loop
class _Latents:
    """Per-class latents from a LatentCache or a ``{local label: (n, C, h, w)}`` mapping."""

    def __init__(self, source) -> None:
        self.source = source
        if isinstance(source, Mapping):
            self.num_classes = len(source)
            if sorted(source) != list(range(self.num_classes)):
                raise ConfigError("latents_by_class must be keyed by the local labels 0..n-1")
        else:
            self.num_classes = int(source.num_classes)

    def get(self, c: int) -> torch.Tensor:
        z = self.source[c] if isinstance(self.source, Mapping) else self.source.latents(c)
        return z.float()

    def images(self, c: int) -> int:
        """Distinct source images of class ``c`` (a cached flipped copy shares its image's index)."""
        if isinstance(self.source, Mapping):
            return int(self.source[c].shape[0])
        return int(torch.unique(self.source.load(c)[1]).numel())

    def fingerprint(self) -> str:
        if not isinstance(self.source, Mapping):
            return f"cache:{Path(self.source.root).name}"
        h = hashlib.sha256()
        for c in range(self.num_classes):
            z = self.get(c).detach().cpu().contiguous()
            h.update(str(tuple(z.shape)).encode())
            h.update(z.numpy().tobytes())
        return h.hexdigest()[:20]


def _mix(*ints: int) -> int:
    s = 0
    for i in ints:
        s = (s * 1_000_003 + int(i)) % (2**63)
    return s


def finetune(backbone: Backbone, latents, out: str | os.PathLike, config: FinetuneConfig | None = None, *,
             model_labels: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
             progress: bool = True, on_step: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune ``backbone``'s DiT on ``latents`` (a :class:`gendd.cache.LatentCache` or
    ``{local label: latents}``) and write the EMA weights as diffusers folder(s) under ``out``.

    Args:
        model_labels: the label the DiT is conditioned on for each local class (default: local).
        class_names: names recorded with each chunk (default ``"0", "1", ...``).
        on_step: called after every step with ``{"chunk", "step", "loss", "diffusion",
            "representativeness", "diversity"}`` (the memory entries are means over the classes
            with non-empty memories, or None).

    Resumes from ``out/checkpoints`` when re-run with the same arguments; refuses a folder holding
    a different run. Returns the finished chunks (module docstring for the layout).
    """
    cfg = config or FinetuneConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = _Latents(latents)
    n = src.num_classes
    model_labels = list(range(n)) if model_labels is None else [int(y) for y in model_labels]
    class_names = [str(c) for c in range(n)] if class_names is None else list(class_names)
    if len(model_labels) != n or len(class_names) != n:
        raise ConfigError(f"model_labels and class_names need one entry per class ({n})")
    bad = [y for y in model_labels if not 0 <= y < backbone.num_classes]
    if bad:
        raise ConfigError(f"model labels {bad} are outside the backbone's {backbone.num_classes} classes")
    record = {"config": asdict(cfg), "backbone": backbone.content_hash(), "latents": src.fingerprint(),
              "classes": class_names, "model_labels": model_labels}
    cfg_file = out / "finetune_config.json"
    world = current_world()
    if world.size > 1 and cfg.batch_size % world.size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {world.size} ranks (each rank "
                          "trains on an equal slice of the global batch)")
    if cfg_file.exists():
        if json.loads(cfg_file.read_text()) != json.loads(json.dumps(record)):
            raise ConfigError(f"{out} holds a fine-tune with a different config, backbone or data; use another folder")
    elif world.is_main:
        write_json(cfg_file, record)
    step = cfg.class_chunk or n
    chunks = [list(range(i, min(i + step, n))) for i in range(0, n, step)]
    rec_file = out / FINETUNE_RECORD
    done = json.loads(rec_file.read_text())["chunks"] if rec_file.exists() else []
    result = FinetuneResult(out)
    for k, labels in enumerate(chunks):
        rel = "." if len(chunks) == 1 else f"chunk_{k:03d}"
        entry = next((d for d in done if d["path"] == rel), None)
        if entry is None:
            steps = _finetune_chunk(backbone, src, labels, model_labels, cfg, out, out / rel, k, progress, on_step)
            entry = {"path": rel, "labels": labels, "classes": [class_names[c] for c in labels],
                     "model_labels": [model_labels[c] for c in labels], "steps": steps}
            done.append(entry)
            if world.is_main:
                write_json(rec_file, {"chunks": done, "complete": k == len(chunks) - 1})
            world.barrier()  # the chunk's folder and record exist before any rank goes on
        result.chunks.append(FinetunedChunk(path=out / rel, classes=entry["classes"], labels=entry["labels"],
                                            model_labels=entry["model_labels"], steps=entry["steps"]))
    return result


def _finetune_chunk(backbone: Backbone, src: _Latents, labels: list[int], model_labels: list[int],
                    cfg: FinetuneConfig, out: Path, path: Path, k: int, progress: bool,
                    on_step: Callable[[dict], None] | None) -> int:
    device = backbone.device
    zs = [src.get(c) for c in labels]
    z_all = torch.cat(zs)
    y_local = torch.cat([torch.full((z.shape[0],), c, dtype=torch.long) for c, z in zip(labels, zs)])
    y_model_all = torch.as_tensor(model_labels, dtype=torch.long)[y_local]
    n, bs = z_all.shape[0], cfg.batch_size
    total = cfg.steps_for(n, sum(src.images(c) for c in labels))
    per_epoch = n // bs
    world = current_world()
    model = trainable_transformer(backbone, cfg).to(device)
    forward = model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    lo, hi = world.rank * bs // world.size, (world.rank + 1) * bs // world.size  # this rank's slice of a batch
    stage = _Stage(f"chunk_{k:03d}", model, cfg.lr, out, cfg.ema_decay or None, _mix(cfg.seed, k, 1))
    real = {c: ClassMemory(cfg.memory_size, cfg.eviction) for c in labels}
    gen = {c: ClassMemory(cfg.memory_size, cfg.eviction) for c in labels}
    if stage.resume() and stage.extra is not None:
        for c in labels:
            real[c].load_state(stage.extra["real"].get(c), device)
            gen[c].load_state(stage.extra["gen"].get(c), device)
    abar = backbone.alphas_cumprod.float().to(device)
    channels = backbone.latent_channels
    log = out / "finetune_log.jsonl"
    perm_epoch, perm = -1, None
    run: dict[str, float] = {}
    t0 = time.time()
    bar = tqdm(total=total, initial=stage.step, desc=f"fine-tune {k}" if k else "fine-tune",
               disable=not progress or not world.is_main)
    while stage.step < total:
        epoch, b = divmod(stage.step, per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(cfg.seed, k, epoch, 2)))
            perm_epoch = epoch
        idx = perm[b * bs:(b + 1) * bs]
        g = stage.gen
        z0, yl, y = z_all[idx].to(device), y_local[idx], y_model_all[idx].clone()
        y[torch.rand(y.shape, generator=g) < cfg.label_dropout] = backbone.null_label
        t = torch.randint(0, backbone.num_train_timesteps, (bs,), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        abar_t = abar[t]
        zt = q_sample(z0, noise, abar_t)
        mine = slice(lo, hi)  # the whole batch in one process
        eps = forward(zt[mine], timestep=t[mine], class_labels=y[mine].to(device)).sample[:, :channels]
        l_diff = torch.nn.functional.mse_loss(eps, noise[mine])
        loss = l_diff
        stats = {"representativeness": None, "diversity": None}
        classes = sorted(set(yl.tolist()))
        if cfg.use_memory:
            a = abar_t[mine].view(-1, 1, 1, 1)
            x0 = (zt[mine] - (1 - a).sqrt() * eps) / a.sqrt()
            if world.size > 1:
                x0 = _GatherSlices.apply(x0, world.rank, world.size)
            terms, rs, ds = [], [], []
            for c in classes:
                zh = x0[(yl == c).to(device)].flatten(1)
                if len(real[c]) and len(gen[c]):
                    r = representativeness_loss(zh, real[c].tensor())
                    d = diversity_loss(zh, gen[c].tensor())
                    terms.append((cfg.lambda_real * r + cfg.lambda_gen * d) / len(classes))
                    rs.append(r.item())
                    ds.append(d.item())
                else:
                    terms.append(None)
            loss = loss + accumulate_memory_terms(terms, cfg.loss_accumulation).to(device)
            if rs:
                stats = {"representativeness": sum(rs) / len(rs), "diversity": sum(ds) / len(ds)}
        stage.update(loss)
        if cfg.use_memory:
            x0d = x0.detach()
            for c in classes:
                mask = (yl == c).to(device)
                real[c].add(z0[mask])
                gen[c].add(x0d[mask])
        l_mean = _mean_across(l_diff, world)
        rec = {"chunk": k, "step": stage.step, "loss": loss.item() - l_diff.item() + l_mean, "diffusion": l_mean,
               **stats}
        if on_step is not None:
            on_step(rec)
        for key in ("loss", "diffusion", "representativeness", "diversity"):
            if rec[key] is not None:
                run[key] = rec[key] if key not in run else 0.98 * run[key] + 0.02 * rec[key]
        bar.update(1)
        bar.set_postfix(loss=f"{run['loss']:.4f}")
        if world.is_main and (stage.step % _LOG_EVERY == 0 or stage.step == total):
            _log(log, {"chunk": k, "step": stage.step, **run, "seconds": round(time.time() - t0, 2)})
        if world.is_main and (stage.step % cfg.checkpoint_every == 0 or stage.step == total):
            stage.save(extra={"real": {c: m.state() for c, m in real.items()},
                              "gen": {c: m.state() for c, m in gen.items()}})
    bar.close()
    if not world.is_main:
        return total
    final = export_transformer(stage.ema if stage.ema is not None else stage.model)
    meta = copy.deepcopy(backbone.meta)
    meta.source = (f"{meta.source}; " if meta.source else "") + \
        f"gendd finetune ({cfg.eviction}, {total} steps, classes {labels[0]}..{labels[-1]})"
    Backbone(backbone.vae, final, backbone.scheduler_config, meta).save_pretrained(path)
    return total


# --------------------------------------------------------------------------------------------- datasets
def default_finetune_dir() -> Path:
    """``$GENDD_FINETUNE`` or ``~/.cache/gendd/finetuned``."""
    return Path(os.environ.get("GENDD_FINETUNE", Path.home() / ".cache" / "gendd" / "finetuned"))


def finetune_key(dataset, backbone: Backbone, config: FinetuneConfig) -> str:
    """sha256 (20 hex) of the dataset fingerprint, the base backbone and the config."""
    h = hashlib.sha256(json.dumps({"dataset": dataset.fingerprint(), "backbone": backbone.content_hash(),
                                   "pad": backbone.meta.pad, "config": asdict(config)}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def finetune_dataset(dataset, backbone: Backbone, out: str | os.PathLike, config: FinetuneConfig | None = None, *,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     on_step: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Encode ``dataset`` once (:meth:`FinetuneConfig.encode_spec`, via the latent cache) and
    :func:`finetune` on it, conditioning on ``dataset.model_labels``."""
    from gendd.cache import LatentCache

    cfg = config or FinetuneConfig()
    cache = LatentCache.build(dataset, backbone, cache_dir, cfg.encode_spec(), progress=progress)
    return finetune(backbone, cache, out, cfg, model_labels=dataset.model_labels, class_names=dataset.classes,
                    progress=progress, on_step=on_step)


def load_finetuned(path: str | os.PathLike) -> FinetuneResult:
    """A finished fine-tune folder (with ``finetune.json``), or a plain diffusers DiT folder (one
    model for every class)."""
    path = Path(path)
    rec = path / FINETUNE_RECORD
    if rec.exists():
        data = json.loads(rec.read_text())
        if not data.get("complete"):
            raise ConfigError(f"the fine-tune in {path} is not finished; re-run it to resume")
        return FinetuneResult(path, [FinetunedChunk(path=path / d["path"], classes=d["classes"], labels=d["labels"],
                                                    model_labels=d["model_labels"], steps=d["steps"])
                                     for d in data["chunks"]])
    if (path / "transformer").is_dir():
        return FinetuneResult(path, [FinetunedChunk(path=path)])
    raise ConfigError(f"{path} is neither a gendd fine-tune folder nor a diffusers DiT folder")


def load_finetuned_backbone(base: Backbone, chunk_path: str | os.PathLike) -> Backbone:
    """The fine-tuned DiT of ``chunk_path`` with ``base``'s VAE, schedule and meta (fine-tuning changes
    the DiT only), on ``base``'s device, dtype and execution settings; ``source_path`` names the folder."""
    tr = _diffusers().DiTTransformer2DModel.from_pretrained(chunk_path, subfolder="transformer",
                                                            torch_dtype=base.dtype)
    bb = Backbone(base.vae, tr.to(base.device).eval(), base.scheduler_config, base.meta)
    bb.source_path = str(chunk_path)
    return bb.set_execution(base.precision, compile=base._compiled is not None)
