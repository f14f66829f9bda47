import pytest
import torch

from reference import votes_loop
from torchcaps.layers import (
    CapsLinear,
    CapsuleDecoder,
    PrimaryCaps,
    channels_to_capsules,
    mask_capsules,
)


def test_primary_capsule_reshape_groups_channels_not_pixels():
    """Capsule (t, h, w) holds channels t*D .. t*D+D-1 at position (h, w)."""
    b, t, d, h, w = 2, 3, 4, 5, 6
    x = torch.randn(b, t * d, h, w)
    caps = channels_to_capsules(x, t, d)
    assert caps.shape == (b, t * h * w, d)
    for bb in range(b):
        for tt in range(t):
            for hh in range(h):
                for ww in range(w):
                    idx = tt * h * w + hh * w + ww
                    torch.testing.assert_close(caps[bb, idx], x[bb, tt * d:(tt + 1) * d, hh, ww])
    # the known bug (reshape without permute) gives different capsules
    assert not torch.equal(x.reshape(b, -1, d), caps)


def test_primary_caps_layer_shapes_and_squash():
    layer = PrimaryCaps(16, num_types=4, dim=8, kernel_size=3, stride=2)
    out = layer(torch.randn(2, 16, 11, 11))
    assert out.shape == (2, 4 * 5 * 5, 8) and layer.num_capsules(11, 11) == 100
    assert (out.norm(dim=-1) < 1).all()


def test_primary_caps_bad_input():
    layer = PrimaryCaps(16, num_types=4, dim=8, kernel_size=3)
    with pytest.raises(ValueError, match=r"PrimaryCaps input must have shape \(B, 16, H, W\)"):
        layer(torch.randn(2, 15, 11, 11))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 16, 11, 11, dtype=torch.uint8))
    with pytest.raises(ValueError, match="non-finite"):
        layer(torch.full((1, 16, 5, 5), float("inf")))
    with pytest.raises(ValueError, match="squash"):
        PrimaryCaps(4, squash="bogus")


def test_caps_linear_votes_match_loop_reference():
    layer = CapsLinear(6, 3, 4, 5).double()
    u = torch.randn(2, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(layer.votes(u), votes_loop(u, layer.weight.detach()))
    out = layer(u)
    assert out.poses.shape == (2, 4, 5) and out.couplings.shape == (2, 6, 4)


def test_caps_linear_gradcheck():
    layer = CapsLinear(4, 3, 2, 3, routing_kwargs={"iterations": 2}).double()
    u = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x).poses, (u,))


def test_caps_linear_bad_input():
    layer = CapsLinear(6, 3, 4, 5)
    with pytest.raises(ValueError, match=r"CapsLinear input must have shape \(B, 6, 3\)"):
        layer(torch.randn(2, 6, 4))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.ones(2, 6, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="in_caps must be a positive integer"):
        CapsLinear(0, 3, 4, 5)
    with pytest.raises(KeyError, match="unknown routing"):
        CapsLinear(6, 3, 4, 5, routing="nope")


def test_decoder_masks_all_but_one_capsule():
    poses = torch.randn(3, 10, 16)
    masked = mask_capsules(poses, torch.tensor([2, 0, 9])).view(3, 10, 16)
    for b, k in enumerate([2, 0, 9]):
        torch.testing.assert_close(masked[b, k], poses[b, k])
        assert masked[b].abs().sum() == poses[b, k].abs().sum()
    dec = CapsuleDecoder(10, 16, (1, 28, 28))
    img = dec(poses, torch.tensor([2, 0, 9]))
    assert img.shape == (3, 1, 28, 28) and (img >= 0).all() and (img <= 1).all()
    # only the selected capsule influences the output
    poses2 = poses.clone()
    poses2[0, 5] += 1
    torch.testing.assert_close(dec(poses2, torch.tensor([2, 0, 9])), img)
    with pytest.raises(ValueError, match="decoder poses"):
        dec(torch.randn(3, 10, 8), torch.tensor([0, 1, 2]))
