"""The routing interface every algorithm implements, and the routing registry.

One call for every routing algorithm and every layer::

    out = routing(votes, activations=None, context=None)

============  ==============  ===========================================================
votes         (B, I, J, D)    ``votes[b, i, j]`` is what child ``i`` predicts for the pose
                              of parent ``j`` (cluster routing: ``K`` votes per pair, see
                              :attr:`Routing.votes_per_pair`)
activations   (B, I)          child activations in [0, 1], or None (every child present)
context       RoutingContext  what else the calling layer knows (child norms, initial
                              parent poses, a coupling normaliser), or None
out           RoutingOutput   parent poses ``(B, J, D)``, couplings ``(B, I, J)`` and, where
                              the algorithm has them, parent activations ``(B, J)``
============  ==============  ===========================================================

The fields of a :class:`RoutingContext` may also be given as keywords:
``routing(votes, child_norms=n)`` is ``routing(votes, context=RoutingContext(child_norms=n))``.

An algorithm is a functional core (e.g. :func:`~torchcaps.routing.em.em_routing`) plus a
thin :class:`Routing` module holding its options and learned parameters (EM's and VB's
per-parent ``beta_u``, ``beta_a``; dynamic routing's bias), like kornia's
``gaussian_blur2d`` / ``GaussianBlur2d``. Layers own their routing module
(``layer.routing``), so a layer's learned routing parameters are saved with the layer.

What a caller passes is of two kinds:

* **information** an algorithm may use or ignore: ``context.child_norms`` (scaled-distance
  routing clips votes to them; every other algorithm ignores them). A layer passes what it
  knows without asking which algorithm it holds.
* **requests** that change what is computed and must not be dropped silently: child
  ``activations`` (an inactive child must not vote), ``context.poses`` (start from these
  parent poses) and ``context.normalize`` (normalise couplings over another set than the
  parents of one routing problem). An algorithm that cannot honour a request raises
  :class:`UnsupportedRoutingError` naming it.

What an algorithm can do is declared by class attributes (:attr:`Routing.normalized_axis`,
:attr:`~Routing.uses_activations`, :attr:`~Routing.returns_activations`,
:attr:`~Routing.reads`, :attr:`~Routing.votes_per_pair`). A layer that needs more than
votes in and poses out (matrix capsules need parent activations) states its needs once, with
:meth:`Routing.require`, which raises :class:`UnsupportedRoutingError` with the reason.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from .._registry import Registry
from .._validate import check_dtype_matches, check_finite, check_tensor

__all__ = [
    "RoutingOutput", "RoutingContext", "Routing", "ActivationRouting", "UnsupportedRoutingError",
    "register_routing", "create_routing", "list_routings", "routing_options",
]

_ROUTINGS = Registry("routing algorithm")

#: maps unnormalised log couplings ``(..., I, J)`` to couplings ``(..., I, J)``
Normalizer = Callable[[torch.Tensor], torch.Tensor]


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


@dataclass(frozen=True)
class RoutingContext:
    """Everything a layer can tell a routing algorithm beyond votes and child activations.

    Attributes:
        child_norms: ``|u_i|`` ``(B, I)`` of the child poses that made the votes
            (information: scaled-distance routing clips each vote to its child's norm).
        poses: parent poses ``(B, J, D)`` to start routing from instead of the algorithm's
            own start (a request; inverted-attention routing, used by concurrent routing).
        normalize: maps unnormalised log couplings ``(B, I, J)`` to couplings, replacing
            the softmax over the ``J`` parents of each routing problem; the initial
            couplings are ``normalize(zeros)``. A convolutional layer that flattens its
            windows into the batch passes one that normalises each child over every parent
            it reaches across overlapping windows (a request;
            :class:`~torchcaps.layers.ConvMatCaps`).
    """

    child_norms: torch.Tensor | None = None
    poses: torch.Tensor | None = None
    normalize: Normalizer | None = None

    @classmethod
    def build(cls, context: RoutingContext | None, overrides: dict) -> RoutingContext:
        """``context`` (or an empty one) with the keyword fields ``overrides`` set."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown routing context field(s) {unknown}; the fields are "
                            f"{sorted(names)}")
        context = cls() if context is None else context
        if not isinstance(context, cls):
            raise TypeError(f"context must be a RoutingContext or None, got "
                            f"{type(context).__name__}")
        given = {k: v for k, v in overrides.items() if v is not None}
        clash = [k for k in given if getattr(context, k) is not None]
        if clash:
            raise TypeError(f"routing context field(s) {clash} given twice (in context and as "
                            "keywords)")
        return replace(context, **given) if given else context


class UnsupportedRoutingError(ValueError):
    """A routing algorithm cannot do what a layer (or caller) asks; the message says why."""


