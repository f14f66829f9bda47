"""Dynamic routing by agreement (Sabour, Frosst, Hinton 2017, arXiv 1710.09829, Procedure 1).

Letter legend: ``b`` batch, ``i`` child capsules, ``j`` parent capsules, ``d`` pose.

Update equations, for ``r`` iterations starting from logits ``b_ij = 0``:

    c_ij = softmax_j(b_ij)                 (Eq. 3; over PARENTS j, for each child i)
    s_j  = sum_i c_ij u_hat_j|i  (+ bias_j) (Eq. 2; the bias is in the official code)
    v_j  = squash(s_j)                     (Eq. 1)
    b_ij = b_ij + u_hat_j|i . v_j          (agreement; skipped after the last iteration)

Shapes:

    =============  ==============  ===========================================
    votes          (B, I, J, D)    u_hat_j|i
    logits         (B, I, J)       b_ij
    couplings      (B, I, J)       c_ij, sums to 1 over J (dim 2)
    poses          (B, J, D)       v_j
    =============  ==============  ===========================================

Options beyond the paper, both from the authors' official code:

* ``bias``: a learned per-parent bias ``(J, D)`` added to ``s_j`` before squashing.
* ``leaky``: "leaky routing" adds one all-zero logit per child to the softmax, a
  "none of the above" parent that absorbs votes agreeing with no real parent;
  couplings then sum to at most one over the real parents.
* ``detach_inner``: use ``u_hat.detach()`` in all but the final iteration, so
  gradients flow only through the last pass (an implementation choice of some
  ports, not in the paper; the official code does not detach, so default False).

Implementation. Each iteration reads the votes twice (the weighted sum ``s_j`` and the
agreement), so a plain loop reads them ``2r - 1`` times (5 for 3 iterations).
Both reads are batched mat-vec products on parent-major votes ``(B, J, I, D)`` (the layout
:class:`~torchcaps.layers.CapsLinear` makes), the agreement written ``v^T U^T`` (a row
vector times the transposed view, about twice as fast on CPU as ``U v``). On a CPU the batch
is routed in chunks of about :data:`CHUNK_BYTES` of votes per thread, so that a chunk stays
in cache across all its iterations and the votes come from memory about once; results are
those of the whole batch at once (each sample is routed alone).

Under autograd the iterations run without a graph and the backward is written by hand
(:func:`_backward`): it reads the votes ``2(r - 1)`` times and writes their gradient once,
chunk by chunk like the forward, and keeps only the votes and the couplings of iterations
2..r. Plain autograd through the loop instead writes one vote-sized gradient per product and
sums them. The result is autograd's gradient (tested against a plain-autograd reference in
float64, with leaky routing, bias, ``detach_inner``, and through poses and couplings); it is
not differentiable twice. Under ``torch.autocast`` plain autograd is used, which follows
autocast's casts op by op. As for every routing, NaN/Inf votes are detected on the output
(see :meth:`~torchcaps.routing.Routing.check_finite_votes`), not in a separate pass.
"""

from __future__ import annotations

import torch

from .._validate import check_iterations
from ..functional import squash
from .base import Routing, RoutingContext, RoutingOutput, register_routing

__all__ = ["DynamicRouting", "dynamic_routing", "CHUNK_BYTES"]

#: bytes of votes per intra-op thread routed at a time on a CPU without autograd (each chunk
#: is read from memory once and then from cache by every iteration; 3 MiB measured best
#: among 0.8 to 12 MiB with one thread, votes (128, 1152, 10, 16))
CHUNK_BYTES = 3 * 2**20


def _couplings(logits: torch.Tensor, leaky: bool) -> torch.Tensor:
    """Softmax over parents of parent-major logits ``(B, J, I)`` (dim 1)."""
    if not leaky:
        return torch.softmax(logits, dim=1)  # (B, J, I), over parents
    leak = logits.new_zeros(logits.shape[:1] + (1,) + logits.shape[2:])
    return torch.softmax(torch.cat([leak, logits], dim=1), dim=1)[:, 1:]


def _uniform(leaky: bool, j: int) -> float:
    """``c_ij`` of the first iteration, where every logit is zero."""
    return 1.0 / (j + 1 if leaky else j)


