"""Read the trainer config (rendered from a FineTuneJob) from a file or a URI."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import yaml

from kubetune_api import TrainerConfig, load_trainer_config
from kubetune_api.storage import storage_options


def read_config(location: str, environ=None) -> TrainerConfig:
    """A local path, file:// or any fsspec URI (credentials: the OUTPUT role's env)."""
    import fsspec

    environ = os.environ if environ is None else environ
    opts = storage_options(location, None, "OUTPUT", environ)
    endpoint = environ.get("KUBETUNE_CONFIG_ENDPOINT")
    if endpoint and location.startswith("s3://"):
        opts.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
    with fsspec.open(location, "r", **opts) as f:
        text = f.read()
    data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    return load_trainer_config(data)


class StaleConfig(RuntimeError):
    """The config file is for another attempt than the pod's KUBETUNE_ATTEMPT."""

    def __init__(self, message: str, older_pod: bool):
        super().__init__(message)
        self.older_pod = older_pod  # the pod belongs to an attempt the config has left behind


def read_config_for_attempt(
    location: str,
    environ=None,
    wait_s: float = 120.0,
    sleep: Callable[[float], None] = time.sleep,
) -> TrainerConfig:
    """read_config, cross-checked with the pod's KUBETUNE_ATTEMPT (set by the operator
    beside the mounted ConfigMap). A retry updates the ConfigMap before it creates the
    new RayJob, but a mounted ConfigMap reaches a pod through the kubelet's cache: a
    pod of attempt N may still read attempt N-1's config for a while. Such a pod reads
    again until the config says N (at most `wait_s`); a pod of an attempt older than
    the config's raises at once. Without KUBETUNE_ATTEMPT (a local run) no check."""
    environ = os.environ if environ is None else environ
    want = environ.get("KUBETUNE_ATTEMPT", "").strip()
    config = read_config(location, environ)
    if not want.isdigit():
        return config
    pod = int(want)
    deadline = time.monotonic() + wait_s
    while config.attempt < pod and time.monotonic() < deadline:
        sleep(2.0)
        config = read_config(location, environ)
    if config.attempt == pod:
        return config
    if config.attempt > pod:
        raise StaleConfig(
            f"{location} is attempt {config.attempt}'s config and this pod is attempt "
            f"{pod}'s: a newer attempt owns the job; this one stops without writing",
            older_pod=True,
        )
    raise StaleConfig(
        f"{location} still holds attempt {config.attempt}'s config after {wait_s:.0f} s, and "
        f"this pod is attempt {pod}'s: the ConfigMap was not updated (check the operator's "
        "events on the FineTuneJob)",
        older_pod=False,
    )
