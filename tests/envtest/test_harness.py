"""The harness itself: no stray processes, loud failures for missing parts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import BUILD_COMMAND, MissingBinary, find
from harness.bins import REPO_ROOT

INNER = Path(__file__).with_name("inner_session_check.py")


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or environment mention ``text``."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def test_a_session_leaves_no_stray_processes(tmp_path):
    """A whole pytest session (control plane, KubeRay, S3) in a subprocess; afterwards
    no process mentions its run dir."""
    root = tmp_path / "runs"
    env = dict(os.environ, KUBETUNE_RUN_ROOT=str(root))
    env.pop("KUBETUNE_KEEP_SERVERS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(INNER)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "1 passed" in proc.stdout
    assert _processes_mentioning(str(root)) == []
    # A passing session removes its run dir.
    assert list(root.iterdir()) == []


def test_missing_binary_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("KUBETUNE_TEST_BIN", raising=False)
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    with pytest.raises(MissingBinary) as err:
        find("kube-apiserver")
    assert BUILD_COMMAND in str(err.value)
    assert "bash scripts/build-test-bins.sh k8s" in str(err.value)
