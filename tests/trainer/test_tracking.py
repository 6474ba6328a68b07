"""MLflow tracking against a real MLflow server (the PyPI package in its own
venv, SQLite store, local artifact root), read back with MLflow's own client;
and a server that is down, which must not fail the run. Two Ray fits on one
local Ray (as `kubetune run` runs a job after its checks) and one blackholed
server without Ray.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest
import trainer_helpers as H

from harness.mlflow import MlflowServer
from harness.procs import LOOPBACK, free_port

sys.path.insert(0, str(H.REPO / "benchmarks"))
import lineage_chain as C  # noqa: E402

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(root / "server", root / "logs").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory, _ray_session):
    work = tmp_path_factory.mktemp("tracking")
    H.tiny_model(work / "models/tiny")
    (work / "data").mkdir()
    H.write_jsonl(work / "data/chat.jsonl", H.chat_rows(48))
    C.start_ray()
    return work


def _job(work, name: str, tracking_uri: str) -> dict:
    job = H.job(work / "models/tiny", work / "data/chat.jsonl", "unused", name=name)
    del job["metadata"]["uid"]  # as `kubetune run`: under ./runs/default/NAME/local
    del job["spec"]["output"]
    job["spec"]["tracking"] = {"mlflow": {"trackingUri": tracking_uri, "experiment": "kt-tests"}}
    return job


def _prefix(work, name: str):
    return work / "runs" / "default" / name / "local"


def test_the_mlflow_run_of_a_kubetune_run(work, mlflow_server):
    _, console = C.train(work, _job(work, "tracked", mlflow_server.url))
    prefix = _prefix(work, "tracked")
    tracking = json.loads((prefix / "tracking.json").read_text())
    assert tracking["reachable"] is True, tracking
    assert f"mlflow run:   {tracking['url']}" in console
    run = mlflow_server.read_run(tracking["runId"])
    assert run["status"] == "FINISHED"
    assert run["experiment"] == "kt-tests" and run["experiment_id"] == tracking["experimentId"]
    # params: the resolved spec, defaults included
    params = run["params"]
    assert params["hyperparameters.maxSteps"] == "6"
    assert params["hyperparameters.lrScheduler"] == "cosine"
    assert params["model.uri"] == str(work / "models/tiny")
    assert params["job"] == "default/tracked"
    # metrics: every row the trainer stored, at its step
    rows = [json.loads(line) for line in (prefix / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in run["metrics"]["train_loss"]] == [s for s, _ in train]
    assert [v for _, v in run["metrics"]["train_loss"]] == pytest.approx([v for _, v in train])
    evals = [(r["step"], r["evalLoss"]) for r in rows if "evalLoss" in r]
    assert [s for s, _ in run["metrics"]["eval_loss"]] == [s for s, _ in evals] == [0, 3, 6]
    assert all(v > 0 for _, v in run["metrics"]["tokens_per_second"])
    # artifacts and the references in tags
    assert {"loss.png", "run.json", "outputs.json"} <= set(run["artifacts"])
    outputs = json.loads((prefix / "outputs.json").read_text())
    record = json.loads((prefix / "run.json").read_text())
    assert run["tags"]["kubetune.output"] == outputs["adapter"]
    assert run["tags"]["kubetune.specHash"] == record["specHash"]
    assert run["tags"]["kubetune.dataHash"] == record["dataset"]["hash"]


def test_a_tracking_server_that_is_down_does_not_fail_the_run(work):
    down = f"http://{LOOPBACK}:{free_port()}"  # nothing listens there
    _, console = C.train(work, _job(work, "untracked", down))
    prefix = _prefix(work, "untracked")
    assert json.loads((prefix / "progress.json").read_text())["phase"] == "Succeeded"
    assert json.loads((prefix / "outputs.json").read_text())["steps"] == 6
    tracking = json.loads((prefix / "tracking.json").read_text())
    assert tracking["reachable"] is False and tracking.get("runId") is None
    assert "experiments/get-by-name" in tracking["message"]
    assert "refused" in tracking["message"].lower()
    assert "mlflow:       not reachable:" in console


def test_a_server_that_never_answers_never_blocks_the_step():
    """A listening socket that never answers: each request waits for its
    timeout in the tracker's thread; the step's calls return at once, a full
    queue drops and counts, and close() is bounded."""
    from kubetune_api.models import MlflowTracking
    from kubetune_trainer.tracking import MlflowTracker

    hole = socket.socket()
    hole.bind((LOOPBACK, 0))
    hole.listen(64)
    states = []
    try:
        url = f"http://{LOOPBACK}:{hole.getsockname()[1]}"
        tracker = MlflowTracker(
            MlflowTracking(tracking_uri=url),
            {},
            states.append,
            log=lambda _: None,
            timeout=1.0,
            queue_size=4,
        )
        tracker.start("r", {"a": "1"}, {})
        slowest = 0.0
        for step in range(1, 201):
            t0 = time.perf_counter()
            tracker.log_rows([{"step": step, "loss": 1.0}])
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 0.05
        t0 = time.monotonic()
        tracker.close(wait=3.0)
        assert time.monotonic() - t0 < 4.0
    finally:
        hole.close()
    assert any("timed out" in s.message.lower() for s in states if s.message)
    last = states[-1]
    assert last.reachable is False and last.run_id is None
    assert last.dropped > 0