#: fields of a RoutingContext whose presence changes the result (must be honoured or refused)
_REQUESTS = ("poses", "normalize")

#: why a routing cannot serve a need, by need
_REASONS = {
    "activations": "does not weight children by their activations",
    "returns_activations": "returns no parent activations",
    "poses": "cannot start from given parent poses",
    "normalize": "cannot take a coupling normaliser (it normalises couplings over the parents "
                 "of one routing problem only)",
}


def _join(reasons: list[str]) -> str:
    return reasons[0] if len(reasons) == 1 else ", ".join(reasons[:-1]) + " and " + reasons[-1]


class Routing(nn.Module):
    """Base class: validates the call, then runs :meth:`route`.

    Subclasses implement ``route(votes, activations, context)`` and declare what they can do
    with the class attributes below; ``forward`` is the same for all of them.
    """

    #: Axis of ``couplings`` (B, I, J) over which couplings sum to one: 2 = parents, 1 = children.
    normalized_axis: int = 2
    #: Whether child activations ``(B, I)`` weight the children (EM, VB). Other algorithms
    #: refuse activations instead of silently ignoring them.
    uses_activations: bool = False
    #: Whether :class:`RoutingOutput` carries parent activations ``(B, J)``.
    returns_activations: bool = False
    #: The :class:`RoutingContext` fields this algorithm reads.
    reads: frozenset[str] = frozenset()

    def __init__(self, num_parents: int | None = None, parent_dim: int | None = None) -> None:
        super().__init__()
        self.num_parents = num_parents
        self.parent_dim = parent_dim

    @property
    def votes_per_pair(self) -> int | None:
        """Votes per (child, parent) pair a layer must make: the last vote axis is
        ``votes_per_pair * D`` (1 for every algorithm but cluster routing; None when not fixed)."""
        return 1

    def forward(
        self,
        votes: torch.Tensor,
        activations: torch.Tensor | None = None,
        context: RoutingContext | None = None,
        **context_fields,
    ) -> RoutingOutput:
        """Route ``votes``; see the module docstring for the arguments."""
        context = RoutingContext.build(context, context_fields)
        votes = self.check_votes(votes)
        activations = self.check_activations(activations, votes)
        context = self.check_context(context, votes)
        out = self.route(votes, activations, context)
        self.check_finite_votes(votes, out)
        return out

    # ------------------------------------------------------------------ capabilities

    def unsupported(self, needs) -> list[str]:
        """What this algorithm lacks to serve ``needs`` (a subset of ``"activations"``,
        ``"returns_activations"``, ``"poses"``, ``"normalize"``); empty if nothing."""
        have = {"activations": self.uses_activations,
                "returns_activations": self.returns_activations,
                "poses": "poses" in self.reads, "normalize": "normalize" in self.reads}
        unknown = set(needs) - set(have)
        if unknown:
            raise ValueError(f"unknown routing need(s) {sorted(unknown)}; choose from "
                             f"{sorted(have)}")
        return [_REASONS[n] for n in needs if not have[n]]

    def require(self, layer: str, needs, why: str) -> None:
        """Raise :class:`UnsupportedRoutingError` unless this algorithm serves ``needs``.

        Args:
            layer: the caller's name, for the message.
            needs: see :meth:`unsupported`.
            why: why the layer needs them (the first half of the reason).
        """
        reasons = self.unsupported(needs)
        if reasons:
            raise UnsupportedRoutingError(
                f"{layer} cannot use {self.routing_name()!r} routing (unsupported): {why}, but "
                f"the algorithm {_join(reasons)}"
            )

    def _refuse(self, needs, what: str) -> None:
        raise UnsupportedRoutingError(
            f"{self.routing_name()!r} routing cannot honour this call (unsupported): {what}, "
            f"but the algorithm {_join(self.unsupported(needs))}"
        )

    @classmethod
    def routing_name(cls) -> str:
        """The registered name of this algorithm (the class name if unregistered)."""
        for name in _ROUTINGS.names():
            if _ROUTINGS.get(name) is cls:
                return name
        return cls.__name__

    # ------------------------------------------------------------------ validation

    def _init_bias(self, bias: bool, bias_init: float) -> None:
        """A learned per-parent bias ``(J, D)`` added before the squash, or ``None``."""
        if bias:
            if self.num_parents is None or self.parent_dim is None:
                raise ValueError("bias=True needs num_parents and parent_dim")
            self.bias = nn.Parameter(torch.full((self.num_parents, self.parent_dim), float(bias_init)))
        else:
            self.register_parameter("bias", None)

    def vote_shape(self) -> tuple:
        """The expected vote shape, for :meth:`check_votes` (strings match any size)."""
        return ("B", "I", self.num_parents, self.parent_dim)

    def check_votes(self, votes: torch.Tensor, shape=None) -> torch.Tensor:
        """Shape, floating dtype, and dtype equal to this module's parameters.

        NaN/Inf votes are found after routing, by :meth:`check_finite_votes`, so that the
        votes are not read an extra time; only a dtype mismatch scans them first (a NaN is
        reported before a dtype mismatch).
        """
        check_tensor(votes, "votes", self.vote_shape() if shape is None else shape, finite=False)
        param = next(self.parameters(), None)
        if param is not None and param.dtype != votes.dtype:
            check_finite(votes, "votes")
        return check_dtype_matches(votes, "votes", self)

    @staticmethod
    def check_finite_votes(votes: torch.Tensor, out: RoutingOutput) -> None:
        """Raise :class:`~torchcaps._validate.NonFiniteValueError` if ``votes`` hold NaN/Inf.

        Checked on the output: in every algorithm each vote enters its parent's pose by a
        sum, so a NaN or Inf vote makes the poses non-finite; only then are the votes
        scanned (finite votes can give non-finite poses too, by overflow, and pass). Skipped
        while compiling.
        """
        if torch.compiler.is_compiling():
            return
        if not (bool(torch.isfinite(out.poses).all()) and bool(torch.isfinite(out.couplings).all())):
            check_finite(votes, "votes")

    def check_activations(
        self, activations: torch.Tensor | None, votes: torch.Tensor
    ) -> torch.Tensor | None:
        """Validate child activations ``(B, I)`` in [0, 1] (in the votes' dtype).

        ``None`` stays ``None`` here; :class:`ActivationRouting` turns it into ones.
        """
        if activations is None:
            return None
        if not self.uses_activations:
            self._refuse(["activations"], "child activations were given (pass None)")
        check_tensor(activations, "activations", (votes.shape[0], votes.shape[1]))
        if out_of_unit_interval(activations):
            raise ValueError("activations must lie in [0, 1] (they weight the votes)")
        return activations.to(votes.dtype)

    def check_context(self, context: RoutingContext, votes: torch.Tensor) -> RoutingContext:
        """Refuse requests this algorithm cannot honour; validate the fields it reads."""
        refused = [f for f in _REQUESTS if getattr(context, f) is not None and f not in self.reads]
        if refused:
            self._refuse(refused, f"the routing context sets {', '.join(refused)}")
        b, i, j = votes.shape[:3]
        if "child_norms" in self.reads and context.child_norms is not None:
            check_tensor(context.child_norms, "child_norms", (b, i))
            if not torch.compiler.is_compiling() and bool((context.child_norms < 0).any()):
                raise ValueError("child_norms must be non-negative (they are vector norms)")
        if "poses" in self.reads and context.poses is not None:
            check_tensor(context.poses, "poses", (b, j, votes.shape[-1]))
        if context.normalize is not None and not callable(context.normalize):
            raise TypeError("context.normalize must be callable")
        return context

    def route(
        self, votes: torch.Tensor, activations: torch.Tensor | None, context: RoutingContext
    ) -> RoutingOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def out_of_unit_interval(x: torch.Tensor) -> bool:
    """True if some value lies outside [0, 1] (skipped while tracing/compiling)."""
    if torch.compiler.is_compiling() or not x.numel():
        return False
    return bool(x.min() < 0) or bool(x.max() > 1)


