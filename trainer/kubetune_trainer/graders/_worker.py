"""One python grader's worker process (started by kubetune_trainer.graders.python).

Run as a script by a fresh interpreter (`python -I _worker.py MEMORY_MIB`), so it
imports only the standard library before the user's code. It limits itself, in
this order, before it reads that code:

1. memory: RLIMIT_AS (address space) of MEMORY_MIB; an allocation past it raises
   MemoryError in the user's code, or ends the process;
2. network: a new user namespace with a new, empty network namespace
   (unshare(CLONE_NEWUSER | CLONE_NEWNET)): no interface but a downed loopback,
   so no connection can be made, by Python or native code. Where the kernel or the
   pod's seccomp profile refuses unprivileged namespaces, an audit hook refuses
   socket creation, connections, name lookups, subprocesses, exec/spawn/fork and
   ctypes instead: Python-level code only (native extensions can get past it).

The protocol: one JSON object per line. In: {"source": ...}, then
{"sample": ..., "item": ...} per sample. Out: {"ready": true, "isolation": ...}
or {"error": ...} after loading; {"score": float} or {"error": ...} per sample.
The protocol uses private copies of stdin/stdout: the user's prints go to stderr.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

_REFUSED = (
    "socket.__new__",
    "socket.connect",
    "socket.bind",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.sendto",
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "pty.spawn",
    "ctypes.dlopen",
    "ctypes.dlsym",
    "ctypes.call_function",
)


def _new_network_namespace() -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


def _refuse(event: str, args) -> None:
    if event in _REFUSED:
        raise PermissionError(f"a python grader has no network or subprocesses ({event})")


def _limit(memory_mib: int) -> str:
    limit = memory_mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.environ.get("KUBETUNE_GRADER_NO_NETNS") != "1" and _new_network_namespace():
        return "network-namespace"
    sys.addaudithook(_refuse)  # cannot be removed, even by the user's code
    return "audit-hook"


def main() -> None:
    memory_mib = int(sys.argv[1])
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # the user's prints never reach the protocol

    def send(obj: dict) -> None:
        proto_out.write(json.dumps(obj).encode() + b"\n")
        proto_out.flush()

    try:
        isolation = _limit(memory_mib)
    except (OSError, ValueError) as exc:
        send({"error": f"cannot limit the grader process: {exc}"})
        return
    first = proto_in.readline()
    if not first:
        return
    try:
        namespace: dict = {"__name__": "kubetune_grader"}
        exec(compile(json.loads(first)["source"], "grader.py", "exec"), namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            raise NameError("the source defines no function grade(sample, item)")
    except BaseException as exc:  # noqa: BLE001 - anything the user's module does
        send({"error": _describe(exc)})
        return
    send({"ready": True, "isolation": isolation})
    for line in proto_in:
        try:
            request = json.loads(line)
            score = float(grade(request["sample"], request["item"]))
            if score != score or score in (float("inf"), float("-inf")):
                raise ValueError(f"grade returned {score}, not a finite number")
            send({"score": score})
        except MemoryError:
            send({"error": "MemoryError: the grader went over memoryMiB", "memory": True})
            return  # a fresh process for the next sample
        except BaseException as exc:  # noqa: BLE001
            send({"error": _describe(exc)})


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (line {last[0].lineno})" if last and last[0].filename == "grader.py" else ""
    return f"{type(exc).__name__}: {exc}"[:300] + where


if __name__ == "__main__":
    main()
