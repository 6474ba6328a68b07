"""The paths only CUDA exercises, one check per call (scripts/gpu-check.sh runs
them all, each in a fresh process under a time limit).

    python scripts/gpu_check.py CHECK OUT_DIR
    CHECK: lora-bf16 | qlora | zero3-offload | dpo | shm

Each check trains the shipped SmolLM2-135M-Instruct (benchmarks/common.py
prepares it and the chat data) on one GPU through kubetune's own trainer
(Ray Train + DeepSpeed, one worker), and appends one JSON line to
OUT_DIR/results.jsonl: the check, ok, seconds, and what it measured.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import common as C  # noqa: E402

STEPS = 20
GPU = {"workers": 1, "gpusPerWorker": 1, "cpuPerWorker": "4", "memoryPerWorker": "32Gi"}


def _train(out: Path, name: str, train: Path, **spec) -> dict:
    """One local kubetune run on the GPU; steady tokens/s and peak GPU memory."""
    import torch

    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.driver import ensure_env, run

    ensure_env()
    spec.setdefault("resources", {}).update(GPU)
    spec.setdefault("hyperparameters", {}).setdefault("maxSteps", STEPS)
    job = C.job(train, (out / "runs").as_uri(), name, **spec)
    if job["spec"]["method"]["type"] == "full":
        job["spec"]["method"].pop("lora")  # C.job's LoRA settings
    cfg = load_trainer_config(spec_to_trainer_config(job))
    ray_init = C.ray_init() | {"num_gpus": torch.cuda.device_count()}
    assert run(cfg, ray_init=ray_init, quiet=True) == 0, f"{name}: the run failed"
    prefix = Path(cfg.storage_prefix.removeprefix("file://"))
    tps, tokens = C.steady_tokens_per_second(prefix, cfg.spec.hyperparameters.max_steps)
    rows = C.read_jsonl(prefix / "metrics.jsonl")
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    return {"tokens_per_s": round(tps, 1), "tokens": tokens, "first_loss": losses[0],
            "last_loss": losses[-1]}  # fmt: skip


def check_lora_bf16(out: Path) -> dict:
    return _train(out, "lora-bf16", C.DATA, hyperparameters={"precision": "bf16"})


def check_qlora(out: Path) -> dict:
    import bitsandbytes  # the path QLoRA needs; fails here when it is missing

    got = _train(out, "qlora", C.DATA, method={"type": "qlora"})
    return got | {"bitsandbytes": bitsandbytes.__version__}


def check_zero3_offload(out: Path) -> dict:
    return _train(
        out,
        "zero3-offload",
        C.DATA,
        method={"type": "full"},
        distributed={"zeroStage": 3, "offloadOptimizer": True, "offloadParameters": True},
    )


def check_dpo(out: Path) -> dict:
    from dpo_vs_trl import preference_rows

    train = C.write_jsonl(out / "preferences.jsonl", preference_rows())
    return _train(
        out,
        "dpo",
        train,
        dataset={"format": "preference"},
        method={"objective": "dpo", "dpo": {"beta": 0.1}},
    )


def check_shm(out: Path) -> dict:
    """/dev/shm inside a Ray GPU worker: its size, 1 GiB written through it, and
    NCCL (which puts its buffers there) all-reducing on the GPU."""
    import ray

    @ray.remote(num_gpus=1)
    def worker() -> dict:
        import torch
        import torch.distributed as dist

        st = os.statvfs("/dev/shm")
        size = st.f_frsize * st.f_blocks
        path = Path("/dev/shm/kubetune-gpu-check")
        t0 = time.monotonic()
        with path.open("wb") as f:
            for _ in range(64):
                f.write(os.urandom(16 << 20))
        wrote = time.monotonic() - t0
        path.unlink()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")
        dist.init_process_group("nccl", rank=0, world_size=1)
        x = torch.ones(1 << 20, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        dist.destroy_process_group()
        return {"shm_bytes": size, "write_1gib_s": round(wrote, 2), "nccl_sum": float(x[0])}

    ray.init(**(C.ray_init() | {"num_gpus": 1}))
    try:
        got = ray.get(worker.remote(), timeout=300)
    finally:
        ray.shutdown()
    assert got["shm_bytes"] > 64 << 20, f"/dev/shm is only {got['shm_bytes']} bytes"
    return got


CHECKS = {
    "lora-bf16": check_lora_bf16,
    "qlora": check_qlora,
    "zero3-offload": check_zero3_offload,
    "dpo": check_dpo,
    "shm": check_shm,
}


def main() -> int:
    name, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 3
    C.prepare()
    t0 = time.monotonic()
    record: dict = {"check": name, "gpu": torch.cuda.get_device_name(0)}
    try:
        record |= CHECKS[name](out) | {"ok": True}
    except Exception as exc:  # recorded, and the check fails
        record |= {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    record["seconds"] = round(time.monotonic() - t0, 1)
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
