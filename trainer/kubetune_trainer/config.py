"""Read the trainer config (rendered from a FineTuneJob) from a file or a URI."""

from __future__ import annotations

import json
import os

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
