"""Full-data upper bound: a student trained on the whole real training split under the DSA protocol.

    OMP_NUM_THREADS=1 python benchmarks/full_data.py --student convnet6 --epochs 3
    OMP_NUM_THREADS=1 python benchmarks/full_data.py --student resnet_ap10 --epochs 1

The `paper` profile's values (SGD lr 0.01, momentum 0.9, wd 5e-4, batch 256, DSA
color_crop_cutout_flip_scale_rotate, lr / 10 after pass E//2+1) for E + 1 passes over the 60k images,
precision `auto` (as the `quick` profile: bf16 autocast only on CPUs with native bf16), one student (seed 0),
tested on the 10k test split after every pass. Writes benchmarks/results/full_data_<student>.json. E is chosen for the CPU budget: these are short
schedules, not converged models (ConvNet-3's E = 3 figure of BENCHMARKS §3 comes from
backbone_quality.py with the same settings).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="convnet6")
    ap.add_argument("--epochs", type=int, default=3, help="E: E + 1 passes over the training split")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="precision policy (gendd.hardware)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student (speed only)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/full_data_<student>.json")
    args = ap.parse_args()

    import torch

    import gendd
    from gendd.data import get_dataset
    from gendd.evaluate import get_profile
    from gendd.evaluate.train import normalize, prepare_test, train_student

    train, test = get_dataset(args.data, "train"), get_dataset(args.data, "test")
    proto = get_profile("paper").with_overrides(student=args.student, epochs=args.epochs, repeats=1, eval_every=1,
                                                precision=args.precision, compile=args.compile)
    x = normalize(train.load(range(len(train))), train.mean, train.std)
    y = torch.as_tensor(train.labels)
    t0 = time.time()
    res = train_student(x, y, prepare_test(test), proto, seed=0, progress=True, num_classes=train.num_classes)
    report = {"student": args.student, "data": args.data, "train_images": len(train), "test_split": test.split,
              "epochs": args.epochs, "passes": args.epochs + 1, "precision": res["precision"],
              "final_acc": res["final_acc"], "best_acc": res["best_acc"], "history": res["history"],
              "seconds": time.time() - t0, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "gendd": gendd.__version__, "machine": platform.machine(),
              "protocol": "dsa (paper values), full train split"}
    out = Path(args.out or f"benchmarks/results/full_data_{args.student}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
