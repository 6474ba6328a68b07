"""A sweep: Ray Tune runs the trials, each one the same Ray Train + DeepSpeed
run a job makes (launch.fit), on its own prefix `trials/{id}/`.

Each Tune trial is a small function (no CPU of its own) that starts a
TorchTrainer for its parameter values and, while it trains, reads the trial's
metrics.jsonl and reports every evaluation to Tune, so ASHA can stop trials
whose metric trails the others'. The recipe is unchanged: a trial is a job.

sweep.json (kubetune_api.sweep.SweepRecord) is written by the driver from
Tune's callbacks. Started again on the same prefix, the same trials come back
first (random: the same seeded plan; tpe: the recorded trials as Optuna's
first points): a trial with outputs.json reports its stored evaluations and
returns at once, one stopped early stays stopped, and any other resumes from
its newest committed checkpoint.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from kubetune_api import load_trainer_config
from kubetune_api import storage as contract
from kubetune_api import sweep as S

from .launch import fit, worker_threads
from .model import cache_root
from .storage import JobStorage, now

POLL_SECONDS = 1.0
STATE_KEY = "kubetune_state"  # in a trial's last Tune report: how it ended


def _key(path: str) -> str:
    return path.replace(".", "__")  # Tune's config keys: no dots


def _params(config: dict) -> dict[str, Any]:
    """A trial's values by spec path, from its Tune config (a random plan's
    trials sit under one grid key)."""
    flat = config.get("_", config)
    return {k.replace("__", "."): v for k, v in flat.items()}


def _domains(sweep) -> dict:
    from ray import tune

    out = {}
    for path, p in sweep.parameters.items():
        if p.distribution == "choice":
            out[_key(path)] = tune.choice(list(p.values))
        elif p.distribution == "uniform":
            out[_key(path)] = tune.uniform(p.low, p.high)
        elif p.distribution == "logUniform":
            out[_key(path)] = tune.loguniform(p.low, p.high)
        else:
            out[_key(path)] = tune.randint(int(p.low), int(p.high) + 1)
    return out


def trial_config(config, params: dict[str, Any]):
    """The trainer config of one trial: the job's, with its values and its prefix."""
    data = config.to_dict()
    data["spec"] = S.apply_params(data["spec"], params)
    data["storagePrefix"] = S.trial_prefix(config.storage_prefix, S.trial_id(params))
    return load_trainer_config(data)


def eval_rows(storage: JobStorage, metric: str) -> list[dict]:
    return [r for r in storage.read_metrics() if r.get(metric) is not None and r["step"] > 0]


