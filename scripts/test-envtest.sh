#!/usr/bin/env bash
# Builds the real parts (cached: seconds when nothing changed) and runs the
# envtest tier against them. Extra arguments go to pytest.
#   bash scripts/test-envtest.sh            # whole tier
#   bash scripts/test-envtest.sh -k kuberay # some tests
# PYTHON picks the interpreter (default: python3 on PATH, e.g. the project venv's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bindir="$(bash scripts/build-test-bins.sh | tail -n 1)"
export KUBETUNE_TEST_BIN="$bindir"
exec "${PYTHON:-python3}" -m pytest tests/envtest "$@"
