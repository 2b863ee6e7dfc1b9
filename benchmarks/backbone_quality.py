"""Backbone quality: label agreement of generated samples with a classifier trained on real data.

1. Train ConvNet-3 on the full real training split (DSA protocol, ``--classifier-epochs``); its
   test accuracy is the full-data upper bound of the Fashion-MNIST table.
2. Sample ``--per-class`` images per class from the backbone (DDPM-50 at each ``--cfg`` scale),
   classify them, and report per-class and mean agreement with the conditioning label.
3. Write a sample grid (one row per class) and a JSON of all figures.

    python benchmarks/backbone_quality.py --backbone fashion-mnist --out benchmarks/results/backbone_quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="fashion-mnist-v1")
    ap.add_argument("--classifier-epochs", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="classifier precision policy (gendd.hardware)")
    ap.add_argument("--classifier", default="runs/fmnist_convnet3_full.pt",
                    help="where the classifier is saved / reused from")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--cfg", type=float, nargs="+", default=None, help="guidance scales (default: backbone's and 1.0)")
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--grid", default=None, help="sample grid PNG (default: next to --out)")
    ap.add_argument("--out", default="benchmarks/results/backbone_quality.json")
    ap.add_argument("--classifier-only", action="store_true", help="stop after training the classifier")
    args = ap.parse_args()

    from gendd.backbone import SamplerConfig, sample
    from gendd.data import get_dataset
    from gendd.data.base import to_uint8
    from gendd.evaluate import get_profile
    from gendd.evaluate.students import build_student
    from gendd.evaluate.train import accuracy, normalize, prepare_test, train_student
    from gendd.export import save_grid
    from gendd.pipeline import resolve_backbone

    train, test = get_dataset("fashion-mnist", "train"), get_dataset("fashion-mnist", "test")
    test_xy = prepare_test(test)
    clf_path = Path(args.classifier)
    report: dict = {"backbone": args.backbone, "threads": torch.get_num_threads()}
    if args.classifier_only and clf_path.exists():
        return
    if clf_path.exists():
        state = torch.load(clf_path)
        net = build_student("convnet3", 1, 10, 28)
        net.load_state_dict(state["model"])
        report["classifier"] = state["report"]
    else:
        proto = get_profile("paper").with_overrides(epochs=args.classifier_epochs, repeats=1,
                                                    eval_every=1, precision=args.precision)
        x = normalize(train.load(range(len(train))), train.mean, train.std)
        y = torch.as_tensor(train.labels)
        res = train_student(x, y, test_xy, proto, seed=0, progress=True, num_classes=10, return_model=True)
        net = res.pop("model")
        report["classifier"] = {"final_acc": res["final_acc"], "best_acc": res["best_acc"], "history": res["history"],
                                "seconds": res["seconds"], "epochs": args.classifier_epochs,
                                "passes": args.classifier_epochs + 1, "protocol": "dsa (paper values), full train split",
                                "precision": res["precision"]}
        clf_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": net.state_dict(), "report": report["classifier"]}, clf_path)
    if args.classifier_only:
        return
    net.eval()
    report["classifier"]["test_acc_check"] = accuracy(net, *test_xy)

    bb = resolve_backbone(args.backbone)
    scales = args.cfg or sorted({bb.meta.default_cfg_scale, 1.0}, reverse=True)
    report["agreement"] = {}
    for scale in scales:
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(bb.num_classes).repeat_interleave(args.per_class)
        noise = torch.randn((len(labels), *bb.latent_shape), generator=g)
        t0 = time.time()
        z = sample(bb, noise, labels, SamplerConfig(args.sampler, args.steps, scale, batch_size=500), generator=g,
                   progress=True)
        imgs = torch.cat([to_uint8(bb.decode(z[i:i + 500])) for i in range(0, len(z), 500)])
        secs = time.time() - t0
        with torch.inference_mode():
            pred = torch.cat([net(normalize(imgs[i:i + 500], train.mean, train.std)).argmax(1)
                              for i in range(0, len(imgs), 500)])
        agree = (pred == labels).float().view(bb.num_classes, -1).mean(1) * 100
        report["agreement"][str(scale)] = {"mean": float(agree.mean()),
                                           "per_class": {n: round(float(a), 1) for n, a in zip(train.classes, agree)},
                                           "sampler": f"{args.sampler}-{args.steps}", "seconds": round(secs, 1),
                                           "samples": len(labels)}
        print(f"cfg {scale}: mean agreement {float(agree.mean()):.1f} %  ({secs:.0f} s for {len(labels)} samples)")
        if scale == bb.meta.default_cfg_scale:
            grid = Path(args.grid or Path(args.out).with_suffix(".png"))
            grid.parent.mkdir(parents=True, exist_ok=True)
            per_row = min(10, args.per_class)
            pick = torch.cat([torch.arange(c * args.per_class, c * args.per_class + per_row)
                              for c in range(bb.num_classes)])
            save_grid(imgs[pick], per_row, grid)
            report["grid"] = str(grid)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "classifier"}, indent=2))
    print("classifier:", {k: v for k, v in report["classifier"].items() if k != "history"})


if __name__ == "__main__":
    main()
