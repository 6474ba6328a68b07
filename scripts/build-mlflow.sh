#!/usr/bin/env bash
# A real MLflow tracking server for the tests, in its OWN venv: the full mlflow
# package pins its own versions of many libraries the project also uses, so it
# never goes into the project's venv. Cached by version under KUBETUNE_CACHE;
# prints the venv's folder on the last line.
#
#   bash scripts/build-mlflow.sh        # then: DIR/bin/mlflow server ...
set -euo pipefail
MLFLOW_VERSION=3.17.2  # 3.18.0 names an mlflow-skinny the registry does not serve
python=${PYTHON:-python3}
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
key=$( (echo "mlflow==$MLFLOW_VERSION"; "$python" --version) | sha256sum | cut -c1-12)
venv=$cache/mlflow-$key
if [ -f "$venv/.complete" ]; then
  echo "$venv"
  exit 0
fi
start=$(date +%s)
"$python" -m uv venv --quiet --allow-existing --python "$python" "$venv" >&2
"$python" -m uv pip install --quiet --python "$venv/bin/python" "mlflow==$MLFLOW_VERSION" >&2
"$venv/bin/mlflow" --version >&2
touch "$venv/.complete"
echo "build-mlflow: $venv ready in $(( $(date +%s) - start ))s" >&2
echo "$venv"
