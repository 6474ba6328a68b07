"""Container images for the one-node cluster, without a registry.

The node's pause image is built here: a static C program packed as a
one-layer image archive (the docker-archive layout that ``ctr images import``
reads, tag included). The project's own images come from
scripts/build-images.sh. Everything is imported into containerd; pods use
``imagePullPolicy: Never``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

from . import bins

PAUSE_REPO = "kubetune.local/pause"

# The sandbox's first process: holds the pod's namespaces, reaps orphans,
# exits on SIGTERM/SIGINT.
PAUSE_C = r"""
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = stop;
  sigaction(SIGINT, &sa, 0);
  sigaction(SIGTERM, &sa, 0);
  sa.sa_handler = reap;
  sa.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &sa, 0);
  for (;;) pause();
}
"""


def _tar_bytes(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A deterministic tar of {path: (content, mode)} (mtime 0, root-owned)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def single_binary_image(binary: bytes, name: str, ref: str, out: Path) -> Path:
    """Writes a docker-archive of a one-layer image whose entrypoint is /``name``."""
    layer = _tar_bytes({name: (binary, 0o755)})
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": [f"/{name}"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [ref], "Layers": ["layer.tar"]}]
    ).encode()
    files = {"layer.tar": layer, config_name: config, "manifest.json": manifest}
    archive = _tar_bytes({path: (data, 0o644) for path, data in files.items()})
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(archive)
    os.replace(tmp, out)
    return out


def pause_image() -> tuple[str, Path]:
    """(image ref, archive path) of the pause image; built once per source hash."""
    tag = hashlib.sha256(PAUSE_C.encode()).hexdigest()[:12]
    ref = f"{PAUSE_REPO}:{tag}"
    d = bins.cache_dir() / "images"
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"pause-{tag}.tar"
    if out.is_file():
        return ref, out
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "pause.c", Path(tmp) / "pause"
        src.write_text(PAUSE_C)
        subprocess.run(
            ["gcc", "-static", "-Os", "-s", "-o", str(exe), str(src)],
            check=True,
            capture_output=True,
        )
        single_binary_image(exe.read_bytes(), "pause", ref, out)
    for old in d.glob("pause-*.tar"):
        if old != out:
            old.unlink()
    return ref, out
