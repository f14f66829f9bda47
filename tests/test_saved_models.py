"""Models saved by an earlier version of the library load and predict the same.

``tests/data/saved_models/`` holds tiny randomly initialised checkpoints (seed 0), written with
:func:`torchcaps.train.save_checkpoint`, and for each one ``<name>.outputs.safetensors``: a
fixed input batch and what the model returned for it then. The test rebuilds each model with
:func:`torchcaps.train.build_model_from_checkpoint` and compares its outputs now. A failure
means that a change altered what a trained model computes (or the names of its weights).

The files were written once, before a refactoring they guard, with
``python tests/test_saved_models.py --write``. Rewriting them turns the test into a
tautology for the code that wrote them: do that only for a deliberate change of results,
and say so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

DATA = Path(__file__).parent / "data" / "saved_models"

#: name -> (registered model, small constructor arguments)
SAVED = {
    "em_capsnet": ("em_capsnet", dict(conv_channels=8, primary_types=4, caps1_types=4,
                                      caps2_types=4)),
    "vb_capsnet": ("vb_capsnet", dict(conv_channels=8, primary_types=4, caps1_types=4,
                                      caps2_types=4)),
    **{name: ("res_capsnet", dict(in_shape=[1, 25, 25], conv_channels=4, primary_types=2,
                                  primary_dim=4, depth=3, hidden_caps=6, hidden_dim=4, **extra))
       for name, extra in (("res_capsnet", {}),
                           ("res_capsnet_sda", {"routing": "scaled_distance"}),
                           ("res_capsnet_em", {"routing": "em"}))},
}
FIELDS = ("logits", "poses", "couplings")


def _outputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's outputs in float32 (``<field>``) and in float64 (``<field>.f64``).

    EM routing in float32 differs by up to ~1e-5 between thread counts (summation order), so
    the 1e-6 comparison is made in float64, where the order does not matter at that level;
    float32 outputs are compared more loosely.
    """
    out = {}
    for suffix, dtype in (("", torch.float32), (".f64", torch.float64)):
        with torch.no_grad():
            o = model.to(dtype)(images.to(dtype))
        out.update({f + suffix: getattr(o, f).contiguous() for f in FIELDS
                    if getattr(o, f) is not None})
    model.float()
    return out


def write() -> None:
    """Write every checkpoint and its reference outputs (see the module docstring)."""
    from torchcaps import create_model
    from torchcaps.train import save_checkpoint

    torch.set_num_threads(1)  # as in the tests (conftest.py)
    DATA.mkdir(parents=True, exist_ok=True)
    for name, (model_name, kwargs) in SAVED.items():
        torch.manual_seed(0)
        model = create_model(model_name, **kwargs).eval()
        images = torch.rand(2, *model.in_shape, generator=torch.Generator().manual_seed(1))
        save_checkpoint(DATA / name, model,
                        {"model": model_name, "model_kwargs": kwargs, "step": 0, "epoch": 0})
        save_file({"images": images, **_outputs(model, images)},
                  str(DATA / f"{name}.outputs.safetensors"))


@pytest.mark.parametrize("name", sorted(SAVED))
def test_saved_model_predicts_the_same(name):
    from torchcaps.train import build_model_from_checkpoint

    model, manifest = build_model_from_checkpoint(DATA / name)
    assert (manifest["model"], manifest["model_kwargs"]) == SAVED[name]
    saved = load_file(str(DATA / f"{name}.outputs.safetensors"))
    got = _outputs(model, saved.pop("images"))
    assert got.keys() == saved.keys()
    for field, want in saved.items():
        atol = 1e-6 if field.endswith(".f64") else 1e-4
        torch.testing.assert_close(got[field], want, rtol=0, atol=atol, msg=f"{name}.{field}")
    # the predicted class, where it is decided (untrained vb_capsnet ties every class: its
    # argmax there is round-off, which differs between CPU instruction sets)
    top2 = saved["logits"].topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert torch.equal(got["logits"].argmax(1)[decided], saved["logits"].argmax(1)[decided])


def test_saved_models_are_small():
    total = sum(f.stat().st_size for f in DATA.iterdir())
    assert total < 300_000, f"tests/data/saved_models holds {total:,} bytes"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_saved_models.py --write  (see the module docstring)")
    write()
