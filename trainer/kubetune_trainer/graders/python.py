"""Python graders: the user's grade(sample, item) in worker processes (see _worker.py).

Workers are reused between samples and calls; one that runs out of time is
killed (SIGKILL, with its process group) and replaced on its next sample, as
is one that died or ran out of memory. A sample's score is 0 when its grader
raised, ran over memoryMiB (both counted as errors) or over timeoutSeconds
(counted as a timeout); the training job never sees the exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

WORKER = str(Path(__file__).with_name("_worker.py"))
# Starting an interpreter and loading the user's module: allowed on top of the
# first sample's timeout, so a slow disk is not taken for a hanging grader.
START_SECONDS = 20.0

OK, ERROR, TIMEOUT = "ok", "error", "timeout"


class _Worker:
    def __init__(self, source: str, memory_mib: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", WORKER, str(memory_mib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a kill takes its children too
            close_fds=True,
        )
        self.buffer = b""
        self.isolation: Optional[str] = None
        self._send({"source": source})

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj, default=str).encode() + b"\n")
        self.proc.stdin.flush()

    def _receive(self, deadline: float) -> Optional[dict]:
        """The next message, or None when the deadline passed first."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("the grader process ended")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def start(self, deadline: float) -> Optional[dict]:
        reply = self._receive(deadline)
        if reply is not None and reply.get("ready"):
            self.isolation = reply["isolation"]
        return reply

    def grade(self, sample: dict, item: dict, deadline: float) -> Optional[dict]:
        self._send({"sample": sample, "item": item})
        return self._receive(deadline)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()


class PythonGrader:
    """One python grader: a pool of up to max_concurrency worker processes."""

    def __init__(self, name: str, source: str, timeout: float, memory_mib: int, workers: int):
        self.name = name
        self.source = source
        self.timeout = timeout
        self.memory_mib = memory_mib
        self.slots: list[Optional[_Worker]] = [None] * workers
        self.broken: Optional[str] = None  # the source failed to load: every sample errors
        self.isolation: Optional[str] = None
        self.last_error: Optional[str] = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"grader-{name}")

    def _call(self, slot: int, sample: dict, item: dict) -> tuple[float, str]:
        if self.broken:
            return 0.0, ERROR
        start = time.monotonic()
        worker = self.slots[slot]
        try:
            if worker is None:
                worker = self.slots[slot] = _Worker(self.source, self.memory_mib)
                ready = worker.start(start + START_SECONDS + self.timeout)
                if ready is None:  # the module itself hangs: so would every sample
                    with self._lock:
                        self.broken = "loading the source ran over its time"
                    return self._drop(slot, TIMEOUT, self.broken)
                if not ready.get("ready"):
                    with self._lock:
                        self.broken = ready.get("error", "did not start")
                    return self._drop(slot, ERROR, self.broken)
                self.isolation = worker.isolation
                start = time.monotonic()  # the sample's own time starts now
            reply = worker.grade(sample, item, start + self.timeout)
        except (EOFError, OSError, ValueError) as exc:  # died, e.g. killed by the kernel
            return self._drop(slot, ERROR, f"the grader process ended: {exc}")
        if reply is None:
            return self._drop(slot, TIMEOUT, f"ran over timeoutSeconds ({self.timeout:g})")
        if "score" in reply:
            return reply["score"], OK
        self.last_error = reply.get("error")
        if reply.get("memory"):
            self._drop(slot, ERROR, self.last_error)
        return 0.0, ERROR

    def _drop(self, slot: int, kind: str, message: str) -> tuple[float, str]:
        worker, self.slots[slot] = self.slots[slot], None
        if worker is not None:
            worker.kill()
        self.last_error = message
        return 0.0, kind

    def score(self, samples: list[dict], items: list[dict]) -> list[tuple[float, str]]:
        """(score, ok|error|timeout) per sample; each sample takes at most timeoutSeconds
        (plus START_SECONDS for a worker started for it)."""
        pending = list(range(len(samples)))
        out: list[tuple[float, str]] = [(0.0, ERROR)] * len(samples)
        lock = threading.Lock()

        def run(slot: int) -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    i = pending.pop(0)
                out[i] = self._call(slot, samples[i], items[i])

        futures = [self._pool.submit(run, s) for s in range(min(len(self.slots), len(samples)))]
        for f in futures:
            f.result()
        return out

    def close(self) -> None:
        for slot in range(len(self.slots)):
            worker, self.slots[slot] = self.slots[slot], None
            if worker is not None:
                worker.kill()
        self._pool.shutdown(wait=False)
