"""Starting and stopping server processes, ports, waiting."""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

LOOPBACK = "127.0.0.1"

_live: list["Server"] = []


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child: SIGKILL it if the Python process that started it dies
    # (even by SIGKILL), so a crashed test run leaves no servers behind.
    # Also a new session, so stop() can signal the whole process group.
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def tail(path: Path, lines: int = 60) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class ServerError(RuntimeError):
    pass


class Server:
    """One server process, its log file, and how to stop it."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.args = [str(a) for a in args]
        self.log = Path(log_dir) / f"{name}.log"
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.env or {})
        with open(self.log, "ab") as logf:
            logf.write(("$ " + " ".join(self.args) + "\n").encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                preexec_fn=_die_with_parent,
            )
        _live.append(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log, lines)

    def wait_ready(self, probe: Callable[[], bool], timeout: float, what: str = "ready") -> None:
        """Polls probe() until it returns True; fails early if the process exits."""
        deadline = time.monotonic() + timeout
        last_exc: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(
                    f"{self.name} exited with code {self.proc.returncode if self.proc else None} "
                    f"before it was {what}; log {self.log}:\n{self.log_tail()}"
                )
            try:
                if probe():
                    return
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last_exc = exc
            time.sleep(0.1)
        raise ServerError(
            f"{self.name} was not {what} after {timeout:.0f}s (last error: {last_exc!r}); "
            f"log {self.log}:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process group, then SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Anything left in the group (the server's own children) gets SIGKILL.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self in _live:
            _live.remove(self)


def stop_all() -> None:
    for server in reversed(list(_live)):
        server.stop(grace=5.0)


atexit.register(stop_all)


def wait_until(cond: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"):
    """Returns cond()'s first truthy value; raises TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message carries the command's output."""

    def __str__(self) -> str:
        return (f"{super().__str__()}\n--- stdout ---\n{(self.stdout or '')[-4000:]}"
                f"\n--- stderr ---\n{(self.stderr or '')[-4000:]}")


def run(args: Sequence[str], env: dict[str, str] | None = None, check: bool = True,
        input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs a command, capturing text output; a failure shows both streams."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([str(a) for a in args], env=full_env, input=input, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc
