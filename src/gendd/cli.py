"""The ``gendd`` command: a thin layer that parses options, builds configs and calls the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from gendd.errors import GenddError


def _report(message: str) -> None:
    """A command's closing line, printed once: by rank 0 under torchrun, by the process otherwise."""
    from gendd.distributed import current_world

    if current_world().is_main:
        typer.echo(message)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="gendd: generative dataset distillation with latent diffusion models.",
                  context_settings={"show_default": True})
backbone_app = typer.Typer(no_args_is_help=True, help="Train, inspect and sample latent diffusion backbones.",
                           context_settings={"show_default": True})
app.add_typer(backbone_app, name="backbone")
teacher_app = typer.Typer(no_args_is_help=True, help="Train teachers for the soft-label evaluation protocols.",
                          context_settings={"show_default": True})
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("train")
def teacher_train(
    out: Path = typer.Option(..., help="Output folder: teacher.pt (re-run to resume from teacher.ckpt)."),
    data: str = typer.Option("fashion-mnist", help="Dataset name (see `gendd datasets`); its real train split."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root folder (ImageFolder datasets)."),
    student: str = typer.Option("resnet18_bn", help="Teacher network (the references use ResNet-18; "
                                "convnet3 trains in minutes on a CPU)."),
    epochs: int = typer.Option(30, help="Training epochs."),
    batch_size: int = typer.Option(256, help="Batch size."),
    lr: float = typer.Option(0.1, help="SGD learning rate (cosine-decayed per epoch); 0.1 is the ResNet recipe, "
                             "DC's ConvNets do better at 0.01 (BENCHMARKS.md §9)."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast only where the hardware has native bf16), "
                                  "fp32 or bf16."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train a teacher on a dataset's real training split (resumable) and save <out>/teacher.pt."""
    from gendd.data import get_dataset
    from gendd.evaluate.students import student_builder
    from gendd.evaluate.teacher import TeacherConfig, train_teacher

    # checked before any data is read
    cfg = TeacherConfig(epochs=epochs, batch_size=batch_size, lr=lr, precision=precision)
    student_builder(student)
    train = get_dataset(data, "train", root=data_root)
    test = get_dataset(data, "test", root=data_root)
    t = train_teacher(train, test, student, cfg, out, progress=not quiet)
    acc = "n/a" if t.test_acc is None else f"{t.test_acc:.2f}%"
    typer.echo(f"teacher {student} ({test.split} accuracy {acc}) -> {t.path}")


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
    option: list[str] = typer.Option([], "--set", help="Further BackboneTrainConfig option key=value "
                                     "(repeatable), e.g. latent_channels=8, lr_schedule=cosine, "
                                     "vae_precision=auto, ema_decay=0.9995, init_from=fashion-mnist-v2 "
                                     "(continue training a shipped backbone or folder)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train a VAE, then a class-conditional DiT on its latents (resumable)."""
    from gendd.backbone.train import BackboneTrainConfig, train_backbone
    from gendd.config import build_config
    from gendd.data import get_dataset
    from gendd.pipeline import backbone_folder, parse_options

    opts = dict(image_size=image_size, vae_steps=vae_steps, dit_steps=dit_steps, dit_layers=dit_layers,
                dit_hidden=dit_hidden, dit_heads=dit_heads, default_cfg_scale=cfg_scale,
                checkpoint_every=checkpoint_every, seed=seed)
    opts.update(parse_options(option))
    if isinstance(opts.get("init_from"), str):  # a shipped name names its package folder
        opts["init_from"] = str(backbone_folder(opts["init_from"]))
    cfg = build_config(BackboneTrainConfig, opts, "backbone train")
    ds = get_dataset(data, "train", root=data_root)
    train_backbone(ds, out, cfg, progress=not quiet)
    typer.echo(f"backbone written to {out}")


@backbone_app.command("snapshot")
def backbone_snapshot(
    run: Path = typer.Option(..., help="A `gendd backbone train` output folder, finished or still training."),
    out: Path = typer.Option(..., help="Backbone folder to write (diffusers format)."),
    data: str = typer.Option("fashion-mnist", help="The run's dataset name."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root folder (ImageFolder datasets)."),
) -> None:
    """Write the backbone of a training run as of its last DiT checkpoint (EMA weights), to measure it early."""
    from gendd.backbone.train import snapshot_backbone
    from gendd.data import get_dataset

    snapshot_backbone(get_dataset(data, "train", root=data_root), run, out)
    record = json.loads((out / "snapshot.json").read_text())  # step and content hash, computed once
    typer.echo(f"backbone of {run} at DiT step {record['dit_step']} -> {out} ({record['content_hash']})")


@backbone_app.command("sample")
def backbone_sample(
    out: Path = typer.Option(..., help="PNG grid to write (one row per class)."),
    backbone: str = typer.Option("fashion-mnist", help="Shipped name, diffusers folder or hub id."),
    vae: Optional[str] = typer.Option(None, help="Separate AutoencoderKL folder/hub id."),
    per_class: int = typer.Option(10, help="Samples per class."),
    classes: int = typer.Option(10, help="First N classes."),
    sampler: str = typer.Option("ddpm", help="ddpm or ddim."),
    steps: int = typer.Option(50, help="Sampling steps."),
    cfg_scale: Optional[float] = typer.Option(None, help="Guidance scale (default: the backbone's)."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Sample a grid of class-conditional images from a backbone (class-sharded under torchrun), guided at the
    backbone's default noise levels (its ``default_cfg_interval``)."""
    from gendd.backbone import SamplerConfig
    from gendd.distributed import current_world
    from gendd.errors import ConfigError
    from gendd.export import save_grid
    from gendd.methods.dit import resolve_cfg_interval
    from gendd.pipeline import resolve_backbone, sample_preview

    for name, value in (("--per-class", per_class), ("--classes", classes)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    # the sampler options are checked before the backbone is loaded (its default scale stands in for None)
    SamplerConfig(sampler, steps, 1.0 if cfg_scale is None else cfg_scale)
    bb = resolve_backbone(backbone, vae)
    if bb.text_conditioned:
        raise ConfigError("backbone sample draws the labels of a class-conditional backbone; sample a text-to-image "
                          "backbone for a dataset's classes with `gendd distill dit --data NAME --backbone PATH`")
    scale = bb.meta.default_cfg_scale if cfg_scale is None else cfg_scale
    config = SamplerConfig(sampler, steps, scale, cfg_interval=resolve_cfg_interval("auto", bb))
    images = sample_preview(bb, min(classes, bb.num_classes), per_class, config, seed)
    if current_world().is_main:
        save_grid(images, per_class, out)
        typer.echo(f"wrote {out}")


@backbone_app.command("info")
def backbone_info(backbone: str = typer.Argument("fashion-mnist", help="Shipped name, folder or hub id.")) -> None:
    """Print a backbone's geometry, classes, schedule and content hash."""
    import json
    from dataclasses import asdict

    from gendd.pipeline import resolve_backbone

    bb = resolve_backbone(backbone)
    info = {"kind": "text-to-image" if bb.text_conditioned else "class-conditional",
            "latent_shape": bb.latent_shape, "num_classes": bb.num_classes, "learned_sigma": bb.learned_sigma,
            "scaling_factor": bb.scaling_factor, "hash": bb.content_hash(), "meta": asdict(bb.meta),
            "parameters": {name: sum(p.numel() for p in module.parameters())
                           for name, module in bb.components()}}
    typer.echo(json.dumps(info, indent=2))


@backbone_app.command("quality")
def backbone_quality(
    out: Path = typer.Option(..., help="Output folder (quality.json, quality.md, the grids); re-run to resume."),
    backbone: str = typer.Option("fashion-mnist", help="Shipped name or diffusers folder."),
    data: str = typer.Option("fashion-mnist", help="Dataset name."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root folder (ImageFolder datasets)."),
    workers: int = typer.Option(1, help="Evaluation processes (one per core is the fast arrangement)."),
    option: list[str] = typer.Option([], "--set", help="QualityConfig option key=value (repeatable), e.g. "
                                     "cfg_scales=[1,2,3], ceiling_ipc=[10,50], sweep_ipc=[10], repeats=2, "
                                     "profile=quick, samples_per_class=100, classifier=runs/teacher."),
    quiet: bool = typer.Option(False, help="No progress output."),
) -> None:
    """Reconstruction error, reconstruction ceiling, samples per CFG scale and the downstream CFG sweep."""
    from gendd.config import build_config
    from gendd.pipeline import parse_options
    from gendd.quality import QualityConfig, run_quality

    opts = {"backbone": backbone, "data": data, "workers": workers,
            "data_root": str(data_root) if data_root else None, **parse_options(option)}
    cfg = build_config(QualityConfig, opts, "backbone quality")
    run_quality(cfg, out, progress=not quiet)
    typer.echo((Path(out) / "quality.md").read_text())
    typer.echo(f"written to {out}/quality.json and quality.md")


@app.command("datasets")
def datasets_cmd() -> None:
    """List the dataset names gendd reads."""
    from gendd.data import DATASET_NAMES

    for n in DATASET_NAMES:
        typer.echo(n)


@app.command("methods")
def methods_cmd() -> None:
    """List the registered distillation methods and their options."""
    import dataclasses

    from gendd.methods import available_methods, get_method

    for name in available_methods():
        cls = get_method(name)
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.config_class))
        typer.echo(f"{name:10s} {cls.summary}\n{'':10s} options: {opts}")


@app.command("cache")
def cache_cmd(
    data: str = typer.Option("fashion-mnist", help="Dataset name."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root (ImageFolder datasets)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone (default: the dataset's shipped one)."),
    vae: Optional[str] = typer.Option(None, help="Separate AutoencoderKL folder/hub id."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (default $GENDD_CACHE or ~/.cache/gendd/latents)."),
    flip: bool = typer.Option(False, help="Also cache horizontally flipped images."),
    sample_posterior: bool = typer.Option(False, "--sample", help="Cache z ~ q(z|x) instead of its mean."),
) -> None:
    """Encode a dataset's training split into the latent cache (resumable)."""
    from gendd.cache import EncodeSpec, LatentCache
    from gendd.data import get_dataset
    from gendd.pipeline import default_backbone_for, resolve_backbone

    spec = backbone or default_backbone_for(data)
    if spec is None:
        raise typer.BadParameter("--backbone is required for this dataset")
    ds = get_dataset(data, "train", root=data_root)
    cache = LatentCache.build(ds, resolve_backbone(spec, vae), cache_dir,
                              EncodeSpec(sample=sample_posterior, flip=flip))
    _report(f"latents cached in {cache.root}")


@app.command("distill")
def distill_cmd(
    method: str = typer.Argument(..., help="Method name (see `gendd methods`)."),
    out: Path = typer.Option(..., help="Output folder: <class>/<i>.png + latents/ + manifest.json."),
    data: str = typer.Option("fashion-mnist", help="Dataset name (see `gendd datasets`)."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root (ImageFolder datasets)."),
    ipc: int = typer.Option(10, help="Images per class."),
    backbone: Optional[str] = typer.Option(None, help="Shipped name, a diffusers DiT or Stable Diffusion folder, or a hub id in the local cache (default: the dataset's)."),
    vae: Optional[str] = typer.Option(None, help="Separate AutoencoderKL folder/hub id."),
    seed: int = typer.Option(0, help="Seed (one generator per class)."),
    option: list[str] = typer.Option([], "--set", help="Method option key=value (repeatable)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Latent cache root."),
    overwrite: bool = typer.Option(False, help="Replace a folder that holds a different run."),
    class_batch: int = typer.Option(1, help="Classes sampled in one request (GPU throughput; 1 = one at a "
                                            "time, bit-exact; more = equal up to float rounding)."),
    precision: str = typer.Option("fp32", help="Autocast of the denoiser: fp32 (exact, default), bf16 or fp16 "
                                               "(GPU throughput; recorded in the run's identity)."),
    compile: bool = typer.Option(False, "--compile", help="Run the denoiser through torch.compile."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Distil a dataset with a method; resumes an interrupted run in the same folder."""
    from gendd.pipeline import parse_options, run_distill

    opts = {"seed": seed, **parse_options(option)}
    m = run_distill(method, data, ipc, out, data_root=data_root, backbone=backbone, vae=vae, options=opts,
                    cache_dir=cache_dir, progress=not quiet, overwrite=overwrite, class_batch=class_batch,
                    precision=precision, compile=compile)
    _report(f"{method}: {len(m['classes_done'])} classes, {m['seconds_total']:.1f} s -> {out}")


@app.command("evaluate")
def evaluate_cmd(
    folder: Path = typer.Argument(..., help="Distilled folder (<class>/<i>.png)."),
    data: Optional[str] = typer.Option(None, help="Dataset whose test split is used (default: from manifest)."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root (ImageFolder datasets)."),
    profile: str = typer.Option("quick", help="Protocol profile: paper (1000 epochs x 5) or quick (DC/DSA); "
                                "idc-hard, idc-hard-small, idc-hard-quick (IDC hard-label); rded-soft, "
                                "d3hr-soft, rded-soft-quick (soft-label, need --teacher)."),
    epochs: Optional[int] = typer.Option(None, help="Override the profile's epochs."),
    repeats: Optional[int] = typer.Option(None, help="Override the profile's repeats."),
    student: Optional[str] = typer.Option(None, help="Override the profile's student network."),
    teacher: Optional[Path] = typer.Option(None, help="Teacher checkpoint for soft-label profiles (teacher.pt, "
                                           "its folder, or a torchvision ResNet-18 state_dict)."),
    precision: Optional[str] = typer.Option(None, help="Override the profile's precision policy: auto (bf16 "
                                            "autocast only where the hardware has native bf16), fp32 or bf16."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train students on a distilled set under a protocol profile and test on the real test split."""
    from gendd.pipeline import format_row, run_evaluate

    overrides = {k: v for k, v in {"epochs": epochs, "repeats": repeats, "precision": precision,
                                   "student": student,
                                   "teacher": None if teacher is None else str(teacher)}.items()
                 if v is not None}
    s = run_evaluate(folder, data=data, data_root=data_root, profile=profile, overrides=overrides,
                     progress=not quiet)
    typer.echo(f"{folder}: {format_row(s)}")


@app.command("finetune")
def finetune_cmd(
    out: Path = typer.Option(..., help="Output folder (diffusers format; re-run to resume)."),
    data: str = typer.Option("fashion-mnist", help="Dataset name."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root (ImageFolder datasets)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone to fine-tune (default: the dataset's shipped one)."),
    vae: Optional[str] = typer.Option(None, help="Separate AutoencoderKL folder/hub id."),
    eviction: str = typer.Option("max-similarity", help="Memory eviction: fifo (Minimax), max-similarity "
                                 "(self-adaptive memory), min-similarity."),
    option: list[str] = typer.Option([], "--set", help="FinetuneConfig option key=value (repeatable), e.g. "
                                     "steps=12000, lambda_real=0.002, parameter_efficient=false."),
    cache_dir: Optional[Path] = typer.Option(None, help="Latent cache root."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Minimax-style fine-tuning of the DiT with representativeness/diversity memories (resumable).

    Options not set with --set take the backbone folder's gendd_finetune.json values if it has one
    (the shipped Fashion-MNIST backbone: 12000 steps, latent means), else the DiT-XL/2 reference defaults."""
    from gendd.backbone.finetune import FinetuneConfig, finetune_dataset
    from gendd.data import get_dataset
    from gendd.pipeline import default_backbone_for, parse_options, resolve_backbone

    spec = backbone or default_backbone_for(data)
    if spec is None:
        raise typer.BadParameter("--backbone is required for this dataset")
    from gendd.backbone.backbone import read_finetune_defaults
    from gendd.config import build_config
    from gendd.pipeline import backbone_folder

    # the folder's gendd_finetune.json, read without loading the model: bad options fail before any loading
    defaults = {k: v for k, v in read_finetune_defaults(backbone_folder(spec)).items() if k != "eviction"}
    cfg = build_config(FinetuneConfig, {"eviction": eviction, **defaults, **parse_options(option)}, "finetune")
    ds = get_dataset(data, "train", root=data_root)
    finetune_dataset(ds, resolve_backbone(spec, vae), out, cfg, cache_dir=cache_dir, progress=not quiet)
    _report(f"fine-tuned backbone written to {out}")


@app.command("d3hr-regenerate")
def d3hr_regenerate_cmd(
    statistics: Path = typer.Argument(..., help="A d3hr output folder (or its latents/) holding mean/variance."),
    out: Path = typer.Option(..., help="Output folder (a distilled set: <class>/<i>.png, manifest); re-run to resume."),
    backbone: Optional[str] = typer.Option(None, help="The backbone the statistics were made with (default: the "
                                           "dataset's shipped one)."),
    vae: Optional[str] = typer.Option(None, help="Separate AutoencoderKL folder/hub id."),
    data: Optional[str] = typer.Option(None, help="Dataset of the classes (default: the one in the statistics "
                                       "folder's manifest)."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root (default: the one in that manifest)."),
    ipc: int = typer.Option(10, help="Images per class to generate."),
    seed: int = typer.Option(0, help="Seed (per-class generators as in `distill`)."),
    option: list[str] = typer.Option([], "--set", help="d3hr option key=value (repeatable)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Regenerate a D3HR distilled set from its stored per-class statistics and the backbone alone: the
    ``d3hr-regenerate`` method, exported like every method (manifest with file hashes, resumable)."""
    import json

    from gendd.config import build_config
    from gendd.errors import DataError
    from gendd.export import check_ipc
    from gendd.methods.d3hr import D3HRRegenerateConfig
    from gendd.pipeline import parse_options, recorded_data_root, run_distill

    opts = {"seed": seed, **parse_options(option), "statistics": str(statistics)}
    build_config(D3HRRegenerateConfig, opts, "method 'd3hr-regenerate'")
    check_ipc(ipc)
    if not statistics.exists():
        raise DataError(f"statistics folder {statistics} does not exist; pass a d3hr output folder")
    manifest = statistics / "manifest.json"
    recorded = json.loads(manifest.read_text()) if manifest.is_file() else {}
    data = data or recorded.get("dataset", {}).get("name")
    if data is None:
        raise DataError(f"{statistics} has no manifest.json naming its dataset; pass --data")
    root = data_root or recorded_data_root(statistics, recorded, data)
    backbone = backbone or (recorded.get("backbone") or {}).get("path")
    run_distill("d3hr-regenerate", data, ipc, out, data_root=root, backbone=backbone, vae=vae, options=opts,
                progress=not quiet)
    _report(f"regenerated {ipc} images per class -> {out}")


def _check_run_args(methods: list[str], ipc: int, profile: str, workers: int | None) -> None:
    """`gendd run`'s arguments, checked before anything is distilled."""
    from gendd.errors import ConfigError
    from gendd.evaluate import get_profile
    from gendd.export import check_ipc
    from gendd.methods import build_method

    if not methods:
        raise ConfigError("--methods is empty; pass e.g. --methods random,dit")
    for m in methods:
        build_method(m)
    check_ipc(ipc)
    get_profile(profile)
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")


@app.command("run")
def run_cmd(
    out: Path = typer.Option(Path("runs/main"), help="Output folder (a `gendd bench` folder; re-run to resume)."),
    ipc: int = typer.Option(10, help="Images per class."),
    methods: str = typer.Option("random,dit,mgd3", help="Comma-separated methods."),
    profile: str = typer.Option("demo", help="Evaluation profile: demo (minutes on a laptop CPU), quick (300 "
                                "epochs x 3 students) or paper (1000 x 5)."),
    workers: Optional[int] = typer.Option(None, help="Evaluation processes (default: one per CPU core)."),
    quiet: bool = typer.Option(False, help="No progress output."),
) -> None:
    """Main job: distil Fashion-MNIST with each method, evaluate each set, print the table."""
    from gendd.bench import main_job

    names = [m.strip() for m in methods.split(",") if m.strip()]
    _check_run_args(names, ipc, profile, workers)
    main_job(out, methods=tuple(names), ipc=ipc, profile=profile, workers=workers, progress=not quiet)
    typer.echo((out / "results.md").read_text())
    if profile == "demo":
        from gendd.evaluate import get_profile

        demo = get_profile("demo")
        typer.echo(f"demo profile: {demo.epochs} epochs x {demo.repeats} students. The full evaluation of the same sets: "
                   f"gendd run --profile quick --methods {','.join(names)} --ipc {ipc} --out {out}")


@app.command("bench")
def bench_cmd(
    config: Path = typer.Argument(..., help="Grid config (TOML): methods x IPC x students x protocols x repeats."),
    out: Optional[Path] = typer.Option(None, help="Bench folder (default: the config's `out`, else "
                                       "runs/bench/<name>); re-run to resume."),
    workers: Optional[int] = typer.Option(None, help="Evaluation processes (default: the config's `workers`)."),
    quiet: bool = typer.Option(False, help="No progress output."),
    collect_only: bool = typer.Option(False, help="Run nothing: tabulate the finished sets and students."),
) -> None:
    """Run a benchmark grid (resumable): distil each (method, IPC) once, train every student once, write
    results.md / results.csv / results.json (see gendd.bench for the TOML schema)."""
    from gendd.bench import BenchConfig, run_bench
    from gendd.errors import ConfigError

    cfg = BenchConfig.from_toml(config)  # validated: nothing runs on a bad grid
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    folder = Path(out or cfg.out or Path("runs/bench") / cfg.name)
    run_bench(cfg, folder, workers=workers, progress=not quiet, collect_only=collect_only)
    typer.echo((folder / "results.md").read_text())
    typer.echo(f"results in {folder}")


@app.command("report")
def report_cmd(
    bench_dir: Path = typer.Argument(..., help="A `gendd bench` output folder."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default: BENCH_DIR/report.html)."),
    tsne: bool = typer.Option(True, "--tsne/--no-tsne", help="Per-class t-SNE of real vs distilled latents."),
    max_images: int = typer.Option(20, help="Images shown per set and class."),
) -> None:
    """Render one self-contained HTML report (tables, accuracy-vs-IPC plots, image grids, t-SNE); prints its path."""
    from gendd.report import render_report

    typer.echo(str(render_report(bench_dir, out, tsne=tsne, max_images=max_images)))


def main() -> None:
    """Entry point: GenddError -> one line on stderr, exit status 2. Under ``torchrun`` the ranks join one
    process group first (:mod:`gendd.distributed`)."""
    from gendd.distributed import init_from_env, shutdown
    from gendd.hardware import tune_allocator

    tune_allocator()
    try:
        init_from_env()
        app()
    except GenddError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
