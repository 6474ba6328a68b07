"""kopf wiring only: every decision lives in the pure modules (decide, children, ...)
and in reconciler (I/O, through kube and storage_view).

The FineTuneJob and RayJob watch streams feed the watch cache and wake jobs in
the one scheduler (a due-time queue and a few workers, never two reconciles of
one job at once). The handlers here are raw event handlers, which persist
nothing: no kopf progress or diff-base annotations are written per job. The
only kopf-managed handler is the deletion one, behind the operator's finalizer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import kopf

from kubetune_api import models
from kubetune_api.storage import redact_uris

from . import memory, metrics
from .cache import WatchCache
from .children import Settings
from .endpoints import ENV as ALLOWLIST_ENV
from .endpoints import Allowlist
from .kube import API_THREADS, Api, KubeRayMissing
from .names import LABEL_JOB_UID
from .reconciler import Reconciler, Timing
from .scheduler import Scheduler
from .storage_limits import ReadSlots

KOPF_PREFIX = "kopf.kubetune.io"
COMPONENT = "kubetune-operator"  # events say "From kubetune-operator"
FINALIZER = "kubetune.io/finalizer"
DELETE_WAIT_RETRIES = 30  # x DELETE_WAIT_SECONDS: then the garbage collector finishes
DELETE_WAIT_SECONDS = 2.0
HAND_BACK_WAIT_SECONDS = 5.0  # a clean stop waits this long for reconciles in flight

# Enough to keep the API pool busy; a reconcile waits on API calls, not the CPU.
RECONCILE_WORKERS = 8

log = logging.getLogger("kubetune.operator")
_state: dict = {}
_backoff: dict[str, float] = {}  # uid -> the next error backoff, only while failing


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """No diff base at all: no handler here compares an old spec with a new one
    (watch events drive the reconciles), so storing kopf's
    `last-handled-configuration` would only cost a PATCH per job, and building
    it would deep-copy every watched body (FineTuneJobs and RayJobs) twice per
    event. Every event reads as unchanged to kopf, which is all the deletion
    handler needs."""

    def build(self, *, body, extra_fields=None):
        return {}

    def fetch(self, *, body):
        return {}

    def store(self, *, body, patch, essence) -> None:
        return None


def settings_from_env() -> tuple[Settings, Timing]:
    env = os.environ
    settings = Settings(
        trainer_image=env.get("KUBETUNE_TRAINER_IMAGE", Settings.trainer_image),
        ray_version=env.get("KUBETUNE_RAY_VERSION", Settings.ray_version),
        default_output_uri=env.get("KUBETUNE_DEFAULT_OUTPUT_URI") or None,
        rayjob_ttl_seconds=int(env.get("KUBETUNE_RAYJOB_TTL_SECONDS", Settings.rayjob_ttl_seconds)),
        run_as_user=int(env.get("KUBETUNE_RUN_AS_USER", Settings.run_as_user)),
        network_policy=env.get("KUBETUNE_NETWORK_POLICY", "true").lower() != "false",
        ray_operator_peer=env.get("KUBETUNE_RAY_OPERATOR_PEER") or None,
        staging_claim=env.get("KUBETUNE_STAGING_CLAIM") or None,
    )
    timing = Timing(
        poll_seconds=float(env.get("KUBETUNE_POLL_SECONDS", Timing.poll_seconds)),
        idle_seconds=float(env.get("KUBETUNE_IDLE_SECONDS", Timing.idle_seconds)),
        crd_backoff_max=float(env.get("KUBETUNE_BACKOFF_MAX_SECONDS", Timing.crd_backoff_max)),
        storage_timeout_seconds=float(
            env.get("KUBETUNE_STORAGE_TIMEOUT_SECONDS", Timing.storage_timeout_seconds)
        ),
        start_timeout_seconds=int(
            env.get("KUBETUNE_START_TIMEOUT_SECONDS", Timing.start_timeout_seconds)
        ),
    )
    return settings, timing


def _api_client():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # One connection per API thread (and a few spare): a smaller pool makes
    # urllib3 open and drop extra connections with a warning each time.
    configuration.connection_pool_maxsize = API_THREADS + 4
    return client.ApiClient(configuration)


def _event(job: dict, type_: str, reason: str, message: str) -> None:
    kopf.event(job, type=type_, reason=reason, message=redact_uris(message)[:1024])


class RedactUris(logging.Filter):
    """Strip userinfo from any URI in a log line, whoever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact_uris(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, logger, **_) -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactUris) for f in handler.filters):
            handler.addFilter(RedactUris())
    if os.environ.get("KUBETUNE_LOG_LEVEL", "INFO").upper() != "DEBUG":
        # One line per handled watch event and per health probe: noise at any
        # scale. Handler failures are warnings and errors, and still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # A structural status schema prunes kopf's status.kopf: keep its state in
    # annotations under our own prefix, with our own finalizer.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = COMPONENT
    settings.execution.default_backoff = 1
    timeout = os.environ.get("KUBETUNE_WATCH_SERVER_TIMEOUT")
    if timeout:
        settings.watching.server_timeout = int(float(timeout))
    memory.limit_arenas()
    job_settings, timing = settings_from_env()
    cache = WatchCache()
    scheduler = Scheduler(_run, workers=RECONCILE_WORKERS)
    _state["timing"] = timing
    _state["cache"] = cache
    _state["scheduler"] = scheduler
    _state["reconciler"] = Reconciler(
        Api(_api_client()),
        job_settings,
        timing,
        _event,
        wake=_wake_known,
        cache=cache,
        allowlist=Allowlist.from_env(os.environ.get(ALLOWLIST_ENV)),
        read_slots=ReadSlots.from_env(os.environ),
    )
    port = int(os.environ.get("KUBETUNE_METRICS_PORT", "0") or 0)
    if port:
        metrics.serve(port)
    if "leading" not in _state:  # no leader election: this replica acts alone
        metrics.LEADER.set(1)
    logger.info(
        "kubetune operator: image %s, ray %s, poll %ss",
        job_settings.trainer_image,
        job_settings.ray_version,
        timing.poll_seconds,
    )


