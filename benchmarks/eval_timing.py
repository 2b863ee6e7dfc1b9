"""Time one student run of an evaluation profile on Fashion-MNIST random real subsets.

For each IPC, a class-balanced random subset of the training split (IPC images per class) is the
"distilled" set; a ConvNet-3 student is trained with the profile's protocol in fp32 and in CPU
bf16 autocast, and the seconds per run and final test accuracies are printed as a markdown table.

    python benchmarks/eval_timing.py --ipc 1 10 50 --profile paper --repeats-to-time 1
    python benchmarks/eval_timing.py --epochs 2          # smoke test
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gendd.data import get_dataset
from gendd.evaluate import get_profile, normalize, prepare_test, train_student


def random_subset(labels: np.ndarray, ipc: int, num_classes: int, seed: int) -> np.ndarray:
    """``ipc`` random indices per class (numpy Generator seeded with ``seed``)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), ipc, replace=False)
                           for c in range(num_classes)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--repeats-to-time", type=int, default=1,
                    help="students timed per (IPC, precision); the mean is reported")
    ap.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--test-limit", type=int, default=None,
                    help="class-balanced test subset size (default: the full test split)")
    ap.add_argument("--seed", type=int, default=0, help="subset and student seed")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)

    proto = get_profile(args.profile)
    overrides: dict[str, object] = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.threads is not None:
        overrides["num_threads"] = args.threads
    if args.test_limit is not None:
        overrides["test_limit"] = args.test_limit
    proto = proto.with_overrides(**overrides)

    train_ds = get_dataset("fashion-mnist", "train")
    test_ds = get_dataset("fashion-mnist", "test")
    t0 = time.perf_counter()
    test = prepare_test(test_ds, proto.test_limit)
    t_prep = time.perf_counter() - t0

    rows = []
    for ipc in args.ipc:
        idx = random_subset(train_ds.labels, ipc, train_ds.num_classes, args.seed)
        x = normalize(train_ds.load(idx.tolist()), test_ds.mean, test_ds.std)
        y = torch.from_numpy(train_ds.labels[idx].copy())
        cells: dict[str, tuple[float, float, float, float]] = {}
        for prec in args.precisions:
            p = proto.with_overrides(precision=prec)
            runs = [train_student(x, y, test, p, seed=args.seed + r, progress=args.progress,
                                  num_classes=test_ds.num_classes,
                                  desc=f"IPC {ipc} {prec} run {r + 1}")
                    for r in range(args.repeats_to_time)]
            secs = float(np.mean([r["seconds"] for r in runs]))
            ev = float(np.mean([r["eval_seconds"] / len(r["history"]) for r in runs]))
            acc = float(np.mean([r["final_acc"] for r in runs]))
            per_epoch = float(np.mean([(r["seconds"] - r["eval_seconds"]) / (p.epochs + 1)
                                       for r in runs]))
            cells[prec] = (secs, per_epoch, ev, acc)
        rows.append((ipc, cells))

    print(f"profile {args.profile!r}: epochs={proto.epochs} (+1 pass), "
          f"eval_every={proto.eval_interval}, test images={test[0].shape[0]}, "
          f"threads={proto.num_threads or torch.get_num_threads()}, torch {torch.__version__}, "
          f"test-set preparation {t_prep:.1f} s, {args.repeats_to_time} run(s) per cell")
    head = "| IPC |"
    sep = "|---|"
    for prec in args.precisions:
        head += (f" {prec} s/run | {prec} s/epoch (train) | {prec} s/test pass |"
                 f" {prec} final acc % |")
        sep += "---|---|---|---|"
    print(head)
    print(sep)
    for ipc, cells in rows:
        line = f"| {ipc} |"
        for prec in args.precisions:
            secs, per_epoch, ev, acc = cells[prec]
            line += f" {secs:.1f} | {per_epoch:.3f} | {ev:.2f} | {acc:.1f} |"
        print(line)


if __name__ == "__main__":
    main()
