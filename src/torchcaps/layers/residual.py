"""Deep stacks of fully-connected capsule layers with residual (skip) connections.

Gugglberger, Peer, Rodriguez-Sanchez 2021, "Training deep capsule networks with residual
connections" (arXiv 2104.07393; code github.com/moejoe95/res-capsnet, TensorFlow).

Letter legend: ``b`` batch, ``i`` child capsules, ``j`` parent capsules, ``d`` pose,
``l`` layer index, ``s`` skip distance.

A :class:`CapsStack` of depth ``L_h`` is ``L = L_h + 1`` :class:`~torchcaps.layers.CapsLinear`
layers ``f_0 .. f_{L-1}``: ``f_0`` maps the input capsules to the hidden shape
``(N, D_h)`` (32 x 8D in the paper), ``f_1 .. f_{L-2}`` map hidden to hidden and ``f_{L-1}``
maps hidden to the output capsules. Each ``f_l`` computes votes and routes them (any
registered routing), so its output ``o_l`` is the routing's parent poses (already squashed
for dynamic and scaled-distance routing). With skip distance ``s``:

    o_l = f_l(x_{l-1})                 (R1; x_{-1} = the stack input, routed output of layer l)
    x_l = o_l + o_{l-s}    if l in S   (R2; shortcut="output", the authors' code)
    x_l = o_l + x_{l-s}    if l in S   (R2'; shortcut="stream", ResNet-style alternative)
    x_l = o_l              otherwise
    S = {l : l >= s, l % s == 0, o_l and o_{l-s} have the same shape}   (R3)

The shortcut is added AFTER the routing (after the squash inside it), and the sum is NOT
squashed again (``resquash=False``); ``resquash=True`` applies ``squash`` to the sum.

Shapes:

    =============  ===============  ============================================
    input u        (B, I, K)        x_{-1}, e.g. primary capsules
    o_l, x_l       (B, N, D_h)      hidden layers l < L - 1
    o_{L-1}        (B, J, D)        output capsules (poses of the result)
    couplings      (B, N, J)        of the last layer (I instead of N when depth=0)
    =============  ===============  ============================================

What was checked, and where. The paper's text could not be retrieved with the search tool
(only its abstract, which states residual connections, four datasets and three routing
algorithms), so R1-R3 and the initialisation come from the authors' TensorFlow code,
``capsule/capsule_network.py``, ``capsule/residual_layer.py`` and ``capsule/capsule_layer.py``
(read in the mirror JustCoolPig/res-capsnet, whose README calls it the official code):

* R2/R3: capsule layers are indexed from 0 (the first layer after the primary capsules);
  at layer ``i`` with ``i > 0 and i % skip_dist == 0`` the output of layer ``i - skip_dist``
  is added **if the shapes are equal** (otherwise silently no shortcut). The added tensor is
  that layer's routed output *as stored before its own shortcut was added*, i.e. ``o_{l-s}``,
  not ``x_{l-s}``: so with ``s = 2`` the stack computes ``x_2 = o_2 + o_0``,
  ``x_4 = o_4 + o_2`` (not ``o_4 + o_2 + o_0``). ``shortcut="stream"`` is the textbook
  ResNet form (an identity path through every block) for comparison; it is not in the paper.
* The residual layer is a plain ``Add`` of the two squashed outputs; a call to ``squash``
  is present but commented out (an earlier version has a "TODO call squash here"), so the
  sum is not re-squashed and its length may exceed 1.
* Routing: every capsule layer (hidden and class) uses the same routing with 2 iterations
  and a learned per-parent bias added before the squash (``use_bias`` default True).
* Initialisation: ``W ~ N(0, 0.2^2)`` for every transformation matrix (``stddev=0.2``,
  hard-coded in the dynamic-routing layer although its signature has a ``stdev`` argument),
  bias constant ``0.1``. These are this stack's defaults (``init_std=0.2``; routing
  ``iterations=2, bias=True, bias_init=0.1`` where the routing takes those options). Note
  that :class:`CapsLinear` alone defaults to 0.01, as in Sabour et al.'s code. The
  authors' follow-up (MoCapsNet, PyTorch) uses 0.01 and ``x + f(x)`` per layer instead.
* Hidden layers of 32 capsules x 8D are the code's defaults and the digest's description;
  the depths and results of the paper's tables stay **unverified** here.

Routing inputs. Every layer is called the same way, whatever its routing:
``layer(x_{l-1}, a_{l-1}, RoutingContext(child_norms=|x_{l-1}|))``. The child norms are
information that only scaled-distance routing uses (it clips votes to the child's length,
as in the authors' ``restrict_prediction``); ``a_{l-1}`` are the previous layer's parent
activations, which only routings with activations (EM, VB) return, and those take them as
child activations (ones for the first layer). The residual acts on poses only.
"""

