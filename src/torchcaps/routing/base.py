"""The routing interface every algorithm implements, and the routing registry.

A routing algorithm takes votes ``(B, I, J, D)`` (``votes[b, i, j]`` is what child
``i`` predicts for the pose of parent ``j``) and returns a :class:`RoutingOutput`
with parent poses ``(B, J, D)``, couplings ``(B, I, J)`` and, where the algorithm
has them, parent activations ``(B, J)``.

Constructors receive ``num_parents`` and ``parent_dim`` so an algorithm can own
per-parent parameters (biases, EM's beta); they may ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._registry import Registry
from .._validate import check_dtype_matches, check_tensor

__all__ = [
    "RoutingOutput", "Routing", "ActivationRouting", "register_routing", "create_routing",
    "list_routings",
]

_ROUTINGS = Registry("routing algorithm")


@dataclass
class RoutingOutput:
    """What a routing algorithm returns.

    Attributes:
        poses: parent poses ``(B, J, D)``.
        couplings: coupling coefficients ``(B, I, J)``; which axis sums to one is
            algorithm-specific and stated in its docstring.
        activations: parent activations ``(B, J)`` for algorithms that have them, else None.
    """

    poses: torch.Tensor
    couplings: torch.Tensor
    activations: torch.Tensor | None = None


class Routing(nn.Module):
    """Base class: validates votes, then calls :meth:`route`."""

    #: Axis of ``couplings`` (B, I, J) over which couplings sum to one: 2 = parents, 1 = children.
    normalized_axis: int = 2

    def __init__(self, num_parents: int | None = None, parent_dim: int | None = None) -> None:
        super().__init__()
        self.num_parents = num_parents
        self.parent_dim = parent_dim

    def forward(self, votes: torch.Tensor) -> RoutingOutput:
        self.check_votes(votes, ("B", "I", self.num_parents, self.parent_dim))
        return self.route(votes)

    def _init_bias(self, bias: bool, bias_init: float) -> None:
        """A learned per-parent bias ``(J, D)`` added before the squash, or ``None``."""
        if bias:
            if self.num_parents is None or self.parent_dim is None:
                raise ValueError("bias=True needs num_parents and parent_dim")
            self.bias = nn.Parameter(torch.full((self.num_parents, self.parent_dim), float(bias_init)))
        else:
            self.register_parameter("bias", None)

    def check_votes(self, votes: torch.Tensor, shape) -> torch.Tensor:
        """Shape, floating dtype, finiteness, and dtype equal to this module's parameters."""
        check_tensor(votes, "votes", shape)
        return check_dtype_matches(votes, "votes", self)

    def route(self, votes: torch.Tensor) -> RoutingOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def out_of_unit_interval(x: torch.Tensor) -> bool:
    """True if some value lies outside [0, 1] (skipped while tracing/compiling)."""
    if torch.compiler.is_compiling() or not x.numel():
        return False
    return bool(x.min() < 0) or bool(x.max() > 1)


class ActivationRouting(Routing):
    """Base for algorithms whose children also carry activations ``a_i`` (EM, VB).

    Call as ``routing(votes)`` or ``routing(votes, activations)``; activations ``(B, I)``
    must lie in [0, 1] and default to ones (every child fully present).
    """

    def forward(self, votes: torch.Tensor, activations: torch.Tensor | None = None) -> RoutingOutput:
        self.check_votes(votes, ("B", "I", self.num_parents, self.parent_dim))
        return self.route(votes, self.check_activations(activations, votes))

    def check_activations(self, activations: torch.Tensor | None, votes: torch.Tensor) -> torch.Tensor:
        """Validate child activations ``(B, I)`` in [0, 1]; ``None`` gives ones."""
        if activations is None:
            return votes.new_ones(votes.shape[:2])
        check_tensor(activations, "activations", (votes.shape[0], votes.shape[1]))
        if out_of_unit_interval(activations):
            raise ValueError("activations must lie in [0, 1] (they weight the votes)")
        return activations.to(votes.dtype)


def register_routing(name: str | None = None):
    """Class decorator adding a :class:`Routing` subclass to the registry."""
    return _ROUTINGS.register(name)


def create_routing(name: str, **kwargs) -> Routing:
    """Build a registered routing algorithm by name, e.g. ``create_routing("dynamic", iterations=3)``."""
    return _ROUTINGS.get(name)(**kwargs)


def list_routings(pattern: str | None = None) -> list[str]:
    """Names of the registered routing algorithms, optionally filtered by a glob pattern."""
    return _ROUTINGS.names(pattern)
