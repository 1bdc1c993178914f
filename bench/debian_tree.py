"""Where the benchmarks find Debian's built Xen tree by default.

The tree ``xsbuild build --debian 4.17.5+72-g01140da4e8-1`` keeps in xsbuild's cache (the test
suite shares it), or a ``shared/harness/build-xen.sh`` WORKDIR named by ``$XSBUILD_XEN_TREE``.
Both have the same layout: ``xen-<version>/`` (the source tree, built) and ``ref/`` (Debian's
packages, with the ``-dbg`` ``xen-syms``).
"""

from __future__ import annotations

import os
from pathlib import Path

from xsbuild.debian import version_folder

VERSION = "4.17.5+72-g01140da4e8"


def workdir() -> Path:
    env = os.environ.get("XSBUILD_XEN_TREE")
    return Path(env) if env else version_folder(f"{VERSION}-1")


def default_top() -> Path:
    """The source tree's top (holds ``xen/`` and ``debian/``)."""
    return workdir() / f"xen-{VERSION}"


def default_xen_syms() -> Path:
    """Debian's shipped ``xen-syms`` (the -dbg package)."""
    return workdir() / "ref" / "usr" / "lib" / "debug" / "boot" / "xen-syms-4.17-amd64"
