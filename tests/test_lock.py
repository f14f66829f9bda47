"""RunLock: one holder at a time under a crowd of processes; dead holders release it."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

import torchcaps.train.lock as lock_module
from torchcaps.train.lock import RunLock, RunLockedError

# Workers load lock.py by path (it needs only the standard library), so that sixteen of
# them start in well under a second instead of each importing torch.
_LOAD = textwrap.dedent(f"""
    import importlib.util, os, random, signal, sys, time
    spec = importlib.util.spec_from_file_location("lock", {lock_module.__file__!r})
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
""")

_CONTEND = _LOAD + textwrap.dedent("""
    run, go, needed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    while not os.path.exists(go):  # start together
        time.sleep(0.0005)
    wins = refusals = 0
    deadline = time.time() + 40
    while wins < needed and time.time() < deadline:  # keep trying until won `needed` times
        try:
            with lock.RunLock(run):
                # a second holder would find this file and die with FileExistsError
                fd = os.open(os.path.join(run, "holder"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                time.sleep(0.002)
                os.close(fd)
                os.unlink(os.path.join(run, "holder"))
                wins += 1
        except lock.RunLockedError:
            refusals += 1
        time.sleep(random.random() * 0.002)
    print(wins, refusals)
""")


def test_sixteen_processes_never_hold_the_lock_together(tmp_path):
    run, go = tmp_path / "run", tmp_path / "go"
    run.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _CONTEND, str(run), str(go), "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(16)]
    time.sleep(0.3)  # let them all reach the start line
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    wins = sum(int(out.split()[0]) for out, _ in results)
    refusals = sum(int(out.split()[1]) for out, _ in results)
    assert wins == 16 * 3 and refusals > 0  # every process held it, and it was contended
    assert not (run / ".lock").exists() and not (run / "holder").exists()


def test_a_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    hold = _LOAD + textwrap.dedent("""
        with lock.RunLock(sys.argv[1]):
            print("held", flush=True)
            if sys.stdin.readline().strip() == "die":
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    for ending in ("leave", "die"):
        child = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"{run} is in use .*\(pid {child.pid}\).*--out"):
            with RunLock(run):
                pass
        child.stdin.write(ending + "\n")
        child.stdin.close()
        child.wait(timeout=30)
        assert (run / ".lock").exists() == (ending == "die")  # a killed holder leaves its file
        with RunLock(run):
            assert (run / ".lock").read_text() == f"{os.getpid()}\n"
        assert not (run / ".lock").exists()


def test_the_same_process_cannot_take_it_twice(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released on exit
        pass
