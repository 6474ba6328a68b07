"""The trainer tier's one local Ray.

Every test that fits in this process shares one `ray.init(num_cpus=2)`, started
the first time a test asks for `ray_local` and stopped when the pytest run ends:
each start costs ~15 s and ~3.5 GB for Ray's processes, and a module of its own
per start added up to minutes. Tests of a *process* (`kubetune run` in a
subprocess, a SIGKILLed trainer, the RayJob entrypoint) still start their own
Ray there, as a user's run does; so does the one test whose point is the Ray
node's own environment (tests/trainer/test_trainer_s3.py).
"""

from __future__ import annotations

import time

import pytest


def start_ray() -> None:
    """The shared local Ray, if it is not up already (idempotent)."""
    import ray

    from kubetune_trainer.driver import ensure_env

    if ray.is_initialized():
        return
    ensure_env()  # before Ray starts: its workers inherit the environment
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception:  # noqa: BLE001
        # Ray gives its raylet a fixed 30 s to register, which a loaded machine
        # can miss; once more, as `kubetune run` advises.
        ray.shutdown()
        time.sleep(5)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def _ray_session():
    yield
    import sys

    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """The shared local Ray, up (started on first use, or again after a test that
    needed a Ray of its own stopped it)."""
    start_ray()
