"""Primary-capsule restraints (torchcaps.layers.primary): loop references, properties, errors."""

from __future__ import annotations

import math

import pytest
import torch

from torchcaps import functional as F
from torchcaps.layers import (
    RESTRAINTS,
    GateRestraint,
    PowerRestraint,
    PrimaryCaps,
    TopKRestraint,
    channels_to_capsules,
    create_restraint,
)
from torchcaps.models import create_model

EPS = 1e-8


# ------------------------------------------------------------------ loop references


def _len(vec: torch.Tensor) -> float:
    return math.sqrt(sum(float(v) ** 2 for v in vec) + EPS)


def power_loop(u: torch.Tensor, p: float) -> torch.Tensor:
    """u' = u |u|^(p-1), one capsule at a time; u (B, T, N, D)."""
    out = torch.empty_like(u)
    b_n, t_n, n_n, _ = u.shape
    for b in range(b_n):
        for t in range(t_n):
            for n in range(n_n):
                out[b, t, n] = u[b, t, n] * _len(u[b, t, n]) ** (p - 1)
    return out


def topk_loop(u: torch.Tensor, k: int, group: str) -> torch.Tensor:
    """Keep the k longest capsules of each group by sorting Python lists."""
    out = torch.zeros_like(u)
    b_n, t_n, n_n, _ = u.shape
    for b in range(b_n):
        if group == "position":
            groups = [[(t, n) for t in range(t_n)] for n in range(n_n)]
        else:
            groups = [[(t, n) for t in range(t_n) for n in range(n_n)]]
        for members in groups:
            ranked = sorted(members, key=lambda tn: -_len(u[b, tn[0], tn[1]]))
            for t, n in ranked[:k]:
                out[b, t, n] = u[b, t, n]
    return out


def gate_loop(u: torch.Tensor, theta: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """u' = sigmoid((|u| - theta_t) / tau_t) u, one capsule at a time."""
    out = torch.empty_like(u)
    b_n, t_n, n_n, _ = u.shape
    for b in range(b_n):
        for t in range(t_n):
            for n in range(n_n):
                z = (_len(u[b, t, n]) - float(theta[t])) / float(tau[t])
                out[b, t, n] = u[b, t, n] / (1.0 + math.exp(-z))
    return out


def _caps(b=2, t=5, n=6, d=4, scale=0.5) -> torch.Tensor:
    return torch.randn(b, t, n, d, dtype=torch.float64) * scale


# ------------------------------------------------------------------ correctness


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.5])
def test_power_matches_loop(p):
    u = _caps()
    r = PowerRestraint(5, 4, p=p)
    torch.testing.assert_close(r(u), power_loop(u, p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group,k", [("position", 1), ("position", 3), ("position", 5),
                                     ("image", 1), ("image", 7), ("image", 30)])
def test_topk_matches_loop(group, k):
    u = _caps()
    r = TopKRestraint(5, 4, k=k, group=group)
    torch.testing.assert_close(r(u), topk_loop(u, k, group), rtol=0, atol=0)


def test_gate_matches_loop():
    u = _caps()
    r = GateRestraint(5, 4, threshold=0.3, temperature=0.2).double()
    with torch.no_grad():  # distinct values per type, so a wrong axis would show
        r.threshold.copy_(torch.linspace(0.1, 0.9, 5, dtype=torch.float64))
        r.log_temperature.copy_(torch.linspace(-3.0, 0.0, 5, dtype=torch.float64))
    expected = gate_loop(u, r.threshold.detach(), r.log_temperature.detach().exp())
    torch.testing.assert_close(r(u), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,kwargs", [("power", {"p": 2.0}), ("topk", {"k": 2}),
                                         ("topk", {"k": 9, "group": "image"}),
                                         ("gate", {"threshold": 0.4})])
def test_primary_caps_applies_restraint_per_type_and_position(name, kwargs):
    """PrimaryCaps feeds the restraint (B, T, H'W', D) in type-major order: compare with the
    loop references applied to the unrestrained capsules regrouped by hand."""
    torch.manual_seed(1)
    plain = PrimaryCaps(3, num_types=4, dim=5, kernel_size=3, stride=2).double()
    plain.requires_grad_(False)
    layer = PrimaryCaps(3, num_types=4, dim=5, kernel_size=3, stride=2, restraint=name,
                        restraint_kwargs=kwargs).double()
    layer.conv.load_state_dict(plain.conv.state_dict())
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    u = plain(x)  # (B, T*H'*W', D) with H', W' = 4, 5
    grouped = u.view(2, 4, 20, 5)  # type-major: index t*20 + n
    if name == "power":
        ref = power_loop(grouped, kwargs["p"])
    elif name == "topk":
        ref = topk_loop(grouped, kwargs["k"], kwargs.get("group", "position"))
    else:
        ref = gate_loop(grouped, layer.restraint.threshold.detach(),
                        layer.restraint.log_temperature.detach().exp())
    torch.testing.assert_close(layer(x), ref.reshape(2, 80, 5), rtol=1e-12, atol=1e-12)


