"""Stage once per job: the driver (kubetune_trainer.stager) fetches the model, a
parent's outputs and the data into a volume that every pod of the job mounts (spec.staging, or the
operator's default claim); the workers read them from there and never fetch
them from object storage.

The operator sets KUBETUNE_STAGE_DIR (`<mount>/<namespace>/<job uid>/<attempt>`) on the
head, where the claim is writable, and on the workers, where it is mounted
read-only. Without it nothing changes: each process fetches for itself
(model.resolve_model_path's per-node cache).

Layout of the stage folder (one attempt's; the next attempt's driver removes it
if it is still there, and the driver removes its own when it exits):

    manifest.json      {"entries": {uri: {"dir", "file", "files": {rel: sha256}}},
                        "parent": {"target", "record", "runRecord"}}
    .complete          written last: the workers wait for it
    <sha16 of uri>/    one fetched folder, or the folder of one fetched file

A worker verifies the sha256 of every file it is given against the manifest; a
mismatch fails the attempt with a message naming the file (the retry stages
again), it is never fetched again by the worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

STAGE_ENV = "KUBETUNE_STAGE_DIR"
TIMEOUT_ENV = "KUBETUNE_STAGE_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT = 600.0
MANIFEST = "manifest.json"
COMPLETE = ".complete"
CHUNK = 1 << 20


class StagingError(RuntimeError):
    """The staged copy cannot be used; the message says what and where."""


def stage_dir(environ=None) -> Optional[Path]:
    environ = os.environ if environ is None else environ
    value = environ.get(STAGE_ENV)
    return Path(value) if value else None


def remote(uri: Optional[str]) -> bool:
    """Object-store URIs are staged; local paths and Hugging Face names are not."""
    return bool(uri) and "://" in uri and not uri.startswith("file://")


def key(uri: str) -> str:
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def clean(environ=None) -> None:
    """The driver's last step: its attempt's stage goes (the next attempt stages
    afresh), and the job's folder with it once no attempt has one there."""
    root = stage_dir(environ)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):  # another attempt's is there, or it is gone
            root.parent.rmdir()


# ---------------------------------------------------------------- every process

_verified: dict[tuple[str, str], str] = {}  # (stage, uri) -> the checked copy


def mark_verified(root: Path, uri: str, path: Path) -> None:
    """`path` holds `uri`'s staged copy as the manifest hashes it (the stager just did)."""
    _verified[(str(root), uri.rstrip("/"))] = str(path)


def _manifest(root: Path, environ=None) -> dict:
    environ = os.environ if environ is None else environ
    timeout = float(environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    deadline = time.monotonic() + timeout
    while not (root / COMPLETE).exists():
        if time.monotonic() > deadline:
            raise StagingError(
                f"staging: {root} is not complete after {timeout:.0f}s (no {COMPLETE}): the "
                "driver on the Ray head stages the model and data there before the workers "
                "start; see the head's log (raise the wait with "
                f"{TIMEOUT_ENV})"
            )
        time.sleep(0.5)
    return json.loads((root / MANIFEST).read_text())


def local(uri: Optional[str], environ=None) -> Optional[str]:
    """The staged copy of `uri` (a folder, or the one file), its hashes checked
    once per process; None when there is no stage, `uri` is not an object-store URI
    or the driver did not stage it (the caller fetches it itself then)."""
    root = stage_dir(environ)
    if root is None or not remote(uri):
        return None
    uri = uri.rstrip("/")
    if (str(root), uri) in _verified:
        return _verified[(str(root), uri)]
    entry = _manifest(root, environ)["entries"].get(uri)
    if entry is None:  # not one the driver stages: fetched as without a stage
        return None
    folder = root / entry["dir"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if present != set(entry["files"]):
        raise StagingError(
            f"staging: {folder} holds other files than the manifest names for {uri} "
            f"(missing {sorted(set(entry['files']) - present)[:5]}, extra "
            f"{sorted(present - set(entry['files']))[:5]}); the attempt fails, the retry "
            "stages again"
        )
    for rel, want in entry["files"].items():
        got = sha256_file(folder / rel)
        if got != want:
            raise StagingError(
                f"staging: {folder / rel} (from {uri}) has sha256 {got}, the manifest says "
                f"{want}: the shared volume changed it; the attempt fails, the retry stages again"
            )
    path = str(folder / entry["file"]) if entry["file"] else str(folder)
    _verified[(str(root), uri)] = path
    return path


def parent_location(environ=None) -> Optional[dict]:
    """parent.locate's answer as the driver found it: {"target", "record", "runRecord"}."""
    root = stage_dir(environ)
    if root is None:
        return None
    return _manifest(root, environ).get("parent")
