"""torchcaps.runtime: the allocator setting is applied where it can be and changes no result."""

import subprocess
import sys

import pytest


def _run(code: str, **env) -> str:
    import os

    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=full_env).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_applies_on_glibc_and_can_be_switched_off():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    code = "from torchcaps.runtime import keep_freed_memory as k; print(k(), k())"
    assert _run(code) == "True True"  # idempotent
    assert _run(code, TORCHCAPS_KEEP_MEMORY="0") == "False False"


def test_results_are_identical_with_and_without_the_setting():
    code = (
        "import torch, torchcaps\n"
        "from torchcaps.runtime import keep_freed_memory\n"
        "keep_freed_memory()\n"
        "torch.manual_seed(0); torch.set_num_threads(1)\n"
        "m = torchcaps.create_model('capsnet', conv_channels=16, primary_types=4)\n"
        "x = torch.rand(3, 1, 28, 28); y = torch.tensor([1, 2, 3])\n"
        "out = m(x, y); loss, _ = m.loss(out, x, y); loss.backward()\n"
        "print(repr(loss.item()), repr(m.digit.weight.grad.double().sum().item()))\n"
    )
    assert _run(code) == _run(code, TORCHCAPS_KEEP_MEMORY="0")