class ActivationRouting(Routing):
    """Base for algorithms whose children carry activations ``a_i`` and whose parents get
    activations ``a_j`` (EM, VB): child activations default to ones (every child present)."""

    uses_activations = True
    returns_activations = True

    def check_activations(
        self, activations: torch.Tensor | None, votes: torch.Tensor
    ) -> torch.Tensor:
        """Validate child activations ``(B, I)`` in [0, 1]; ``None`` gives ones."""
        if activations is None:
            return votes.new_ones(votes.shape[:2])
        return super().check_activations(activations, votes)


def register_routing(name: str | None = None):
    """Class decorator adding a :class:`Routing` subclass to the registry."""
    return _ROUTINGS.register(name)


def create_routing(name: str, **kwargs) -> Routing:
    """Build a registered routing algorithm by name, e.g. ``create_routing("dynamic", iterations=3)``."""
    return _ROUTINGS.get(name)(**kwargs)


def list_routings(pattern: str | None = None) -> list[str]:
    """Names of the registered routing algorithms, optionally filtered by a glob pattern."""
    return _ROUTINGS.names(pattern)


def routing_options(name: str) -> frozenset[str]:
    """The keyword options :func:`create_routing` accepts for ``name`` (its constructor's
    parameters), so a layer can apply a default only where an algorithm has that option."""
    params = inspect.signature(_ROUTINGS.get(name)).parameters.values()
    return frozenset(p.name for p in params
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

