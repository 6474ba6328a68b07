# A venv of its own for one tool, built once per machine and cached by a hash of
# what goes into it. Sourced by scripts/compat-env.sh, scripts/vllm-env.sh and
# scripts/build-mlflow.sh:
#
#   { cat inputs...; "$python" --version; } | cached_venv NAME BUILD_FUNCTION
#
# The hash is of standard input; the venv is ${KUBETUNE_CACHE:-~/.cache/kubetune}/
# NAME-<hash>. BUILD_FUNCTION gets an empty venv's folder and installs into it
# (its output goes to stderr); `.complete` marks a finished build, so a build that
# was killed half way is started again. Two test sessions building at once: the
# second waits on the lock, then finds it done. Prints the folder on stdout.

cached_venv() {
  local name=$1 build=$2
  local root=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
  local hash venv start
  hash=$(sha256sum | cut -c1-12)
  venv=$root/$name-$hash
  if [ -f "$venv/.complete" ]; then
    echo "$venv"
    return 0
  fi
  mkdir -p "$root"
  exec 9>"$venv.lock"
  flock 9
  if [ ! -f "$venv/.complete" ]; then
    start=$(date +%s)
    rm -rf "$venv"
    "${python:-python3}" -m uv venv --quiet --python "${python:-python3}" "$venv" >&2
    "$build" "$venv" >&2
    touch "$venv/.complete"
    echo "$name: built $venv in $(( $(date +%s) - start ))s" >&2
  fi
  exec 9>&-
  echo "$venv"
}
