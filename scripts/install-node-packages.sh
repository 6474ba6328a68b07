#!/usr/bin/env bash
# Host packages for the one-node cluster the cluster tier starts (tests/harness/node.py):
# containerd, runc, the CNI plugins, iptables and conntrack, and node + npm for
# the llama.cpp read-back test, all from Debian's repository. Idempotent: packages already installed are not fetched again.
#
#   bash scripts/install-node-packages.sh     # as root (CI is root)
#
# As a non-root user it installs nothing and prints the command to run.
set -euo pipefail

packages=(containerd runc containernetworking-plugins iptables nftables conntrack iproute2 openssl gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node and npm, for the trainer tier's llama.cpp read-back of GGUF outputs
# (scripts/llama-runtime.sh): by command, as a Node build from elsewhere bundles npm
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ ${#missing[@]} -eq 0 ]; then
  echo "node packages: all installed (${packages[*]})"
  exit 0
fi
cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" != 0 ]; then
  echo "node packages missing: ${missing[*]}" >&2
  echo "run as root: $cmd" >&2
  exit 1
fi
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts containerd as a service where an init system runs; the harness
# runs its own instance with its own config and sockets, so stop that one.
if command -v service >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  service containerd stop >/dev/null 2>&1 || true
fi
echo "node packages: installed ${missing[*]} in $(( $(date +%s) - start ))s"
