#!/usr/bin/env bash
# Install Docker Engine 26.x from Debian trixie (docker.io + docker-cli), idempotently, for the
# Docker end-to-end test (tests/docker/). Run after scripts/deps.sh (which adds the trixie apt
# source with a low pin, so only the packages named here come from trixie).
#
#  - Installs docker.io/trixie and docker-cli/trixie. apt resolves their dependencies from the
#    default release (containerd from bookworm lands in /usr/bin: harmless, the tests use the
#    containerd builds under /opt/distriproc and never the system one).
#  - Never starts, enables or configures the system Docker daemon: a policy-rc.d that refuses
#    service starts is put in place for the install when none exists, and removed afterwards.
#    The tests run their own dockerd on a private data root and socket.
#  - Nothing is done when `/usr/sbin/dockerd --version` already reports 26.x or newer.
#  - Also installs the Kubernetes manifest validator used by deploy/check.sh: PyPI's
#    kubernetes-validate (pure Python, ships the Kubernetes JSON schemas) in a venv at
#    $DISTRIPROC_OPT/k8s-validate (default /opt/distriproc), with Debian's python3.
set -euo pipefail

OPT=${DISTRIPROC_OPT:-/opt/distriproc}
K8S_VALIDATE_VERSION=1.37.0

log() { printf '[deps-docker] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "deps-docker.sh must run as root (it installs packages)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive

docker_major() { # prints the major version of /usr/sbin/dockerd, or 0
  local v
  v=$(/usr/sbin/dockerd --version 2>/dev/null | awk '{print $3}' | tr -d ,) || true
  v=${v%%.*}
  [[ $v =~ ^[0-9]+$ ]] && echo "$v" || echo 0
}

install_k8s_validate() {
  local venv=$OPT/k8s-validate
  local have=""
  if [ -x "$venv/bin/kubernetes-validate" ]; then
    have=$("$venv/bin/kubernetes-validate" --version 2>/dev/null || true)
  fi
  if [ "$have" = "$K8S_VALIDATE_VERSION" ]; then
    return
  fi
  log "kubernetes-validate $K8S_VALIDATE_VERSION into $venv"
  if ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$K8S_VALIDATE_VERSION"
}
install_k8s_validate

if [ "$(docker_major)" -ge 26 ] && [ -x /usr/bin/docker ]; then
  log "docker $(/usr/sbin/dockerd --version | awk '{print $3}' | tr -d ,) already installed"
  exit 0
fi

policy=$(apt-cache policy docker.io)
if [[ $policy != *trixie/main* ]]; then
  log "no trixie apt source: run scripts/deps.sh first (it adds trixie with a low pin)"
  exit 1
fi

# Keep the package scripts from starting the system daemons (docker, containerd).
POLICY=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# temporary, scripts/deps-docker.sh\nexit 101\n' >"$POLICY"
  chmod 0755 "$POLICY"
  own_policy=1
fi
cleanup() { if [ "$own_policy" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT

log "apt-get install docker.io/trixie docker-cli/trixie"
if ! apt-get install -y -qq --no-install-recommends docker.io/trixie docker-cli/trixie >/dev/null; then
  log "install failed; refreshing the package lists once and retrying"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io/trixie docker-cli/trixie >/dev/null
fi

if [ "$(docker_major)" -lt 26 ]; then
  log "error: /usr/sbin/dockerd is not 26.x or newer after the install: $(/usr/sbin/dockerd --version 2>&1 || true)"
  exit 1
fi
log "installed: $(/usr/sbin/dockerd --version), $(/usr/bin/docker --version)"
