"""torchcaps.precision: autocast, and refusing bf16 where it has no fast kernels."""

import pytest
import torch

from torchcaps import bench, precision
from torchcaps.precision import autocast, bf16_is_slow, check_precision


@pytest.fixture
def capability(monkeypatch):
    """Set the CPU capability; the timed fallback must not be needed when it is known."""
    def set_to(cap, slowdown=80.0):
        monkeypatch.setattr(precision, "cpu_capability", lambda: cap)
        monkeypatch.setattr(precision, "bf16_slowdown", lambda *a, **k: slowdown)
    return set_to


def test_bench_reexports_the_one_definition():
    assert bench.autocast is precision.autocast and bench.PRECISIONS is precision.PRECISIONS


def test_autocast_behaviour_is_unchanged():
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "fp32"):
        assert torch.mm(a, a).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.mm(a, a).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast(torch.device("cpu"), "fp16")


@pytest.mark.parametrize("cap", ["AVX2", "NO AVX"])
def test_bf16_is_refused_on_a_cpu_without_native_bf16(capability, cap):
    capability(cap)
    assert bf16_is_slow("cpu")
    msg = rf"bf16 on this CPU \(capability {cap}, no native bf16\) runs about 80 times slower"
    with pytest.raises(ValueError, match=msg + ".*use --precision fp32, or pass --force-precision"):
        check_precision("cpu", "bf16")
    assert check_precision("cpu", "fp32") is None  # fp32 is never refused


@pytest.mark.parametrize("cap", ["AVX512_BF16", "AMX_BF16"])
def test_bf16_passes_with_native_bf16(capability, cap):
    capability(cap, slowdown=float("nan"))  # must not be consulted
    assert not bf16_is_slow("cpu")
    assert check_precision(torch.device("cpu"), "bf16") is None


@pytest.mark.parametrize("slowdown, slow", [(1.3, False), (40.0, True)])
def test_other_capabilities_are_decided_by_the_timed_matmul(capability, slowdown, slow):
    capability("AVX512", slowdown)
    assert bf16_is_slow("cpu") is slow


def test_force_warns_instead_of_raising(capability):
    capability("AVX2")
    seen = []
    msg = check_precision("cpu", "bf16", force=True, warn=seen.append)
    assert seen == [msg] and msg.endswith("slower than fp32; running anyway")


def test_force_warns_on_stderr_by_default(capability, capsys):
    capability("AVX2")
    check_precision("cpu", "bf16", force=True)
    assert capsys.readouterr().err.startswith("warning: bf16 on this CPU (capability AVX2")


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("cpu", "fp16")


def test_cpu_capability_names_a_known_level():
    cap = precision.cpu_capability()
    assert cap in ("AMX_BF16", "AVX512_BF16", "AVX512", "AVX2", "NO AVX", "DEFAULT", "VSX",
                   "Z VECTOR", "SVE256") or cap.startswith("SVE")


def test_timed_matmul_ratio_is_positive_and_cached():
    r = precision.bf16_slowdown("cpu", 64)
    assert r > 0 and precision.bf16_slowdown("cpu", 64) == r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_is_bf16_supported():
    assert bf16_is_slow("cuda") is not torch.cuda.is_bf16_supported(including_emulation=False)