def _route(
    vt: torch.Tensor,
    bias: torch.Tensor | None,
    iterations: int,
    leaky: bool,
    detach_inner: bool,
    trace: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The iterations on parent-major votes ``vt`` ``(B, J, I, D)``: poses ``(B, J, D)`` and
    couplings ``(B, J, I)``. ``trace``, when given, receives ``(s_j, v_j, c_ij)`` of every
    iteration (``c`` None for the uniform first one), what the hand-written backward needs."""
    b, j, i, _ = vt.shape
    inner = vt.detach() if detach_inner else vt
    logits = None  # b_ij, stored (B, J, I); all zero before the first agreement
    c = None
    for it in range(iterations):
        last = it == iterations - 1
        u = vt if last else inner
        if logits is None:
            # zero logits: every c_ij is 1/J (1/(J+1) when leaky), so s_j = sum_i u_hat_j|i / J
            s = u.sum(dim=2) * _uniform(leaky, j)  # (B, J, D)
        else:
            c = _couplings(logits, leaky)  # (B, J, I), sums to 1 over J
            # s_j = sum_i c_ij u_hat_j|i: (B, J, 1, I) @ (B, J, I, D) -> (B, J, D), a bmm over (b, j)
            s = (c.unsqueeze(-2) @ u).squeeze(-2)
        if bias is not None:
            s = s + bias
        v = squash(s)  # (B, J, D)
        if trace is not None:
            trace.append((s, v, c))
        if not last:
            # agreement u_hat_j|i . v_j: (B, J, 1, D) @ (B, J, D, I) -> (B, J, 1, I)
            agree = v.unsqueeze(-2) @ u.transpose(-1, -2)
            logits = agree.squeeze(-2) if logits is None else logits + agree.squeeze(-2)
    if c is None:  # a single iteration: uniform couplings
        c = vt.new_full((b, j, i), _uniform(leaky, j))
    return v, c


def _chunk_rows(vt: torch.Tensor) -> int:
    """Samples per chunk: about :data:`CHUNK_BYTES` of votes per intra-op thread."""
    per_sample = vt[0].numel() * vt.element_size()
    return max(1, CHUNK_BYTES * torch.get_num_threads() // max(per_sample, 1))


def _chunked(vt: torch.Tensor) -> bool:
    return (vt.device.type == "cpu" and _chunk_rows(vt) < vt.shape[0]
            and not torch.compiler.is_compiling())


def _route_in_chunks(vt, bias, iterations, leaky, trace: list | None = None):
    """:func:`_route` without autograd, a cache-sized chunk of samples at a time on a CPU
    (every sample is routed alone, so the results are those of the whole batch)."""
    if not _chunked(vt):
        return _route(vt, bias, iterations, leaky, False, trace)
    b, j, i, d = vt.shape
    step = _chunk_rows(vt)
    poses = vt.new_empty(b, j, d)
    couplings = vt.new_empty(b, j, i)
    parts = []
    for start in range(0, b, step):
        part = [] if trace is not None else None
        v, c = _route(vt[start:start + step], bias, iterations, leaky, False, part)
        poses[start:start + step] = v
        couplings[start:start + step] = c
        parts.append(part)
    if trace is not None:
        for t in range(iterations):
            s = torch.cat([p[t][0] for p in parts])
            v = poses if t == iterations - 1 else torch.cat([p[t][1] for p in parts])
            c = None if t == 0 else (
                couplings if t == iterations - 1 else torch.cat([p[t][2] for p in parts]))
            trace.append((s, v, c))
    return poses, couplings


def _squash_vjp(s: torch.Tensor, grad_v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``dL/ds`` from ``dL/dv`` for ``v = squash(s) = s f(q)``, ``q = |s|^2``,
    ``f(q) = q / (1 + q) / sqrt(q + eps)`` (:func:`~torchcaps.functional.squash`):
    ``dL/ds = f g + 2 f'(q) (s . g) s`` with ``f'(q) = a b (1 - q a - q b^2 / 2)``,
    ``a = 1 / (1 + q)``, ``b = 1 / sqrt(q + eps)`` (finite at ``s = 0``)."""
    q = (s * s).sum(dim=-1, keepdim=True)
    a = 1.0 / (1.0 + q)
    b = torch.rsqrt(q + eps)
    f = q * a * b
    df = a * b * (1.0 - q * a - 0.5 * q * b * b)
    return f * grad_v + (2.0 * df * (s * grad_v).sum(dim=-1, keepdim=True)) * s


def _backward(vt, bias, iterations, leaky, detach_inner, trace, grad_v, grad_c, out):
    """Gradients of routing by agreement with respect to the votes (written into ``out``,
    shaped as ``vt``) and the bias (returned).

    With ``a_t = sum_{k<=t} u . v_k`` the logits after iteration ``t`` and ``A_t`` the total
    gradient reaching them, going back from the last iteration ``r``:

        g_s_t   = squash'(s_t)^T g_v_t
        g_c_t   = u . g_s_t                               (t >= 2; one read of the votes)
        A_t-1   = A_t + c_t * (g_c_t - sum_j c_t g_c_t)   (softmax over parents)
        g_v_t-1 = sum_i A_t-1 u                           (one read of the votes)
        dL/du   = sum_t c_t (x) g_s_t + sum_t A_t (x) v_t (one write: an (I, K) @ (K, D)
                                                           product per (b, j), K = 2r - 1)

    so the backward reads the votes ``2(r - 1)`` times and writes their gradient once, where
    plain autograd writes one vote-sized gradient per product and then adds them up.
    """
    b, j, i, d = vt.shape
    coef, vec = [], []  # dL/du = sum_k coef[k] (x) vec[k]: (B, J, I) times (B, J, D)
    grad_bias = None
    gv = grad_v if grad_v is not None else vt.new_zeros(b, j, d)
    carry = None  # A_t: the gradient reaching the logits, summed over later iterations
    for t in range(iterations - 1, -1, -1):
        s, _, c = trace[t]
        gs = _squash_vjp(s, gv)
        if bias is not None:
            grad_bias = gs.sum(0) if grad_bias is None else grad_bias + gs.sum(0)
        if t == iterations - 1 or not detach_inner:
            coef.append(c if c is not None else vt.new_full((b, j, i), _uniform(leaky, j)))
            vec.append(gs)
        if t == 0:
            break
        gc = (gs.unsqueeze(-2) @ vt.transpose(-1, -2)).squeeze(-2)  # (B, J, I)
        if t == iterations - 1 and grad_c is not None:
            gc = gc + grad_c
        da = c * (gc - (c * gc).sum(dim=1, keepdim=True))
        carry = da if carry is None else carry + da
        gv = (carry.unsqueeze(-2) @ vt).squeeze(-2)  # (B, J, D)
        if not detach_inner:
            coef.append(carry)
            vec.append(trace[t - 1][1])
    # (B, J, K, I)^T @ (B, J, K, D): the coefficients stacked contiguously along I, which
    # MKL multiplies several times faster than an (I, K)-contiguous stack
    torch.matmul(torch.stack(coef, dim=-2).transpose(-1, -2), torch.stack(vec, dim=-2), out=out)
    return grad_bias


def _backward_in_chunks(vt, bias, iterations, leaky, detach_inner, trace, grad_v, grad_c):
    """:func:`_backward`, a cache-sized chunk of samples at a time on a CPU, as the forward."""
    out = torch.empty_like(vt, memory_format=torch.contiguous_format)
    if not _chunked(vt):
        return out, _backward(vt, bias, iterations, leaky, detach_inner, trace, grad_v,
                              grad_c, out)
    step = _chunk_rows(vt)
    grad_bias = None
    for start in range(0, vt.shape[0], step):
        rows = slice(start, start + step)
        part = [(s[rows], v[rows], None if c is None else c[rows]) for s, v, c in trace]
        g = _backward(vt[rows], bias, iterations, leaky, detach_inner, part,
                      None if grad_v is None else grad_v[rows],
                      None if grad_c is None else grad_c[rows], out[rows])
        grad_bias = g if grad_bias is None else grad_bias + g
    return out, grad_bias


class _DynamicRoutingFunction(torch.autograd.Function):
    """Routing by agreement with the hand-written backward of :func:`_backward`; saves the
    votes and the couplings of iterations 2..r (a sixteenth of the votes each for D = 16)."""

    @staticmethod
    def forward(ctx, vt, bias, iterations, leaky, detach_inner):
        ctx.set_materialize_grads(False)
        trace = []
        v, c = _route_in_chunks(vt, bias, iterations, leaky, trace)
        ctx.iterations, ctx.leaky, ctx.detach_inner = iterations, leaky, detach_inner
        ctx.has_bias = bias is not None
        flat = [x for s, v_, c_ in trace for x in (s, v_, c_) if x is not None]
        ctx.save_for_backward(vt, bias, *flat)
        return v, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v, grad_c):
        vt, bias, *flat = ctx.saved_tensors
        trace, k = [], 0
        for t in range(ctx.iterations):
            n = 2 if t == 0 else 3
            s, v, *c = flat[k:k + n]
            trace.append((s, v, c[0] if c else None))
            k += n
        grad_vt, grad_bias = _backward_in_chunks(
            vt, bias if ctx.has_bias else None, ctx.iterations, ctx.leaky, ctx.detach_inner,
            trace, grad_v, grad_c)
        if not ctx.needs_input_grad[0]:
            grad_vt = None
        return grad_vt, grad_bias, None, None, None


