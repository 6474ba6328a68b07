"""Storage snapshot (what the trainer wrote, in the contract's models) →
status.progress, .metrics, .checkpoints, .outputs, .lineage, .tracking, .sweep."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

from pydantic.alias_generators import to_camel

from kubetune_api.models import MIXTURE_MAX, SKIPPED_CHECKPOINTS_MAX, TEXT_MAX, Metrics
from kubetune_api.storage import (
    MetricsRow,
    OutputsRecord,
    RunRecord,
    checkpoint_counts,
    record_counts,
    row_counts,
)
from kubetune_api.sweep import SweepRecord

from .storage_reader import StorageSnapshot

Snapshot = Union[StorageSnapshot, Mapping[str, Any], None]

# metrics.jsonl's fields (MetricsRow) → status.metrics (models.Metrics): the train
# loss, and every field the two share (each objective's metrics among them)
SOURCE_ID_MAX = 32  # models.SourceId
ROW_TO_STATUS = (("loss", "trainLoss"),) + tuple(
    (name, to_camel(name)) for name in Metrics.model_fields if name in MetricsRow.model_fields
)


def _round(x: Optional[float], digits: int = 6) -> Optional[float]:
    return None if x is None else round(float(x), digits)


def as_snapshot(snapshot: Snapshot) -> Optional[StorageSnapshot]:
    """The typed snapshot (a mapping in the contract's shape is parsed into it)."""
    if snapshot is None or isinstance(snapshot, StorageSnapshot):
        return snapshot
    return StorageSnapshot.model_validate(snapshot)


def progress_to_status(snapshot: Snapshot, keep_last: int = 3, attempt: int = 1) -> dict[str, Any]:
    """What the trainer wrote under the job's prefix → status.progress, .metrics,
    .checkpoints, .outputs. `snapshot` comes from storage_reader.read_snapshot;
    `attempt` is the job's current attempt (status.attempts).

    Only what counts under the fence is shown (kubetune_api.storage): a retry's
    old pods still writing change nothing here. progress.json and outputs.json of
    an attempt older than the newest one (the status's or the fence's) are left
    out, and the status keeps what it showed before."""
    snap = as_snapshot(snapshot)
    if not snap:
        return {}
    fence = snap.fence
    current = max(attempt, fence.attempt if fence else 0)
    out: dict[str, Any] = {}
    if snap.prefix:
        out["outputs"] = {"prefix": snap.prefix}
    rec = snap.progress
    if rec and not record_counts(rec.attempt, current):
        rec = None
    if rec:
        step = int(rec.step or 0)
        total = rec.total_steps
        progress: dict[str, Any] = {"step": step}
        if total:
            progress["totalSteps"] = int(total)
        if rec.epoch is not None:
            progress["epoch"] = _round(rec.epoch, 4)
        if rec.percent is not None:
            progress["percent"] = _round(rec.percent, 4)
        if progress.get("percent") is None and total:
            progress["percent"] = round(100.0 * step / int(total), 2)
        if rec.eta_seconds is not None:
            progress["etaSeconds"] = int(rec.eta_seconds)
        if rec.resumed_from is not None:
            progress["resumedFrom"] = int(rec.resumed_from)
        if rec.skipped_checkpoints:
            progress["skippedCheckpoints"] = [
                {
                    k: v
                    for k, v in (
                        ("step", int(s.step)),
                        ("reason", s.reason[:TEXT_MAX]),
                        ("movedTo", s.moved_to),
                    )
                    if v is not None
                }
                for s in rec.skipped_checkpoints[:SKIPPED_CHECKPOINTS_MAX]
            ]
        progress["display"] = f"{step}/{total}" if total else str(step)
        out["progress"] = progress
    metrics: dict[str, Any] = {}
    rows = [r for r in snap.metrics if row_counts(r.step, r.attempt, fence)]
    for row in rows:  # oldest first: later rows win
        for src, dst in ROW_TO_STATUS:
            value = getattr(row, src)
            if isinstance(value, dict):  # per source (dataset.mixture): its first few
                metrics[dst] = {
                    str(k)[:SOURCE_ID_MAX]: _round(v)
                    for k, v in list(value.items())[:MIXTURE_MAX]
                    if isinstance(v, (int, float))
                }
            elif value is not None:
                metrics[dst] = value if isinstance(value, int) else _round(value)
    # grader failures: counted per row, totalled over the rows that count
    for src, dst in (
        ("grader_errors", "graderErrorsTotal"),
        ("grader_timeouts", "graderTimeoutsTotal"),
    ):
        counts = [getattr(r, src) for r in rows if getattr(r, src) is not None]
        if counts:
            metrics[dst] = sum(sum(c.values()) for c in counts)
    if rec and rec.tokens_per_second is not None:
        metrics["tokensPerSecond"] = _round(rec.tokens_per_second)
    if "trainLoss" in metrics:
        metrics["displayLoss"] = f"{metrics['trainLoss']:.4f}"
    elif "evalLoss" in metrics:
        metrics["displayLoss"] = f"{metrics['evalLoss']:.4f}"
    if metrics:
        out["metrics"] = metrics
    cps = sorted(
        (c for c in snap.checkpoints if checkpoint_counts(c.step, c.attempt, fence)),
        key=lambda c: c.step,
    )
    if cps:
        out["checkpoints"] = [
            {
                k: v
                for k, v in {
                    "step": c.step,
                    "uri": c.uri,
                    "evalLoss": _round(c.eval_loss),
                    "time": c.created_at,
                }.items()
                if v is not None
            }
            for c in cps[-keep_last:]
        ]
    done = snap.outputs
    if done and record_counts(done.attempt, current):
        outputs = out.setdefault("outputs", {})
        for value, dst in (
            (done.adapter, "adapter"),
            (done.merged_model, "mergedModel"),
            (done.model, "mergedModel"),
            (done.metrics, "metrics"),
            (done.loss_curve, "lossCurve"),
        ):
            if value and dst not in outputs:
                outputs[dst] = value
        if done.gguf and "gguf" not in outputs:
            outputs["gguf"] = [g.uri for g in done.gguf]
        wise = done.interpolation
        if wise and "interpolated" not in outputs:
            outputs["interpolated"] = wise.model or wise.merged_model or wise.adapter
            outputs["interpolationWeight"] = wise.chosen
            picked = next(p for p in wise.weights if p.alpha == wise.chosen)
            metrics = out.setdefault("metrics", {})
            metrics.setdefault("interpolatedEvalLoss", _round(picked.eval_loss))
        if done.final_train_loss is not None:
            metrics = out.setdefault("metrics", {})
            metrics.setdefault("trainLoss", _round(done.final_train_loss))
            metrics.setdefault("displayLoss", f"{metrics['trainLoss']:.4f}")
        if done.final_eval_loss is not None:
            out.setdefault("metrics", {}).setdefault("evalLoss", _round(done.final_eval_loss))
        checks = held_out_metrics(done)
        if checks:
            out.setdefault("metrics", {}).update(checks)
    if snap.run_record:
        out["lineage"] = lineage_summary(snap.run_record, snap.prefix)
    track = snap.tracking
    if track and track.run_id:
        out["tracking"] = {
            k: v
            for k, v in (
                ("runId", track.run_id),
                ("experimentId", track.experiment_id),
                ("url", track.url),
            )
            if v is not None
        }
    if snap.sweep:
        out |= sweep_to_status(snap.sweep, out.get("progress"))
    return out


def held_out_metrics(done: OutputsRecord) -> dict[str, float]:
    """outputs.json's calibration, retention and classification → status.metrics."""
    cal, ret, cls = done.calibration, done.retention, done.classification
    pairs = []
    if cls is not None:
        pairs += [
            ("evalAccuracyBefore", cls.accuracy_before),
            ("evalAccuracy", cls.accuracy),
            ("evalF1Before", cls.f1_before),
            ("evalF1", cls.f1),
            ("evalLabelEceBefore", cls.ece_before),
            ("evalLabelEce", cls.ece),
        ]
    if cal is not None:
        pairs += [
            ("evalEceBefore", cal.ece_before),
            ("evalEce", cal.ece),
            ("calibrationTemperature", cal.temperature),
            ("evalEceAtTemperature", cal.ece_at_temperature),
        ]
    if ret is not None:
        pairs += [
            ("retentionLossBefore", ret.loss_before),
            ("retentionLoss", ret.loss_after),
            ("retentionRegression", ret.regression),
        ]
    return {k: _round(v) for k, v in pairs if v is not None}


def retention_condition(snapshot: Snapshot, attempt: int = 1) -> Optional[tuple[bool, str]]:
    """(exceeded, message) for the RetentionRegressed condition, from outputs.json's
    retention of the current attempt; None without evaluation.retention.maxRegression
    or before the job's end."""
    snap = as_snapshot(snapshot)
    done = snap.outputs if snap else None
    current = max(attempt, snap.fence.attempt if snap and snap.fence else 0)
    if done is None or not record_counts(done.attempt, current):
        return None
    ret = done.retention
    if ret is None or ret.max_regression is None or ret.regression is None:
        return None
    text = f"evaluation.retention: the retention set's {ret.describe()}"
    if ret.exceeded:
        text += (
            "; the job fails (failOnRegression)"
            if ret.fail_on_regression
            else " (hint: set failOnRegression to fail such a job, or train less far: fewer "
            "steps, a lower learning rate, LoRA)"
        )
    return ret.exceeded, text


def sweep_to_status(sweep: SweepRecord, progress: Optional[dict]) -> dict[str, Any]:
    """sweep.json → status.sweep, and the progress column in trials."""
    states = [r.state for r in sweep.records]
    status: dict[str, Any] = {
        "metric": sweep.metric,
        "trials": int(sweep.trials or 0),
        "finished": states.count("Finished"),
        "stopped": states.count("Stopped"),
        "running": states.count("Running"),
        "failed": states.count("Failed"),
        "stepsTrained": int(sweep.steps_trained or 0),
    }
    if sweep.best_trial:
        status["bestTrial"] = sweep.best_trial
        status["bestParams"] = {k: float(v) for k, v in (sweep.best_params or {}).items()}
    if sweep.best_metric is not None:
        status["bestMetric"] = _round(sweep.best_metric)
        status["display"] = f"{sweep.metric} {sweep.best_metric:.4f}"
    out: dict[str, Any] = {"sweep": {k: v for k, v in status.items() if v is not None}}
    if progress is not None:
        done = status["finished"] + status["stopped"]
        out["progress"] = {**progress, "display": f"{done}/{status['trials']} trials"}
    return out


def lineage_summary(record: RunRecord, prefix: Optional[str]) -> dict[str, Any]:
    """run.json → status.lineage: the hashes and names to compare jobs at a glance."""
    base = record.base_model
    parent = record.parent
    pjob = (parent.job if parent else None) or {}
    summary = {
        "runRecord": f"{prefix.rstrip('/')}/run.json" if prefix else None,
        "specHash": record.spec_hash,
        "dataHash": record.dataset.hash,
        "baseModel": base.name or base.uri,
        "parent": (
            f"FineTuneJob {pjob['name']} ({parent.uri})"
            if pjob.get("name")
            else (parent.uri if parent else None)
        ),
        "image": record.image,
    }
    return {k: str(v)[:256] for k, v in summary.items() if v}


def tracking_condition(snapshot: Snapshot) -> Optional[tuple[bool, str]]:
    """(reachable, message) from tracking.json, or None when there is no tracking."""
    snap = as_snapshot(snapshot)
    track = snap.tracking if snap else None
    if not track:
        return None
    if track.reachable:
        return True, f"MLflow run {track.run_id} at {track.url}"
    return False, (
        f"{track.tracking_uri}: {track.message or 'no answer'}; training goes on "
        "without tracking (hint: check spec.tracking.mlflow.trackingUri and that the server is up)"
    )
