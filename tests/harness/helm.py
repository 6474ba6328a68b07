"""helm, pointed at the test control plane, with its own config/cache dirs."""

from __future__ import annotations

from pathlib import Path

from . import bins
from .procs import run


class Helm:
    def __init__(self, kubeconfig: Path, home: Path) -> None:
        self.bin = bins.find("helm")
        self.kubeconfig = Path(kubeconfig)
        home = Path(home)
        self.env = {
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def __call__(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300):
        """Runs ``helm ARGS...``; returns CompletedProcess (text); raises on failure when check."""
        return run([self.bin, *args], env=self.env, check=check, input=input, timeout=timeout)
