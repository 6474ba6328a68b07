"""Read what the trainer wrote under a job's storage prefix (the contract in
kubetune_api.storage): progress.json, the tail of metrics.jsonl, committed
checkpoint manifests, outputs.json.

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

from pydantic.alias_generators import to_camel

from kubetune_api import storage
from kubetune_api.models import StorageAccess
from kubetune_api.sweep import SWEEP

METRICS_TAIL_BYTES = 64 * 1024

# Manifests are written once and never change: cache them by URI.
_manifest_cache: dict[str, dict] = {}
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


def camel(record: Any) -> Any:
    """Top-level keys in the contract's camelCase, whichever case the writer used
    (the models accept both; the status speaks camelCase)."""
    if not isinstance(record, dict):
        return record
    return {to_camel(k): v for k, v in record.items()}


def _read_json(fs, path: str) -> Optional[dict]:
    try:
        with fs.open(path, "rb") as f:
            return camel(json.loads(f.read()))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn write; the next poll reads the rewritten file


def _metrics_tail(fs, path: str, limit: int) -> list[dict]:
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return []
    with fs.open(path, "rb") as f:
        start = max(0, size - METRICS_TAIL_BYTES)
        f.seek(start)
        data = f.read()
    lines = data.decode("utf-8", "replace").splitlines()
    if start > 0:
        lines = lines[1:]  # the first line may be cut
    rows = []
    for line in lines[-limit:]:
        try:
            rows.append(camel(json.loads(line)))
        except ValueError:
            continue  # a half-appended last line
    return rows


def _checkpoints(fs, prefix: str, keep: int) -> list[dict]:
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
        if manifest is None:
            manifest = _read_json(fs, storage.join(uri, storage.MANIFEST))
            if manifest is None:
                continue  # not committed (yet)
            with _cache_lock:
                _manifest_cache[uri] = manifest
        found.append({**manifest, "step": step, "uri": uri})
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
) -> dict[str, Any]:
    """Everything the status shows from storage, as plain dicts (camelCase).
    `schemes` widens what may be read (tests read a local folder)."""
    fs = filesystem(prefix, access, secret_data, schemes)
    scheme, path = storage.split_uri(prefix)
    clean = f"{scheme}://{path}" if "://" in prefix else path
    return {
        "prefix": clean,
        "progress": _read_json(fs, storage.join(path, storage.PROGRESS)),
        "metrics": _metrics_tail(fs, storage.join(path, storage.METRICS), metrics_rows),
        "checkpoints": [
            {**c, "uri": f"{scheme}://{c['uri']}" if "://" in prefix else c["uri"]}
            for c in _checkpoints(fs, path, keep_checkpoints)
        ],
        "outputs": _read_json(fs, storage.join(path, storage.OUTPUTS)),
        "runRecord": _read_json(fs, storage.join(path, storage.RUN_RECORD)),
        "tracking": _read_json(fs, storage.join(path, storage.TRACKING)),
        "sweep": _read_json(fs, storage.join(path, SWEEP)),
    }
