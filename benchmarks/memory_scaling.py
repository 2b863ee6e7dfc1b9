"""Peak memory against the number of classes: the latent cache and D3HR's statistics stay per class.

For each class count, a fresh process builds a synthetic dataset (``--per-class`` random 12-px images per class, a
tiny random-init backbone), encodes the latent cache, then distils ``d3hr`` (DDIM inversion of every latent, the
per-class Gaussian, group sampling) and ``mgd3`` (modes of the class latents) at IPC 2, and reports its peak
resident set size (``ru_maxrss``) after each stage. Class files are read one class at a time (safetensors), so
the peak should not grow with the number of classes; what does grow is the dataset itself (here in memory,
``classes x per_class x 144`` bytes) and the manifest.

    python benchmarks/memory_scaling.py                                   # 8, 32, 128 classes of 64 images
    python benchmarks/memory_scaling.py --classes 8 64 512 --out benchmarks/results/memory_scaling.md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(classes: int, per_class: int, root: str) -> dict:
    import numpy as np
    import torch

    from gendd.backbone import tiny_backbone
    from gendd.cache import LatentCache
    from gendd.data.base import ImageDataset
    from gendd.export import distill
    from gendd.methods import build_method

    torch.set_num_threads(1)
    out = {"classes": classes, "images": classes * per_class, "start": _peak_mib()}
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 1, 12, 12), generator=g, dtype=torch.uint8)
    ds = ImageDataset(name="synthetic", split="train", classes=[f"c{i:05d}" for i in range(classes)],
                      labels=np.repeat(np.arange(classes), per_class), channels=1, image_size=12,
                      loader=lambda idx: images[list(idx)], fingerprint_parts=[str(classes), str(per_class)])
    bb = tiny_backbone(num_classes=classes, image_size=16, channels=1, pad=2, vae_channels=(32, 32))
    out["loaded"] = _peak_mib()
    runs = {"d3hr": {"num_steps": 4, "inversion_steps": 2, "num_candidates": 16}, "mgd3": {"num_steps": 4}}
    for name, options in runs.items():
        method = build_method(name, **options)
        cache = LatentCache.build(ds, bb, Path(root) / "cache", method.encode_spec(), progress=False)
        out[f"{name} cache"] = _peak_mib()
        distill(method, ds, 2, Path(root) / name, backbone=bb, cache=cache, progress=False)
        out[name] = _peak_mib()
    cache_bytes = sum(p.stat().st_size for p in (Path(root) / "cache").rglob("*.safetensors"))
    out["cache MiB on disk"] = cache_bytes / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--per-class", type=int, default=64)
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), int(args.child[1]), args.child[2])))
        return
    rows = []
    for n in args.classes:
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([sys.executable, __file__, "--child", str(n), str(args.per_class), tmp],
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    cols = ["loaded", "d3hr cache", "d3hr", "mgd3 cache", "mgd3"]
    lines = ["| classes | images | cache on disk (MiB) | " + " | ".join(f"peak RSS after {c} (MiB)" for c in cols) + " |",
             "|---" * (3 + len(cols)) + "|"]
    for r in rows:
        lines.append(f"| {r['classes']} | {r['images']} | {r['cache MiB on disk']:.1f} | "
                     + " | ".join(f"{r[c]:.0f}" for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
