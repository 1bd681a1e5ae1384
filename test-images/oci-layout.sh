# shellcheck shell=bash
# Packs a root filesystem into a single-layer OCI image layout tarball (uncompressed layer, so
# diff_id == digest) for `ctr images import` without a registry. Sourced by build-oci.sh and
# bench/build-redis-oci.sh. Reproducible: fixed mtimes (SOURCE_DATE_EPOCH, default 0), sorted
# entries, numeric owners 0:0, fixed modes; only coreutils, tar and sha256sum are used.
#
#   oci_pack ROOTFS OUT.tar REF PATH-ENV CMD-JSON WORKDIR CREATED-BY
#
# prints "manifest sha256:HEX, layer N bytes".

oci_arch() {
    case "$(uname -m)" in
    x86_64) echo amd64 ;;
    aarch64) echo arm64 ;;
    *) uname -m ;;
    esac
}

oci_pack() {
    local root=$1 out=$2 ref=$3 path_env=$4 cmd=$5 workdir=$6 created_by=$7
    local epoch=${SOURCE_DATE_EPOCH:-0} arch w layout
    arch=$(oci_arch)
    w=$(mktemp -d /tmp/distriproc-oci-pack.XXXXXX)
    layout=$w/layout
    mkdir -p "$layout/blobs/sha256"
    tar_repro() { # tar_repro OUT DIR: reproducible tar of DIR's contents
        tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=gnu \
            -C "$2" -cf "$1" .
    }
    add_blob() { # add_blob FILE -> prints digest hex, moves FILE into blobs
        local h
        h=$(sha256sum "$1" | cut -d' ' -f1)
        mv "$1" "$layout/blobs/sha256/$h"
        echo "$h"
    }
    local layer layer_size config config_size manifest manifest_size
    tar_repro "$w/layer.tar" "$root"
    layer_size=$(stat -c %s "$w/layer.tar")
    layer=$(add_blob "$w/layer.tar")
    printf '{"architecture":"%s","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=%s"],"Cmd":%s,"WorkingDir":"%s"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"%s"}]}' \
        "$arch" "$path_env" "$cmd" "$workdir" "$layer" "$created_by" >"$w/config.json"
    config_size=$(stat -c %s "$w/config.json")
    config=$(add_blob "$w/config.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
        "$config" "$config_size" "$layer" "$layer_size" >"$w/manifest.json"
    manifest_size=$(stat -c %s "$w/manifest.json")
    manifest=$(add_blob "$w/manifest.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
        "$manifest" "$manifest_size" "$arch" "$ref" >"$layout/index.json"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
    find "$layout" -type d -exec chmod 755 {} +
    find "$layout" -type f -exec chmod 644 {} +
    mkdir -p "$(dirname "$out")"
    tar_repro "$w/image.tar" "$layout"
    mv "$w/image.tar" "$out"
    rm -rf "$w"
    echo "manifest sha256:$manifest, layer $layer_size bytes"
}
