"""A real MLflow tracking server (the PyPI package, in its own venv built by
scripts/build-mlflow.sh) with a SQLite backend store and a local artifact
root, on a free port; and MLflow's own client, run in that venv, to read back
what the trainer logged."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from .procs import LOOPBACK, Server, free_port, run

REPO = Path(__file__).resolve().parents[2]

# Runs in the MLflow venv: a run's params, metric histories, tags and artifacts as JSON.
_READ_RUN = """
import json, sys
from mlflow import MlflowClient
c = MlflowClient(sys.argv[1])
run = c.get_run(sys.argv[2])
def walk(path=None):
    out = []
    for f in c.list_artifacts(run.info.run_id, path):
        out += walk(f.path) if f.is_dir else [f.path]
    return out
print(json.dumps({
    "status": run.info.status,
    "experiment_id": run.info.experiment_id,
    "experiment": c.get_experiment(run.info.experiment_id).name,
    "params": run.data.params,
    "tags": run.data.tags,
    "metrics": {k: [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, k)]
                for k in run.data.metrics},
    "artifacts": walk(),
}))
"""


def mlflow_venv() -> Path:
    """The cached venv (built on first use: about a minute)."""
    proc = run(["bash", str(REPO / "scripts/build-mlflow.sh")], timeout=900)
    return Path(proc.stdout.strip().splitlines()[-1])


class MlflowServer:
    def __init__(self, workdir: Path, log_dir: Path) -> None:
        self.venv = mlflow_venv()
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        workdir = Path(workdir)
        (workdir / "artifacts").mkdir(parents=True, exist_ok=True)
        self.server = Server(
            "mlflow",
            [
                self.venv / "bin/mlflow",
                "server",
                "--host",
                LOOPBACK,
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{workdir / 'mlflow.db'}",
                "--artifacts-destination",
                workdir / "artifacts",
            ],
            log_dir,
        )

    def start(self, timeout: float = 420) -> MlflowServer:
        self.server.start()

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200

        self.server.wait_ready(ready, timeout, "ready (/health)")

        # The backend store is opened (and its schema migrated) on the first API
        # request, which can take many seconds: ready means that is done.
        def store_ready() -> bool:
            url = f"{self.url}/api/2.0/mlflow/experiments/search?max_results=1"
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status == 200

        self.server.wait_ready(store_ready, timeout, "ready (its store answers)")
        return self

    def stop(self) -> None:
        self.server.stop()

    def read_run(self, run_id: str) -> dict:
        """The run as MLflow's own Python client sees it."""
        proc = subprocess.run(
            [str(self.venv / "bin/python"), "-c", _READ_RUN, self.url, run_id],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"reading MLflow run {run_id} failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
