"""D3HR group sampling throughput: candidate groups scored per second versus the RNG floor.

For each (latent dimension d, IPC, skew axis), :func:`gendd.blocks.group_sampling.select_group` draws
and scores ``--candidates`` groups; the floor is drawing the same numbers alone (``torch.randn`` into a
buffer of the same chunk shape, chunked the same way), which no implementation can beat. Prints a
markdown table; ``ratio`` = select_group time / floor time (1.0 = scoring is free).

    python benchmarks/d3hr_throughput.py                       # d = 256 (Fashion-MNIST 4x8x8), IPC 10/50
    python benchmarks/d3hr_throughput.py --dims 256 4096       # add DiT-XL/2 (4x32x32)
    python benchmarks/d3hr_throughput.py --device cuda --dims 4096 --candidates 100000
"""

from __future__ import annotations

import argparse
import time

import torch

from gendd.blocks.group_sampling import groups_per_chunk, select_group


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_clock = time.perf_counter  # set by main: process CPU time on CPU (robust to other load), wall on CUDA


def floor_seconds(num: int, ipc: int, d: int, per: int, generator: torch.Generator) -> float:
    """Seconds to draw ``num * ipc * d`` standard normals in chunks of ``per`` groups (reused buffer)."""
    buf = torch.empty((per, ipc, d), device=generator.device)
    _sync(generator.device)
    t0 = _clock()
    for a in range(0, num, per):
        c = min(per, num - a)
        torch.randn((c, ipc, d), generator=generator, out=buf[:c])
    _sync(generator.device)
    return _clock() - t0


def run(dims, ipcs, axes, candidates, device, max_bytes, repeats) -> list[dict]:
    rows = []
    for d in dims:
        for ipc in ipcs:
            num = max(1, candidates // (1 if d <= 256 else 16)) if candidates > 0 else 1
            mu = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(device)
            sigma = torch.rand(d, generator=torch.Generator().manual_seed(1)).add_(0.1).to(device)
            mb = max_bytes or ((1 << 30) if device.type == "cuda" else (8 << 20))
            per = min(groups_per_chunk(ipc, d, mb), num)
            gen = torch.Generator(device=device).manual_seed(0)
            select_group(mu, sigma, ipc, min(num, per), gen, max_bytes=mb)  # warm-up
            fl = min(floor_seconds(num, ipc, d, per, gen) for _ in range(repeats))
            for axis in axes:
                best = float("inf")
                for _ in range(repeats):
                    _sync(device)
                    t0 = _clock()
                    select_group(mu, sigma, ipc, num, gen, skew_axis=axis, max_bytes=mb)
                    _sync(device)
                    best = min(best, _clock() - t0)
                rows.append({"d": d, "ipc": ipc, "axis": axis, "candidates": num, "per_chunk": per,
                             "floor_gps": num / fl, "score_gps": num / best, "ratio": best / fl,
                             "ns_per_number": best / (num * ipc * d) * 1e9})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[256])
    ap.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--axes", nargs="+", default=["reference", "per-dim"], choices=["reference", "per-dim"])
    ap.add_argument("--candidates", type=int, default=20000,
                    help="groups per measurement at d <= 256 (divided by 16 above)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--max-bytes", type=int, default=None, help="work-buffer bound (default: select_group's)")
    ap.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                    help="cpu = this process's CPU time (auto on CPU: robust to other load on a shared "
                         "machine; with several threads it sums them), wall = elapsed (auto on CUDA)")
    ap.add_argument("--repeats", type=int, default=2, help="timings per cell; the fastest is reported")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global _clock
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu")
    _clock = time.process_time if cpu_clock else time.perf_counter
    rows = run(args.dims, args.ipc, args.axes, args.candidates, device, args.max_bytes, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"D3HR group sampling on {name}, torch {torch.__version__}, "
          f"{'process CPU' if cpu_clock else 'wall-clock'} time, best of {args.repeats}\n")
    print("| d | IPC | skew axis | candidates | groups/chunk | RNG floor (groups/s) | scored (groups/s) "
          "| ratio to floor | ns per number |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['d']} | {r['ipc']} | {r['axis']} | {r['candidates']} | {r['per_chunk']} | "
              f"{r['floor_gps']:.0f} | {r['score_gps']:.0f} | {r['ratio']:.2f} | {r['ns_per_number']:.2f} |")


if __name__ == "__main__":
    main()
