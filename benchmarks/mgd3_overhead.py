"""MGD3 sampling overhead over plain DiT sampling at the same number of steps (Fashion-MNIST backbone).

For each IPC, one class (``--class-index``) is sampled ``--repeats`` times with ``dit``'s loop (no
hooks) and with MGD3's mode-guidance hook (k-means modes of the class's cached latents, default
lambda and stop step), from the same noise; times are process CPU seconds (robust to other load on
the machine), the minimum over repeats. Mode discovery (k-means on the class latents) is a one-off
per class and reported separately. ``overhead`` = guided / plain - 1.

    OMP_NUM_THREADS=1 python benchmarks/mgd3_overhead.py --ipc 10 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--class-index", type=int, default=0)
    ap.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    ap.add_argument("--out", default="benchmarks/results/mgd3_overhead")
    args = ap.parse_args()

    from gendd.backbone.sampling import sample
    from gendd.blocks.modes import discover_modes
    from gendd.cache import LatentCache
    from gendd.data import get_dataset
    from gendd.methods import build_method
    from gendd.methods.mgd3 import ModeGuidance
    from gendd.pipeline import resolve_backbone

    ds = get_dataset("fashion-mnist", "train")
    bb = resolve_backbone("fashion-mnist-v1")
    method = build_method("mgd3", sampler=args.sampler)
    cfg = method.config
    cache = LatentCache.build(ds, bb, None, method.encode_spec(), progress=False)
    latents = cache.latents(args.class_index)
    sconf = cfg.sampler_config(bb)
    rows = []
    for ipc in args.ipc:
        t0 = time.process_time()
        modes = discover_modes(latents, ipc, cfg.mode_method, seed=cfg.seed)
        t_modes = time.process_time() - t0
        noise = torch.randn((ipc, *bb.latent_shape), generator=torch.Generator().manual_seed(0))
        labels = torch.full((ipc,), ds.model_labels[args.class_index], dtype=torch.long)
        hook = ModeGuidance(modes.modes, cfg.mode_guidance_scale, cfg.resolved_stop_step(), cfg.resolved_form())
        times: dict[str, list[float]] = {"plain": [], "guided": []}
        for _ in range(args.repeats):
            for name, hooks in (("plain", []), ("guided", [hook])):
                t0 = time.process_time()
                sample(bb, noise, labels, sconf, hooks=hooks, generator=torch.Generator().manual_seed(1),
                       progress=False)
                times[name].append(time.process_time() - t0)
        plain, guided = min(times["plain"]), min(times["guided"])
        rows.append({"ipc": ipc, "steps": sconf.num_steps, "sampler": args.sampler,
                     "guided_steps": cfg.resolved_stop_step(), "plain_s": plain, "guided_s": guided,
                     "overhead_pct": 100 * (guided / plain - 1), "mode_discovery_s": t_modes,
                     "class_latents": int(latents.shape[0]), "threads": torch.get_num_threads()})
        r = rows[-1]
        print(f"IPC {ipc}: plain {plain:.3f} s, guided {guided:.3f} s, overhead {r['overhead_pct']:+.1f} %, "
              f"mode discovery {t_modes:.2f} s", flush=True)
    lines = ["| IPC | sampler | steps (guided) | dit sampling s | mgd3 sampling s | overhead | k-means modes s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ipc']} | {r['sampler']} | {r['steps']} ({r['guided_steps']}) | {r['plain_s']:.3f} | "
                     f"{r['guided_s']:.3f} | {r['overhead_pct']:+.1f} % | {r['mode_discovery_s']:.2f} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
