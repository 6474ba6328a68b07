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

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
# The same start the lineage benchmark uses: idempotent, the environment set before
# Ray starts (its workers inherit it), one retry on a loaded machine.
from lineage_chain import start_ray  # noqa: E402


@pytest.fixture(scope="session")
def _ray_session():
    yield
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """The shared local Ray, up (started on first use, or again after a test that
    needed a Ray of its own stopped it)."""
    start_ray()
