"""Storage snapshot (what the trainer wrote) → status.progress, .metrics,
.checkpoints and .outputs."""

from __future__ import annotations

from typing import Any, Optional


def _round(x: Optional[float], digits: int = 6) -> Optional[float]:
    return None if x is None else round(float(x), digits)


def progress_to_status(snapshot: Optional[dict], keep_last: int = 3) -> dict[str, Any]:
    """What the trainer wrote under the job's prefix → status.progress, .metrics,
    .checkpoints, .outputs. `snapshot` comes from storage_reader.read_snapshot."""
    if not snapshot:
        return {}
    out: dict[str, Any] = {}
    if snapshot.get("prefix"):
        out["outputs"] = {"prefix": snapshot["prefix"]}
    rec = snapshot.get("progress")
    if rec:
        step = int(rec.get("step") or 0)
        total = rec.get("totalSteps")
        progress: dict[str, Any] = {"step": step}
        if total:
            progress["totalSteps"] = int(total)
        for key in ("epoch", "percent"):
            if rec.get(key) is not None:
                progress[key] = _round(rec[key], 4)
        if progress.get("percent") is None and total:
            progress["percent"] = round(100.0 * step / int(total), 2)
        if rec.get("etaSeconds") is not None:
            progress["etaSeconds"] = int(rec["etaSeconds"])
        if rec.get("resumedFrom") is not None:
            progress["resumedFrom"] = int(rec["resumedFrom"])
        progress["display"] = f"{step}/{total}" if total else str(step)
        out["progress"] = progress
    rows = snapshot.get("metrics") or []
    metrics: dict[str, Any] = {}
    for row in rows:  # oldest first: later rows win
        for src, dst in (
            ("loss", "trainLoss"),
            ("evalLoss", "evalLoss"),
            ("evalPerplexity", "evalPerplexity"),
            ("evalTokenAccuracy", "evalTokenAccuracy"),
            ("rewardAccuracy", "rewardAccuracy"),
            ("rewardMargin", "rewardMargin"),
            ("evalRewardAccuracy", "evalRewardAccuracy"),
            ("evalRewardMargin", "evalRewardMargin"),
            ("tokensPerSecond", "tokensPerSecond"),
            ("learningRate", "learningRate"),
        ):
            if row.get(src) is not None:
                metrics[dst] = _round(row[src])
    if rec and rec.get("tokensPerSecond") is not None:
        metrics["tokensPerSecond"] = _round(rec["tokensPerSecond"])
    if "trainLoss" in metrics:
        metrics["displayLoss"] = f"{metrics['trainLoss']:.4f}"
    elif "evalLoss" in metrics:
        metrics["displayLoss"] = f"{metrics['evalLoss']:.4f}"
    if metrics:
        out["metrics"] = metrics
    cps = sorted(snapshot.get("checkpoints") or [], key=lambda c: c["step"])
    if cps:
        out["checkpoints"] = [
            {
                k: v
                for k, v in {
                    "step": c["step"],
                    "uri": c["uri"],
                    "evalLoss": _round(c.get("evalLoss")),
                    "time": c.get("createdAt"),
                }.items()
                if v is not None
            }
            for c in cps[-keep_last:]
        ]
    rec_out = snapshot.get("outputs")
    if rec_out:
        outputs = out.setdefault("outputs", {})
        for src, dst in (
            ("adapter", "adapter"),
            ("mergedModel", "mergedModel"),
            ("model", "mergedModel"),
            ("metrics", "metrics"),
            ("lossCurve", "lossCurve"),
        ):
            if rec_out.get(src) and dst not in outputs:
                outputs[dst] = rec_out[src]
        if rec_out.get("finalTrainLoss") is not None:
            metrics = out.setdefault("metrics", {})
            metrics.setdefault("trainLoss", _round(rec_out["finalTrainLoss"]))
            metrics.setdefault("displayLoss", f"{metrics['trainLoss']:.4f}")
        if rec_out.get("finalEvalLoss") is not None:
            out.setdefault("metrics", {}).setdefault("evalLoss", _round(rec_out["finalEvalLoss"]))
    if snapshot.get("runRecord"):
        out["lineage"] = lineage_summary(snapshot["runRecord"], snapshot.get("prefix"))
    track = snapshot.get("tracking")
    if track and track.get("runId"):
        out["tracking"] = {
            k: track[k] for k in ("runId", "experimentId", "url") if track.get(k) is not None
        }
    sweep = snapshot.get("sweep")
    if sweep:
        out |= sweep_to_status(sweep, out.get("progress"))
    return out


def sweep_to_status(sweep: dict, progress: Optional[dict]) -> dict[str, Any]:
    """sweep.json → status.sweep, and the progress column in trials."""
    states = [r.get("state") for r in sweep.get("records") or []]
    status: dict[str, Any] = {
        "metric": sweep.get("metric"),
        "trials": int(sweep.get("trials") or 0),
        "finished": states.count("Finished"),
        "stopped": states.count("Stopped"),
        "running": states.count("Running"),
        "failed": states.count("Failed"),
        "stepsTrained": int(sweep.get("stepsTrained") or 0),
    }
    if sweep.get("bestTrial"):
        status["bestTrial"] = sweep["bestTrial"]
        status["bestParams"] = {k: float(v) for k, v in (sweep.get("bestParams") or {}).items()}
    if sweep.get("bestMetric") is not None:
        status["bestMetric"] = _round(sweep["bestMetric"])
        status["display"] = f"{sweep.get('metric')} {sweep['bestMetric']:.4f}"
    out: dict[str, Any] = {"sweep": {k: v for k, v in status.items() if v is not None}}
    if progress is not None:
        done = status["finished"] + status["stopped"]
        out["progress"] = {**progress, "display": f"{done}/{status['trials']} trials"}
    return out


def lineage_summary(record: dict, prefix: Optional[str]) -> dict[str, Any]:
    """run.json → status.lineage: the hashes and names to compare jobs at a glance."""
    base = record.get("baseModel") or {}
    parent = record.get("parent") or {}
    pjob = parent.get("job") or {}
    summary = {
        "runRecord": f"{prefix.rstrip('/')}/run.json" if prefix else None,
        "specHash": record.get("specHash"),
        "dataHash": (record.get("dataset") or {}).get("hash"),
        "baseModel": base.get("name") or base.get("uri"),
        "parent": (
            f"FineTuneJob {pjob['name']} ({parent.get('uri')})"
            if pjob.get("name")
            else parent.get("uri")
        ),
        "image": record.get("image"),
    }
    return {k: str(v)[:256] for k, v in summary.items() if v}


def tracking_condition(snapshot: Optional[dict]) -> Optional[tuple[bool, str]]:
    """(reachable, message) from tracking.json, or None when there is no tracking."""
    track = (snapshot or {}).get("tracking")
    if not track:
        return None
    if track.get("reachable"):
        return True, f"MLflow run {track.get('runId')} at {track.get('url')}"
    return False, (
        f"{track.get('trackingUri')}: {track.get('message') or 'no answer'}; training goes on "
        "without tracking (hint: check spec.tracking.mlflow.trackingUri and that the server is up)"
    )
