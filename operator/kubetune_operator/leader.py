"""Leader election on a coordination.k8s.io/v1 Lease: of all operator replicas,
only the one holding the Lease runs kopf (watches, reconciles, writes).

The rules, with `duration` = the Lease's leaseDurationSeconds (15 s),
`deadline` = the renew deadline (10 s) and `retry` = the retry period (2 s):
- A standby reads the Lease every `retry`. It takes the Lease over only when
  the Lease's record (its resourceVersion) has not changed for `duration` by
  the standby's own monotonic clock since it first saw that record, or when the
  Lease has no holder (released). Clocks of different machines are never
  compared: renewTime is written for people, not read for decisions.
- The leader renews every `deadline / 2` (retrying every `retry` after a failed
  try). From `deadline` after the start of its last successful renewal it
  acts on nothing (the reconcile guard reads the same clock), a watchdog tells
  kopf to stop, and the process exits non-zero within 0.6 s: the pod restarts
  as a standby. A try that hangs counts as failed (each call has a timeout).
- Every write to the Lease (create, renew, take-over, release) carries the
  resourceVersion it read, so of two replicas racing only one wins.

Why two leaders never act at once: the leader's last successful renewal was
sent at s, so it has stopped by s + deadline + 0.6 s. A standby saw that
record at o >= s and takes over no earlier than o + duration; `check` keeps
duration - deadline >= 1 s.

Failover after a leader dies without releasing (SIGKILL, node loss): the
standby sees its last renewal within `retry`, waits `duration` from then and
looks every `retry`, so it holds the Lease at most duration + 2 * retry after
the death (19 s with the defaults; at least duration - deadline / 2 = 10 s),
then starts kopf. A leader that stops cleanly (SIGTERM: a rolling update, a
drain) releases the Lease, and a standby takes it within `retry`.

The pure part (what to do with what was read) is `LeaseClock` and
`may_acquire`; `LeaderElector` does the API calls (blocking, in its own thread,
with its own API client: never waits on the operator's event loop).
"""

from __future__ import annotations

import http.server
import logging
import math
import os
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from kubernetes.client.rest import ApiException

from . import metrics

log = logging.getLogger("kubetune.leader")

GROUP, VERSION, PLURAL = "coordination.k8s.io", "v1", "leases"
DEFAULT_LEASE = "kubetune-operator"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
ENV_DURATION = "KUBETUNE_LEASE_DURATION_SECONDS"
ENV_DEADLINE = "KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS"
ENV_RETRY = "KUBETUNE_LEASE_RETRY_SECONDS"
# From the renew deadline to a hard exit, whatever kopf is doing: the watchdog's
# tick plus the grace. A deadline at least 1 s below the lease duration keeps
# it before any standby's take-over.
WATCHDOG_TICK_SECONDS = 0.1
EXIT_GRACE_SECONDS = 0.5
MIN_GAP_SECONDS = 1.0


@dataclass(frozen=True)
class LeaseTiming:
    duration: float = 15.0  # a standby waits this long on an unchanged Lease
    deadline: float = 10.0  # a leader that has not renewed for this long stops acting
    retry: float = 2.0  # how often a standby looks, and a failed renewal is retried

    @property
    def renew_every(self) -> float:
        return self.deadline / 2

    @property
    def failover_bound(self) -> float:
        """Seconds from a leader's death to a standby holding the Lease, at most."""
        return self.duration + 2 * self.retry

    def check(self) -> None:
        """The bounds that keep two leaders from acting at once; the error names
        the variable to change."""
        if min(self.duration, self.deadline, self.retry) <= 0:
            raise ValueError(f"{ENV_DURATION}, {ENV_DEADLINE} and {ENV_RETRY} must be > 0")
        if self.duration - self.deadline < MIN_GAP_SECONDS:
            raise ValueError(
                f"{ENV_DEADLINE}={self.deadline:g} must be at least {MIN_GAP_SECONDS:g}s "
                f"below {ENV_DURATION}={self.duration:g}: a leader must have stopped before a "
                "standby may take over"
            )
        if self.retry >= self.deadline:
            raise ValueError(
                f"{ENV_RETRY}={self.retry:g} must be below {ENV_DEADLINE}={self.deadline:g}: a "
                "failed renewal is retried before the deadline"
            )

    @classmethod
    def from_env(cls, env: Optional[dict] = None) -> LeaseTiming:
        env = os.environ if env is None else env
        values = {}
        for field, var in (
            ("duration", ENV_DURATION),
            ("deadline", ENV_DEADLINE),
            ("retry", ENV_RETRY),
        ):
            raw = env.get(var)
            if raw:
                try:
                    values[field] = float(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r}: a number of seconds") from None
        timing = cls(**values)
        timing.check()
        return timing


