"""Subspace capsules (Edraki, Rahnavard, Shah, AAAI 2020, "Subspace Capsule Network",
arXiv 2002.02924).

A capsule type ``j`` owns a basis ``W_j`` (``N x C``, full column rank) of a ``C``-dimensional
subspace of the ``N``-dimensional input space. The capsule of an input ``x`` is its
coordinate vector in an orthonormal basis of ``span(W_j)``:

    (1)  G_j = W_j^T W_j                                   (Gram matrix, C x C)
    (2)  u_j = G_j^(-1/2) W_j^T x = M_j x,   M_j = G_j^(-1/2) W_j^T
    (3)  |u_j|^2 = x^T W_j G_j^(-1) W_j^T x = |P_j x|^2,   P_j = W_j G_j^(-1) W_j^T

``M_j`` has orthonormal rows (``M_j M_j^T = I``, ``M_j^T M_j = P_j``), so the length of a
capsule is the length of the projection of its input onto the subspace, whatever basis
spans it: ``W_j -> W_j R`` (``R`` invertible) rotates ``u_j`` but leaves ``|u_j|`` unchanged.

    (4)  v_j = relu(|u_j| - b_j^2) u_j / |u_j|             (capsule activation)

with one learnable ``b_j`` per capsule type. Equations (1)-(3) are as in our digest of the
paper. Equation (4) and its constants were checked against the authors' official code
(``MarziEd/SubSpace-Capsule-Network``, ``networks.py``, function ``score_act``): the norm
is reduced by the square of a per-type bias initialised to ``0.3`` and clipped at zero,
then multiplied onto the unit direction. The official code divides by ``|u| + eps``; we use
``|u| = sqrt(|u|^2 + eps)`` instead so the gradient is finite at ``u = 0``. Two options of
the official code are *not* part of equations (1)-(4) and are left out: a learned per-type
scale ``S`` multiplying ``M_j`` (``get_weight_caps(scale=True)``) and a per-type scalar bias
added to every component of ``u_j`` (``apply_bias_caps``). The official code computes
``G^(-1/2)`` with ``matrix_inverse`` + ``matrix_square_root`` or Newton-Schulz iterations;
we use a symmetric eigendecomposition with an explicit, stable backward (below). The paper's
own text beyond the abstract could not be retrieved here.

Convolutional subspace capsules apply (2) to every ``k x k`` patch, i.e. ``N = C_in k k``
and ``M_j`` reshaped to ``(C, C_in, k, k)`` is an ordinary convolution kernel.

**Folding (inference cost).** ``M_j`` depends only on the weights, so it can be computed
once: in ``eval()`` mode both layers cache it (recomputed only when the weights change),
(the cached weight is detached: in ``eval()`` mode inputs still get gradients, the basis
does not), and :meth:`SubspaceCaps.fold` / :meth:`SubspaceConvCaps.fold` return a
:class:`FoldedSubspaceCaps` holding one plain ``nn.Linear`` / ``nn.Conv2d`` with the same
cost and parameter count as a plain layer of that width.

**Stable ``G^(-1/2)``.** ``G = Q diag(l) Q^T``, ``G^(-1/2) = Q diag(max(l, eps)^(-1/2)) Q^T``.
Autograd through ``torch.linalg.eigh`` divides by eigenvalue gaps ``l_i - l_k`` and returns
Inf/NaN when eigenvalues repeat (e.g. an orthonormal basis, ``G = I``). We use the
Daleckii-Krein formula for the derivative of a matrix function instead:
``dG^(-1/2) = Q (K o (Q^T dG Q)) Q^T`` with the divided difference
``K_ik = (l_i^(-1/2) - l_k^(-1/2)) / (l_i - l_k) = -1 / (s_i s_k (s_i + s_k))``, ``s = sqrt(l)``,
which needs no division by a gap and equals the derivative ``-l^(-3/2) / 2`` when
``l_i = l_k``. Where both eigenvalues are clamped (``<= eps``) ``K = 0``; where one is, ``K``
uses the clamped values (a finite surrogate; such a basis is numerically rank deficient).

Shapes (letter legend: ``B`` batch, ``N`` input dimension, ``J`` capsule types,
``C`` capsule (subspace) dimension, ``H, W`` spatial size):

    =======================  ==========================  ===========================
    tensor                   SubspaceCaps                SubspaceConvCaps
    =======================  ==========================  ===========================
    input x                  (B, N)                      (B, C_in, H, W), N = C_in k k
    basis W (``weight``)     (J, N, C)                   (J, N, C)
    effective weight M       (J, C, N)                   (J, C, N) -> (J*C, C_in, k, k)
    output u or v            (B, J, C)                   (B, J, C, H', W')
    =======================  ==========================  ===========================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_dtype_matches, check_tensor

__all__ = [
    "FoldedSubspaceCaps",
    "SubspaceCaps",
    "SubspaceConvCaps",
    "inverse_sqrt_gram",
    "subspace_activation",
]


class _InvSqrtPSD(torch.autograd.Function):
    """``G -> G^(-1/2)`` for symmetric positive (semi-)definite ``G`` (batched), see module doc."""

    @staticmethod
    def forward(ctx, gram: torch.Tensor, eps: float) -> torch.Tensor:
        lam, q = torch.linalg.eigh(gram)  # (..., C), (..., C, C)
        lam_c = lam.clamp(min=eps)
        y = (q * lam_c.rsqrt().unsqueeze(-2)) @ q.mT  # Q diag(l^-1/2) Q^T
        ctx.save_for_backward(lam, q)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        lam, q = ctx.saved_tensors
        s = lam.clamp(min=ctx.eps).sqrt()  # (..., C)
        s_i, s_k = s.unsqueeze(-1), s.unsqueeze(-2)
        k = -1.0 / (s_i * s_k * (s_i + s_k))  # (..., C, C) divided differences of l^-1/2
        clamped = lam <= ctx.eps
        k = k.masked_fill(clamped.unsqueeze(-1) & clamped.unsqueeze(-2), 0.0)
        g = q @ (k * (q.mT @ grad_y @ q)) @ q.mT  # Daleckii-Krein adjoint
        return 0.5 * (g + g.mT), None


def inverse_sqrt_gram(weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(W^T W)^(-1/2)`` for a batch of bases, with finite gradients at repeated eigenvalues.

    Args:
        weight: bases ``W`` of shape ``(*, N, C)``.
        eps: eigenvalues of ``W^T W`` are clamped at ``eps`` from below.

    Shape:
        ``(*, N, C)`` -> ``(*, C, C)``
    """
    gram = weight.mT @ weight  # (*, C, C)
    return _InvSqrtPSD.apply(gram, eps)


