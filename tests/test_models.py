import pytest
import torch

import torchcaps
from torchcaps.models import ModelOutput
from torchcaps.testing import overfit_tiny_batch


@pytest.mark.parametrize("name", torchcaps.list_models())
def test_every_registered_model_forward_backward(name):
    model = torchcaps.create_model(name)
    model.train()
    x = torch.rand(2, *model.in_shape)
    y = torch.tensor([0, 1])
    out = model(x, y)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, model.num_classes)
    loss, parts = model.loss(out, x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in parts.values())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
    model.eval()
    with torch.inference_mode():
        out = model(x)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", torchcaps.list_models())
def test_every_model_rejects_bad_images(name):
    model = torchcaps.create_model(name)
    c, h, w = model.in_shape
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.rand(2, c, h + 1, w))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, c, h, w, dtype=torch.uint8))
    bad = torch.rand(2, c, h, w)
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="images contains non-finite"):
        model(bad)
    with pytest.raises(TypeError, match="labels must be int64"):
        model(torch.rand(2, c, h, w), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.rand(2, c, h, w), torch.tensor([0, 1, 2]))


def test_capsnet_parameter_count_matches_paper():
    m = torchcaps.create_model("capsnet")
    total = sum(p.numel() for p in m.parameters())
    no_dec = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("decoder"))
    assert total == 8_215_568  # "about 8.2M" in Sabour et al.
    assert no_dec == 6_804_224  # "6.8M" without the reconstruction subnetwork
    assert m.digit.in_caps == 1152


def test_capsnet_decoder_masks_by_label_in_training_and_prediction_in_eval():
    m = torchcaps.create_model("capsnet", conv_channels=32, primary_types=4)
    x = torch.rand(3, 1, 28, 28)
    pred = m.eval()(x).logits.argmax(1)
    wrong = (pred + 1) % 10
    m.train()
    r_label = m(x, wrong).reconstruction
    r_pred_train = m(x, pred).reconstruction
    assert not torch.equal(r_label, r_pred_train)
    m.eval()
    # in eval mode labels are ignored: the longest capsule is decoded
    torch.testing.assert_close(m(x, wrong).reconstruction, r_pred_train)


def test_unknown_model_name_is_clear():
    with pytest.raises(KeyError, match="unknown model 'capsnett'; did you mean 'capsnet'"):
        torchcaps.create_model("capsnett")


def test_register_duplicate_refused():
    with pytest.raises(ValueError, match="already registered"):
        @torchcaps.register_model
        def capsnet(**kw):  # noqa: F811
            return None


def test_capsnet_too_small_input():
    with pytest.raises(ValueError, match="too small"):
        torchcaps.create_model("capsnet", in_shape=(1, 16, 16))


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    m = torchcaps.create_model("capsnet", conv_channels=64, primary_types=8)
    loss, acc = overfit_tiny_batch(m, steps=60, lr=2e-3)
    assert loss < 0.05 and acc == 1.0


def test_capsnet_compiles():
    pytest.importorskip("torch._dynamo")
    m = torchcaps.create_model("capsnet", conv_channels=16, primary_types=4).eval()
    x = torch.rand(2, 1, 28, 28)
    compiled = torch.compile(m, backend="eager")
    torch.testing.assert_close(compiled(x).logits, m(x).logits)


@pytest.mark.slow
def test_capsnet_training_step_compiles_with_inductor():
    """The default torch.compile backend (C++ code generation on CPU) gives the same loss and
    gradients as eager mode for a capsnet training step."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor needs a C++ compiler on CPU")
    torch.manual_seed(0)
    m = torchcaps.create_model("capsnet", conv_channels=16, primary_types=4)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    compiled = torch.compile(m)
    grads = []
    for net in (m, compiled):
        m.zero_grad()
        loss, _ = m.loss(net(x, y), x, y)
        loss.backward()
        grads.append((loss.detach(), m.digit.weight.grad.clone(), m.conv1.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
