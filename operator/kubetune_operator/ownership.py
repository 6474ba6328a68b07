"""Whose is an object that has a child's name?

The operator creates its children with deterministic names, so someone else
can create an object with such a name first. The operator changes, reads the
status of, or deletes only objects whose ownerReferences name the job's uid:
anything else with a child's name ends the job `Failed`/NameConflict, and the
object is left exactly as it is.

One exception waits instead of failing: an object owned by an earlier
FineTuneJob of the same name (deleted and re-created). The earlier job is
gone (names are unique), so the garbage collector is about to delete the
object; the new job waits for that, and never uses or deletes it itself.

Pure: no I/O.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

from kubetune_api import models

from .names import LABEL_ATTEMPT, LABEL_JOB_UID, Body


class Owner(str, Enum):
    OURS = "ours"
    PREVIOUS = "previous"  # an earlier job of the same name: the garbage collector's
    FOREIGN = "foreign"


class ChildConflict(Exception):
    """An object with a child's name that is not the job's."""

    def __init__(self, kind: str, namespace: str, name: str, owner: Owner, owners: str):
        super().__init__(f"{kind} {namespace}/{name}")
        self.kind, self.namespace, self.name = kind, namespace, name
        self.owner, self.owners = owner, owners


def _refs(meta: Body) -> list[dict]:
    return list(meta.get("ownerReferences") or [])


def owner_of(meta: Body, job: Body) -> Owner:
    """Whether an object (its metadata, as the API's JSON) is this job's."""
    jmeta = job["metadata"]
    refs = _refs(meta)
    if any(r.get("uid") == jmeta["uid"] for r in refs):
        return Owner.OURS
    for r in refs:
        if (
            r.get("kind") == models.KIND
            and str(r.get("apiVersion") or "").split("/")[0] == models.GROUP
            and r.get("name") == jmeta["name"]
        ):
            return Owner.PREVIOUS
    return Owner.FOREIGN


def describe_owners(meta: Body) -> str:
    refs = _refs(meta)
    if not refs:
        return "no owner"
    return "owned by " + ", ".join(
        f"{r.get('kind')} {r.get('name')} (uid {r.get('uid')})" for r in refs
    )


def check(kind: str, namespace: str, name: str, meta: Body, job: Body) -> None:
    """Raise ChildConflict unless the object is the job's."""
    owner = owner_of(meta, job)
    if owner is not Owner.OURS:
        raise ChildConflict(kind, namespace, name, owner, describe_owners(meta))


def conflict_message(exc: ChildConflict, job: Body) -> str:
    return (
        f"{exc.kind} {exc.name} already exists in namespace {exc.namespace} and does not "
        f"belong to this FineTuneJob ({exc.owners}): kubetune never changes, uses or deletes "
        f"an object it did not create (hint: delete or rename that {exc.kind}, or create the "
        f"job under another name; then re-create the job)"
    )


def waiting_message(exc: ChildConflict) -> str:
    return (
        f"waiting for the garbage collector to delete {exc.kind} {exc.name}, left by an "
        f"earlier FineTuneJob of the same name ({exc.owners})"
    )


def owned(obj: Optional[Body], job: Body) -> bool:
    return obj is not None and owner_of(obj.get("metadata") or {}, job) is Owner.OURS


def older_attempts(rayjobs: list[Body], job: Body, attempt: int) -> list[str]:
    """Names of the job's own RayJobs of an attempt before `attempt` that are not
    being deleted yet: a retry's failed RayJob that an operator killed between
    recording the new attempt and deleting the old one left behind."""
    uid = job["metadata"]["uid"]
    stale = []
    for rj in rayjobs:
        meta = rj.get("metadata") or {}
        labels = meta.get("labels") or {}
        try:
            theirs = int(labels.get(LABEL_ATTEMPT, ""))
        except ValueError:
            continue
        if (
            labels.get(LABEL_JOB_UID) == uid
            and theirs < attempt
            and owned(rj, job)
            and not meta.get("deletionTimestamp")
        ):
            stale.append(meta["name"])
    return sorted(stale)