from __future__ import annotations

import torch
from torch import nn

from .._validate import check_tensor
from ..functional import squash
from ..routing import RoutingContext, RoutingOutput, list_routings, routing_options
from .linear import CapsLinear

__all__ = ["CapsStack", "residual_pairs"]

#: Routing options of the authors' code, applied where a routing's constructor accepts them.
_AUTHORS_ROUTING_DEFAULTS = {"iterations": 2, "bias": True, "bias_init": 0.1}
_SHORTCUTS = ("output", "stream")


def _positive_int(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def residual_pairs(
    shapes: list[tuple[int, int]], skip: int | None
) -> list[tuple[int, int]]:
    """Shortcuts ``(l - s, l)`` of R3 for layer output shapes ``shapes[l]``.

    Raises:
        ValueError: ``skip`` is negative or not an integer, does not fit the number of
            layers, or no two layers at that distance have equal shapes.
    """
    if skip is None:
        return []
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
        raise ValueError(f"skip must be a non-negative integer or None, got {skip!r}")
    if skip == 0:
        return []
    n = len(shapes)
    if skip >= n:
        raise ValueError(
            f"skip={skip} does not fit a stack of {n} capsule layer(s) (depth {n - 1} hidden + "
            f"1 output): a shortcut needs skip < {n}; use skip=0 for no shortcuts"
        )
    pairs = [(l - skip, l) for l in range(skip, n, skip) if shapes[l] == shapes[l - skip]]
    if not pairs:
        raise ValueError(
            f"skip={skip} connects no two layers of equal shape (the residual adds poses, "
            f"so shapes must match); layer output shapes are {shapes}. Use a larger depth, "
            "another skip, or skip=0"
        )
    return pairs


class CapsStack(nn.Module):
    """``depth`` hidden fully-connected capsule layers plus an output layer, with shortcuts.

    Args:
        in_caps: input capsules ``I``.
        in_dim: input capsule dimension ``K``.
        out_caps: output capsules ``J``.
        out_dim: output capsule dimension ``D``.
        depth: hidden capsule layers ``L_h >= 0`` (the stack has ``depth + 1`` layers).
        hidden_caps: capsules per hidden layer ``N`` (32 in the paper).
        hidden_dim: hidden capsule dimension ``D_h`` (8 in the paper).
        skip: skip distance ``s`` (2 in the paper); ``0`` or ``None``: no shortcuts.
        routing: a registered routing name, used by every layer.
        routing_kwargs: routing options; merged over the authors' defaults
            ``iterations=2, bias=True, bias_init=0.1`` (each only where the routing accepts it).
        init_std: standard deviation of the normal initialisation of every ``W`` (0.2, the
            authors' code).
        shortcut: ``"output"`` (R2, authors' code) or ``"stream"`` (R2', ResNet-style).
        resquash: squash the sum after adding the shortcut (not done by the authors).

    Shape:
        input ``(B, I, K)`` -> :class:`~torchcaps.routing.RoutingOutput` of the last layer,
        poses ``(B, J, D)`` (after its shortcut, if it has one), couplings ``(B, N, J)``.
    """

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        depth: int = 3,
        hidden_caps: int = 32,
        hidden_dim: int = 8,
        skip: int | None = 2,
        routing: str = "dynamic",
        routing_kwargs: dict | None = None,
        init_std: float = 0.2,
        shortcut: str = "output",
        resquash: bool = False,
    ) -> None:
        super().__init__()
        for n, v in dict(in_caps=in_caps, in_dim=in_dim, out_caps=out_caps, out_dim=out_dim,
                         hidden_caps=hidden_caps, hidden_dim=hidden_dim).items():
            _positive_int(n, v)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
        if not isinstance(routing, str):
            raise ValueError(f"routing must be a registered routing name, got {routing!r}")
        if routing not in list_routings():
            raise ValueError(f"unknown routing {routing!r}; choose from {list_routings()}")
        if shortcut not in _SHORTCUTS:
            raise ValueError(f"shortcut must be one of {_SHORTCUTS}, got {shortcut!r}")
        if not init_std > 0:
            raise ValueError(f"init_std must be positive, got {init_std!r}")
        self.depth, self.skip, self.shortcut, self.resquash = depth, skip or 0, shortcut, resquash
        self.routing_name = routing

        shapes = [(hidden_caps, hidden_dim)] * depth + [(out_caps, out_dim)]
        self.pairs = residual_pairs(shapes, skip)
        self._source = {dst: src for src, dst in self.pairs}  # layer l -> layer l - s

        accepted = routing_options(routing)
        kwargs = {k: v for k, v in _AUTHORS_ROUTING_DEFAULTS.items() if k in accepted}
        if not kwargs.get("bias", False):
            kwargs.pop("bias_init", None)
        kwargs.update(routing_kwargs or {})
        self.routing_kwargs = kwargs

        sizes = [(in_caps, in_dim)] + shapes
        self.layers = nn.ModuleList(
            CapsLinear(i_n, i_d, o_n, o_d, routing, dict(kwargs), init_std)
            for (i_n, i_d), (o_n, o_d) in zip(sizes[:-1], sizes[1:])
        )
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, skip={self.skip}, routing={self.routing_name!r}, "
                f"shortcut={self.shortcut!r}, resquash={self.resquash}, pairs={self.pairs}")

    @staticmethod
    def _route(
        layer: CapsLinear, x: torch.Tensor, activations: torch.Tensor | None
    ) -> RoutingOutput:
        """R1: votes from ``x`` routed with the previous activations and the child norms."""
        context = RoutingContext(child_norms=torch.linalg.vector_norm(x, dim=-1))  # (B, I)
        return layer(x, activations, context)

    def forward_layers(self, u: torch.Tensor) -> tuple[list[torch.Tensor], RoutingOutput]:
        """All layer outputs ``x_0 .. x_{L-1}`` (after shortcuts) and the last routing output."""
        check_tensor(u, "CapsStack input", ("B", self.in_caps, self.in_dim))
        routed_out: list[torch.Tensor] = []  # o_l
        xs: list[torch.Tensor] = []  # x_l
        x, act = u, None
        for l, layer in enumerate(self.layers):
            routed = self._route(layer, x, act)
            o = routed.poses  # (B, N, D_h), or (B, J, D) for the last layer
            src = self._source.get(l)
            if src is None:
                x = o
            else:
                x = o + (routed_out[src] if self.shortcut == "output" else xs[src])  # R2 / R2'
                if self.resquash:
                    x = squash(x)
            routed_out.append(o)
            xs.append(x)
            act = routed.activations
        return xs, RoutingOutput(poses=x, couplings=routed.couplings,
                                 activations=routed.activations)

    def forward(self, u: torch.Tensor) -> RoutingOutput:
        return self.forward_layers(u)[1]
