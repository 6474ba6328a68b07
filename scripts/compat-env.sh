#!/usr/bin/env bash
# A separate venv with the transformers 4.x line (scripts/compat-requirements.txt)
# and the project's torch pin, for loading kubetune's outputs the way a serving
# stack on 4.x does. Never the project's venv: the two transformers lines cannot
# share one.
#
#   bash scripts/compat-env.sh      # prints the venv's folder on its last line
#
# Cached under ${KUBETUNE_CACHE:-~/.cache/kubetune}/compat-<hash of the inputs>
# (scripts/lib/cached-venv.sh): a second call is instant, a changed pin builds a
# new one. torch comes from uv's cache (the same wheel as the project's), so a
# build takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cached-venv.sh
python=${PYTHON:-python3}
req=scripts/compat-requirements.txt
torch_pin=$(grep '^torch==' constraints.txt)

build() {
  local venv=$1 pins
  pins=$(mktemp)
  echo "$torch_pin" >"$pins"
  "$python" -m uv pip install --quiet --python "$venv/bin/python" "$torch_pin"
  "$python" -m uv pip install --quiet --python "$venv/bin/python" -c "$pins" -r "$req"
  rm -f "$pins"
  "$venv/bin/python" -c "import torch, transformers; print('compat-env: torch', \
torch.__version__, 'transformers', transformers.__version__)"
}

{ cat scripts/compat-env.sh scripts/lib/cached-venv.sh "$req"; echo "$torch_pin"
  "$python" --version 2>&1; } | cached_venv compat build
