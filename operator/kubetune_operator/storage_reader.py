"""Read what the trainer wrote under a job's storage prefix (the contract in
kubetune_api.storage): progress.json, the tail of metrics.jsonl, committed
checkpoint manifests, outputs.json, run.json, tracking.json and sweep.json,
each parsed into the contract's model the trainer wrote it with
(StorageSnapshot). A file that is not there, is half written or does not fit
its model reads as absent; the next poll reads it again.

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

METRICS_TAIL_BYTES = 64 * 1024

# Manifests that count are written once and never change: cache them by URI. One
# that does not count (an older attempt's, committed after a newer one took
# over) is never cached: the newer attempt may commit that step again.
_manifest_cache: dict[str, CheckpointManifest] = {}
_cache_lock = threading.Lock()


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

_fs_cache: dict[tuple, Any] = {}
_fs_lock = threading.Lock()


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
            _fs_cache[key] = fs
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
        fs = fsspec.filesystem(protocol, **opts)
        # s3fs retries timeouts 5 times on top of botocore: a hung store would
        # hold a thread for minutes. The next poll is the retry.
        fs.retries = 1
        _fs_cache[key] = fs
        return fs


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


def _parse(model: type[BaseModel], data: Any):
    try:
        return model.model_validate(data)
    except ValidationError:
        return None  # not the contract's shape (yet): read as absent


def _read_json(fs, path: str, model: type[BaseModel]):
    try:
        with fs.open(path, "rb") as f:
            return _parse(model, json.loads(f.read()))
    except FileNotFoundError:
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
    with fs.open(path, "rb") as f:
        start = max(0, size - tail_bytes)
        f.seek(start)
        data = f.read()
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
    fs, prefix: str, keep: int, fence: Optional[AttemptRecord] = None
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
        with _cache_lock:
            manifest = _manifest_cache.get(uri)
        if manifest is None or not storage.checkpoint_counts(step, manifest.attempt, fence):
            manifest = _read_json(fs, storage.join(uri, storage.MANIFEST), CheckpointManifest)
            if manifest is None:
                continue  # not committed (yet)
            if not storage.checkpoint_counts(step, manifest.attempt, fence):
                continue  # an older attempt's, committed after a newer one took over
            with _cache_lock:
                _manifest_cache[uri] = manifest
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
    fence = _read_json(fs, storage.join(path, storage.ATTEMPT), AttemptRecord)
    return StorageSnapshot(
        prefix=clean,
        fence=fence,
        progress=_read_json(fs, storage.join(path, storage.PROGRESS), ProgressRecord),
        metrics=metrics_tail(fs, storage.join(path, storage.METRICS), metrics_rows),
        checkpoints=[
            CommittedCheckpoint(
                **manifest.model_dump(exclude={"step"}),
                step=step,  # the folder's name says which step it is
                uri=f"{scheme}://{uri}" if "://" in prefix else uri,
            )
            for step, uri, manifest in _checkpoints(fs, path, keep_checkpoints, fence)
        ],
        outputs=_read_json(fs, storage.join(path, storage.OUTPUTS), OutputsRecord),
        run_record=_read_json(fs, storage.join(path, storage.RUN_RECORD), RunRecord),
        tracking=_read_json(fs, storage.join(path, storage.TRACKING), TrackingRecord),
        sweep=_read_json(fs, storage.join(path, SWEEP), SweepRecord),
    )
