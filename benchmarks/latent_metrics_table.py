"""Diversity and representativeness of every distilled set of a `gendd bench` folder (VAE latent space).

    gendd bench benchmarks/grids/fmnist_table.toml --collect-only     # computes runs/table/metrics/*.json
    python benchmarks/latent_metrics_table.py runs/table

Per set, means over classes of (gendd.metrics): mean pairwise cosine distance of the distilled latents
(diversity, higher = more varied), mean distance of real latents to their nearest distilled latent
(representativeness, lower = the real class is better covered), coverage (Naeem et al. 2020, k = 5) and the
Fréchet distance between Gaussian fits of distilled and real latents. IPC 1 has no pairwise figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_dir")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    res = json.loads((Path(args.bench_dir) / "results.json").read_text())
    sets = res["set_metrics"]

    def fmt(v, d=3):
        return "–" if v is None or v != v else f"{v:.{d}f}"

    lines = ["| set | mean pairwise cos dist (div) | real -> nearest distilled (repr) | coverage | FD |",
             "|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(res.get("config", {}).get("methods", []))}

    def key(n: str) -> tuple:
        label, ipc = n.rsplit("-ipc", 1)
        return order.get(label, len(order)), label, int(ipc)

    for name in sorted(sets, key=key):
        m = sets[name]
        lines.append(f"| {name} | {fmt(m.get('pairwise_cos'))} | {fmt(m.get('representativeness'), 2)} | "
                     f"{fmt(m.get('coverage'))} | {fmt(m.get('fd'), 1)} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
