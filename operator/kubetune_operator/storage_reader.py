"""Read what the trainer wrote under a job's storage prefix (the contract in
kubetune_api.storage): progress.json, the tail of metrics.jsonl, committed
checkpoint manifests, outputs.json, run.json, tracking.json and sweep.json,
each parsed into the contract's model the trainer wrote it with
(StorageSnapshot). A file that is not there, is half written or does not fit
its model reads as absent; the next poll reads it again. Every read is
bounded: a record file's size is checked before it is read and at most its
cap (plus one byte, to tell) is read; metrics.jsonl is read as its last
METRICS_TAIL_BYTES only. A file over its cap is not parsed and is named in
`StorageSnapshot.too_large` (the rest of the snapshot is read as usual).

Credentials come from the output's Secret, read through the Kubernetes API by
the caller and passed in as a mapping; they are never logged or stored.
Blocking (fsspec); the operator calls it in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from kubetune_api import storage
from kubetune_api.models import StorageAccess, _Model
from kubetune_api.storage import (
    AttemptRecord,
    CheckpointManifest,
    MetricsRow,
    OutputsRecord,
    ProgressRecord,
    RunRecord,
    TrackingRecord,
)
from kubetune_api.sweep import SWEEP, SweepRecord

from .storage_limits import LruCache

MIB = 1024 * 1024
METRICS_TAIL_BYTES = 64 * 1024
# The most of each file the operator reads: the trainer writes each one small
# (a sweep's record grows with its trials); anything larger is not the trainer's.
RECORD_CAP_BYTES = MIB  # progress.json, outputs.json, run.json, tracking.json, manifests
SWEEP_CAP_BYTES = 4 * MIB

# Manifests that count are written once and never change: cache them by URI (the
# newest few per job are read each poll; an evicted one is read again). One that
# does not count (an older attempt's, committed after a newer one took over) is
# never cached: the newer attempt may commit that step again.
MANIFEST_CACHE_ENTRIES = 4096
_manifest_cache: LruCache[str, CheckpointManifest] = LruCache(MANIFEST_CACHE_ENTRIES)


# The keys a job's Secret must hold for the operator to read its storage.
KEY_PAIR = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def secret_environ(role: str, secret_data: Mapping[str, str]) -> dict[str, str]:
    """A Secret's (decoded) keys → the role's KUBETUNE_* credential variables."""
    env = {}
    for key in storage.CREDENTIAL_KEYS:
        if secret_data.get(key):
            env[storage.credential_env(role, key)] = secret_data[key]
    return env


# Schemes this reader can open from inside the operator's pod. file:// and
# plain paths name the trainer's volume, which the operator never mounts: it
# must not read its own filesystem in their place.
READABLE_SCHEMES = ("s3",)
# Connections one object store may hold open: one filesystem per store and
# credentials is reused across polls, so a store that stops answering pins at
# most this many sockets instead of a new set per read.
MAX_CONNECTIONS_PER_STORE = 4
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 10

# One filesystem per store and credentials, reused across polls; a store nobody
# has read for FS_IDLE_SECONDS (its jobs or namespace deleted, its keys rotated)
# is dropped, and at most FS_CACHE_ENTRIES are kept (the least recently used
# goes first: the next read of it opens a new one).
FS_CACHE_ENTRIES = 256
FS_IDLE_SECONDS = 600.0
_fs_cache: LruCache[tuple, Any] = LruCache(FS_CACHE_ENTRIES, FS_IDLE_SECONDS)
_fs_lock = threading.Lock()  # one filesystem per key, even when two reads open it at once


_session: Any = None


def _shared_session():
    """One botocore session for every filesystem (under _fs_lock): each session
    loads S3's service model, ~12 MiB apiece, where a client on a shared one
    costs ~1.5 MiB. Credentials are per client (create_client's keys), so
    sharing the session shares no job's keys; s3fs creates clients on its one
    event-loop thread, so the session is never used from two threads at once."""
    global _session
    if _session is None:
        import aiobotocore.session

        _session = aiobotocore.session.AioSession()
    return _session


class SchemeNotReadable(Exception):
    """The operator has no reader for this URI scheme."""


def store_key(uri: str, access: Optional[dict]) -> str:
    """Which store a URI lives in, for per-store limits (never holds secrets)."""
    scheme, rest = storage.split_uri(uri)
    endpoint = (access or {}).get("endpoint") or ""
    return f"{scheme}|{endpoint}" if endpoint else f"{scheme}|{rest.split('/', 1)[0]}"


def filesystem(
    uri: str,
    access: Optional[dict],
    secret_data: Mapping[str, str],
    schemes: tuple[str, ...] = READABLE_SCHEMES,
):
    import fsspec

    protocol, _ = storage.split_uri(uri)
    if protocol not in schemes:
        raise SchemeNotReadable(protocol)
    acc = StorageAccess.model_validate(
        {k: v for k, v in (access or {}).items() if k in ("endpoint", "region", "secretRef")}
    )
    opts = storage.storage_options(uri, acc, "OUTPUT", secret_environ("OUTPUT", secret_data))
    key = (
        protocol,
        acc.endpoint,
        acc.region,
        hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest(),
    )
    with _fs_lock:
        fs = _fs_cache.get(key)
        if fs is not None:
            return fs
        if protocol != "s3":
            fs = fsspec.filesystem(protocol)
            _fs_cache.put(key, fs)
            return fs
        # Fresh listings on every read: the trainer writes behind our back.
        opts |= {
            "use_listings_cache": False,
            "skip_instance_cache": True,
            # Fail fast: the next poll tries again; a hung read must not pile up.
            "config_kwargs": {
                "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                "read_timeout": READ_TIMEOUT_SECONDS,
                "retries": {"mode": "standard", "total_max_attempts": 1},
                "max_pool_connections": MAX_CONNECTIONS_PER_STORE,
            },
        }
        fs = fsspec.filesystem(protocol, session=_shared_session(), **opts)
        # s3fs retries timeouts 5 times on top of botocore: a hung store would
        # hold a thread for minutes. The next poll is the retry.
        fs.retries = 1
        _fs_cache.put(key, fs)
        return fs


class TooLarge(_Model):
    """A file over its cap: not read."""

    path: str
    size: int  # what the store said, or more than the cap when it grew while read
    cap: int


class FileTooLarge(Exception):
    def __init__(self, path: str, size: int, cap: int):
        super().__init__(path)
        self.found = TooLarge(path=path, size=size, cap=cap)


class CommittedCheckpoint(CheckpointManifest):
    """A committed checkpoint as read back: its manifest and where it is."""

    uri: str


class StorageSnapshot(_Model):
    """Everything the status shows from a job's prefix, in the contract's models."""

    prefix: Optional[str] = None
    fence: Optional[AttemptRecord] = None  # attempt.json: which attempt's records count
    progress: Optional[ProgressRecord] = None
    metrics: list[MetricsRow] = []  # the tail, oldest first
    checkpoints: list[CommittedCheckpoint] = []  # the newest committed ones, oldest first
    outputs: Optional[OutputsRecord] = None
    run_record: Optional[RunRecord] = None
    tracking: Optional[TrackingRecord] = None
    sweep: Optional[SweepRecord] = None
    too_large: list[TooLarge] = []  # files over their cap, not read


def too_large_message(snapshot: StorageSnapshot) -> Optional[str]:
    """What the status says about files over their cap, or None."""
    if not snapshot.too_large:
        return None
    files = "; ".join(
        f"{t.path} is {_size(t.size)}, over the operator's {_size(t.cap)} cap"
        for t in snapshot.too_large
    )
    return (
        f"{files}: not read, so what it holds is not shown; everything else under "
        f"{snapshot.prefix} is (hint: the trainer writes these files small; check what else "
        "writes under the job's output prefix)"
    )


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB and n % (MIB // 16) == 0 else f"{n} bytes"


def _parse(model: type[BaseModel], data: Any):
    try:
        return model.model_validate(data)
    except ValidationError:
        return None  # not the contract's shape (yet): read as absent


def read_capped(fs, path: str, cap: int) -> bytes:
    """The whole file, if it is at most `cap` bytes: its size is checked first, and
    at most cap + 1 bytes are read (it may grow in between). FileTooLarge otherwise."""
    size = int(fs.info(path).get("size") or 0)
    if size > cap:
        raise FileTooLarge(path, size, cap)
    if size == 0:
        return b""  # a ranged read of an empty object is refused (416)
    data = fs.cat_file(path, start=0, end=cap + 1)
    if len(data) > cap:
        raise FileTooLarge(path, len(data), cap)
    return data


def _read_json(
    fs,
    path: str,
    model: type[BaseModel],
    too_large: list[TooLarge],
    cap: int = RECORD_CAP_BYTES,
):
    try:
        return _parse(model, json.loads(read_capped(fs, path, cap)))
    except FileNotFoundError:
        return None
    except FileTooLarge as exc:
        too_large.append(exc.found)
        return None
    except ValueError:
        return None  # a torn write; the next poll reads the rewritten file


def metrics_tail(
    fs, path: str, limit: int, tail_bytes: int = METRICS_TAIL_BYTES
) -> list[MetricsRow]:
    """The last `limit` rows of a metrics.jsonl within its last `tail_bytes`, typed;
    a row that is not the contract's shape (or a half-appended line) is left out."""
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return []
    start = max(0, size - tail_bytes)
    # A ranged read of what was there at `size`: appended rows wait for the next poll.
    data = fs.cat_file(path, start=start, end=size) if size else b""
    lines = data.decode("utf-8", "replace").splitlines()
    if start > 0:
        lines = lines[1:]  # the first line may be cut
    rows = []
    for line in lines[-limit:]:
        try:
            row = _parse(MetricsRow, json.loads(line))
        except ValueError:
            continue  # a half-appended last line
        if row is not None:
            rows.append(row)
    return rows


def _checkpoints(
    fs, prefix: str, keep: int, too_large: list[TooLarge], fence: Optional[AttemptRecord] = None
) -> list[tuple[int, str, CheckpointManifest]]:
    """The newest `keep` committed checkpoints that count under the fence."""
    root = storage.join(prefix, storage.CHECKPOINTS)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    steps = sorted((s, e) for e in entries if (s := storage.parse_checkpoint_dir(e)) is not None)
    found = []
    for step, _entry in reversed(steps):
        uri = storage.checkpoint_dir(prefix, step)
        manifest = _manifest_cache.get(uri)
        if manifest is None or not storage.checkpoint_counts(step, manifest.attempt, fence):
            manifest = _read_json(
                fs, storage.join(uri, storage.MANIFEST), CheckpointManifest, too_large
            )
            if manifest is None:
                continue  # not committed (yet)
            if not storage.checkpoint_counts(step, manifest.attempt, fence):
                continue  # an older attempt's, committed after a newer one took over
            _manifest_cache.put(uri, manifest)
        found.append((step, uri, manifest))
        if len(found) >= keep:
            break
    return list(reversed(found))


def read_snapshot(
    prefix: str,
    access: Optional[dict],
    secret_data: Mapping[str, str],
    keep_checkpoints: int = 3,
    metrics_rows: int = 50,
    schemes: tuple[str, ...] = READABLE_SCHEMES,
) -> StorageSnapshot:
    """Everything the status shows from storage, typed.
    `schemes` widens what may be read (tests read a local folder)."""
    fs = filesystem(prefix, access, secret_data, schemes)
    scheme, path = storage.split_uri(prefix)
    clean = f"{scheme}://{path}" if "://" in prefix else path
    too_large: list[TooLarge] = []

    def record(name: str, model: type[BaseModel], cap: int = RECORD_CAP_BYTES):
        return _read_json(fs, storage.join(path, name), model, too_large, cap)

    fence = record(storage.ATTEMPT, AttemptRecord)
    return StorageSnapshot(
        prefix=clean,
        fence=fence,
        progress=record(storage.PROGRESS, ProgressRecord),
        metrics=metrics_tail(fs, storage.join(path, storage.METRICS), metrics_rows),
        checkpoints=[
            CommittedCheckpoint(
                **manifest.model_dump(exclude={"step"}),
                step=step,  # the folder's name says which step it is
                uri=f"{scheme}://{uri}" if "://" in prefix else uri,
            )
            for step, uri, manifest in _checkpoints(fs, path, keep_checkpoints, too_large, fence)
        ],
        outputs=record(storage.OUTPUTS, OutputsRecord),
        run_record=record(storage.RUN_RECORD, RunRecord),
        tracking=record(storage.TRACKING, TrackingRecord),
        sweep=record(SWEEP, SweepRecord, SWEEP_CAP_BYTES),
        too_large=[
            t.model_copy(update={"path": f"{scheme}://{t.path}" if "://" in prefix else t.path})
            for t in too_large
        ],
    )
