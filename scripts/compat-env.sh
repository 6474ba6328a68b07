#!/usr/bin/env bash
# A separate venv with the transformers 4.x line (scripts/compat-requirements.txt)
# and the project's torch pin, for loading kubetune's outputs the way a serving
# stack on 4.x does. Never the project's venv: the two transformers lines cannot
# share one.
#
#   bash scripts/compat-env.sh      # prints the venv's folder on its last line
#
# Cached under ${KUBETUNE_CACHE:-~/.cache/kubetune}/compat-<hash of the inputs>:
# a second call is instant, a changed pin builds a new one. torch comes from
# uv's cache (the same wheel as the project's), so a build takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
req=scripts/compat-requirements.txt
torch_pin=$(grep '^torch==' constraints.txt)
hash=$( (cat scripts/compat-env.sh "$req"; echo "$torch_pin"; "$python" --version 2>&1) \
  | sha256sum | cut -c1-12)
root=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
venv=$root/compat-$hash
if [ -f "$venv/.complete" ]; then
  echo "$venv"
  exit 0
fi
mkdir -p "$root"
exec 9>"$venv.lock"
flock 9  # two test sessions building at once: the second waits, then finds it done
if [ ! -f "$venv/.complete" ]; then
  start=$(date +%s)
  rm -rf "$venv"
  "$python" -m uv venv --quiet --python "$python" "$venv" >&2
  pins=$(mktemp)
  echo "$torch_pin" >"$pins"
  "$python" -m uv pip install --quiet --python "$venv/bin/python" "$torch_pin" >&2
  "$python" -m uv pip install --quiet --python "$venv/bin/python" -c "$pins" -r "$req" >&2
  rm -f "$pins"
  "$venv/bin/python" -c "import torch, transformers; print('compat-env: torch', \
torch.__version__, 'transformers', transformers.__version__)" >&2
  touch "$venv/.complete"
  echo "compat-env: built $venv in $(( $(date +%s) - start ))s" >&2
fi
echo "$venv"
