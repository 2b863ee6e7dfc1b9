"""The Fashion-MNIST evaluation-suite table (BENCHMARKS.md §9): every method's IPC 10 set (and IPC 1) under
hard labels with ConvNet-3, ConvNet-6 and ResNet-AP-10 students, under soft labels (a ConvNet-3 teacher) and
without augmentation, DD-Ranking's label- and augmentation-robust scores, the full-data upper bound, and the
seconds per student of each profile.

    gendd bench benchmarks/grids/fmnist_table.toml --collect-only        # ConvNet-3, hard (runs/table)
    gendd bench benchmarks/grids/fmnist_crossarch.toml --collect-only    # ConvNet-6 (runs/crossarch)
    gendd bench benchmarks/grids/fmnist_resnet.toml --collect-only       # ResNet-AP-10 (runs/resnet)
    gendd bench benchmarks/grids/fmnist_soft.toml --collect-only         # soft labels, no-aug, LRS, ARS, teacher metrics
    gendd bench benchmarks/grids/fmnist_soft_small.toml --collect-only   # soft labels, small-image profile (runs/soft-small)
    python benchmarks/fmnist_suite_table.py --out benchmarks/results/fmnist_suite.md

Reads the results.json of those bench folders and benchmarks/results/full_data_*.json (full-data students,
benchmarks/full_data.py; ConvNet-3's from backbone_quality.json). A cell is "final acc mean ± std" over the
students finished; "(n)" marks cells with fewer than 3 students; "–" = not run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = [("convnet3", "quick", "ConvNet-3"), ("convnet3", "soft-small", "ConvNet-3 soft (small-image)"),
           ("convnet6", "quick", "ConvNet-6"), ("resnet_ap10", "quick", "ResNet-AP-10"),
           ("convnet3", "soft", "ConvNet-3 soft (quick)"), ("convnet3", "quick-noaug", "ConvNet-3 no-aug")]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and v == v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", nargs="+", default=["runs/table", "runs/crossarch", "runs/resnet", "runs/soft",
                                                      "runs/soft-small"])
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    rows, methods, teacher_metrics = {}, [], {}
    for b in args.bench:
        path = Path(b) / "results.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        for r in res["rows"]:
            if r["method"] not in methods:
                methods.append(r["method"])
            if r.get("n"):
                key = (r["method"], r["ipc"], r["student"], r["protocol"])
                if key not in rows or r["n"] >= rows[key]["n"]:  # later folders add fields (LRS)
                    rows[key] = {**rows.get(key, {}), **r}
        teacher_metrics.update(res.get("set_metrics_teacher") or {})

    def cell(r) -> str:
        if r is None:
            return "–"
        s = f"{r['final_mean']:.2f} ± {r['final_std']:.2f}"
        return s if r["n"] >= 3 else f"{s} ({r['n']})"

    head = ["method", "IPC"] + [c[2] for c in COLUMNS] + ["LRS hard", "LRS soft", "ARS", "div(T)", "repr(T)", "cov(T)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    full = _full_data(Path(args.results))
    if full:
        lines.append("| full data (60k, 1 student) | – | " + " | ".join(
            full.get(s, "–") if p == "quick" else "–" for s, p, _ in COLUMNS) + " | – | – | – | – | – | – |")
    for ipc in args.ipc:
        for m in methods:
            cells = [rows.get((m, ipc, s, p)) for s, p, _ in COLUMNS]
            if not any(cells):
                continue
            hard, soft = rows.get((m, ipc, "convnet3", "quick")), rows.get((m, ipc, "convnet3", "soft"))
            tm = teacher_metrics.get(f"{m}-ipc{ipc}", {})

            def f(v, d):
                return f"{v:.{d}f}" if _num(v) else "–"
            lines.append("| " + " | ".join([m, str(ipc)] + [cell(c) for c in cells] + [
                f(hard.get("lrs") if hard else None, 3), f(soft.get("lrs") if soft else None, 3),
                f(hard.get("ars") if hard else None, 3), f(tm.get("pairwise_dist"), 2), f(tm.get("representativeness"), 2),
                f(tm.get("coverage"), 3)]) + " |")
    table = "\n".join(lines)
    timing = _timings(rows)
    text = table + "\n\nSeconds per student (median over the finished students of all methods):\n\n" + timing
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _full_data(results: Path) -> dict[str, str]:
    out = {}
    bq = results / "backbone_quality.json"
    if bq.exists():
        c = json.loads(bq.read_text()).get("classifier", {})
        if "final_acc" in c:
            out["convnet3"] = f"{c['final_acc']:.2f} (E={c['epochs']})"
    for p in sorted(results.glob("full_data_*.json")):
        r = json.loads(p.read_text())
        out[r["student"]] = f"{r['final_acc']:.2f} (E={r['epochs']})"
    return out


def _timings(rows: dict) -> str:
    groups: dict[tuple, list[float]] = {}
    for (m, ipc, s, p), r in rows.items():
        if _num(r.get("seconds_per_student")):
            groups.setdefault((s, p, r.get("profile", p)), {}).setdefault(ipc, []).append(r["seconds_per_student"])
    ipcs = sorted({i for g in groups.values() for i in g})
    lines = ["| student | protocol (profile) | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
             "|---|---|" + "---|" * len(ipcs)]
    for (s, p, prof), g in sorted(groups.items()):
        lines.append(f"| {s} | {p} ({prof}) | " + " | ".join(
            f"{statistics.median(g[i]):.0f} s" if i in g else "–" for i in ipcs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
