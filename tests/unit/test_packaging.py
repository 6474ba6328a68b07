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


def _instructions(text: str) -> list[str]:
    """One string per Dockerfile instruction, continuation lines joined."""
    return [line for line in text.replace("\\\n", " ").splitlines() if line.strip()]


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
    run = re.search(r"KUBETUNE_VENV=\S+ KUBETUNE_EXTRAS=(\S+) KUBETUNE_DEV=0", _stage(target))
    assert run and run.group(1).split(",")[0] == target
    assert "bash scripts/setup.sh" in _stage(target)


def test_the_venv_is_on_path_in_a_login_shell():
    # KubeRay runs Ray as `bash -lc`, whose /etc/profile resets PATH.
    assert "export PATH=/opt/kubetune/bin:$PATH' > /etc/profile.d/" in _stage("base")


def test_the_build_ca_bundle_is_a_secret_mount_only():
    # The CA bundle of a TLS-inspecting network must never land in a layer or
    # in the image's environment.
    assert not re.search(r"^(COPY|ADD)\b.*(\.crt|\.pem|ca-bundle)", DOCKERFILE, re.M)
    for line in _instructions(DOCKERFILE):
        if line.startswith(("ENV ", "ARG ")):
            assert not re.search(r"SSL_CERT|PIP_CERT|REQUESTS_CA|proxy", line, re.I), line
    for target in ("base", "operator", "trainer"):
        for run in (line for line in _instructions(_stage(target)) if line.startswith("RUN ")):
            if "ca-bundle" in run:
                assert "--mount=type=secret,id=ca-bundle" in run, run


def test_the_build_context_holds_what_the_dockerfile_copies():
    kept = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M)
    for source in " ".join(sources).split():
        assert source.rstrip("/") in kept, f".dockerignore leaves out {source}"


def test_trainer_image_has_what_kuberay_and_deepspeed_call():
    trainer = _stage("trainer")
    # KubeRay's probes and RayJob submission talk to Ray's dashboard (ray[default]).
    extras = re.search(r"KUBETUNE_EXTRAS=(\S+)", trainer).group(1).split(",")
    assert "kuberay" in extras
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^kuberay = \["ray\[default\]', pyproject, re.M)
    assert re.search(r"apt-get install[^\n]* g\+\+", trainer)
    assert re.search(r"apt-get install[^\n]* wget", trainer)
    assert "TORCH_EXTENSIONS_DIR" in trainer and "HF_HOME" in trainer


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
        # `kubetune api` (its upload checks are the trainer package's, without torch)
        "import kubetune_openai.server, kubetune_openai.datafile, kubetune_trainer.data; "
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
