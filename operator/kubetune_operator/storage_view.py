"""What the status shows from storage: each job's reads of its output prefix
(storage_reader.py), started beside the reconcile and never in its way, and
the last one's typed snapshot → status (progress.py) with the StorageReadable,
TrackingReachable and Checkpointed conditions.

A reconcile starts a read when none is running for the job (at most one per
job, one per poll) and shows whatever the last finished read found; the read
wakes the job when it ends. A read runs only on a slot (storage_limits.ReadSlots:
per namespace, per store, in all) and never waits for one. The one deliberate
wait is the reconcile's, not this module's: a job's terminal phase waits for a
read that started after its Ray job ended (`final_read_landed`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from kubetune_api.storage import job_prefix, split_uri, strip_userinfo

from . import kube, metrics, storage_reader
from .conditions import get_condition, set_condition
from .endpoints import Allowlist, endpoint_problem
from .names import Body
from .progress import progress_to_status, retention_condition, tracking_condition
from .states import Cond, Reason
from .storage_limits import THREADS, ReadSlots, Ticket

# Storage reads run here, never in the API pool, and only once admitted by
# ReadSlots, so a read never waits for a thread and a namespace whose stores
# stop answering holds at most its share of them.
_STORAGE_POOL = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="kubetune-storage")

WakeFn = Callable[[str], None]


@dataclass
class JobReads:
    """One job's storage reads: at most one in flight, the latest result kept."""

    task: Optional[asyncio.Task] = None
    started: float = 0.0  # monotonic time the running/last read started
    snapshot: Optional[storage_reader.StorageSnapshot] = None
    problem: Optional[tuple[Reason, str]] = None  # (reason, message) of the last read
    final_started: bool = False  # a read started after the job finished
    final_done: bool = False


