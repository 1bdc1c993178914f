"""Struct-layout changes (xsbuild/layout.py), on objects gcc really built with -g.

Each case compiles an original and a patched translation unit with Xen's flags plus the
``-g -fno-eliminate-unused-debug-types`` the build adds for its layout twins, reads both DWARFs
and compares.  The expected changes are derived from the C declarations by hand; pahole-style
offsets are cross-checked against gcc's own ``offsetof``/``sizeof`` in one case, so the reader
cannot quietly agree with itself.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.toolchain import Toolchain
from xsbuild.layout import ChangeKind, LayoutChange, compare_layouts, read_layouts

DEBUG = ("-g", "-fno-eliminate-unused-debug-types")

BASE = """\
struct vcpu_info {
    int id;
    long pending;
    char name[16];
    unsigned int flag_a:3, flag_b:5;
};

int vcpu_id(struct vcpu_info *v)
{
    return v->id;
}
"""


def changes(toolchain: Toolchain, old: str, new: str) -> list[LayoutChange]:
    a = toolchain.compile_source(old, "common/layout.c", DEBUG)
    b = toolchain.compile_source(new, "common/layout.c", DEBUG)
    return compare_layouts(read_layouts(a), read_layouts(b), "common/layout.o")


def kinds(found: list[LayoutChange]) -> list[tuple[str, str]]:
    return [(c.kind.value, c.member) for c in found]


def test_reader_agrees_with_gcc_offsetof(toolchain: Toolchain, tmp_path: Path) -> None:
    layouts = read_layouts(toolchain.compile_source(BASE, "common/layout.c", DEBUG))
    vi = layouts["struct vcpu_info"]
    probe = tmp_path / "probe.c"
    probe.write_text(BASE.split("int vcpu_id")[0] + """
#include <stddef.h>
#include <stdio.h>
int main(void)
{
    printf("%zu %zu %zu %zu\\n", sizeof(struct vcpu_info), offsetof(struct vcpu_info, id),
           offsetof(struct vcpu_info, pending), offsetof(struct vcpu_info, name));
    return 0;
}
""")
    subprocess.run(["gcc", "-o", str(tmp_path / "probe"), str(probe)], check=True)
    size, *offsets = map(int, subprocess.run([str(tmp_path / "probe")], capture_output=True,
                                             text=True, check=True).stdout.split())
    assert vi.size == size
    assert [m.offset // 8 for m in vi.members[:3]] == offsets
    assert [(m.name, m.offset, m.size) for m in vi.members[3:]] == [
        ("flag_a", 8 * 32, 3), ("flag_b", 8 * 32 + 3, 5)]
    assert vi.decl.endswith(":1")


def test_member_added_in_the_middle(toolchain: Toolchain) -> None:
    found = changes(toolchain, BASE, BASE.replace("    long pending;\n",
                                                  "    long pending;\n    long extra;\n"))
    assert kinds(found) == [("size", ""), ("moved", "name"), ("moved", "flag_a"),
                            ("moved", "flag_b"), ("added", "extra")]
    assert found[-1].describe().startswith("struct vcpu_info (")
    assert found[-1].describe().endswith(": member extra added at offset 16, size 8")
    assert found[1].old == "offset 16, size 16" and found[1].new == "offset 24, size 16"


def test_member_added_at_the_end(toolchain: Toolchain) -> None:
    found = changes(toolchain, BASE, BASE.replace("flag_b:5;\n", "flag_b:5;\n    void *tail;\n"))
    assert kinds(found) == [("size", ""), ("added", "tail")]
    assert (found[0].old, found[0].new) == ("40 bytes", "48 bytes")


def test_member_removed(toolchain: Toolchain) -> None:
    found = changes(toolchain, BASE, BASE.replace("    char name[16];\n", ""))
    assert kinds(found) == [("size", ""), ("removed", "name"), ("moved", "flag_a"),
                            ("moved", "flag_b")]


def test_member_widened(toolchain: Toolchain) -> None:
    found = changes(toolchain, BASE, BASE.replace("    int id;", "    long id;"))
    assert kinds(found) == [("resized", "id")]
    assert (found[0].old, found[0].new) == ("offset 0, size 4", "offset 0, size 8")


def test_array_resized(toolchain: Toolchain) -> None:
    found = changes(toolchain, BASE, BASE.replace("name[16]", "name[32]"))
    assert kinds(found) == [("size", ""), ("resized", "name"), ("moved", "flag_a"),
                            ("moved", "flag_b")]


def test_bit_field_widened(toolchain: Toolchain) -> None:
    found = changes(toolchain, BASE, BASE.replace("flag_a:3", "flag_a:4"))
    assert kinds(found) == [("resized", "flag_a"), ("moved", "flag_b")]
    assert found[0].new == "bit offset 256, 4 bits"


def test_padding_only_change_is_still_named(toolchain: Toolchain) -> None:
    # A new member in former padding moves nothing and keeps the size, yet live instances hold
    # whatever the padding held: reported, precisely, as the one added member.
    found = changes(toolchain, BASE, BASE.replace("    int id;\n", "    int id;\n    int gen;\n"))
    assert kinds(found) == [("added", "gen")]
    assert found[0].new == "offset 4, size 4"


def test_retyped_member_of_the_same_size(toolchain: Toolchain) -> None:
    found = changes(toolchain, BASE, BASE.replace("    int id;", "    unsigned int id;"))
    assert kinds(found) == [("retyped", "id")]
    assert (found[0].old, found[0].new) == ("int", "unsigned int")


def test_new_type_used_only_by_new_code_is_fine(toolchain: Toolchain) -> None:
    new = BASE + """
struct vcpu_stats {
    long hits;
};

long vcpu_hits(struct vcpu_stats *s)
{
    return s->hits;
}
"""
    assert changes(toolchain, BASE, new) == []


def test_code_change_without_layout_change(toolchain: Toolchain) -> None:
    assert changes(toolchain, BASE, BASE.replace("return v->id;", "return v->id + 1;")) == []


def test_anonymous_union_members_are_flattened(toolchain: Toolchain) -> None:
    old = BASE.replace("    long pending;\n", "    union { long pending; int low; };\n")
    new = old.replace("int low;", "struct { int low, high; };")
    found = changes(toolchain, old, new)
    assert kinds(found) == [("added", "high")]
    assert found[0].type_key == "struct vcpu_info"


def test_unnamed_bit_field_is_padding(toolchain: Toolchain) -> None:
    old = BASE.replace("flag_b:5;", "flag_b:5, :4, flag_c:2;")
    found = changes(toolchain, old, old.replace(":4,", ":3,"))
    assert kinds(found) == [("moved", "flag_c")]
    assert (found[0].old, found[0].new) == ("bit offset 268, 2 bits", "bit offset 267, 2 bits")


def test_typedef_of_anonymous_struct(toolchain: Toolchain) -> None:
    old = "typedef struct { int a; } pair_t;\nint first(pair_t *p) { return p->a; }\n"
    found = changes(toolchain, old, old.replace("int a;", "int z; int a;"))
    assert [(c.type_key, c.kind) for c in found] == [
        ("typedef pair_t", ChangeKind.SIZE), ("typedef pair_t", ChangeKind.MOVED),
        ("typedef pair_t", ChangeKind.ADDED)]


def test_object_without_dwarf_is_bad_input(toolchain: Toolchain) -> None:
    from xsbuild.errors import UsageError

    with pytest.raises(UsageError, match="no DWARF"):
        read_layouts(toolchain.compile_source(BASE, "common/layout.c"))
