"""gendd.hardware: the precision policy follows the hardware; results record and label precisions."""

from __future__ import annotations

import pytest
import torch

from gendd.errors import ConfigError
from gendd.hardware import autocast, cpu_bf16_native, precision_label, resolve_precision, tune_allocator


def test_explicit_policies_are_kept():
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16")


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_auto_is_fp32_without_avx512_kernels(monkeypatch, capability):
    """ATEN_CPU_CAPABILITY=avx2 (or an AVX2-only CPU): bf16 would be emulated, so auto -> fp32."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert not cpu_bf16_native()
    assert resolve_precision("auto") == "fp32"


def test_auto_is_fp32_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto") == "fp32"


def test_auto_is_fp32_when_onednn_is_capped(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_bf16_native()
    assert resolve_precision("auto") == "fp32"


def test_auto_on_native_bf16_needs_the_timing_to_agree(monkeypatch):
    import gendd.hardware as hw

    monkeypatch.setattr(hw, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(hw, "_PROBED", {})
    monkeypatch.setattr(hw, "_step_seconds", lambda bf16, repeats=3: 1.0 if bf16 else 1.05)  # 1.05x: not enough
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(hw, "_PROBED", {})
    monkeypatch.setattr(hw, "_step_seconds", lambda bf16, repeats=3: 1.0 if bf16 else 2.0)
    assert resolve_precision("auto") == "bf16"


def test_a_decision_passed_down_is_kept_whatever_the_timing_says(monkeypatch):
    import gendd.hardware as hw

    monkeypatch.setattr(hw, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(hw, "_PROBED", {})
    monkeypatch.setattr(hw, "_step_seconds", lambda bf16, repeats=3: 1.0 if bf16 else 2.0)
    threads = torch.get_num_threads()
    assert hw.cpu_bf16_faster(threads, decided=False) is False
    assert resolve_precision("auto") == "fp32"  # the parent's answer, not this process's own probe


def test_autocast_contexts():
    x = torch.randn(4, 8)
    lin = torch.nn.Linear(8, 3)
    with autocast("fp32"):
        assert lin(x).dtype == torch.float32
    with autocast("bf16"):
        assert lin(x).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="resolved precision"):
        autocast("auto")


def test_precision_label():
    assert precision_label(["fp32", "fp32"]) == "fp32"
    assert precision_label(["fp32", "bf16", "fp32"]) == "mixed: bf16 x1, fp32 x2"


def test_tune_allocator_is_idempotent():
    first = tune_allocator()
    assert tune_allocator() is first


def test_students_record_precision_and_mixed_pools_are_labelled():
    """A student records the precision its policy resolved to; a pooled summary says when they differ."""
    from gendd.evaluate import DSAProtocol, train_student
    from gendd.evaluate.train import run_statistics

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 12, 12, generator=g), torch.arange(8) % 2
    test = (torch.randn(6, 1, 12, 12, generator=g), torch.arange(6) % 2)
    runs = [train_student(x, y, test, DSAProtocol(epochs=1, repeats=1, eval_every=0, precision=p), seed=0,
                          progress=False, num_classes=2) for p in ("fp32", "bf16")]
    assert [r["precision"] for r in runs] == ["fp32", "bf16"]
    assert run_statistics(runs[:1])["precision"] == "fp32"
    assert run_statistics(runs)["precision"] == "mixed: bf16 x1, fp32 x1"