class StorageView:
    """Every job's storage reads, and the last one of each shown in status."""

    def __init__(
        self,
        api: kube.Api,
        default_output_uri: Optional[str],
        allowlist: Allowlist,
        read_slots: ReadSlots,
        wake: WakeFn,
        poll_seconds: float,
        timeout_seconds: float,
    ):
        self.api = api  # only for a job's Secret (spec.output.secretRef)
        self.default_output_uri = default_output_uri
        self.allowlist = allowlist
        self.read_slots = read_slots
        self.wake = wake
        self.poll_seconds = poll_seconds
        self.timeout_seconds = timeout_seconds
        self._jobs: dict[str, JobReads] = {}
        metrics.STORAGE_READS.set_function(read_slots.in_flight)

    def _reads(self, job: Body) -> JobReads:
        return self._jobs.setdefault(job["metadata"]["uid"], JobReads())

    def _output(self, job: Body) -> tuple[Optional[str], dict]:
        output = job["spec"].get("output") or {}
        return output.get("uri") or self.default_output_uri, output

    def _prefix(self, job: Body) -> Optional[str]:
        uri, _ = self._output(job)
        if not uri:
            return None
        meta = job["metadata"]
        return job_prefix(uri, meta["namespace"], meta["name"], meta["uid"])

    def start(self, job: Body, final: bool = False) -> None:
        """Start a read unless one is running (one per job) or one started less
        than a poll ago; never waits."""
        reads = self._reads(job)
        if reads.task is not None and not reads.task.done():
            return
        since = time.monotonic() - reads.started
        if not final and reads.started and since < self.poll_seconds * 0.9:
            return
        prefix = self._prefix(job)
        if prefix is None:
            return
        problem = endpoint_problem(job, self.allowlist)
        if problem is not None:  # never signed with the operator's identity
            reads.problem = (Reason.EndpointNotAllowed, str(problem))
            reads.final_started = reads.final_done = True
            return
        scheme, _ = split_uri(prefix)
        if scheme not in storage_reader.READABLE_SCHEMES:
            readable = ", ".join(s + "://" for s in storage_reader.READABLE_SCHEMES)
            reads.problem = (
                Reason.SchemeNotReadable,
                f"the operator reads {readable} outputs only, not {scheme}:// ones: progress, "
                "metrics and checkpoints are not shown here (the trainer still writes them "
                f"under {prefix})",
            )
            reads.final_started = reads.final_done = True
            return
        ticket, why = self.read_slots.take(
            job["metadata"]["namespace"], storage_reader.store_key(prefix, self._output(job)[1])
        )
        if ticket is None:  # not started this poll; the next one tries again
            metrics.STORAGE_DEFERRED.inc()
            _queued(reads, why)
            return
        reads.started = time.monotonic()
        if final:
            reads.final_started = True
        reads.task = asyncio.get_running_loop().create_task(self._read(job, prefix, reads, ticket))

    def final_read_landed(self, job: Body) -> bool:
        """Whether a storage read started after the Ray job ended has landed;
        starts one if none has (behind a read in flight). Never waits."""
        if self._prefix(job) is None:
            return True  # nothing to read
        reads = self._reads(job)
        if not reads.final_started:
            self.start(job, final=True)
        return reads.final_done

    def read_final(self, job: Body, made_children: bool) -> None:
        """A finished job: its final files read once more, in the background,
        once no read is in flight. Never waits."""
        reads = self._reads(job)
        idle = reads.task is None or reads.task.done()
        if made_children and not reads.final_started and idle:
            self.start(job, final=True)

    def final_done(self, job: Body) -> bool:
        """Whether a read started after the job finished has landed."""
        return self._reads(job).final_done

    async def _read(self, job: Body, prefix: str, reads: JobReads, ticket: Ticket) -> None:
        spec, meta = job["spec"], job["metadata"]
        _, output = self._output(job)
        keep = (spec.get("checkpointing") or {}).get("keepLast", 3)
        final = reads.final_started
        endpoint = output.get("endpoint") or "the default endpoint"
        try:
            secret = {}
            ref = (output.get("secretRef") or {}).get("name")
            if ref:
                secret = await kube.call(self.api.read_secret, meta["namespace"], ref)
            if ref and not all(secret.get(k) for k in storage_reader.KEY_PAIR):
                # Without the pair the client would fall back to the operator's own
                # credentials, at an endpoint the job chose: never.
                reads.problem = (
                    Reason.StorageReadFailed,
                    f"Secret {ref} (spec.output.secretRef) has no "
                    f"{' and '.join(storage_reader.KEY_PAIR)}: the operator reads a job's "
                    "storage with the job's own keys only (hint: add both keys to the Secret)",
                )
            else:
                reads.snapshot = await asyncio.wait_for(
                    _read_bounded(
                        ticket, storage_reader.read_snapshot, prefix, output, secret, keep
                    ),
                    timeout=self.timeout_seconds,
                )
                too_large = storage_reader.too_large_message(reads.snapshot)
                reads.problem = (Reason.StorageFileTooLarge, too_large) if too_large else None
        except asyncio.TimeoutError:
            metrics.ERRORS.labels(kind="storage_timeout").inc()
            reads.problem = (
                Reason.StorageTimeout,
                f"no answer from {strip_userinfo(endpoint)} within "
                f"{self.timeout_seconds:g}s reading {prefix}; progress shown is "
                "from the last successful read (hint: check spec.output.endpoint and that the "
                "object store is up)",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - storage trouble must not stop reconciling
            metrics.ERRORS.labels(kind="storage").inc()
            # Never echo exception text: it can carry a URL with credentials.
            reads.problem = (
                Reason.StorageReadFailed,
                f"cannot read {prefix}: {type(exc).__name__} (hint: check spec.output.uri, "
                "spec.output.endpoint and the keys in spec.output.secretRef)",
            )
        finally:
            if not ticket.handed_over:
                ticket.release()  # no thread took it (the Secret's read failed)
            if final:
                reads.final_done = True
        self.wake(meta["uid"])

    def show(self, job: Body, status: dict, now: datetime, gen) -> dict:
        """The last storage read, into status (progress, metrics, checkpoints,
        outputs and the StorageReadable condition)."""
        reads = self._jobs.get(job["metadata"]["uid"])
        if reads is None:
            return status
        conds = list(status.get("conditions") or [])
        if reads.problem is not None:
            reason, message = reads.problem
            unknown = (Reason.SchemeNotReadable, Reason.StorageReadQueued)
            state = "Unknown" if reason in unknown else "False"
            conds = set_condition(conds, Cond.StorageReadable, state, reason, message, now, gen)
        elif reads.snapshot is not None and get_condition(status, Cond.StorageReadable):
            conds = set_condition(
                conds,
                Cond.StorageReadable,
                "True",
                Reason.Read,
                f"read {reads.snapshot.prefix}",
                now,
                gen,
            )
        status["conditions"] = conds
        if reads.snapshot is None:
            return status
        keep = (job["spec"].get("checkpointing") or {}).get("keepLast", 3)
        shown = (status.get("progress") or {}).get("startup")
        status |= progress_to_status(reads.snapshot, keep, int(status.get("attempts") or 1))
        progress = status.get("progress")
        if shown and isinstance(progress, dict) and "startup" not in progress:
            progress["startup"] = shown  # the reconciler's (startup.py), kept
        attempts = int(status.get("attempts") or 1)
        # (condition, (its state, message) or None, reason when True, reason when False)
        for cond, found, when_true, when_false in (
            (
                Cond.TrackingReachable,
                tracking_condition(reads.snapshot),
                Reason.TrackingRunStarted,
                Reason.TrackingUnreachable,
            ),
            (
                Cond.RetentionRegressed,
                retention_condition(reads.snapshot, attempts),
                Reason.RetentionAboveBound,
                Reason.RetentionWithinBound,
            ),
        ):
            if found is not None:
                state, message = found
                status["conditions"] = set_condition(
                    status["conditions"],
                    cond,
                    "True" if state else "False",
                    when_true if state else when_false,
                    message,
                    now,
                    gen,
                )
        if status.get("checkpoints"):
            last = status["checkpoints"][-1]
            status["conditions"] = set_condition(
                status["conditions"],
                Cond.Checkpointed,
                "True",
                Reason.CheckpointCommitted,
                f"step {last['step']} committed at {last['uri']}",
                now,
                gen,
            )
        return status

    def trainer_startup(self, job: Body, attempt: int) -> Optional[list[dict]]:
        """progress.json's `startup` of the last read (None before a read or
        when the record belongs to another attempt)."""
        reads = self._jobs.get(job["metadata"]["uid"])
        rec = reads.snapshot.progress if reads and reads.snapshot else None
        if rec is None or rec.attempt != attempt or not rec.startup:
            return None
        return [p.model_dump() for p in rec.startup]

    def forget(self, uid: str) -> None:
        """The job is gone: drop its reads (a running one ends on its own)."""
        self._jobs.pop(uid, None)


def _queued(reads: JobReads, why: str) -> None:
    """A read not admitted (storage_limits.ReadSlots): StorageReadable=Unknown says
    so, unless the last read failed (that failure stays the news)."""
    if reads.problem is not None and reads.problem[0] is not Reason.StorageReadQueued:
        return
    reads.problem = (
        Reason.StorageReadQueued,
        f"storage read not started this poll: {why}; the next poll tries again, and "
        "progress shown is from the last read (hint: reads of a store that does not "
        "answer hold their slots until they time out)",
    )


async def _read_bounded(ticket: Ticket, fn, *args):
    """Run a blocking read in the storage pool on an admitted ticket. Its
    slots are given back when the thread ends, not when the caller stops
    waiting: a hung store keeps its slots, nobody else's."""
    try:
        fut = asyncio.get_running_loop().run_in_executor(_STORAGE_POOL, fn, *args)
    except BaseException:
        ticket.release()
        raise
    ticket.handed_over = True
    fut.add_done_callback(lambda _: ticket.release())
    return await asyncio.shield(fut)
