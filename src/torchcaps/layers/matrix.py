"""Matrix-capsule layers of Hinton, Sabour, Frosst 2018 ("Matrix capsules with EM routing",
ICLR 2018): primary, convolutional and class capsules, routed by EM.

Letter legend: ``b`` batch, ``t`` child capsule types, ``c`` parent capsule types, ``h w``
child grid, ``l`` parent positions (``Ho * Wo``), ``k`` kernel offsets (``K * K``),
``x y z`` rows/columns of 4x4 matrices, ``n`` children of one window (``K * K * T``).

A layer of matrix capsules is a pair ``(poses, activations)`` on a grid, type-major like
:func:`~torchcaps.layers.primary.channels_to_capsules`:

    ============  ====================  ===========================================
    poses         (B, T, H, W, 16)      flattened 4x4 pose matrices M (row-major)
    activations   (B, T, H, W)          logistic activations a
    ============  ====================  ===========================================

``x.flatten(1, 3)`` turns them into ``(B, T*H*W, 16)`` / ``(B, T*H*W)`` capsules with index
``t*H*W + h*W + w``.

Convolutional EM routing, done right (Gritzman 2019, arXiv 1907.00652, pitfall 3; paper
Sec. 4: "each capsule in layer L + 1 sends feedback only to capsules within its receptive
field ... corner ones receiving only one feedback per capsule type"): a child capsule at
``(t, h, w)`` votes for every parent ``(c, oy, ox)`` whose K x K window covers it. The parents
at different positions *compete* for it, so its couplings are normalised over all of those
(position, type) pairs together:

    R_(t,h,w),(c,oy,ox) = a_c,oy,ox p_.. / sum over every (c', oy', ox') covering (h, w) of a p

and are initialised to ``1 / (number of parents reached)``. Routing each window as an
independent problem (normalising only over ``c`` within the window) is the common bug. We
gather the windows with one index tensor (parent position, kernel offset) -> child position
and sum back over windows with ``index_add`` (a ``fold``), in log space with a per-child
maximum, so the E-step normalisation covers every window a child appears in. The M-step stays
per parent (a parent only sees its own window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._validate import check_tensor
from ..routing.base import (
    Routing,
    RoutingContext,
    RoutingOutput,
    UnsupportedRoutingError,
    create_routing,
    out_of_unit_interval,
    routing_options,
)
from .conv2d import Conv2d

__all__ = ["MatrixCapsules", "PrimaryMatCaps", "ConvMatCaps", "ClassMatCaps", "window_index"]

POSE = 16  # a 4x4 matrix, flattened row-major


@dataclass
class MatrixCapsules:
    """A grid of matrix capsules and, when routed, the couplings that produced it.

    Attributes:
        poses: ``(B, C, Ho, Wo, 16)`` (``C`` types on an ``Ho x Wo`` grid).
        activations: ``(B, C, Ho, Wo)`` in (0, 1).
        couplings: for :class:`ConvMatCaps`, ``(B, Ho*Wo, K*K, T, C)``: the coupling of the
            child at kernel offset ``k`` (of type ``t``) of window ``l`` to parent type ``c``
            at position ``l``; summed over every window and ``c`` reaching a child it is 1.
            ``None`` for primary capsules.
    """

    poses: torch.Tensor
    activations: torch.Tensor
    couplings: torch.Tensor | None = None


#: why matrix-capsule layers need routings with child and parent activations
_MATRIX_WHY = "matrix capsules carry an activation with every pose"


def _matrix_routing(
    layer: str,
    routing: str | Routing,
    iterations: int,
    parents: int,
    kwargs: dict | None,
    needs: list[str],
    why: str,
    logits: bool = False,
) -> Routing:
    """The routing of a matrix-capsule layer: any routing that serves the layer's ``needs``.

    A routing given by name is built with ``num_parents=parents``, ``parent_dim=16``,
    ``iterations`` (where it has that option), ``logits=True`` if asked, and ``kwargs``.

    Raises:
        UnsupportedRoutingError: the routing cannot serve matrix capsules (see
            :meth:`~torchcaps.routing.Routing.require`).
    """
    if isinstance(routing, Routing):
        if kwargs:
            raise ValueError("routing_kwargs is only used when routing is given by name")
        if logits:
            raise ValueError("logits=True is only used when routing is given by name (build "
                             "the routing with logits=True instead)")
        r = routing
    else:
        options = routing_options(routing)
        extra = {"iterations": iterations} if "iterations" in options else {}
        if logits and "logits" in options:
            extra["logits"] = True
        r = create_routing(routing, num_parents=parents, parent_dim=POSE,
                           **{**extra, **(kwargs or {})})
    r.require(layer, needs, why)
    if logits and not isinstance(routing, Routing) and "logits" not in routing_options(routing):
        raise UnsupportedRoutingError(
            f"{layer} cannot use {routing!r} routing with logits=True (unsupported): it has "
            "no activation logits to return"
        )
    return r


def _check_capsules(poses: torch.Tensor, activations: torch.Tensor, types: int, name: str) -> None:
    check_tensor(poses, f"{name} poses", ("B", types, "H", "W", POSE))
    check_tensor(activations, f"{name} activations", tuple(poses.shape[:4]))
    if out_of_unit_interval(activations):
        raise ValueError(f"{name} activations must lie in [0, 1]")


def window_index(h: int, w: int, kernel_size: int, stride: int, device=None) -> torch.Tensor:
    """Flat child positions covered by each window: ``(Ho*Wo, K*K)`` of indices into ``H*W``.

    Row ``l = oy*Wo + ox`` lists the children ``(oy*s + ky) * W + (ox*s + kx)`` for
    ``k = ky*K + kx`` (no padding).
    """
    ho, wo = (h - kernel_size) // stride + 1, (w - kernel_size) // stride + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"a {h}x{w} capsule grid is smaller than the {kernel_size}x{kernel_size} kernel"
        )
    oy = torch.arange(ho, device=device) * stride
    ox = torch.arange(wo, device=device) * stride
    k = torch.arange(kernel_size, device=device)
    rows = (oy[:, None] + k[None, :])  # (Ho, K)
    cols = (ox[:, None] + k[None, :])  # (Wo, K)
    # (Ho, 1, K, 1) * W + (1, Wo, 1, K) -> (Ho, Wo, K, K)
    idx = rows[:, None, :, None] * w + cols[None, :, None, :]
    return idx.reshape(ho * wo, kernel_size * kernel_size)


class PrimaryMatCaps(nn.Module):
    """Primary matrix capsules (Sec. 4): a convolution gives, per capsule type and position,
    a 4x4 pose (16 linear channels) and an activation (one sigmoid channel).

    Channel ``t*16 + e`` of the pose convolution is element ``e`` of the pose of type ``t``
    (16 channels at one position form one matrix, as in :func:`channels_to_capsules`).
    The paper's primary capsules are 1x1 ("the output of all the lower-layer ReLUs centred
    at that location"), the default.

    Args:
        in_channels: channels of the input feature map (``A``).
        num_types: capsule types ``B``.
        kernel_size, stride, padding: of the convolutions (1, 1, 0 in the paper).
        batch_norm: normalise the poses (``BatchNorm3d`` per type over the batch, grid and
            16 elements) and the activation logits (``BatchNorm2d`` per type, before the
            sigmoid), both affine, as the official VB code's ``PrimaryCapsules2d`` (False).

    Shape:
        ``(B, C_in, H, W)`` -> :class:`MatrixCapsules` with poses ``(B, T, H', W', 16)`` and
        activations ``(B, T, H', W')``.
    """

    def __init__(
        self, in_channels: int, num_types: int = 32, kernel_size: int = 1, stride: int = 1,
        padding: int = 0, batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.num_types = in_channels, num_types
        self.pose = Conv2d(in_channels, num_types * POSE, kernel_size, stride, padding)
        self.activation = Conv2d(in_channels, num_types, kernel_size, stride, padding)
        self.bn_pose = nn.BatchNorm3d(num_types) if batch_norm else None
        self.bn_activation = nn.BatchNorm2d(num_types) if batch_norm else None

    def forward(self, x: torch.Tensor) -> MatrixCapsules:
        check_tensor(x, "PrimaryMatCaps input", ("B", self.in_channels, "H", "W"))
        p = self.pose(x)  # (B, T*16, H', W')
        b, _, h, w = p.shape
        # (B, T, 16, H', W') -> (B, T, H', W', 16): the 16 channels of a type at one position
        poses = p.view(b, self.num_types, POSE, h, w).permute(0, 1, 3, 4, 2).contiguous()
        logits = self.activation(x)  # (B, T, H', W')
        if self.bn_pose is not None:
            poses, logits = self.bn_pose(poses), self.bn_activation(logits)
        return MatrixCapsules(poses, torch.sigmoid(logits))  # (B, T, H', W')


class ConvMatCaps(nn.Module):
    """Convolutional matrix capsules with EM routing normalised across overlapping windows.

    Votes ``V = M_i W_(k, t, c)``: one 4x4 transform per (kernel offset, child type, parent
    type), shared across positions. See the module docstring for the normalisation.

    Args:
        in_types: child capsule types ``T``.
        out_types: parent capsule types ``C``.
        kernel_size: ``K`` (3 in the paper).
        stride: ``s`` (2 then 1 in the paper). No padding.
        iterations: routing iterations (3).
        init_std: std of the normal init of ``W``; 0.5 keeps the vote scale equal to the pose
            scale (each vote entry sums 4 products).
        routing_kwargs: other options of the routing: :class:`~torchcaps.routing.em.EMRouting`
            (``inverse_temperature``, ``schedule``, ``eps``, ``beta_a_scale``) or
            :class:`~torchcaps.routing.vb.VariationalBayesRouting` (the priors).
        routing: a registered name or a :class:`~torchcaps.routing.Routing`: ``"em"``
            (default) or ``"vb"`` (variational Bayes, De Sousa Ribeiro et al. 2020; poses are
            the posterior means), or any routing that weights children by activation, returns
            parent activations and, unless ``per_window``, takes a coupling normaliser
            (others raise :class:`~torchcaps.routing.UnsupportedRoutingError`).
        per_window: normalise each child's couplings over the parent types of one window
            only, every window an independent routing problem (what the official VB code and
            many EM ports do; Gritzman 2019's pitfall). Default False: over every parent the
            child reaches across overlapping windows.
        logits: return pre-sigmoid activation logits (``activations`` of the output hold them)
            so that a model can normalise them before its own sigmoid.

    The routing is called once for the whole layer, every window one routing problem of its
    batch: ``routing(votes (B*L, N, C, 16), activations (B*L, N),
    RoutingContext(normalize=...))`` with the normaliser across windows described above.

    Shape:
        poses ``(B, T, H, W, 16)``, activations ``(B, T, H, W)`` -> :class:`MatrixCapsules`
        with poses ``(B, C, Ho, Wo, 16)``, activations ``(B, C, Ho, Wo)``, couplings
        ``(B, Ho*Wo, K*K, T, C)``; ``Ho = (H - K) // s + 1``.
    """

    def __init__(
        self,
        in_types: int,
        out_types: int,
        kernel_size: int = 3,
        stride: int = 1,
        iterations: int = 3,
        init_std: float = 0.5,
        routing_kwargs: dict | None = None,
        routing: str | Routing = "em",
        per_window: bool = False,
        logits: bool = False,
    ) -> None:
        super().__init__()
        for n, v in dict(in_types=in_types, out_types=out_types, kernel_size=kernel_size,
                         stride=stride).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive integer, got {v!r}")
        self.in_types, self.out_types = in_types, out_types
        self.kernel_size, self.stride = kernel_size, stride
        kk = kernel_size * kernel_size
        self.weight = nn.Parameter(torch.randn(kk, in_types, out_types, 4, 4) * init_std)
        needs, why = ["activations", "returns_activations"], _MATRIX_WHY
        if not per_window:
            needs.append("normalize")
            why += " and each child is normalised over the parents of every window it lies in"
        # owns beta_u, beta_a (one pair per parent type) and EM's lambda schedule / VB's priors
        self.routing = _matrix_routing("ConvMatCaps", routing, iterations, out_types,
                                       routing_kwargs, needs, why, logits)
        self.routing_name = routing if isinstance(routing, str) else self.routing.routing_name()
        self.per_window, self.logits = bool(per_window), logits

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        k, s = self.kernel_size, self.stride
        return (h - k) // s + 1, (w - k) // s + 1

    def votes(self, poses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Window votes, parent-major ``(B, L, C, K*K*T, 16)``, from poses ``(B, T, H, W, 16)``.

        ``votes[b, l, c, k*T + t]`` is ``M W_(k, t, c)`` for the child of type ``t`` at kernel
        offset ``k`` of window ``l``. A permuted view of the product (not contiguous): the
        routing copies it once into its own layout.
        """
        b, t, h, w, _ = poses.shape
        l_n, kk = index.shape
        n, c = kk * t, self.out_types
        flat = poses.permute(0, 2, 3, 1, 4).reshape(b, h * w, t, POSE)  # (B, H*W, T, 16)
        win = flat.index_select(1, index.reshape(-1)).view(b, l_n, n, POSE)  # (B, L, N, 16)
        # V = M W_(k,t,c) for every c at once, one matrix product per child slot n = (k, t):
        # W is spread over a block-diagonal (16, C*16) matrix, Wbd[(x', y), (c, x, z)] =
        # [x' = x] W[c, y, z], so the product comes out as (N, B*L, C*16) and its copy into the
        # routing's (B, L, C, N, 16) layout moves 16 contiguous floats at a time (measured: the
        # 4x multiply-adds cost less than the 4-float strided copy of a (.., x, c, z) product)
        eye = torch.eye(4, dtype=poses.dtype, device=poses.device)
        w_bd = torch.einsum("ab,ktcyz->ktaycbz", eye, self.weight.to(poses.dtype))
        w_bd = w_bd.reshape(n, POSE, c * POSE)  # (N, 16, C*16)
        left = win.permute(2, 0, 1, 3).reshape(n, b * l_n, POSE)  # (N, B*L, 16)
        v = torch.bmm(left, w_bd)  # (N, B*L, C*16)
        return v.view(n, b, l_n, c, POSE).permute(1, 2, 3, 0, 4)  # (B, L, C, N, 16) view

    @staticmethod
    def _normalizer(index: torch.Tensor, num_children: int, types: int):
        """Softmax of log couplings over every (window, parent type) that reaches each child."""
        l_n, kk = index.shape
        flat_index = index.reshape(-1)  # (L*KK,) child position of each window slot

        def normalize(log_r: torch.Tensor) -> torch.Tensor:
            # log_r (B*L, N, C), the windows of each image consecutive; N = KK*T
            b = log_r.shape[0] // l_n
            x = log_r.reshape(b, l_n * kk, types, log_r.shape[-1])  # (B, L*KK, T, C)
            s = torch.logsumexp(x, dim=-1)  # over parent types in one window: (B, L*KK, T)
            # a per-child shift for a stable exp: the maximum over its windows (no gradient)
            m = s.new_full((b, num_children, types), float("-inf"))
            m = m.scatter_reduce(1, flat_index.view(1, -1, 1).expand_as(s), s.detach(),
                                 reduce="amax", include_self=True)  # (B, H*W, T)
            m_win = m.index_select(1, flat_index)  # (B, L*KK, T)
            # fold: sum over every window covering the child -> (B, H*W, T)
            total = s.new_zeros(b, num_children, types)
            total = total.index_add(1, flat_index, torch.exp(s - m_win))
            # children that no window reaches keep total 0; clamp so log stays finite there
            total = total.clamp_min(torch.finfo(total.dtype).tiny)
            lse = torch.log(total).index_select(1, flat_index)  # (B, L*KK, T)
            log_norm = lse + m_win  # log sum over all parents of the child: (B, L*KK, T)
            return torch.exp(x - log_norm.unsqueeze(-1)).reshape(log_r.shape)

        return normalize

    def forward(self, poses: torch.Tensor, activations: torch.Tensor) -> MatrixCapsules:
        _check_capsules(poses, activations, self.in_types, "ConvMatCaps")
        b, t, h, w, _ = poses.shape
        ho, wo = self.output_size(h, w)
        index = window_index(h, w, self.kernel_size, self.stride, poses.device)  # (L, KK)
        votes = self.votes(poses, index)  # (B, L, C, N, 16), a permuted view
        a_win = activations.permute(0, 2, 3, 1).reshape(b, h * w, t)  # (B, H*W, T)
        a_win = a_win.index_select(1, index.reshape(-1)).view(b, ho * wo, -1)  # (B, L, N)
        norm = None if self.per_window else self._normalizer(index, h * w, t)
        # every window is one routing problem: votes (B*L, N, C, 16), still a view of the
        # parent-major product (the routing copies it once into its own layout)
        out = self.routing(votes.transpose(2, 3).flatten(0, 1), a_win.flatten(0, 1),
                           RoutingContext(normalize=norm))
        c = self.out_types
        return MatrixCapsules(  # mu (B*L, C, 16), a_j (B*L, C), R (B*L, N, C)
            poses=out.poses.view(b, ho, wo, c, POSE).permute(0, 3, 1, 2, 4),  # (B, C, Ho, Wo, 16)
            activations=out.activations.view(b, ho, wo, c).permute(0, 3, 1, 2),  # (B, C, Ho, Wo)
            couplings=out.couplings.view(b, ho * wo, self.kernel_size ** 2, t, c),
        )

    def extra_repr(self) -> str:
        return (f"in_types={self.in_types}, out_types={self.out_types}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"routing={self.routing_name!r}, per_window={self.per_window}")


class ClassMatCaps(nn.Module):
    """Class capsules with shared transforms and Coordinate Addition (Sec. 4).

    Every child of type ``t`` uses the same ``W_(t, c)`` at every position; the scaled
    (row, column) of the centre of the child's receptive field is added to "the first two
    elements of the right-hand column of its vote matrix" (paper, Sec. 4): the row to entry
    ``(0, 3)`` and the column to entry ``(1, 3)`` of the 4x4 vote, i.e. flattened elements
    3 and 7 (many ports add them to elements 0 and 1 instead).

    The centre of the receptive field of grid cell ``(h, w)`` is ``start + h * jump`` input
    pixels (``start``/``jump`` from ``receptive_field``), divided by the input image size.
    Without ``receptive_field`` the grid itself is used: ``((h + 0.5) / H, (w + 0.5) / W)``.

    Args:
        in_types: child types ``T``.
        num_classes: class capsules ``J``.
        iterations: EM iterations (3).
        coord_addition: add the coordinates (True in the paper).
        receptive_field: ``(start, jump, image_h, image_w)`` or ``None``.
        init_std: std of the normal init of ``W`` (0.5, see :class:`ConvMatCaps`).
        routing_kwargs: other options of the routing (see :class:`ConvMatCaps`).
        routing: ``"em"`` (default), ``"vb"``, or another routing that weights children by
            activation and returns parent activations (see :class:`ConvMatCaps`).
        coord_scale: multiplies the added coordinates (1; the official VB code adds
            ``(index + 1) / (100 F)``, about a hundredth of the grid coordinates).

    Shape:
        poses ``(B, T, H, W, 16)``, activations ``(B, T, H, W)`` ->
        :class:`~torchcaps.routing.RoutingOutput` with poses ``(B, J, 16)``, couplings
        ``(B, T*H*W, J)`` (sum to 1 over classes) and activations ``(B, J)``.
    """

    def __init__(
        self,
        in_types: int,
        num_classes: int,
        iterations: int = 3,
        coord_addition: bool = True,
        receptive_field: tuple[float, float, int, int] | None = None,
        init_std: float = 0.5,
        routing_kwargs: dict | None = None,
        routing: str | Routing = "em",
        coord_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_types, self.num_classes = in_types, num_classes
        self.coord_addition, self.coord_scale = coord_addition, float(coord_scale)
        self.receptive_field = tuple(receptive_field) if receptive_field is not None else None
        self.weight = nn.Parameter(torch.randn(in_types, num_classes, 4, 4) * init_std)
        self.routing = _matrix_routing("ClassMatCaps", routing, iterations, num_classes,
                                       routing_kwargs, ["activations", "returns_activations"],
                                       _MATRIX_WHY)

    def coordinates(
        self, h: int, w: int, device=None, dtype=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled receptive-field centres: rows ``(H,)`` and columns ``(W,)``."""
        rows = torch.arange(h, device=device, dtype=dtype)
        cols = torch.arange(w, device=device, dtype=dtype)
        k = self.coord_scale
        if self.receptive_field is None:
            return k * (rows + 0.5) / h, k * (cols + 0.5) / w
        start, jump, img_h, img_w = self.receptive_field
        return k * (start + rows * jump) / img_h, k * (start + cols * jump) / img_w

    def votes(self, poses: torch.Tensor) -> torch.Tensor:
        """Votes ``(B, T*H*W, J, 16)`` with coordinate addition."""
        b, t, h, w, _ = poses.shape
        m = poses.reshape(b, t, h, w, 4, 4)
        # (B, T, H, W, 4, 4) x (T, J, 4, 4) -> (B, T, H, W, J, 4, 4)
        v = torch.einsum("bthwxy,tjyz->bthwjxz", m, self.weight.to(poses.dtype))
        if self.coord_addition:
            rows, cols = self.coordinates(h, w, poses.device, poses.dtype)
            add = v.new_zeros(h, w, 4, 4)
            add[:, :, 0, 3] = rows[:, None]  # row -> first element of the right-hand column
            add[:, :, 1, 3] = cols[None, :]  # column -> second element
            v = v + add[:, :, None]  # broadcast over (B, T) and J
        return v.reshape(b, t * h * w, self.num_classes, POSE)

    def forward(self, poses: torch.Tensor, activations: torch.Tensor) -> RoutingOutput:
        _check_capsules(poses, activations, self.in_types, "ClassMatCaps")
        # one routing problem per image; a_i: (B, T*H*W)
        return self.routing(self.votes(poses), activations.flatten(1), context=None)

    def extra_repr(self) -> str:
        return (f"in_types={self.in_types}, num_classes={self.num_classes}, "
                f"coord_addition={self.coord_addition}, receptive_field={self.receptive_field}")
