"""The latest body of every FineTuneJob and of every RayJob the operator made,
fed by the watch streams kopf already runs: a reconcile reads here and never
GETs what a watch delivered. The operator's own writes go in too (the API
server's answer to a create or patch), so a reconcile right after a write never
sees the state from before it, even when the watch has not caught up.

Bodies are trimmed to what the operator reads: `managedFields` and a RayJob's
cluster spec are most of an object's size and nothing decides on them, and at
a thousand jobs they would be most of the operator's memory.

Each body is kept as one compact JSON string, parsed again when a reconcile
asks for it: as dicts (every key and value its own object, per job) a
FineTuneJob and its RayJob took ~17 KB, as JSON ~3.5 KB (measured with
tracemalloc). Only reconciles pay the parse (tens of microseconds); a job
between events costs its strings alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

Body = dict[str, Any]

# The RayJob spec fields a decision or a patch reads (rayjob_patch, rayjob_state).
RAYJOB_SPEC_KEPT = ("suspend",)


def plain(obj: Any) -> Any:
    """kopf's read-only body views → plain dicts and lists (a deep copy)."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


def _trim_meta(meta: Mapping) -> dict:
    return {k: plain(v) for k, v in meta.items() if k != "managedFields"}


def trim_job(body: Mapping) -> Body:
    return {k: (_trim_meta(v) if k == "metadata" else plain(v)) for k, v in body.items()}


def trim_rayjob(body: Mapping) -> Body:
    out: Body = {}
    for key, value in body.items():
        if key == "metadata":
            out[key] = _trim_meta(value)
        elif key == "spec":
            out[key] = {k: plain(value[k]) for k in RAYJOB_SPEC_KEPT if k in value}
        else:
            out[key] = plain(value)
    return out


def _version(body: Mapping) -> Optional[int]:
    try:
        return int(body["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


# A kept body: its resourceVersion (None when not a number) and its JSON.
Kept = tuple[Optional[int], str]


def _newer(version: Optional[int], old: Optional[Kept]) -> bool:
    """Whether a body of `version` may replace `old`: a late watch event must
    not undo the answer to our own write. resourceVersions are opaque to
    clients in general but etcd revisions in practice; when either is not a
    number, the newcomer wins."""
    if old is None:
        return True
    return version is None or old[0] is None or version > old[0]


def _keep(body: Body) -> str:
    return json.dumps(body, separators=(",", ":"))


class WatchCache:
    def __init__(self) -> None:
        self._jobs: dict[str, Kept] = {}  # FineTuneJob by uid
        self._rayjobs: dict[tuple[str, str], Kept] = {}  # RayJob by (namespace, name)

    # FineTuneJobs
    def put_job(self, body: Mapping) -> bool:
        """Keep `body` unless an equal or newer version is kept; True if kept."""
        uid = body["metadata"]["uid"]
        version = _version(body)
        if not _newer(version, self._jobs.get(uid)):
            return False
        self._jobs[uid] = (version, _keep(trim_job(body)))
        return True

    def job(self, uid: str) -> Optional[Body]:
        """A copy of its own, parsed from the kept JSON: the reconciler may
        change it freely."""
        kept = self._jobs.get(uid)
        return json.loads(kept[1]) if kept is not None else None

    def has_job(self, uid: str) -> bool:
        return uid in self._jobs

    def drop_job(self, uid: str) -> None:
        self._jobs.pop(uid, None)

    def job_uids(self) -> list[str]:
        return list(self._jobs)

    # RayJobs
    def put_rayjob(self, body: Mapping) -> bool:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        version = _version(body)
        if not _newer(version, self._rayjobs.get(key)):
            return False
        self._rayjobs[key] = (version, _keep(trim_rayjob(body)))
        return True

    def rayjob(self, ns: str, name: str) -> Optional[Body]:
        kept = self._rayjobs.get((ns, name))
        return json.loads(kept[1]) if kept is not None else None

    def drop_rayjob(self, ns: str, name: str) -> None:
        self._rayjobs.pop((ns, name), None)

    def __len__(self) -> int:
        return len(self._jobs)
