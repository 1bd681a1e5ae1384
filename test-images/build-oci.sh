#!/usr/bin/env bash
# Builds a single-layer OCI image tarball (OCI image layout, uncompressed layer) from local files,
# for `ctr images import` on machines without a registry.
#
#   build-oci.sh busybox OUT.tar          localhost/distriproc/busybox:latest, Cmd ["/bin/sh"]
#   build-oci.sh memhog  OUT.tar          localhost/distriproc/memhog:latest (busybox + /memhog)
#
# Inputs (environment): BUSYBOX (default /bin/busybox, must be static), MEMHOG (memhog kind:
# path of the static memhog binary). Output is reproducible: fixed mtimes, sorted entries,
# numeric owners 0:0, fixed modes; only coreutils, tar and sha256sum are used.
set -euo pipefail

kind=${1:?usage: build-oci.sh busybox|memhog OUT.tar}
out=${2:?usage: build-oci.sh busybox|memhog OUT.tar}
busybox=${BUSYBOX:-/bin/busybox}
epoch=${SOURCE_DATE_EPOCH:-0}

case "$kind" in
busybox)
    ref=localhost/distriproc/busybox:latest
    cmd='["/bin/sh"]'
    ;;
memhog)
    ref=localhost/distriproc/memhog:latest
    cmd='["/memhog","serve","--mib","64"]'
    memhog=${MEMHOG:?MEMHOG must point at the static memhog binary}
    [[ -x $memhog ]] || { echo "build-oci.sh: $memhog is not an executable" >&2; exit 1; }
    ;;
*)
    echo "build-oci.sh: unknown image kind '$kind' (busybox|memhog)" >&2
    exit 1
    ;;
esac

[[ -x $busybox ]] || { echo "build-oci.sh: $busybox not found (apt-get install busybox-static)" >&2; exit 1; }
if ! "$busybox" true 2>/dev/null; then
    echo "build-oci.sh: $busybox does not run" >&2
    exit 1
fi
if command -v ldd >/dev/null && ldd "$busybox" >/dev/null 2>&1; then
    echo "build-oci.sh: $busybox is dynamically linked; a static busybox is needed" >&2
    exit 1
fi

case "$(uname -m)" in
x86_64) arch=amd64 ;;
aarch64) arch=arm64 ;;
*) arch=$(uname -m) ;;
esac

work=$(mktemp -d /tmp/distriproc-oci.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
layout=$work/layout
mkdir -p "$root" "$layout/blobs/sha256"

# --- root filesystem
mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root,run,var}
chmod 755 "$root" "$root"/{bin,etc,proc,sys,dev,root,run,var}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
for applet in sh ls cat echo sleep ps seq date true false kill wc head dd env grep mkdir rm \
    tail test uname id hostname mount; do
    ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
    >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
chmod 644 "$root/etc/passwd" "$root/etc/group"
if [[ $kind == memhog ]]; then
    cp "$memhog" "$root/memhog"
    chmod 755 "$root/memhog"
fi

# --- helpers
tar_repro() { # tar_repro OUT DIR: reproducible tar of DIR's contents
    tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=gnu \
        -C "$2" -cf "$1" .
}
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
add_blob() { # add_blob FILE -> prints digest hex, moves FILE into blobs
    local h
    h=$(sha "$1")
    mv "$1" "$layout/blobs/sha256/$h"
    echo "$h"
}

# --- layer (uncompressed: diff_id == digest)
tar_repro "$work/layer.tar" "$root"
layer_size=$(size "$work/layer.tar")
layer=$(add_blob "$work/layer.tar")

# --- image config
printf '{"architecture":"%s","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/bin:/sbin:/usr/bin:/usr/sbin"],"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"distriproc test-images/build-oci.sh %s"}]}' \
    "$arch" "$cmd" "$layer" "$kind" >"$work/config.json"
config_size=$(size "$work/config.json")
config=$(add_blob "$work/config.json")

# --- manifest
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
manifest_size=$(size "$work/manifest.json")
manifest=$(add_blob "$work/manifest.json")

# --- index and layout marker
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$manifest_size" "$arch" "$ref" >"$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
find "$layout" -type d -exec chmod 755 {} +
find "$layout" -type f -exec chmod 644 {} +

mkdir -p "$(dirname "$out")"
tar_repro "$work/image.tar" "$layout"
mv "$work/image.tar" "$out"
echo "built $out: $ref (manifest sha256:$manifest, layer $layer_size bytes)"
