#!/usr/bin/env bash
# Builds localhost/distriproc/redis:latest (OCI image layout tarball, one uncompressed layer)
# from the host's Debian redis binary and its shared libraries: no registry.
#
#   bench/build-redis-oci.sh OUT.tar
#
# Debian's redis-tools ships the full server as /usr/bin/redis-check-rdb (it dispatches on
# argv[0]); it is copied to /redis-server in the image. test-images/oci-layout.sh packs it.
set -euo pipefail

out=${1:?usage: build-redis-oci.sh OUT.tar}
bin=${REDIS_BIN:-/usr/bin/redis-check-rdb}
ref=localhost/distriproc/redis:latest
[[ -x $bin ]] || { echo "build-redis-oci.sh: $bin not found (apt-get install redis-tools)" >&2; exit 1; }
# shellcheck source=test-images/oci-layout.sh
. "$(dirname "$0")/../test-images/oci-layout.sh"
work=$(mktemp -d /tmp/distriproc-redis-oci.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{etc,tmp,proc,sys,dev,run,data}
chmod 1777 "$root/tmp"
cp "$bin" "$root/redis-server"
# Shared libraries and the dynamic loader, at the paths ldd reports.
ldd "$bin" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
printf 'root:x:0:0:root:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"

oci_pack "$root" "$out" "$ref" / '["/redis-server"]' /data "distriproc bench/build-redis-oci.sh" >/dev/null
echo "built $out: $ref"
