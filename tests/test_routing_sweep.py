"""Every registered routing in every routed layer: it works, or it says why it cannot.

For each (layer, routing) pair the layer is built with the routing's defaults (plus
``cluster_size=2`` for cluster routing, which has no default) and run forward and backward
in float64. A supported pair must give finite outputs and gradients of the documented shapes,
with couplings summing to one over the routing's ``normalized_axis`` (for ConvMatCaps, over
every window and parent type that reaches a child). An unsupported pair must raise
:class:`~torchcaps.routing.UnsupportedRoutingError` when the layer is built, with the reason
in the message.

The resulting pair matrix is the table in ``docs/routing.md``; ``test_doc_table_is_current``
fails when it is stale, and ``python tests/test_routing_sweep.py --write`` rewrites it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import torchcaps
from torchcaps.layers import CapsLinear, CapsStack, ClassMatCaps, ConvCaps2d, ConvMatCaps
from torchcaps.layers.matrix import window_index
from torchcaps.routing import UnsupportedRoutingError

DOC = Path(__file__).parents[1] / "docs" / "routing.md"
START, END = "<!-- pair-matrix:start -->", "<!-- pair-matrix:end -->"

#: options a routing needs in every layer (it has no default for them)
REQUIRED = {"cluster": {"cluster_size": 2}}


def _close_to_one(sums: torch.Tensor) -> None:
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-9, atol=1e-9)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Case:
    """How to build one layer for a routing, run it, and check its output."""

    name: str

    def build(self, routing: str, kwargs: dict) -> torch.nn.Module:
        raise NotImplementedError

    def run(self, layer):
        """Returns (output with poses/couplings, inputs that need a gradient)."""
        raise NotImplementedError

    def check(self, layer, out) -> None:
        raise NotImplementedError


class Linear(Case):
    name = "CapsLinear"

    def build(self, routing, kwargs):
        return CapsLinear(5, 3, 4, 6, routing, kwargs)

    def run(self, layer):
        u = torch.randn(2, 5, 3, generator=_g(), dtype=torch.float64, requires_grad=True)
        return layer(u), [u]

    def check(self, layer, out):
        assert out.poses.shape == (2, 4, 6) and out.couplings.shape == (2, 5, 4)
        _close_to_one(out.couplings.sum(layer.routing.normalized_axis))


class Stack(Case):
    name = "CapsStack"

    def build(self, routing, kwargs):
        return CapsStack(5, 3, 4, 6, depth=3, hidden_caps=4, hidden_dim=3, skip=2,
                         routing=routing, routing_kwargs=kwargs)

    def run(self, layer):
        u = torch.randn(2, 5, 3, generator=_g(), dtype=torch.float64, requires_grad=True)
        return layer(u), [u]

    def check(self, layer, out):
        assert out.poses.shape == (2, 4, 6) and out.couplings.shape == (2, 4, 4)
        _close_to_one(out.couplings.sum(layer.layers[-1].routing.normalized_axis))


class Conv(Case):
    name = "ConvCaps2d"

    def build(self, routing, kwargs):
        return ConvCaps2d(3, 4, 2, 5, kernel_size=3, stride=2, padding=1, routing=routing,
                          routing_kwargs=kwargs)

    def run(self, layer):
        u = torch.randn(2, 3, 5, 5, 4, generator=_g(), dtype=torch.float64, requires_grad=True)
        return layer(u), [u]

    def check(self, layer, out):
        assert out.poses.shape == (2, 2, 3, 3, 5) and out.couplings.shape == (2, 9, 27, 2)
        # (B, L, N, C): each window is a routing problem (B, I, J) -> axis + 1
        _close_to_one(out.couplings.sum(layer.routing.normalized_axis + 1))


def _matrix_inputs(h: int):
    poses = torch.randn(2, 2, h, h, 16, generator=_g(), dtype=torch.float64, requires_grad=True)
    acts = (torch.rand(2, 2, h, h, generator=_g(1), dtype=torch.float64) * 0.8 + 0.1)
    return poses, acts.requires_grad_(True)


class ConvMatrix(Case):
    name = "ConvMatCaps"

    def build(self, routing, kwargs):
        return ConvMatCaps(2, 3, kernel_size=3, stride=1, routing=routing, routing_kwargs=kwargs)

    def run(self, layer):
        poses, acts = _matrix_inputs(5)
        return layer(poses, acts), [poses, acts]

    def check(self, layer, out):
        assert out.poses.shape == (2, 3, 3, 3, 16) and out.activations.shape == (2, 3, 3, 3)
        assert out.couplings.shape == (2, 9, 9, 2, 3)
        # every child's couplings sum to one over all windows and parent types reaching it
        index = window_index(5, 5, 3, 1).reshape(-1)  # (L*KK,) child position of each slot
        per_slot = out.couplings.sum(-1).reshape(2, -1, 2)  # (B, L*KK, T)
        sums = per_slot.new_zeros(2, 25, 2).index_add(1, index, per_slot)
        _close_to_one(sums)


class ClassMatrix(Case):
    name = "ClassMatCaps"

    def build(self, routing, kwargs):
        return ClassMatCaps(2, 3, routing=routing, routing_kwargs=kwargs)

    def run(self, layer):
        poses, acts = _matrix_inputs(3)
        return layer(poses, acts), [poses, acts]

    def check(self, layer, out):
        assert out.poses.shape == (2, 3, 16) and out.activations.shape == (2, 3)
        assert out.couplings.shape == (2, 18, 3)
        _close_to_one(out.couplings.sum(layer.routing.normalized_axis))


CASES = [Linear(), Stack(), Conv(), ConvMatrix(), ClassMatrix()]


def try_pair(case: Case, routing: str) -> str | None:
    """Build and run the pair; None if it works, else the reason it is unsupported."""
    torch.manual_seed(0)
    try:
        layer = case.build(routing, dict(REQUIRED.get(routing, {})))
    except UnsupportedRoutingError as e:
        return str(e)
    layer = layer.double()
    out, inputs = case.run(layer)
    tensors = [t for t in (out.poses, out.couplings, out.activations) if t is not None]
    assert all(torch.isfinite(t).all() for t in tensors), "non-finite output"
    case.check(layer, out)
    loss = sum(t.square().sum() for t in tensors)
    grads = torch.autograd.grad(loss, [*inputs, *layer.parameters()], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads), "non-finite gradient"
    assert grads[0] is not None and grads[0].abs().sum() > 0, "no gradient reaches the input"
    return None


def pair_matrix() -> dict[tuple[str, str], str | None]:
    return {(c.name, r): try_pair(c, r) for r in torchcaps.list_routings() for c in CASES}


def _reason(message: str) -> str:
    """The reason part of an UnsupportedRoutingError message."""
    return message.split("(unsupported): ", 1)[-1]


def capabilities() -> str:
    """The markdown table of what every registered routing declares."""
    lines = ["| routing | couplings sum to 1 over | child activations | parent activations | "
             "context fields read | votes per pair |", "|---|---|---|---|---|---|"]
    for r in torchcaps.list_routings():
        m = torchcaps.create_routing(r, num_parents=3, parent_dim=4, **REQUIRED.get(r, {}))
        axis = {1: "children (dim 1)", 2: "parents (dim 2)"}[m.normalized_axis]
        reads = ", ".join(f"`{f}`" for f in sorted(m.reads)) or "none"
        k = "`cluster_size`" if r == "cluster" else str(m.votes_per_pair)
        yes = {True: "yes", False: "no"}
        lines.append(f"| `{r}` | {axis} | {yes[m.uses_activations]} | "
                     f"{yes[m.returns_activations]} | {reads} | {k} |")
    return "\n".join(lines)


def render(matrix: dict[tuple[str, str], str | None]) -> str:
    """The capability table, the markdown table of the pair matrix, then the reasons."""
    names = [c.name for c in CASES]
    routings = sorted({r for _, r in matrix})
    reasons: list[str] = []
    lines = [capabilities(), "", "Pairs (layer built with the routing's defaults, run forward "
             "and backward in float64):", "",
             "| routing | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for r in routings:
        cells = []
        for n in names:
            msg = matrix[n, r]
            if msg is None:
                cells.append("yes")
            else:
                why = _reason(msg)
                if why not in reasons:
                    reasons.append(why)
                cells.append(f"no ({reasons.index(why) + 1})")
        lines.append(f"| `{r}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"({k}) {why}." for k, why in enumerate(reasons, 1)]
    return "\n".join(lines)


@pytest.mark.parametrize("routing", torchcaps.list_routings())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pair_works_or_says_why_not(case, routing):
    reason = try_pair(case, routing)
    if reason is not None:
        assert "(unsupported)" in reason and case.name in reason and f"'{routing}'" in reason
        assert len(_reason(reason)) > 20  # a reason, not just a refusal


def test_every_routing_fits_the_vector_layers():
    matrix = pair_matrix()
    for case in ("CapsLinear", "CapsStack", "ConvCaps2d"):
        assert all(matrix[case, r] is None for r in torchcaps.list_routings()), case
    assert matrix["ConvMatCaps", "em"] is None and matrix["ClassMatCaps", "vb"] is None


def test_doc_table_is_current():
    text = DOC.read_text()
    assert START in text and END in text, f"{DOC} lacks the pair-matrix markers"
    current = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert current == render(pair_matrix()), (
        "docs/routing.md is out of date: run python tests/test_routing_sweep.py --write")


def write_doc() -> None:
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{START}\n{render(pair_matrix())}\n{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_routing_sweep.py --write")
    torch.set_num_threads(1)
    write_doc()
