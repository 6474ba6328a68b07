#!/usr/bin/env bash
# llama.cpp, prebuilt, for reading back kubetune's GGUF outputs the way llama.cpp
# and Ollama do: the npm package node-llama-cpp with its prebuilt Linux x64 CPU
# binary (@node-llama-cpp/linux-x64), no compiler and no download outside the
# registry. PyPI's llama-cpp-python ships only its source (a CMake build of
# llama.cpp), so the Python route would compile; this one installs in seconds.
#
#   bash scripts/llama-runtime.sh   # prints the runtime's folder on its last line
#
# Cached like the other tool environments (scripts/lib/cached-venv.sh); needs
# node and npm (Node 18 or later). tests/trainer/llama_probe.mjs drives it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cached-venv.sh
python=${PYTHON:-python3}
version=3.22.1

build() {
  local dir=$1
  command -v npm >/dev/null || { echo "llama-runtime: npm is not installed" >&2; exit 1; }
  # only the CPU binary: the optional GPU variants are hundreds of MB; the
  # postinstall step would look for a build to download or compile, not needed here
  npm install --prefix "$dir" --no-audit --no-fund --omit=optional --ignore-scripts \
    "node-llama-cpp@$version" "@node-llama-cpp/linux-x64@$version" >&2
}

{ cat scripts/llama-runtime.sh scripts/lib/cached-venv.sh; echo "$version"; node --version; } \
  | cached_venv llama-runtime build
