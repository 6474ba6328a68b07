#!/usr/bin/env bash
# The whole test suite from a fresh clone: install, build the real servers, run every tier.
#
#   bash scripts/test.sh                   # everything (what CI runs)
#   bash scripts/test.sh tests/unit        # one tier; any pytest arguments work
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export KUBETUNE_CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$KUBETUNE_CACHE/torch_extensions}
exec .venv/bin/python -m pytest "$@"
