"""Property-based tests (hypothesis) over shapes, dtypes and values for layers and routings.

Every input either yields outputs of the documented shape with finite values, or raises
one of the documented errors (TypeError for dtypes, ValueError for shapes and values).
"""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import torchcaps
from torchcaps.functional import capsule_length, squash, squash_exp
from torchcaps.layers import CapsLinear, PrimaryCaps

DTYPES = [torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool]
SETTINGS = settings(max_examples=25, deadline=None)


def _routing(name, b, i, j, d):
    """A routing for j parents of dimension d, and the vote shape it takes."""
    if name == "cluster":  # votes carry a cluster of K=2 votes per (child, parent)
        return torchcaps.create_routing(name, num_parents=j, parent_dim=d, cluster_size=2), (b, i, j, 2 * d)
    return torchcaps.create_routing(name, num_parents=j, parent_dim=d), (b, i, j, d)


def _tensor(shape, dtype, special, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 10
    if special and x.numel():
        x.view(-1)[0] = special
    return x.to(dtype)


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       scale=st.floats(1e-30, 1e30), seed=st.integers(0, 1000))
def test_squash_properties(shape, scale, seed):
    s = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    for fn in (squash, squash_exp):
        v = fn(s)
        assert v.shape == s.shape and torch.isfinite(v).all()
        # < 1 mathematically; in floating point 1 - exp(-|s|) rounds to 1 for large |s|
        assert (capsule_length(v, eps=0) <= 1 + 1e-12).all()


@SETTINGS
@given(b=st.integers(1, 3), i=st.integers(1, 6), j=st.integers(1, 4), d=st.integers(1, 5),
       dtype=st.sampled_from(DTYPES), special=st.sampled_from([None, float("nan"), float("inf")]),
       seed=st.integers(0, 1000), routing=st.sampled_from(torchcaps.list_routings()))
def test_routing_accepts_valid_and_rejects_invalid(b, i, j, d, dtype, special, seed, routing):
    r, shape = _routing(routing, b, i, j, d)
    votes = _tensor(shape, dtype, special, seed)
    if not votes.is_floating_point():
        with pytest.raises(TypeError, match="floating-point"):
            r(votes)
        return
    if special is not None:
        with pytest.raises(ValueError, match="non-finite"):
            r(votes)
        return
    if any(p.dtype != votes.dtype for p in r.parameters()):
        with pytest.raises(TypeError, match="votes has dtype"):
            r(votes)
        r = r.to(votes.dtype)
    out = r(votes)
    assert out.poses.shape == (b, j, d) and out.couplings.shape == (b, i, j)
    assert torch.isfinite(out.poses).all() and torch.isfinite(out.couplings).all()
    sums = out.couplings.sum(dim=r.normalized_axis)
    torch.testing.assert_close(sums, torch.ones_like(sums))


@SETTINGS
@given(routing=st.sampled_from(torchcaps.list_routings()), j=st.integers(1, 4), d=st.integers(1, 4),
       extra=st.integers(1, 3))
def test_routing_rejects_wrong_parent_shape(routing, j, d, extra):
    r, shape = _routing(routing, 2, 3, j, d)
    with pytest.raises(ValueError, match="votes must have shape"):
        r(torch.randn(2, 3, j + extra, shape[-1]))
    with pytest.raises(ValueError, match="votes must have 4 dimensions"):
        r(torch.randn(2, 3, j))


@SETTINGS
@given(b=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 12), w=st.integers(1, 12),
       k=st.integers(1, 4), stride=st.integers(1, 3), dtype=st.sampled_from(DTYPES),
       special=st.sampled_from([None, float("nan")]), seed=st.integers(0, 100))
def test_primary_caps_any_input(b, c, h, w, k, stride, dtype, special, seed):
    layer = PrimaryCaps(c, num_types=2, dim=3, kernel_size=k, stride=stride)
    x = _tensor((b, c, h, w), dtype, special, seed)
    if x.is_floating_point():
        layer = layer.to(x.dtype)
    if not x.is_floating_point():
        with pytest.raises(TypeError):
            layer(x)
        return
    if special is not None:
        with pytest.raises(ValueError, match="non-finite"):
            layer(x)
        return
    if h < k or w < k:
        with pytest.raises(RuntimeError):  # torch's own message: kernel larger than input
            layer(x)
        return
    out = layer(x)
    assert out.shape == (b, layer.num_capsules(h, w), 3) and torch.isfinite(out).all()


@SETTINGS
@given(b=st.integers(1, 3), i=st.integers(1, 6), k=st.integers(1, 4), j=st.integers(1, 4),
       d=st.integers(1, 4), wrong=st.sampled_from([None, "i", "k", "ndim"]),
       seed=st.integers(0, 100))
def test_caps_linear_shapes(b, i, k, j, d, wrong, seed):
    layer = CapsLinear(i, k, j, d)
    shape = {None: (b, i, k), "i": (b, i + 1, k), "k": (b, i, k + 1), "ndim": (b, i * k)}[wrong]
    u = _tensor(shape, torch.float32, None, seed)
    if wrong is not None:
        with pytest.raises(ValueError, match="CapsLinear input"):
            layer(u)
        return
    out = layer(u)
    assert out.poses.shape == (b, j, d)


@SETTINGS
@given(name=st.sampled_from(torchcaps.list_models()), b=st.integers(1, 2),
       dh=st.integers(-2, 2), dtype=st.sampled_from(DTYPES))
