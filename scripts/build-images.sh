#!/usr/bin/env bash
# Build kubetune's container images without a Docker engine or a registry, as
# archives that `ctr -n k8s.io images import FILE` loads into containerd.
#
#   bash scripts/build-images.sh                  # operator trainer pause
#   bash scripts/build-images.sh trainer base     # any of: operator trainer pause base kuberay
#
# - base: Debian bookworm (the release of the Dockerfile's default
#   python:3.11-slim-bookworm) from Debian's packages with debootstrap, with
#   Debian's python3 set up like the python slim image (`python`, pip, venv,
#   headers). It is the Dockerfile's PYTHON_IMAGE for the two targets below.
# - operator, trainer: the Dockerfile's targets, built by buildah (daemonless).
#   Install steps use the host network, this machine's CA bundle as a build
#   secret (never a layer) and the host's uv cache as the build cache mount.
# - pause: the pod sandbox image, a static C program (scripts/images/pause.c).
# - kuberay: KubeRay's operator, the static ray-operator binary that
#   scripts/build-test-bins.sh builds (KUBETUNE_KUBERAY_BIN, else that script's
#   kuberay part), alone in an image as /manager, the path KubeRay's manifests run.
#
# Every image's tag is a hash of what goes into it, so an unchanged input
# reuses its archive and any change rebuilds it; archives and buildah images
# of older hashes are removed. Progress goes to stderr; the last lines on
# stdout are one `NAME TAG ARCHIVE` per image asked for (NAME:TAG is the
# image reference in containerd; base has no archive unless asked for).
#
# Settings (environment):
#   KUBETUNE_CACHE=DIR        archives go to DIR/images (default ~/.cache/kubetune)
#   KUBETUNE_CA_BUNDLE=FILE   CA bundle for the install steps (default: SSL_CERT_FILE,
#                             else /etc/ssl/certs/ca-certificates.crt)
#   KUBETUNE_DEBIAN_MIRROR=URL  Debian mirror for debootstrap (default deb.debian.org)
#   KUBETUNE_UV_CACHE=DIR     uv cache shared with the builds (default: the host's
#                             `python3 -m uv cache dir`; `none` for a build-private one)
#   KUBETUNE_KEEP_IMAGES=1    keep the built images in buildah's storage too (for
#                             scripts/images/check-images.sh); by default only the
#                             archives and the base stay, which saves the trainer's ~6 GB
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
images=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/images
ca_bundle=${KUBETUNE_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
mirror=${KUBETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
prefix=localhost/kubetune

log() { echo "build-images: $*" >&2; }
die() {
  log "$*"
  exit 1
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(operator trainer pause)
for t in "${targets[@]}"; do
  case $t in
    operator | trainer | pause | base | kuberay) ;;
    *) die "unknown image '$t': choose from operator, trainer, pause, base, kuberay" ;;
  esac
done

# --- host tools, from Debian's packages ------------------------------------
host_packages=(buildah debootstrap gcc libc6-dev)
missing=()
for p in "${host_packages[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then
    # buildah's storage and debootstrap's chroot need root anyway.
    die "missing host packages; as root run: $cmd"
  fi
  log "installing ${missing[*]}"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
[ "$(id -u)" = 0 ] || die "buildah's image storage and debootstrap need root; run as root"
[ -s "$ca_bundle" ] || die "CA bundle $ca_bundle not found; set KUBETUNE_CA_BUNDLE"

mkdir -p "$images"
# One run at a time per cache: a second run would remove the first one's
# images as stale while it exports them.
exec 9>"$images/.lock"
if ! flock -n 9; then
  log "waiting for another build-images.sh run on $images"
  flock 9
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/kubetune-images.XXXXXX")
working=() # buildah working containers to remove if the run stops halfway
cleanup() {
  local c
  for c in "${working[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  # debootstrap mounts /proc and /sys in the chroot while it configures
  # packages; a run stopped then leaves them mounted.
  grep -o " $work/[^ ]*" /proc/mounts | sort -r | xargs -r umount -l 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A build that failed or was killed halfway leaves its working container (the
# trainer's holds ~6 GB); under the lock, any container of ours is such a one.
leftover=$(buildah containers --format '{{.ContainerID}} {{.ImageName}}' 2>/dev/null \
  | awk -v p="$prefix-" 'index($2, p) == 1 {print $1}')
for c in $leftover; do
  log "removing the working container $c a stopped build left"
  buildah rm "$c" >/dev/null || true
done

short_hash() { sha256sum | cut -c1-16; }

# Files under the given paths as the build context sees them (.dockerignore
# leaves out the same caches), hashed with their names.
tree_hash() {
  find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | short_hash
}

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# Free space a target's build needs (GiB): the trainer's CUDA venv is ~5.5 GB,
# written once as the build's layer, once as the committed image and once as
# the archive. A build that runs out halfway fails deep inside a commit; this
# says so first, with where the space went.
need_space() {
  local target=$1 need have dir
  case $target in
    trainer) need=20 ;;
    *) need=4 ;;
  esac
  for dir in "$(buildah info --format '{{.store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers)" "$images"; do
    mkdir -p "$dir"
    have=$(($(df -Pk "$dir" | awk 'NR == 2 {print $4}') / 1048576))
    if [ "$have" -lt "$need" ]; then
      log "building $target needs ~${need} GiB free on $dir's filesystem; it has ${have} GiB."
      log "largest users there:"
      du -xsh "$images" "$(dirname "$images")"/* /var/lib/containers /tmp/* 2>/dev/null | sort -h | tail -n 8 >&2 || true
      die "free space on $dir (old images: buildah rmi --prune; old test runs: /tmp/pytest-of-$(id -un))"
    fi
  done
}

# Removes archives and buildah images of NAME whose tag is not KEEP.
remove_stale() {
  local name=$1 keep=$2 ref
  find "$images" -maxdepth 1 -name "kubetune-$name-*.tar*" ! -name "kubetune-$name-$keep.tar" \
    -print -delete | sed 's/^/build-images: removed stale /' >&2
  for ref in $(buildah images --format '{{.Name}}:{{.Tag}}' --filter "reference=$prefix-$name" 2>/dev/null); do
    if [ "$ref" != "$prefix-$name:$keep" ]; then
      log "removing stale image $ref"
      buildah rmi "$ref" >/dev/null
    fi
  done
}

# Writes NAME:TAG as a docker-archive: containerd 1.6 imports it with its tag,
# and uncompressed layers cost no compression time on export or import.
export_archive() {
  local ref=$1 archive=$2 start
  start=$(date +%s)
  rm -f "$archive.part"
  buildah push --quiet "$ref" "docker-archive:$archive.part:$ref" >&2
  mv "$archive.part" "$archive"
  log "exported $ref to $archive in $(($(date +%s) - start))s ($(du -h "$archive" | cut -f1))"
}

# --- base -------------------------------------------------------------------
base_packages=python3,python3-venv,python3-pip,python3-dev,python-is-python3,ca-certificates,netbase,tzdata

build_base() {
  local ref=$1 rootfs=$work/rootfs ctr
  log "debootstrap $suite (minbase + ${base_packages//,/ })"
  debootstrap --variant=minbase --include="$base_packages" "$suite" "$rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    die "debootstrap failed"
  }
  # Later `apt-get install` steps in the Dockerfile get the point release's fixes.
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb http://deb.debian.org/debian $suite main
deb http://deb.debian.org/debian $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
EOF
  # The image is the environment, as in the python slim image: pip may install
  # into it (PEP 668's marker is for hosts whose python the OS manages).
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  # As in Debian's slim images: no manuals, documentation or translations,
  # now or from the Dockerfile's later apt-get installs (licences stay).
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  find "$rootfs/usr/share/doc" ! -type d ! -name copyright -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  # debootstrap copies the host's name and resolver; a container gets its own.
  rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
  tar -C "$rootfs" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "$work/rootfs.tar" .
  rm -rf "$rootfs"
  ctr=$(buildah from scratch)
  working+=("$ctr")
  buildah add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
  rm -f "$work/rootfs.tar"
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 --os linux --arch amd64 \
    --label org.opencontainers.image.description="Debian $suite with Debian's python3 (kubetune build base)" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
}

base_tag=$suite-$( (declare -f build_base; echo "$suite $base_packages") | short_hash)
base_ref=$prefix-base:$base_tag

ensure_base() {
  if image_exists "$base_ref"; then
    return
  fi
  local start
  start=$(date +%s)
  log "building $base_ref"
  build_base "$base_ref"
  log "built $base_ref in $(($(date +%s) - start))s"
  remove_stale base "$base_tag"
}

# --- operator and trainer (the Dockerfile's targets) -----------------------
uv_cache=${KUBETUNE_UV_CACHE:-}
if [ -z "$uv_cache" ] && python3 -m uv --version >/dev/null 2>&1; then
  uv_cache=$(python3 -m uv cache dir 2>/dev/null)
fi

dockerfile_tag() {
  local target=$1
  (
    echo "$target $base_tag"
    declare -f build_target
    tree_hash Dockerfile .dockerignore pyproject.toml constraints.txt README.md scripts/setup.sh \
      operator trainer
  ) | short_hash
}

build_target() {
  local target=$1 ref=$2
  local args=(
    bud --target "$target" --tag "$ref" --file Dockerfile
    --build-arg "PYTHON_IMAGE=$base_ref" --pull=never
    --network host --secret "id=ca-bundle,src=$ca_bundle"
  )
  if [ -n "$uv_cache" ] && [ "$uv_cache" != none ]; then
    mkdir -p "$uv_cache"
    args+=(--volume "$uv_cache:/var/cache/kubetune-uv:rw")
  fi
  buildah "${args[@]}" . >&2
}

# --- pause ------------------------------------------------------------------
build_pause() {
  local ref=$1 ctr
  gcc -static -Os -s -Wall -Werror -o "$work/pause" scripts/images/pause.c >&2
  ctr=$(buildah from scratch)
  working+=("$ctr")
  buildah copy --quiet --chmod 0755 "$ctr" "$work/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 --os linux --arch amd64 "$ctr"
  buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
}

pause_tag() {
  (
    declare -f build_pause
    cat scripts/images/pause.c
    gcc --version | head -n 1
  ) | short_hash
}

# --- kuberay ----------------------------------------------------------------
kuberay_bin() {
  local bin=${KUBETUNE_KUBERAY_BIN:-}
  if [ -z "$bin" ]; then
    bin=$(bash scripts/build-test-bins.sh kuberay | tail -n 1)/ray-operator
  fi
  [ -x "$bin" ] || die "ray-operator binary $bin not found: bash scripts/build-test-bins.sh kuberay"
  echo "$bin"
}

build_kuberay() {
  local ref=$1 ctr
  ctr=$(buildah from scratch)
  working+=("$ctr")
  buildah copy --quiet --chmod 0755 "$ctr" "$(kuberay_bin)" /manager >/dev/null
  # KubeRay's manifests run /manager as a non-root user (runAsNonRoot).
  buildah config --entrypoint '["/manager"]' --user 65532:65532 --os linux --arch amd64 \
    --label org.opencontainers.image.description="KubeRay ray-operator (kubetune test image)" "$ctr"
  buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
}

kuberay_tag() {
  (
    declare -f build_kuberay
    sha256sum <"$(kuberay_bin)"
  ) | short_hash
}

# --- main -------------------------------------------------------------------
lines=()
for t in "${targets[@]}"; do
  case $t in
    base) tag=$base_tag ;;
    pause) tag=$(pause_tag) ;;
    kuberay) tag=$(kuberay_tag) ;;
    *) tag=$(dockerfile_tag "$t") ;;
  esac
  ref=$prefix-$t:$tag
  archive=$images/kubetune-$t-$tag.tar
  if [ -s "$archive" ]; then
    log "$ref: cached ($archive)"
  else
    start=$(date +%s)
    case $t in
      base) ensure_base ;;
      pause) image_exists "$ref" || build_pause "$ref" ;;
      kuberay) image_exists "$ref" || build_kuberay "$ref" ;;
      *)
        if ! image_exists "$ref"; then
          # The older hash's archive and image go first: the trainer's build
          # needs its own room (see need_space), not room beside the last one.
          remove_stale "$t" "$tag"
          need_space "$t"
          ensure_base
          log "building $ref (buildah bud --target $t)"
          build_target "$t" "$ref"
        fi
        ;;
    esac
    export_archive "$ref" "$archive"
    if [ "$t" != base ] && [ "${KUBETUNE_KEEP_IMAGES:-0}" != 1 ]; then
      buildah rmi "$ref" >/dev/null
    fi
    log "$ref ready in $(($(date +%s) - start))s"
  fi
  remove_stale "$t" "$tag"
  lines+=("$prefix-$t $tag $archive")
done
printf '%s\n' "${lines[@]}"
