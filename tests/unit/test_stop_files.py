"""Save on stop, the files between whoever asks and the ranks (kubetune_trainer.stop),
and the pods' hook and grace period (kubetune_operator.children)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from kubetune_operator.children import STOP_HOOK, stop_grace
from kubetune_trainer.stop import StopFiles, main


def test_a_request_counts_only_for_processes_started_before_it(tmp_path):
    files = StopFiles(tmp_path / "stop")
    start = time.time()
    assert not files.requested_since(start)  # no folder yet
    files.request("SIGTERM")
    assert files.requested_since(start)
    old = time.time() - 3600
    os.utime(files.dir / "request", (old, old))  # a request a previous run saw
    assert not files.requested_since(start)
    files.request("again")  # a new one replaces it
    assert files.requested_since(start)


def test_a_request_stamped_a_clock_tick_before_the_start_still_counts(tmp_path):
    """File times come from the kernel's coarse clock, up to a tick (10 ms)
    behind time.time(): a request written right after a start can carry an
    earlier time (seen once in CI, under load)."""
    files = StopFiles(tmp_path / "stop")
    start = time.time()
    files.request("SIGTERM")
    tick_behind = start - 0.01
    os.utime(files.dir / "request", (tick_behind, tick_behind))
    assert files.requested_since(start)
    a_second_before = start - 1
    os.utime(files.dir / "request", (a_second_before, a_second_before))
    assert not files.requested_since(start)


def test_pending_is_the_live_runners_that_have_not_saved(tmp_path):
    files = StopFiles(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (tmp_path / f"running-{sleeper.pid}").write_text("")
        (tmp_path / f"running-{dead.pid}").write_text("")  # exited without saving
        assert files.pending() == [sleeper.pid]
        (tmp_path / f"saved-{sleeper.pid}").write_text("7\n")
        assert files.pending() == []
        assert files.saved_steps() == [7]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_running_marks_this_process_until_the_block_ends(tmp_path):
    files = StopFiles(tmp_path / "stop")
    with files.running():
        assert files.pending() == [os.getpid()]
        assert not files.wait(0.3, poll=0.05)  # nobody saved: the wait runs out
        threading.Timer(0.2, files.saved, args=(12,)).start()
        t0 = time.monotonic()
        assert files.wait(10, poll=0.05)
        assert time.monotonic() - t0 < 5
    assert not list(files.dir.glob("running-*"))


def test_the_hook_asks_and_returns_at_once_when_nothing_trains(tmp_path, capsys):
    t0 = time.monotonic()
    assert main(["--dir", str(tmp_path), "--wait", "30"]) == 0
    assert time.monotonic() - t0 < 5
    assert (tmp_path / "request").exists()
    assert "nothing was training" in capsys.readouterr().out


def test_the_hook_gives_up_after_its_wait_and_still_exits_0(tmp_path, capsys):
    (tmp_path / f"running-{os.getpid()}").write_text("")
    assert main(["--dir", str(tmp_path), "--wait", "0.5"]) == 0
    assert "no checkpoint within 0s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec, grace",
    [
        ({}, 120),
        ({"checkpointing": {"terminationGracePeriodSeconds": 600}}, 600),
        ({"checkpointing": {"saveOnStop": False}}, None),
        ({"sweep": {"trials": 2}}, None),
    ],
)
def test_pods_save_on_stop_unless_turned_off_or_a_sweep(spec, grace):
    assert stop_grace(spec) == grace


def test_the_hook_is_the_trainer_module_that_exists():
    # the command the pods run: this module, with this argument
    assert STOP_HOOK[:3] == ("python", "-m", "kubetune_trainer.stop")
    out = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.stop", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and STOP_HOOK[3] in out.stdout, out
