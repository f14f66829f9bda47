"""Slow, loop-based float64 references for the vectorised ops (written for clarity, not speed)."""

from __future__ import annotations

import math

import torch


def squash_loop(s: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 1 of Sabour et al., one capsule at a time."""
    flat = s.reshape(-1, s.shape[-1])
    out = torch.empty_like(flat)
    for n in range(flat.shape[0]):
        sq = sum(float(x) ** 2 for x in flat[n])
        scale = sq / (1.0 + sq) / math.sqrt(sq + eps)
        for d in range(flat.shape[1]):
            out[n, d] = flat[n, d] * scale
    return out.reshape(s.shape)


def votes_loop(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u_hat[b, i, j] = W[i, j] @ u[b, i] for u (B, I, K), W (I, J, D, K)."""
    b, i_n, _ = u.shape
    _, j_n, d, _ = w.shape
    out = torch.zeros(b, i_n, j_n, d, dtype=u.dtype)
    for b_ in range(b):
        for i in range(i_n):
            for j in range(j_n):
                out[b_, i, j] = w[i, j] @ u[b_, i]
    return out


def dynamic_routing_loop(votes, iterations=3, bias=None, leaky=False):
    """Procedure 1 of Sabour et al. written with explicit loops over b, i, j."""
    b_n, i_n, j_n, d_n = votes.shape
    logits = torch.zeros(b_n, i_n, j_n, dtype=votes.dtype)
    for it in range(iterations):
        c = torch.zeros_like(logits)
        for b in range(b_n):
            for i in range(i_n):
                row = [float(logits[b, i, j]) for j in range(j_n)]
                if leaky:
                    row = [0.0] + row
                m = max(row)
                ex = [math.exp(x - m) for x in row]
                z = sum(ex)
                probs = [e / z for e in ex]
                if leaky:
                    probs = probs[1:]
                for j in range(j_n):
                    c[b, i, j] = probs[j]  # softmax over parents j
        v = torch.zeros(b_n, j_n, d_n, dtype=votes.dtype)
        for b in range(b_n):
            for j in range(j_n):
                s = torch.zeros(d_n, dtype=votes.dtype)
                for i in range(i_n):
                    s += c[b, i, j] * votes[b, i, j]
                if bias is not None:
                    s = s + bias[j]
                v[b, j] = squash_loop(s)
        if it < iterations - 1:
            for b in range(b_n):
                for i in range(i_n):
                    for j in range(j_n):
                        logits[b, i, j] += float(votes[b, i, j] @ v[b, j])
    return v, c


def dynamic_routing_autograd(votes, iterations=3, bias=None, leaky=False, detach_inner=False):
    """Procedure 1 in plain differentiable tensor ops (einsum, softmax over parents), the
    gradient reference for the hand-written backward of the library's dynamic routing; its
    values are checked against :func:`dynamic_routing_loop`."""
    b_n, i_n, j_n, _ = votes.shape
    logits = votes.new_zeros(b_n, i_n, j_n)
    for it in range(iterations):
        u = votes if it == iterations - 1 or not detach_inner else votes.detach()
        full = torch.cat([logits.new_zeros(b_n, i_n, 1), logits], dim=2) if leaky else logits
        c = torch.softmax(full, dim=2)[..., 1:] if leaky else torch.softmax(full, dim=2)
        s = torch.einsum("bij,bijd->bjd", c, u)
        if bias is not None:
            s = s + bias
        sq = (s * s).sum(-1, keepdim=True)
        v = s * (sq / (1.0 + sq) / torch.sqrt(sq + 1e-8))
        if it < iterations - 1:
            logits = logits + torch.einsum("bijd,bjd->bij", u, v)
    return v, c


def margin_loss_loop(lengths, labels, m_pos=0.9, m_neg=0.1, lam=0.5):
    total = 0.0
    for b in range(lengths.shape[0]):
        for k in range(lengths.shape[1]):
            v = float(lengths[b, k])
            if k == int(labels[b]):
                total += max(0.0, m_pos - v) ** 2
            else:
                total += lam * max(0.0, v - m_neg) ** 2
    return total / lengths.shape[0]


def matrix_window_votes_loop(poses: torch.Tensor, weight: torch.Tensor, k: int, s: int):
    """Convolutional matrix-capsule votes, one window slot at a time (no padding).

    poses (B, T, H, W, 16), weight (K*K, T, C, 4, 4). Returns ``(windows, slots, child,
    votes, reach)``: windows ``[(oy, ox)]``, slots ``[(ky, kx, t)]``, ``child(oy, ox, ky,
    kx, t) -> (t, y, x)``, ``votes[b, oy, ox, ky, kx, t, c]`` the 16 entries of ``M W`` and
    ``reach[(t, y, x)]`` every ``(oy, ox, ky, kx)`` whose window covers that child.
    """
    b_n, t_n, h_n, w_n, _ = poses.shape
    c_n = weight.shape[2]
    ho, wo = (h_n - k) // s + 1, (w_n - k) // s + 1
    windows = [(oy, ox) for oy in range(ho) for ox in range(wo)]
    slots = [(ky, kx, t) for ky in range(k) for kx in range(k) for t in range(t_n)]

    def child(oy, ox, ky, kx, t):
        return t, oy * s + ky, ox * s + kx

    votes = {}
    for b in range(b_n):
        for (oy, ox) in windows:
            for (ky, kx, t) in slots:
                _, y, x = child(oy, ox, ky, kx, t)
                m = poses[b, t, y, x].reshape(4, 4)
                for c in range(c_n):
                    votes[b, oy, ox, ky, kx, t, c] = (m @ weight[ky * k + kx, t, c]).reshape(16)
    reach = {}
    for (oy, ox) in windows:
        for (ky, kx, t) in slots:
            reach.setdefault(child(oy, ox, ky, kx, t), []).append((oy, ox, ky, kx))
    return windows, slots, child, votes, reach
