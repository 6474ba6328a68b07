"""A sweep vs the job's defaults, one run: held-out loss of the best trial and
the steps the sweep trained vs running every trial to the end.

On the shipped quickstart (SmolLM2-135M-Instruct + LoRA, chatterbot
conversations): a sweep of --trials trials (random search over learning rate,
LoRA rank and warmup, or Optuna's TPE with --algorithm tpe; ASHA stops the
trials that trail at each rung) and one job with kubetune's defaults (learning
rate 2e-4, r 16), both --steps steps. Both adapters are scored by one function
on the same held-out conversations (benchmarks/common.py). Trials that ASHA
stops train fewer steps: the sweep's cost is printed next to trials x steps,
what running every trial to the end costs.

    .venv/bin/python benchmarks/sweep.py [--trials 8] [--steps 24] [--parallel 1]
                                         [--algorithm random|tpe]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import common as C


def _run(job: dict) -> Path:
    import ray

    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.driver import ensure_env, run

    ensure_env()
    cfg = load_trainer_config(spec_to_trainer_config(job))
    ray.init(**C.ray_init())
    try:
        assert run(cfg, quiet=True) == 0
    finally:
        ray.shutdown()
    return Path(cfg.storage_prefix.removeprefix("file://"))


def jobs(train: Path, val: Path, out: Path, steps: int, trials: int, parallel: int, algorithm: str):
    common = {
        "dataset": {"validation": {"uri": str(val)}},
        "hyperparameters": {"maxSteps": steps, "logEverySteps": 2},
        "evaluation": {"enabled": True, "everySteps": max(2, steps // 6), "maxBatches": 8},
        "resources": {"cpuPerWorker": str(max(1, (os.cpu_count() or 2) // parallel))},
    }
    defaults = C.job(train, out.as_uri(), "defaults", **common)
    sweep = C.job(train, out.as_uri(), "sweep", **common)
    sweep["spec"]["sweep"] = {
        "trials": trials,
        "parallelTrials": parallel,
        "algorithm": algorithm,
        "parameters": {
            "hyperparameters.learningRate": {
                "distribution": "logUniform",
                "low": 2e-5,
                "high": 3e-3,
            },
            "method.lora.r": {"distribution": "choice", "values": [4, 8, 16, 32]},
            "hyperparameters.warmupRatio": {"distribution": "uniform", "low": 0.0, "high": 0.2},
        },
        "earlyStopping": {"gracePeriod": max(2, steps // 6), "reductionFactor": 2},
    }
    return defaults, sweep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--algorithm", choices=["random", "tpe"], default="random")
    C.add_split_flag(p)
    args = p.parse_args()
    C.prepare()
    train_rows, val_rows = C.split(distinct=not args.with_repeats)
    work = Path(tempfile.mkdtemp(prefix="kubetune-sweep-"))
    train = C.write_jsonl(work / "train.jsonl", train_rows)
    val = C.write_jsonl(work / "val.jsonl", val_rows)
    defaults, sweep = jobs(
        train, val, work / "out", args.steps, args.trials, args.parallel, args.algorithm
    )

    t0 = time.monotonic()
    default_prefix = _run(defaults)
    t_default = time.monotonic() - t0
    t0 = time.monotonic()
    sweep_prefix = _run(sweep)
    t_sweep = time.monotonic() - t0

    from quality_vs_trl import score

    record = json.loads((sweep_prefix / "sweep.json").read_text())
    best_adapter = json.loads((sweep_prefix / "outputs.json").read_text())["adapter"]
    loss_default = score(str(default_prefix / "adapter"), val_rows)
    loss_best = score(best_adapter.removeprefix("file://"), val_rows)
    trained = record["stepsTrained"]
    full = len(record["records"]) * args.steps
    stopped = sum(r["state"] == "Stopped" for r in record["records"])
    shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        f"sweep of {len(record['records'])} trials ({args.algorithm}, ASHA), "
        f"{args.steps} steps each, "
        f"vs kubetune's defaults; held-out loss on {len(val_rows)} conversations"
    )
    for r in sorted(record["records"], key=lambda r: r.get("bestMetric") or 1e9):
        params = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" for k, v in r["params"].items())
        best = f"{r['bestMetric']:.4f}" if r.get("bestMetric") is not None else "--"
        print(f"  {r['id']}  {params:<48} eval {best}  {r['state']:<8} {r['step']} steps")
    print(f"  defaults (lr 2e-4, r 16)            held-out loss {loss_default:.4f}")
    print(f"  best trial {record['bestTrial']}         held-out loss {loss_best:.4f}")
    print(f"  best - defaults                     {loss_best - loss_default:+.4f}  (<= 0: as good)")
    print(
        f"  steps trained by the sweep          {trained} of {full} "
        f"({100.0 * trained / full:.0f}% of running every trial to the end; "
        f"{stopped} trial(s) stopped early)"
    )
    print(f"  wall time: defaults {t_default:.0f}s, sweep {t_sweep:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
