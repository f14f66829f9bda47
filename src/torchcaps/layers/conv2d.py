"""``nn.Conv2d`` with the weight gradient computed as a forward convolution on CPUs without
AVX-512.

The gradient of a convolution's weight is itself a convolution: for stride ``s`` and no
dilation,

    dL/dW[o, c, p, q] = sum_b sum_{y, x} g[b, o, y, x] * x_pad[b, c, s*y + p, s*x + q]

which is the forward convolution of the input with batch and channels swapped,
``x_pad^T (C, B, H, W)``, by the output gradient as a kernel, ``g^T (O, B, H', W')``, dilated
by ``s``: ``conv2d(x_pad^T, g^T, dilation=s)`` is ``(C, O, kh, kw)``, transposed to the
weight's ``(O, C, kh, kw)``. oneDNN's forward kernels are well tuned on every x86 CPU, its
backward-weights kernels less so on AVX2: there, for CapsNet's two convolutions at batch 64
(``benchmarks/conv_weight_grad.py``), the forward formulation takes a fifth of the time of
the native weight gradient for the 9x9 convolution of the 1-channel image and under half
for the 9x9, stride-2 primary-capsule convolution of 256 channels. The input gradient and
the forward are the native ones.

:class:`Conv2d` is a drop-in ``nn.Conv2d`` (same parameters, ``state_dict`` and outputs); it
takes this path only where it was measured faster: a CPU whose
``torch.backends.cpu.get_cpu_capability()`` is not an AVX-512 one (override with
:data:`FORWARD_WEIGHT_GRAD`), ``float32``/``float64`` without autocast, one group, no
dilation, zero padding. The gradient is that of ``nn.Conv2d`` up to round-off (tested in
float64); it is not differentiable twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2d", "FORWARD_WEIGHT_GRAD", "conv2d_weight_grad"]

#: ``None``: the forward-convolution weight gradient on CPUs without AVX-512; ``True`` /
#: ``False``: on every CPU / never
FORWARD_WEIGHT_GRAD: bool | None = None


def _enabled_here() -> bool:
    if FORWARD_WEIGHT_GRAD is not None:
        return FORWARD_WEIGHT_GRAD
    return not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def conv2d_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, stride,
                       padding) -> torch.Tensor:
    """``dL/dW`` ``(O, C, kh, kw)`` of ``conv2d(x, W, stride=stride, padding=padding)``
    from the input ``x (B, C, H, W)`` and the output gradient ``(B, O, H', W')``, as one
    forward convolution (see the module docstring)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    ho, wo = grad_out.shape[-2:]
    # only the rows and columns some output position reads
    x = x[:, :, :(ho - 1) * sh + kh, :(wo - 1) * sw + kw]
    w = F.conv2d(x.transpose(0, 1), grad_out.transpose(0, 1), dilation=(sh, sw))
    return w.transpose(0, 1).contiguous()


class _Conv2dForwardWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False,
                [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = conv2d_weight_grad(x, grad_out, weight.shape[-2:], ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight gradient is a forward convolution where that is faster
    (see the module docstring); everything else is ``nn.Conv2d``'s."""

    def _conv_forward(self, input, weight, bias):
        if (input.device.type == "cpu" and torch.is_grad_enabled() and weight.requires_grad
                and self.groups == 1 and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and input.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu") and _enabled_here()):
            return _Conv2dForwardWeightGrad.apply(input, weight, bias, self.stride,
                                                  self.padding)
        return super()._conv_forward(input, weight, bias)