def _scheduler() -> Scheduler:
    """The scheduler, its workers started on first use: from inside a watch
    handler, so they inherit kopf's per-task context that `kopf.event` needs."""
    scheduler: Scheduler = _state["scheduler"]
    if not scheduler.started:
        scheduler.start()
        _state["trim"] = asyncio.get_running_loop().create_task(memory.trim_periodically())
    return scheduler


def _wake_known(uid: str) -> None:
    if "scheduler" in _state and _state["cache"].has_job(uid):
        _scheduler().wake(uid)


def _forget(uid: str) -> None:
    _state["cache"].drop_job(uid)
    _state["scheduler"].forget(uid)
    _state["reconciler"].forget(uid)
    _backoff.pop(uid, None)
    metrics.forget(uid)


def act_only_while(leading: Callable[[], bool], hand_back: Callable[[], None]) -> None:
    """Leader election (`kubetune operator --leader-elect`): reconcile only while
    `leading()` says this replica holds the Lease. The Lease thread stops the
    process when it is lost; this closes the gap until it does (a process that
    was frozen past its renew deadline acts on nothing when it wakes). On a
    clean stop, `hand_back()` releases the Lease as soon as nothing here acts
    any more, not after kopf's own shutdown (which waits up to 5 s for its tasks)."""
    _state["leading"] = leading
    _state["hand_back"] = hand_back


