"""Guidance scale x guided noise-level interval: label agreement and diversity of `dit` sets (BENCHMARKS.md §11).

For each ``SCALE[:LO]:HI`` (or ``SCALE`` alone: every step guided) a `dit` set of ``--ipc`` samples per class is
distilled from the backbone with ``cfg_scale=SCALE`` and ``cfg_interval=[LO, HI]`` (guidance only where
``sigma = sqrt((1 - abar) / abar)`` lies in ``(LO, HI]``), beside a random real subset of the same size. Each set
is scored by a trained teacher (label agreement: share of samples it assigns to their class; precision / recall
/ coverage / Fréchet distance in its feature space) and by the diversity of its latents in ``--metrics-backbone``'s
VAE space (mean pairwise cosine distance within a class; BENCHMARKS.md §8). The sets, metrics and their caches
are a :mod:`gendd.bench` grid under ``--out`` (re-running skips what is done).

    python benchmarks/cfg_interval_sweep.py --teacher runs/teachers/convnet3-lr0.01-e20 \\
        --configs 1 2 3 2:5 3:5 4:5 3:2 4:2 6:2 3:10 4:0.3:5 2:2 3:1 5:1 4:1:5 4:1 6:1 8:1 6:0.7 4:1.5 \\
        --json benchmarks/results/fmnist_v3_cfg_interval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse(spec: str) -> tuple[str, float, tuple[float, float] | None]:
    parts = [float(p) for p in spec.split(":")]
    if len(parts) == 1:
        return f"s{parts[0]:g}", parts[0], None
    scale, lo, hi = (parts[0], 0.0, parts[1]) if len(parts) == 2 else parts

    def tag(x: float) -> str:
        return f"{x:g}".replace(".", "")

    return f"s{scale:g}" + (f"-lo{tag(lo)}" if lo else "") + f"-hi{tag(hi)}", scale, (lo, hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="fashion-mnist-v3")
    ap.add_argument("--metrics-backbone", default="fashion-mnist-v1")
    ap.add_argument("--teacher", required=True, help="a trained teacher (gendd teacher train)")
    ap.add_argument("--configs", nargs="+", required=True, help="SCALE, SCALE:HI or SCALE:LO:HI")
    ap.add_argument("--ipc", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/interval/sets")
    ap.add_argument("--json", default=None, help="write the rows here (and a .md beside it)")
    args = ap.parse_args()

    from gendd.bench import BenchConfig, compute_bench_metrics, compute_teacher_metrics, run_bench, set_folder
    from gendd.data import get_dataset
    from gendd.evaluate.teacher import load_teacher
    from gendd.quality import label_agreement

    configs = [parse(s) for s in args.configs]
    opts = {name: {"method": "dit", "cfg_scale": s, "cfg_interval": iv}
            for name, s, iv in configs}
    grid = BenchConfig(methods=["random", *opts], ipc=[args.ipc], name="cfg-interval", data="fashion-mnist",
                       backbone=args.backbone, seed=args.seed, method=opts, students=["convnet3"], protocols=[],
                       metrics=True, metrics_backbone=args.metrics_backbone, metrics_teacher=args.teacher)
    out = Path(args.out)
    run_bench(grid, out, progress=False)
    latent = compute_bench_metrics(grid, out, progress=False)
    feats = compute_teacher_metrics(grid, out, progress=False)
    train = get_dataset("fashion-mnist", "train")
    teacher = load_teacher(args.teacher)
    rows = []
    for name, scale, interval in [("random", None, None), *configs]:
        folder = set_folder(out, name, args.ipc)
        agree = label_agreement(teacher, folder, train.classes, train.channels, train.mean, train.std)
        m = feats[folder.name]
        rows.append({"set": name, "cfg_scale": scale, "cfg_interval": interval, "label_agreement": agree["mean"],
                     "worst_class": min(agree["per_class"].values()),
                     "diversity": latent[folder.name]["pairwise_cos"],
                     **{k: m[k] for k in ("precision", "recall", "coverage", "fd")}})
        r = rows[-1]
        print(f"{name:14s} agreement {r['label_agreement']:5.1f} diversity {r['diversity']:.3f} "
              f"precision {r['precision']:.3f} recall {r['recall']:.3f} FD {r['fd']:.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"backbone": args.backbone, "ipc": args.ipc, "teacher": args.teacher,
                                               "metrics_backbone": args.metrics_backbone, "rows": rows}, indent=1))
        lines = ["| set | CFG | guided sigma | label agreement % | worst class % | diversity | precision | recall "
                 "| coverage | FD |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            iv = "real" if r["cfg_scale"] is None else "all" if r["cfg_interval"] is None else \
                f"({r['cfg_interval'][0]:g}, {r['cfg_interval'][1]:g}]"
            scale = "" if r["cfg_scale"] is None else f"{r['cfg_scale']:g}"
            lines.append(f"| {r['set']} | {scale} | {iv} | "
                         f"{r['label_agreement']:.1f} | {r['worst_class']:.0f} | {r['diversity']:.3f} | "
                         f"{r['precision']:.3f} | {r['recall']:.3f} | {r['coverage']:.3f} | {r['fd']:.1f} |")
        Path(args.json).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
