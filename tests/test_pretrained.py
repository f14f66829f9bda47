"""Pretrained weights: every shipped file reloads to its recorded accuracy; records, digests,
the download cache, local copies, corrupted files, export and the command line."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import torchcaps
from torchcaps.cli import main
from torchcaps.data import ChecksumError, load_dataset
from torchcaps.models import create_model, list_models
from torchcaps.models import pretrained as pt
from torchcaps.models.pretrained import (
    PretrainedError,
    export_pretrained,
    get_pretrained,
    list_pretrained,
    load_pretrained_state,
    weights_path,
)
from torchcaps.train import TrainConfig, train
from torchcaps.train.evaluate import evaluate

SHIPPED = [n for n in list_pretrained() if get_pretrained(n).shipped]


@pytest.fixture(scope="module")
def mini_test():
    return load_dataset("mnist-mini").test


# ------------------------------------------------------------------ the published records


def test_every_record_is_complete_and_names_a_registered_model():
    assert list_pretrained(), "no pretrained weights are published"
    for name in list_pretrained():
        r = get_pretrained(name)
        assert r.name == name and r.model in list_models(task=None)
        assert re.fullmatch(r"[0-9a-f]{64}", r.sha256)
        assert r.shipped or (r.url or "").startswith("https://"), f"{name}: neither shipped nor published"
        for key in ("command", "seed", "epochs", "minutes", "machine", "torch"):
            assert r.training.get(key) is not None, f"{name}: training.{key} is not recorded"
        assert r.training["command"].startswith("torchcaps train --model " + r.model)
        assert 0.0 < r.accuracy["test"] <= 1.0 and "mnist-mini test" in r.accuracy


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_match_their_digest_size_and_recorded_accuracy(name, mini_test):
    r = get_pretrained(name)
    path = pt.WEIGHTS_DIR / r.file
    assert path.stat().st_size == r.bytes
    model = create_model(r.model, pretrained=True).eval()
    acc = evaluate(model, mini_test, 500)["accuracy"]
    assert abs(acc - r.accuracy["mnist-mini test"]) * 100 <= 0.3, (name, acc, r.accuracy)


def test_shipped_weights_meet_the_published_accuracy_goals():
    goals = {"efficient_capsnet": 0.995, "ida_capsnet": 0.99, "cluster_capsnet": 0.99,
             "subspace_capsnet": 0.99, "vb_capsnet": 0.99, "em_capsnet": 0.99}
    for name in SHIPPED:
        r = get_pretrained(name)
        if r.model in goals and r.dataset == "mnist":
            assert r.accuracy["test"] >= goals[r.model], (name, r.accuracy)


def test_a_model_without_weights_and_an_unknown_name_are_named():
    with pytest.raises(PretrainedError, match="no pretrained weights are published for 'cnn_baseline'"):
        create_model("cnn_baseline", pretrained=True)
    with pytest.raises(PretrainedError, match="unknown weights 'nope'"):
        get_pretrained("nope")


# ------------------------------------------------ export, download, cache, local copies


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ida_capsnet run exported twice: shipped (``ship/``) and published (``web/``)."""
    root = tmp_path_factory.mktemp("pretrained")
    train(TrainConfig(model="ida_capsnet", dataset="mnist-mini", epochs=1, max_steps=3,
                      batch_size=16, out=str(root / "run"), progress=False))
    cmd = "torchcaps train --model ida_capsnet --dataset mnist-mini --max-steps 3"
    shipped = export_pretrained(root / "run" / "best", "tiny-ida", cmd, out_dir=root / "ship")
    published = export_pretrained(root / "run" / "best", "tiny-ida", cmd, ship=False,
                                  url="https://example.org/w/tiny-ida.safetensors",
                                  out_dir=root / "web")
    (root / "served").mkdir()  # the published file lives on its host, not beside the record
    (root / "web" / published.file).rename(root / "served" / published.file)
    return root, shipped, published


