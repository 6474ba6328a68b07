"""Load a saved model (and optionally an adapter) with plain transformers/peft and
print what a serving engine would see, as JSON: config values, token ids, the chat
template's result, logits and a greedy completion.

Runs under the project's venv (transformers 5) and under the compat venv
(transformers 4.x, scripts/compat-env.sh); the tests compare the two reports. It
imports nothing from kubetune, which the compat venv does not have.

    python serving_probe.py MODEL_DIR OUT.json [--adapter ADAPTER_DIR]
"""

from __future__ import annotations

import argparse
import json

TEXTS = [
    "Hello, world! How are you today?",
    "  leading spaces, tabs\tand\nnewlines; ünïcödé 東京 🙂",
    "<|im_start|>user\nhi<|im_end|>",
]
MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "hidden_act",
)


def rope(config) -> dict:
    """The rotary settings as either line holds them: 5 in rope_parameters, 4.x in
    rope_theta + rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return {"rope_theta": params.get("rope_theta"), "rope_type": params.get("rope_type")}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return {"rope_theta": getattr(config, "rope_theta", None), "rope_type": kind}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--adapter")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok_dir = args.adapter or args.model
    config = AutoConfig.from_pretrained(args.model)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    report: dict = {
        "transformers": transformers.__version__,
        "config": {k: getattr(config, k, None) for k in CONFIG_KEYS},
        "rope": rope(config),
        "saved_dtype": str(getattr(config, "dtype", None) or config.torch_dtype),
        "tokenizer_class": type(tok).__name__,
        "special_tokens": {
            name: [getattr(tok, name), getattr(tok, name + "_id")]
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        },
        "ids": [tok(t, add_special_tokens=True)["input_ids"] for t in TEXTS],
        "decoded": [tok.decode(tok(t)["input_ids"], skip_special_tokens=False) for t in TEXTS],
        "vocab_size": len(tok),
    }
    chat = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    report["chat_text"] = chat
    report["chat_ids"] = tok(chat, add_special_tokens=False)["input_ids"]

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter:
        import peft
        from peft import PeftModel

        report["peft"] = peft.__version__
        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    ids = torch.tensor([report["chat_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    report["last_logits"] = logits.tolist()
    report["greedy"] = out[0, ids.shape[1] :].tolist()
    report["completion"] = tok.decode(report["greedy"], skip_special_tokens=True)
    with open(args.out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
