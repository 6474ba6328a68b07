"""One reconcile of one FineTuneJob: observe (the job and its RayJob from the
watch cache, its Kueue queue, the last storage read) → decide (pure, `decide.py`) → act (create,
patch or delete children) → write status once.

Order matters for restarts: child names are written into status before the
child is created, and children are created with deterministic names
(create-if-absent), so an operator killed at any line makes no duplicate.
Status is written in one place (`_write_status`), only when it changed, and
each phase transition posts one event. Storage reads run beside this, never
in its way (see `StorageView`).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune_api import models
from kubetune_api.storage import job_prefix, redact_uris, split_uri, strip_userinfo
from kubetune_api.validation import SpecError

from . import metrics, ownership, storage_reader
from .cache import WatchCache
from .children import Settings, job_guards, rayjob_patch, spec_to_configmap, spec_to_rayjob
from .conditions import get_condition, rfc3339, set_condition, status_changed, with_phase
from .decide import decide, ttl_remaining
from .endpoints import Allowlist, endpoint_problem
from .names import KUEUE_QUEUE_LABEL, LABEL_ATTEMPT, LABEL_JOB_UID, Body, child_names
from .parent import from_job, resolve_parent
from .progress import progress_to_status, tracking_condition
from .rayjob_status import rayjob_state, rayjob_to_status, trainer_may_have_written
from .states import TERMINAL, Action, Cond, Phase, RayJobState, Reason
from .storage_limits import THREADS as _STORAGE_THREADS
from .storage_limits import ReadSlots, Ticket
from .validate import spec_error_status, validate_job

log = logging.getLogger("kubetune.operator")

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayjobs"
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta1"


@dataclass
class Timing:
    poll_seconds: float = 10.0  # how often a live job is looked at without an event
    idle_seconds: float = 300.0  # finished jobs: a slow heartbeat only
    crd_backoff_max: float = 60.0
    storage_timeout_seconds: float = 20.0  # then StorageReadable=False, whatever the store does


QUEUE_CHECK_SECONDS = 30.0  # how long a LocalQueue lookup is trusted


class KubeRayMissing(Exception):
    """The ray.io/v1 RayJob API is not served: KubeRay's CRDs are not installed."""


class StaleStatus(Exception):
    """The FineTuneJob changed since the version this reconcile read: its status
    write was refused (409), nothing after it ran, and the job is read again."""


