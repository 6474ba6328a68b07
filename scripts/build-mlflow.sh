#!/usr/bin/env bash
# A real MLflow tracking server for the tests, in its OWN venv: the full mlflow
# package pins its own versions of many libraries the project also uses, so it
# never goes into the project's venv. Cached by version under KUBETUNE_CACHE
# (scripts/lib/cached-venv.sh); prints the venv's folder on the last line.
#
#   bash scripts/build-mlflow.sh        # then: DIR/bin/mlflow server ...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cached-venv.sh
MLFLOW_VERSION=3.17.2  # 3.18.0 names an mlflow-skinny the registry does not serve
python=${PYTHON:-python3}

build() {
  local venv=$1
  "$python" -m uv pip install --quiet --python "$venv/bin/python" "mlflow==$MLFLOW_VERSION"
  "$venv/bin/mlflow" --version
}

{ echo "mlflow==$MLFLOW_VERSION"; "$python" --version; } | cached_venv mlflow build
