"""Start one Ray Train run of a job: a TorchTrainer with one DeepSpeed engine per
worker (kubetune_trainer.recipe), on the Ray cluster this process is connected
to. The driver calls it once per job; a sweep once per trial.
"""

from __future__ import annotations

import math

from .model import cache_root
from .recipe import train_loop_per_worker


def worker_threads(spec, available: int | None = None) -> int:
    cpu = spec.resources.cpu_per_worker
    n = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    n = max(1, math.floor(n))
    if available:
        n = min(n, max(1, available // spec.resources.workers))
    return n


def fit(
    config,
    *,
    num_cpus_per_worker: int | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    stop_dir: str | None = None,
):
    """Run the TorchTrainer on the Ray cluster this process is connected to.
    `name` tells apart the runs of one job (a sweep's trials); `stop_dir` is the
    folder of stop requests (kubetune_trainer.stop) when not a pod's default."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = config.spec
    res = spec.resources
    use_gpu = res.gpus_per_worker > 0
    cpus = num_cpus_per_worker or worker_threads(spec, int(ray.cluster_resources().get("CPU", 0)))
    per_worker = {"CPU": cpus}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "trainer_config": config.to_dict(),
            "threads": cpus,
            "stop_dir": stop_dir,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=f"kubetune-{config.job.namespace}-{config.job.name}-{config.job.uid}"
            + (f"-{name}" if name else ""),
            storage_path=storage_path or str(cache_root() / "ray_results"),
        ),
    )
    return trainer.fit()
