"""Finds the real binaries that scripts/build-test-bins.sh builds.

Lookup order for each binary: ``$KUBETUNE_TEST_BIN`` (a bin dir printed by the
script), then ``$KUBEBUILDER_ASSETS`` (envtest's etcd, kube-apiserver and
kubectl only), then the cache dir the script computes from versions.env.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "scripts" / "versions.env"
BUILD_COMMAND = "bash scripts/build-test-bins.sh"

# binary name -> the build-test-bins.sh part that builds it
PARTS = {
    "etcd": "etcd",
    "kube-apiserver": "k8s",
    "kube-controller-manager": "k8s",
    "kubectl": "k8s",
    "ray-operator": "kuberay",
    "kuberay-crds": "kuberay",
    "versitygw": "versitygw",
    "helm": "helm",
    "kubelet": "node",
    "kube-proxy": "node",
    "kube-scheduler": "node",
    "coredns": "coredns",
}
ENVTEST_ASSETS = ("etcd", "kube-apiserver", "kubectl")


class MissingBinary(RuntimeError):
    """A real part is not built; the message says the command that builds it."""


def versions() -> dict[str, str]:
    """The pins of scripts/versions.env as a dict."""
    out: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")


def default_bin_dir() -> Path:
    """Same dir as build-test-bins.sh: first 12 hex of sha256(versions.env)."""
    key = hashlib.sha256(VERSIONS_FILE.read_bytes()).hexdigest()[:12]
    return cache_dir() / "bin" / key


def bin_dir() -> Path:
    explicit = os.environ.get("KUBETUNE_TEST_BIN")
    return Path(explicit) if explicit else default_bin_dir()


def find(name: str) -> Path:
    """Path of binary (or dir, for ``kuberay-crds``) ``name``; raises MissingBinary."""
    candidates = []
    explicit = os.environ.get("KUBETUNE_TEST_BIN")
    if explicit:
        candidates.append(Path(explicit) / name)
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and name in ENVTEST_ASSETS:
        candidates.append(Path(assets) / name)
    candidates.append(default_bin_dir() / name)
    for path in candidates:
        if name == "kuberay-crds":
            if path.is_dir() and any(path.glob("*.yaml")):
                return path
        elif path.is_file() and os.access(path, os.X_OK):
            return path
    part = PARTS.get(name, "")
    looked = ", ".join(str(p) for p in candidates)
    raise MissingBinary(
        f"{name} is not built (looked in: {looked}). Build it with:\n"
        f"    {BUILD_COMMAND}\n"
        f"(from the repository root; only this part: {BUILD_COMMAND} {part}). "
        f"The script prints the bin dir last; export KUBETUNE_TEST_BIN=<that dir> "
        f"to use a dir elsewhere."
    )
