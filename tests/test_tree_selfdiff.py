"""Self-diff of every object of Debian's built tree (slow: needs the tree).

Every 64-bit object of the hypervisor -- C, assembly with and without a FILE symbol
(``arch/x86/boot/head.o``), generated (``common/config_data.o``), linked or not -- diffed
against a byte-identical copy must report no change; the 32-bit boot helpers must be refused
with a one-line reason naming the machine.  Host tools (``tools/``) are not hypervisor objects.
"""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from tests.xen.debian_tree import DebianTree
from xsbuild.capture import TreeIndex


def self_diff(obj: str) -> tuple[str, str]:
    from xsbuild.diff import diff_files
    from xsbuild.errors import XsbuildError

    with tempfile.TemporaryDirectory(prefix="xsb-selfdiff-") as tmp:
        copy = Path(tmp) / Path(obj).name
        shutil.copyfile(obj, copy)
        try:
            return obj, str(diff_files(obj, copy, Path(tmp) / "out.o").status)
        except XsbuildError as exc:
            return obj, f"{type(exc).__name__}: {exc}"


@pytest.mark.slow
def test_every_object_of_the_tree_self_diffs(debian_tree: DebianTree) -> None:
    index = TreeIndex.load(debian_tree.xen_dir)
    finals = sorted({o.final for o in index.objects.values() if not o.obj.startswith("tools/")})
    paths = [str(debian_tree.xen_dir / f) for f in finals]
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(self_diff, paths, chunksize=8))
    rel = {str(Path(k).relative_to(debian_tree.xen_dir)): v for k, v in results.items()}
    boot32 = {k: v for k, v in rel.items() if "built for i386" in v}
    others = {k: v for k, v in rel.items() if k not in boot32}
    assert set(boot32) == {"arch/x86/boot/cmdline.o", "arch/x86/boot/reloc.o"}
    assert all(v.startswith("ElfParseError: ") and "\n" not in v for v in boot32.values())
    assert {k: v for k, v in others.items() if v != "no-change"} == {}
    assert {"arch/x86/boot/head.o", "common/config_data.o", "arch/x86/x86_64/entry.o",
            "arch/x86/efi/runtime.o"} <= set(others)
    assert len(others) > 380
