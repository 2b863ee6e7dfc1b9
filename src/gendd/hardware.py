"""Running fast on the machine at hand: the compute precision, and the CPU memory allocator.

**Precision.** A protocol (or a DM / teacher run) states a precision *policy*:

* ``fp32``: plain float32.
* ``bf16``: ``torch.autocast(device, torch.bfloat16)`` on the forward passes, whatever the cost.
* ``auto``: bf16 where the hardware computes it natively and it is faster, else fp32:

  - CUDA: ``torch.cuda.is_bf16_supported()``.
  - CPU: the CPU has AVX512-BF16 or AMX (``torch.cpu._is_avx512_bf16_supported``,
    ``_is_amx_tile_supported``), ATen dispatches AVX-512 kernels (``ATEN_CPU_CAPABILITY`` may cap
    it) and oneDNN is not capped below ``AVX512_CORE_BF16`` (``ONEDNN_MAX_CPU_ISA``); then a short
    timing of a ConvNet-3-sized convolution step confirms bf16 is at least
    :data:`MIN_SPEEDUP` x faster. Without those instructions bf16 is emulated in software: on an
    AVX2-only AMD EPYC a ConvNet-3 step at batch 100 took 11.0 s under bf16 autocast against
    1.32 s in fp32.

:func:`resolve_precision` turns a policy into ``"fp32"`` or ``"bf16"`` (what results record);
:func:`autocast` is the context every forward pass runs under.

**Allocator.** glibc's ``malloc`` serves blocks above 32 MiB with ``mmap`` and gives them back to the
kernel on ``free``, so every large activation of a training step is page-faulted in and zeroed
again: a ConvNet-3 step at batch 100 spends about 30 % of its time there, the VAE encoder
35 % (BENCHMARKS.md §10). :func:`tune_allocator` (called by the ``gendd`` entry point and its worker processes, never
on import) keeps freed memory in the heap instead (``mallopt(M_MMAP_MAX, 0)``,
``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``), the effect of a caching allocator such as jemalloc.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import time

import torch

from gendd.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")

#: bf16 must beat fp32 by this factor in the CPU probe for ``auto`` to choose it.
MIN_SPEEDUP = 1.15

#: oneDNN ISA names (``ONEDNN_MAX_CPU_ISA``) that include native bf16 dot products.
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                     "AVX10_2_512_AMX_2", "ALL")


def check_precision(policy: str) -> str:
    if policy not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {policy!r}")
    return policy


def cpu_bf16_native() -> bool:
    """Whether this process's CPU kernels compute bf16 in hardware (no timing)."""
    cpu = torch.cpu
    has_isa = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                   or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    if not has_isa or not torch.backends.cpu.get_cpu_capability().upper().startswith(("AVX512", "AMX")):
        return False  # ATen dispatches AVX2 or older kernels (an old CPU, or ATEN_CPU_CAPABILITY=avx2)
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return cap in _ONEDNN_BF16_ISAS


def _step_seconds(bf16: bool, repeats: int = 3) -> float:
    """Best-of-``repeats`` time of conv3x3(128 -> 128) + instance norm forward and backward on a
    (32, 128, 16, 16) batch: the costliest layer of a ConvNet-3 student step at 28-32 px."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(128, 128, 3, padding=1)
        norm = torch.nn.GroupNorm(128, 128)
        x = torch.randn(32, 128, 16, 16)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms the kernels up
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = norm(conv(x))
        y.float().square().mean().backward()
        best = min(best, time.perf_counter() - t0)
    return best


#: The probe's answer per torch thread count, in this process (a cache of a hardware fact).
_PROBED: dict[int, bool] = {}


def cpu_bf16_faster(threads: int, *, decided: bool | None = None) -> bool:
    """Whether bf16 beat fp32 in this process's timing probe at ``threads`` torch threads (probed once).

    A timing is noisy on a loaded machine, so processes working for one run must not probe each on
    their own: the parent probes, and passes its answer to each worker as ``decided``, which is
    then what this process answers from then on."""
    if decided is not None:
        _PROBED[threads] = decided
    if threads not in _PROBED:
        _PROBED[threads] = _step_seconds(False) / _step_seconds(True) >= MIN_SPEEDUP
    return _PROBED[threads]



def resolve_precision(policy: str, device: str | torch.device = "cpu") -> str:
    """``"fp32"`` or ``"bf16"``: the precision a run under ``policy`` uses on ``device``."""
    check_precision(policy)
    if policy != "auto":
        return policy
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu" or not cpu_bf16_native():
        return "fp32"
    return "bf16" if cpu_bf16_faster(torch.get_num_threads()) else "fp32"


def autocast(precision: str, device: str | torch.device = "cpu"):
    """The autocast context of a resolved ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ConfigError(f"resolved precision must be fp32 or bf16, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def precision_label(precisions: list[str]) -> str:
    """One label for the precisions of pooled results: ``"fp32"``, or ``"mixed: bf16 x1, fp32 x2"``."""
    kinds = sorted(set(precisions))
    if len(kinds) == 1:
        return kinds[0]
    return "mixed: " + ", ".join(f"{k} x{precisions.count(k)}" for k in kinds)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.lru_cache(maxsize=None)
def tune_allocator() -> bool:
    """Keep freed large blocks in glibc's heap (module docstring); True if applied.

    A no-op off glibc, or when ``GENDD_TUNE_MALLOC=0``. The process keeps its peak heap size
    until it exits, which is what a compute process wants."""
    if os.environ.get("GENDD_TUNE_MALLOC", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
