#!/usr/bin/env bash
# The whole test suite from a fresh clone: install, build the real servers, run every tier.
#
#   bash scripts/test.sh                   # everything (what CI runs)
#   bash scripts/test.sh tests/unit        # one tier; any pytest arguments work
#
# First run on a machine: ~2 min of installs, ~20 min of Go builds and the
# cluster tier's images (cached afterwards under ~/.cache/kubetune and Go's
# caches; see docs/testing.md). The cluster tier (tests/cluster) needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Host packages of the cluster tier's node (root: installed; otherwise the
# command to run is printed, and the cluster tier fails saying the same).
bash scripts/install-node-packages.sh || echo "test: tests/cluster needs root and the packages above"
export KUBETUNE_CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$KUBETUNE_CACHE/torch_extensions}
KUBETUNE_TEST_BIN=$(bash scripts/build-test-bins.sh | tail -n 1)
export KUBETUNE_TEST_BIN
echo "test: real servers from $KUBETUNE_TEST_BIN"
exec .venv/bin/python -m pytest "$@"