@dataclass
class LeaseClock:
    """When this replica first saw the Lease's current record (monotonic)."""

    version: Optional[str] = None
    seen_at: float = 0.0

    def observe(self, version: Optional[str], now: float) -> None:
        if version != self.version:
            self.version, self.seen_at = version, now


def may_acquire(
    holder: Optional[str], me: str, clock: LeaseClock, duration: float, now: float
) -> bool:
    """Whether a replica that read a Lease (held by `holder`, unchanged since
    `clock.seen_at`) may write itself in as the holder."""
    if not holder or holder == me:
        return True
    return now - clock.seen_at >= duration


def micro_time(when: Optional[datetime] = None) -> str:
    """Kubernetes MicroTime (RFC 3339, microseconds, UTC)."""
    when = when or datetime.now(timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def identity() -> str:
    """The pod's name (the chart sets KUBETUNE_POD_NAME; a pod's hostname is its
    name too) and a random suffix: a restarted process is a new candidate."""
    base = os.environ.get("KUBETUNE_POD_NAME") or socket.gethostname()
    return f"{base}_{secrets.token_hex(4)}"


def own_namespace() -> Optional[str]:
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


class LeaderElector:
    """Acquire, renew and release one Lease. Blocking calls; the standby loop
    runs in the caller's thread, the renewal loop in a thread of its own."""

    def __init__(
        self,
        custom: Any,  # rest.Rest (or kubernetes.client.CustomObjectsApi): get, create, replace
        namespace: str,
        name: str,
        me: str,
        timing: LeaseTiming,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.custom = custom
        self.namespace, self.name, self.me = namespace, name, me
        self.timing = timing
        self.monotonic = monotonic
        self.clock = LeaseClock()
        self.renewed_at: Optional[float] = None  # start of the last successful write as holder
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._holder: Optional[str] = None
        self._version: Optional[str] = None
        self._released = False
        self._release_lock = threading.Lock()
        # No call waits forever: a try that times out is one failed try.
        self._timeout = max(1.0, timing.deadline / 2)

    # ---------------------------------------------------------------- state

    @property
    def leading(self) -> bool:
        """Holder now, by this replica's own clock: false from the renew deadline on."""
        if self.renewed_at is None or self.lost.is_set():
            return False
        return self.monotonic() - self.renewed_at < self.timing.deadline

    # ---------------------------------------------------------------- one try

    def _read(self) -> Optional[dict]:
        try:
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _spec(self, acquire: bool, transitions: int) -> dict:
        now = micro_time()
        spec = {
            "holderIdentity": self.me,
            # Whole seconds, rounded up: a standby never waits less than configured.
            "leaseDurationSeconds": math.ceil(self.timing.duration),
            "renewTime": now,
            "leaseTransitions": transitions,
        }
        if acquire:
            spec["acquireTime"] = now
        return spec

    def try_once(self) -> bool:
        """One look at the Lease: create it, renew it, or take it over when
        allowed. True when this replica holds it after the call."""
        started = self.monotonic()  # the leader's deadline counts from before its write
        lease = self._read()
        # A standby's wait counts from after the read: the record it saw was
        # written before this, so a slow answer never shortens the wait.
        read_at = self.monotonic()
        try:
            if lease is None:
                body = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(acquire=True, transitions=0),
                }
                written = self.custom.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, body, _request_timeout=self._timeout
                )
            else:
                spec = lease.get("spec") or {}
                holder = spec.get("holderIdentity")
                version = lease["metadata"]["resourceVersion"]
                self.clock.observe(version, read_at)
                self._holder = holder
                duration = float(spec.get("leaseDurationSeconds") or self.timing.duration)
                if holder != self.me:
                    if self.renewed_at is not None:
                        self._lose(f"the Lease is held by {holder or 'nobody'} now")
                        return False
                    if not may_acquire(holder, self.me, self.clock, duration, read_at):
                        return False
                transitions = int(spec.get("leaseTransitions") or 0)
                acquire = holder != self.me
                body = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.name,
                        "namespace": self.namespace,
                        "resourceVersion": version,  # optimistic concurrency: one winner
                    },
                    "spec": (spec if not acquire else {})
                    | self._spec(acquire, transitions + (1 if acquire and holder else 0)),
                }
                written = self.custom.replace_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    self.name,
                    body,
                    _request_timeout=self._timeout,
                )
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote first: read again next time
                return False
            raise
        first = self.renewed_at is None
        self.renewed_at = started
        self._version = written["metadata"]["resourceVersion"]
        self.clock.observe(self._version, started)
        self._holder = self.me
        if first:
            log.info(
                "leader election: %s now holds Lease %s/%s", self.me, self.namespace, self.name
            )
            metrics.LEADER.set(1)
        return True

    # ---------------------------------------------------------------- loops

    def wait_until_leading(self) -> None:
        """Standby: look every `retry` until this replica holds the Lease."""
        metrics.LEADER.set(0)
        said = None
        while not self._stop.is_set():
            try:
                if self.try_once():
                    return
            except Exception as exc:  # noqa: BLE001 - the API server may come back
                log.warning(
                    "leader election: cannot read Lease %s/%s: %s",
                    self.namespace,
                    self.name,
                    _brief(exc),
                )
            if self._holder != said:
                said = self._holder
                log.info(
                    "leader election: standby as %s; Lease %s/%s is held by %s",
                    self.me,
                    self.namespace,
                    self.name,
                    said,
                )
            self._stop.wait(self.timing.retry)

    def renew_forever(self, on_lost: Callable[[], None]) -> None:
        """Start renewing (one thread) and watching the deadline (another: a
        renewal stuck in a slow API call must not delay the stop). `on_lost`
        runs once, from the watchdog, when the Lease is lost."""

        def renew() -> None:
            wait = self.timing.renew_every
            while not self._stop.wait(wait) and not self.lost.is_set():
                try:
                    ok = self.try_once()  # another holder: lost, inside
                except Exception as exc:  # noqa: BLE001 - counted against the deadline
                    log.warning("leader election: renewing Lease failed: %s", _brief(exc))
                    ok = False
                if not ok:
                    metrics.LEASE_RENEW_FAILURES.inc()
                wait = self.timing.renew_every if ok else self.timing.retry

        def watch() -> None:
            while not self._stop.wait(WATCHDOG_TICK_SECONDS):
                if self.lost.is_set() or not self.leading:
                    self._lose(f"no renewal for {self.timing.deadline:g}s")
                    on_lost()
                    return

        for target, name in ((renew, "kubetune-lease"), (watch, "kubetune-lease-watchdog")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            log.error(
                "leader election: %s lost Lease %s/%s (%s): stopping",
                self.me,
                self.namespace,
                self.name,
                why,
            )
            metrics.LEADER.set(0)
            self.lost.set()

    def stop(self) -> None:
        self._stop.set()

    def release(self) -> None:
        """A clean stop: hand the Lease back so a standby takes it within `retry`
        (only if it is still ours: the write carries the version last written)."""
        self._stop.set()
        with self._release_lock:
            if self._released or self.renewed_at is None or self.lost.is_set():
                return
            self._released = True
        try:
            lease = self._read()
            if not lease or (lease.get("spec") or {}).get("holderIdentity") != self.me:
                return
            spec = dict(lease["spec"])
            spec["holderIdentity"] = ""
            spec["leaseDurationSeconds"] = 1
            lease["spec"] = spec
            self.custom.replace_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name, lease, _request_timeout=2
            )
            log.info("leader election: released Lease %s/%s", self.namespace, self.name)
        except Exception as exc:  # noqa: BLE001 - the standby then waits out the duration
            log.warning("leader election: could not release the Lease: %s", _brief(exc))
        finally:
            metrics.LEADER.set(0)


def _brief(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}"


class StandbyHealth:
    """While standby, answer the liveness URL (the chart's probes) with 200: a
    standby is alive and ready (the PodDisruptionBudget counts it). kopf serves
    the same URL once this replica leads."""

    def __init__(self, url: Optional[str]):
        self.url = url
        self._server: Optional[http.server.HTTPServer] = None

    def start(self) -> StandbyHealth:
        if not self.url:
            return self
        parsed = urllib.parse.urlparse(self.url)
        path = parsed.path or "/"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                code = 200 if self.path.split("?")[0] == path else 404
                body = b'{"role": "standby"}' if code == 200 else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # one line per probe: noise
                return

        self._server = http.server.ThreadingHTTPServer(
            (parsed.hostname or "0.0.0.0", parsed.port or 80), Handler
        )
        threading.Thread(
            target=self._server.serve_forever, name="kubetune-standby-health", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
