"""``gendd bench``: a benchmark grid (methods x IPC x students x protocols x repeats) from one TOML file.

Layout of a bench folder::

    <out>/config.json                      # the validated config, its hash and the git revision
    <out>/sets/<method>-ipc<ipc>/          # one distilled set per (method, IPC) (gendd.export layout),
                                           #   with eval-<tag>.partial.json / eval-<tag>.json per protocol
    <out>/metrics/<method>-ipc<ipc>.json   # set_metrics in the VAE latent space (``metrics = true``)
    <out>/metrics/<method>-ipc<ipc>.safetensors, real-latents.safetensors   # flattened latents (report)
    <out>/metrics/<method>-ipc<ipc>.teacher.json   # set_metrics in the teacher's feature space (``metrics_teacher``)
    <out>/real/<class>/<i>.png             # a few real training images per class (report)
    <out>/results.{md,csv,json}

Cells and resume: a set is distilled once (sequentially, in this process: methods may share the
latent cache and fine-tuned backbones, which are not written for concurrent use) and skipped when its
manifest is complete for the same method, options and IPC; a re-run whose backbone has other weights than
the one recorded in ``config.json`` is refused (:func:`check_backbone_unchanged`). An evaluation cell is one student
(set, protocol, student, seed); its result is merged into the set's partial file by
:func:`gendd.pipeline.run_evaluate` as soon as it finishes, so a killed bench loses at most the cells
in flight and a re-run trains only missing students. Evaluation cells run in ``workers`` processes
(spawn context), each with ``threads`` torch threads.

TOML schema (every key optional unless marked)::

    name = "fmnist-small"        # used for the default output folder runs/bench/<name>
    out = "runs/bench/x"         # output folder (CLI --out wins)
    data = "fashion-mnist"       # dataset name; data_root for ImageFolder datasets
    data_root = "/data/x"
    backbone = "fashion-mnist"   # default: the dataset's shipped backbone; vae = separate VAE
    cache_dir = "..."            # latent cache root (default $GENDD_CACHE or ~/.cache/gendd/latents)
    methods = ["random", "dit"]  # REQUIRED: method labels (a registered method, or a [method.<label>] table)
    ipc = [1, 10]                # REQUIRED: int or list
    students = ["convnet3"]      # registered student names
    protocols = ["quick"]        # profile names, or names defined in [protocol.<name>]; [] = sets and metrics only
    repeats = 3                  # students per cell (default: each protocol's own)
    seed = 0                     # distillation seed (a method table may set its own)
    workers = 1                  # evaluation processes
    compile = false              # torch.compile the students (speed only, not part of the protocol)
    threads = 1                  # torch threads per evaluation process
    metrics = false              # set metrics in the VAE latent space (needs a backbone)
    metrics_backbone = "fashion-mnist-v1"   # whose VAE latent space (default: the grid's backbone and vae);
                                 #   one space for sets of different backbones
    metrics_real_per_class = 1000   # real latents per class for the metrics (seeded subsample)
    metrics_k = 5                # k of precision/recall/density/coverage
    metrics_teacher = "runs/t"   # also the set metrics in this teacher's penultimate-layer feature space
    tsne_real_per_class = 300    # real latents per class kept for the report's t-SNE
    real_images_per_class = 10   # real images per class kept for the report
    baseline = "random"          # method label of the random-subset baseline (IOR, LRS, ARS)
    real_accuracy = {convnet3 = 93.0}   # full-data accuracy per student (%): enables LRS (hard labels)
    ars_protocols = ["quick", "quick-noaug"]   # [with augmentation, without]: enables ARS
    score_weight = 0.5           # DD-Ranking's lrs_lambda / ars_lambda

    [method.dit]                 # options of a method label (`gendd methods` lists them)
    cfg_scale = 3.0
    [method.dit-ddim]            # a variant: label dit-ddim runs method dit
    method = "dit"
    sampler = "ddim"

    [protocol.quick]             # overrides of the profile's protocol fields
    epochs = 300
    [protocol.quick-noaug]       # a new protocol: base profile + overrides
    profile = "quick"
    dsa_strategy = "none"
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, ClassVar

from gendd.config import Validated, check
from gendd.errors import ConfigError, DataError, GenddError
from gendd.pipeline import evaluation_done_seeds, run_distill, run_evaluate
from gendd.artifacts import atomic_write, commit_dir, identity, write_json, write_text
from gendd.distributed import current_world

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class MethodSpec:
    """One method label of the grid: the registered ``method`` and its options."""

    label: str
    method: str
    options: dict[str, Any]


@dataclass(frozen=True)
class ProtocolSpec:
    """One protocol of the grid: a registered ``profile`` with field ``overrides``."""

    name: str
    profile: str
    overrides: dict[str, Any]


def _as_list(value: Any) -> list:
    """A TOML scalar as a one-item list (``ipc = 10`` is ``ipc = [10]``); the field checks do the rest."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _dataset_names() -> tuple[str, ...]:
    from gendd.data import DATASET_NAMES

    return DATASET_NAMES


_PATH = (str, os.PathLike)
_NAMES = check(list, min_length=1, items=check(str))


