"""Student training steps against this machine's fp32 GEMM roofline, in one run.

Measures, with the torch threads given (default 1, one core):

* the GEMM peak: best time of an ``n x n @ n x n`` float32 matmul (``2 n^3`` FLOP), also bf16;
* the FLOPs of one ConvNet-3 training step (forward + backward, ``torch.utils.flop_counter``) at
  IPC 10 (one batch of 100 images, as the DSA protocol's batch 256 holds the whole set) and IPC 50
  (a batch of 256);
* the wall time of that step -- DSA augmentation, forward, loss, backward, SGD update, as
  :func:`gendd.evaluate.train.train_student` runs it -- in fp32 and bf16 autocast, eager and
  ``torch.compile``-d, with the share taken by the DSA augmentation, and the seconds of one pass
  over the 10k test images;
* ``floor = FLOPs / GEMM peak`` and each path's ``time / floor``;
* each path with glibc's default allocator and with :func:`gendd.hardware.tune_allocator` (what
  the ``gendd`` command runs with), each in its own process (``mallopt`` is process-wide).

    python benchmarks/step_roofline.py                      # this CPU as it is
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python benchmarks/step_roofline.py --steps 3 --test-precisions fp32   # an AVX2-only CPU
    python benchmarks/step_roofline.py --json out.json --no-compile --steps 5   # out.default.json, out.tuned.json
    python benchmarks/step_roofline.py --ipc --encode                          # only the VAE encoder
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gemm_peak(dtype: torch.dtype, n: int = 1536, repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` ``n x n`` matmuls."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(net, x, y) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def time_steps(net, fwd, x, y, augment, precision: str, steps: int) -> dict:
    """Median seconds of a full training step and of its DSA augmentation, after 2 warm-up steps."""
    from gendd.hardware import autocast

    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    total, aug = [], []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        xb = augment(x, g)
        t1 = time.perf_counter()
        with autocast(precision):
            out = fwd(xb)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= 2:
            total.append(t2 - t0)
            aug.append(t1 - t0)
    return {"step_s": statistics.median(total), "dsa_s": statistics.median(aug)}


def test_pass(net, fwd, precision: str, peak: float, n: int = 10000, batch: int = 500) -> tuple[float, float]:
    """Seconds of one test pass over ``n`` images in batches of ``batch`` (the DSA protocol's
    ``test_batch_size``) through ``fwd`` (``net`` or its compiled form), and that time over its floor
    (``net``'s forward FLOPs / GEMM peak)."""
    from torch.utils.flop_counter import FlopCounterMode

    from gendd.hardware import autocast

    x = torch.randn(batch, 1, 28, 28)
    net.eval()
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            net(x)
        with autocast(precision):
            fwd(x)
            t0 = time.perf_counter()
            for _ in range(n // batch):
                fwd(x).argmax(1)
            seconds = time.perf_counter() - t0
    net.train()
    floor = fc.get_total_flops() * (n // batch) / (peak * 1e9)
    return seconds, seconds / floor


def encode_seconds(n: int = 2048, batch: int = 256) -> float:
    """Seconds to encode ``n`` random 28 px images with the shipped backbone's VAE (after one warm-up batch)."""
    from gendd.pipeline import resolve_backbone

    bb = resolve_backbone("fashion-mnist-v1")
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        bb.encode(x)
        t0 = time.perf_counter()
        for _ in range(n // batch):
            bb.encode(x)
    return time.perf_counter() - t0


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name`` and the values after it."""
    out, skip = [], False
    for a in argv:
        if a == name:
            skip = True
        elif skip and not a.startswith("--"):
            continue
        else:
            skip = False
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per path (median)")
    ap.add_argument("--ipc", type=int, nargs="*", default=[10, 50])
    ap.add_argument("--encode", action="store_true",
                    help="also time the shipped VAE encoder (the latent cache's work) on 2048 images")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile paths")
    ap.add_argument("--no-test-pass", action="store_true", help="skip timing the 10k-image test pass")
    ap.add_argument("--test-precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="precisions whose test pass is timed (default: --precisions; an emulated bf16 pass "
                         "takes minutes)")
    ap.add_argument("--allocator", nargs="+", default=["default", "tuned"], choices=["default", "tuned"],
                    help="glibc malloc as is, and/or gendd.hardware.tune_allocator")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if len(args.allocator) > 1:  # one process per allocator, same other arguments
        import subprocess
        import sys

        rest = _without_option(list(sys.argv[1:] if argv is None else argv), "--allocator")
        rest = _without_option(rest, "--json")
        for alloc in args.allocator:
            out = [] if args.json is None else ["--json", args.json.replace(".json", f".{alloc}.json")]
            subprocess.run([sys.executable, __file__, *rest, *out, "--allocator", alloc], check=True)
        return
    if args.allocator == ["tuned"]:
        from gendd.hardware import tune_allocator

        tune_allocator()

    from gendd.evaluate import DSAugment, build_student
    from gendd.hardware import cpu_bf16_native, resolve_precision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak32, peak16 = gemm_peak(torch.float32), gemm_peak(torch.bfloat16)
    report = {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
              "threads": args.threads, "torch": torch.__version__, "gemm_gflops_fp32": round(peak32, 1),
              "gemm_gflops_bf16": round(peak16, 1), "cpu_bf16_native": cpu_bf16_native(),
              "auto_precision": resolve_precision("auto"), "rows": []}
    report["allocator"] = args.allocator[0]
    print(f"# {report['cpu']} | ATen {report['capability']} | {args.threads} thread(s) | torch {torch.__version__}"
          f" | malloc {args.allocator[0]}")
    print(f"GEMM peak: fp32 {peak32:.1f} GFLOP/s, bf16 {peak16:.1f} GFLOP/s; "
          f"native bf16: {report['cpu_bf16_native']}; precision auto -> {report['auto_precision']}")
    print("| IPC | batch | GFLOP/step | floor s | path | step s | x floor | DSA s | test pass s | test x floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    augment = DSAugment()
    for ipc in args.ipc:
        batch = min(256, 10 * ipc)
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        net = build_student("convnet3", 1, 10, 28)
        flops = step_flops(net, x, y)
        floor = flops / (peak32 * 1e9)
        paths = [(p, False) for p in args.precisions]
        if not args.no_compile:
            paths += [(p, True) for p in args.precisions]
        for precision, compiled in paths:
            torch.manual_seed(0)
            net = build_student("convnet3", 1, 10, 28)
            fwd = torch.compile(net) if compiled else net
            t = time_steps(net, fwd, x, y, augment, precision, args.steps)
            timed = args.test_precisions or args.precisions
            test_s, test_x = (None, None) if args.no_test_pass or ipc != args.ipc[0] or precision not in timed else \
                test_pass(net, fwd, precision, peak32)
            name = precision + (" compiled" if compiled else "")
            row = {"ipc": ipc, "batch": batch, "gflop": flops / 1e9, "floor_s": floor, "path": name, **t,
                   "x_floor": t["step_s"] / floor, "test_pass_s": test_s, "test_x_floor": test_x}
            report["rows"].append(row)
            print(f"| {ipc} | {batch} | {flops / 1e9:.1f} | {floor:.3f} | {name} | {t['step_s']:.3f} | "
                  f"{t['step_s'] / floor:.2f} | {t['dsa_s']:.3f} | "
                  f"{'' if test_s is None else f'{test_s:.1f}'} | {'' if test_x is None else f'{test_x:.2f}'} |",
                  flush=True)
    if args.encode:
        report["encode_s_per_120k"] = encode_seconds() * 120_000 / 2048
        print(f"VAE encode (shipped Fashion-MNIST backbone, batch 256): "
              f"{report['encode_s_per_120k']:.0f} s per 120k images (60k images and their flips)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
