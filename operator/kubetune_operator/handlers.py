"""kopf wiring only: every decision lives in the pure modules (decide, children, ...)
and in reconciler (I/O).

One daemon per FineTuneJob runs the reconcile loop; change handlers and
RayJob events only wake it, so reconciles of one job never overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping

import kopf

from kubetune_api import models
from kubetune_api.storage import redact_uris

from . import metrics
from .children import Settings
from .names import LABEL_JOB_UID
from .reconciler import _API_THREADS as API_THREADS
from .reconciler import Api, KubeRayMissing, Reconciler, Timing

KOPF_PREFIX = "kopf.kubetune.io"
COMPONENT = "kubetune-operator"  # events say "From kubetune-operator"
FINALIZER = "kubetune.io/finalizer"
DELETE_WAIT_RETRIES = 30  # x DELETE_WAIT_SECONDS: then the garbage collector finishes
DELETE_WAIT_SECONDS = 2.0

_state: dict = {}
_wakers: dict[str, asyncio.Event] = {}


def settings_from_env() -> tuple[Settings, Timing]:
    env = os.environ
    settings = Settings(
        trainer_image=env.get("KUBETUNE_TRAINER_IMAGE", Settings.trainer_image),
        ray_version=env.get("KUBETUNE_RAY_VERSION", Settings.ray_version),
        default_output_uri=env.get("KUBETUNE_DEFAULT_OUTPUT_URI") or None,
        rayjob_ttl_seconds=int(env.get("KUBETUNE_RAYJOB_TTL_SECONDS", Settings.rayjob_ttl_seconds)),
    )
    timing = Timing(
        poll_seconds=float(env.get("KUBETUNE_POLL_SECONDS", Timing.poll_seconds)),
        idle_seconds=float(env.get("KUBETUNE_IDLE_SECONDS", Timing.idle_seconds)),
        crd_backoff_max=float(env.get("KUBETUNE_BACKOFF_MAX_SECONDS", Timing.crd_backoff_max)),
        storage_timeout_seconds=float(
            env.get("KUBETUNE_STORAGE_TIMEOUT_SECONDS", Timing.storage_timeout_seconds)
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
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = COMPONENT
    settings.execution.default_backoff = 1
    timeout = os.environ.get("KUBETUNE_WATCH_SERVER_TIMEOUT")
    if timeout:
        settings.watching.server_timeout = int(float(timeout))
    job_settings, timing = settings_from_env()
    _state["timing"] = timing
    _state["reconciler"] = Reconciler(
        Api(_api_client()), job_settings, timing, _event, wake=_wake_if_watched
    )
    port = int(os.environ.get("KUBETUNE_METRICS_PORT", "0") or 0)
    if port and not _state.get("metrics_serving"):
        metrics.serve(port)
        _state["metrics_serving"] = True
    logger.info(
        "kubetune operator: image %s, ray %s, poll %ss",
        job_settings.trainer_image,
        job_settings.ray_version,
        timing.poll_seconds,
    )


def _plain(obj):
    """kopf's read-only body views → plain dicts and lists the reconciler may change."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _wake(uid: str) -> None:
    _wakers.setdefault(uid, asyncio.Event()).set()


def _wake_if_watched(uid: str) -> None:
    if uid in _wakers:
        _wakers[uid].set()


@kopf.on.probe(id="reconciler")
def reconciler_ready(**_) -> bool:
    return "reconciler" in _state


@kopf.on.create(models.GROUP, models.VERSION, models.PLURAL, backoff=1)
@kopf.on.update(models.GROUP, models.VERSION, models.PLURAL, backoff=1)
@kopf.on.resume(models.GROUP, models.VERSION, models.PLURAL, backoff=1)
def on_change(uid: str, **_) -> None:
    _wake(uid)


@kopf.on.event(models.GROUP, models.VERSION, models.PLURAL)
async def on_job_event(type, body, name: str, namespace: str, uid: str, **_) -> None:
    # A new job's first reconcile runs straight from its watch event, before
    # kopf's finalizer round trip and the daemon's start: the RayJob's creation
    # waits for nothing but its own API calls.
    reconciler: Reconciler | None = _state.get("reconciler")
    if reconciler is None or type not in ("ADDED", None):
        return
    if (body.get("status") or {}).get("rayJobName") or body["metadata"].get("deletionTimestamp"):
        return
    try:
        await reconciler.reconcile(namespace, name, uid, _plain(body))
    except Exception:  # noqa: BLE001 - the daemon's loop retries with backoff
        metrics.ERRORS.labels(kind="first_reconcile").inc()


@kopf.on.event("ray.io", "v1", "rayjobs", labels={LABEL_JOB_UID: kopf.PRESENT})
def on_rayjob_event(labels, **_) -> None:
    uid = labels.get(LABEL_JOB_UID)
    if uid in _wakers:
        _wakers[uid].set()


@kopf.daemon(models.GROUP, models.VERSION, models.PLURAL, id="reconcile", cancellation_timeout=2.0)
async def reconcile_loop(name: str, namespace: str, uid: str, stopped, logger, **_) -> None:
    reconciler: Reconciler = _state["reconciler"]
    timing: Timing = _state["timing"]
    wake = _wakers.setdefault(uid, asyncio.Event())
    backoff = 1.0
    try:
        while not stopped:
            wake.clear()
            try:
                delay = await reconciler.reconcile(namespace, name, uid)
                backoff = 1.0
            except KubeRayMissing:
                metrics.ERRORS.labels(kind="kuberay_missing").inc()
                logger.warning("RayJob CRD not found; retrying in %.0fs", backoff)
                delay, backoff = backoff, min(backoff * 2, timing.crd_backoff_max)
            except Exception:  # noqa: BLE001 - one job's trouble must not end its loop
                metrics.ERRORS.labels(kind="unexpected").inc()
                logger.exception("reconcile failed; retrying in %.0fs", backoff)
                delay, backoff = backoff, min(backoff * 2, timing.crd_backoff_max)
            if delay <= 0:
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=delay)
    finally:
        _wakers.pop(uid, None)


@kopf.on.delete(models.GROUP, models.VERSION, models.PLURAL, backoff=2)
async def stop_ray_job(name: str, namespace: str, uid: str, status, logger, **_) -> None:
    # Waiting for the RayJob to go is the normal path of a delete: it loops here
    # (logged at info) instead of raising kopf's TemporaryError, which kopf
    # logs as an error on every try.
    reconciler: Reconciler = _state["reconciler"]
    for attempt in range(DELETE_WAIT_RETRIES):
        if await reconciler.stop(namespace, name, dict(status or {})):
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
