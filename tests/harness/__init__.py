"""kubetune's real-parts test harness.

Process managers for etcd, kube-apiserver, kube-controller-manager, the KubeRay
operator and an S3 server (versitygw), all built by scripts/build-test-bins.sh,
bound to free ports on 127.0.0.1. tests/conftest.py turns them into fixtures;
``python -m tests.harness up`` starts them by hand for debugging.
"""

from .bins import BUILD_COMMAND, MissingBinary, bin_dir, find, versions
from .controlplane import ControlPlane
from .helm import Helm
from .kuberay import KubeRayOperator, kuberay_crd_files
from .procs import Server, ServerError, free_port, wait_until
from .s3 import S3Server
from .session import Session, kubetune_crd_files

__all__ = [
    "BUILD_COMMAND", "ControlPlane", "Helm", "KubeRayOperator", "MissingBinary", "S3Server", "Server",
    "ServerError", "Session", "bin_dir", "find", "free_port", "kubetune_crd_files", "kuberay_crd_files",
    "versions", "wait_until",
]
