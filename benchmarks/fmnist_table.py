"""Distil Fashion-MNIST with each method at each IPC and evaluate under one profile (resumable).

    python benchmarks/fmnist_table.py --methods random dit --ipc 1 10 50 --profile quick
    python benchmarks/fmnist_table.py --methods dm --ipc 1 --option dm:iterations=200 --compile

Folders go to ``runs/bench/<method>-ipc<ipc>`` (distilled set + ``eval-<profile>.json``); re-running skips
finished distillations and finished students. Prints a markdown table and writes it, with the raw
numbers, to ``benchmarks/results/fmnist_<profile>[_<tag>].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["random", "dit"])
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--repeats", type=int, default=None, help="override the profile's repeats")
    ap.add_argument("--seed", type=int, default=0, help="distillation seed")
    ap.add_argument("--runs", default="runs/bench")
    ap.add_argument("--tag", default="")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="a distillation option for one method (repeatable), e.g. dm:iterations=200")
    ap.add_argument("--order", choices=["method", "ipc"], default="method",
                    help="loop order: all IPCs of a method first (method) or all methods of an IPC first (ipc)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the students (speed only; not part of the protocol's identity)")
    ap.add_argument("--collect-only", action="store_true",
                    help="run nothing: tabulate the students finished so far (from eval-*.partial.json)")
    args = ap.parse_args()

    from gendd.evaluate.train import run_statistics
    from gendd.pipeline import parse_options, run_distill, run_evaluate

    per_method: dict[str, list[str]] = {}
    for item in args.option:
        method, sep, pair = item.partition(":")
        if not sep:
            ap.error(f"--option {item!r} is not METHOD:KEY=VALUE")
        per_method.setdefault(method, []).append(pair)
    cells = ([(m, i) for m in args.methods for i in args.ipc] if args.order == "method"
             else [(m, i) for i in args.ipc for m in args.methods])
    rows = []
    for m, ipc in cells:
        folder = Path(args.runs) / f"{m}-ipc{ipc}"
        if args.collect_only:
            partial = folder / f"eval-{args.profile}.partial.json"
            man_path = folder / "manifest.json"
            if not partial.exists() or not man_path.exists():
                continue
            man = json.loads(man_path.read_text())
            saved = json.loads(partial.read_text())
            if not saved["runs"]:
                continue
            s = {**run_statistics(saved["runs"]), "protocol": saved["key"]["protocol"]}
        else:
            options = {"seed": args.seed, **parse_options(per_method.get(m, []))}
            man = run_distill(m, "fashion-mnist", ipc, folder, backbone="fashion-mnist-v1", options=options,
                              progress=args.progress)
            over = {"repeats": args.repeats} if args.repeats else None
            s = run_evaluate(folder, profile=args.profile, overrides=over, progress=args.progress,
                             compile=args.compile or None)
        rows.append({"method": m, "ipc": ipc, "distill_seconds": man["seconds_total"],
                     **{k: s[k] for k in ("final_mean", "final_std", "best_mean", "best_std", "num_runs",
                                          "seconds_per_run")}, "epochs": s["protocol"]["epochs"]})
        r = rows[-1]
        print(f"{m} ipc {ipc}: final {r['final_mean']:.2f} ± {r['final_std']:.2f}, best {r['best_mean']:.2f} ± "
              f"{r['best_std']:.2f} ({r['num_runs']} runs, {r['seconds_per_run']:.0f} s/run)", flush=True)
    lines = ["| method | IPC | final acc % | best acc % | students | epochs | distil s | eval s/student |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ipc']} | {r['final_mean']:.2f} ± {r['final_std']:.2f} | "
                     f"{r['best_mean']:.2f} ± {r['best_std']:.2f} | {r['num_runs']} | {r['epochs']} | "
                     f"{r['distill_seconds']:.1f} | {r['seconds_per_run']:.0f} |")
    table = "\n".join(lines)
    print(table)
    out = Path("benchmarks/results") / f"fmnist_{args.profile}{'_' + args.tag if args.tag else ''}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