def test_default_is_bit_identical_to_conv_regroup_squash():
    torch.manual_seed(2)
    layer = PrimaryCaps(6, num_types=4, dim=8, kernel_size=3, stride=2)
    x = torch.randn(3, 6, 11, 11)
    expected = F.squash(channels_to_capsules(layer.conv(x), 4, 8))
    assert torch.equal(layer(x), expected)
    assert layer.restraint is None
    assert set(layer.state_dict()) == {"conv.weight", "conv.bias"}


def test_capsnet_default_unchanged_and_same_init_with_restraint():
    """No restraint: the state dict has exactly the old keys, and the forward equals the
    hand-written pipeline bit for bit. A restraint consumes no random numbers, so the other
    weights are initialised identically under the same seed."""
    kw = dict(conv_channels=16, primary_types=4)
    torch.manual_seed(3)
    plain = create_model("capsnet", **kw)
    torch.manual_seed(3)
    gated = create_model("capsnet", primary_restraint="gate", **kw)
    assert not any("restraint" in k for k in plain.state_dict())
    extra = set(gated.state_dict()) - set(plain.state_dict())
    assert extra == {"primary.restraint.threshold", "primary.restraint.log_temperature"}
    for k, v in plain.state_dict().items():
        assert torch.equal(v, gated.state_dict()[k]), k
    plain.eval()
    x = torch.rand(2, 1, 28, 28)
    u = F.squash(channels_to_capsules(plain.primary.conv(torch.relu(plain.conv1(x))), 4, 8))
    lengths = F.capsule_length(plain.digit(u).poses)
    assert torch.equal(plain(x).logits, lengths)


# ------------------------------------------------------------------ properties


@pytest.mark.parametrize("group,k", [("position", 1), ("position", 3), ("image", 4),
                                     ("image", 17)])
def test_topk_keeps_exactly_k_per_group(group, k):
    u = _caps(b=3, t=6, n=7).float()
    out = TopKRestraint(6, 4, k=k, group=group)(u)
    nonzero = out.abs().sum(-1) > 0  # (B, T, N)
    if group == "position":
        assert torch.equal(nonzero.sum(1), torch.full((3, 7), k))
    else:
        assert torch.equal(nonzero.flatten(1).sum(1), torch.full((3,), k))
    kept = out[nonzero]
    assert torch.equal(kept, u[nonzero])  # kept capsules are unchanged
    # every kept capsule is at least as long as every dropped one of its group
    lengths = u.norm(dim=-1)
    if group == "position":
        low_kept = torch.where(nonzero, lengths, torch.inf).amin(1)
        high_dropped = torch.where(~nonzero, lengths, -torch.inf).amax(1)
    else:
        low_kept = torch.where(nonzero, lengths, torch.inf).flatten(1).amin(1)
        high_dropped = torch.where(~nonzero, lengths, -torch.inf).flatten(1).amax(1)
    assert bool((low_kept >= high_dropped).all())


def test_power_lengths_and_order():
    u = _caps(scale=0.3)
    for p in (0.5, 2.0, 3.0):
        out = PowerRestraint(5, 4, p=p)(u)
        lu = (u.pow(2).sum(-1) + EPS).sqrt()
        torch.testing.assert_close(out.norm(dim=-1), lu.pow(p - 1) * u.norm(dim=-1))
        # the order of lengths is kept
        assert torch.equal(lu.flatten().argsort(), out.norm(dim=-1).flatten().argsort())
    # p > 1 suppresses short squashed capsules relatively more than long ones
    v = F.squash(_caps(scale=1.0))
    ratio = PowerRestraint(5, 4, p=2.0)(v).norm(dim=-1) / v.norm(dim=-1)
    lv = v.norm(dim=-1).flatten()
    assert bool((ratio.flatten()[lv.argsort()].diff() >= -1e-12).all())


def test_gate_never_amplifies_and_keeps_order_within_a_type():
    r = GateRestraint(5, 4, threshold=0.5, temperature=0.1).double()
    u = _caps(scale=0.4)
    out = r(u)
    assert bool((out.norm(dim=-1) <= u.norm(dim=-1)).all())
    for t in range(5):
        a, b = u[:, t].norm(dim=-1).flatten(), out[:, t].norm(dim=-1).flatten()
        assert torch.equal(a.argsort(), b.argsort())


@pytest.mark.parametrize("name,kwargs", [("power", {"p": 2.0}), ("power", {"p": 0.5}),
                                         ("gate", {}), ("topk", {"k": 2})])
def test_gradients_finite_at_zero_capsules(name, kwargs):
    r = create_restraint(name, 3, 4, **kwargs).double()
    u = torch.zeros(2, 3, 5, 4, dtype=torch.float64)
    u[0, 0, 0] = torch.tensor([0.3, -0.2, 0.1, 0.05], dtype=torch.float64)
    u.requires_grad_(True)
    r(u).pow(2).sum().add(r(u).sum()).backward()
    assert torch.isfinite(u.grad).all()
    for p in r.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_gradcheck_power():
    u = _caps(b=1, t=2, n=3, d=3).requires_grad_(True)
    for p in (0.7, 2.0, 3.0):
        assert torch.autograd.gradcheck(PowerRestraint(2, 3, p=p), (u,))


