"""Serve a model (and optionally a LoRA adapter on it) with vLLM on the CPU and
print greedy completions as JSON. Runs in the venv of scripts/vllm-env.sh (with
VLLM_TARGET_DEVICE=cpu); imports nothing from kubetune.

    python vllm_probe.py MODEL_DIR OUT.json [--adapter ADAPTER_DIR --max-lora-rank 8]
"""

from __future__ import annotations

import argparse
import json

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--adapter")
    ap.add_argument("--max-lora-rank", type=int, default=8)
    args = ap.parse_args()

    import vllm
    from vllm import LLM, SamplingParams

    lora = {"enable_lora": True, "max_lora_rank": args.max_lora_rank} if args.adapter else {}
    llm = LLM(
        model=args.model, dtype="bfloat16", max_model_len=256, seed=0, enforce_eager=True, **lora
    )
    params = SamplingParams(max_tokens=8, temperature=0.0)
    report = {"vllm": vllm.__version__}
    report["model"] = llm.chat(PROMPT, params)[0].outputs[0].text
    if args.adapter:
        from vllm.lora.request import LoRARequest

        request = LoRARequest("adapter", 1, args.adapter)
        report["adapter"] = llm.chat(PROMPT, params, lora_request=request)[0].outputs[0].text
    with open(args.out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    main()
