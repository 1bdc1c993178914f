"""Session-wide fixtures: one object cache and one hand-made hypervisor per test session."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # make ``tests.support`` importable without a tests/__init__.py
    sys.path.insert(0, str(REPO))

from tests.support.handmade import build_hypervisor  # noqa: E402
from tests.support.image import Image  # noqa: E402
from tests.support.toolchain import CC, Toolchain  # noqa: E402
from tests.xen.debian_tree import DebianTree, get_tree  # noqa: E402


@pytest.fixture(scope="session")
def toolchain(tmp_path_factory: pytest.TempPathFactory) -> Toolchain:
    """Xen-flag compiler with a content-hash object cache shared by the whole session."""
    if shutil.which(CC) is None:
        pytest.skip(f"{CC} is not installed")
    return Toolchain(tmp_path_factory.mktemp("objcache"))


@pytest.fixture(scope="session")
def hypervisor(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The small hand-made hypervisor (fixtures/handmade/version.c), runnable by the loader."""
    return build_hypervisor(toolchain, tmp_path_factory.mktemp("hv") / "xen-syms")


@pytest.fixture(scope="session")
def debian_tree() -> DebianTree:
    """Debian's built Xen tree (``tests/xen/debian_tree.py``): reused from $XSBUILD_XEN_TREE or
    xsbuild's cache, else built once per machine (minutes).  Tests using it are marked slow."""
    return get_tree()
