"""A small capsule network with inverted dot-product attention routing (Tsai et al. 2020).

Tsai, Srivastava, Goh, Salakhutdinov, "Capsules with inverted dot-product attention
routing", ICLR 2020, arXiv 2002.04764; official code apple/ml-capsules-inverted-attention-routing.
The routing itself is :class:`torchcaps.routing.inverted_attention.InvertedAttentionRouting`.

Architecture of ``ida_capsnet`` (a CPU-sized version of the paper's "simple backbone"
model; the paper's CIFAR models use a ResNet backbone and convolutional capsule layers):

    Backbone   3x3 conv 32 s1, 3x3 conv 64 s2, 3x3 conv 64 s2; BN + ReLU each
                                                   (B, 1, 28, 28) -> (B, 64, 7, 7)
    Primary    3x3 conv s2 -> 8 types x 16 (4x4 poses), LayerNorm over the 16 entries
                                                   -> (B, 8*4*4 = 128, 16)
    CapsFC     128 -> 16 capsules x 16, inverted-attention routing  -> (B, 16, 16)
    ClassCaps  16 -> 10 capsules x 16, inverted-attention routing   -> (B, 10, 16)
    Head       one Linear(16 -> 1) shared by all class capsules     -> logits (B, 10)
    Loss       cross-entropy on the logits (as in the paper; no margin loss, no decoder)

Parameter count at ``in_shape=(1, 28, 28)``, 10 classes: **165,073** with 4x4 matrix poses
(``pose="matrix"``, default) and **694,993** with vector poses (``pose="vector"``, where
every vote is a full 16x16 matrix times a 16-vector). Both are asserted in the tests.
Breakdown (matrix): backbone 352 + 18,560 + 36,992 (convs without bias, BatchNorm);
primary conv 73,728 + LayerNorm 32; CapsFC 128*16*4*4 = 32,768 + LayerNorm 32; ClassCaps
16*10*4*4 = 2,560 + LayerNorm 32; head 17. Vector poses replace the two capsule weights by
128*16*16*16 = 524,288 and 16*10*16*16 = 40,960.

Poses. With ``pose="matrix"`` a capsule is a 4x4 matrix ``P_i`` and a vote is the matrix
product ``V_ij = P_i W_ij`` with one 4x4 ``W_ij`` per (child, parent) pair (paper Eq. 1
allows ``W_ij`` of size ``sqrt(d) x sqrt(d)``; the official code multiplies the child's
pose on the left, ``einsum('bnax, nxdm -> bmad')``). The routing sees the 16 entries
flattened, ``D = 16``. With ``pose="vector"`` a vote is ``W_ij u_i`` with ``W_ij`` 16x16.

Routing across layers (paper Sec. 2.2, Fig. 3; ``routing_mode``):

* ``"sequential"``: each capsule layer is fully routed (all iterations) before the next
  layer sees its poses.
* ``"concurrent"`` (default, the paper's proposal and the official code's default):
  iteration 1 is one forward pass with uniform routing through every layer; each later
  iteration updates *every* layer ``l`` from the previous iteration's poses of layer
  ``l - 1`` (votes) and of layer ``l`` itself (agreement), all layers in parallel.

With a single routed layer both modes are identical; with two or more (the default here)
they differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_iterations, check_tensor
from ..layers.primary import channels_to_capsules
from ..routing.base import RoutingContext, RoutingOutput
from ..routing.inverted_attention import InvertedAttentionRouting
from ._base import CapsuleModel, ModelOutput
from ._registry import ModelCfg, register_model

__all__ = ["InvertedCapsFC", "InvertedCapsStack", "InvertedAttentionCapsNet", "ida_capsnet"]

_POSES = ("matrix", "vector")
_MODES = ("sequential", "concurrent")


class InvertedCapsFC(nn.Module):
    """Fully-connected capsule layer with inverted dot-product attention routing.

    Letter legend: ``b`` batch, ``i`` children, ``j`` parents, ``k`` child dim, ``d`` parent
    dim; for matrix poses ``a, x, e`` index the rows/columns of the 4x4 matrices.

    Args:
        in_caps: child capsules ``I``.
        out_caps: parent capsules ``J``.
        dim: parent pose size ``D`` (16 = 4x4).
        in_dim: child pose size ``K`` (defaults to ``dim``; must equal ``dim`` for matrix poses).
        pose: ``"matrix"`` (votes ``P_i W_ij`` of square matrices) or ``"vector"``
            (votes ``W_ij u_i``).
        iterations: routing iterations (2 in the paper).
        scale: scale agreements by ``1/sqrt(D)`` (official code; see the routing module).

    Shape:
        input ``(B, I, K)`` (and optionally current parent poses ``(B, J, D)``) ->
        :class:`RoutingOutput` with poses ``(B, J, D)``, couplings ``(B, I, J)``.
    """

    def __init__(
        self,
        in_caps: int,
        out_caps: int,
        dim: int = 16,
        in_dim: int | None = None,
        pose: str = "matrix",
        iterations: int = 2,
        scale: bool = True,
    ) -> None:
        super().__init__()
        in_dim = dim if in_dim is None else in_dim
        for n, v in dict(in_caps=in_caps, out_caps=out_caps, dim=dim, in_dim=in_dim).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive integer, got {v!r}")
        if pose not in _POSES:
            raise ValueError(f"pose must be one of {_POSES}, got {pose!r}")
        self.in_caps, self.out_caps, self.dim, self.in_dim, self.pose = (
            in_caps, out_caps, dim, in_dim, pose)
        if pose == "matrix":
            side = math.isqrt(dim)
            if side * side != dim or in_dim != dim:
                raise ValueError(
                    f"matrix poses need in_dim == dim == a square (e.g. 16 = 4x4), "
                    f"got in_dim={in_dim}, dim={dim}"
                )
            self.side = side
            # the official code's initialisation: std sqrt(J / (sqrt(D) I))
            std = math.sqrt(out_caps / (side * in_caps))
            self.weight = nn.Parameter(torch.randn(in_caps, out_caps, side, side) * std)
        else:
            self.side = None
            std = math.sqrt(out_caps / (in_dim * in_caps))  # official: sqrt(J / (K I))
            self.weight = nn.Parameter(torch.randn(in_caps, out_caps, dim, in_dim) * std)
        self.routing = InvertedAttentionRouting(
            iterations, num_parents=out_caps, parent_dim=dim, scale=scale
        )

    def extra_repr(self) -> str:
        return (f"in_caps={self.in_caps}, out_caps={self.out_caps}, in_dim={self.in_dim}, "
                f"dim={self.dim}, pose={self.pose!r}")

    def votes(self, u: torch.Tensor) -> torch.Tensor:
        """Votes ``(B, I, J, D)`` from child poses ``(B, I, K)`` (paper Eq. 1)."""
        check_tensor(u, "InvertedCapsFC input", ("B", self.in_caps, self.in_dim))
        b = u.shape[0]
        if self.pose == "matrix":
            p = u.reshape(b, self.in_caps, self.side, self.side)  # (B, I, 4, 4)
            # V_ij = P_i W_ij: (B, I, a, x) x (I, J, x, e) -> (B, I, J, a, e)
            v = torch.einsum("biax,ijxe->bijae", p, self.weight)
            return v.reshape(b, self.in_caps, self.out_caps, self.dim)  # (B, I, J, 16)
        # W_ij u_i: (B, I, K) x (I, J, D, K) -> (B, I, J, D)
        return torch.einsum("bik,ijdk->bijd", u, self.weight)

    def forward(self, u: torch.Tensor, poses: torch.Tensor | None = None) -> RoutingOutput:
        """Route the votes of ``u``, starting from parent ``poses`` ``(B, J, D)`` if given."""
        return self.routing(self.votes(u), context=RoutingContext(poses=poses))


class InvertedCapsStack(nn.Module):
    """Several :class:`InvertedCapsFC` layers routed sequentially or concurrently.

    Args:
        in_caps: child capsules entering the first layer.
        sizes: capsules per layer, e.g. ``(16, 10)``.
        dim: pose size of every layer (16).
        pose: ``"matrix"`` or ``"vector"``.
        iterations: routing iterations (2 in the paper).
        mode: ``"sequential"`` or ``"concurrent"`` (see the module docstring).
        scale: scale agreements by ``1/sqrt(D)``.

    Shape:
        input ``(B, in_caps, dim)`` -> (list of poses ``(B, sizes[l], dim)`` per layer,
        couplings ``(B, I_last, sizes[-1])`` of the last layer's final iteration).
    """

    def __init__(
        self,
        in_caps: int,
        sizes: Sequence[int],
        dim: int = 16,
        pose: str = "matrix",
        iterations: int = 2,
        mode: str = "concurrent",
        scale: bool = True,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"routing_mode must be one of {_MODES}, got {mode!r}")
        if len(sizes) < 1:
            raise ValueError("sizes must name at least one capsule layer")
        check_iterations(iterations)
        self.mode, self.iterations = mode, iterations
        ins = [in_caps, *sizes[:-1]]
        self.layers = nn.ModuleList(
            InvertedCapsFC(i, o, dim, pose=pose, iterations=iterations, scale=scale)
            for i, o in zip(ins, sizes, strict=True)
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, iterations={self.iterations}"

    def forward(self, u: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.mode == "sequential":
            poses, x = [], u
            for layer in self.layers:
                out = layer(x)  # every iteration of this layer before the next layer
                x = out.poses
                poses.append(x)
            return poses, out.couplings
        # concurrent: iteration 1 = one uniform-routing pass through every layer
        votes0 = self.layers[0].votes(u)  # (B, I, J, D); the input poses never change
        state, c = [u], None
        for l, layer in enumerate(self.layers):
            v = votes0 if l == 0 else layer.votes(state[l])
            p, c = layer.routing.step(v, None)
            state.append(p)
        # iterations 2..r: every layer l from the previous iteration's poses of l-1 and l
        for _ in range(self.iterations - 1):
            new = [u]
            for l, layer in enumerate(self.layers):
                v = votes0 if l == 0 else layer.votes(state[l])
                p, c = layer.routing.step(v, state[l + 1])
                new.append(p)
            state = new
        return state[1:], c


class InvertedAttentionCapsNet(CapsuleModel):
    """Conv backbone -> 4x4 primary capsules -> inverted-attention capsule layers -> logits.

    Args:
        in_shape: input image shape ``(C, H, W)``.
        num_classes: class capsules ``K``.
        iterations: routing iterations (2, the paper's default).
        pose: ``"matrix"`` (4x4 poses, default) or ``"vector"`` (16-D vectors).
        routing_mode: ``"concurrent"`` (default) or ``"sequential"``.
        channels: backbone widths; the first conv has stride 1, the others stride 2.
        primary_types: primary capsule types (8), one 3x3 stride-2 conv.
        hidden_caps: capsules of the hidden fully-connected capsule layers (``(16,)``).
        dim: pose size (16 = 4x4).
        scale: scale agreements by ``1/sqrt(dim)`` (official code).

    Shape:
        images ``(B, C, H, W)`` -> :class:`ModelOutput` with logits ``(B, K)``, class poses
        ``(B, K, dim)`` and the class layer's couplings ``(B, hidden_caps[-1], K)``.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        iterations: int = 2,
        pose: str = "matrix",
        routing_mode: str = "concurrent",
        channels: Sequence[int] = (32, 64, 64),
        primary_types: int = 8,
        hidden_caps: Sequence[int] = (16,),
        dim: int = 16,
        scale: bool = True,
    ) -> None:
        super().__init__(in_shape, num_classes)
        if pose not in _POSES:
            raise ValueError(f"pose must be one of {_POSES}, got {pose!r}")
        if routing_mode not in _MODES:
            raise ValueError(f"routing_mode must be one of {_MODES}, got {routing_mode!r}")
        c, h, w = self.in_shape
        blocks: list[nn.Module] = []
        for n, out in enumerate(channels):
            stride = 1 if n == 0 else 2
            blocks += [nn.Conv2d(c, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
            if stride == 2:
                h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        self.backbone = nn.Sequential(*blocks)
        self.primary_types, self.dim = primary_types, dim
        # primary capsules: one conv (no bias, as in the official code), LayerNorm per capsule
        self.primary = nn.Conv2d(c, primary_types * dim, 3, 2, 1, bias=False)
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        self.primary_norm = nn.LayerNorm(dim)
        n_primary = primary_types * h * w
        self.caps = InvertedCapsStack(
            n_primary, [*hidden_caps, num_classes], dim, pose, iterations, routing_mode, scale
        )
        self.head = nn.Linear(dim, 1)  # shared by every class capsule
        self.iterations, self.pose, self.routing_mode = iterations, pose, routing_mode

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        self.check_input(images, labels)
        x = self.backbone(images)  # (B, 64, 7, 7)
        u = channels_to_capsules(self.primary(x), self.primary_types, self.dim)  # (B, 128, 16)
        u = self.primary_norm(u)
        poses, couplings = self.caps(u)  # [(B, 16, 16), (B, K, 16)], (B, 16, K)
        class_poses = poses[-1]  # (B, K, 16)
        logits = self.head(class_poses).squeeze(-1)  # (B, K)
        return ModelOutput(logits, class_poses, None, couplings)

    def loss(self, out, images, labels):
        ce = F.cross_entropy(out.logits, labels)
        return ce, {"cross_entropy": ce.detach()}


@register_model(default_cfg=ModelCfg(
    # Tsai et al. give no MNIST recipe; Adam 1e-3 decayed x0.9 per epoch of 860 steps
    recipe={"batch_size": 64, "lr_decay": 0.9, "lr_decay_steps": 860},
    paper={"mnist": "none (the paper reports CIFAR-10/100)"},
    citation="Tsai, Srivastava, Goh, Salakhutdinov 2020, Capsules with Inverted Dot-Product "
             "Attention Routing (ICLR)"))
def ida_capsnet(**kwargs) -> InvertedAttentionCapsNet:
    """Inverted dot-product attention CapsNet (Tsai et al. 2020), CPU-sized.

    165,073 parameters with matrix poses (694,993 with ``pose="vector"``) at 28x28x1.
    Options: ``iterations`` (2), ``pose`` ("matrix" | "vector"),
    ``routing_mode`` ("concurrent" | "sequential").
    """
    return InvertedAttentionCapsNet(**kwargs)