@dataclass
class BenchConfig(Validated):
    """A benchmark grid; see the module docstring for the TOML schema. Validated on construction."""

    config_what: ClassVar[str] = "bench config"

    methods: list[str] = field(metadata=_NAMES)
    ipc: list[int] = field(metadata=check(list, min_length=1, items=check(Integral, ge=1)))
    students: list[str] = field(default_factory=lambda: ["convnet3"], metadata=_NAMES)
    protocols: list[str] = field(default_factory=lambda: ["quick"], metadata=check(list, items=check(str)))
    repeats: int | None = field(default=None, metadata=check(Integral, ge=1, optional=True))
    name: str = field(default="bench", metadata=check(str, min_length=1))
    out: str | None = field(default=None, metadata=check(*_PATH, optional=True))
    data: str = field(default="fashion-mnist", metadata=check(choices=_dataset_names))
    data_root: str | None = field(default=None, metadata=check(*_PATH, optional=True))
    backbone: str | None = field(default=None, metadata=check(*_PATH, optional=True))
    vae: str | None = field(default=None, metadata=check(*_PATH, optional=True))
    cache_dir: str | None = field(default=None, metadata=check(*_PATH, optional=True))
    seed: int = field(default=0, metadata=check(Integral))
    method: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=check(dict, items=check(dict)))
    protocol: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=check(dict, items=check(dict)))
    workers: int = field(default=1, metadata=check(Integral, ge=1))
    threads: int = field(default=1, metadata=check(Integral, ge=1))
    compile: bool = field(default=False, metadata=check(bool))
    metrics: bool = field(default=False, metadata=check(bool))
    metrics_backbone: str | None = field(default=None, metadata=check(*_PATH, optional=True, min_length=1))
    metrics_real_per_class: int = field(default=1000, metadata=check(Integral, ge=2))
    metrics_k: int = field(default=5, metadata=check(Integral, ge=1))
    metrics_teacher: str | None = field(default=None, metadata=check(*_PATH, optional=True, min_length=1))
    tsne_real_per_class: int = field(default=300, metadata=check(Integral, ge=2))
    real_images_per_class: int = field(default=10, metadata=check(Integral, ge=2))
    baseline: str = field(default="random", metadata=check(str))
    real_accuracy: dict[str, float] = field(default_factory=dict,
                                            metadata=check(dict, items=check(Real, ge=0, le=100)))
    ars_protocols: list[str] = field(default_factory=list, metadata=check(list, items=check(str)))
    score_weight: float = field(default=0.5, metadata=check(Real, ge=0, le=1))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(d) - set(known))
        if bad:
            raise ConfigError(f"bench config has unknown key(s) {', '.join(bad)}; known: {', '.join(known)}")
        for req in ("methods", "ipc"):
            if req not in d:
                raise ConfigError(f"bench config needs {req!r} (e.g. methods = [\"random\", \"dit\"], ipc = [1, 10])")
        d = dict(d)
        for key in ("methods", "ipc", "students", "protocols", "ars_protocols"):
            if key in d:
                d[key] = _as_list(d[key])
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "BenchConfig":
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as err:
            raise ConfigError(f"cannot read bench config {path}: {err}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"bench config {path} is not valid TOML: {err}") from None
        raw.setdefault("name", path.stem)
        return cls.from_dict(raw)

    # ------------------------------------------------------------------ validation
    def _check_fields(self) -> None:
        """The rules between fields and against the registries (types and ranges are the fields' checks)."""
        from gendd.evaluate import PROFILES
        from gendd.evaluate.students import student_builder
        from gendd.methods import build_method, get_method
        from gendd.pipeline import default_backbone_for

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(len(set(self.methods)) == len(self.methods), f"methods has duplicates: {self.methods}")
        need(len(set(self.ipc)) == len(self.ipc), f"ipc has duplicates: {self.ipc}")
        for label in self.methods:
            need(bool(_LABEL.match(label)), f"method label {label!r} must be letters, digits, _ . + -")
        for spec in self.method_specs():
            try:
                get_method(spec.method)
                build_method(spec.method, **{"seed": self.seed, **spec.options})
            except GenddError as err:  # named by its label, once
                msg = str(err)
                raise ConfigError(msg if msg.startswith(f"method {spec.label!r}") else
                                  f"method {spec.label!r}: {msg}") from None
        for s in self.students:
            student_builder(s)
        need(len(set(self.protocols)) == len(self.protocols), f"protocols has duplicates: {self.protocols}")
        for name in self.protocols:
            need(bool(_LABEL.match(name)), f"protocol name {name!r} must be letters, digits, _ . + -")
            table = self.protocol.get(name, {})
            need(name in PROFILES or "profile" in table,
                 f"unknown protocol {name!r}: not a profile ({', '.join(sorted(PROFILES))}) and no "
                 f"[protocol.{name}] table with profile = \"...\"")
        for spec in self.protocol_specs():
            need(spec.profile in PROFILES,
                 f"protocol {spec.name!r}: unknown profile {spec.profile!r}; choose one of {sorted(PROFILES)}")
            fields_ = {f.name for f in dataclasses.fields(PROFILES[spec.profile])} - {"name", "student"}
            bad = sorted(set(spec.overrides) - fields_)
            need(not bad, f"protocol {spec.name!r}: unknown field(s) {', '.join(bad)}; fields: "
                 f"{', '.join(sorted(fields_))} (students are the `students` axis)")
            try:
                PROFILES[spec.profile].with_overrides(**spec.overrides)
            except GenddError as err:
                raise ConfigError(f"protocol {spec.name!r}: {err}") from None
        bad = sorted(set(self.real_accuracy) - set(self.students))
        need(not bad, f"real_accuracy names students not in the grid: {bad}")
        need(not self.ars_protocols
             or (len(self.ars_protocols) == 2 and set(self.ars_protocols) <= set(self.protocols)),
             f"ars_protocols must be two protocols of the grid [with_aug, without_aug], got {self.ars_protocols}")
        need(not self.metrics or self.metrics_backbone is not None or self.backbone is not None
             or default_backbone_for(self.data) is not None,
             f"metrics = true needs a backbone (VAE) for dataset {self.data!r}: set backbone = \"...\"")

    # ------------------------------------------------------------------ derived
    def method_specs(self) -> list[MethodSpec]:
        out = []
        for label in self.methods:
            opts = dict(self.method.get(label, {}))
            name = opts.pop("method", label)
            out.append(MethodSpec(label, str(name), opts))
        return out

    def protocol_specs(self) -> list[ProtocolSpec]:
        out = []
        for name in self.protocols:
            opts = dict(self.protocol.get(name, {}))
            out.append(ProtocolSpec(name, str(opts.pop("profile", name)), opts))
        return out

    def canonical(self) -> dict[str, Any]:
        """The config as JSON-able data without ``out`` and the execution knobs (workers, threads, compile:
        :data:`gendd.artifacts.EXECUTION_KNOBS`), whose hash names the grid."""
        return identity(dataclasses.asdict(self), drop=("out",))

    def config_hash(self) -> str:
        """First 12 hex digits of the sha256 of :meth:`canonical` as sorted, compact JSON."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def backbone_spec(self) -> str | None:
        from gendd.pipeline import default_backbone_for

        return self.backbone or default_backbone_for(self.data)


@dataclass(frozen=True)
class EvalCell:
    """One student: set ``label``-ipc``ipc`` under ``protocol`` with ``student`` and ``seed``."""

    label: str
    ipc: int
    protocol: str
    student: str
    seed: int
    repeats: int = 1

    @property
    def set_name(self) -> str:
        return f"{self.label}-ipc{self.ipc}"


def git_revision(path: str | os.PathLike | None = None) -> str:
    """``git rev-parse --short HEAD`` of the folder holding gendd's sources (or ``path``), else ``"unknown"``."""
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path or Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = res.stdout.strip()
    return rev if res.returncode == 0 and rev else "unknown"


def set_folder(out: Path, label: str, ipc: int) -> Path:
    return Path(out) / "sets" / f"{label}-ipc{ipc}"


def eval_overrides(cfg: BenchConfig, proto: ProtocolSpec, student: str) -> dict[str, Any]:
    """The ``overrides`` of :func:`run_evaluate` for one (protocol, student): the protocol's overrides
    and the student, minus values equal to the profile's own (so results are shared with a plain
    ``gendd evaluate`` of the same protocol), plus the number of repeats."""
    from gendd.evaluate import PROFILES

    base = dataclasses.asdict(PROFILES[proto.profile])
    over = {**proto.overrides, "student": student}
    repeats = over.pop("repeats", None) or cfg.repeats or base["repeats"]
    over = {k: v for k, v in over.items() if base.get(k) != v}
    return {**over, "repeats": repeats}


def check_backbone_unchanged(cfg: BenchConfig, out: Path) -> str | None:
    """The content hash of the grid's backbone, after checking that the sets already in ``out`` come from it.

    A set's manifest names its options, not always the weights (a fine-tuned or text-conditioned backbone records
    its own hash), so the bench records the grid backbone's hash in ``<out>/config.json`` and refuses a re-run
    whose backbone differs: the same name retrained, or ``fashion-mnist`` after the shipped default changed.
    A folder written before the hash was recorded is checked by the backbone folder named in its sets' manifests.
    """
    spec = cfg.backbone_spec()
    sets = sorted((out / "sets").glob("*/manifest.json")) if (out / "sets").is_dir() else []
    if spec is None or not sets:
        return _backbone_hash(cfg) if spec is not None else None
    from gendd.pipeline import backbone_folder

    current = _backbone_hash(cfg)
    saved = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    where = f"{spec}{'' if cfg.vae is None else f' with VAE {cfg.vae}'}"
    if saved.get("backbone_hash") is not None:
        if saved["backbone_hash"] != current:
            raise ConfigError(f"{out} holds sets distilled from another backbone (hash {saved['backbone_hash']}); "
                              f"this grid's backbone {where} has hash {current}: choose another out")
        return current
    want = backbone_folder(spec).name
    for path in sets:  # no hash recorded: the backbone folder each set names, where it is not a fine-tune's
        rec = json.loads(path.read_text()).get("backbone") or {}
        named = Path(str(rec.get("path") or ""))
        if rec.get("path") and not (named / "finetune_config.json").exists() and named.name != want:
            raise ConfigError(f"{out} holds sets distilled from backbone {named.name!r} ({path.parent.name}); "
                              f"this grid's backbone is {where}: choose another out")
    return current


def _backbone_hash(cfg: BenchConfig) -> str:
    from gendd.pipeline import resolve_backbone

    return resolve_backbone(cfg.backbone_spec(), cfg.vae).content_hash()


def _distill_done(folder: Path, spec: MethodSpec, ipc: int, cfg: BenchConfig) -> bool:
    """True when ``folder`` holds a complete set of the same method, options, IPC and dataset."""
    from gendd.methods import build_method

    mpath = folder / "manifest.json"
    if not mpath.exists():
        return False
    m = json.loads(mpath.read_text())
    config = build_method(spec.method, **{"seed": cfg.seed, **spec.options}).config
    if hasattr(config, "resolve_finetune") and config.finetuned_backbone is None:
        # fine-tuning methods record the options resolved with the backbone folder's defaults
        from types import SimpleNamespace

        from gendd.backbone.backbone import read_finetune_defaults
        from gendd.pipeline import backbone_folder

        defaults = read_finetune_defaults(backbone_folder(cfg.backbone_spec()))
        config.finetune = config.resolve_finetune(SimpleNamespace(finetune_defaults=defaults))
    want = dataclasses.asdict(config)
    return bool(m.get("complete")) and m.get("method") == spec.method and m.get("ipc") == ipc \
        and m.get("config") == json.loads(json.dumps(want, default=str)) \
        and m.get("dataset", {}).get("name") == cfg.data


def _eval_cell_worker(job: dict) -> dict:
    """Process-pool entry: train one student (one evaluation cell) with ``threads`` torch threads."""
    import torch

    from gendd.hardware import cpu_bf16_faster, tune_allocator

    tune_allocator()
    torch.set_num_threads(job["threads"])
    if job.get("cpu_bf16_faster") is not None:
        cpu_bf16_faster(job["threads"], decided=job["cpu_bf16_faster"])
    t0 = time.time()
    summary = run_evaluate(job["folder"], data=job["data"], data_root=job["data_root"], profile=job["profile"],
                           overrides=job["overrides"], seeds=[job["seed"]], progress=False,
                           compile=job.get("compile") or None)
    run = next(r for r in summary["runs"] if r["seed"] == job["seed"])
    return {"cell": job["cell"], "seconds": time.time() - t0, "final_acc": run["final_acc"],
            "best_acc": run["best_acc"], "precision": run.get("precision", "?")}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def run_bench(cfg: BenchConfig, out: str | os.PathLike | None = None, *, workers: int | None = None,
              progress: bool = True, collect_only: bool = False) -> list[dict]:
    """Run (or resume) the grid of ``cfg`` into ``out`` and write ``results.{md,csv,json}``; return the rows.

    ``collect_only``: distil and train nothing; tabulate the finished sets and students (a missing set
    or student shows as an empty cell), e.g. to look at a grid another process is still filling."""
    out = Path(out or cfg.out or Path("runs/bench") / cfg.name)
    world = current_world()  # under torchrun: sets are distilled class-sharded, cells split across ranks
    workers = workers or cfg.workers
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    out.mkdir(parents=True, exist_ok=True)
    rev, chash = git_revision(), cfg.config_hash()
    bb_hash = check_backbone_unchanged(cfg, out)
    _write_json(out / "config.json", {"config": cfg.canonical(), "config_hash": chash, "git_rev": rev,
                                      "backbone_hash": bb_hash,
                                      "execution": {"workers": workers, "threads": cfg.threads}})
    specs, protos = cfg.method_specs(), cfg.protocol_specs()
    data_root = str(cfg.data_root) if cfg.data_root else None

    # 1. distillation cells, in this process
    t_distill: dict[str, float] = {}
    for spec in specs:
        for ipc in cfg.ipc:
            folder = set_folder(out, spec.label, ipc)
            if _distill_done(folder, spec, ipc, cfg):
                _log(progress, f"distil {folder.name}: done")
            elif collect_only:
                _log(progress, f"distil {folder.name}: not done (collect only)")
                continue
            else:
                _log(progress, f"distil {folder.name} ...")
                run_distill(spec.method, cfg.data, ipc, folder, data_root=data_root, backbone=cfg.backbone,
                            vae=cfg.vae, options={"seed": cfg.seed, **spec.options}, cache_dir=cfg.cache_dir,
                            progress=progress)
            manifest = json.loads((folder / "manifest.json").read_text())
            t_distill[folder.name] = float(manifest.get("seconds_total", float("nan")))

    # 2. real images for the report, and set metrics in the VAE latent space and the teacher's space
    with world.main_first():  # rank 0 computes and caches them, the others read the cache
        if world.is_main:
            save_real_images(cfg, out)
        set_metric = compute_bench_metrics(cfg, out, progress=progress) if cfg.metrics else {}
        teacher_metric = compute_teacher_metrics(cfg, out, progress=progress) if cfg.metrics_teacher else {}

    # 3. evaluation cells
    groups = [(spec, ipc, proto, student) for spec in specs for ipc in cfg.ipc for proto in protos
              for student in cfg.students]
    jobs = []
    for spec, ipc, proto, student in groups:
        folder = set_folder(out, spec.label, ipc)
        over = eval_overrides(cfg, proto, student)
        if collect_only:
            continue
        done = evaluation_done_seeds(folder, data=cfg.data, data_root=data_root, profile=proto.profile,
                                     overrides=over)
        for seed in range(over["repeats"]):
            if seed not in done:
                cell = EvalCell(spec.label, ipc, proto.name, student, seed, over["repeats"])
                jobs.append({"cell": cell, "folder": str(folder), "data": cfg.data, "data_root": data_root,
                             "profile": proto.profile, "overrides": over, "seed": seed, "threads": cfg.threads,
                             "compile": cfg.compile})
    total = sum(eval_overrides(cfg, p, s)["repeats"] for _, _, p, s in groups)
    if collect_only:
        _log(progress, f"evaluation: collect only ({total} cells in the grid; nothing is trained)")
    else:
        _log(progress, f"evaluation: {len(jobs)} of {total} cells to run ({total - len(jobs)} done) "
                       f"in {workers} process(es) x {cfg.threads} thread(s)")
    world.barrier()  # every rank has listed the same missing cells before any is trained
    _run_jobs(world.shard(jobs), workers, progress)
    world.barrier()

    # 4. results
    rows = collect_rows(cfg, out, groups, t_distill, set_metric, rev, chash, teacher_metric)
    if world.is_main:
        write_results(cfg, out, rows, set_metric, rev, chash, teacher_metric)
    world.barrier()
    return rows


def _decide_precision(jobs: list[dict]) -> None:
    """Probe bf16 against fp32 once here and hand the answer to every job (``cpu_bf16_faster``): worker
    processes timing it each on their own could disagree on a loaded machine, and one run would then
    pool two precisions."""
    import torch

    from gendd.hardware import cpu_bf16_faster, cpu_bf16_native

    if not cpu_bf16_native():
        return
    old = torch.get_num_threads()
    try:
        for threads in sorted({job["threads"] for job in jobs}):
            torch.set_num_threads(threads)
            decided = cpu_bf16_faster(threads)
            for job in jobs:
                if job["threads"] == threads:
                    job["cpu_bf16_faster"] = decided
    finally:
        torch.set_num_threads(old)


def worker_devices(workers: int, gpus: int | None = None, local_rank: int | None = None) -> list[str | None]:
    """The device of each of this rank's evaluation workers: one visible GPU each, round robin (after the GPUs
    of the node's lower ranks under torchrun: ``LOCAL_RANK * workers + i``), or None (the CPU; ``$GENDD_DEVICE``
    keeps its say) when there is no GPU."""
    import torch

    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if os.environ.get("GENDD_DEVICE", "").strip() or gpus < 1:
        return [None] * workers
    return [f"cuda:{(local_rank * workers + i) % gpus}" for i in range(workers)]


def _pin_worker(devices) -> None:
    """Process-pool initializer: take one device off the queue for this worker's students."""
    device = devices.get()
    if device is not None:
        os.environ["GENDD_DEVICE"] = device


def _run_jobs(jobs: list[dict], workers: int, progress: bool) -> None:
    """Run evaluation cells inline (``workers == 1``) or in a spawn process pool. On the first failure
    no new cell starts; cells in flight finish (their students are saved), then the error is raised."""
    import torch

    seconds: list[float] = []

    def report(k: int, res: dict) -> None:
        c = res["cell"]
        seconds.append(res["seconds"])
        left = (len(jobs) - k) * sum(seconds) / len(seconds) / max(1, min(workers, len(jobs) - k))
        _log(progress, f"  [{k}/{len(jobs)}] {c.set_name} {c.protocol} {c.student} student {c.seed + 1}/{c.repeats}: "
                       f"final {res['final_acc']:.2f} % (best {res['best_acc']:.2f}), {res['precision']}, "
                       f"{res['seconds']:.0f} s" + (f" | about {_duration(left)} left" if k < len(jobs) else ""))

    if not jobs:
        return
    if workers > 1:
        _decide_precision(jobs)
    if workers == 1:
        old = torch.get_num_threads()
        try:
            for k, job in enumerate(jobs, 1):
                report(k, _eval_cell_worker(job))
        finally:
            torch.set_num_threads(old)
        return
    ctx = mp.get_context("spawn")
    n = min(workers, len(jobs))
    devices = ctx.Queue()
    for d in worker_devices(n):
        devices.put(d)
    pool = cf.ProcessPoolExecutor(n, mp_context=ctx, initializer=_pin_worker, initargs=(devices,))
    error: BaseException | None = None
    try:
        futures = [pool.submit(_eval_cell_worker, job) for job in jobs]
        for k, fut in enumerate(cf.as_completed(futures), 1):
            try:
                report(k, fut.result())
            except BaseException as err:  # noqa: BLE001 - re-raised below
                error = err
                break
    except BaseException as err:  # KeyboardInterrupt in the main process
        error = err
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if error is not None:
        raise error


# ---------------------------------------------------------------------- real images and metrics
def save_real_images(cfg: BenchConfig, out: Path) -> None:
    """``<out>/real/<class>/<i>.png``: ``real_images_per_class`` seeded random training images per class."""
    import torch

    from gendd.data import get_dataset
    from gendd.export import save_png

    ds = get_dataset(cfg.data, "train", root=cfg.data_root)
    n = cfg.real_images_per_class
    for c, name in enumerate(ds.classes):
        folder = out / "real" / name
        if folder.is_dir() and len(list(folder.glob("*.png"))) >= min(n, len(ds.class_indices(c))):
            continue
        idx = ds.class_indices(c)
        # a stream of its own: with seed c it would repeat the `random` method's subset (seed 0, class c)
        pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(7_919_000 + c))[:n].numpy()]
        tmp = out / "real" / f".partial-{name}"
        tmp.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(ds.load(pick)):
            save_png(img, tmp / f"{i}.png")
        commit_dir(tmp, folder)


