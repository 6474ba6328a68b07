"""kubetune's images for the one-node cluster, from scripts/build-images.sh.

There is no registry: the script builds the Dockerfile's targets (and the
node's pause image) into archives that containerd imports; pods use them
with ``imagePullPolicy: Never`` (or IfNotPresent: they are already there).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from . import bins

BUILD_IMAGES = "bash scripts/build-images.sh"


def project_images(names: tuple[str, ...] = ("operator", "trainer")) -> dict[str, tuple[str, Path]]:
    """{target: (image ref, archive)} from scripts/build-images.sh (cached by
    the hash of what goes into each image, so a second call takes seconds).
    `kuberay` packs the ray-operator binary the harness already built."""
    env = dict(os.environ)
    if "kuberay" in names:
        env["KUBETUNE_KUBERAY_BIN"] = str(bins.find("ray-operator"))
    proc = subprocess.run(
        ["bash", str(bins.REPO_ROOT / "scripts" / "build-images.sh"), *names],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{BUILD_IMAGES} {' '.join(names)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
        )
    out: dict[str, tuple[str, Path]] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        # NAME TAG ARCHIVE, NAME ending in -<target> (localhost/kubetune-trainer)
        if len(parts) == 3 and (target := parts[0].rsplit("-", 1)[-1]) in names:
            out[target] = (f"{parts[0]}:{parts[1]}", Path(parts[2]))
    missing = set(names) - set(out)
    if missing:
        raise RuntimeError(f"{BUILD_IMAGES} printed no image line for {sorted(missing)}")
    return out