class Api:
    """The few Kubernetes calls the operator makes (blocking; run in threads)."""

    def __init__(self, api_client: client.ApiClient):
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.net = client.NetworkingV1Api(api_client)

    # FineTuneJob
    def get_job(self, ns: str, name: str) -> Optional[Body]:
        try:
            return self.custom.get_namespaced_custom_object(
                models.GROUP, models.VERSION, ns, models.PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_job_status(
        self, ns: str, name: str, status: dict, resource_version: Optional[str] = None
    ) -> Optional[Body]:
        """A merge patch of the status; with `resource_version`, the API server
        refuses it (409 Conflict) when the job has changed since that version."""
        body: dict = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self.custom.patch_namespaced_custom_object_status(
            models.GROUP, models.VERSION, ns, models.PLURAL, name, body
        )

    # ConfigMap
    def ensure_configmap(self, cm: Body, job: Body, fresh: bool = False) -> None:
        """Create-if-absent; a retry's attempt annotation and config are patched in.
        `fresh`: most likely absent, so try the create first. Raises ChildConflict
        for a ConfigMap of that name that is not the job's (left untouched)."""
        ns, name = cm["metadata"]["namespace"], cm["metadata"]["name"]
        if fresh:
            try:
                self.core.create_namespaced_config_map(ns, cm)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
        try:
            live = self.core.read_namespaced_config_map(name, ns)
        except ApiException as exc:
            if exc.status != 404:
                raise
            live = None
        if live is None:
            try:
                self.core.create_namespaced_config_map(ns, cm)
            except ApiException as exc:
                if exc.status != 409:
                    raise
            return
        ownership.check("ConfigMap", ns, name, live.metadata, job)
        want_attempt = cm["metadata"]["annotations"][LABEL_ATTEMPT]
        have_attempt = (live.metadata.annotations or {}).get(LABEL_ATTEMPT)
        if have_attempt != want_attempt:  # a retry: the config carries the attempt
            self.core.patch_namespaced_config_map(
                name,
                ns,
                {"metadata": {"annotations": cm["metadata"]["annotations"]}, "data": cm["data"]},
            )

    def ensure_children(self, cm: Body, job: Body, guards: list[Body], fresh: bool) -> None:
        self.ensure_guards(guards, job)
        self.ensure_configmap(cm, job, fresh)

    def ensure_guards(self, objs: list[Body], job: Body) -> None:
        """Create-if-absent the token Secret and NetworkPolicy; one of the job's
        that exists is left alone (the token never changes under running pods).
        Raises ChildConflict for one of that name that is not the job's: a token
        someone else chose, or their policy, would open the job's Ray cluster."""
        for obj in objs:
            ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
            secret = obj["kind"] == "Secret"
            try:
                if secret:
                    self.core.create_namespaced_secret(ns, obj)
                else:
                    self.net.create_namespaced_network_policy(ns, obj)
                continue
            except ApiException as exc:
                if exc.status != 409:
                    raise
            if secret:
                live = self.core.read_namespaced_secret(name, ns)
            else:
                live = self.net.read_namespaced_network_policy(name, ns)
            ownership.check(obj["kind"], ns, name, live.metadata, job)

    def delete_configmap(self, ns: str, name: str, job: Body) -> None:
        """Only the job's own: a ConfigMap of that name that someone else made is
        never deleted (the uid precondition also covers one re-created since)."""
        try:
            live = self.core.read_namespaced_config_map(name, ns)
            if ownership.owner_of(live.metadata, job) is not ownership.Owner.OURS:
                return
            self.core.delete_namespaced_config_map(
                name,
                ns,
                body=client.V1DeleteOptions(
                    preconditions=client.V1Preconditions(uid=live.metadata.uid)
                ),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    # RayJob
    def get_rayjob(self, ns: str, name: str) -> Optional[Body]:
        try:
            return self.custom.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_rayjob(self, rayjob: Body, job: Body) -> tuple[Body, bool]:
        """(the RayJob, whether this call created it). Raises ChildConflict for a
        RayJob of that name that is not the job's."""
        ns, name = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"]
        try:
            made = self.custom.create_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, rayjob
            )
            return made, True
        except ApiException as exc:
            if exc.status == 409:  # made by an earlier run of this operator, or not ours
                live = self.get_rayjob(ns, name)
                if live is not None:
                    ownership.check("RayJob", ns, name, live["metadata"], job)
                return live, False
            if exc.status == 404:  # the namespace exists (the job is in it): no such API
                raise KubeRayMissing(str(exc.reason)) from exc
            raise

    def list_rayjobs(self, ns: str, job_uid: str) -> list[Body]:
        """The RayJobs labelled with the job's uid (ownership is checked by the caller)."""
        return self.custom.list_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, label_selector=f"{LABEL_JOB_UID}={job_uid}"
        ).get("items", [])

    def patch_rayjob(self, ns: str, name: str, patch: dict) -> Body:
        return self.custom.patch_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, name, patch
        )

    def delete_rayjob(self, ns: str, name: str, job: Body) -> None:
        """Only the job's own: a RayJob of that name that someone else made is
        never deleted (the uid precondition also covers one re-created since)."""
        try:
            live = self.get_rayjob(ns, name)
            if not ownership.owned(live, job):
                return
            self.custom.delete_namespaced_custom_object(
                RAY_GROUP,
                RAY_VERSION,
                ns,
                RAY_PLURAL,
                name,
                body=client.V1DeleteOptions(
                    propagation_policy="Background",
                    preconditions=client.V1Preconditions(uid=live["metadata"]["uid"]),
                ),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def local_queue(self, ns: str, name: str) -> str:
        """ "found", "missing" (no such LocalQueue), "no-api" (Kueue not installed)
        or "unknown" (say nothing: e.g. RBAC forbids the look-up)."""
        try:
            self.custom.get_namespaced_custom_object(
                KUEUE_GROUP, KUEUE_VERSION, ns, "localqueues", name
            )
            return "found"
        except ApiException as exc:
            if exc.status != 404:
                return "unknown"
            try:
                details = json.loads(exc.body or "{}").get("details") or {}
            except ValueError:
                details = {}
            # A 404 for a missing object names it; one for a missing API does not.
            return "missing" if details.get("name") == name else "no-api"

    def read_secret(self, ns: str, name: str) -> dict[str, str]:
        secret = self.core.read_namespaced_secret(name, ns)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


_API_THREADS = 16
_API_POOL = ThreadPoolExecutor(max_workers=_API_THREADS, thread_name_prefix="kubetune-api")
# Storage reads run here, never in the API pool, and only once admitted by
# ReadSlots (per namespace, per store, in all: storage_limits.py), so a read
# never waits for a thread and a namespace whose stores stop answering holds
# at most its share of them.
_STORAGE_POOL = ThreadPoolExecutor(
    max_workers=_STORAGE_THREADS, thread_name_prefix="kubetune-storage"
)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


EventFn = Callable[[Body, str, str, str], None]
WakeFn = Callable[[str], None]


@dataclass
class StorageView:
    """One job's storage reads: at most one in flight, the latest result kept.

    Decisions never wait on it: a reconcile starts a read when none is running
    and shows whatever the last finished read found; the read wakes the job
    when it ends.
    """

    task: Optional[asyncio.Task] = None
    started: float = 0.0  # monotonic time the running/last read started
    snapshot: Optional[storage_reader.StorageSnapshot] = None
    problem: Optional[tuple[Reason, str]] = None  # (reason, message) of the last read
    fresh: bool = False  # a result not shown in status yet
    final_started: bool = False  # a read started after the job finished
    final_done: bool = False


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
        self._storage: dict[str, StorageView] = {}
        self.read_slots = read_slots if read_slots is not None else ReadSlots()
        metrics.STORAGE_READS.set_function(self.read_slots.in_flight)
        self._queue_cache: dict[tuple[str, str], tuple[float, Optional[str]]] = {}
        self._checked_cache: dict[str, tuple[tuple, list]] = {}
        # The attempt whose ConfigMap is known to exist: ConfigMaps are not
        # watched, so this saves a GET per reconcile (a restart checks once).
        self._cm_done: dict[str, int] = {}

    async def _call(self, fn, *args):
        metrics.API_CALLS.labels(call=fn.__name__).inc()
        return await asyncio.get_running_loop().run_in_executor(_API_POOL, fn, *args)

    async def _read_bounded(self, ticket: Ticket, fn, *args):
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

    async def _write_status(self, job: Body, old: dict, new: dict) -> dict:
        """The one status write path: only when changed; one event per transition."""
        new = redact_uris(new)  # no URI the operator echoes carries credentials
        if status_changed(old, new):
            meta = job["metadata"]
            # A merge patch: keys we dropped must be sent as null to go away.
            patch = {k: None for k in old if k not in new} | new
            # Fenced by the version this reconcile decided on: a write from a stale
            # view (a late replica, a body older than someone else's write) is
            # refused instead of clobbering a newer status, and the actions that
            # follow it (a retry's delete and create) never run.
            try:
                written = await self._call(
                    self.api.patch_job_status,
                    meta["namespace"],
                    meta["name"],
                    patch,
                    meta.get("resourceVersion"),
                )
            except ApiException as exc:
                if exc.status == 409:
                    metrics.STATUS_CONFLICTS.inc()
                    raise StaleStatus(meta.get("resourceVersion")) from None
                raise
            if written:
                self.cache.put_job(written)
                # A second write in this reconcile (a job that just finished) is
                # fenced by this one's answer. A new dict: the cache shares the old.
                version = written["metadata"]["resourceVersion"]
                job["metadata"] = {**meta, "resourceVersion": version}
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
        metrics.observe_phase(job["metadata"]["uid"], new.get("phase"))
        job["status"] = new
        return new

    async def reconcile(self, uid: str) -> Optional[float]:
        """Bring one FineTuneJob a step closer; return seconds until the next look
        (None: the job is gone). The caller (the scheduler) never runs two
        reconciles of one job at once."""
        started = time.perf_counter()
        try:
            return await self._reconcile(uid)
        except StaleStatus as exc:
            return await self._reread(uid, str(exc))
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

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
        fresh = await self._call(self.api.get_job, meta["namespace"], meta["name"])
        if fresh is None or fresh["metadata"].get("uid") != uid:
            return None  # deleted (the watch's DELETED event forgets it)
        self.cache.put_job(fresh)
        return 0.0

    async def _rayjob(self, ns: str, name: str) -> Optional[Body]:
        """From the watch cache; a GET only for one the watch has not shown yet
        (an operator just started, or a RayJob deleted by someone else)."""
        rayjob = self.cache.rayjob(ns, name)
        if rayjob is None:
            rayjob = await self._call(self.api.get_rayjob, ns, name)
            if rayjob is not None:
                self.cache.put_rayjob(rayjob)
        return rayjob

    async def _reconcile(self, uid: str) -> Optional[float]:
        # The watch cache holds our own last write too (see _write_status).
        job = self.cache.job(uid)
        if job is None:
            return None
        if job["metadata"].get("deletionTimestamp"):
            return self.timing.idle_seconds
        ns = job["metadata"]["namespace"]
        old = copy.deepcopy(job.get("status") or {})
        status = copy.deepcopy(old)
        now = _now()
        gen = job["metadata"].get("generation")

        attempts = int(status.get("attempts") or 1)
        errors, cm = self._checked(job, attempts)
        if errors:
            await self._write_status(job, old, spec_error_status(status, errors, now, gen))
            return self.timing.idle_seconds  # a bad spec waits for an edit, never hot-loops
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
            return await self._finished(job, old, status, now)

        # 0. The parent (spec.model.fromJob), resolved once and kept in status:
        # a retry must continue from the same one even if it is deleted later.
        if from_job(job) and not status.get("parent"):
            waiting = await self._parent(job, old, status, now, gen)
            if waiting is not None:
                return waiting
            errors, cm = self._checked(job, attempts)
            if errors:
                await self._write_status(job, old, spec_error_status(status, errors, now, gen))
                return self.timing.idle_seconds

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
        cm_call = None
        if self._cm_done.get(uid) != attempts:
            if cm is None:
                cm = spec_to_configmap(job, self.settings, attempts)
            guards = job_guards(job, self.settings, secrets.token_urlsafe(32))
            cm_call = asyncio.ensure_future(
                self._call(self.api.ensure_children, cm, job, guards, fresh)
            )
        created = False
        try:
            rayjob = None if fresh else await self._rayjob(ns, status["rayJobName"])
            if rayjob is not None:
                ownership.check("RayJob", ns, status["rayJobName"], rayjob["metadata"], job)
            missing = rayjob is None
            if missing:
                rayjob, created = await self._call(
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
            return await self._conflict(job, old, status, conflicts, now, gen)
        except KubeRayMissing:
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
            await self._write_status(job, old, status)
            raise
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
                rayjob = await self._call(self.api.patch_rayjob, ns, status["rayJobName"], patch)
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
        queued = rayjob_state(job, rayjob) == RayJobState.QUEUED
        if queued:
            queue_problem = await self._queue_problem(job)
        reading = trainer_may_have_written(job, rayjob, attempts)
        if reading:
            self._start_storage_read(job)
        status = self._show_storage(job, status, now, gen)

        # 4. Decide.
        job_view = {**job, "status": status}
        decision = decide(job_view, rayjob, now, queue_problem)
        if decision.action is Action.RETRY:
            failed_name = status["rayJobName"]
            attempts += 1
            status |= child_names(job, attempts) | {"attempts": attempts}
            status.pop("rayClusterName", None)
            status.pop("dashboardUrl", None)
            status = with_phase(status, decision.phase, decision.reason, decision.message, now, gen)
            status["observedGeneration"] = gen
            await self._write_status(job, old, status)  # the new name first, then the delete
            await self._call(self.api.delete_rayjob, ns, failed_name, job)
            return 0.0
        # 5. Act, then write status once. A Ray job that just ended shows its
        # final records together with its terminal phase: whoever waits for
        # `Succeeded` (kubectl wait, a pipeline) reads the last step and the
        # outputs, not the poll before them. The phase waits for one storage read
        # that starts after the end; it is bounded by the storage timeout, and a
        # store that does not answer gets the phase with StorageReadable=False.
        if (
            decision.phase in TERMINAL
            and decision.action is not Action.STOP_AND_DELETE
            and old.get("phase") not in TERMINAL
            and reading
            and not self._final_read_landed(job)
        ):
            status["observedGeneration"] = gen
            await self._write_status(job, old, status)
            return self.timing.poll_seconds  # the read wakes the job when it lands
        if decision.action is Action.STOP_AND_DELETE:
            await self._call(self.api.delete_rayjob, ns, status["rayJobName"], job)
        status = with_phase(status, decision.phase, decision.reason, decision.message, now, gen)
        status["observedGeneration"] = gen
        await self._write_status(job, old, status)
        if status["phase"] in TERMINAL:
            return await self._finished(job, copy.deepcopy(status), status, now)
        # Only the clock needs a poll: storage to read again, a deadline, a
        # LocalQueue (not watched). Everything else arrives as a watch event,
        # so a job that waits (suspended, starting) costs nothing in between.
        if reading or queued or job["spec"].get("activeDeadlineSeconds"):
            return self.timing.poll_seconds
        return self.timing.idle_seconds

    async def _delete_older_attempts(self, job: Body, attempts: int) -> None:
        """Delete the job's RayJobs of earlier attempts, when this attempt's RayJob
        is created: a retry deletes the failed one right after recording the new
        attempt, and an operator killed in between leaves it running beside the
        new one. (Their late writes do not count anyway: see kubetune_api.storage.)"""
        ns = job["metadata"]["namespace"]
        rayjobs = await self._call(self.api.list_rayjobs, ns, job["metadata"]["uid"])
        for name in ownership.older_attempts(rayjobs, job, attempts):
            log.info(
                "%s/%s: deleting RayJob %s of an earlier attempt", ns, job["metadata"]["name"], name
            )
            await self._call(self.api.delete_rayjob, ns, name, job)
            self.event(
                job,
                "Normal",
                Reason.OldAttemptDeleted,
                f"deleted RayJob {name} left by an earlier attempt",
            )

    async def _conflict(
        self,
        job: Body,
        old: dict,
        status: dict,
        conflicts: list[ownership.ChildConflict],
        now: datetime,
        gen,
    ) -> float:
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
            await self._write_status(job, old, status)
            return self.timing.poll_seconds
        kinds = {c.kind for c in foreign}
        used_by_pods = {"ConfigMap", "Secret", "NetworkPolicy"}
        if kinds & used_by_pods and "RayJob" not in kinds and status.get("rayJobName"):
            await self._call(self.api.delete_rayjob, meta["namespace"], status["rayJobName"], job)
        # Not ours: nothing of them is shown, and TTL cleanup does not name them.
        if "RayJob" in kinds:
            status.pop("rayJobName", None)
        if "ConfigMap" in kinds:
            status.pop("configMapName", None)
        message = "; ".join(ownership.conflict_message(c, job) for c in foreign)
        status = with_phase(status, Phase.Failed, Reason.NameConflict, message, now, gen)
        status["observedGeneration"] = gen
        await self._write_status(job, old, status)
        return self.timing.idle_seconds

    def _checked(self, job: Body, attempts: int) -> tuple[list, Optional[Body]]:
        """Validate (and render the config, which can fail too) once per
        (generation, labels, attempt): the spec only changes with the
        generation, so every other reconcile reuses the answer instead of
        parsing the spec again. Only the errors are kept (a rendered ConfigMap
        per job would be most of the operator's memory at a thousand jobs); the
        ConfigMap rendered by this call is handed back for this reconcile."""
        meta = job["metadata"]
        parent = (job.get("status") or {}).get("parent")
        key = (
            meta.get("generation"),
            json.dumps(meta.get("labels") or {}, sort_keys=True),
            attempts,
            json.dumps(parent, sort_keys=True),
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
        if not errors and (parent or not from_job(job)):  # else: resolve the parent first
            try:  # a spec that cannot render (no output URI anywhere) is invalid too
                cm = spec_to_configmap(job, self.settings, attempts)
            except SpecError as exc:
                errors = exc.errors
        self._checked_cache[meta["uid"]] = (key, errors)
        return errors, cm

    # ------------------------------------------------------------------ parent

    async def _parent(self, job: Body, old: dict, status: dict, now, gen) -> Optional[float]:
        """Resolve spec.model.fromJob into status.parent (and the body `job`);
        None when resolved, else the seconds until the next look (status written)."""
        ns = job["metadata"]["namespace"]
        parent_job = await self._call(self.api.get_job, ns, from_job(job))
        parent, problem = resolve_parent(job, parent_job, self.settings.default_output_uri)
        conds = list(status.get("conditions") or [])
        if problem is None:
            status["parent"] = parent
            status["conditions"] = set_condition(
                conds,
                Cond.ParentReady,
                "True",
                Reason.ParentResolved,
                f"continuing from FineTuneJob {parent['name']} at {parent['uri']}",
                now,
                gen,
            )
            job["status"] = {**(job.get("status") or {}), "parent": parent}
            return None
        phase, reason, message = problem
        status["conditions"] = set_condition(
            conds, Cond.ParentReady, "False", reason, message, now, gen
        )
        status = with_phase(status, phase, reason, message, now, gen)
        status["observedGeneration"] = gen
        await self._write_status(job, old, status)
        return self.timing.idle_seconds if phase in TERMINAL else self.timing.poll_seconds

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
        found = await self._call(self.api.local_queue, meta["namespace"], queue)
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

    # ------------------------------------------------------------------ storage

    def _output(self, job: Body) -> tuple[Optional[str], dict]:
        output = job["spec"].get("output") or {}
        uri = output.get("uri") or self.settings.default_output_uri
        return uri, output

    def _prefix(self, job: Body) -> Optional[str]:
        uri, _ = self._output(job)
        if not uri:
            return None
        meta = job["metadata"]
        return job_prefix(uri, meta["namespace"], meta["name"], meta["uid"])

    def _start_storage_read(self, job: Body, final: bool = False) -> None:
        """Start a read unless one is running (one per job) or one started less
        than a poll ago; never waits."""
        uid = job["metadata"]["uid"]
        view = self._storage.setdefault(uid, StorageView())
        if view.task is not None and not view.task.done():
            return
        since = time.monotonic() - view.started
        if not final and view.started and since < self.timing.poll_seconds * 0.9:
            return
        prefix = self._prefix(job)
        if prefix is None:
            return
        problem = endpoint_problem(job, self.allowlist)
        if problem is not None:  # never signed with the operator's identity
            view.problem = (Reason.EndpointNotAllowed, str(problem))
            view.fresh = True
            view.final_started = view.final_done = True
            return
        scheme, _ = split_uri(prefix)
        if scheme not in storage_reader.READABLE_SCHEMES:
            readable = ", ".join(s + "://" for s in storage_reader.READABLE_SCHEMES)
            view.problem = (
                Reason.SchemeNotReadable,
                f"the operator reads {readable} outputs only, not {scheme}:// ones: progress, "
                "metrics and checkpoints are not shown here (the trainer still writes them "
                f"under {prefix})",
            )
            view.fresh = True
            view.final_started = view.final_done = True
            return
        ticket, why = self.read_slots.take(
            job["metadata"]["namespace"], storage_reader.store_key(prefix, self._output(job)[1])
        )
        if ticket is None:  # not started this poll; the next one tries again
            metrics.STORAGE_DEFERRED.inc()
            self._read_queued(view, why)
            return
        view.started = time.monotonic()
        if final:
            view.final_started = True
        view.task = asyncio.get_running_loop().create_task(
            self._storage_read(job, prefix, view, ticket)
        )

    @staticmethod
    def _read_queued(view: StorageView, why: str) -> None:
        """A read not admitted (storage_limits.ReadSlots): StorageReadable=Unknown says
        so, unless the last read failed (that failure stays the news)."""
        if view.problem is not None and view.problem[0] is not Reason.StorageReadQueued:
            return
        view.problem = (
            Reason.StorageReadQueued,
            f"storage read not started this poll: {why}; the next poll tries again, and "
            "progress shown is from the last read (hint: reads of a store that does not "
            "answer hold their slots until they time out)",
        )
        view.fresh = True

    def _final_read_landed(self, job: Body) -> bool:
        """Whether a storage read started after the Ray job ended has landed;
        starts one if none has (behind a read in flight). Never waits."""
        if self._prefix(job) is None:
            return True  # nothing to read
        view = self._storage.setdefault(job["metadata"]["uid"], StorageView())
        if not view.final_started:
            self._start_storage_read(job, final=True)
        return view.final_done

    async def _storage_read(
        self, job: Body, prefix: str, view: StorageView, ticket: Ticket
    ) -> None:
        spec, meta = job["spec"], job["metadata"]
        _, output = self._output(job)
        keep = (spec.get("checkpointing") or {}).get("keepLast", 3)
        final = view.final_started
        endpoint = output.get("endpoint") or "the default endpoint"
        try:
            secret = {}
            ref = (output.get("secretRef") or {}).get("name")
            if ref:
                secret = await self._call(self.api.read_secret, meta["namespace"], ref)
            if ref and not all(secret.get(k) for k in storage_reader.KEY_PAIR):
                # Without the pair the client would fall back to the operator's own
                # credentials, at an endpoint the job chose: never.
                view.problem = (
                    Reason.StorageReadFailed,
                    f"Secret {ref} (spec.output.secretRef) has no "
                    f"{' and '.join(storage_reader.KEY_PAIR)}: the operator reads a job's "
                    "storage with the job's own keys only (hint: add both keys to the Secret)",
                )
            else:
                view.snapshot = await asyncio.wait_for(
                    self._read_bounded(
                        ticket, storage_reader.read_snapshot, prefix, output, secret, keep
                    ),
                    timeout=self.timing.storage_timeout_seconds,
                )
                too_large = storage_reader.too_large_message(view.snapshot)
                view.problem = (Reason.StorageFileTooLarge, too_large) if too_large else None
        except asyncio.TimeoutError:
            metrics.ERRORS.labels(kind="storage_timeout").inc()
            view.problem = (
                Reason.StorageTimeout,
                f"no answer from {strip_userinfo(endpoint)} within "
                f"{self.timing.storage_timeout_seconds:g}s reading {prefix}; progress shown is "
                "from the last successful read (hint: check spec.output.endpoint and that the "
                "object store is up)",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - storage trouble must not stop reconciling
            metrics.ERRORS.labels(kind="storage").inc()
            # Never echo exception text: it can carry a URL with credentials.
            view.problem = (
                Reason.StorageReadFailed,
                f"cannot read {prefix}: {type(exc).__name__} (hint: check spec.output.uri, "
                "spec.output.endpoint and the keys in spec.output.secretRef)",
            )
        finally:
            if not ticket.handed_over:
                ticket.release()  # no thread took it (the Secret's read failed)
            view.fresh = True
            if final:
                view.final_done = True
        self.wake(meta["uid"])

    def _show_storage(self, job: Body, status: dict, now: datetime, gen) -> dict:
        """The last storage read, into status (progress, metrics, checkpoints,
        outputs and the StorageReadable condition)."""
        view = self._storage.get(job["metadata"]["uid"])
        if view is None:
            return status
        view.fresh = False
        conds = list(status.get("conditions") or [])
        if view.problem is not None:
            reason, message = view.problem
            unknown = (Reason.SchemeNotReadable, Reason.StorageReadQueued)
            state = "Unknown" if reason in unknown else "False"
            conds = set_condition(conds, Cond.StorageReadable, state, reason, message, now, gen)
        elif view.snapshot is not None and get_condition(status, Cond.StorageReadable):
            conds = set_condition(
                conds,
                Cond.StorageReadable,
                "True",
                Reason.Read,
                f"read {view.snapshot.prefix}",
                now,
                gen,
            )
        status["conditions"] = conds
        if view.snapshot is None:
            return status
        keep = (job["spec"].get("checkpointing") or {}).get("keepLast", 3)
        status |= progress_to_status(view.snapshot, keep, int(status.get("attempts") or 1))
        tracked = tracking_condition(view.snapshot)
        if tracked is not None:
            ok, message = tracked
            status["conditions"] = set_condition(
                status["conditions"],
                Cond.TrackingReachable,
                "True" if ok else "False",
                Reason.TrackingRunStarted if ok else Reason.TrackingUnreachable,
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

    async def _finished(self, job: Body, old: dict, status: dict, now: datetime) -> float:
        """A finished job: read its final files once more (in the background),
        then TTL cleanup."""
        ns = job["metadata"]["namespace"]
        gen = job["metadata"].get("generation")
        view = self._storage.setdefault(job["metadata"]["uid"], StorageView())
        idle = view.task is None or view.task.done()
        if status.get("rayJobName") and not view.final_started and idle:
            self._start_storage_read(job, final=True)
        status = self._show_storage(job, status, now, gen)
        job_view = {**job, "status": status}
        remaining = ttl_remaining(job_view, now)
        if (
            remaining is not None
            and remaining <= 0
            and not get_condition(status, Cond.ChildrenDeleted)
        ):
            deleted = []
            if status.get("rayJobName"):
                await self._call(self.api.delete_rayjob, ns, status["rayJobName"], job)
                deleted.append(f"RayJob {status['rayJobName']}")
            if status.get("configMapName"):
                await self._call(self.api.delete_configmap, ns, status["configMapName"], job)
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
        await self._write_status(job, old, status)
        if not view.final_done:
            return self.timing.poll_seconds  # the final read wakes the job when it ends
        if remaining is not None and remaining > 0:
            return min(remaining, self.timing.idle_seconds)
        return self.timing.idle_seconds

    def forget(self, uid: str) -> None:
        """The job is gone: drop its storage view (a running read ends on its own)."""
        self._storage.pop(uid, None)
        self._checked_cache.pop(uid, None)
        self._cm_done.pop(uid, None)

    async def stop(self, ns: str, name: str, uid: str, status: dict) -> bool:
        """On deletion: delete the RayJob (KubeRay stops the Ray job and its cluster).
        True once it is gone, or when that name is not the job's (never touched)."""
        rj_name = status.get("rayJobName")
        if not rj_name:
            return True
        job = {"metadata": {"namespace": ns, "name": name, "uid": uid}}
        rayjob = await self._call(self.api.get_rayjob, ns, rj_name)
        if not ownership.owned(rayjob, job):
            return True
        if not rayjob["metadata"].get("deletionTimestamp"):
            await self._call(self.api.delete_rayjob, ns, rj_name, job)
        return await self._call(self.api.get_rayjob, ns, rj_name) is None
