"""`kubetune run FILE`: the same FineTuneJob on this machine, on a local Ray.

Output goes to ./runs/{namespace}/{name}/local (or the spec's output.uri, or
--output). Running the same file again resumes from the newest committed
checkpoint; a finished run prints its summary again.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import yaml

from kubetune_api import storage as contract
from kubetune_api.validation import validate_document


def _absolute(uri: str) -> str:
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str(Path(uri).resolve())


def load_job(path: str, name: str | None = None) -> dict:
    """The first FineTuneJob in FILE, relative paths made absolute (read from here)."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    jobs = [d for d in docs if d.get("kind") == "FineTuneJob"]
    if name:
        jobs = [d for d in jobs if (d.get("metadata") or {}).get("name") == name]
    if not jobs:
        raise ValueError(f"{path}: no FineTuneJob" + (f" named {name}" if name else ""))
    job = jobs[0]
    spec = job.setdefault("spec", {})
    if isinstance(spec.get("model"), dict) and spec["model"].get("uri"):
        spec["model"]["uri"] = _absolute(spec["model"]["uri"])
    dataset = spec.get("dataset") or {}
    for part in ("train", "validation"):
        src = dataset.get(part)
        if isinstance(src, dict) and src.get("uri"):
            src["uri"] = _absolute(src["uri"])
    return job


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "--"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressBar:
    """Polls progress.json (what the operator reads too) and draws one line."""

    def __init__(self, storage, stream=sys.stderr, enabled=True):
        self.storage, self.stream, self.enabled = storage, stream, enabled
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.t0 = time.monotonic()

    def __enter__(self):
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join(timeout=5)
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def _loop(self):
        while not self.stop.wait(1.0):
            self._draw()

    def _draw(self):
        try:
            p = self.storage.read_json(contract.PROGRESS) or {}
            rows = self.storage.read_metrics()
        except Exception:  # noqa: BLE001  (a torn read: try again next tick)
            return
        step, total = p.get("step", 0), p.get("totalSteps") or 0
        width = 28
        filled = int(width * step / total) if total else 0
        loss = next((r["loss"] for r in reversed(rows) if r.get("loss") is not None), None)
        evl = next((r["eval_loss"] for r in reversed(rows) if r.get("eval_loss") is not None), None)
        line = (
            f"\r{p.get('phase', 'Starting'):<10} [{'#' * filled}{'.' * (width - filled)}] "
            f"{step}/{total or '?'}"
        )
        if loss is not None:
            line += f"  loss {loss:.3f}"
        if evl is not None:
            line += f"  eval {evl:.3f}"
        if p.get("tokensPerSecond"):
            line += f"  {p['tokensPerSecond']:.0f} tok/s"
        elapsed = _fmt_time(time.monotonic() - self.t0)
        line += f"  elapsed {elapsed}  eta {_fmt_time(p.get('etaSeconds'))}"
        self.stream.write(line.ljust(110))
        self.stream.flush()


def summary(storage) -> str:
    out = storage.read_json(contract.OUTPUTS) or {}
    lines = ["", f"kubetune: finished {out.get('steps')} steps; results in {storage.prefix}"]
    before, after = out.get("initialEvalLoss"), out.get("finalEvalLoss")
    if before is not None and after is not None:
        verdict = "better" if after < before else "NOT better"
        lines.append(f"  held-out loss: before {before:.4f} -> after {after:.4f} ({verdict})")
    for key, label in (
        ("adapter", "adapter"),
        ("mergedModel", "merged model"),
        ("model", "model"),
        ("metrics", "metrics"),
        ("lossCurve", "loss curve"),
    ):
        if out.get(key):
            lines.append(f"  {label + ':':<14}{out[key]}")
    if out.get("stoppedEarly"):
        lines.append("  stopped early (no improvement)")
    return "\n".join(lines)


def run_local(args) -> int:
    from kubetune_api import load_trainer_config, spec_to_trainer_config

    from .storage import JobStorage

    try:
        job = load_job(args.file, getattr(args, "name", None))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"kubetune run: {exc}", file=sys.stderr)
        return 2
    result = validate_document(job)
    if not result.ok:
        for e in result.errors:
            print(f"  {e}", file=sys.stderr)
        print(f"kubetune run: {args.file} is not a valid FineTuneJob", file=sys.stderr)
        return 2
    for w in result.warnings:
        print(f"kubetune run: warning: {w}", file=sys.stderr)
    output = getattr(args, "output", None) or "runs"
    default_out = output if "://" in output else Path(output).resolve().as_uri()
    config = load_trainer_config(spec_to_trainer_config(job, default_output_uri=default_out))
    storage = JobStorage(config.storage_prefix, config.spec.output)
    done = storage.read_json(contract.PROGRESS) or {}
    if done.get("phase") == "Succeeded" and storage.read_json(contract.OUTPUTS):
        print(summary(storage))
        print(f"  (already finished; delete {storage.prefix} to train again)")
        return 0
    print(f"kubetune run: {config.job.name} -> {storage.prefix}", flush=True)
    import logging

    import ray

    from .__main__ import ensure_env, run

    ensure_env()
    if not ray.is_initialized():
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    try:
        with ProgressBar(storage, enabled=not getattr(args, "no_progress", False)):
            rc = run(config)
    finally:
        ray.shutdown()
    if rc != 0:
        p = storage.read_json(contract.PROGRESS) or {}
        print(f"kubetune run: failed: {p.get('message', 'see the log above')}", file=sys.stderr)
        return rc
    print(summary(storage))
    return 0