def test_gradcheck_gate_input_and_parameters():
    r = GateRestraint(2, 3, threshold=0.4, temperature=0.3).double()
    u = _caps(b=1, t=2, n=3, d=3)

    def fn(u, theta, log_tau):
        tau = log_tau.exp().view(1, -1, 1, 1)
        g = torch.sigmoid(((u * u).sum(-1, keepdim=True) + EPS).sqrt().sub(theta.view(1, -1, 1, 1))
                          / tau)
        return u * g

    inputs = (u.requires_grad_(True), r.threshold.detach().clone().requires_grad_(True),
              r.log_temperature.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs)
    # the module computes fn, and its parameter gradients agree with fn's
    torch.testing.assert_close(r(u), fn(*inputs))
    assert torch.autograd.gradcheck(r, (u,))
    r(u).sum().backward()
    fn(*inputs).sum().backward()
    torch.testing.assert_close(r.threshold.grad, inputs[1].grad)
    torch.testing.assert_close(r.log_temperature.grad, inputs[2].grad)


@pytest.mark.parametrize("restraint,kwargs", [("power", {"p": 2.0}), ("topk", {"k": 2}),
                                              ("gate", None)])
def test_capsnet_with_restraint_trains_a_step(restraint, kwargs):
    torch.manual_seed(4)
    model = create_model("capsnet", conv_channels=16, primary_types=4,
                         primary_restraint=restraint, primary_restraint_kwargs=kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x, y)
    loss, _ = model.loss(out, x, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    assert torch.isfinite(model(x).logits).all()
    assert not torch.equal(before["primary.conv.weight"], model.primary.conv.weight)
    if restraint == "gate":
        assert not torch.equal(before["primary.restraint.threshold"],
                               model.primary.restraint.threshold)


def test_res_capsnet_passes_the_restraint_through():
    model = create_model("res_capsnet", conv_channels=16, primary_types=4, depth=1, skip=0,
                         primary_restraint="topk", primary_restraint_kwargs={"k": 1})
    assert isinstance(model.primary.restraint, TopKRestraint) and model.primary.restraint.k == 1
    assert torch.isfinite(model(torch.rand(2, 1, 28, 28)).logits).all()
    assert create_model("res_capsnet", conv_channels=16, primary_types=4, depth=1,
                        skip=0).primary.restraint is None


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("name,kwargs,match", [
    ("power", {"p": 0.0}, "p must be > 0"),
    ("power", {"p": -1.0}, "p must be > 0"),
    ("power", {"p": float("nan")}, "finite number"),
    ("power", {"p": True}, "finite number"),
    ("topk", {}, "needs k"),
    ("topk", {"k": 0}, "positive integer"),
    ("topk", {"k": 2.0}, "positive integer"),
    ("topk", {"k": 5}, "larger than the 4 capsule types"),
    ("topk", {"k": 1, "group": "channel"}, "group must be one of"),
    ("gate", {"temperature": 0.0}, "temperature must be > 0"),
    ("gate", {"threshold": float("inf")}, "finite number"),
    ("gate", {"k": 3}, "takes"),
    ("sparsemax", {}, "unknown primary-capsule restraint 'sparsemax'"),
])
def test_bad_arguments_raise_value_error(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrimaryCaps(8, num_types=4, dim=4, restraint=name, restraint_kwargs=kwargs)


def test_topk_per_image_larger_than_capsules_raises_at_forward():
    layer = PrimaryCaps(2, num_types=2, dim=4, kernel_size=3, stride=1, restraint="topk",
                        restraint_kwargs={"k": 19, "group": "image"})
    x = torch.rand(1, 2, 5, 5)  # 2 types x 3 x 3 = 18 capsules
    with pytest.raises(ValueError, match="k=19 is larger than the 18 primary capsules"):
        layer(x)
    layer.restraint.k = 18
    assert layer(x).abs().sum(-1).gt(0).sum() == 18


def test_kwargs_without_restraint_and_capsnet_errors():
    with pytest.raises(ValueError, match="without a restraint"):
        PrimaryCaps(8, num_types=4, dim=4, restraint_kwargs={"p": 2})
    with pytest.raises(ValueError, match="larger than the 4 capsule types"):
        create_model("capsnet", conv_channels=16, primary_types=4, primary_restraint="topk",
                     primary_restraint_kwargs={"k": 8})
    with pytest.raises(ValueError, match="unknown primary-capsule restraint"):
        create_model("capsnet", conv_channels=16, primary_types=4, primary_restraint="Power")


def test_registry_names():
    assert sorted(RESTRAINTS) == ["gate", "power", "topk"]