def subspace_activation(
    u: torch.Tensor, threshold: torch.Tensor, dim: int = -1, eps: float = 1e-8
) -> torch.Tensor:
    """Eq. (4): ``v = relu(|u| - b^2) u / |u|`` with ``|u| = sqrt(|u|^2 + eps)``.

    Args:
        u: capsules, pose along ``dim``.
        threshold: ``b``, shaped to broadcast against ``u`` (size 1 along ``dim``).
        dim: the pose axis.
        eps: added under the square root.

    Shape:
        ``u`` any; output has the shape of ``u``.
    """
    norm = torch.sqrt((u * u).sum(dim=dim, keepdim=True) + eps)  # |u|
    return u * (torch.relu(norm - threshold * threshold) / norm)


class _SubspaceBase(nn.Module):
    """Shared parameters, validation, effective weight and its eval-mode cache."""

    def __init__(
        self, in_dim: int, num_caps: int, caps_dim: int, activation: bool,
        threshold_init: float, eps: float, what: str,
    ) -> None:
        super().__init__()
        for name, value in (("num_caps", num_caps), ("caps_dim", caps_dim)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if caps_dim > in_dim:
            raise ValueError(
                f"caps_dim={caps_dim} exceeds the input dimension {what}={in_dim}: a "
                f"{caps_dim}-dimensional subspace of a {in_dim}-dimensional space does not exist"
            )
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.in_dim, self.num_caps, self.caps_dim = int(in_dim), int(num_caps), int(caps_dim)
        self.eps = eps
        self.weight = nn.Parameter(torch.randn(num_caps, in_dim, caps_dim) / math.sqrt(in_dim))
        self.threshold = (nn.Parameter(torch.full((num_caps,), float(threshold_init)))
                          if activation else None)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def effective_weight(self) -> torch.Tensor:
        """``M_j = (W_j^T W_j)^(-1/2) W_j^T``, differentiable in ``W``. Shape ``(J, C, N)``."""
        return inverse_sqrt_gram(self.weight, self.eps) @ self.weight.mT  # (J, C, C)(J, C, N)

    def _weight_for_forward(self) -> torch.Tensor:
        if self.training:
            return self.effective_weight()
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._cache is None or self._cache[0] != key:
            # A plain tensor even under inference_mode, so later grad-mode calls can use it.
            with torch.inference_mode(False), torch.no_grad():
                self._cache = (key, self.effective_weight().clone())
        return self._cache[1]

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _activate(self, u: torch.Tensor, pose_dim: int) -> torch.Tensor:
        if self.threshold is None:
            return u
        shape = [1] * u.dim()
        shape[pose_dim - 1] = self.num_caps  # J sits just before the pose axis
        return subspace_activation(u, self.threshold.view(shape), dim=pose_dim)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_caps={self.num_caps}, caps_dim={self.caps_dim}, "
                f"activation={self.threshold is not None}")


