"""benchmarks/rescale_em_checkpoint.py: same function, Adam step equal in stored units, resumable."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import torchcaps
from torchcaps.train import TrainConfig, train
from torchcaps.train.checkpoint import load_checkpoint, model_state, optimizer_state

ROOT = Path(__file__).resolve().parent.parent
TINY = {"conv_channels": 4, "primary_types": 2, "caps1_types": 2, "caps2_types": 2,
        "iterations": 2, "margin_steps": 2}
BETAS = ("caps1.routing.beta_a", "caps2.routing.beta_a", "classes.routing.beta_a")


def _load():
    path = ROOT / "benchmarks" / "rescale_em_checkpoint.py"
    spec = importlib.util.spec_from_file_location("_bench_rescale", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _restore(prefix):
    meta, t = load_checkpoint(prefix)
    model = torchcaps.create_model("em_capsnet", **meta["model_kwargs"])
    model.load_state_dict(model_state(t))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    opt.load_state_dict(optimizer_state(meta, t))
    return meta, model, opt


def _step(model, opt, x, y):
    model.train()
    loss, _ = model.loss(model(x, y), x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_rescaled_checkpoint_computes_the_same_and_steps_beta_a_k_times_faster(
        tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = TrainConfig(model="em_capsnet", model_kwargs=TINY, max_steps=3, batch_size=8,
                      eval_batch_size=256, lr=3e-3, out=str(run), progress=False, threads=1)
    train(cfg)
    rescale = _load()
    monkeypatch.setattr(sys, "argv", ["rescale", str(run), str(tmp_path / "new"), "--scale", "50"])
    rescale.main()
    meta_old, old, opt_old = _restore(run / "last")
    meta_new, new, opt_new = _restore(tmp_path / "new" / "last")
    assert meta_new["model_kwargs"] == {**meta_old["model_kwargs"], "beta_a_scale": 50.0}
    assert meta_new["step"] == meta_old["step"] == 3
    assert (tmp_path / "new" / "best.json").exists() and (tmp_path / "new" / "metrics.jsonl").exists()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    old.eval(), new.eval()
    with torch.no_grad():
        torch.testing.assert_close(new(x).logits, old(x).logits, rtol=1e-5, atol=1e-6)
    for name in BETAS:
        torch.testing.assert_close(dict(new.named_parameters())[name] * 50,
                                   dict(old.named_parameters())[name])
    before = {n: p.detach().clone() for n, p in new.named_parameters()}
    before_old = {n: p.detach().clone() for n, p in old.named_parameters()}
    torch.manual_seed(0)
    _step(old, opt_old, x, y)
    torch.manual_seed(0)
    _step(new, opt_new, x, y)
    for n, p in new.named_parameters():
        moved_new = p.detach() - before[n]
        moved_old = dict(old.named_parameters())[n].detach() - before_old[n]
        # same step in stored units: beta_a moves 50 times more in the effective bias
        torch.testing.assert_close(moved_new, moved_old, rtol=1e-2, atol=1e-7, msg=n)
    # the trainer resumes the rescaled run with the new model arguments
    cfg_new = TrainConfig(model="em_capsnet", model_kwargs={**TINY, "beta_a_scale": 50.0},
                          max_steps=4, batch_size=8, eval_batch_size=256, lr=3e-3,
                          out=str(tmp_path / "new"), progress=False, threads=1)
    assert train(cfg_new, resume=True)["steps"] == 4


def test_rescale_refuses_bad_input(tmp_path, monkeypatch, capsys):
    rescale = _load()
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        rescale.rescale_checkpoint(tmp_path / "x", tmp_path / "y", 0.0)
    monkeypatch.setattr(sys, "argv", ["rescale", str(tmp_path), str(tmp_path / "new"),
                                      "--scale", "5"])
    with pytest.raises(SystemExit):
        rescale.main()
    assert "holds no last.json checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
