"""Every shipped example validates; every invalid example fails as documented."""

from pathlib import Path

import pytest
import yaml

from kubetune_api.validation import validate_document

REPO = Path(__file__).resolve().parents[2]
VALID = sorted((REPO / "crds" / "examples").glob("*.yaml"))
INVALID = sorted((REPO / "crds" / "examples" / "invalid").glob("*.yaml"))


def _expect(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}: "):
            return line.split(": ", 1)[1]
    raise AssertionError(f"{path.name} has no '# {key}:' line")


def test_there_are_examples_of_each_kind():
    names = {p.stem for p in VALID}
    assert {"lora-minimal", "full-zero3-offload", "qlora", "chat-s3-secret", "quickstart"} <= names
    assert len(INVALID) >= 10


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_example(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs
    for doc in docs:
        result = validate_document(doc)
        assert result.ok, [str(e) for e in result.errors]
        assert path.read_text().startswith("#"), "examples open with the command that runs them"


def test_quickstart_runs_on_cpu():
    doc = yaml.safe_load((REPO / "crds/examples/quickstart.yaml").read_text())
    job = validate_document(doc).job
    assert job.spec.resources.gpus_per_worker == 0
    assert job.spec.hyperparameters.precision in ("fp32", "bf16")


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example(path):
    result = validate_document(yaml.safe_load(path.read_text()))
    assert not result.ok
    expected = _expect(path, "expect-cli")
    assert any(expected in str(e) for e in result.errors), [str(e) for e in result.errors]
    _expect(path, "expect")  # the API server's message, checked by the envtest tier
