"""Convolutional capsule votes: batched GEMM vs the loop reference vs a plain convolution.

    python benchmarks/conv_caps.py --json benchmarks/results/conv_caps.json

For each layer shape, times (median of ``--repeats`` after ``--warmup`` calls) the vote
computation of :func:`torchcaps.layers.conv.conv_capsule_votes` (one gather + one batched
GEMM), :func:`~torchcaps.layers.conv.conv_capsule_votes_loop` (loops over output positions
and kernel offsets, the common port) and ``nn.Conv2d(T*D_in, C*D_out, K)`` on the same input,
which does exactly the same number of multiply-adds (it sums over (k, t) where the capsule
layer keeps every vote). Forward only and forward + backward. Checks the two vote
implementations agree before timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from torchcaps.bench import machine_info, median_ms
from torchcaps.layers.conv import conv_capsule_votes, conv_capsule_votes_loop
from torchcaps.runtime import keep_freed_memory

RESULTS = Path(__file__).parent / "results"

#: name -> (B, T, H, W, D_in, C, D_out, K, stride, padding)
SHAPES = {
    # a second, convolutional capsule layer on CapsNet's 6x6 primary grid (Sabour et al. Sec. 4)
    "capsnet_conv_6x6": (32, 32, 6, 6, 8, 32, 8, 3, 1, 0),
    # SegCaps-like: few wide capsule types on a large grid (LaLonde & Bagci 2018)
    "segcaps_32x32": (4, 8, 32, 32, 16, 8, 16, 5, 1, 2),
    # a strided layer with 16-D capsules (matrix-capsule sized votes, EM/IDA conv caps)
    "strided_12x12": (16, 16, 12, 12, 16, 16, 16, 3, 2, 0),
}


def bench_shape(shape, warmup: int, repeats: int, loop_repeats: int) -> dict:
    b, t, h, w, d_in, c, d_out, k, s, p = shape
    torch.manual_seed(0)
    u = torch.randn(b, t, h, w, d_in, requires_grad=True)
    weight = (torch.randn(k * k, t, c, d_out, d_in) * d_in ** -0.5).requires_grad_()
    conv = nn.Conv2d(t * d_in, c * d_out, k, s, p, bias=False)
    x = torch.randn(b, t * d_in, h, w, requires_grad=True)

    fast, (ho, wo) = conv_capsule_votes(u, weight, s, p)
    with torch.no_grad():
        ref, _ = conv_capsule_votes_loop(u, weight, s, p)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    macs = b * ho * wo * k * k * t * d_in * c * d_out
    probe = torch.randn_like(fast)  # a fixed upstream gradient for backward

    def train(fn):
        def step():
            out = fn()
            out.backward(probe if out.shape == probe.shape else torch.ones_like(out))
        return step

    row = {"shape": dict(B=b, T=t, H=h, W=w, D_in=d_in, C=c, D_out=d_out, K=k, stride=s, padding=p),
           "macs": macs, "votes_mb": fast.numel() * fast.element_size() / 1e6}
    with torch.no_grad():
        row["gemm_forward_ms"] = median_ms(lambda: conv_capsule_votes(u, weight, s, p), repeats,
                                           warmup=warmup)
        row["loop_forward_ms"] = median_ms(lambda: conv_capsule_votes_loop(u, weight, s, p),
                                           loop_repeats, warmup=1)
        row["conv_forward_ms"] = median_ms(lambda: conv(x), repeats, warmup=warmup)
    row["gemm_train_ms"] = median_ms(train(lambda: conv_capsule_votes(u, weight, s, p)[0]), repeats,
                                     warmup=warmup)
    row["loop_train_ms"] = median_ms(train(lambda: conv_capsule_votes_loop(u, weight, s, p)[0]),
                                     loop_repeats, warmup=1)
    row["conv_train_ms"] = median_ms(train(lambda: conv(x)), repeats, warmup=warmup)
    for phase in ("forward", "train"):
        row[f"speedup_vs_loop_{phase}"] = row[f"loop_{phase}_ms"] / row[f"gemm_{phase}_ms"]
        row[f"ratio_to_conv_{phase}"] = row[f"gemm_{phase}_ms"] / row[f"conv_{phase}_ms"]
    row["gemm_forward_gflops"] = 2 * macs / row["gemm_forward_ms"] / 1e6
    row["conv_forward_gflops"] = 2 * macs / row["conv_forward_ms"] / 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--loop-repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    keep_freed_memory()  # as training does (torchcaps.runtime)
    result = {"command": "python " + " ".join(sys.argv), "machine": machine_info(), "rows": {}}
    print(f"{'shape':18} {'votes MB':>9} {'gemm ms':>9} {'loop ms':>9} {'conv ms':>9} "
          f"{'x loop':>7} {'/ conv':>7}   (forward | forward+backward)")
    for name in a.shapes:
        row = bench_shape(SHAPES[name], a.warmup, a.repeats, a.loop_repeats)
        result["rows"][name] = row
        for ph in ("forward", "train"):
            print(f"{name if ph == 'forward' else '':18} {row['votes_mb']:9.1f} {row[f'gemm_{ph}_ms']:9.2f} "
                  f"{row[f'loop_{ph}_ms']:9.2f} {row[f'conv_{ph}_ms']:9.2f} "
                  f"{row[f'speedup_vs_loop_{ph}']:7.1f} {row[f'ratio_to_conv_{ph}']:7.2f}  {ph}")
        if a.json:  # after every shape, so a partial run is kept
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
