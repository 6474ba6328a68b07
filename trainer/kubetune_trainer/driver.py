"""The driver of one FineTuneJob's training: check the data, start Ray Train.

On a cluster `python -m kubetune_trainer` calls run() on the Ray head;
`kubetune run` calls it on a local Ray after its own preflight. It checks the
data (a dataset without usable rows fails here, before any worker starts),
then runs Ray Train's TorchTrainer with one DeepSpeed engine per worker.
Started again on the same storage prefix, it resumes from the newest
committed checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kubetune_api import storage as contract
from kubetune_api.trainer_config import RAY_ENV

from . import clean as C
from . import data as D
from . import heldout, objectives, stager, staging
from . import model as M
from .data import DataError
from .launch import fit
from .parent import locate, locate_teacher
from .stop import StopFiles
from .storage import FencedOut, JobStorage, now


def ensure_env() -> None:
    """Before Ray starts (workers inherit it). DeepSpeed JIT-compiles ops into
    TORCH_EXTENSIONS_DIR; the build depends on the Python environment, so each
    environment gets its own folder (two venvs sharing one rebuild it in turn
    and wait on each other's lock). Then kubetune_api's RAY_ENV, as the operator
    gives it to each Ray pod."""

    root = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache/kubetune"))
    env_key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(root / "torch_extensions" / env_key))
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)


def check_data(spec) -> str:
    """Load and tokenize the data once on the driver: fail fast and say why."""
    tok = M.load_tokenizer(spec, M.resolve_model_path(spec.model))
    prepared = D.prepare(spec, tok, build=objectives.for_spec(spec).build_examples)
    text = prepared.train_report.summary("train")
    if prepared.val_report:
        text += "\n" + prepared.val_report.summary("validation")
    if prepared.test_report:
        text += "\n" + prepared.test_report.summary("test")
    if prepared.clean is not None:
        text += "".join(f"\nclean: {line}" for line in C.summary(prepared.clean))
    if spec.evaluation.retention is not None:  # its data fails here too, not after training
        scored = heldout.retention_examples(spec, tok)
        text += f"\nretention: {len(scored)} rows scored before and after training"
    text += "".join(f"\nmixture: {line}" for line in D.describe_mixture(prepared.sources))
    return text


STOPPED = 130  # the caller stopped the run (see run's `stopping`)
FENCED = 4  # a newer attempt owns the prefix: this one wrote nothing


def _failed(exc: Exception, storage, config, say) -> int:
    """The Failed record and one line; the exit code: 3 for data, 4 when a newer
    attempt owns the prefix (no record then: it is the newer attempt's), else 1."""
    try:
        fence = storage.fenced_out()
    except Exception:  # noqa: BLE001  (the store's own trouble: the write below reports it)
        fence = None
    if fence is not None:
        say(f"kubetune: {storage.fenced_message(fence, 'without writing its Failed record')}")
        return FENCED
    if isinstance(exc, FencedOut):
        say(f"kubetune: {exc}")
        return FENCED
    return _record_failure(exc, storage, config, say)


def _record_failure(exc: Exception, storage, config, say) -> int:
    if isinstance(exc, DataError):
        storage.write_progress(
            contract.ProgressRecord(
                phase=contract.TrainPhase.failed,
                attempt=config.attempt,
                message=str(exc)[:4000],
                updated_at=now(),
            )
        )
        say(f"kubetune: data error: {exc}")
        return 3
    prev = storage.read_record(contract.PROGRESS, contract.ProgressRecord)
    if prev is not None and not contract.record_counts(prev.attempt, config.attempt):
        prev = None
    storage.write_progress(
        contract.ProgressRecord(
            phase=contract.TrainPhase.failed,
            step=prev.step if prev else 0,
            total_steps=prev.total_steps if prev else None,
            # this attempt's (the driver's Loading record, written first, has none)
            resumed_from=prev.resumed_from if prev else None,
            skipped_checkpoints=prev.skipped_checkpoints if prev else None,
            startup=prev.startup if prev else None,
            attempt=config.attempt,
            message=f"{type(exc).__name__}: {exc}"[:4000],
            updated_at=now(),
        )
    )
    say(f"kubetune: training failed: {type(exc).__name__}: {exc}")
    return 1


def _stopped_on_request(storage) -> bool:
    record = storage.read_record(contract.PROGRESS, contract.ProgressRecord)
    return record is not None and record.phase == contract.TrainPhase.interrupted


def run(
    config,
    *,
    ray_init: dict | None = None,
    quiet: bool = False,
    check: bool = True,
    log: Callable[[str], None] | None = None,
    stopping: threading.Event | None = None,
    stop_dir: str | None = None,
) -> int:
    """Check data (unless the caller did), fit, write Failed progress on error.
    0 on success. Errors go to `log` (default stderr), whole lines. Exceptions
    that are not Exceptions (an interrupt) propagate. Once `stopping` is set the
    caller is shutting Ray down on purpose: the errors that follow are not a
    failure, and the caller writes the record. STOPPED too when the ranks saved
    and stopped on a stop request (kubetune_trainer.stop; `stop_dir` is its folder)."""
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    ensure_env()
    storage = JobStorage(config.storage_prefix, config.spec.output, attempt=config.attempt)
    t0 = time.monotonic()
    try:
        # First of all: this attempt owns the prefix; an older one's late pods
        # commit nothing from now on, and a newer one's owner stops this one.
        storage.take_over()
        storage.write_progress(
            contract.ProgressRecord(
                phase=contract.TrainPhase.loading,
                attempt=config.attempt,
                message="checking data" if check else None,
                updated_at=now(),
            )
        )
        # the job's stage, when its pods share a volume: fetched once, here, before
        # any worker starts; the workers read it from there (kubetune_trainer.staging)
        stager.stage_job(config, log=lambda text: quiet or print(text, flush=True))
        if check:
            report = check_data(config.spec)
            if not quiet:
                print(f"kubetune: {report}", flush=True)
        if config.parent is not None:  # a parent that cannot be used fails before Ray
            locate(config)
        locate_teacher(config)  # likewise a teacher job that saved no whole model
        storage.write_json(contract.CONFIG, config.to_dict())
        import ray

        if not ray.is_initialized():
            ray.init(**(ray_init or {}))
        if config.spec.sweep is not None:
            from .sweep import fit_sweep  # Ray Tune: loaded only for a sweep

            fit_sweep(config)
        else:
            with StopFiles(stop_dir).running():  # a pod's stop waits for this process
                fit(config, stop_dir=stop_dir)
            if _stopped_on_request(storage):
                say("kubetune: stopped on request with a committed checkpoint; run again to resume")
                return STOPPED
    except Exception as exc:  # noqa: BLE001  (reported, then the exit code says failed)
        if stopping is not None and stopping.is_set():
            return STOPPED
        return _failed(exc, storage, config, say)
    finally:
        staging.clean()  # the workers are done with it; a retry stages afresh
    if not quiet:
        print(f"kubetune: done in {time.monotonic() - t0:.0f}s; results under {storage.prefix}")
    return 0
