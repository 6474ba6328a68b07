#!/usr/bin/env bash
# Checks images built by scripts/build-images.sh the way KubeRay and the
# cluster use them, without a cluster:
#
#   bash scripts/images/check-images.sh trainer=REF operator=REF pause=REF
#   bash scripts/images/check-images.sh any=REF     # only the no-leak checks
#
# - trainer: as uid 10001 in `bash -lc` (how KubeRay starts Ray containers):
#   the venv's tools on PATH, the imports, the writable paths, wget, g++ and
#   ninja; a C++ extension built as DeepSpeed builds its ops; `ray start
#   --head`, KubeRay's wget probes and `ray health-check` (the wait-gcs-ready
#   init container), on a private loopback-only network.
# - operator: the CLI and the operator package as uid 10001.
# - pause: a static /pause entrypoint.
# - every image: no copy of the host's extra CA certificates (those the image's
#   own Debian bundle lacks) and no proxy or CA settings in its config.
# Exits non-zero at the first failed check.
set -euo pipefail
ca_bundle=${KUBETUNE_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}

log() { echo "check-images: $*" >&2; }
fail() {
  log "FAIL: $*"
  exit 1
}

containers=()
cleanup() {
  local c
  for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

# A field of the image's OCI config as JSON (buildah 1.28's --format has no `json`).
config_field() {
  buildah inspect --type image "$1" \
    | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"].get(sys.argv[1])))' "$2"
}

as_user() { buildah run --network none --user 10001:10001 "$1" -- /bin/bash -lc "$2"; }

# Certificates (one base64 line each) that the host bundle has and ROOTFS's
# Debian bundle has not: a build-time CA that must not have leaked.
host_only_certs() {
  local rootfs=$1
  python3 - "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt" <<'EOF'
import re
import sys

def certs(path):
    try:
        text = open(path).read()
    except FileNotFoundError:
        return set()
    return {"".join(b.split()) for b in re.findall(r"-----BEGIN CERTIFICATE-----(.*?)-----END", text, re.S)}

for body in sorted(certs(sys.argv[1]) - certs(sys.argv[2])):
    print(body[64:128])  # a line from the middle: unique, and no PEM line wrap inside
EOF
}

check_no_build_secrets() {
  local ref=$1 ctr rootfs needles
  # Config and history: no proxy, no CA setting (the secret mount's path in a
  # RUN line is fine, it names no content).
  local env
  env=$(config_field "$ref" Env)
  if grep -Eiq 'proxy|SSL_CERT|PIP_CERT|REQUESTS_CA|CURL_CA' <<<"$env"; then
    fail "$ref: proxy or CA settings in the image's environment"
  fi
  ctr=$(buildah from --pull-never "$ref")
  containers+=("$ctr")
  rootfs=$(buildah mount "$ctr")
  needles=$(host_only_certs "$rootfs")
  if [ -n "$needles" ]; then
    if grep -rIlF -f <(echo "$needles") "$rootfs" 2>/dev/null | head -n 3 | grep .; then
      fail "$ref: holds a certificate from the host's CA bundle"
    fi
  fi
  if grep -rlsEi '^[^#]*(https?_proxy|Acquire::https?::Proxy)' \
    "$rootfs/etc/environment" "$rootfs/etc/apt/apt.conf.d" "$rootfs/etc/pip.conf" \
    "$rootfs/etc/profile.d" 2>/dev/null | grep .; then
    fail "$ref: proxy settings in the image"
  fi
  buildah umount "$ctr" >/dev/null
  log "$ref: no build CA ($(echo -n "$needles" | grep -c . || true) host-only certificates looked for), no proxy settings"
}

check_trainer() {
  local ref=$1 ctr
  ctr=$(buildah from --pull-never "$ref")
  containers+=("$ctr")
  as_user "$ctr" '
    set -e
    command -v ray python kubetune ninja g++ wget
    test "$(id -u)" = 10001
    python -c "import kubetune_trainer, ray, torch, deepspeed; print(\"imports ok: ray\", ray.__version__, \"torch\", torch.__version__, \"deepspeed\", deepspeed.__version__)"
    for d in "$HOME" /tmp /tmp/ray "$TORCH_EXTENSIONS_DIR" "$HF_HOME"; do
      touch "$d/.write-check" && rm "$d/.write-check" || { echo "not writable: $d"; exit 1; }
    done
    echo "writable: $HOME /tmp /tmp/ray $TORCH_EXTENSIONS_DIR $HF_HOME"
    ninja --version
    g++ --version | head -n 1
  ' || fail "$ref: trainer checks as uid 10001 under bash -l"
  # What DeepSpeed's op builder does at first use: a C++ extension compiled by
  # g++ through ninja against torch's and Python's headers, into
  # TORCH_EXTENSIONS_DIR, as the non-root user.
  as_user "$ctr" '
    python -c "
from torch.utils.cpp_extension import load_inline
ext = load_inline(\"kubetune_check\", \"int twice(int x) { return 2 * x; }\", functions=[\"twice\"])
assert ext.twice(21) == 42
print(\"C++ extension built and loaded\")
"' || fail "$ref: building a torch C++ extension (DeepSpeed's op builds)"
  # The head, its probes and the wait-gcs-ready check as KubeRay runs them
  # (ulimit fails where the hard limit is lower, as on this machine: harmless,
  # as in a pod). The probes call Ray's dashboard and its agent with wget.
  as_user "$ctr" '
    ulimit -n 65536 2>/dev/null || true
    ray start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=1 \
      --disable-usage-stats >/tmp/ray-start.log 2>&1 \
      || { cat /tmp/ray-start.log; exit 1; }
    probes() {
      wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep -q success \
        && wget -T 2 -q -O- http://localhost:8265/api/gcs_healthz | grep -q success
    }
    for _ in $(seq 60); do probes && break; sleep 1; done
    probes && echo "KubeRay probes (dashboard agent, GCS via dashboard): ok" \
      && ray health-check --address 127.0.0.1:6379 && echo "ray health-check: ok"
    rc=$?
    [ $rc = 0 ] || tail -n 20 /tmp/ray/session_latest/logs/dashboard*.err
    ray stop --force >/dev/null 2>&1
    exit $rc
  ' || fail "$ref: ray start, KubeRay probes, ray health-check under bash -l"
  log "$ref: trainer checks passed"
}

check_operator() {
  local ref=$1 ctr
  ctr=$(buildah from --pull-never "$ref")
  containers+=("$ctr")
  as_user "$ctr" '
    set -e
    command -v kubetune python
    test "$(id -u)" = 10001
    python -c "import kubetune_operator, kopf, kubernetes; print(\"imports ok\")"
    python -c "import importlib.util as u; assert not u.find_spec(\"torch\")"
    kubetune --help >/dev/null
  ' || fail "$ref: operator checks as uid 10001 under bash -l"
  [ "$(config_field "$ref" Entrypoint)" = '["kubetune", "operator"]' ] || fail "$ref: entrypoint"
  log "$ref: operator checks passed"
}

check_pause() {
  local ref=$1 ctr rootfs
  [ "$(config_field "$ref" Entrypoint)" = '["/pause"]' ] || fail "$ref: entrypoint"
  ctr=$(buildah from --pull-never "$ref")
  containers+=("$ctr")
  rootfs=$(buildah mount "$ctr")
  file "$rootfs/pause" | grep -q 'statically linked' || fail "$ref: /pause is not static"
  [ "$(find "$rootfs" -mindepth 1 -maxdepth 1 | wc -l)" -le 4 ] || fail "$ref: more than /pause"
  buildah umount "$ctr" >/dev/null
  log "$ref: pause checks passed"
}

[ $# -gt 0 ] || fail "usage: $0 trainer=REF operator=REF pause=REF"
for arg in "$@"; do
  kind=${arg%%=*} ref=${arg#*=}
  case $kind in
    trainer) check_trainer "$ref" ;;
    operator) check_operator "$ref" ;;
    pause) check_pause "$ref" ;;
    any) ;;
    *) fail "unknown kind '$kind' (trainer, operator, pause, any)" ;;
  esac
  check_no_build_secrets "$ref"
done
log "all checks passed"
