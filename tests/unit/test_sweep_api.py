"""The sweep's plan and its record, without Ray: what the trainer will run, how
a trial's spec is made, and what the operator shows from sweep.json."""

from __future__ import annotations

import copy

from kubetune_api import sweep as S
from kubetune_api.models import FineTuneJobSpec
from kubetune_api.validation import resolve_spec
from kubetune_operator.progress import progress_to_status

SPEC = {
    "model": {"name": "org/model"},
    "dataset": {"train": {"uri": "s3://bucket/t.jsonl"}},
    "hyperparameters": {"seed": 3},
    "sweep": {
        "trials": 6,
        "parallelTrials": 2,
        "parameters": {
            "hyperparameters.learningRate": {
                "distribution": "logUniform",
                "low": 1e-5,
                "high": 1e-3,
            },
            "method.lora.r": {"distribution": "intRange", "low": 4, "high": 64},
            "hyperparameters.batchSize": {"distribution": "choice", "values": [2, 4]},
        },
    },
}


def _spec(**sweep) -> FineTuneJobSpec:
    spec = copy.deepcopy(SPEC)
    spec["sweep"].update(sweep)
    return resolve_spec(spec)


def test_the_random_plan_is_the_same_on_every_start_without_repeats():
    spec = _spec()
    plan = S.random_plan(spec.sweep, spec.hyperparameters.seed)
    assert plan == S.random_plan(spec.sweep, spec.hyperparameters.seed)
    assert len(plan) == 6 and len({S.trial_id(p) for p in plan}) == 6
    for p in plan:
        assert 1e-5 <= p["hyperparameters.learningRate"] <= 1e-3
        assert isinstance(p["method.lora.r"], int) and 4 <= p["method.lora.r"] <= 64
        assert p["hyperparameters.batchSize"] in (2, 4)
    other = S.random_plan(spec.sweep, 4)
    assert other != plan  # the seed decides


def test_a_small_space_gives_fewer_trials_not_repeats():
    spec = _spec(
        trials=5,
        parameters={"method.lora.r": {"distribution": "choice", "values": [8, 16]}},
    )
    plan = S.random_plan(spec.sweep, 1)
    assert sorted(p["method.lora.r"] for p in plan) == [8, 16]
    assert any("only 2 distinct" in line for line in S.describe(spec))


def test_a_trial_is_the_job_with_its_values_and_no_sweep():
    spec = _spec()
    params = {"hyperparameters.learningRate": 3e-4, "method.lora.r": 12.0}
    trial = S.trial_spec(spec, params)
    assert trial.sweep is None
    assert trial.hyperparameters.learning_rate == 3e-4
    assert trial.method.lora.r == 12 and isinstance(trial.method.lora.r, int)
    assert trial.method.lora.alpha == spec.method.lora.alpha  # the rest is the job's
    assert S.trial_id(params) == S.trial_id({**params, "method.lora.r": 12})


def test_validate_lists_the_space_and_the_trials():
    lines = S.describe(_spec())
    text = "\n".join(lines)
    assert "6 trial(s), 2 at a time" in text and "holds 2 worker(s)" in text
    assert "hyperparameters.learningRate: logUniform from 1e-05 to 0.001" in text
    assert sum(line.strip().startswith("trial t") for line in lines) == 6


def test_status_counts_trials_and_shows_the_best():
    sweep = {
        "metric": "eval_loss",
        "mode": "min",
        "trials": 4,
        "parallelTrials": 2,
        "algorithm": "random",
        "records": [
            {"id": "ta", "params": {"method.lora.r": 8}, "state": "Finished", "step": 8},
            {"id": "tb", "params": {"method.lora.r": 16}, "state": "Stopped", "step": 2},
            {"id": "tc", "params": {"method.lora.r": 4}, "state": "Running", "step": 4},
        ],
        "bestTrial": "ta",
        "bestParams": {"method.lora.r": 8},
        "bestMetric": 1.234567891,
        "stepsTrained": 14,
    }
    snapshot = {
        "prefix": "s3://bucket/p",
        "progress": {"phase": "Training", "step": 2, "totalSteps": 4, "updatedAt": "x"},
        "sweep": sweep,
    }
    status = progress_to_status(snapshot)
    assert status["progress"]["display"] == "2/4 trials"
    s = status["sweep"]
    assert (s["finished"], s["stopped"], s["running"], s["failed"]) == (1, 1, 1, 0)
    assert s["bestTrial"] == "ta" and s["bestParams"] == {"method.lora.r": 8.0}
    assert s["display"] == "eval_loss 1.2346" and s["stepsTrained"] == 14
    # a status the API's own model accepts
    from kubetune_api.models import FineTuneJobStatus

    FineTuneJobStatus.model_validate(status)


def test_kubetune_run_prints_each_trial_change_and_a_ranking(tmp_path):
    import io

    from kubetune_trainer.local import Console, summary
    from kubetune_trainer.storage import JobStorage
    from kubetune_trainer.sweep_console import SweepWatcher

    storage = JobStorage(tmp_path.as_uri())
    record = S.SweepRecord(
        metric="eval_loss",
        mode="min",
        trials=3,
        parallel_trials=2,
        algorithm="random",
        records=[
            S.TrialRecord(id="ta", params={"method.lora.r": 8}, state="Running", step=2),
            S.TrialRecord(id="tb", params={"method.lora.r": 16}, state="Running", step=2),
        ],
    )
    storage.write_record(S.SWEEP, record)
    out = io.StringIO()
    watcher = SweepWatcher(storage, Console(out, bar=False))
    watcher.poll()
    watcher.poll()  # nothing changed: nothing printed
    record.records[0].state, record.records[0].step = "Finished", 8
    record.records[0].metric = record.records[0].best_metric = 1.5
    record.records[1].state, record.records[1].best_metric = "Stopped", 2.5
    record.records.append(S.TrialRecord(id="tc", params={"method.lora.r": 4}, step=0))
    record.best_trial = "ta"
    storage.write_record(S.SWEEP, record)
    watcher.poll()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("kubetune run: sweep of 3 trials, 2 at a time")
    assert [line.split()[0] for line in lines[1:]] == ["ta", "tb", "ta", "tb", "tc"]
    assert "r=8" in lines[3] and "eval_loss 1.5000" in lines[3] and lines[3].endswith("Finished")
    text = summary(storage)
    ranked = [
        line.split()[1] for line in text.splitlines() if line.strip()[:2].strip(".").isdigit()
    ]
    assert ranked == ["ta", "tb", "tc"]
    assert "<- output" in text.splitlines()[1]
