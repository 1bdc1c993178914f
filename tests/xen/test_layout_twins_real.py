"""The layout twins' -O0 on Debian's real Xen tree: same layouts as with the tree's flags.

:func:`xsbuild.capture._compile_twin` compiles the ``-g`` twins at ``-O0`` because a type's
layout does not depend on the optimisation; this compiles two large Xen objects both ways
(into scratch; the tree is only read) and compares every struct and union read from them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xsbuild.capture import TWIN_OPTIMISATION, TreeIndex, _with_debug_info, compile_object
from xsbuild.layout import read_layouts

from .debian_tree import DebianTree

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("obj", ["common/domain.o", "arch/x86/mm.o"])
def test_cheap_twin_has_the_trees_layouts(debian_tree: DebianTree, tmp_path: Path,
                                          obj: str) -> None:
    index = TreeIndex.load(debian_tree.xen_dir)
    layouts = []
    for optimisation in (TWIN_OPTIMISATION, None):
        cmd = _with_debug_info(index.objects[obj], optimisation)
        done = compile_object(cmd, cwd=debian_tree.xen_dir, out_dir=tmp_path / str(optimisation),
                              new_top=None, recorded_top=None)
        assert not done.error, done.error
        layouts.append(read_layouts(done.path))
    cheap, full = layouts
    assert len(full) > 1000  # struct domain, struct vcpu, struct page_info, ...
    assert cheap == full
