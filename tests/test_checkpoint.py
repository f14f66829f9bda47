import json

import pytest
import torch

import torchcaps
from torchcaps.train import CheckpointError, load_checkpoint, save_checkpoint
from torchcaps.train.trainer import build_model_from_checkpoint


def _small():
    return torchcaps.create_model("capsnet", conv_channels=16, primary_types=2)


def _save(tmp_path, model=None):
    model = model or _small()
    opt = torch.optim.Adam(model.parameters())
    kwargs = {"conv_channels": 16, "primary_types": 2}
    save_checkpoint(tmp_path / "ck", model, {"model": "capsnet", "model_kwargs": kwargs,
                                            "step": 3, "epoch": 0}, opt,
                    {"torch": torch.get_rng_state()})
    return model


def test_round_trip(tmp_path):
    m = _save(tmp_path)
    meta, tensors = load_checkpoint(tmp_path / "ck.json")
    assert meta["step"] == 3 and "rng.torch" in tensors
    m2, _ = build_model_from_checkpoint(tmp_path / "ck.safetensors")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_truncated_weights(tmp_path):
    _save(tmp_path)
    p = tmp_path / "ck.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(tmp_path / "ck")


def test_foreign_and_malformed_manifest(tmp_path):
    _save(tmp_path)
    js = tmp_path / "ck.json"
    meta = json.loads(js.read_text())
    js.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid JSON"):
        load_checkpoint(js)
    js.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a torchcaps checkpoint"):
        load_checkpoint(js)
    js.write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CheckpointError, match="unsupported checkpoint version 99"):
        load_checkpoint(js)
    bad = dict(meta)
    del bad["model_kwargs"]
    js.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="'model_kwargs' missing"):
        load_checkpoint(js)


def test_foreign_safetensors_with_forged_digest(tmp_path):
    _save(tmp_path)
    # a valid digest over garbage bytes: passes the digest, fails the parser
    p = tmp_path / "ck.safetensors"
    p.write_bytes(b"\xff" * 64)
    js = tmp_path / "ck.json"
    meta = json.loads(js.read_text())
    import hashlib

    meta["weights_sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    js.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(js)


def test_weights_for_another_architecture(tmp_path):
    _save(tmp_path)
    js = tmp_path / "ck.json"
    meta = json.loads(js.read_text())
    meta["model_kwargs"] = {"conv_channels": 32, "primary_types": 2}
    js.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit model"):
        build_model_from_checkpoint(js)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
