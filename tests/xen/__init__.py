"""End-to-end tests against Debian's real Xen 4.17 hypervisor, booted under QEMU.

Pieces, one module each:

* :mod:`.qemu` - a Python API over ``shared/harness/boot-xen.sh``: one boot runs many named steps
  in dom0 and returns per-step output plus the hypervisor's serial log, with error detection.
* :mod:`.dom0py` - a CPython 3.11 bundle (Debian's packages plus a ``pip --target`` install of
  this project) so that ``python3 -m xsbuild`` runs inside dom0; optionally more requirements
  (ansible-core) and the C.UTF-8 locale.
* :mod:`.debian_tree` - the built Debian Xen tree (reused or built once per machine) and an exact
  one-object recompile that never touches that tree.

Everything downloaded or built is cached under :func:`cache_root`, so a second run is fast.

Environment:

* ``XDG_CACHE_HOME``: the cache lives in ``$XDG_CACHE_HOME/xsbuild`` (``~/.cache/xsbuild``);
* ``XSBUILD_XEN_TREE``: a build-xen.sh WORKDIR to use instead of ``<cache>/debian-tree`` (on the
  developer machines: ``/work/cache/xenbuild``);
* ``XSBUILD_REQUIRE_XEN=1``: fail instead of skipping when QEMU or the harness is missing (CI).

Run with ``pytest -m xen`` (``.ci/xen-e2e.sh`` prepares a fresh machine).
"""

from __future__ import annotations

from pathlib import Path

from xsbuild.debian import cache_root as product_cache_root

REPO_ROOT = Path(__file__).resolve().parents[2]
# CI and the developer machines keep ``shared/`` beside the clone.
SHARED_DIR = REPO_ROOT.parent / "shared"
HARNESS_DIR = SHARED_DIR / "harness"


def cache_root() -> Path:
    """xsbuild's own cache, ``$XDG_CACHE_HOME/xsbuild`` (``~/.cache/xsbuild``), created on
    demand: the suite keeps its downloads beside the product's."""
    root = product_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root