def _distilled_latents(folder: Path, classes: list[str], channels: int, bb) -> tuple[dict[str, Any], str]:
    """Per class the distilled latents: ``latents/<class>.safetensors["latents"]`` when stored with the
    backbone's latent shape, else the posterior means of the exported PNGs (``encoded``)."""
    import torch
    from safetensors.torch import load_file

    from gendd.data.base import to_float
    from gendd.data.imagefolder import load_image_dir

    stored: dict[str, Any] = {}
    for name in classes:
        f = folder / "latents" / f"{name}.safetensors"
        if f.exists():
            z = load_file(str(f)).get("latents")
            if z is not None and tuple(z.shape[1:]) == tuple(bb.latent_shape):
                stored[name] = z
    if len(stored) == len(classes):
        return stored, "stored"
    ds = load_image_dir(folder, classes, channels)
    out = {}
    for c, name in enumerate(classes):
        images = ds.load(ds.class_indices(c))
        out[name] = torch.cat([bb.encode(to_float(images[i:i + 64])) for i in range(0, len(images), 64)])
    return out, "encoded"


def compute_bench_metrics(cfg: BenchConfig, out: Path, progress: bool = True) -> dict[str, dict]:
    """:func:`gendd.metrics.set_metrics` of every set in the VAE latent space (flattened latents;
    real = a seeded subsample of ``metrics_real_per_class`` cached latents per class); cached in
    ``<out>/metrics/<set>.json`` under a key of everything they depend on. Returns set -> metrics."""
    import torch
    from safetensors.torch import save_file

    from gendd.metrics import set_metrics

    mdir = out / "metrics"
    mdir.mkdir(exist_ok=True)
    spec, vae = (cfg.metrics_backbone, None) if cfg.metrics_backbone else (cfg.backbone_spec(), cfg.vae)
    state: dict[str, Any] = {}

    def backbone_and_real():
        if not state:
            from gendd.cache import EncodeSpec, LatentCache
            from gendd.data import get_dataset
            from gendd.pipeline import resolve_backbone

            bb = resolve_backbone(spec, vae)
            ds = get_dataset(cfg.data, "train", root=cfg.data_root)
            cache = LatentCache.build(ds, bb, cfg.cache_dir, EncodeSpec(), progress=progress)
            real, keep = {}, {}
            for c, name in enumerate(ds.classes):
                z = cache.latents(c).flatten(1)
                perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(c))
                real[name] = z[perm[:cfg.metrics_real_per_class]]
                keep[f"class_{c}"] = z[perm[:cfg.tsne_real_per_class]].contiguous()
            save_file(keep, str(mdir / "real-latents.safetensors"), metadata={"classes": json.dumps(ds.classes)})
            state.update(bb=bb, ds=ds, real=real)
        return state["bb"], state["ds"], state["real"]

    def compute(folder: Path) -> dict:
        bb, ds, real = backbone_and_real()
        _log(progress, f"metrics {folder.name} (VAE latent space) ...")
        lat, source = _distilled_latents(folder, ds.classes, ds.channels, bb)
        flat = {name: z.flatten(1).float() for name, z in lat.items()}
        res = set_metrics(flat, real, k=cfg.metrics_k)
        res["latent_source"] = source
        save_file({f"class_{c}": flat[n].contiguous() for c, n in enumerate(ds.classes)},
                  str(mdir / f"{folder.name}.safetensors"), metadata={"classes": json.dumps(ds.classes)})
        return res

    key = {"backbone": spec, "vae": vae, "data": cfg.data, "space": "vae-latent",
           "real_per_class": cfg.metrics_real_per_class, "k": cfg.metrics_k, "sigma": "median"}
    return _cached_set_metrics(cfg, out, ".json", key, compute,
                               valid=lambda: (mdir / "real-latents.safetensors").exists())


