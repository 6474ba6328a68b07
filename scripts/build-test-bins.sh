#!/usr/bin/env bash
# Builds the real parts the envtest and cluster tiers start, from the Go module proxy:
#   etcd, kube-apiserver, kube-controller-manager, kubectl, the KubeRay
#   operator (+ its CRD YAMLs), versitygw (S3 server), helm, and for the
#   one-node cluster: kubelet, kube-proxy, kube-scheduler and CoreDNS.
#
# Usage: bash scripts/build-test-bins.sh [PART...]
#   PART: etcd k8s kuberay versitygw helm node coredns (default: all of them)
#
# Output: ${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/bin/<key>/, where <key> is a
# hash of scripts/versions.env (change a pin -> new dir -> rebuild). The bin
# dir is the LAST line of stdout; progress goes to stderr. A part whose stamp
# file exists is not rebuilt, so a second run takes seconds. GOMODCACHE and
# GOCACHE stay at Go's defaults and are shared between runs.
#
# KUBEBUILDER_ASSETS: when it holds etcd / kube-apiserver / kubectl (as
# controller-runtime's setup-envtest lays them out), those are linked into
# the bin dir instead of being built; kube-controller-manager is still built.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
versions_file="$here/versions.env"
set -a
# shellcheck source=versions.env
. "$versions_file"
set +a

cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
key="$(sha256sum "$versions_file" | cut -c1-12)"
bindir="$cache/bin/$key"
srcdir="$cache/src/$key"
mkdir -p "$bindir" "$srcdir"

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -mod=mod -buildvcs=false"
# Go's own defaults for GOMODCACHE/GOCACHE: shared across runs and parts.

log() { printf '[build-test-bins] %s\n' "$*" >&2; }

if ! command -v go >/dev/null 2>&1; then
  log "ERROR: go is not on PATH (Go >= 1.26 is needed: KubeRay ${KUBERAY_VERSION} and helm ${HELM_VERSION} require it)"
  exit 1
fi

# outputs_ok PART: every file PART makes is there (a KUBEBUILDER_ASSETS link
# may dangle once that folder is gone).
outputs_ok() {
  local f files
  case "$1" in
    etcd) files=(etcd) ;;
    k8s) files=(kube-apiserver kube-controller-manager kubectl) ;;
    kuberay) files=(ray-operator kuberay-crds/ray.io_rayjobs.yaml) ;;
    node) files=(kubelet kube-proxy kube-scheduler) ;;
    *) files=("$1") ;;
  esac
  for f in "${files[@]}"; do [[ -e "$bindir/$f" ]] || return 1; done
}

# run_part NAME FUNCTION: runs FUNCTION once per cache key; records its time.
run_part() {
  local name="$1" fn="$2"
  if [[ -f "$bindir/.ok-$name" ]] && outputs_ok "$name"; then
    log "$name: cached"
    return 0
  fi
  log "$name: building (log: $bindir/build-$name.log)"
  local t0 t1
  t0=$(date +%s)
  # In the background and then `wait`: inside an `if` condition bash would
  # ignore `set -e` in the function, and a failed step would pass unnoticed.
  ( "$fn" ) >"$bindir/build-$name.log" 2>&1 &
  if ! wait "$!"; then
    log "$name: FAILED; last lines of $bindir/build-$name.log:"
    tail -n 40 "$bindir/build-$name.log" >&2
    exit 1
  fi
  t1=$(date +%s)
  echo "$name $((t1 - t0))s $(date -u +%FT%TZ)" >>"$bindir/build-times.txt"
  touch "$bindir/.ok-$name"
  log "$name: done in $((t1 - t0))s"
}

# write_wrapper DIR MODULE VERSION STAGING_VERSION
# A module that requires MODULE@VERSION and turns each of MODULE's relative
# `replace X => ./path` lines (ignored when MODULE is a dependency, which is
# why `go install MODULE/cmd@v` refuses it) into `replace X => X STAGING_VERSION`.
write_wrapper() {
  local dir="$1" module="$2" version="$3" staging="$4" gomod
  mkdir -p "$dir"
  gomod="$(go mod download -json "$module@$version" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -f "$gomod" ]] || { echo "cannot find go.mod of $module@$version" >&2; return 1; }
  {
    echo "module kubetune.local/testbins/$(basename "$dir")"
    echo
    echo "go $(sed -n 's/^go \([0-9.]*\).*/\1/p' "$gomod")"
    echo
    echo "require $module $version"
    echo
    echo "replace ("
    { grep -E '^[[:space:]]*[^[:space:]]+ => \.\.?/' "$gomod" || true; } |
      awk -v v="$staging" '{ print "\t" $1 " => " $1 " " v }'
    echo ")"
  } >"$dir/go.mod"
  rm -f "$dir/go.sum"
}