def test_models_validate_images(name, b, dh, dtype):
    model = torchcaps.create_model(name).eval()
    c, h, w = model.in_shape
    assume(h + dh > 0)
    x = torch.rand(b, c, h + dh, w).to(dtype)
    if x.is_floating_point() and x.dtype != torch.float32 and dh == 0:
        with pytest.raises(TypeError, match="images has dtype torch.float64 but the parameters"):
            model(x)
    elif not x.is_floating_point():
        with pytest.raises(TypeError, match="images must have a floating-point dtype"):
            model(x)
    elif dh != 0:
        with pytest.raises(ValueError, match="images must have shape"):
            model(x)
    else:
        with torch.inference_mode():
            assert model(x).logits.shape == (b, model.num_classes)


def _layers():
    """Every single-input capsule layer, with a valid input shape (batch first, batch=2)."""
    from torchcaps.layers import (
        CapsStack,
        ClusterConvCaps,
        PrimaryMatCaps,
        SubspaceCaps,
        SubspaceConvCaps,
    )
    from torchcaps.models.efficient_capsnet import EfficientPrimaryCaps
    from torchcaps.models.inverted_attention import InvertedCapsFC

    return {
        "PrimaryCaps": (lambda: PrimaryCaps(4, num_types=2, dim=3, kernel_size=3), (2, 4, 7, 7)),
        "CapsLinear": (lambda: CapsLinear(5, 3, 4, 6), (2, 5, 3)),
        "ClusterConvCaps": (lambda: ClusterConvCaps(2, 3, 2, 4, cluster_size=3, in_size=6),
                            (2, 2, 3, 6, 6)),
        "PrimaryMatCaps": (lambda: PrimaryMatCaps(4, num_types=2), (2, 4, 5, 5)),
        "EfficientPrimaryCaps": (lambda: EfficientPrimaryCaps(16, kernel_size=3, dim=4),
                                 (2, 16, 3, 3)),
        "InvertedCapsFC": (lambda: InvertedCapsFC(6, 3), (2, 6, 16)),
        "SubspaceCaps": (lambda: SubspaceCaps(12, 3, 4), (2, 12)),
        "SubspaceConvCaps": (lambda: SubspaceConvCaps(3, 2, 4, kernel_size=3), (2, 3, 6, 6)),
        "CapsStack": (lambda: CapsStack(6, 4, 3, 5, depth=2, hidden_caps=4, hidden_dim=4, skip=0),
                      (2, 6, 4)),
    }


@settings(max_examples=180, deadline=None)
@given(name=st.sampled_from(sorted(_layers())), dtype=st.sampled_from(DTYPES),
       fault=st.sampled_from([None, "nan", "inf", "channels", "ndim"]), seed=st.integers(0, 100))
def test_every_layer_validates_its_input(name, dtype, fault, seed):
    make, shape = _layers()[name]
    layer = make()
    if fault == "channels":
        shape = (shape[0], shape[1] + 1, *shape[2:])
    elif fault == "ndim":
        shape = shape[:-1]
    special = {"nan": float("nan"), "inf": float("inf")}.get(fault)
    x = _tensor(shape, dtype, special, seed)
    if not x.is_floating_point():
        with pytest.raises(TypeError, match="floating-point"):
            layer(x)
        return
    layer = layer.to(x.dtype)
    if fault in ("nan", "inf"):
        with pytest.raises(ValueError, match="non-finite"):
            layer(x)
    elif fault in ("channels", "ndim"):
        with pytest.raises(ValueError, match="must have"):
            layer(x)
    else:
        out = layer(x)
        tensors = [out] if torch.is_tensor(out) else [v for v in vars(out).values() if torch.is_tensor(v)]
        assert tensors and all(torch.isfinite(t).all() for t in tensors)


def _two_input_layers():
    """Layers that take (poses, activations) or (poses, index), with valid inputs."""
    from torchcaps.layers import CapsuleDecoder, ClassMatCaps, ConvMatCaps

    return {
        "ConvMatCaps": (lambda: ConvMatCaps(2, 3, kernel_size=3, stride=1),
                        (2, 2, 5, 5, 16), lambda: torch.rand(2, 2, 5, 5)),
        "ClassMatCaps": (lambda: ClassMatCaps(2, 4), (2, 2, 3, 3, 16), lambda: torch.rand(2, 2, 3, 3)),
        "CapsuleDecoder": (lambda: CapsuleDecoder(4, 6, (1, 5, 5)), (2, 4, 6),
                           lambda: torch.tensor([0, 3])),
    }


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(_two_input_layers())), dtype=st.sampled_from(DTYPES),
       fault=st.sampled_from([None, "nan", "inf", "dim", "ndim"]), seed=st.integers(0, 100))
def test_two_input_layers_validate_poses(name, dtype, fault, seed):
    make, shape, second = _two_input_layers()[name]
    layer = make()
    if fault == "dim":
        shape = (*shape[:-1], shape[-1] + 1)
    elif fault == "ndim":
        shape = shape[:-1]
    special = {"nan": float("nan"), "inf": float("inf")}.get(fault)
    poses = _tensor(shape, dtype, special, seed)
    if not poses.is_floating_point():
        with pytest.raises(TypeError, match="floating-point"):
            layer(poses, second())
        return
    layer = layer.to(poses.dtype)
    other = second()
    other = other.to(poses.dtype) if other.is_floating_point() else other
    if fault in ("nan", "inf"):
        with pytest.raises(ValueError, match="non-finite"):
            layer(poses, other)
    elif fault in ("dim", "ndim"):
        with pytest.raises(ValueError, match="must have"):
            layer(poses, other)
    else:
        out = layer(poses, other)
        tensors = [out] if torch.is_tensor(out) else [v for v in vars(out).values() if torch.is_tensor(v)]
        assert tensors and all(torch.isfinite(t).all() for t in tensors)
