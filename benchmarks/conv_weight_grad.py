"""A convolution's weight gradient: oneDNN's backward-weights kernel against the same gradient
computed as a forward convolution (``torchcaps.layers.conv2d``).

    python benchmarks/conv_weight_grad.py --json benchmarks/results/conv_weight_grad.json

For each convolution of CapsNet (the 9x9 convolution of the image and the 9x9, stride-2
primary-capsule convolution) at ``--batch-size``, times the forward, the native input
gradient, the native weight gradient and the forward-convolution weight gradient (median of
``--repeats`` after a warm-up), for each thread count of ``--threads``, and checks that the two
weight gradients agree. The CPU capability (``torch.backends.cpu.get_cpu_capability()``) is
in the JSON's machine entry: the library takes the forward formulation only on CPUs without
AVX-512, where it was measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from torchcaps.bench import machine_info, median_ms, save_result
from torchcaps.layers.conv2d import conv2d_weight_grad

#: (name, in channels, input size, out channels, kernel, stride) of CapsNet's convolutions
CONVS = (("capsnet conv1", 1, 28, 256, 9, 1), ("capsnet primary", 256, 20, 256, 9, 2))


def measure(batch: int, threads: int, repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    return [_measure_conv(*conv, batch, threads, repeats) for conv in CONVS]


def _measure_conv(name, cin, size, cout, k, s, batch, threads, repeats) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g)
    w = torch.randn(cout, cin, k, k, generator=g) * 0.01
    y = F.conv2d(x, w, stride=s)
    grad = torch.randn(y.shape, generator=g)

    def native(mask):
        return torch.ops.aten.convolution_backward(grad, x, w, None, [s, s], [0, 0], [1, 1],
                                                   False, [0, 0], 1, mask)

    def forward_form():
        return conv2d_weight_grad(x, grad, (k, k), (s, s), (0, 0))

    a, b = native([False, True, False])[1], forward_form()
    row = {"conv": name, "input": [batch, cin, size, size], "weight": [cout, cin, k, k],
           "stride": s, "threads": threads,
           "forward_ms": median_ms(lambda: F.conv2d(x, w, stride=s), repeats),
           "input_grad_ms": median_ms(lambda: native([True, False, False]), repeats),
           "weight_grad_native_ms": median_ms(lambda: native([False, True, False]), repeats),
           "weight_grad_as_forward_ms": median_ms(forward_form, repeats),
           "max_rel_difference": float((a - b).abs().max() / a.abs().max())}
    row["weight_grad_speedup"] = row["weight_grad_native_ms"] / row["weight_grad_as_forward_ms"]
    print(f"{name} batch {batch}, {threads} thread(s): forward {row['forward_ms']:.0f} ms, "
          f"input gradient {row['input_grad_ms']:.0f} ms, weight gradient native "
          f"{row['weight_grad_native_ms']:.0f} ms, as a forward convolution "
          f"{row['weight_grad_as_forward_ms']:.0f} ms ({row['weight_grad_speedup']:.1f}x; "
          f"max relative difference {row['max_rel_difference']:.1e})")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    rows = [r for t in a.threads for r in measure(a.batch_size, t, a.repeats)]
    result = {"command": "python benchmarks/conv_weight_grad.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "rows": rows}
    if a.json:
        save_result(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
