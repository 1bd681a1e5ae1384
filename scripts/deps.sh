#!/usr/bin/env bash
# Install what DistriProc needs on a fresh Debian bookworm machine, idempotently.
#
#  - runc (bookworm 1.1.5: has `restore --lazy-pages`), iptables, busybox-static, iproute2
#  - clang/libclang (bindgen for userfaultfd-sys), build tools
#  - containerd 1.7 (Debian trixie) and 2.x (Debian unstable), unpacked side by side under
#    $DISTRIPROC_OPT/containerd-<series>/ so the test suite can run against both; the default
#    series is linked as $DISTRIPROC_OPT/containerd (2.1; override with DISTRIPROC_CONTAINERD).
#  - Docker 26.x from Debian trixie (scripts/deps-docker.sh; the system daemon is never started)
#  - CRIU >= 4.2, built from Debian's source tarball when the installed criu is older or
#    fails `criu check` (kernel 6.18 breaks older CRIUs).
#
# Everything is skipped when already present. Set DISTRIPROC_OPT to move the install root.
set -euo pipefail

OPT=${DISTRIPROC_OPT:-/opt/distriproc}
DEFAULT_SERIES=${DISTRIPROC_CONTAINERD:-2.1}
CRIU_VERSION=4.2.1-1
log() { printf '[deps] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "deps.sh must run as root (it installs packages)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive

# --- apt sources: trixie and unstable, pinned low so nothing else is upgraded -----------------
SRC=/etc/apt/sources.list.d/distriproc.sources
PIN=/etc/apt/preferences.d/distriproc
need_update=0
if [ ! -f "$SRC" ]; then
  cat >"$SRC" <<'SOURCES'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: trixie sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  need_update=1
fi
if [ ! -f "$PIN" ]; then
  cat >"$PIN" <<'PINS'
Package: *
Pin: release n=trixie
Pin-Priority: 50

Package: *
Pin: release n=sid
Pin-Priority: 40
PINS
fi
stamp=/var/lib/apt/periodic/distriproc-update-stamp
if [ "$need_update" = 1 ] || [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +720 2>/dev/null)" ]; then
  log "apt-get update"
  apt-get update -qq
  mkdir -p "$(dirname "$stamp")" && touch "$stamp"
fi

# --- plain packages ---------------------------------------------------------------------------
PKGS=(runc iptables busybox-static iproute2 clang libclang-dev pkg-config make gcc libc6-dev
      dpkg-dev xz-utils python3 util-linux procps
      # CRIU build dependencies
      libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf
      libnl-3-dev libnl-route-3-dev libcap-dev libnet1-dev libbsd-dev libgnutls28-dev
      libnftables-dev uuid-dev libaio-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- containerd 1.7 and 2.x, unpacked side by side -----------------------------------------------
install_containerd() { # series suite
  local series=$1 suite=$2 dir="$OPT/containerd-$1"
  if [ -x "$dir/usr/bin/containerd" ]; then return; fi
  log "containerd $series from Debian $suite into $dir"
  local tmp; tmp=$(mktemp -d)
  local ver; ver=$(apt-cache madison containerd | awk -v s="$suite" '$0 ~ s"/main" {print $3; exit}')
  [ -n "$ver" ] || { echo "no containerd in Debian $suite" >&2; exit 1; }
  (cd "$tmp" && apt-get download -qq "containerd=$ver")
  mkdir -p "$dir"
  dpkg-deb -x "$tmp"/containerd_*.deb "$dir"
  rm -rf "$tmp"
  "$dir/usr/bin/containerd" --version >&2
}
install_containerd 1.7 trixie
install_containerd 2.1 sid
if [ ! -e "$OPT/containerd" ]; then ln -sfn "containerd-$DEFAULT_SERIES" "$OPT/containerd"; fi

# --- CRIU >= 4.2 ------------------------------------------------------------------------------
criu_ok() {
  command -v criu >/dev/null 2>&1 || return 1
  local v; v=$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}')
  local major=${v%%.*} rest=${v#*.}; local minor=${rest%%.*}
  { [ "${major:-0}" -gt 4 ] || { [ "${major:-0}" -eq 4 ] && [ "${minor:-0}" -ge 2 ]; }; } || return 1
  criu check >/dev/null 2>&1 || return 1
}
if ! criu_ok; then
  log "building CRIU ${CRIU_VERSION%-*} from Debian's source tarball"
  build=/var/cache/distriproc/criu-build
  mkdir -p "$build"
  (cd "$build" && { ls criu_"${CRIU_VERSION%-*}".orig.tar.* >/dev/null 2>&1 \
      || apt-get source -qq --download-only "criu=$CRIU_VERSION" || true; })
  orig=$(ls "$build"/criu_"${CRIU_VERSION%-*}".orig.tar.* 2>/dev/null | head -1)
  [ -n "$orig" ] || { echo "could not download criu $CRIU_VERSION sources" >&2; exit 1; }
  rm -rf "$build/src" && mkdir -p "$build/src"
  tar -xf "$orig" -C "$build/src" --strip-components=1
  make -C "$build/src" -j"$(nproc)" criu >"$build/build.log" 2>&1 \
    || { tail -30 "$build/build.log" >&2; exit 1; }
  install -m 0755 "$build/src/criu/criu" /usr/local/sbin/criu
  hash -r
  criu_ok || { criu check >&2 || true; echo "built criu does not pass 'criu check'" >&2; exit 1; }
fi
log "criu $(criu --version | awk '/^Version:/ {print $2}'): $(criu check 2>&1 | tail -1)"
criu check --feature uffd-noncoop >/dev/null 2>&1 || { echo "kernel lacks uffd-noncoop" >&2; exit 1; }

# --- Rust toolchain components ------------------------------------------------------------------
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
fi
# --- Docker 26 (trixie) for the Docker end-to-end test, and the Kubernetes manifest validator --
bash "$(dirname "$0")/deps-docker.sh"
log "ok"
