#!/bin/sh
# One CI base job: the target's base archive, made once per hypervisor build.  The CI cache
# restores XSB_BASE when it has it; then this only verifies it (`xsbuild base import`), else it
# builds the base (`xsbuild base export`: Debian's exact rebuild, or a source tree's build).
#   XSB_BASE    where the archive goes (the cache's path)
#   XSB_DEBIAN  Debian version of xen (e.g. 4.17.5+72-g01140da4e8-1), or
#   XSB_SRCDIR  a Xen source tree
set -eu
XSBUILD=${XSBUILD:-xsbuild}
: "${XSB_BASE:?}"
if [ -f "$XSB_BASE" ]; then
    # shellcheck disable=SC2086
    $XSBUILD base import -q "$XSB_BASE" > /dev/null
    echo "$XSB_BASE: from the cache, verified"
    exit 0
fi
mkdir -p "$(dirname "$XSB_BASE")"
if [ -n "${XSB_DEBIAN:-}" ]; then
    # shellcheck disable=SC2086
    $XSBUILD base export --debian "$XSB_DEBIAN" -o "$XSB_BASE"
else
    # shellcheck disable=SC2086
    $XSBUILD base export --srcdir "${XSB_SRCDIR:?XSB_DEBIAN or XSB_SRCDIR}" -o "$XSB_BASE"
fi
