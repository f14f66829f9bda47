import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torchcaps
import torchcaps.train.checkpoint as ck
from torchcaps.train import CheckpointError, load_checkpoint, save_checkpoint
from torchcaps.train.checkpoint import (
    build_model_from_checkpoint,
    load_model_weights,
    model_state,
    optimizer_state,
)


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


def _forge(js: Path, mutate) -> None:
    """Apply ``mutate(meta)`` to a manifest, keeping it otherwise valid."""
    meta = json.loads(js.read_text())
    mutate(meta)
    js.write_text(json.dumps(meta))


def test_round_trip(tmp_path):
    m = _save(tmp_path)
    meta, tensors = load_checkpoint(tmp_path / "ck.json")
    assert meta["step"] == 3 and "rng.torch" in tensors
    m2, _ = build_model_from_checkpoint(tmp_path / "ck.safetensors")
    assert not m2.training
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # at rest a checkpoint is exactly two files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]


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
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(js)
    js.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a torchcaps-checkpoint file"):
        load_checkpoint(js)
    js.write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CheckpointError, match="unsupported checkpoint version 99"):
        load_checkpoint(js)
    bad = dict(meta)
    del bad["model_kwargs"]
    js.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="'model_kwargs' missing"):
        load_checkpoint(js)
    js.write_text(json.dumps({**meta, "weights_sha256": "../../elsewhere"}))
    with pytest.raises(CheckpointError, match="not a SHA-256 hex digest"):
        load_checkpoint(js)


def test_foreign_safetensors_with_forged_digest(tmp_path):
    _save(tmp_path)
    # a valid digest over garbage bytes: passes the digest, fails the parser
    p = tmp_path / "ck.safetensors"
    p.write_bytes(b"\xff" * 64)
    _forge(tmp_path / "ck.json",
           lambda m: m.update(weights_sha256=hashlib.sha256(p.read_bytes()).hexdigest()))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "ck.json")


def test_weights_for_another_architecture(tmp_path):
    _save(tmp_path)
    js = tmp_path / "ck.json"
    _forge(js, lambda m: m.update(model_kwargs={"conv_channels": 32, "primary_types": 2}))
    with pytest.raises(CheckpointError, match="do not fit model"):
        build_model_from_checkpoint(js)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    _save(tmp_path)
    (tmp_path / "ck.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found: .*ck.safetensors"):
        load_checkpoint(tmp_path / "ck")


# ----------------------------------------------------------------------------- crash safety


class _Killed(BaseException):
    """A simulated SIGKILL: like the real one, it runs no ``except Exception`` cleanup."""


def _linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _save_step(prefix, step: int) -> None:
    save_checkpoint(prefix, _linear(step), {"model": "linear", "model_kwargs": {},
                                            "step": step, "epoch": 0})


def _loaded_step(prefix) -> int:
    """Load ``prefix`` and check that its weights are exactly those saved with its step."""
    meta, tensors = load_checkpoint(prefix)
    for k, v in _linear(meta["step"]).state_dict().items():
        assert torch.equal(tensors[f"model.{k}"], v), (meta["step"], k)
    return meta["step"]