def dynamic_routing(
    votes: torch.Tensor,
    bias: torch.Tensor | None = None,
    iterations: int = 3,
    leaky: bool = False,
    detach_inner: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing by agreement (see the module docstring), the functional core of
    :class:`DynamicRouting`.

    Args:
        votes: ``(B, I, J, D)``; fastest when laid out parent-major in memory,
            ``(B, J, I, D)``, as :class:`~torchcaps.layers.CapsLinear` makes them.
        bias: per-parent bias ``(J, D)`` added before the squash, or None.
        iterations: ``r >= 1``.
        leaky: leaky routing (an extra zero logit per child).
        detach_inner: detach the votes in every iteration but the last.

    Returns:
        ``poses v (B, J, D)`` and ``couplings c (B, I, J)`` (those of the last iteration).
    """
    check_iterations(iterations)
    # Work parent-major: every contraction sums over children i for each (b, j). If the
    # votes' memory is (B, J, I, D), as CapsLinear produces it, this is a free view and each
    # product reads the votes in place; otherwise matmul rearranges them as it needs.
    vt = votes.transpose(1, 2)  # (B, J, I, D)
    graph = torch.is_grad_enabled() and (
        votes.requires_grad or (bias is not None and bias.requires_grad))
    if not graph:
        v, c = _route_in_chunks(vt, bias, iterations, leaky)
    elif torch.is_autocast_enabled(votes.device.type):
        # mixed precision: plain autograd, which follows autocast's casts op by op
        v, c = _route(vt, bias, iterations, leaky, detach_inner)
    else:
        v, c = _DynamicRoutingFunction.apply(vt, bias, iterations, leaky, detach_inner)
    return v, c.transpose(1, 2)  # poses (B, J, D), couplings (B, I, J)


@register_routing("dynamic")
class DynamicRouting(Routing):
    """Routing by agreement.

    Args:
        iterations: routing iterations ``r`` (3 in the paper); at least 1.
        num_parents: ``J``; required when ``bias=True``.
        parent_dim: ``D``; required when ``bias=True``.
        bias: learn a per-parent bias added before the squash.
        leaky: leaky routing (an extra zero logit per child).
        detach_inner: detach votes in every iteration but the last.
        bias_init: initial value of the bias (the official code uses 0.1).
    """

    def __init__(
        self,
        iterations: int = 3,
        num_parents: int | None = None,
        parent_dim: int | None = None,
        bias: bool = False,
        leaky: bool = False,
        detach_inner: bool = False,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__(num_parents, parent_dim)
        check_iterations(iterations)
        self.iterations = iterations
        self.leaky = leaky
        self.detach_inner = detach_inner
        self._init_bias(bias, bias_init)

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, leaky={self.leaky}, "
                f"detach_inner={self.detach_inner}, bias={self.bias is not None}")

    def route(
        self, votes: torch.Tensor, activations: None = None, context: RoutingContext | None = None
    ) -> RoutingOutput:
        v, c = dynamic_routing(votes, self.bias, self.iterations, self.leaky, self.detach_inner)
        return RoutingOutput(poses=v, couplings=c)