class SubspaceCaps(_SubspaceBase):
    """Fully connected subspace capsules, Eqs. (1)-(4).

    Args:
        in_features: input dimension ``N``.
        num_caps: capsule types ``J``.
        caps_dim: subspace dimension ``C`` (at most ``N``).
        activation: apply Eq. (4); ``False`` returns the raw projections ``u`` (as the
            official code does for the final class layer, whose lengths are the scores).
        threshold_init: initial ``b`` (0.3 in the official code).
        eps: eigenvalue clamp of ``W^T W``.

    Shape:
        ``(B, N)`` -> ``(B, J, C)``
    """

    def __init__(
        self, in_features: int, num_caps: int, caps_dim: int, activation: bool = True,
        threshold_init: float = 0.3, eps: float = 1e-6,
    ) -> None:
        super().__init__(in_features, num_caps, caps_dim, activation, threshold_init, eps,
                         "in_features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "SubspaceCaps input", ("B", self.in_dim))
        check_dtype_matches(x, "SubspaceCaps input", self)
        m = self._weight_for_forward()  # (J, C, N)
        u = torch.einsum("bn,jcn->bjc", x, m)  # (B, J, C)
        return self._activate(u, pose_dim=2)

    def fold(self) -> FoldedSubspaceCaps:
        """A plain ``nn.Linear`` (no bias) with weight ``M`` plus the activation."""
        with torch.no_grad():
            m = self.effective_weight()  # (J, C, N)
            lin = nn.Linear(self.in_dim, self.num_caps * self.caps_dim, bias=False,
                            dtype=m.dtype, device=m.device)
            lin.weight.copy_(m.reshape(-1, self.in_dim))  # row j*C + c = M_j[c]
        return FoldedSubspaceCaps(lin, self.num_caps, self.caps_dim, self.threshold)


class SubspaceConvCaps(_SubspaceBase):
    """Convolutional subspace capsules: Eq. (2) applied to every ``k x k`` patch.

    Args:
        in_channels: input channels ``C_in``; the patch dimension is ``N = C_in k k``.
        num_caps: capsule types ``J``.
        caps_dim: subspace dimension ``C`` (at most ``C_in k k``).
        kernel_size, stride, padding: of the patch extraction (as ``nn.Conv2d``).
        activation, threshold_init, eps: as in :class:`SubspaceCaps`.

    Shape:
        ``(B, C_in, H, W)`` -> ``(B, J, C, H', W')``
    """

    def __init__(
        self, in_channels: int, num_caps: int, caps_dim: int, kernel_size: int = 3,
        stride: int = 1, padding: int = 0, activation: bool = True,
        threshold_init: float = 0.3, eps: float = 1e-6,
    ) -> None:
        if int(in_channels) < 1 or int(kernel_size) < 1 or int(stride) < 1 or int(padding) < 0:
            raise ValueError("in_channels, kernel_size and stride must be positive and padding "
                             f"non-negative, got {in_channels}, {kernel_size}, {stride}, {padding}")
        super().__init__(in_channels * kernel_size * kernel_size, num_caps, caps_dim,
                         activation, threshold_init, eps, "in_channels*kernel_size**2")
        self.in_channels, self.kernel_size = int(in_channels), int(kernel_size)
        self.stride, self.padding = int(stride), int(padding)

    def conv_weight(self, m: torch.Tensor) -> torch.Tensor:
        """Fold ``M`` ``(J, C, N)`` into a conv kernel ``(J*C, C_in, k, k)``; the ``N`` axis is
        ordered ``(C_in, k, k)``, the order of ``F.unfold`` patches."""
        k = self.kernel_size
        return m.reshape(self.num_caps * self.caps_dim, self.in_channels, k, k)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return ((h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "SubspaceConvCaps input", ("B", self.in_channels, "H", "W"))
        check_dtype_matches(x, "SubspaceConvCaps input", self)
        weight = self.conv_weight(self._weight_for_forward())  # (J*C, C_in, k, k)
        y = F.conv2d(x, weight, stride=self.stride, padding=self.padding)  # (B, J*C, H', W')
        u = y.view(y.shape[0], self.num_caps, self.caps_dim, *y.shape[2:])  # (B, J, C, H', W')
        return self._activate(u, pose_dim=2)

    def fold(self) -> FoldedSubspaceCaps:
        """A plain ``nn.Conv2d`` (no bias) with the folded kernel plus the activation."""
        with torch.no_grad():
            weight = self.conv_weight(self.effective_weight())
            conv = nn.Conv2d(self.in_channels, self.num_caps * self.caps_dim, self.kernel_size,
                             self.stride, self.padding, bias=False, dtype=weight.dtype,
                             device=weight.device)
            conv.weight.copy_(weight)
        return FoldedSubspaceCaps(conv, self.num_caps, self.caps_dim, self.threshold)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", in_channels={self.in_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}")


class FoldedSubspaceCaps(nn.Module):
    """Inference form of a subspace capsule layer: one plain linear/conv, then Eq. (4).

    Args:
        plain: an ``nn.Linear`` or ``nn.Conv2d`` whose ``J*C`` outputs are the capsules.
        num_caps, caps_dim: ``J`` and ``C``.
        threshold: ``b`` ``(J,)`` to copy, or ``None`` for no activation.

    Shape:
        linear: ``(B, N)`` -> ``(B, J, C)``; conv: ``(B, C_in, H, W)`` -> ``(B, J, C, H', W')``
    """

    def __init__(self, plain: nn.Module, num_caps: int, caps_dim: int,
                 threshold: torch.Tensor | None) -> None:
        super().__init__()
        if not isinstance(plain, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"plain must be nn.Linear or nn.Conv2d, got {type(plain).__name__}")
        self.plain, self.num_caps, self.caps_dim = plain, num_caps, caps_dim
        self.threshold = (None if threshold is None
                          else nn.Parameter(threshold.detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.plain(x)  # (B, J*C) or (B, J*C, H', W')
        u = y.view(y.shape[0], self.num_caps, self.caps_dim, *y.shape[2:])
        if self.threshold is None:
            return u
        shape = [1] * u.dim()
        shape[1] = self.num_caps
        return subspace_activation(u, self.threshold.view(shape), dim=2)
