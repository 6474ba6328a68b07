"""vLLM serves the trainer's outputs: the merged model, and the adapter on its base
(`--enable-lora`), each completing a chat. vLLM's CPU build runs in its own venv
(scripts/vllm-env.sh); one engine at a time, eager mode (no torch.compile: minutes of
C++ builds on a CPU machine).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import trainer_helpers as H
from test_serving_outputs import PROBE, _make_adapter, _spec

pytestmark = [
    pytest.mark.trainer,
    pytest.mark.slow,
    pytest.mark.serving_engine,
    pytest.mark.timeout(1800),
]


def test_vllm_serves_the_merged_model_and_the_adapter(tmp_path):
    from kubetune_trainer import export

    H.prepare_quickstart()
    adapter = _make_adapter(H.SMOL, tmp_path / "adapter")
    merged = tmp_path / "merged"
    export.merge_adapter(str(H.SMOL), _spec(H.SMOL), adapter, merged)
    built = subprocess.run(
        ["bash", str(H.REPO / "scripts/vllm-env.sh")], capture_output=True, text=True, timeout=1200
    )
    assert built.returncode == 0, built.stderr[-3000:]
    python = str(Path(built.stdout.strip().splitlines()[-1], "bin/python"))
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    probe = str(PROBE.with_name("vllm_probe.py"))
    runs = {
        "merged": [python, probe, str(merged), str(tmp_path / "merged.json")],
        # the adapter on the base it was trained on, as `vllm serve --enable-lora` runs it
        "adapter": [python, probe, str(H.SMOL), str(tmp_path / "adapter.json")]
        + ["--adapter", str(adapter), "--max-lora-rank", "8"],
    }
    reports = {}
    for name, cmd in runs.items():  # one engine at a time: each takes the machine's cores
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path
        )
        assert done.returncode == 0, f"{name}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["merged"]["model"].strip()
    assert reports["adapter"]["adapter"].strip()
    # the adapter changes what the base model says (B is not zero)
    assert reports["adapter"]["adapter"] != reports["adapter"]["model"]