def test_export_writes_model_tensors_only_and_a_record(exported):
    root, rec, _ = exported
    state = load_pretrained_state(rec, file=root / "ship" / rec.file)
    model = create_model("ida_capsnet")
    assert state.keys() == model.state_dict().keys()  # no optimizer, no RNG, no prefix
    meta = json.loads((root / "ship" / "tiny-ida.json").read_text())
    assert meta["sha256"] == rec.sha256 and meta["training"]["steps"] == 3
    assert meta["accuracy"]["test"] == meta["accuracy"]["mnist-mini test"]


def test_shipped_file_loads_and_a_damaged_one_is_refused(exported, monkeypatch, mini_test):
    root, rec, _ = exported
    monkeypatch.setattr(pt, "WEIGHTS_DIR", root / "ship")
    assert list_pretrained() == ["tiny-ida"] and get_pretrained("ida_capsnet").shipped
    model = create_model("ida_capsnet", pretrained=True).eval()
    assert evaluate(model, mini_test, 500)["accuracy"] == pytest.approx(rec.accuracy["test"], abs=1e-9)
    damaged = root / "damaged"
    damaged.mkdir()
    for f in (root / "ship").iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    blob = bytearray((damaged / rec.file).read_bytes())
    blob[-5] ^= 0xFF
    (damaged / rec.file).write_bytes(bytes(blob))
    monkeypatch.setattr(pt, "WEIGHTS_DIR", damaged)
    with pytest.raises(ChecksumError, match="the shipped tiny-ida weights are damaged"):
        create_model("ida_capsnet", pretrained=True)


def test_download_is_verified_cached_and_reused(exported, tmp_path, monkeypatch):
    root, _, rec = exported
    monkeypatch.setattr(pt, "WEIGHTS_DIR", root / "web")
    assert not rec.shipped
    mirror = (root / "served").as_uri()  # the real download code, reading file:// URLs
    path = weights_path("tiny-ida", cache_dir=tmp_path / "cache", mirror=mirror)
    assert path == tmp_path / "cache" / "weights" / rec.file
    assert not list(path.parent.glob("*.part"))
    # the cached copy is used without the network: a mirror that does not exist is not read
    again = weights_path("tiny-ida", cache_dir=tmp_path / "cache", mirror="file:///nonexistent")
    assert again == path
    model = create_model("ida_capsnet", pretrained=True, cache_dir=tmp_path / "cache")
    published = load_pretrained_state(rec, file=path)
    assert all(torch.equal(v, published[k]) for k, v in model.state_dict().items())
    # a cached copy that was damaged later is refused with a way out
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match="delete it to download it again"):
        weights_path("tiny-ida", cache_dir=tmp_path / "cache", mirror=mirror)


def test_a_tampered_download_is_refused_and_not_kept(exported, tmp_path, monkeypatch):
    root, _, rec = exported
    served = tmp_path / "tampered"
    served.mkdir()
    (served / rec.file).write_bytes((root / "served" / rec.file).read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(pt, "WEIGHTS_DIR", root / "web")
    with pytest.raises(ChecksumError, match=r"tiny-ida.safetensors: SHA-256 mismatch.*downloaded from file://"):
        weights_path("tiny-ida", cache_dir=tmp_path / "cache", mirror=served.as_uri())
    assert not list((tmp_path / "cache" / "weights").iterdir())


def test_unreachable_url_says_how_to_work_offline(exported, tmp_path, monkeypatch):
    root, _, _ = exported
    monkeypatch.setattr(pt, "WEIGHTS_DIR", root / "web")
    with pytest.raises(ConnectionError, match="Copy the file into .*weights by hand"):
        weights_path("tiny-ida", cache_dir=tmp_path / "cache", mirror=(tmp_path / "no").as_uri())


def test_a_local_copy_is_accepted_only_when_it_is_the_published_file(exported, tmp_path, monkeypatch):
    root, _, rec = exported
    monkeypatch.setattr(pt, "WEIGHTS_DIR", root / "web")
    good = tmp_path / "copy.safetensors"
    good.write_bytes((root / "served" / rec.file).read_bytes())
    model = create_model("ida_capsnet", pretrained=str(good))
    assert isinstance(model, torchcaps.CapsuleModel)
    bad = tmp_path / "other.safetensors"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ChecksumError, match=r"other.safetensors is not the published tiny-ida weights"):
        create_model("ida_capsnet", pretrained=str(bad))


