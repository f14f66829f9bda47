"""Autograd keeps one copy of the vote tensor per routing layer (issue: memory budget)."""

import torch

import torchcaps


def _saved_storages(fn):
    """Run fn() and return {storage pointer: nbytes} of every tensor autograd saved."""
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def test_capsnet_training_graph_holds_one_vote_tensor():
    torch.manual_seed(0)
    model = torchcaps.create_model("capsnet", conv_channels=32, primary_types=8)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    votes = model.digit.votes(model.primary(torch.relu(model.conv1(x))))
    vote_bytes = votes.numel() * votes.element_size()  # (4, 288, 10, 16) floats

    def step():
        out = model(x, y)
        return model.loss(out, x, y)[0]

    saved, loss = _saved_storages(step)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    big = [n for ptr, n in saved.items() if n >= vote_bytes and ptr not in params]
    assert len(big) == 1, f"autograd holds {len(big)} vote-sized buffers, expected 1"
    loss.backward()  # the graph is intact


def test_capslinear_votes_are_parent_major_in_memory():
    layer = torchcaps.layers.CapsLinear(6, 4, 3, 5)
    u = torch.randn(2, 6, 4)
    v = layer.votes(u)
    assert v.shape == (2, 6, 3, 5)
    assert v.transpose(1, 2).is_contiguous()  # memory (B, J, I, D)
    ref = torch.einsum("bik,ijdk->bijd", u, layer.weight)  # the plain (B, I, J, D) votes
    assert ref.shape[1:] == v.shape[1:]
    torch.testing.assert_close(v, ref)
