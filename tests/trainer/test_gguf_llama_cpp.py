"""output.gguf's files in llama.cpp itself (scripts/llama-runtime.sh: node-llama-cpp's
prebuilt CPU build, as llama.cpp's tools and Ollama read GGUF): it loads each type,
tokenizes like the model's own tokenizer, and generates greedily what transformers
generates from the same weights."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import trainer_helpers as H

from model_fixtures import CORPUS, tiny_folder

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

TEXTS = [*CORPUS[:3], "  leading spaces, digits 1234567 and <|im_end|> as text"]
PROMPT = "Hello, world! How"
STEPS = 8
MARGIN = 0.01  # the tiny model's best logits are about 0.4 to 0.5: within 2% of them


@pytest.fixture(scope="module")
def runtime() -> str:
    script = H.REPO / "scripts/llama-runtime.sh"
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def _probe(runtime: str, path: Path, prompt: list[int]) -> dict:
    env = {
        **os.environ,
        "LLAMA_RUNTIME": runtime,
        "TEXTS": json.dumps(TEXTS),
        "PROMPT_IDS": json.dumps(prompt),
    }
    script = Path(__file__).with_name("llama_probe.mjs")
    out = subprocess.run(
        ["node", str(script), str(path), str(STEPS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_1", "q4_0"])
def test_llama_cpp_loads_tokenizes_and_generates_like_transformers(runtime, tmp_path, qtype):
    import torch

    from kubetune_trainer import gguf_export as G

    folder = tiny_folder(tmp_path / "model", tied=False)
    path = Path(G.write(folder, tmp_path / f"model-{qtype}.gguf", qtype).path)
    loaded, tok = G.load(path)  # transformers, from the same file
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = loaded.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=STEPS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    greedy = out.sequences[0, len(prompt) :].tolist()

    seen = _probe(runtime, path, prompt)
    assert seen["architecture"] == "llama"
    assert seen["tokens"] == [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert len(seen["generated"]) == STEPS
    # The same tokens, up to a near tie: llama.cpp multiplies quantized weights by
    # activations it quantizes to 8 bits, transformers by float32 ones, so where the
    # two best logits are within MARGIN of each other either may win (the random tiny
    # model's logits are close together); after such a step the contexts differ.
    for step, (a, b) in enumerate(zip(seen["generated"], greedy, strict=True)):
        if a != b:
            best = out.scores[step][0].topk(2).values
            assert (best[0] - best[1]).item() < MARGIN, (step, seen["generated"], greedy)
            break
