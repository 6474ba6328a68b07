"""MLflow tracking from rank 0, through MLflow's REST API (no client library).

Everything goes through one bounded queue drained by a daemon thread: the
training step only enqueues (never waits on the network), a full queue drops
the event and counts it, every request has a timeout, and after a few failures
in a row (or a run that could not be started in as many tries) the tracker
stops trying for the rest of the run. The state (run id,
URL, whether the server answered and why not) goes to tracking.json, which the
operator shows as status.tracking and the TrackingReachable condition.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from kubetune_api import storage as contract

from .storage import now

TIMEOUT_SECONDS = 5.0
MAX_FAILURES = 3  # consecutive; then tracking is off for this run
QUEUE_SIZE = 256
CLOSE_SECONDS = 15.0  # the most the end of training waits for the queue to drain
METRIC_KEYS = {
    "loss": "train_loss",
    "eval_loss": "eval_loss",
    "eval_perplexity": "eval_perplexity",
    "eval_token_accuracy": "eval_token_accuracy",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "tokens_per_second": "tokens_per_second",
    # objective grpo's per-grader tables: reward/<grader>, eval_reward/<grader>
    "rewards_per_grader": "reward",
    "eval_rewards_per_grader": "eval_reward",
}
# row fields that are not metrics (the step is the metric's step)
NOT_METRICS = {"step", "epoch", "time", "attempt", "resumed_from", "skipped_checkpoints"}
PARAM_MAX = 6000  # MLflow's limit on a param value
BATCH_PARAMS = 100  # MLflow's limits per log-batch request
BATCH_METRICS = 1000


def metric_values(row: dict) -> list[tuple[str, float]]:
    """A metrics row as MLflow metrics: the named ones under their MLflow names,
    every other number (an objective's own) under its field name, and a table of
    numbers (e.g. rewards_per_grader) as one metric per entry, `field/name`."""
    out = []
    for src, value in row.items():
        if value is None or src in NOT_METRICS:
            continue
        key = METRIC_KEYS.get(src, src)
        if isinstance(value, dict):
            out += [(f"{key}/{k}", float(v)) for k, v in value.items() if v is not None]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((key, float(value)))
    return out


class TrackingError(Exception):
    pass


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """A nested spec as MLflow params: dotted keys, JSON-ish values."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        text = json.dumps(obj) if isinstance(obj, (list, bool)) or obj is None else str(obj)
        out[prefix] = text[:PARAM_MAX]
    return out


def _origin(url: str) -> tuple[str, str, Optional[int]]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


class _SameOriginAuth(urllib.request.HTTPRedirectHandler):
    """urllib forwards every header on a redirect, Authorization included, to
    whatever host the Location names. The tracking server's credentials go to
    the tracking server only: a redirect to another scheme, host or port loses
    the header."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_SameOriginAuth)


class MlflowClient:
    """The few REST calls kubetune needs, with a timeout on each."""

    def __init__(self, tracking_uri: str, environ, timeout: float = TIMEOUT_SECONDS):
        self.base = tracking_uri.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        token = environ.get("MLFLOW_TRACKING_TOKEN")
        user, password = (
            environ.get("MLFLOW_TRACKING_USERNAME"),
            environ.get("MLFLOW_TRACKING_PASSWORD"),
        )
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        elif user and password:
            pair = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {pair}"

    def _request(self, method: str, path: str, body: Optional[bytes], headers=None) -> dict:
        req = urllib.request.Request(
            self.base + path, data=body, method=method, headers={**self.headers, **(headers or {})}
        )
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                data = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            raise TrackingError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"{method} {path}: {type(exc).__name__}: {reason}") from None
        return json.loads(data) if data.strip() else {}

    def call(self, method: str, endpoint: str, payload: Optional[dict] = None) -> dict:
        path = f"/api/2.0/mlflow/{endpoint}"
        if method == "GET":
            query = urllib.parse.urlencode(payload or {})
            return self._request("GET", f"{path}?{query}", None)
        return self._request(method, path, json.dumps(payload or {}).encode())

    def experiment_id(self, name: str) -> str:
        try:
            found = self.call("GET", "experiments/get-by-name", {"experiment_name": name})
            return found["experiment"]["experiment_id"]
        except TrackingError as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                raise
        return self.call("POST", "experiments/create", {"name": name})["experiment_id"]

    def upload(self, artifact_uri: str, name: str, data: bytes) -> None:
        """Through the server's artifact proxy (mlflow-artifacts:/ runs only)."""
        scheme = "mlflow-artifacts:"
        if not artifact_uri.startswith(scheme):
            raise TrackingError(
                f"artifacts go to {artifact_uri}, which the trainer does not write directly "
                "(start the server with --serve-artifacts)"
            )
        rest = artifact_uri[len(scheme) :]
        if rest.startswith("//"):  # mlflow-artifacts://host:port/path
            rest = rest[2:].partition("/")[2]
        rest = rest.strip("/")
        path = "/api/2.0/mlflow-artifacts/artifacts/" + urllib.parse.quote(f"{rest}/{name}")
        self._request("PUT", path, data, {"Content-Type": "application/octet-stream"})


class MlflowTracker:
    """Rank 0's tracker; every public method returns at once."""

    def __init__(
        self,
        settings,
        environ,
        on_state: Callable[[contract.TrackingRecord], None],
        log: Callable[[str], None] = print,
        timeout: float = TIMEOUT_SECONDS,
        queue_size: int = QUEUE_SIZE,
    ):
        self.settings = settings
        self.client = MlflowClient(settings.tracking_uri, environ, timeout)
        self.on_state, self.say = on_state, log
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.failures = 0
        self.disabled = False
        self.dropped = 0
        self.sent_step = -1
        self.record = contract.TrackingRecord(
            tracking_uri=settings.tracking_uri, reachable=False, updated_at=now()
        )
        self.artifact_uri: Optional[str] = None
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kubetune-mlflow", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- the step's side
    def _put(self, item: tuple) -> None:
        if self.disabled:
            return
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def start(self, run_name: str, params: dict[str, str], tags: dict[str, str], run_id=None):
        self._put(("start", run_name, params, tags, run_id))

    def log_rows(self, rows: list[dict]) -> None:
        """The metrics rows not sent yet (rows are the trainer's, oldest first)."""
        new = [r for r in rows if r["step"] > self.sent_step]
        if new:
            self.sent_step = new[-1]["step"]
            self._put(("metrics", new))

    def artifact(self, name: str, data: bytes) -> None:
        self._put(("artifact", name, data))

    def tag(self, key: str, value: str) -> None:
        self._put(("tags", {key: value}))

    def close(self, status: str = "FINISHED", wait: float = CLOSE_SECONDS) -> None:
        """End the run; wait at most `wait` seconds, then leave the thread behind."""
        deadline = time.monotonic() + wait
        if not self.disabled:
            try:  # the end of the run is worth a wait for room, within the bound
                self.queue.put(("end", status), timeout=wait)
            except queue.Full:
                self.dropped += 1
        self.closing.set()
        self.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            self._fail(f"gave up after {wait:g}s waiting for the tracking server")

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                if self.closing.is_set():
                    self._state()
                    return
                continue
            if self.disabled or (item[0] != "start" and not self.record.run_id):
                continue
            try:
                getattr(self, "_do_" + item[0])(*item[1:])
                self.failures = 0
            except Exception as exc:  # noqa: BLE001  (tracking never fails training)
                self.failures += 1
                self._fail(str(exc)[:1000])
                if self.failures >= MAX_FAILURES or item[0] == "start":
                    self.disabled = True
                    self.say(f"MLflow tracking is off for this run: {exc}")

    def _fail(self, message: str) -> None:
        self.record.reachable = False
        self.record.message = message
        self._state()

    def _state(self) -> None:
        self.record.dropped = self.dropped
        self.record.updated_at = now()
        try:
            self.on_state(self.record.model_copy())
        except Exception as exc:  # noqa: BLE001
            self.say(f"could not write {contract.TRACKING}: {exc}")

    def _do_start(self, *args) -> None:
        """A few tries: a server just started may take a while to answer its first
        request; a refused connection fails each try at once."""
        for attempt in range(1, MAX_FAILURES + 1):
            try:
                return self._start(*args)
            except TrackingError as exc:
                if attempt == MAX_FAILURES or self.closing.is_set():
                    raise
                self._fail(str(exc)[:1000])
                time.sleep(1.0)

    def _start(self, run_name, params, tags, run_id) -> None:
        c = self.client
        exp = c.experiment_id(self.settings.experiment)
        run = None
        if run_id:  # a retry continues the same MLflow run
            try:
                run = c.call("GET", "runs/get", {"run_id": run_id})["run"]
            except TrackingError:
                run = None
        if run is None:
            run = c.call(
                "POST",
                "runs/create",
                {
                    "experiment_id": exp,
                    "run_name": run_name,
                    "start_time": int(time.time() * 1000),
                    "tags": [{"key": k, "value": v} for k, v in tags.items()],
                },
            )["run"]
            items = list(params.items())
            for i in range(0, len(items), BATCH_PARAMS):
                c.call(
                    "POST",
                    "runs/log-batch",
                    {
                        "run_id": run["info"]["run_id"],
                        "params": [{"key": k, "value": v} for k, v in items[i : i + BATCH_PARAMS]],
                    },
                )
        info = run["info"]
        self.artifact_uri = info.get("artifact_uri")
        self.record.experiment_id = exp
        self.record.run_id = info["run_id"]
        self.record.url = f"{c.base}/#/experiments/{exp}/runs/{info['run_id']}"
        self.record.reachable = True
        self.record.message = None
        self._state()

    def _do_metrics(self, rows: list[dict]) -> None:
        stamp = int(time.time() * 1000)
        metrics = [
            {"key": key, "value": value, "timestamp": stamp, "step": int(row["step"])}
            for row in rows
            for key, value in metric_values(row)
        ]
        for i in range(0, len(metrics), BATCH_METRICS):
            self.client.call(
                "POST",
                "runs/log-batch",
                {"run_id": self.record.run_id, "metrics": metrics[i : i + BATCH_METRICS]},
            )

    def _do_tags(self, tags: dict) -> None:
        self.client.call(
            "POST",
            "runs/log-batch",
            {
                "run_id": self.record.run_id,
                "tags": [{"key": k, "value": v} for k, v in tags.items()],
            },
        )

    def _do_artifact(self, name: str, data: bytes) -> None:
        self.client.upload(self.artifact_uri or "", name, data)

    def _do_end(self, status: str) -> None:
        self.client.call(
            "POST",
            "runs/update",
            {"run_id": self.record.run_id, "status": status, "end_time": int(time.time() * 1000)},
        )


def start_for_job(config, storage, run_record, log, environ=None) -> Optional[MlflowTracker]:
    """The job's tracker (None without spec.tracking.mlflow), its run started
    with the resolved spec as params; a retry continues the run tracking.json names."""
    import os

    settings = config.spec.tracking.mlflow if config.spec.tracking else None
    if settings is None:
        return None
    environ = os.environ if environ is None else environ
    tracker = MlflowTracker(
        settings, environ, lambda rec: storage.write_record(contract.TRACKING, rec), log
    )
    previous = storage.read_json(contract.TRACKING) or {}
    job = config.job
    params = flatten(config.spec.to_dict()) | {"job": f"{job.namespace}/{job.name}"}
    tags = {
        "kubetune.job": f"{job.namespace}/{job.name}",
        "kubetune.uid": job.uid,
        "kubetune.prefix": storage.prefix,
        "kubetune.specHash": run_record.spec_hash,
        "kubetune.dataHash": run_record.dataset.hash,
        "kubetune.image": run_record.image,
    }
    if run_record.parent is not None:
        tags["kubetune.parent"] = run_record.parent.uri
    tracker.start(job.name, params, tags, previous.get("runId"))
    return tracker


def finish_for_job(tracker: Optional[MlflowTracker], storage, outputs, files: dict) -> None:
    """Artifacts (loss curve, run record, outputs.json as the adapter's reference)
    and the end of the run; `files`: artifact name → local path or bytes."""
    if tracker is None:
        return
    for name, content in files.items():
        if content is None:
            continue
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        tracker.artifact(name, data)
    ref = outputs.adapter or outputs.merged_model or outputs.model
    if ref:
        tracker.tag("kubetune.output", ref)
    tracker.close("FINISHED")
