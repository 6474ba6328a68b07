#!/usr/bin/env bash
# The whole test suite from a fresh clone: install, build the real servers, run every tier.
#
#   bash scripts/test.sh                   # every tier (what CI runs)
#   bash scripts/test.sh tests/unit        # one tier; any pytest arguments work
#   bash scripts/test.sh -m serving_engine # vLLM serving the outputs (an 8 GB venv of its
#                                          # own; not in the default run, see docs/testing.md)
#
# First run on a machine: ~2 min of installs, ~12 min of Go builds and the
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
# The cluster tier's images (root only): built beside the Go builds, whose
# compiling overlaps the image build's downloads, commits and exports. The
# tier's fixture runs the same script again, which then takes a second.
images_pid=""
if [ "$(id -u)" = 0 ] && { [ $# -eq 0 ] || [[ " $* " == *"tests/cluster"* ]]; }; then
  mkdir -p "$KUBETUNE_CACHE"
  echo "test: building the images in the background (log: $KUBETUNE_CACHE/build-images.log)"
  bash scripts/build-images.sh operator trainer pause >"$KUBETUNE_CACHE/build-images.log" 2>&1 &
  images_pid=$!
fi
KUBETUNE_TEST_BIN=$(bash scripts/build-test-bins.sh | tail -n 1)
export KUBETUNE_TEST_BIN
echo "test: real servers from $KUBETUNE_TEST_BIN"
# The slowest tests close the report: where the suite's minutes go, for every run.
if [ $# -eq 0 ] && [ "${KUBETUNE_LANES:-1}" != 0 ]; then
  # Every tier, as two pytest runs side by side (scripts/lanes.py says which
  # tiers share a lane and why); KUBETUNE_LANES=0 runs them one after another.
  # The lanes start while the images still build: only the cluster tier needs
  # them, and it runs last in its lane; its fixture runs build-images.sh again,
  # which waits for this build (one build at a time: a lock) and then takes a
  # second, or says why the build failed.
  [ -z "$images_pid" ] || echo "test: the lanes start now; the cluster tier waits for the images"
  exec .venv/bin/python scripts/lanes.py "$KUBETUNE_CACHE" -- -m "not serving_engine"
fi
if [ -n "$images_pid" ] && ! wait "$images_pid"; then
  echo "test: scripts/build-images.sh failed; the cluster tier will say why. Last lines:"
  tail -n 20 "$KUBETUNE_CACHE/build-images.log"
fi
[ $# -gt 0 ] || set -- -m "not serving_engine"
exec .venv/bin/python -m pytest --durations=30 "$@"
