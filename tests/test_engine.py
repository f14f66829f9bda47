"""The training engine: the same guarantees for every task (classification, affNIST, MultiMNIST)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load as st_load

from torchcaps.train import (
    CheckpointError,
    NonFiniteError,
    RunExistsError,
    RunLock,
    RunLockedError,
    TrainConfig,
    Trainer,
    create_optimizer,
    load_checkpoint,
    rank_share,
)

# Builds one small job of each task; shared with the subprocess of the SIGKILL test.
MAKE_TASK = textwrap.dedent('''
    from torchcaps.evaluation.suites import AffnistTask, MultiMNISTTask, build_affnist_data
    from torchcaps.train import ClassificationTask, TrainConfig

    def make(kind, out, **kw):
        base = dict(out=None if out is None else str(out), batch_size=16, progress=False, threads=1, epochs=1)
        if kind == "classification":
            task = ClassificationTask()
            kw = {"model_kwargs": {"conv_channels": 16, "primary_types": 4}, **kw}
        elif kind == "affnist":
            task = AffnistTask(*build_affnist_data("mnist-mini", affine_size=32), target=0.999,
                               stop_on="test")
            kw = {"model_kwargs": {"conv_channels": 16, "primary_types": 4}, "max_shift": 6, **kw}
        else:
            task = MultiMNISTTask("mnist-mini", None, "cnn_baseline",
                                  {"conv_channels": [8, 8, 4], "hidden": [16, 8]},
                                  train_pairs=160, val_pairs=32, test_pairs=32, test_seed=0)
            kw = {"model": "cnn_baseline", **kw}
        return task, TrainConfig(**{**base, **kw})
''')
namespace: dict = {}
exec(MAKE_TASK, namespace)
make = namespace["make"]
TASKS = ["classification", "affnist", "multimnist"]


def _tensors(run, name="last"):
    meta, tensors = load_checkpoint(run / name)
    return meta, {k: v for k, v in tensors.items() if k.startswith(("model.", "optim.", "rng."))}


def _fit(kind, out, resume=False, **kw):
    task, cfg = make(kind, out, **kw)
    t = Trainer(task, cfg)
    if resume:
        t.resume()
    return t, t.fit()


# ------------------------------------------------------------------ every task
@pytest.mark.parametrize("kind", TASKS)
def test_sigkill_then_resume_is_bitwise_for_every_task(tmp_path, kind):
    _fit(kind, tmp_path / "ref", max_steps=6)
    run = tmp_path / "killed"
    script = MAKE_TASK + textwrap.dedent(f'''
        import os, signal, torch
        from torchcaps.train import Trainer
        torch.set_num_threads(1)
        task, cfg = make({kind!r}, {str(run)!r}, max_steps=6, checkpoint_every=1)
        t = Trainer(task, cfg)
        save = t.save
        def save_then_die(name):
            save(name)
            if t.step == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill, right after a checkpoint
        t.save = save_then_die
        t.fit()
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(run / "last")[0]["step"] == 3
    torch.set_num_threads(1)
    _fit(kind, run, resume=True, max_steps=6)
    (ma, a), (mb, b) = _tensors(tmp_path / "ref"), _tensors(run)
    assert mb["step"] == 6 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h.get("val_accuracy", h.get("val_top2_accuracy")) for h in ma["history"]] == \
           [h.get("val_accuracy", h.get("val_top2_accuracy")) for h in mb["history"]]


@pytest.mark.parametrize("kind", TASKS)
def test_nan_stops_or_skips_for_every_task(tmp_path, kind):
    task, cfg = make(kind, tmp_path / "stop", max_steps=4, checkpoint_every=1)
    t = Trainer(task, cfg)
    p = next(t.module.parameters())
    p.register_hook(lambda g: g * float("nan") if t.step == 2 else g)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm .* at step 3 .*last.json"):
        t.fit()
    assert load_checkpoint(tmp_path / "stop" / "last")[0]["step"] == 2
    assert not (tmp_path / "stop" / ".lock").exists()
    task, cfg = make(kind, tmp_path / "skip", max_steps=4, nonfinite="skip")
    t = Trainer(task, cfg)
    next(t.module.parameters()).register_hook(lambda g: g * float("nan") if t.step == 2 else g)
    summary = t.fit()
    assert summary["skipped_batches"] == 1 and summary["steps"] == 4
    assert all(torch.isfinite(q).all() for q in t.module.parameters())


@pytest.mark.parametrize("kind", TASKS)
def test_lock_and_disk_full_for_every_task(tmp_path, kind, monkeypatch):
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        task, cfg = make(kind, tmp_path / "run", max_steps=1)
        with pytest.raises(RunLockedError, match="in use"):
            Trainer(task, cfg).fit()
    t, _ = _fit(kind, tmp_path / "run", max_steps=1)
    before = _tensors(tmp_path / "run")[1]
    import torchcaps.train.checkpoint as ck

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", full)
    t.step += 1
    with pytest.raises(OSError, match="No space left on device.*intact"):
        t.save("last")
    monkeypatch.undo()
    after = _tensors(tmp_path / "run")[1]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ engine behaviour
def test_nan_born_inside_the_network_follows_the_policy(tmp_path):
    """A layer's input check firing mid-network is a non-finite step, not a crash."""
    def poison(t):
        t.module.primary.register_forward_pre_hook(
            lambda m, args: (args[0] * float("nan"),) if t.module.training and t.step == 1 else None)

    task, cfg = make("classification", tmp_path / "a", max_steps=3, checkpoint_every=1)
    t = Trainer(task, cfg)
    poison(t)
    with pytest.raises(NonFiniteError, match=r"non-finite activation \(PrimaryCaps input contains "
                                             r"non-finite values .*\) at step 2 .*last.json"):
        t.fit()
    task, cfg = make("classification", tmp_path / "b", max_steps=3, nonfinite="skip")
    t = Trainer(task, cfg)
    poison(t)
    assert t.fit()["skipped_batches"] == 1