# build_k8s_cmds NAME...: k8s.io/kubernetes/cmd/NAME for each NAME, in one
# `go build` (one package graph, one shared build cache) from a wrapper module.
build_k8s_cmds() {
  local dir="$srcdir/k8s" minor patch staging ver ldflags b
  ver="$K8S_VERSION"
  minor="$(echo "$ver" | cut -d. -f2)"
  patch="$(echo "$ver" | cut -d. -f3)"
  staging="v0.${minor}.${patch}"
  write_wrapper "$dir" k8s.io/kubernetes "$ver" "$staging"
  local pkgs=("${@/#/k8s.io/kubernetes/cmd/}")
  ldflags="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$ver -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  (
    cd "$dir"
    go get "${pkgs[@]/%/@$ver}"
    rm -rf out && mkdir out
    go build -trimpath -ldflags "$ldflags" -o out/ "${pkgs[@]}"
  )
  for b in "$@"; do
    # Keep a KUBEBUILDER_ASSETS link: never write through it.
    [[ -L "$bindir/$b" ]] || mv -f "$dir/out/$b" "$bindir/$b"
  done
}

build_k8s() {
  build_k8s_cmds kube-apiserver kube-controller-manager kubectl
  "$bindir/kube-apiserver" --version
  "$bindir/kubectl" version --client
}

# The one-node cluster's own binaries, from the same module build (and Go cache).
build_node() {
  build_k8s_cmds kubelet kube-proxy kube-scheduler
  "$bindir/kubelet" --version
}

build_etcd() {
  local dir="$srcdir/etcd"
  write_wrapper "$dir" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION"
  (
    cd "$dir"
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    go build -trimpath -ldflags "-s -w" -o "$bindir/etcd" go.etcd.io/etcd/server/v3
  )
  "$bindir/etcd" --version
}

build_kuberay() {
  local mod=github.com/ray-project/kuberay/ray-operator moddir dir="$srcdir/kuberay"
  # Not `go install mod@v`: that also reads the module's version list (for
  # deprecations), which the proxy refuses for this module (403).
  write_wrapper "$dir" "$mod" "$KUBERAY_VERSION" "$KUBERAY_VERSION"
  (
    cd "$dir"
    go get "$mod@$KUBERAY_VERSION"
    go build -trimpath -ldflags "-s -w" -o "$bindir/ray-operator" "$mod"
  )
  # The CRDs ship inside the module zip (config/crd/bases).
  moddir="$(go mod download -json "$mod@$KUBERAY_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  rm -rf "$bindir/kuberay-crds"
  mkdir -p "$bindir/kuberay-crds"
  cp "$moddir"/config/crd/bases/*.yaml "$bindir/kuberay-crds/"
  chmod u+w "$bindir"/kuberay-crds/*.yaml
  ls "$bindir/kuberay-crds"
  "$bindir/ray-operator" --help 2>&1 | head -n 3 || true
}

build_versitygw() {
  GOBIN="$bindir" go install -trimpath -ldflags "-s -w -X main.Version=$VERSITYGW_VERSION" \
    "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
  "$bindir/versitygw" --version || true
}

build_helm() {
  local major="${HELM_VERSION%%.*}"
  GOBIN="$bindir" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/$major/internal/version.version=$HELM_VERSION -X helm.sh/helm/$major/internal/version.gitTreeState=clean" \
    "helm.sh/helm/$major/cmd/helm@$HELM_VERSION"
  "$bindir/helm" version
}

# CoreDNS with only the plugins the node's Corefile uses: the full plugin set
# pulls in every cloud provider's SDK and takes several times longer to build.
build_coredns() {
  local dir="$srcdir/coredns" mod=github.com/coredns/coredns
  mkdir -p "$dir"
  cat >"$dir/go.mod" <<EOM
module kubetune.local/testbins/coredns

go 1.26

require $mod $COREDNS_VERSION
EOM
  rm -f "$dir/go.sum"
  cat >"$dir/main.go" <<'EOM'
package main

import (
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() { coremain.Run() }
EOM
  (
    cd "$dir"
    go get "$mod@$COREDNS_VERSION"
    go build -trimpath -ldflags "-s -w" -o "$bindir/coredns" .
  )
  "$bindir/coredns" -version
}

# Link envtest binaries the user already has instead of building them.
use_kubebuilder_assets() {
  local a="${KUBEBUILDER_ASSETS:-}" b
  [[ -n "$a" && -d "$a" ]] || return 0
  for b in etcd kube-apiserver kubectl; do
    if [[ -x "$a/$b" && ! -e "$bindir/$b" ]]; then
      ln -sf "$a/$b" "$bindir/$b"
      log "$b: using KUBEBUILDER_ASSETS ($a/$b)"
    fi
  done
  [[ -x "$bindir/etcd" ]] && touch "$bindir/.ok-etcd"
  return 0
}

parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(etcd k8s kuberay versitygw helm node coredns)

use_kubebuilder_assets
for part in "${parts[@]}"; do
  case "$part" in
    etcd) run_part etcd build_etcd ;;
    k8s)
      if [[ -x "$bindir/kube-controller-manager" && -x "$bindir/kube-apiserver" && -x "$bindir/kubectl" ]]; then
        touch "$bindir/.ok-k8s"
      fi
      run_part k8s build_k8s ;;
    kuberay) run_part kuberay build_kuberay ;;
    versitygw) run_part versitygw build_versitygw ;;
    helm) run_part helm build_helm ;;
    node) run_part node build_node ;;
    coredns) run_part coredns build_coredns ;;
    *) log "unknown part: $part (known: etcd k8s kuberay versitygw helm node coredns)"; exit 2 ;;
  esac
done

cp "$versions_file" "$bindir/versions.env"
echo "$bindir"
