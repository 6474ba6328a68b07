"""The Dockerfile's install steps are the project's own script, exercised here.

There is no Docker engine on CI machines; instead this runs, for each image
target, the exact setup.sh invocation its Dockerfile stage runs (into a
temporary venv) and checks what the image would contain.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _stage(target: str) -> str:
    match = re.search(rf"^FROM \S+ AS {target}$(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S)
    assert match, f"no stage {target}"
    return match.group(1)


def test_base_image_is_pinned_and_users_are_not_root():
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    for target in ("operator", "trainer"):
        users = re.findall(r"^USER (\S+)$", _stage(target), re.M)
        assert users and users[-1].split(":")[0] not in ("0", "root"), target


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_each_stage_installs_with_setup_sh_and_its_extra(target):
    run = re.search(r"RUN (KUBETUNE_VENV=\S+ KUBETUNE_EXTRAS=(\w+) KUBETUNE_DEV=0)", _stage(target))
    assert run and run.group(2) == target
    assert "bash scripts/setup.sh" in _stage(target)


def test_operator_image_install_has_the_operator_and_no_training_stack(tmp_path):
    venv = tmp_path / "opt-kubetune"
    env = {
        **os.environ,
        "KUBETUNE_VENV": str(venv),
        "KUBETUNE_EXTRAS": "operator",
        "KUBETUNE_DEV": "0",
    }
    proc = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check = (
        "import importlib.util as u; import kopf, kubernetes, kubetune_api, kubetune_cli; "
        "print([m for m in ('torch', 'ray', 'deepspeed', 'transformers') if u.find_spec(m)])"
    )
    out = subprocess.run([str(venv / "bin/python"), "-c", check], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # non-editable: the image must not point back at the source tree
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import kubetune_api; print(kubetune_api.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert str(venv) in where.stdout, where.stdout
    cli = subprocess.run(
        [str(venv / "bin/kubetune"), "validate", str(REPO / "crds/examples/lora-minimal.yaml")],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