def _kill_at(monkeypatch, n: int) -> None:
    """Let the ``n``-th file step (write, rename or unlink; 1-based) of what follows die.

    A killed write leaves half of its bytes behind, as a torn write would.
    """
    count = [0]

    def stop(fn, torn=False):
        def step(*args):
            count[0] += 1
            if count[0] == n:
                if torn:
                    Path(args[0]).write_bytes(args[1][: len(args[1]) // 2])
                raise _Killed
            return fn(*args)

        return step

    monkeypatch.setattr(ck, "_write_file", stop(ck._write_file, torn=True))
    monkeypatch.setattr(ck, "_rename", stop(ck._rename))
    monkeypatch.setattr(ck, "_unlink", stop(ck._unlink))


def test_a_kill_at_any_file_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch):
    """Two saves in a row, each killed at any of its file steps (or not at all): the
    newest committed checkpoint always loads whole, and the next save leaves no debris."""
    monkeypatch.setattr(ck.os, "fsync", lambda fd: None)  # durability is not under test
    outcomes = set()
    for first in range(1, 9):
        for second in range(1, 9):
            prefix = tmp_path / f"{first}-{second}" / "ck"
            _save_step(prefix, 0)
            committed = 0
            for step, kill in ((1, first), (2, second)):
                with monkeypatch.context() as m:
                    _kill_at(m, kill)
                    try:
                        _save_step(prefix, step)
                    except _Killed:
                        pass
                got = _loaded_step(prefix)
                assert got in (committed, step), (first, second, step)
                outcomes.add(got == step)
                committed = got
            _save_step(prefix, 3)
            assert _loaded_step(prefix) == 3
            assert sorted(p.name for p in prefix.parent.iterdir()) == ["ck.json", "ck.safetensors"]
    assert outcomes == {True, False}  # some kills kept the old checkpoint, others the new


def test_a_real_sigkill_after_the_weights_are_written_keeps_the_previous_checkpoint(tmp_path):
    prefix = tmp_path / "run" / "last"
    _save_step(prefix, 1)
    child = textwrap.dedent(f"""
        import os, signal, torch
        import torchcaps.train.checkpoint as ck
        rename = ck._rename
        def rename_then_die(src, dst):
            rename(src, dst)
            if ".pending-" in dst.name:  # new weights in place, manifest not yet replaced
                os.kill(os.getpid(), signal.SIGKILL)
        ck._rename = rename_then_die
        torch.manual_seed(2)
        ck.save_checkpoint({str(prefix)!r}, torch.nn.Linear(3, 2),
                           {{"model": "linear", "model_kwargs": {{}}, "step": 2, "epoch": 0}})
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert any(".pending-" in p.name for p in prefix.parent.iterdir())
    assert _loaded_step(prefix) == 1
    _save_step(prefix, 3)
    assert _loaded_step(prefix) == 3
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["last.json", "last.safetensors"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    _save_step(tmp_path / "ck", 1)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        _save_step(tmp_path / "ck", 2)
    monkeypatch.undo()
    assert _loaded_step(tmp_path / "ck") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]


# ----------------------------------------------------------------------------- optimizers


def _stepped(params, lr):
    opt = torch.optim.Adam(params, lr=lr)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == json.loads(json.dumps(b["param_groups"]))
    assert a["state"].keys() == b["state"].keys()
    for idx, st in b["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(a["state"][idx][key]), torch.as_tensor(v)), (idx, key)


def test_single_and_named_optimizers(tmp_path):
    gen, disc = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    model = torch.nn.ModuleDict({"gen": gen, "disc": disc})
    g, d = _stepped(list(gen.parameters()), 1e-3), _stepped(list(disc.parameters()), 4e-4)
    manifest = {"model": "gan", "model_kwargs": {}, "step": 1, "epoch": 0}
    save_checkpoint(tmp_path / "gan", model, manifest, {"g": g, "d": d})
    meta, tensors = load_checkpoint(tmp_path / "gan")
    assert {k.split(".")[1] for k in tensors if k.startswith("optim.")} == {"g", "d"}
    _assert_same_state(optimizer_state(meta, tensors, "g"), g.state_dict())
    _assert_same_state(optimizer_state(meta, tensors, "d"), d.state_dict())
    fresh = torch.optim.Adam(disc.parameters())
    fresh.load_state_dict(optimizer_state(meta, tensors, "d"))
    with pytest.raises(CheckpointError, match=r"pass name="):
        optimizer_state(meta, tensors)
    with pytest.raises(CheckpointError, match="no optimizer named 'x'"):
        optimizer_state(meta, tensors, "x")

    save_checkpoint(tmp_path / "one", model, meta, g)  # a re-save drops the stale dict
    meta1, tensors1 = load_checkpoint(tmp_path / "one")
    assert "optimizers" not in meta1
    _assert_same_state(optimizer_state(meta1, tensors1), g.state_dict())
    with pytest.raises(CheckpointError, match="no optimizer named 'g'"):
        optimizer_state(meta1, tensors1, "g")
    with pytest.raises(ValueError, match="identifiers"):
        save_checkpoint(tmp_path / "bad", model, manifest, {"a.b": g})


# ----------------------------------------------------------------------------- untrusted weights


def _retype_header(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite the dtype in a safetensors header (8-byte length, JSON, data)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n].replace(old, new)
    assert len(header) == n
    path.write_bytes(raw[:8] + header + raw[8 + n :])


def test_forged_dtype_with_matching_digest_is_refused(tmp_path):
    _save(tmp_path)
    st = tmp_path / "ck.safetensors"
    _retype_header(st, b'"F32"', b'"I32"')
    _forge(tmp_path / "ck.json",
           lambda m: m.update(weights_sha256=hashlib.sha256(st.read_bytes()).hexdigest()))
    with pytest.raises(CheckpointError,
                       match=r"tensor 'conv1.weight': expected float32 \[16, 1, 9, 9\], "
                             r"found int32 \[16, 1, 9, 9\]"):
        build_model_from_checkpoint(tmp_path / "ck")


def test_load_model_weights_checks_every_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    load_model_weights(model, good, "x")
    load_model_weights(model, {f"model.{k}": v for k, v in good.items()}, "x")  # checkpoint keys
    cases = [
        ({**good, "0.weight": good["0.weight"].int()}, r"'0.weight': expected float32 \[2, 3\], "
                                                       r"found int32 \[2, 3\]"),
        ({**good, "0.bias": torch.zeros(3)}, r"'0.bias': expected float32 \[2\], found float32 \[3\]"),
        ({**good, "1.num_batches_tracked": torch.zeros(())}, "expected int64 .*found float32"),
        ({k: v for k, v in good.items() if k != "1.running_var"}, "'1.running_var' is missing"),
        ({**good, "2.weight": torch.zeros(1)}, "unexpected tensor '2.weight'"),
    ]
    for state, pattern in cases:
        with pytest.raises(CheckpointError, match="src: weights do not fit model Sequential: .*" + pattern):
            load_model_weights(model, state, "src")


def _spy_create_model(monkeypatch) -> list[str]:
    """Record the default device at each ``create_model`` call of the checkpoint module."""
    devices = []

    def spy(name, **kwargs):
        devices.append(torch.empty(()).device.type)
        return torchcaps.create_model(name, **kwargs)

    monkeypatch.setattr(ck, "create_model", spy)
    return devices


@pytest.mark.parametrize("num_classes", [3_000_000, 1e40, True, -1])
def test_absurd_num_classes_is_refused_before_building(tmp_path, monkeypatch, num_classes):
    _save(tmp_path)
    js = tmp_path / "ck.json"
    _forge(js, lambda m: m["model_kwargs"].update(num_classes=num_classes))
    assert js.stat().st_size < 4096
    devices = _spy_create_model(monkeypatch)
    with pytest.raises(CheckpointError, match=r"num_classes must be an integer in \[1, 100000\]"):
        build_model_from_checkpoint(js)
    assert devices == []


def test_oversized_model_is_compared_on_the_meta_device(tmp_path, monkeypatch):
    """90,000 classes pass the field check but need GBs: refused before any real allocation."""
    _save(tmp_path)
    _forge(tmp_path / "ck.json", lambda m: m["model_kwargs"].update(num_classes=90_000))
    devices = _spy_create_model(monkeypatch)
    with pytest.raises(CheckpointError, match=r"needs [\d,]+ bytes of tensors but the checkpoint "
                                              r"holds [\d,]+"):
        build_model_from_checkpoint(tmp_path / "ck")
    assert devices == ["meta"]


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda m: m.update(model="nosuchnet"), "unknown model 'nosuchnet'"),
        (lambda m: m["model_kwargs"].update(conv_channels=2**40), "out of range"),
        (lambda m: m["model_kwargs"].update(primary_types=float("nan")), "not finite"),
        (lambda m: m["model_kwargs"].update(bogus=1), "cannot build model 'capsnet'"),
        (lambda m: m["model_kwargs"].update(in_shape=[1, 28]), "cannot build model 'capsnet'"),
    ],
)
def test_bad_model_spec_is_one_clear_error(tmp_path, mutate, pattern):
    _save(tmp_path)
    _forge(tmp_path / "ck.json", mutate)
    with pytest.raises(CheckpointError, match=pattern) as e:
        build_model_from_checkpoint(tmp_path / "ck")
    assert "\n" not in str(e.value)  # no C++ stack frames


def test_every_model_builds_from_its_checkpoint(tmp_path):
    """The meta-device pre-check accepts the real weights of every registered model."""
    for name in torchcaps.list_models():
        model = torchcaps.create_model(name)
        save_checkpoint(tmp_path / name, model, {"model": name, "model_kwargs": {},
                                                 "step": 0, "epoch": 0})
        rebuilt, _ = build_model_from_checkpoint(tmp_path / name)
        state = model_state(load_checkpoint(tmp_path / name)[1])
        for k, v in rebuilt.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)


def test_pending_weights_are_found_after_a_kill_past_the_commit(tmp_path, monkeypatch):
    """A kill between the manifest commit and the final rename: the new checkpoint loads
    from its pending file, and tools reading ``NAME.safetensors`` still see whole weights."""
    _save_step(tmp_path / "ck", 1)
    old = (tmp_path / "ck.safetensors").read_bytes()
    with monkeypatch.context() as m:
        _kill_at(m, 5)  # write, rename (weights); write, rename (manifest); rename (final)
        with pytest.raises(_Killed):
            _save_step(tmp_path / "ck", 2)
    assert _loaded_step(tmp_path / "ck") == 2
    assert (tmp_path / "ck.safetensors").read_bytes() == old
    assert os.path.exists(next(tmp_path.glob("ck.pending-*.safetensors")))