def _set_files_hash(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    return hashlib.sha256(json.dumps(manifest.get("files", {}), sort_keys=True).encode()).hexdigest()


def compute_teacher_metrics(cfg: BenchConfig, out: Path, progress: bool = True) -> dict[str, dict]:
    """:func:`gendd.metrics.set_metrics` of every finished set in the penultimate-layer feature space of
    the teacher ``cfg.metrics_teacher`` (:func:`gendd.evaluate.teacher_features`); real = a seeded
    subsample of ``metrics_real_per_class`` training images per class (the images whose latents the
    VAE-space metrics use). Cached in ``<out>/metrics/<set>.teacher.json`` under a key of everything
    they depend on (the teacher file's sha256 included). Returns set -> metrics."""
    import torch

    from gendd.data import get_dataset
    from gendd.data.imagefolder import load_image_dir
    from gendd.evaluate.teacher import load_teacher, teacher_features, teacher_path
    from gendd.export import sha256_file
    from gendd.metrics import set_metrics

    mdir = out / "metrics"
    mdir.mkdir(exist_ok=True)
    tpath = teacher_path(cfg.metrics_teacher)
    tsha = sha256_file(tpath)
    state: dict[str, Any] = {}

    def teacher_and_real():
        if not state:
            teacher = load_teacher(tpath)
            ds = get_dataset(cfg.data, "train", root=cfg.data_root)
            real = {}
            for c, name in enumerate(ds.classes):
                idx = ds.class_indices(c)
                perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(c))
                pick = idx[perm[:cfg.metrics_real_per_class].numpy()]
                real[name] = teacher_features(teacher, ds.load(pick), ds.mean, ds.std)
            state.update(teacher=teacher, ds=ds, real=real)
        return state["teacher"], state["ds"], state["real"]

    def compute(folder: Path) -> dict:
        teacher, ds, real = teacher_and_real()
        _log(progress, f"metrics {folder.name} (teacher feature space) ...")
        images = load_image_dir(folder, ds.classes, ds.channels)
        feats = {name: teacher_features(teacher, images.load(images.class_indices(c)), ds.mean, ds.std)
                 for c, name in enumerate(ds.classes)}
        return set_metrics(feats, real, k=cfg.metrics_k)

    key = {"teacher_sha256": tsha, "data": cfg.data, "space": "teacher-penultimate",
           "real_per_class": cfg.metrics_real_per_class, "k": cfg.metrics_k, "sigma": "median"}
    return _cached_set_metrics(cfg, out, ".teacher.json", key, compute)