async def _run(uid: str):
    """One reconcile, for the scheduler: errors become a backoff, never an end."""
    reconciler: Reconciler = _state["reconciler"]
    timing: Timing = _state["timing"]
    leading = _state.get("leading")
    if leading is not None and not leading():
        log.debug("not the leader (the Lease is not renewed): reconcile of %s skipped", uid)
        return timing.poll_seconds
    try:
        delay = await reconciler.reconcile(uid)
    except KubeRayMissing:
        metrics.ERRORS.labels(kind="kuberay_missing").inc()
        backoff = _backoff.get(uid, 1.0)
        log.warning("RayJob CRD not found; retrying in %.0fs", backoff)
    except Exception:  # noqa: BLE001 - one job's trouble must not stop the others
        metrics.ERRORS.labels(kind="unexpected").inc()
        backoff = _backoff.get(uid, 1.0)
        job = _state["cache"].job(uid) or {"metadata": {}}
        meta = job["metadata"]
        log.exception(
            "reconcile of %s/%s failed; retrying in %.0fs",
            meta.get("namespace"),
            meta.get("name"),
            backoff,
        )
    else:
        _backoff.pop(uid, None)
        return delay
    _backoff[uid] = min(backoff * 2, timing.crd_backoff_max)
    return backoff


@kopf.on.cleanup()
async def stop_scheduler(**_) -> None:
    trim = _state.pop("trim", None)
    if trim is not None:
        trim.cancel()
    scheduler = _state.pop("scheduler", None)
    if scheduler is not None:
        await scheduler.stop()
    hand_back = _state.pop("hand_back", None)
    if hand_back is not None:
        _state["leading"] = lambda: False  # from now on nothing here reconciles
        loop = asyncio.get_running_loop()
        end = loop.time() + HAND_BACK_WAIT_SECONDS
        while scheduler is not None and scheduler.running() and loop.time() < end:
            await asyncio.sleep(0.05)  # a new job's first reconcile, in kopf's event task
        await loop.run_in_executor(None, hand_back)


@kopf.on.probe(id="reconciler")
def reconciler_ready(**_) -> bool:
    return "reconciler" in _state


@kopf.on.event(models.GROUP, models.VERSION, models.PLURAL)
async def on_job_event(type, body, uid: str, **_) -> None:
    # A new job is reconciled straight from its ADDED event, in kopf's task for
    # it: the RayJob's create is sent before kopf's finalizer patch and waits
    # for nothing but its own API calls. Events that bring nothing newer than
    # the cache (our own status writes, already stored) wake nothing.
    if "scheduler" not in _state:
        return
    if type == "DELETED":
        _forget(uid)
        return
    if not _state["cache"].put_job(body):
        return
    if type == "ADDED" and not (body.get("status") or {}).get("rayJobName"):
        await _scheduler().run_now(uid)
    else:
        _scheduler().wake(uid)


@kopf.on.event("ray.io", "v1", "rayjobs", labels={LABEL_JOB_UID: kopf.PRESENT})
async def on_rayjob_event(type, body, labels, name: str, namespace: str, **_) -> None:
    if "scheduler" not in _state:
        return
    cache: WatchCache = _state["cache"]
    if type == "DELETED":
        cache.drop_rayjob(namespace, name)
    elif not cache.put_rayjob(body):
        return
    _wake_known(labels.get(LABEL_JOB_UID))


@kopf.on.delete(models.GROUP, models.VERSION, models.PLURAL, backoff=2)
async def stop_ray_job(name: str, namespace: str, uid: str, status, logger, **_) -> None:
    # Waiting for the RayJob to go is the normal path of a delete: it loops here
    # (logged at info) instead of raising kopf's TemporaryError, which kopf
    # logs as an error on every try.
    leading = _state.get("leading")
    if leading is not None and not leading():
        raise kopf.TemporaryError("not the leader: the Lease is not renewed", delay=5)
    reconciler: Reconciler = _state["reconciler"]
    for attempt in range(DELETE_WAIT_RETRIES):
        if await reconciler.stop(namespace, name, uid, dict(status or {})):
            break
        if attempt == 0:
            logger.info("waiting for RayJob %s to stop and go", (status or {}).get("rayJobName"))
        await asyncio.sleep(DELETE_WAIT_SECONDS)
    else:
        logger.warning(
            "RayJob still present after %ss; the garbage collector takes over",
            DELETE_WAIT_RETRIES * DELETE_WAIT_SECONDS,
        )
    reconciler.forget(uid)
    metrics.forget(uid)
    _backoff.pop(uid, None)
