"""Save on stop: a stopping pod, or `kubetune run` on Ctrl-C, asks the trainer to
finish the step in flight and commit a checkpoint there, then waits for it.

Everything goes through files in one folder on the machine's own disk (in a pod,
``/tmp/kubetune-stop`` on the pod's ``/tmp`` volume; `kubetune run` makes a folder
of its own per run and passes it to the ranks):

- ``request``: written by whoever asks: the pod's preStop hook
  (``python -m kubetune_trainer.stop --wait S``) or `kubetune run`'s first Ctrl-C.
- ``running-<pid>``: each trainer rank and the driver, while they run.
- ``saved-<pid>``: a rank, once the checkpoint it saved on the request is committed.

Every rank looks for a ``request`` newer than its own start after each step, and
the ranks agree through one all-reduce: a request seen on any pod stops every rank
at the same step, so deleting one worker pod (a drain, a preemption) saves the
whole job. The hook returns when every live process with a ``running-`` file has
a ``saved-`` file or has exited (the driver exits once the ranks have stopped), or
when its wait is over; then the kubelet sends SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

DEFAULT_DIR = "/tmp/kubetune-stop"
REQUEST = "request"
STAMP_SLACK = 0.05  # seconds: the coarse clock behind file times, with room


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class StopFiles:
    def __init__(self, directory: Optional[str | Path] = None):
        self.dir = Path(directory or DEFAULT_DIR)

    # ------------------------------------------------------------------ asking
    def request(self, reason: str) -> None:
        """Ask (again: a newer request replaces an older one)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / REQUEST
        tmp = self.dir / f".{REQUEST}.{os.getpid()}"
        tmp.write_text(json.dumps({"reason": reason, "time": time.time()}) + "\n")
        os.replace(tmp, path)

    def requested_since(self, start: float) -> bool:
        """A request written after `start` (a process's own start: an older one
        belongs to a run this folder saw before)."""
        # A file's mtime comes from the kernel's coarse clock, which runs up to a
        # tick (at most 10 ms) behind time.time(): a request written just after
        # `start` can carry an earlier mtime. A previous run's request is seconds
        # older than a new process's start.
        try:
            return (self.dir / REQUEST).stat().st_mtime >= start - STAMP_SLACK
        except OSError:
            return False

    # ------------------------------------------------------------------ the trainer's side
    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Marks this process as one a stop waits for, while the block runs."""
        pid = os.getpid()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / f"running-{pid}").write_text("")
        except OSError:
            pass  # no marker: a stop just does not wait for this process
        try:
            yield
        finally:
            (self.dir / f"running-{pid}").unlink(missing_ok=True)

    def saved(self, step: int) -> None:
        (self.dir / f"saved-{os.getpid()}").write_text(f"{step}\n")

    def saved_steps(self) -> list[int]:
        return sorted(int(p.read_text()) for p in self.dir.glob("saved-*"))

    # ------------------------------------------------------------------ the waiting side
    def pending(self) -> list[int]:
        """Live processes marked running that have not saved yet."""
        out = []
        for marker in self.dir.glob("running-*"):
            pid = int(marker.name.split("-", 1)[1])
            if _alive(pid) and not (self.dir / f"saved-{pid}").exists():
                out.append(pid)
        return sorted(out)

    def wait(self, timeout: float, poll: float = 0.5) -> bool:
        """True once nothing is pending; False when `timeout` ran out first."""
        deadline = time.monotonic() + timeout
        while self.pending():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kubetune_trainer.stop",
        description="Ask this machine's trainer processes to commit a checkpoint at the end "
        "of the step in flight, and wait until they have (a pod's preStop hook).",
    )
    p.add_argument("--wait", type=float, default=110.0, help="seconds to wait at most")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"the stop folder (default {DEFAULT_DIR})")
    p.add_argument("--reason", default="the pod is stopping")
    args = p.parse_args(argv)
    files = StopFiles(args.dir)
    t0 = time.monotonic()
    files.request(args.reason)
    done = files.wait(args.wait)
    took = time.monotonic() - t0
    saved = files.saved_steps()
    if done:
        at = f"checkpoint step {saved[-1]} committed" if saved else "nothing was training"
        print(f"kubetune stop: {at} ({took:.0f}s)", flush=True)
    else:
        print(f"kubetune stop: no checkpoint within {args.wait:.0f}s; stopping anyway", flush=True)
    return 0  # a hook that fails only adds an event: the pod stops either way


if __name__ == "__main__":
    raise SystemExit(main())