def _cached_set_metrics(cfg: BenchConfig, out: Path, suffix: str, key: dict, compute, valid=lambda: True) -> dict:
    """``compute(folder)`` of every distilled set of the grid, cached in ``<out>/metrics/<set><suffix>``
    under ``key`` plus the hash of the set's files (reused when equal and ``valid()``)."""
    results = {}
    for mspec in cfg.method_specs():
        for ipc in cfg.ipc:
            folder = set_folder(out, mspec.label, ipc)
            if not _distill_done(folder, mspec, ipc, cfg):
                continue  # not distilled yet (collect-only runs)
            full_key = {**key, "set_files": _set_files_hash(folder)}
            path = out / "metrics" / f"{folder.name}{suffix}"
            if path.exists() and valid():
                saved = json.loads(path.read_text())
                if saved.get("key") == full_key:
                    results[folder.name] = saved["metrics"]
                    continue
            results[folder.name] = compute(folder)
            _write_json(path, {"key": full_key, "metrics": results[folder.name]})
    return results


# ---------------------------------------------------------------------- results
def collect_rows(cfg: BenchConfig, out: Path, groups, t_distill: dict[str, float], set_metric: dict[str, dict],
                 rev: str, chash: str, teacher_metric: dict[str, dict] | None = None) -> list[dict]:
    """One row per (method, IPC, protocol, student) from the saved students, plus metrics and scores.

    LRS (``real_accuracy`` set): a hard-label row scores its own accuracy as both Acc(syn, hard) and
    Acc(syn, any); a soft-label row (a :class:`~gendd.evaluate.SoftLabelProtocol` profile) takes
    Acc(syn, hard) from the grid's first hard-label protocol for the same set and student, and has no
    LRS if the grid has none."""
    from gendd.evaluate import PROFILES
    from gendd.metrics import METRIC_NAMES, augmentation_robust_score, label_robust_score

    data_root = str(cfg.data_root) if cfg.data_root else None
    rows = []
    for spec, ipc, proto, student in groups:
        folder = set_folder(out, spec.label, ipc)
        over = eval_overrides(cfg, proto, student)
        try:
            s = run_evaluate(folder, data=cfg.data, data_root=data_root, profile=proto.profile, overrides=over,
                             seeds=[], progress=False)
        except DataError:  # no student trained yet
            s = {"final_mean": float("nan"), "final_std": float("nan"), "best_mean": float("nan"),
                 "best_std": float("nan"), "num_runs": 0, "seconds_per_run": float("nan"),
                 "protocol": {"epochs": None}, "precision": ""}
        row = {"method": spec.label, "method_name": spec.method, "ipc": ipc, "student": student,
               "protocol": proto.name, "profile": proto.profile, "epochs": s["protocol"].get("epochs"),
               "final_mean": s["final_mean"], "final_std": s["final_std"], "best_mean": s["best_mean"],
               "best_std": s["best_std"], "n": s["num_runs"], "repeats": over["repeats"],
               "seconds_per_student": s["seconds_per_run"], "precision": s.get("precision", ""),
               "distill_seconds": t_distill.get(folder.name),
               "set": f"sets/{folder.name}", "git_rev": rev, "config_hash": chash}
        if cfg.metrics:
            m = set_metric.get(folder.name, {})
            row.update({f"latent_{k}": m.get(k, float("nan")) for k in METRIC_NAMES})
        if cfg.metrics_teacher:
            m = (teacher_metric or {}).get(folder.name, {})
            row.update({f"teacher_{k}": m.get(k, float("nan")) for k in METRIC_NAMES})
        rows.append(row)
    soft = {p.name for p in cfg.protocol_specs() if PROFILES[p.profile].soft_labels}
    hard = next((p for p in cfg.protocols if p not in soft), None)
    # DD-Ranking-style scores against the random-subset baseline under the same protocol
    index = {(r["method"], r["ipc"], r["protocol"], r["student"]): r for r in rows}
    if cfg.baseline in cfg.methods:
        for r in rows:
            base = index[(cfg.baseline, r["ipc"], r["protocol"], r["student"])]
            r["ior"] = r["final_mean"] - base["final_mean"]
            if r["student"] in cfg.real_accuracy and (r["protocol"] not in soft or hard is not None):
                syn_hard = (r if r["protocol"] not in soft
                            else index[(r["method"], r["ipc"], hard, r["student"])])["final_mean"]
                r["lrs"] = label_robust_score(cfg.real_accuracy[r["student"]], syn_hard, r["final_mean"],
                                              base["final_mean"], weight=cfg.score_weight)["lrs"]
            if cfg.ars_protocols:
                aug, noaug = cfg.ars_protocols
                k_aug, k_no = (r["method"], r["ipc"], aug, r["student"]), (r["method"], r["ipc"], noaug, r["student"])
                r["ars"] = augmentation_robust_score(
                    index[k_aug]["final_mean"], index[(cfg.baseline, *k_aug[1:])]["final_mean"],
                    index[k_no]["final_mean"], index[(cfg.baseline, *k_no[1:])]["final_mean"],
                    weight=cfg.score_weight)["ars"]
    return rows


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, _json_safe(obj))


