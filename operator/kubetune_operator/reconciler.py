"""One reconcile of one FineTuneJob: observe (the job and its RayJob from the
watch cache, its Kueue queue, the last storage read) → decide (pure, `decide.py`)
→ act (create, patch or delete children) → write status once.

Every path through a reconcile ends in one `Outcome`: the status to write, when
to look again, and what may only come after the write. `_reconcile` writes it
in the one place status is written (`_write_status`), only when it changed,
with one event per phase transition; work that needs a written status first
(a finished job's TTL cleanup) is the next reconcile's, run at once.

Order matters for restarts: children are created with deterministic names
(create-if-absent); a retry's new names are written before the failed RayJob
is deleted; a finished job's children go only once its terminal phase is
written. So an operator killed at any line makes no duplicate. The Kubernetes
calls live in kube.py, the storage reads beside the reconcile in storage_view.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from kubetune_api.storage import redact_uris
from kubetune_api.validation import SpecError

from . import kube, metrics, ownership, pods, startup
from .cache import WatchCache
from .children import Settings, job_guards, rayjob_patch, spec_to_configmap, spec_to_rayjob
from .conditions import get_condition, rfc3339, set_condition, status_changed, with_phase
from .decide import decide, ttl_remaining
from .endpoints import Allowlist, endpoint_problem
from .kube import Api, KubeRayMissing, StaleStatus
from .names import KUEUE_QUEUE_LABEL, Body, child_names
from .parent import MODEL_FROM_JOB, Reference, named, resolve_parent, unresolved
from .rayjob_status import rayjob_state, rayjob_to_status, trainer_may_have_written
from .states import TERMINAL, Action, Cond, Phase, RayJobState, Reason
from .storage_limits import ReadSlots
from .storage_view import StorageView, WakeFn
from .validate import spec_error_status, validate_job

log = logging.getLogger("kubetune.operator")


@dataclass
class Timing:
    poll_seconds: float = 10.0  # how often a live job is looked at without an event
    idle_seconds: float = 300.0  # finished jobs: a slow heartbeat only
    crd_backoff_max: float = 60.0
    storage_timeout_seconds: float = 20.0  # then StorageReadable=False, whatever the store does
    # The start limit of a job without spec.startTimeoutSeconds (0: none): a
    # job whose Ray pods are not all running this long after it starts fails.
    start_timeout_seconds: int = 3600


QUEUE_CHECK_SECONDS = 30.0  # how long a LocalQueue lookup is trusted


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


EventFn = Callable[[Body, str, str, str], None]


@dataclass
class Outcome:
    """How one reconcile ends: the status to write (once) and the seconds until
    the next look."""

    status: dict
    delay: float
    # What must follow the write, in the same reconcile: a retry deletes the
    # failed RayJob only once the new attempt's names are written.
    then: Optional[Callable[[], Awaitable[object]]] = None
    # Raised once the status is written: KubeRayMissing shows its condition,
    # then the caller backs off.
    error: Optional[BaseException] = None


class Reconciler:
    def __init__(
        self,
        api: Api,
        settings: Settings,
        timing: Timing,
        event: EventFn,
        wake: Optional[WakeFn] = None,
        cache: Optional[WatchCache] = None,
        allowlist: Optional[Allowlist] = None,
        read_slots: Optional[ReadSlots] = None,
    ):
        self.api = api
        self.allowlist = allowlist if allowlist is not None else Allowlist.from_env(None)
        self.cache = cache if cache is not None else WatchCache()
        self.settings = settings
        self.timing = timing
        self.event = event
        self.wake = wake or (lambda uid: None)
        self.read_slots = read_slots if read_slots is not None else ReadSlots()
        self.storage = StorageView(
            api,
            settings.default_output_uri,
            self.allowlist,
            self.read_slots,
            self.wake,
            timing.poll_seconds,
            timing.storage_timeout_seconds,
        )
        self._queue_cache: dict[tuple[str, str], tuple[float, Optional[str]]] = {}
        self._checked_cache: dict[str, tuple[tuple, list]] = {}
        # The attempt whose ConfigMap is known to exist: ConfigMaps are not
        # watched, so this saves a GET per reconcile (a restart checks once).
        self._cm_done: dict[str, int] = {}
        # uid -> (monotonic time of the last pod list, the RayCluster, what it
        # found): the Ray pods of a starting job are listed at most once a poll.
        self._pods_seen: dict[str, tuple[float, str, Optional[pods.Unschedulable]]] = {}
        # uid -> (the attempt's RayJob creation, the cluster phases known, monotonic
        # time of the last pod list): status.progress.startup (startup.py).
        self._startup_seen: dict[str, tuple[Optional[str], dict[str, str], float]] = {}
        # uid -> status writes sent by the job's reconcile in flight (the
        # scheduler never runs two of one job at once): one at most, counted
        # in kubetune_status_writes_per_reconcile, where a test holds it to that.
        self._writes: dict[str, int] = {}

    async def _write_status(self, job: Body, old: dict, new: dict) -> None:
        """The one status write path: only when changed; one event per transition."""
        new = redact_uris(new)  # no URI the operator echoes carries credentials
        meta = job["metadata"]
        if status_changed(old, new):
            # A merge patch: keys we dropped must be sent as null to go away.
            patch = {k: None for k in old if k not in new} | new
            self._writes[meta["uid"]] = self._writes.get(meta["uid"], 0) + 1
            # Fenced by the version this reconcile decided on: a write from a stale
            # view (a late replica, a body older than someone else's write) is
            # refused (StaleStatus) instead of clobbering a newer status, and the
            # actions that follow it (a retry's delete) never run.
            written = await kube.call(
                self.api.patch_job_status,
                meta["namespace"],
                meta["name"],
                patch,
                meta.get("resourceVersion"),
            )
            if written:
                self.cache.put_job(written)
            before = (old.get("phase"), old.get("reason"))
            after = (new.get("phase"), new.get("reason"))
            if before != after and new.get("phase"):
                kind = "Warning" if new["phase"] == "Failed" else "Normal"
                self.event(
                    job,
                    kind,
                    new.get("reason") or new["phase"],
                    f"{new['phase']}: {new.get('message', '')}",
                )
        metrics.observe_phase(meta["uid"], new.get("phase"))

    async def reconcile(self, uid: str) -> Optional[float]:
        """Bring one FineTuneJob a step closer; return seconds until the next look
        (None: the job is gone). The caller (the scheduler) never runs two
        reconciles of one job at once."""
        started = time.perf_counter()
        self._writes[uid] = 0
        try:
            return await self._reconcile(uid)
        except StaleStatus as exc:
            return await self._reread(uid, str(exc))
        finally:
            metrics.STATUS_WRITES.observe(self._writes.pop(uid, 0))
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

    async def _reconcile(self, uid: str) -> Optional[float]:
        # The watch cache holds our own last write too (see _write_status).
        job = self.cache.job(uid)
        if job is None:
            return None
        if job["metadata"].get("deletionTimestamp"):
            return self.timing.idle_seconds
        old = copy.deepcopy(job.get("status") or {})
        outcome = await self._step(job, old)
        await self._write_status(job, old, outcome.status)  # the one write
        if outcome.then is not None:
            await outcome.then()
        if outcome.error is not None:
            raise outcome.error
        return outcome.delay

    async def _reread(self, uid: str, version: str) -> Optional[float]:
        """After a refused status write: the job's current body into the cache
        (the watch would bring it too, a little later), then look again now."""
        job = self.cache.job(uid)
        if job is None:
            return None
        meta = job["metadata"]
        log.debug(
            "%s/%s changed since version %s: status not written, reading it again",
            meta["namespace"],
            meta["name"],
            version,
        )
        fresh = await kube.call(self.api.get_job, meta["namespace"], meta["name"])
        if fresh is None or fresh["metadata"].get("uid") != uid:
            return None  # deleted (the watch's DELETED event forgets it)
        self.cache.put_job(fresh)
        return 0.0

    async def _rayjob(self, ns: str, name: str) -> Optional[Body]:
        """From the watch cache; a GET only for one the watch has not shown yet
        (an operator just started, or a RayJob deleted by someone else)."""
        rayjob = self.cache.rayjob(ns, name)
        if rayjob is None:
            rayjob = await kube.call(self.api.get_rayjob, ns, name)
            if rayjob is not None:
                self.cache.put_rayjob(rayjob)
        return rayjob

    async def _step(self, job: Body, old: dict) -> Outcome:
        """Observe, decide, act: all of one reconcile but its status write."""
        ns = job["metadata"]["namespace"]
        status = copy.deepcopy(old)
        now = _now()
        gen = job["metadata"].get("generation")

        attempts = int(status.get("attempts") or 1)
        errors, cm = self._checked(job, attempts)
        if errors:  # a bad spec waits for an edit, never hot-loops
            return Outcome(spec_error_status(status, errors, now, gen), self.timing.idle_seconds)
        if not get_condition(status, Cond.Validated) or (
            get_condition(status, Cond.Validated)["status"] != "True"
        ):
            status["conditions"] = set_condition(
                list(status.get("conditions") or []),
                Cond.Validated,
                "True",
                Reason.SpecValid,
                "the spec passed validation",
                now,
                gen,
            )
            if (
                status.get("reason") == Reason.InvalidSpec
            ):  # fixed by an edit (only safe fields can)
                status.pop("phase", None)
                status.pop("completionTime", None)

        if status.get("phase") in TERMINAL:
            return await self._finished(job, status, now)

        # 0. The jobs it starts from (spec.model.fromJob: the parent; the distillation
        # teacher's fromJob), resolved once and kept in status: a retry must use the
        # same ones even if they are deleted later.
        refs = unresolved(job)
        for ref in refs:
            waiting = await self._parent(job, status, now, gen, ref)
            if waiting is not None:
                return waiting
        if refs:
            errors, cm = self._checked(job, attempts)
            if errors:
                return Outcome(
                    spec_error_status(status, errors, now, gen), self.timing.idle_seconds
                )

        # 1. Child names. The first attempt's names derive from the job's name
        # alone, so they need no write before the create: an operator killed
        # right after it derives the same names and finds the children. A retry
        # records its attempt (and so its names) in status before deleting the
        # failed RayJob (below).
        fresh = not status.get("rayJobName") or not status.get("attempts")
        if fresh:
            status |= child_names(job, attempts) | {"attempts": attempts}
        attempts = int(status["attempts"])

        # 2. Children, create-if-absent (a fresh job tries the creates first: one
        # round trip each instead of a read and a create). The ConfigMap and the
        # RayJob are created side by side: KubeRay needs only the RayJob, and the
        # Ray Pods wait for the ConfigMap volume by themselves.
        uid = job["metadata"]["uid"]
        cm_call = None
        if self._cm_done.get(uid) != attempts:
            if cm is None:
                cm = spec_to_configmap(job, self.settings, attempts)
            guards = job_guards(job, self.settings, secrets.token_urlsafe(32))
            cm_call = asyncio.ensure_future(
                kube.call(self.api.ensure_children, cm, job, guards, fresh)
            )
        created = False
        try:
            # A retry's ConfigMap exists already, holding the earlier attempt's
            # config: the new attempt's pods would not wait for it, so it is
            # updated before the RayJob is created. Only a new job's ConfigMap and
            # RayJob go side by side (its pods wait for the ConfigMap to exist).
            if cm_call is not None and not fresh:
                await cm_call
            rayjob = None if fresh else await self._rayjob(ns, status["rayJobName"])
            if rayjob is not None:
                ownership.check("RayJob", ns, status["rayJobName"], rayjob["metadata"], job)
            missing = rayjob is None
            if missing:
                rayjob, created = await kube.call(
                    self.api.create_rayjob, spec_to_rayjob(job, self.settings, attempts), job
                )
                if rayjob is not None:
                    self.cache.put_rayjob(rayjob)
            if cm_call is not None:
                await cm_call
        except ownership.ChildConflict as exc:
            conflicts = [exc]
            if cm_call is not None:  # the ConfigMap may be taken too: name both
                (cm_result,) = await asyncio.gather(cm_call, return_exceptions=True)
                if isinstance(cm_result, ownership.ChildConflict) and cm_result is not exc:
                    conflicts.append(cm_result)
            return await self._conflict(job, status, conflicts, now, gen)
        except KubeRayMissing as exc:
            if cm_call is not None:
                await asyncio.gather(cm_call, return_exceptions=True)
            status["conditions"] = set_condition(
                status["conditions"],
                Cond.KubeRayAvailable,
                "False",
                Reason.RayJobCRDNotFound,
                "the ray.io/v1 RayJob API is not served by this cluster: install the KubeRay "
                "operator and its CRDs; retrying with backoff",
                now,
                gen,
            )
            # Written, then raised: the caller backs off (its delay, not this one).
            return Outcome(status, self.timing.crd_backoff_max, error=exc)
        except BaseException:
            if cm_call is not None:
                await asyncio.gather(cm_call, return_exceptions=True)
            raise
        if cm_call is not None:
            self._cm_done[uid] = attempts
        if missing and attempts > 1:
            await self._delete_older_attempts(job, attempts)
        if missing:
            if created:
                self.event(
                    job,
                    "Normal",
                    Reason.RayJobCreated,
                    f"created RayJob {status['rayJobName']} (attempt {attempts})",
                )
            if not status.get("startTime"):
                status["startTime"] = rfc3339(now)
        else:
            patch = rayjob_patch(job, rayjob)
            if patch:
                rayjob = await kube.call(self.api.patch_rayjob, ns, status["rayJobName"], patch)
                self.cache.put_rayjob(rayjob)
        if get_condition(status, Cond.KubeRayAvailable):
            status["conditions"] = set_condition(
                status["conditions"],
                Cond.KubeRayAvailable,
                "True",
                Reason.RayJobCRDFound,
                "the RayJob API is served",
                now,
                gen,
            )

        # 3. Observe: KubeRay's status, the Kueue queue while queued, and the last
        # storage read (a new one starts in the background; the reconcile never waits for it).
        status |= rayjob_to_status(rayjob)
        queue_problem = None
        state = rayjob_state(job, rayjob)
        queued = state is RayJobState.QUEUED
        starting = state is RayJobState.STARTING
        status = await self._show_scheduling(job, state, status, now, gen)
        if queued:
            queue_problem = await self._queue_problem(job)
        reading = trainer_may_have_written(job, rayjob, attempts)
        if reading:
            self.storage.start(job)
        status = self.storage.show(job, status, now, gen)
        status = await self._show_startup(job, rayjob, state, status, old, attempts)

        # 4. Decide.
        job_view = {**job, "status": status}
        decision = decide(job_view, rayjob, now, queue_problem, self.timing.start_timeout_seconds)
        if decision.action is Action.RETRY:
            failed_name = status["rayJobName"]
            attempts += 1
            status |= child_names(job, attempts) | {"attempts": attempts}
            status.pop("rayClusterName", None)
            status.pop("dashboardUrl", None)
            status = with_phase(status, decision.phase, decision.reason, decision.message, now, gen)
            status["observedGeneration"] = gen
            # The new names are written first, then the failed RayJob goes; the
            # next reconcile, at once, creates the new one.
            return Outcome(
                status, 0.0, then=lambda: kube.call(self.api.delete_rayjob, ns, failed_name, job)
            )
        # 5. Act; the status is written once, by the caller. A Ray job that just
        # ended shows its final records together with its terminal phase:
        # whoever waits for `Succeeded` (kubectl wait, a pipeline) reads the last
        # step and the outputs, not the poll before them. The phase waits for one
        # storage read that starts after the end; it is bounded by the storage
        # timeout, and a store that does not answer gets the phase with
        # StorageReadable=False.
        if (
            decision.phase in TERMINAL
            and decision.action is not Action.STOP_AND_DELETE
            and old.get("phase") not in TERMINAL
            and reading
            and not self.storage.final_read_landed(job)
        ):
            status["observedGeneration"] = gen
            return Outcome(status, self.timing.poll_seconds)  # the read wakes the job
        if decision.action is Action.STOP_AND_DELETE:
            await kube.call(self.api.delete_rayjob, ns, status["rayJobName"], job)
        status = with_phase(status, decision.phase, decision.reason, decision.message, now, gen)
        status["observedGeneration"] = gen
        if status["phase"] in TERMINAL:
            # The final read and TTL cleanup are the next reconcile's, at once
            # (`_finished`): the children go only once the phase is written, or
            # an operator killed in between would make the RayJob again.
            return Outcome(status, 0.0)
        # Only the clock needs a poll: storage to read again, a deadline, a
        # LocalQueue and the pods of a starting job (neither watched).
        # Everything else arrives as a watch event, so a job that waits
        # suspended costs nothing in between.
        if reading or queued or starting or job["spec"].get("activeDeadlineSeconds"):
            return Outcome(status, self.timing.poll_seconds)
        return Outcome(status, self.timing.idle_seconds)

    async def _delete_older_attempts(self, job: Body, attempts: int) -> None:
        """Delete the job's RayJobs of earlier attempts, when this attempt's RayJob
        is created: a retry deletes the failed one right after recording the new
        attempt, and an operator killed in between leaves it running beside the
        new one. (Their late writes do not count anyway: see kubetune_api.storage.)"""
        ns = job["metadata"]["namespace"]
        rayjobs = await kube.call(self.api.list_rayjobs, ns, job["metadata"]["uid"])
        for name in ownership.older_attempts(rayjobs, job, attempts):
            log.info(
                "%s/%s: deleting RayJob %s of an earlier attempt", ns, job["metadata"]["name"], name
            )
            await kube.call(self.api.delete_rayjob, ns, name, job)
            self.event(
                job,
                "Normal",
                Reason.OldAttemptDeleted,
                f"deleted RayJob {name} left by an earlier attempt",
            )

    async def _conflict(
        self,
        job: Body,
        status: dict,
        conflicts: list[ownership.ChildConflict],
        now: datetime,
        gen,
    ) -> Outcome:
        """An object with a child's name that is not the job's: never touched.
        Left by an earlier job of the same name, it is the garbage collector's:
        wait. Anyone else's: the job fails with NameConflict, and its own RayJob,
        if it made one, goes (its pods would mount a ConfigMap, or use a Ray token,
        that is not ours)."""
        meta = job["metadata"]
        foreign = [c for c in conflicts if c.owner is not ownership.Owner.PREVIOUS]
        if not foreign:
            message = "; ".join(ownership.waiting_message(c) for c in conflicts)
            log.info("%s/%s: %s", meta["namespace"], meta["name"], message)
            status = with_phase(status, Phase.Pending, Reason.Creating, message, now, gen)
            status["observedGeneration"] = gen
            return Outcome(status, self.timing.poll_seconds)
        kinds = {c.kind for c in foreign}
        used_by_pods = {"ConfigMap", "Secret", "NetworkPolicy"}
        if kinds & used_by_pods and "RayJob" not in kinds and status.get("rayJobName"):
            await kube.call(self.api.delete_rayjob, meta["namespace"], status["rayJobName"], job)
        # Not ours: nothing of them is shown, and TTL cleanup does not name them.
        if "RayJob" in kinds:
            status.pop("rayJobName", None)
        if "ConfigMap" in kinds:
            status.pop("configMapName", None)
        message = "; ".join(ownership.conflict_message(c, job) for c in foreign)
        status = with_phase(status, Phase.Failed, Reason.NameConflict, message, now, gen)
        status["observedGeneration"] = gen
        return Outcome(status, self.timing.idle_seconds)

    def _checked(self, job: Body, attempts: int) -> tuple[list, Optional[Body]]:
        """Validate (and render the config, which can fail too) once per
        (generation, labels, attempt): the spec only changes with the
        generation, so every other reconcile reuses the answer instead of
        parsing the spec again. Only the errors are kept (a rendered ConfigMap
        per job would be most of the operator's memory at a thousand jobs); the
        ConfigMap rendered by this call is handed back for this reconcile."""
        meta = job["metadata"]
        st = job.get("status") or {}
        key = (
            meta.get("generation"),
            json.dumps(meta.get("labels") or {}, sort_keys=True),
            attempts,
            json.dumps([st.get("parent"), st.get("teacher")], sort_keys=True),
        )
        cached = self._checked_cache.get(meta["uid"])
        if cached and cached[0] == key:
            return cached[1], None
        errors = validate_job(job, self.settings.default_output_uri)
        if not errors and not (job.get("status") or {}).get("rayJobName"):
            # Before any child exists: a job refused here never runs. One that
            # already runs (the allowlist changed since) only loses its reads.
            problem = endpoint_problem(job, self.allowlist)
            errors = [problem] if problem else []
        cm = None
        if not errors and not unresolved(job):  # else: resolve the parent and teacher first
            try:  # a spec that cannot render (no output URI anywhere) is invalid too
                cm = spec_to_configmap(job, self.settings, attempts)
            except SpecError as exc:
                errors = exc.errors
        self._checked_cache[meta["uid"]] = (key, errors)
        return errors, cm

    # ------------------------------------------------------------------ parent

    async def _parent(
        self, job: Body, status: dict, now, gen, ref: Reference = MODEL_FROM_JOB
    ) -> Optional[Outcome]:
        """Resolve the job `ref` names (spec.model.fromJob, or the teacher's fromJob)
        into status.<ref.status_key> (and the body `job`); None when resolved, else
        how this reconcile ends (waiting, or Failed)."""
        ns = job["metadata"]["namespace"]
        parent_job = await kube.call(self.api.get_job, ns, named(job, ref))
        parent, problem = resolve_parent(job, parent_job, self.settings.default_output_uri, ref)
        conds = list(status.get("conditions") or [])
        if problem is None:
            status[ref.status_key] = parent
            status["conditions"] = set_condition(
                conds,
                Cond.ParentReady,
                "True",
                Reason.ParentResolved,
                f"continuing from FineTuneJob {parent['name']} at {parent['uri']}"
                if ref is MODEL_FROM_JOB
                else f"learning from FineTuneJob {parent['name']} at {parent['uri']} ({ref.field})",
                now,
                gen,
            )
            job["status"] = {**(job.get("status") or {}), ref.status_key: parent}
            return None
        phase, reason, message = problem
        status["conditions"] = set_condition(
            conds, Cond.ParentReady, "False", reason, message, now, gen
        )
        status = with_phase(status, phase, reason, message, now, gen)
        status["observedGeneration"] = gen
        delay = self.timing.idle_seconds if phase in TERMINAL else self.timing.poll_seconds
        return Outcome(status, delay)

    # ------------------------------------------------------------------ pods

    async def _show_scheduling(
        self, job: Body, state: RayJobState, status: dict, now: datetime, gen
    ) -> dict:
        """The PodsScheduled condition: while the job starts, what the scheduler
        says about its Ray pods (their list is read at most once a poll, only
        the job's pending ones); True again once it runs."""
        cond = get_condition(status, Cond.PodsScheduled)
        cluster = status.get("rayClusterName")
        uid = job["metadata"]["uid"]
        found = None
        if state is RayJobState.STARTING and cluster:
            seen = self._pods_seen.get(uid)
            if (
                seen is None
                or seen[1] != cluster
                or time.monotonic() - seen[0] >= self.timing.poll_seconds * 0.9
            ):
                listed = await kube.call(
                    self.api.list_pending_pods,
                    job["metadata"]["namespace"],
                    pods.ray_pod_selector(job, cluster),
                )
                if listed is None:  # not allowed to look: say nothing
                    return status
                seen = (time.monotonic(), cluster, pods.pods_to_unschedulable(listed))
                self._pods_seen[uid] = seen
            found = seen[2]
        else:
            self._pods_seen.pop(uid, None)
            if state is not RayJobState.RUNNING:
                return status
        conds = list(status.get("conditions") or [])
        if found is not None:
            status["conditions"] = set_condition(
                conds, Cond.PodsScheduled, "False", Reason.Unschedulable, found.message, now, gen
            )
        elif cond and cond["status"] != "True":
            status["conditions"] = set_condition(
                conds,
                Cond.PodsScheduled,
                "True",
                Reason.Scheduled,
                "no Ray pod waits for a node",
                now,
                gen,
            )
        return status

    async def _show_startup(
        self, job: Body, rayjob: Optional[Body], state: RayJobState, status: dict, old: dict,
        attempts: int,
    ) -> dict:  # fmt: skip
        """status.progress.startup (startup.py), once a storage read brought the
        trainer's phases: the attempt's pods are listed while it runs, at most
        once a poll, until both pod phases are known; never again after."""
        trainer = self.storage.trainer_startup(job, attempts)
        progress = status.get("progress")
        ray_job_created = ((rayjob or {}).get("metadata") or {}).get("creationTimestamp")
        if not isinstance(progress, dict):
            return status
        if trainer is None:
            # an earlier attempt's phases go once a retry's RayJob exists
            kept = startup.cluster_phases_of(progress).get("rayJobCreated")
            if kept and ray_job_created and kept != ray_job_created:
                status["progress"] = {k: v for k, v in progress.items() if k != "startup"}
            return status
        uid = job["metadata"]["uid"]
        seen = self._startup_seen.get(uid)
        if seen is None or seen[0] != ray_job_created:
            kept = startup.cluster_phases_of(old.get("progress"))
            same = kept.get("rayJobCreated") == ray_job_created
            seen = (ray_job_created, kept if same else {}, 0.0)
        _, cluster, listed_at = seen
        cluster = dict(cluster)
        if ray_job_created:
            cluster["rayJobCreated"] = ray_job_created
        name = status.get("rayClusterName")
        if (
            state is RayJobState.RUNNING
            and name
            and not {"podsScheduled", "containersStarted"} <= cluster.keys()
            and time.monotonic() - listed_at >= self.timing.poll_seconds * 0.9
        ):
            listed = await kube.call(
                self.api.list_ray_pods,
                job["metadata"]["namespace"],
                pods.ray_pod_selector(job, name),
            )
            listed_at = time.monotonic()
            if listed is not None:
                cluster |= startup.pod_phases(listed)
        self._startup_seen[uid] = (ray_job_created, cluster, listed_at)
        begun = job["metadata"].get("creationTimestamp") if attempts == 1 else ray_job_created
        combined = startup.combine(begun, cluster, trainer)
        if combined:
            status["progress"] = {**progress, "startup": combined}
            if startup.reached_first_step(combined) and not startup.reached_first_step(
                (old.get("progress") or {}).get("startup"), ray_job_created
            ):
                metrics.observe_startup(combined)  # once per attempt, restarts included
        return status

    # ------------------------------------------------------------------ Kueue

    async def _queue_problem(self, job: Body) -> Optional[str]:
        """What is wrong with the job's LocalQueue, or None (exists, or unknown)."""
        meta = job["metadata"]
        queue = (meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL)
        if not queue:
            return None
        key = (meta["namespace"], queue)
        cached = self._queue_cache.get(key)
        if cached and time.monotonic() - cached[0] < QUEUE_CHECK_SECONDS:
            return cached[1]
        found = await kube.call(self.api.local_queue, meta["namespace"], queue)
        problem = None
        if found == "no-api":
            problem = (
                f"waiting for Kueue to admit it from queue {queue}, but this cluster serves no "
                "Kueue LocalQueue API (hint: install Kueue, or remove the "
                f"{KUEUE_QUEUE_LABEL} label by re-creating the job without it)"
            )
        elif found == "missing":
            problem = (
                f"waiting for admission, but namespace {meta['namespace']} has no Kueue "
                f"LocalQueue {queue} (hint: kubectl get localqueues -n {meta['namespace']}; "
                f"create it or set {KUEUE_QUEUE_LABEL} to an existing one)"
            )
        self._queue_cache[key] = (time.monotonic(), problem)
        return problem

    # ------------------------------------------------------------------ finished

    async def _finished(self, job: Body, status: dict, now: datetime) -> Outcome:
        """A finished job (its terminal phase already written): read its final
        files once more (in the background), then TTL cleanup."""
        ns = job["metadata"]["namespace"]
        gen = job["metadata"].get("generation")
        self.storage.read_final(job, made_children=bool(status.get("rayJobName")))
        status = self.storage.show(job, status, now, gen)
        job_view = {**job, "status": status}
        remaining = ttl_remaining(job_view, now)
        if (
            remaining is not None
            and remaining <= 0
            and not get_condition(status, Cond.ChildrenDeleted)
        ):
            deleted = []
            if status.get("rayJobName"):
                await kube.call(self.api.delete_rayjob, ns, status["rayJobName"], job)
                deleted.append(f"RayJob {status['rayJobName']}")
            if status.get("configMapName"):
                await kube.call(self.api.delete_configmap, ns, status["configMapName"], job)
                deleted.append(f"ConfigMap {status['configMapName']}")
            what = " and ".join(deleted) or "nothing (the job made no children)"
            status["conditions"] = set_condition(
                status["conditions"],
                Cond.ChildrenDeleted,
                "True",
                Reason.TTLExpired,
                f"ttlSecondsAfterFinished passed: deleted {what}, where the job owns it; the "
                "FineTuneJob and its storage stay",
                now,
                gen,
            )
            self.event(job, "Normal", Reason.TTLExpired, f"deleted {what}")
        status["observedGeneration"] = gen
        if not self.storage.final_done(job):
            return Outcome(status, self.timing.poll_seconds)  # the final read wakes the job
        if remaining is not None and remaining > 0:
            return Outcome(status, min(remaining, self.timing.idle_seconds))
        return Outcome(status, self.timing.idle_seconds)

    def forget(self, uid: str) -> None:
        """The job is gone: drop its storage reads and what was kept for it."""
        self.storage.forget(uid)
        self._checked_cache.pop(uid, None)
        self._cm_done.pop(uid, None)
        self._pods_seen.pop(uid, None)
        self._startup_seen.pop(uid, None)

    async def stop(self, ns: str, name: str, uid: str, status: dict) -> bool:
        """On deletion: delete the RayJob (KubeRay stops the Ray job and its cluster).
        True once it is gone, or when that name is not the job's (never touched)."""
        rj_name = status.get("rayJobName")
        if not rj_name:
            return True
        job = {"metadata": {"namespace": ns, "name": name, "uid": uid}}
        rayjob = await kube.call(self.api.get_rayjob, ns, rj_name)
        if not ownership.owned(rayjob, job):
            return True
        if not rayjob["metadata"].get("deletionTimestamp"):
            await kube.call(self.api.delete_rayjob, ns, rj_name, job)
        return await kube.call(self.api.get_rayjob, ns, rj_name) is None