def test_an_earlier_run_is_never_overwritten_silently(tmp_path):
    _fit("classification", tmp_path / "run", max_steps=1)
    with pytest.raises(RunExistsError, match=r"already holds a capsnet run at step 1 .*--resume.*"
                                             r"another --out.*--overwrite"):
        _fit("classification", tmp_path / "run", max_steps=2)
    assert load_checkpoint(tmp_path / "run" / "last")[0]["step"] == 1  # untouched
    _, s = _fit("classification", tmp_path / "run", max_steps=2, overwrite=True)
    assert s["steps"] == 2 and load_checkpoint(tmp_path / "run" / "best")[0]["step"] == 2


def test_resume_refuses_settings_that_cannot_change(tmp_path):
    _fit("classification", tmp_path / "run", max_steps=1)
    with pytest.raises(CheckpointError, match=r"batch_size=16, not 8.*cannot change mid-run"):
        _fit("classification", tmp_path / "run", resume=True, max_steps=2, batch_size=8)
    t, s = _fit("classification", tmp_path / "run", resume=True, max_steps=2, nonfinite="skip")
    assert s["steps"] == 2


def test_optimizer_by_name_and_early_stopping(tmp_path, capsys):
    net = torch.nn.Linear(2, 2)
    assert isinstance(create_optimizer("SGD", net.parameters(), 0.1, {"momentum": 0.9}),
                      torch.optim.SGD)
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'.*adamw"):
        create_optimizer("adamm", net.parameters(), 0.1)
    with pytest.raises(ValueError, match="does not accept"):
        create_optimizer("adam", net.parameters(), 0.1, {"momentum": 0.9})
    # an optimizer that cannot move (lr tiny, SGD) never improves: patience 1 stops the run
    t, s = _fit("classification", tmp_path / "run", max_steps=None, epochs=5, optimizer="sgd",
                lr=1e-12, patience=1, model_kwargs={"conv_channels": 8, "primary_types": 2},
                val_size=200, batch_size=2000)
    assert len(t.history) == 2 and s["best"]["epoch"] == 1
    assert "no improvement for 1 evaluations: stop" in capsys.readouterr().err
    meta = load_checkpoint(tmp_path / "run" / "last")[0]
    assert meta["config"]["optimizer"] == "sgd" and meta["stopped"]


def test_in_memory_run_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task, cfg = make("classification", None, max_steps=2, log_every=1)
    t = Trainer(task, cfg)
    s = t.fit()
    assert s["steps"] == 2 and s["checkpoint"] is None and not list(tmp_path.iterdir())
    assert [r["step"] for r in t.step_log] == [1, 2]


def test_rank_shares_cover_every_example_once():
    task, cfg = make("classification", None, batch_size=7)
    task.setup(cfg, torch.device("cpu"))
    n = len(task.data.train)
    for world in (1, 2, 3):
        seen = []
        for pos in range(task.num_batches()):
            idx = task.order(0)[pos * 7:(pos + 1) * 7]
            for rank in range(world):
                lo, hi = rank_share(len(idx), rank, world)
                seen += idx[lo:hi].tolist()
        assert sorted(seen) == list(range(n))  # every example once, none twice


def test_library_leaves_the_process_alone(tmp_path):
    code = textwrap.dedent('''
        import sys, torch
        threads = torch.get_num_threads()
        import torchcaps, torchcaps.train, torchcaps.viz, torchcaps.evaluation, torchcaps.testing
        from torchcaps.train import ClassificationTask, Trainer, TrainConfig
        Trainer(ClassificationTask(), TrainConfig(out=None, threads=1, deterministic=True,
                                                   model_kwargs={"conv_channels": 8}))
        assert torch.get_num_threads() == threads
        assert not torch.are_deterministic_algorithms_enabled()
        assert "pytest" not in sys.modules and "matplotlib.pyplot" not in sys.modules
        print("ok")
    ''')
    env = {**os.environ, "MPLBACKEND": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_checkpoint_layout_is_readable_without_torchcaps(tmp_path):
    _fit("classification", tmp_path / "run", max_steps=1)
    meta = json.loads((tmp_path / "run" / "last.json").read_text())
    assert meta["task"] == "ClassificationTask" and meta["step"] == 1
    blob = (tmp_path / "run" / meta["weights_file"]).read_bytes()
    assert any(k.startswith("model.") for k in st_load(blob))


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"seed=1180591620717411303424 \(seeds are integers"):
        TrainConfig(seed=2**70)
    with pytest.raises(ValueError, match=r"lr=1e\+38 \(the learning rate must be a finite"):
        TrainConfig(lr=1e38)
    with pytest.raises(ValueError, match="max_shift=1000 would move 28x28 images off the canvas; "
                                         "use at most 13 pixels"):
        Trainer(*make("classification", tmp_path / "a", max_shift=1000))
    with pytest.raises(ValueError, match="num_classes=5 but mnist-mini has 10 classes"):
        Trainer(*make("classification", tmp_path / "b", model_kwargs={"num_classes": 5}))
    assert not list(tmp_path.iterdir())