def test_arguments_that_change_the_weights_are_refused(exported, monkeypatch):
    root, _, _ = exported
    monkeypatch.setattr(pt, "WEIGHTS_DIR", root / "ship")
    changed = r"do not fit.*arguments changed from the record: \['num_classes'\]"
    with pytest.raises(PretrainedError, match=changed):
        create_model("ida_capsnet", pretrained=True, num_classes=5)
    with pytest.raises(PretrainedError, match="are for model 'ida_capsnet', not 'capsnet'"):
        create_model("capsnet", pretrained="tiny-ida")


def test_a_record_with_unknown_fields_or_another_format_is_refused(exported, tmp_path, monkeypatch):
    root, rec, _ = exported
    meta = dataclasses.asdict(rec)
    (tmp_path / "x.json").write_text(json.dumps({**meta, "extra": 1}))
    monkeypatch.setattr(pt, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(PretrainedError, match=r"unknown record fields \['extra'\]"):
        list_pretrained()
    (tmp_path / "x.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(PretrainedError, match="not a torchcaps-pretrained file"):
        list_pretrained()


# ------------------------------------------------------------------ the command line


def test_cli_lists_gets_checks_and_evaluates(exported, tmp_path, monkeypatch, capsys):
    root, rec, _ = exported
    monkeypatch.setattr(pt, "WEIGHTS_DIR", root / "ship")
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-ida" in out and "shipped" in out and rec.sha256[:12] in out
    assert main(["weights", "check"]) == 0
    assert "tiny-ida: mnist-mini test" in capsys.readouterr().out
    assert main(["weights", "get", "tiny-ida"]) == 0
    assert capsys.readouterr().out.strip() == str(root / "ship" / rec.file)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "pretrained:tiny-ida", "--no-plots", "--json", "e.json"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["accuracy"] == pytest.approx(rec.accuracy["test"], abs=1e-9)


def test_cli_export_refuses_a_published_file_without_its_url(exported, tmp_path, capsys):
    root, _, _ = exported
    with pytest.raises(SystemExit):
        main(["weights", "export", str(root / "run" / "best")])  # --name, --command required
    assert main(["weights", "export", str(root / "run" / "best"), "--name", "x", "--command", "c",
                 "--no-ship", "--out", str(tmp_path)]) == 2
    assert "need the url they are published at" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_weights_folder_holds_records_and_their_files_only():
    for p in Path(pt.WEIGHTS_DIR).iterdir():
        assert p.suffix in (".json", ".safetensors"), p.name
        if p.suffix == ".safetensors":
            assert (p.with_suffix(".json")).is_file(), f"{p.name} has no record"


def test_capsnet_weights_are_published_not_shipped_and_checked_when_named(tmp_path):
    rec = get_pretrained("capsnet")
    assert rec.name == "capsnet-mnist" and not rec.shipped and rec.bytes > 20e6
    assert rec.url.endswith("/" + rec.file)
    fake = tmp_path / rec.file
    fake.write_bytes(b"\0" * 1000)
    with pytest.raises(ChecksumError, match=f"is not the published capsnet-mnist weights.*{rec.sha256}"):
        create_model("capsnet", pretrained=str(fake))
    # offline, with nothing cached: one error naming the file, the URL and the way out
    with pytest.raises(ConnectionError, match=r"could not download capsnet-mnist.safetensors.*by hand"):
        weights_path(rec, cache_dir=tmp_path / "cache", mirror=(tmp_path / "nowhere").as_uri())
