"""``gendd backbone quality``: how good a backbone is as a source of distilled sets, measured.

Four measurements of one backbone on one dataset, written to ``<out>/quality.{json,md}``:

1. **Reconstruction**: MSE and PSNR (``10 log10(2^2 / MSE)``, images in [-1, 1]) of the VAE's posterior mean
   decoded, per class, on ``recon_per_class`` test images of each class.
2. **Reconstruction ceiling**: a random real subset at each ``ceiling_ipc`` (``random``) against the same subset
   passed through the VAE (``random`` with ``reconstruct=true``), both evaluated by the same students with the
   same seeds. A latent-space generator cannot beat its VAE's reconstructions of real images by much, so the gap
   bounds every method that decodes latents.
3. **Samples per CFG scale**: ``samples_per_class`` ``dit`` samples per class at each ``cfg_scales`` entry (and,
   as a reference row, that many real images), scored in the feature space of a classifier trained on the real
   training split: label agreement (the classifier's prediction equals the conditioning class) and the
   :func:`gendd.metrics.set_metrics` of each class against real images (precision / recall / density /
   coverage of Naeem et al. 2020, Fréchet distance), plus the diversity of the VAE latents (mean pairwise cosine
   distance within a class, the figure of BENCHMARKS.md §8).
4. **Downstream sweep**: the accuracy of students trained on ``dit`` sets at each ``sweep_ipc`` and CFG scale
   (what a distilled set is for; label agreement alone favours collapsed, over-guided samples).

Parts 2-4 are :mod:`gendd.bench` grids under ``<out>/ceiling``, ``<out>/samples`` and ``<out>/sweep`` (resumable,
one line per finished student); the classifier is a :func:`gendd.evaluate.teacher.train_teacher` run under
``<out>/classifier`` unless ``classifier`` names a trained one. Re-running the same command skips what is done.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, ClassVar

from gendd.artifacts import write_text
from gendd.config import Validated, check

_PATH = (str, os.PathLike)
_IPCS = check(tuple, items=check(Integral, ge=1))


def _check_cfg_interval(value) -> None:
    from gendd.methods.dit import check_cfg_interval_option

    check_cfg_interval_option(value)


def _label(scale: float) -> str:
    return f"dit-cfg{scale:g}"


@dataclass
class QualityConfig(Validated):
    """What ``gendd backbone quality`` measures (module docstring); every part is optional by its list.

    Attributes:
        backbone, vae, data, data_root: the backbone (shipped name or folder) and the dataset.
        recon_per_class: test images per class for the reconstruction error (0 = skip).
        ceiling_ipc: IPCs of the reconstruction ceiling (empty = skip).
        cfg_scales: guidance scales of the sample and downstream sweeps.
        samples_per_class: samples per class and scale for label agreement and the set metrics (0 = skip).
        sweep_ipc: IPCs of the downstream ``dit`` sweep (empty = skip).
        sampler, num_steps: the ``dit`` sampler of both sweeps.
        cfg_interval: the noise levels ``[lo, hi]`` guided at every scale of the sweeps (``dit``'s option:
            "auto" = the backbone's default, None = every step).
        profile, protocol_overrides, repeats, student: evaluation protocol (a profile and overrides of its
            fields, e.g. ``{"epochs": 100}``), students per cell, student architecture.
        classifier: a trained teacher (``teacher.pt`` or its folder); None = train one (``classifier_epochs``).
        metrics_k: k of precision / recall / density / coverage.
        seed, workers, threads: distillation seed; evaluation processes and torch threads each.
        cache_dir: latent cache root (default: gendd's).
    """

    config_what: ClassVar[str] = "backbone quality"

    backbone: str = field(default="fashion-mnist", metadata=check(*_PATH, min_length=1))
    vae: str | None = field(default=None, metadata=check(*_PATH, optional=True))
    data: str = field(default="fashion-mnist", metadata=check(str, min_length=1))
    data_root: str | None = field(default=None, metadata=check(*_PATH, optional=True))
    recon_per_class: int = field(default=200, metadata=check(Integral, ge=0))
    ceiling_ipc: tuple[int, ...] = field(default=(10, 50), metadata=_IPCS)
    cfg_scales: tuple[float, ...] = field(default=(1.0, 1.5, 2.0, 3.0, 4.0),
                                          metadata=check(tuple, items=check(Real, ge=0)))
    samples_per_class: int = field(default=100, metadata=check(Integral, ge=0))
    sweep_ipc: tuple[int, ...] = field(default=(10,), metadata=_IPCS)
    sampler: str = field(default="ddpm", metadata=check(choices=("ddpm", "ddim")))
    num_steps: int = field(default=50, metadata=check(Integral, ge=1))
    cfg_interval: tuple[float, float] | str | None = field(default="auto", metadata=check(
        tuple, str, optional=True, test=_check_cfg_interval))
    profile: str = field(default="quick", metadata=check(str, min_length=1))
    protocol_overrides: dict[str, Any] = field(default_factory=dict, metadata=check(dict))
    repeats: int = field(default=2, metadata=check(Integral, ge=1))
    student: str = field(default="convnet3", metadata=check(str, min_length=1))
    classifier: str | None = field(default=None, metadata=check(*_PATH, optional=True))
    classifier_epochs: int = field(default=5, metadata=check(Integral, ge=1))
    metrics_k: int = field(default=5, metadata=check(Integral, ge=1))
    seed: int = field(default=0, metadata=check(Integral))
    workers: int = field(default=1, metadata=check(Integral, ge=1))
    threads: int = field(default=1, metadata=check(Integral, ge=1))
    cache_dir: str | None = field(default=None, metadata=check(*_PATH, optional=True))

    def _check_fields(self) -> None:
        from gendd.errors import ConfigError

        if len(set(self.cfg_scales)) != len(self.cfg_scales):
            raise ConfigError(f"cfg_scales has duplicates: {list(self.cfg_scales)}")
        self.bench("ceiling", ["random"], [1])  # the grids' own checks: data, profile, student names

    def bench(self, name: str, methods: list[str], ipc: list[int], *, protocols: bool = True,
              options: dict[str, dict] | None = None, **extra: Any):
        """The :class:`gendd.bench.BenchConfig` of one part of the measurement."""
        from gendd.bench import BenchConfig

        return BenchConfig(methods=methods, ipc=ipc, name=name, data=self.data, data_root=self.data_root,
                           backbone=self.backbone, vae=self.vae, seed=self.seed, method=options or {},
                           students=[self.student], protocols=[self.profile] if protocols else [],
                           protocol={self.profile: dict(self.protocol_overrides)} if protocols else {},
                           repeats=self.repeats, workers=self.workers, threads=self.threads,
                           cache_dir=self.cache_dir, **extra)

    def sampler_options(self, scale: float) -> dict[str, Any]:
        return {"method": "dit", "cfg_scale": float(scale), "sampler": self.sampler, "num_steps": self.num_steps,
                "cfg_interval": self.cfg_interval}


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def reconstruction_error(backbone, dataset, per_class: int, batch_size: int = 250) -> dict[str, Any]:
    """MSE / PSNR of ``decode(encode_mean(x))`` against ``x`` (both in [-1, 1], dataset geometry) on the first
    ``per_class`` images of every class of ``dataset``; per class and the mean over classes."""
    from gendd.data.base import to_float

    per: dict[str, dict[str, float]] = {}
    for c, name in enumerate(dataset.classes):
        idx = dataset.class_indices(c)[:per_class]
        sse, count = 0.0, 0
        for a in range(0, len(idx), batch_size):
            x = to_float(dataset.load(idx[a:a + batch_size]))
            rec = backbone.decode(backbone.encode(x)).clamp(-1, 1)
            sse += float(((rec - x.to(rec.device)) ** 2).double().sum())
            count += x.numel()
        mse = sse / max(count, 1)
        per[name] = {"mse": mse, "psnr": psnr(mse), "images": int(len(idx))}
    mse = sum(v["mse"] for v in per.values()) / len(per)
    return {"mse": mse, "psnr": psnr(mse), "per_class": per, "split": dataset.split}


def label_agreement(classifier, folder: Path, classes: list[str], channels: int, mean, std) -> dict[str, Any]:
    """Share (%) of a set's images per class that ``classifier`` assigns to the class they were made for."""
    from gendd.data.imagefolder import load_image_dir
    from gendd.evaluate.teacher import teacher_logits

    images = load_image_dir(folder, classes, channels)
    per: dict[str, float] = {}
    for c, name in enumerate(classes):
        pred = teacher_logits(classifier, images.load(images.class_indices(c)), mean, std, 500).argmax(1)
        per[name] = 100.0 * float((pred == c).float().mean())
    return {"mean": sum(per.values()) / len(per), "per_class": per}


def _classifier(cfg: QualityConfig, out: Path, train, test, progress: bool):
    from gendd.evaluate.teacher import TeacherConfig, load_teacher, teacher_path, train_teacher

    if cfg.classifier is not None:
        return load_teacher(cfg.classifier), teacher_path(cfg.classifier)
    folder = out / "classifier"
    teacher = train_teacher(train, test, cfg.student, TeacherConfig(epochs=cfg.classifier_epochs), folder,
                            progress=progress)
    return teacher, teacher_path(folder)


def _rows(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["method"], r["ipc"]): r for r in rows}


def run_quality(cfg: QualityConfig, out: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Measure (or resume measuring) everything of the module docstring into ``out``; returns the report."""
    from gendd.bench import compute_bench_metrics, compute_teacher_metrics, run_bench, set_folder
    from gendd.data import get_dataset
    from gendd.methods.dit import resolve_cfg_interval
    from gendd.pipeline import resolve_backbone

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": asdict(cfg)}
    train = get_dataset(cfg.data, "train", root=cfg.data_root)
    test = get_dataset(cfg.data, "test", root=cfg.data_root)
    backbone = resolve_backbone(cfg.backbone, cfg.vae)
    report["backbone"] = {"spec": str(cfg.backbone), "latent_shape": list(backbone.latent_shape),
                          "default_cfg_scale": backbone.meta.default_cfg_scale,
                          "cfg_interval": resolve_cfg_interval(cfg.cfg_interval, backbone)}

    if cfg.recon_per_class:
        report["reconstruction"] = reconstruction_error(backbone, test, cfg.recon_per_class)

    if cfg.ceiling_ipc:
        grid = cfg.bench("ceiling", ["random", "random-vae"], list(cfg.ceiling_ipc),
                         options={"random-vae": {"method": "random", "reconstruct": True}})
        rows = _rows(run_bench(grid, out / "ceiling", progress=progress))
        report["ceiling"] = [
            {"ipc": ipc, "real": rows[("random", ipc)]["final_mean"], "real_std": rows[("random", ipc)]["final_std"],
             "reconstructed": rows[("random-vae", ipc)]["final_mean"],
             "reconstructed_std": rows[("random-vae", ipc)]["final_std"],
             "gap": rows[("random", ipc)]["final_mean"] - rows[("random-vae", ipc)]["final_mean"],
             "students": min(rows[("random", ipc)]["n"], rows[("random-vae", ipc)]["n"]),
             "precision": rows[("random", ipc)]["precision"]}
            for ipc in cfg.ceiling_ipc]

    if cfg.samples_per_class and cfg.cfg_scales:
        classifier, cpath = _classifier(cfg, out, train, test, progress)
        report["classifier"] = {**classifier.describe(), "path": str(cpath)}
        labels = ["random"] + [_label(s) for s in cfg.cfg_scales]
        grid = cfg.bench("samples", labels, [cfg.samples_per_class], protocols=False,
                         options={_label(s): cfg.sampler_options(s) for s in cfg.cfg_scales},
                         metrics=True, metrics_teacher=str(cpath), metrics_k=cfg.metrics_k)
        run_bench(grid, out / "samples", progress=progress)
        latent = compute_bench_metrics(grid, out / "samples", progress=progress)
        feats = compute_teacher_metrics(grid, out / "samples", progress=progress)
        rows = []
        for label, scale in zip(labels, [None, *cfg.cfg_scales]):
            folder = set_folder(out / "samples", label, cfg.samples_per_class)
            agree = label_agreement(classifier, folder, train.classes, train.channels, train.mean, train.std)
            m, lm = feats[folder.name], latent[folder.name]
            rows.append({"set": "real" if scale is None else label, "cfg_scale": scale,
                         "label_agreement": agree["mean"], "agreement_per_class": agree["per_class"],
                         "worst_class": min(agree["per_class"], key=agree["per_class"].get),
                         **{k: m[k] for k in ("precision", "recall", "density", "coverage", "fd")},
                         "latent_diversity": lm["pairwise_cos"]})
        report["samples"] = {"per_class": cfg.samples_per_class, "rows": rows}

    if cfg.sweep_ipc and cfg.cfg_scales:
        labels = [_label(s) for s in cfg.cfg_scales]
        grid = cfg.bench("sweep", labels, list(cfg.sweep_ipc),
                         options={_label(s): cfg.sampler_options(s) for s in cfg.cfg_scales})
        rows = _rows(run_bench(grid, out / "sweep", progress=progress))
        report["sweep"] = [{"cfg_scale": s, "ipc": ipc, "acc": rows[(_label(s), ipc)]["final_mean"],
                            "acc_std": rows[(_label(s), ipc)]["final_std"], "students": rows[(_label(s), ipc)]["n"]}
                           for s in cfg.cfg_scales for ipc in cfg.sweep_ipc]

    report["profile"] = cfg.profile
    write_text(out / "quality.json", json.dumps(report, indent=2, default=str))
    write_text(out / "quality.md", quality_markdown(report))
    return report


def _interval(interval) -> str:
    return "all" if interval is None else f"({interval[0]:g}, {interval[1]:g}]"


def quality_markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables (one per measured part)."""
    from gendd.bench import _fmt as _f
    cfg = report["config"]
    lines = [f"# Backbone quality: {report['backbone']['spec']} on {cfg['data']}", "",
             f"Latent {report['backbone']['latent_shape']}, default CFG {report['backbone']['default_cfg_scale']}, "
             f"guided noise levels {_interval(report['backbone'].get('cfg_interval'))}; "
             f"students: {cfg['student']}, profile `{cfg['profile']}`, {cfg['repeats']} per cell.", ""]
    rec = report.get("reconstruction")
    if rec:
        names = list(rec["per_class"])
        lines += [f"## VAE reconstruction ({cfg['recon_per_class']} {rec['split']} images per class)", "",
                  "| | mean | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|",
                  f"| MSE | {rec['mse']:.4f} | " + " | ".join(f"{rec['per_class'][n]['mse']:.4f}" for n in names) + " |",
                  f"| PSNR dB | {rec['psnr']:.1f} | " + " | ".join(f"{rec['per_class'][n]['psnr']:.1f}" for n in names)
                  + " |", ""]
    if report.get("ceiling"):
        lines += ["## Reconstruction ceiling (same random subset, real vs through the VAE)", "",
                  "| IPC | real % | through VAE % | gap | students | precision |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['ipc']} | {_f(r['real'])} ± {_f(r['real_std'])} | {_f(r['reconstructed'])} ± "
                  f"{_f(r['reconstructed_std'])} | {_f(r['gap'])} | {r['students']} | {r['precision']} |"
                  for r in report["ceiling"]]
        lines.append("")
    if report.get("samples"):
        s = report["samples"]
        clf = report.get("classifier", {})
        lines += [f"## Samples ({s['per_class']} per class) in the classifier's feature space", "",
                  f"Classifier: {clf.get('student')} trained on the real training split, test accuracy "
                  f"{_f(clf.get('test_acc'))} %. Precision / recall / density / coverage (k = {cfg['metrics_k']}) "
                  "and Fréchet distance per class against real training images, averaged; latent diversity = "
                  "mean pairwise cosine distance of VAE latents within a class.", "",
                  "| set | CFG | label agreement % | worst class | precision | recall | density | coverage | FD "
                  "| latent diversity |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            worst = f"{r['worst_class']} {r['agreement_per_class'][r['worst_class']]:.0f}"
            lines.append(f"| {r['set']} | {_f(r['cfg_scale'], 1)} | {_f(r['label_agreement'], 1)} | {worst} | "
                         f"{_f(r['precision'])} | {_f(r['recall'])} | {_f(r['density'])} | {_f(r['coverage'])} | "
                         f"{_f(r['fd'], 1)} | {_f(r['latent_diversity'], 3)} |")
        lines.append("")
    if report.get("sweep"):
        ipcs = sorted({r["ipc"] for r in report["sweep"]})
        by = {(r["cfg_scale"], r["ipc"]): r for r in report["sweep"]}
        scales = sorted({r["cfg_scale"] for r in report["sweep"]})
        lines += ["## Downstream accuracy of `dit` sets per CFG scale", "",
                  "| CFG | " + " | ".join(f"IPC {i} %" for i in ipcs) + " |", "|---" * (len(ipcs) + 1) + "|"]
        lines += [f"| {s:g} | " + " | ".join(f"{_f(by[(s, i)]['acc'])} ± {_f(by[(s, i)]['acc_std'])}" for i in ipcs)
                  + " |" for s in scales]
        lines.append("")
    return "\n".join(lines)
