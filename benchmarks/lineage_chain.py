"""A chain of two fine-tunes: job A on data set 1, then job B `fromJob: A` on
data set 2. Prints how their run records link and the held-out loss of the
base model, A and B on both held-out sets (did B learn set 2, and what did it
keep of set 1?).

    .venv/bin/python benchmarks/lineage_chain.py            # SmolLM2-135M, ~3 min on 2 CPUs
    .venv/bin/python benchmarks/lineage_chain.py --steps 20 --work /tmp/chain

tests/trainer/test_lineage.py runs the same chain on a tiny model. Both jobs run
in this process on one local Ray, as `kubetune run` runs them after its checks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common

# Set 2 is narrow on purpose: a few steps visibly move its loss, so the table
# shows what the second job learned on top of the first.
COLOURS = ("red", "green", "blue", "amber", "violet", "teal", "coral", "olive")


def data_set_2(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Which colour is parcel {i}?"},
                {"role": "assistant", "content": f"Parcel {i} is {COLOURS[i % len(COLOURS)]}."},
            ]
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chain_jobs(model: str, data: dict[str, tuple[str, str]], steps: int, lr: float) -> list[dict]:
    """Two FineTuneJobs: a on set 1, b from a on set 2 (held-out files given)."""

    def job(name: str, train: str, val: str, **model_extra) -> dict:
        return {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {
                "model": {"uri": model, **model_extra},
                "dataset": {
                    "train": {"uri": train},
                    "validation": {"uri": val},
                    "format": "chat",
                    "maxSeqLength": 128,
                    "packing": False,
                },
                "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                "hyperparameters": {
                    "maxSteps": steps,
                    "learningRate": lr,
                    "batchSize": 4,
                    "precision": "fp32",
                    "logEverySteps": max(1, steps // 4),
                    "seed": 3,
                },
                "distributed": {"zeroStage": 2},
                "resources": {"workers": 1, "gpusPerWorker": 0, "cpuPerWorker": "2"},
                "evaluation": {"everySteps": steps},
                "checkpointing": {"everySteps": steps, "keepLast": 1},
            },
        }

    return [job("chain-a", *data["set1"]), job("chain-b", *data["set2"], fromJob="chain-a")]


def start_ray() -> None:
    """One local Ray for both jobs (a fit costs ~15 s of Ray start otherwise)."""
    import ray

    from kubetune_trainer.driver import ensure_env

    ensure_env()
    if ray.is_initialized():
        return
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception:  # noqa: BLE001
        # Ray gives its raylet a fixed 30 s to register, which a loaded machine
        # can miss; once more, as `kubetune run` advises.
        ray.shutdown()
        time.sleep(5)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def train(work: Path, job: dict) -> tuple[Path, str]:
    """What `kubetune run` does after its checks, on the Ray this process holds:
    fromJob resolved under work/runs, then the driver. (prefix, its summary)."""
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.driver import run
    from kubetune_trainer.local import local_parent, summary
    from kubetune_trainer.storage import JobStorage

    out = (work / "runs").as_uri()
    parent, problem = local_parent(job, out)
    if problem:
        raise RuntimeError(problem)
    config = load_trainer_config(spec_to_trainer_config(job, default_output_uri=out, parent=parent))
    errors: list[str] = []
    if run(config, quiet=True, log=errors.append) != 0:
        raise RuntimeError(f"{job['metadata']['name']} failed: {' '.join(errors)}")
    storage = JobStorage(config.storage_prefix)
    return Path(storage.root), summary(storage)


def run_chain(work: Path, model: str, steps: int, lr: float, set1: list, set2: list) -> dict:
    """Train both jobs (one local Ray) under work/runs; returns their prefixes,
    run records and outputs."""
    n1, n2 = len(set1) // 8, len(set2) // 8
    data = {
        "set1": (
            write_jsonl(work / "data/set1-train.jsonl", set1[n1:]),
            write_jsonl(work / "data/set1-val.jsonl", set1[:n1]),
        ),
        "set2": (
            write_jsonl(work / "data/set2-train.jsonl", set2[n2:]),
            write_jsonl(work / "data/set2-val.jsonl", set2[:n2]),
        ),
    }
    result: dict = {"data": data, "jobs": {}}
    start_ray()
    for job in chain_jobs(model, data, steps, lr):
        prefix, console = train(work, job)
        result["jobs"][job["metadata"]["name"]] = {
            "prefix": prefix,
            "run": json.loads((prefix / "run.json").read_text()),
            "outputs": json.loads((prefix / "outputs.json").read_text()),
            "console": console,
        }
    return result


def losses(model: str, result: dict) -> dict[str, dict[str, float]]:
    """Held-out loss of the base model and of each job's final adapter on both sets."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sets = {
        k: [json.loads(line) for line in Path(v[1]).read_text().splitlines()]
        for k, v in result["data"].items()
    }
    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    table: dict[str, dict[str, float]] = {}
    for who in ["base", *result["jobs"]]:
        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        if who != "base":
            adapter = result["jobs"][who]["outputs"]["adapter"].removeprefix("file://")
            m = PeftModel.from_pretrained(m, adapter)
        table[who] = {k: common.heldout_loss(m, tok, rows) for k, rows in sets.items()}
    return table


def print_report(result: dict, table: dict) -> None:
    a, b = result["jobs"]["chain-a"], result["jobs"]["chain-b"]
    print("run records:")
    for name, job in result["jobs"].items():
        run = job["run"]
        parent = run.get("parent") or {}
        print(
            f"  {name}: spec {run['specHash'][:12]}  data {run['dataset']['hash'][:12]}  "
            f"base {(run['baseModel'].get('sha256') or run['baseModel'].get('name'))[:12]}  "
            f"parent {parent.get('runRecord') or '-'}"
        )
    link = (b["run"].get("parent") or {}).get("specHash") == a["run"]["specHash"]
    print(f"  chain-b's parent record is chain-a's: {link}")
    print()
    print(f"{'held-out loss':<14}{'set 1':>10}{'set 2':>10}")
    for who, row in table.items():
        print(f"{who:<14}{row['set1']:>10.4f}{row['set2']:>10.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    common.prepare()
    work = args.work or Path(tempfile.mkdtemp(prefix="kubetune-chain-"))
    set1 = common.chat_rows()[:160]
    result = run_chain(work, str(common.MODEL), args.steps, args.lr, set1, data_set_2(160))
    print_report(result, losses(str(common.MODEL), result))
    print(f"\n(results under {work / 'runs'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
