#!/bin/bash
# xen-e2e.sh - prepare a Debian bookworm machine (as root) for the real-Xen suite, tests/xen
# (pytest -m xen).  Idempotent: a second run changes nothing and only refreshes apt's lists.
#
# What the suites need on the host (headless Chromium for the HTML report test, tests/test_html_report.py):
#   * QEMU (qemu-system-x86) and cpio: shared/harness/boot-xen.sh boots Debian's Xen with them;
#   * deb-src entries: xsbuild (xsbuild/debian.py, as shared/harness/build-xen.sh) runs "apt-get source xen=<version>" the first
#     time a machine needs the Debian tree (tests/xen/debian_tree.py), plus that build's
#     dependencies (dpkg-dev, build-essential = gcc-12/binutils 2.40, bison, flex, python3,
#     lsb-release);
#   * apt-get download (for the dom0 debs and the Python bundle) and PyPI (pip builds the
#     xsbuild wheel and fetches its dependencies for dom0).
# Nothing is built or downloaded here beyond the packages: the suite caches its own downloads and
# the Debian tree under $XDG_CACHE_HOME/xsbuild (~/.cache/xsbuild), once per machine.
set -euo pipefail

PACKAGES=(qemu-system-x86 cpio gzip xz-utils zstd dpkg-dev build-essential bison flex python3
          lsb-release binutils chromium fonts-dejavu-core)
DEB822=/etc/apt/sources.list.d/debian.sources
LEGACY=/etc/apt/sources.list
EXTRA_LIST=/etc/apt/sources.list.d/xsbuild-deb-src.list

log() { echo "[xen-e2e] $*" >&2; }
[ "$(id -u)" = 0 ] || { echo "xen-e2e.sh: run as root (apt-get)" >&2; exit 1; }

# deb-src: in the deb822 file (bookworm's default) add "deb-src" to every "Types: deb" stanza;
# with a one-line-style sources.list, add a deb-src twin of each deb line in a separate file.
enable_deb_src() {
    if [ -f "$DEB822" ]; then
        if grep -qE '^Types:[[:space:]]*deb[[:space:]]*$' "$DEB822"; then
            log "adding deb-src to Types: in $DEB822"
            sed -i -E 's/^Types:[[:space:]]*deb[[:space:]]*$/Types: deb deb-src/' "$DEB822"
        else
            log "deb-src already enabled in $DEB822"
        fi
    elif [ -f "$LEGACY" ] && grep -qE '^deb[[:space:]]' "$LEGACY"; then
        if grep -qsE '^deb-src[[:space:]]' "$LEGACY" "$EXTRA_LIST"; then
            log "deb-src lines already present"
        else
            log "writing $EXTRA_LIST"
            sed -n -E 's/^deb([[:space:]])/deb-src\1/p' "$LEGACY" > "$EXTRA_LIST"
        fi
    else
        echo "xen-e2e.sh: no apt sources found ($DEB822, $LEGACY)" >&2
        exit 1
    fi
}

enable_deb_src
log "apt-get update"
apt-get update -qq
log "installing: ${PACKAGES[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
    >/dev/null
# apt-get source must now find Debian's Xen source package (build-xen.sh's first step).
apt-cache showsrc xen 2>/dev/null | grep '^Package: xen$' >/dev/null ||
    { echo "xen-e2e.sh: apt-cache showsrc xen finds nothing: deb-src not active" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null
log "ready: run 'XSBUILD_REQUIRE_XEN=1 pytest -m xen' (first run builds the caches)"