def _run_trial(tune_config: dict, job: dict, stopped: list[str], cpus: int) -> None:
    """One Tune trial (runs in a Tune actor)."""
    from ray import tune

    config = load_trainer_config(job)
    metric = config.spec.sweep.metric
    params = _params(tune_config)
    tconfig = trial_config(config, params)
    tid = S.trial_id(params)
    storage = JobStorage(tconfig.storage_prefix, tconfig.spec.output)
    sent = 0

    def send_new(extra: Optional[dict] = None) -> None:
        nonlocal sent
        rows = eval_rows(storage, metric)
        if extra is None:
            # The last evaluation waits until the trial is done: a stop decided on it
            # would kill the trial while it saves its outputs.
            progress = storage.read_record(contract.PROGRESS, contract.ProgressRecord)
            total = progress.total_steps if progress else None
            rows = [r for r in rows if total and r["step"] < total]
        for row in rows[sent:]:
            tune.report({"step": row["step"], metric: row[metric], "trial": tid})
        sent = len(rows)
        if extra is not None:
            last = rows[-1] if rows else {"step": 0, metric: float("nan")}
            tune.report({"step": last["step"], metric: last[metric], "trial": tid, **extra})

    done = storage.read_record(contract.OUTPUTS, contract.OutputsRecord)
    if done is not None:
        send_new({STATE_KEY: S.TrialState.finished.value, "total_steps": done.steps})
        return
    if tid in stopped or storage.read_json(contract.HALT) is not None:
        send_new({STATE_KEY: S.TrialState.stopped.value})
        return
    failure: dict = {}

    def train() -> None:
        try:
            fit(tconfig, num_cpus_per_worker=cpus, name=f"trial-{tid}")
        except BaseException as exc:  # noqa: BLE001  (raised again in the trial's thread)
            failure["exc"] = exc

    worker = threading.Thread(target=train, name=f"kubetune-trial-{tid}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(POLL_SECONDS)
        send_new()
    if "exc" in failure:
        raise failure["exc"]
    out = storage.read_record(contract.OUTPUTS, contract.OutputsRecord)
    if out is None:  # halted by the scheduler
        send_new({STATE_KEY: S.TrialState.stopped.value})
        return
    send_new({STATE_KEY: S.TrialState.finished.value, "total_steps": out.steps})


class Book:
    """sweep.json, kept by the driver from Tune's callbacks."""

    def __init__(self, config, storage: JobStorage, prior: Optional[S.SweepRecord]):
        sweep = config.spec.sweep
        self.config, self.storage = config, storage
        self.metric, self.mode = sweep.metric, S.metric_mode(sweep)
        self.lock = threading.Lock()
        self.record = S.SweepRecord(
            metric=sweep.metric,
            mode=self.mode,
            trials=sweep.trials,
            parallel_trials=sweep.parallel_trials,
            algorithm=sweep.algorithm,
            records=list(prior.records) if prior else [],
        )
        self.by_id = {r.id: r for r in self.record.records}
        self.write()

    def trial(self, params: dict[str, Any]) -> S.TrialRecord:
        tid = S.trial_id(params)
        if tid not in self.by_id:
            rec = S.TrialRecord(id=tid, params={k: float(v) for k, v in params.items()})
            self.by_id[tid] = rec
            self.record.records.append(rec)
        return self.by_id[tid]

    def update(self, params: dict[str, Any], **changes: Any) -> None:
        with self.lock:
            rec = self.trial(params)
            for key, value in changes.items():
                setattr(rec, key, value)
            self.write()

    def result(self, params: dict[str, Any], result: dict) -> None:
        value = result.get(self.metric)
        with self.lock:
            rec = self.trial(params)
            if rec.state not in (S.TrialState.finished, S.TrialState.stopped):
                rec.state = S.TrialState.running
            rec.step = max(rec.step, int(result.get("step") or 0))
            if value is not None and not math.isnan(value):
                rec.metric = value
                if S.better(value, rec.best_metric, self.mode):
                    rec.best_metric = value
            if result.get("total_steps"):
                rec.total_steps = result["total_steps"]
            self.write()

    def trial_storage(self, params: dict) -> JobStorage:
        prefix = S.trial_prefix(self.config.storage_prefix, S.trial_id(params))
        return JobStorage(prefix, self.config.spec.output)

    def best(self) -> Optional[S.TrialRecord]:
        done = [r for r in self.record.records if r.state == S.TrialState.finished]
        best = None
        for r in done:
            if best is None or S.better(r.best_metric, best.best_metric, self.mode):
                best = r
        return best

    def write(self) -> None:
        rec = self.record
        rec.steps_trained = sum(r.step for r in rec.records)
        best = self.best()
        if best is not None:
            rec.best_trial, rec.best_params, rec.best_metric = (
                best.id,
                best.params,
                best.best_metric,
            )
        rec.updated_at = now()
        self.storage.write_record(S.SWEEP, rec)
        counts = rec.counts()
        done = counts["Finished"] + counts["Stopped"]
        message = (
            f"sweep: {done}/{rec.trials} trials done ({counts['Stopped']} stopped early), "
            f"{counts['Running']} running"
        )
        if rec.best_metric is not None:
            message += f"; best {self.metric} {rec.best_metric:.4f} ({rec.best_trial})"
        phase = contract.TrainPhase.succeeded if rec.done else contract.TrainPhase.training
        self.storage.write_progress(
            contract.ProgressRecord(
                phase=phase,
                step=done,
                total_steps=rec.trials,
                percent=round(100.0 * done / max(rec.trials, 1), 2),
                attempt=self.config.attempt,
                message=message,
                updated_at=now(),
            )
        )


# The driver's live books, by storage prefix (see Recorder).
_BOOKS: dict[str, Book] = {}


class Recorder(Callback):
    """Tune's trial events → the book (sweep.json). Module-level, holding only a
    key: Tune pickles its callbacks, and the book holds a lock and a filesystem."""

    def __init__(self, key: str):
        self.key = key

    @property
    def book(self) -> Book:
        return _BOOKS[self.key]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.book.update(_params(trial.config), state=S.TrialState.running)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.book.result(_params(trial.config), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        params = _params(trial.config)
        last = trial.last_result or {}
        tstore = self.book.trial_storage(params)
        outputs = tstore.read_record(contract.OUTPUTS, contract.OutputsRecord)
        if outputs is not None:
            state = S.TrialState.finished
        else:
            state = S.TrialState(last.get(STATE_KEY, S.TrialState.stopped.value))
        changes: dict = {"state": state, "stopped_early": state == S.TrialState.stopped}
        if outputs is not None:
            changes["step"] = outputs.steps or 0
            changes["total_steps"] = outputs.steps
        else:  # a stopped trial trains on to its next logged step
            progress = tstore.read_record(contract.PROGRESS, contract.ProgressRecord)
            changes["step"] = max(int(last.get("step") or 0), progress.step if progress else 0)
            changes["total_steps"] = progress.total_steps if progress else None
        self.book.update(params, **changes)

    def on_trial_error(self, iteration, trials, trial, **info):
        err = "the trial failed"
        try:  # the error's last line (the exception), from Tune's error file
            lines = Path(trial.error_file).read_text().strip().splitlines()
            err = next(line for line in reversed(lines) if line.strip() and "WARNING" not in line)
        except Exception:  # noqa: BLE001  (no file: the generic words)
            pass
        self.book.update(
            _params(trial.config),
            state=S.TrialState.failed,
            message=str(err).strip().splitlines()[-1][:500],
        )


class HaltingASHA(ASHAScheduler):
    """ASHA that stops a trial by asking it (contract.HALT under the trial's prefix) rather
    than by killing its actor: the trial's Ray Train run then ends on its own and
    gives back its placement group (a killed run's group outlives it when the
    Ray dashboard is off, and holds its CPUs)."""

    def __init__(self, key: str, **kwargs):
        super().__init__(**kwargs)
        self.key = key
        self.halted: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != self.STOP or result.get(STATE_KEY):
            return decision
        params = _params(trial.config)
        tid = S.trial_id(params)
        if tid not in self.halted:
            self.halted.add(tid)
            _BOOKS[self.key].trial_storage(params).write_json(
                contract.HALT, {"step": result.get("step"), "reason": "ASHA", "time": now()}
            )
        return self.CONTINUE


def cpus_per_worker(spec, available: int) -> int:
    workers = spec.resources.workers * spec.sweep.parallel_trials
    return max(1, min(worker_threads(spec), available // max(workers, 1)))


def fit_sweep(config, *, storage_path: Optional[str] = None) -> S.SweepRecord:
    """Run every trial (Ray must be up), then make the best trial's output the job's."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    spec = config.spec
    sweep = spec.sweep
    mode = S.metric_mode(sweep)
    storage = JobStorage(config.storage_prefix, spec.output)
    prior = storage.read_record(S.SWEEP, S.SweepRecord)
    book = Book(config, storage, prior)
    key = config.storage_prefix
    _BOOKS[key] = book
    stopped = [r.id for r in book.record.records if r.state == S.TrialState.stopped]

    if sweep.algorithm == "random":
        plan = S.random_plan(sweep, spec.hyperparameters.seed)
        param_space = {"_": tune.grid_search([{_key(k): v for k, v in p.items()} for p in plan])}
        search_alg, num_samples = None, 1
    else:
        from ray.tune.search.optuna import OptunaSearch

        known = [{_key(k): S.cast(k, v) for k, v in r.params.items()} for r in book.record.records]
        param_space = _domains(sweep)
        search_alg = OptunaSearch(
            metric=sweep.metric,
            mode=mode,
            points_to_evaluate=known or None,
            seed=spec.hyperparameters.seed,
        )
        num_samples = sweep.trials
    es = sweep.early_stopping
    if es.enabled:
        scheduler = HaltingASHA(
            key,
            time_attr="step",
            metric=sweep.metric,
            mode=mode,
            max_t=spec.hyperparameters.max_steps or 10_000_000,
            grace_period=S.grace_period(spec),
            reduction_factor=es.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    cpus = cpus_per_worker(spec, int(ray.cluster_resources().get("CPU", 0)))
    job = config.to_dict()

    def trainable(tune_config: dict) -> None:
        _run_trial(tune_config, job, stopped, cpus)

    tuner = tune.Tuner(
        # A trial only waits on its TorchTrainer: no CPU of its own, so parallelTrials x
        # workers fill the cluster. Ray refuses an empty bundle: a token of memory.
        tune.with_resources(trainable, {"cpu": 0, "memory": 2**20}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=num_samples,
            max_concurrent_trials=sweep.parallel_trials,
            search_alg=search_alg,
            scheduler=scheduler,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=f"kubetune-sweep-{config.job.namespace}-{config.job.name}-{config.job.uid}"
            f"-{int(time.time())}",
            storage_path=storage_path or str(cache_root() / "ray_results"),
            callbacks=[Recorder(key)],
            verbose=0,
        ),
    )
    try:
        tuner.fit()
    finally:
        _BOOKS.pop(key, None)
    return finish(config, book, storage)


def finish(config, book: Book, storage: JobStorage) -> S.SweepRecord:
    best = book.best()
    if best is None:
        failed = [r for r in book.record.records if r.state == S.TrialState.failed]
        why = f": {failed[0].message}" if failed and failed[0].message else ""
        raise RuntimeError(f"no trial of the sweep finished ({len(failed)} failed{why})")
    tstore = JobStorage(S.trial_prefix(config.storage_prefix, best.id), config.spec.output)
    outputs = (
        tstore.read_record(contract.OUTPUTS, contract.OutputsRecord) or contract.OutputsRecord()
    )
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"kubetune-sweep-{os.getpid()}.png"
    rows = {r.id: _trial_rows(config, r.id) for r in book.record.records}
    if plot_sweep(book.record, rows, local):
        storage.fs.put_file(str(local), storage.path(S.SWEEP_PLOT))
        local.unlink(missing_ok=True)
    with book.lock:
        book.record.done = True
        book.record.outputs = outputs
        storage.write_record(contract.OUTPUTS, outputs)
        book.write()
    return book.record


def _trial_rows(config, tid: str) -> list[dict]:
    return JobStorage(S.trial_prefix(config.storage_prefix, tid), config.spec.output).read_metrics()


def plot_sweep(record: S.SweepRecord, rows: dict[str, list[dict]], path: Path) -> bool:
    """The sweep's metric per trial over steps; stopped trials dashed."""
    metric = record.metric
    curves = {
        tid: [(r["step"], r[metric]) for r in trial_rows if r.get(metric) is not None]
        for tid, trial_rows in rows.items()
    }
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = {r.id: r for r in record.records}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for tid, points in curves.items():
        rec = states.get(tid)
        stopped = rec is not None and rec.state == S.TrialState.stopped
        label = tid + (" (best)" if tid == record.best_trial else "")
        ax.plot(
            *zip(*points, strict=False),
            "--" if stopped else "-",
            marker="o",
            linewidth=2.5 if tid == record.best_trial else 1.2,
            label=label + (" stopped" if stopped else ""),
        )
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep: {metric} per trial")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
