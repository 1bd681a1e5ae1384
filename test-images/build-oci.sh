#!/usr/bin/env bash
# Builds a single-layer OCI image tarball (OCI image layout, uncompressed layer) from local files,
# for `ctr images import` on machines without a registry.
#
#   build-oci.sh busybox OUT.tar          localhost/distriproc/busybox:latest, Cmd ["/bin/sh"]
#   build-oci.sh memhog  OUT.tar          localhost/distriproc/memhog:latest (busybox + /memhog)
#
# Inputs (environment): BUSYBOX (default /bin/busybox, must be static), MEMHOG (memhog kind:
# path of the static memhog binary). Output is reproducible: fixed mtimes, sorted entries,
# numeric owners 0:0, fixed modes (test-images/oci-layout.sh packs the layout).
set -euo pipefail

kind=${1:?usage: build-oci.sh busybox|memhog OUT.tar}
out=${2:?usage: build-oci.sh busybox|memhog OUT.tar}
busybox=${BUSYBOX:-/bin/busybox}

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


# shellcheck source=test-images/oci-layout.sh
. "$(dirname "$0")/oci-layout.sh"

work=$(mktemp -d /tmp/distriproc-oci.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"

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

packed=$(oci_pack "$root" "$out" "$ref" /bin:/sbin:/usr/bin:/usr/sbin "$cmd" / \
    "distriproc test-images/build-oci.sh $kind")
echo "built $out: $ref ($packed)"
