#!/usr/bin/env bash
# Builds localhost/distriproc/redis:latest (OCI image layout tarball, one uncompressed layer)
# from the host's Debian redis binary and its shared libraries: no registry.
#
#   bench/build-redis-oci.sh OUT.tar
#
# Debian's redis-tools ships the full server as /usr/bin/redis-check-rdb (it dispatches on
# argv[0]); it is copied to /redis-server in the image. Layout follows test-images/build-oci.sh.
set -euo pipefail

out=${1:?usage: build-redis-oci.sh OUT.tar}
bin=${REDIS_BIN:-/usr/bin/redis-check-rdb}
ref=localhost/distriproc/redis:latest
[[ -x $bin ]] || { echo "build-redis-oci.sh: $bin not found (apt-get install redis-tools)" >&2; exit 1; }
case "$(uname -m)" in
x86_64) arch=amd64 ;;
aarch64) arch=arm64 ;;
*) arch=$(uname -m) ;;
esac
work=$(mktemp -d /tmp/distriproc-redis-oci.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
layout=$work/layout
mkdir -p "$root"/{etc,tmp,proc,sys,dev,run,data} "$layout/blobs/sha256"
chmod 1777 "$root/tmp"
cp "$bin" "$root/redis-server"
# Shared libraries and the dynamic loader, at the paths ldd reports.
ldd "$bin" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
printf 'root:x:0:0:root:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"

tar_repro() { tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu -C "$2" -cf "$1" .; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
add_blob() { local h; h=$(sha "$1"); mv "$1" "$layout/blobs/sha256/$h"; echo "$h"; }

tar_repro "$work/layer.tar" "$root"
layer_size=$(size "$work/layer.tar")
layer=$(add_blob "$work/layer.tar")
printf '{"architecture":"%s","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/"],"Cmd":["/redis-server"],"WorkingDir":"/data"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"distriproc bench/build-redis-oci.sh"}]}' \
    "$arch" "$layer" >"$work/config.json"
config_size=$(size "$work/config.json")
config=$(add_blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
manifest_size=$(size "$work/manifest.json")
manifest=$(add_blob "$work/manifest.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$manifest_size" "$arch" "$ref" >"$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
find "$layout" -type d -exec chmod 755 {} +
find "$layout" -type f -exec chmod 644 {} +
mkdir -p "$(dirname "$out")"
tar_repro "$work/image.tar" "$layout"
mv "$work/image.tar" "$out"
echo "built $out: $ref"