def _json_safe(obj: Any) -> Any:
    """NaN/Inf -> None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


#: Metric columns of results.md (latent space), with their short header and digits.
MD_METRICS = (("latent_mmd2", "MMD²", 4), ("latent_fd", "FD", 1), ("latent_precision", "P", 2),
              ("latent_recall", "R", 2), ("latent_density", "D", 2), ("latent_coverage", "C", 2),
              ("latent_pairwise_dist", "div", 2), ("latent_representativeness", "repr", 2))


#: Teacher-space metric columns of results.md (``metrics_teacher``).
MD_TEACHER_METRICS = (("teacher_fd", "FD(T)", 1), ("teacher_coverage", "C(T)", 2),
                      ("teacher_pairwise_dist", "div(T)", 2), ("teacher_representativeness", "repr(T)", 2))


def results_markdown(rows: list[dict], rev: str, chash: str, metrics: bool, teacher: bool = False) -> str:
    head = ["method", "IPC", "student", "protocol", "final acc %", "best acc %", "n", "s/student", "precision"]
    extra = [k for k in ("ior", "lrs", "ars") if any(k in r for r in rows)]
    head += [{"ior": "IOR (pts)", "lrs": "LRS", "ars": "ARS"}[k] for k in extra]
    if metrics:
        head += [h for _, h, _ in MD_METRICS]
    if teacher:
        head += [h for _, h, _ in MD_TEACHER_METRICS]
    lines = [f"gendd bench — git {rev}, config {chash}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["ipc"]), r["student"], r["protocol"],
                 f"{_fmt(r['final_mean'])} ± {_fmt(r['final_std'])}", f"{_fmt(r['best_mean'])} ± {_fmt(r['best_std'])}",
                 f"{r['n']}/{r['repeats']}", _fmt(r["seconds_per_student"], 1), r.get("precision", "")]
        cells += [_fmt(r.get(k), 2 if k == "ior" else 3) for k in extra]
        if metrics:
            cells += [_fmt(r.get(k), d) for k, _, d in MD_METRICS]
        if teacher:
            cells += [_fmt(r.get(k), d) for k, _, d in MD_TEACHER_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    if metrics:
        lines += ["", ("Set metrics in the VAE latent space against the real class (mean over classes): MMD² "
                       "(biased, RBF, median bandwidth), FD (Fréchet distance of Gaussian fits), P/R/D/C "
                       "(precision, recall, density, coverage; Naeem et al. 2020, k-NN radii), div (mean pairwise "
                       "distance), repr (mean distance of real points to their nearest distilled point).")]
    if teacher:
        lines += ["", "(T): the same metrics in the penultimate-layer feature space of the `metrics_teacher` network."]
    return "\n".join(lines) + "\n"


def write_results(cfg: BenchConfig, out: Path, rows: list[dict], set_metric: dict, rev: str, chash: str,
                  teacher_metric: dict | None = None) -> None:
    """``results.md`` (table), ``results.csv`` (every row field) and ``results.json`` (rows, config, metrics)."""
    write_text(out / "results.md", results_markdown(rows, rev, chash, cfg.metrics, bool(cfg.metrics_teacher)))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                            for k, v in r.items()})

    atomic_write(out / "results.csv", write_csv)
    _write_json(out / "results.json", {"name": cfg.name, "config": cfg.canonical(), "config_hash": chash,
                                       "git_rev": rev, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "rows": rows, "set_metrics": set_metric,
                                       "set_metrics_teacher": teacher_metric or {}})


def main_job(out: str | os.PathLike = "runs/main", *, methods=("random", "dit", "mgd3"), ipc: int = 10,
             profile: str = "demo", data: str = "fashion-mnist", progress: bool = True,
             workers: int | None = None, overrides: dict | None = None) -> list[dict]:
    """Distil ``data`` at ``ipc`` with each method and evaluate every set under ``profile``: a
    :func:`run_bench` grid of one IPC and one ConvNet-3 column, written to ``out``
    (``out/sets/<method>-ipc<ipc>/``, ``out/results.md``); returns the rows.

    Students run in ``workers`` processes (default: one per CPU core, at most one per student) with
    ``cores // workers`` torch threads each: on small CPUs one student per core is faster than one
    student on all cores. Each finished student prints one line with its accuracy and the time left.
    ``mgd3`` discovers its modes on one randomly flipped copy of each image (``flip_augment="random"``,
    the reference loader's RandomHorizontalFlip) rather than on both orientations: half the encoding.
    Results do not depend on ``workers``. ``overrides``: protocol fields to change (e.g. ``epochs``)."""
    from gendd.evaluate import get_profile

    cores = os.cpu_count() or 1
    overrides = dict(overrides or {})
    cells = len(methods) * overrides.get("repeats", get_profile(profile).repeats)
    workers = max(1, min(cores, cells)) if workers is None else workers
    method = {"mgd3": {"flip_augment": "random"}} if "mgd3" in methods else {}
    cfg = BenchConfig(methods=list(methods), ipc=[ipc], students=["convnet3"], protocols=[profile], name="main",
                      data=data, workers=workers, threads=max(1, cores // max(1, workers)), method=method,
                      protocol={profile: overrides} if overrides else {})
    return run_bench(cfg, out, progress=progress)
