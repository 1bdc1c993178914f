"""Which objects get ``-g`` twins for the layout check, and with which flags (xsbuild/capture.py).

The twins exist only so that :mod:`xsbuild.layout` can read the touched files' struct layouts:
the fewest changed objects that every touched file reaches, compiled at ``-O0`` (a layout does
not depend on the optimisation; ``tests/xen/test_layout_twins_real.py`` checks that on Xen).
"""

from __future__ import annotations

from xsbuild.capture import ObjectCmd, _debug_plan, _Planned, _with_debug_info


def planned(obj: str, reasons: list[str], deps: int = 10, *, new: bool = False,
            source: str | None = None) -> _Planned:
    src = source or obj[: -len(".o")] + ".c"
    argv = ("gcc", "-O2", "-Wall", "-c", src, "-o", obj)
    cmd = ObjectCmd(obj, argv, src, frozenset(f"include/h{i}.h" for i in range(deps)))
    return _Planned(cmd, new, reasons)


def chosen(differing: list[_Planned]) -> list[str]:
    return [p.cmd.obj for p in _debug_plan(differing)]


def test_a_source_object_that_includes_the_header_covers_both() -> None:
    # e2e 11's shape: version.h reaches every object, version.c and kernel.c one each; the
    # cheapest header user (other.o) is not needed, since version.o shows version.h too.
    differing = [
        planned("common/version.o", ["xen/include/xen/version.h", "xen/common/version.c"], 30),
        planned("common/kernel.o", ["xen/include/xen/version.h", "xen/common/kernel.c"], 80),
        planned("common/compat/kernel.o", ["xen/include/xen/version.h", "xen/common/kernel.c"],
                90),
        planned("common/other.o", ["xen/include/xen/version.h"], 5),
    ]
    assert chosen(differing) == ["common/kernel.o", "common/version.o"]


def test_one_object_for_a_header_alone_the_cheapest() -> None:
    differing = [planned(f"common/o{i}.o", ["xen/include/xen/sched.h"], 50 - i)
                 for i in range(30)]
    assert chosen(differing) == ["common/o29.o"]


def test_fewest_objects_before_cheapest() -> None:
    # a.o and b.o are cheaper one by one, but c.o alone reaches both files.
    differing = [planned("common/a.o", ["x.h"], 5), planned("common/b.o", ["y.h"], 5),
                 planned("common/c.o", ["x.h", "y.h"], 40)]
    assert chosen(differing) == ["common/c.o"]


def test_new_and_assembly_objects_get_no_twin() -> None:
    differing = [planned("common/new.o", ["common/new.c"], new=True),
                 planned("arch/x86/entry.o", ["x.h"], source="arch/x86/entry.S"),
                 planned("common/a.o", ["x.h"])]
    assert chosen(differing) == ["common/a.o"]


def test_many_reason_sets_are_covered_greedily() -> None:
    # More distinct reason sets than the exact search takes: every file is still covered.
    differing = [planned(f"common/o{i}.o", [f"h{i}.h", f"h{i + 1}.h"]) for i in range(40)]
    covered = {r for p in _debug_plan(differing) for r in p.reasons}
    assert covered == {f"h{i}.h" for i in range(41)}
    assert len(_debug_plan(differing)) <= 21


def test_twin_line_changes_only_the_optimisation_and_adds_dwarf() -> None:
    o = planned("common/a.o", ["x.h"]).cmd
    assert _with_debug_info(o, "-O0").argv == (
        "gcc", "-O0", "-Wall", "-g", "-fno-eliminate-unused-debug-types", "-c", "common/a.c",
        "-o", "common/a.o")
    assert _with_debug_info(o).argv[1] == "-O2"  # the fallback: the tree's own flags
    os_line = ObjectCmd("a.o", ("gcc", "-Os", "-Ofast", "-Og", "-Werror", "-c", "a.c"), "a.c",
                        frozenset())
    assert _with_debug_info(os_line, "-O0").argv[1:5] == ("-O0", "-O0", "-O0", "-Werror")
