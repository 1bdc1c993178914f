"""Proofs for the test support itself: the Xen-like toolchain, the image, the loader child.

Each test here pins a rule the behavioural scenarios rely on: entry sizes of special sections
measured against Debian's real objects, Xen's ``path#name`` naming checked against Debian's own
symbol map, and the loader doing (and refusing) what Xen 4.17's loader does with hand-made
payloads built the way Xen's in-tree tests build theirs.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.handmade import (
    HYPERVISOR_NAME,
    FuncEntry,
    PayloadSpec,
    build_hypervisor,
    build_id_note,
    build_payload,
)
from tests.support.image import XEN_LINK_BASE, Image, read_build_id
from tests.support.toolchain import (
    XEN_CFLAGS,
    Toolchain,
    flags_from_cmd,
    readelf,
    relocation_offsets,
    section_sizes,
)
from tests.xen.debian_tree import DebianTree
from xsbuild import xen_abi as abi
from xsbuild.sandbox.loader import IMAGE_BASE, read_image_symbols
from xsbuild.sandbox.runner import Call, ChildFailed, load_and_apply, run_child

# Checks against Debian's real tree: slow, because the first run on a machine builds it.
needs_tree = pytest.mark.slow


# ----------------------------------------------------------------------------------------------
# Toolchain: flags and entry sizes

@needs_tree
def test_toolchain_flags_match_debian_tree(debian_tree: DebianTree) -> None:
    """The frozen flag list is exactly what the tree's .o.cmd says, minus tree paths."""
    reference = debian_tree.xen_dir / "common" / ".version.o.cmd"
    assert flags_from_cmd(reference.read_text()) == XEN_CFLAGS


def _entry_size(obj: Path, section: str, relocs_per_entry: int) -> int:
    """Entry size from real readelf: section bytes per group of relocations."""
    size = section_sizes(obj)[section]
    count = len(relocation_offsets(obj, section))
    assert count and count % relocs_per_entry == 0, (obj, section, count)
    return size * relocs_per_entry // count


SPECIAL_SOURCE = """\
#include "xen.h"
int noinline probe(int *p);
int noinline probe(int *p)
{
    int v, rc;
    BUG_ON(p == NULL);
    rc = get_unsafe_int(v, p);
    alternative("lfence", "nop; nop; nop", X86_FEATURE_LFENCE_DISPATCH);
    WARN_ON(v == 54321);
    return rc ? rc : v;
}
"""

# (section, relocations per entry, entry size in xen_abi)
SPECIAL_ENTRIES = [(abi.SEC_ALTINSTRUCTIONS, 2, abi.ALT_INSTR_SIZE),
                   (abi.SEC_EX_TABLE, 2, abi.EX_TABLE_ENTRY_SIZE),
                   (".bug_frames.1", 2, abi.BUG_FRAME_SIZE),
                   (".bug_frames.2", 2, abi.BUG_FRAME_SIZE)]


def _debian_object_with(tree: DebianTree, section: str) -> Path:
    for rel in ("arch/x86/traps.o", "arch/x86/mm.o", "common/page_alloc.o", "common/domain.o",
                "arch/x86/domain.o", "common/sched/core.o"):
        obj = tree.xen_dir / rel
        if obj.exists() and section in section_sizes(obj):
            return obj
    raise AssertionError(f"no object of the Debian tree has {section}")


@needs_tree
@pytest.mark.parametrize(("section", "per_entry", "expected"), SPECIAL_ENTRIES)
def test_special_entry_sizes_match_debian(toolchain: Toolchain, debian_tree: DebianTree,
                                          section: str, per_entry: int, expected: int) -> None:
    """The fixture macros emit entries of the same size as Xen's own (spec §1.4)."""
    ours = toolchain.compile_source(SPECIAL_SOURCE, "common/special.c")
    theirs = _debian_object_with(debian_tree, section)
    assert _entry_size(ours, section, per_entry) == _entry_size(theirs, section, per_entry)
    assert _entry_size(ours, section, per_entry) == expected


def test_assert_frames_carry_a_message_frame(toolchain: Toolchain) -> None:
    """ASSERT frames are 16 bytes: the second frame points at the message (spec §1.4)."""
    text = ('#include "xen.h"\nint f(int x);\nint f(int x)\n{\n'
            "    ASSERT(x != 3);\n    return x;\n}\n")
    obj = toolchain.compile_source(text, "common/assert.c")
    assert section_sizes(obj)[".bug_frames.3"] == 2 * abi.BUG_FRAME_SIZE
    assert len(relocation_offsets(obj, ".bug_frames.3")) == 3


def test_stt_file_symbol_is_renamed(toolchain: Toolchain) -> None:
    """objcopy --redefine-sym gives the STT_FILE symbol the tree-relative path (spec §7)."""
    obj = toolchain.compile_source("int g(void);\nint g(void)\n{\n    return 1;\n}\n",
                                   "arch/x86/thing.c")
    files = [ln.split()[-1] for ln in readelf("-s", obj).splitlines() if " FILE " in ln]
    assert files == ["arch/x86/thing.c"]


def test_cf_check_function_starts_with_endbr(hypervisor: Image) -> None:
    """-fcf-protection=branch -mmanual-endbr: only cf_check functions get ENDBR64."""
    syms = read_image_symbols(hypervisor.path)
    data = hypervisor.path.read_bytes()
    text = _section_file_offset(hypervisor.path, ".text")

    def first4(name: str) -> bytes:
        off = syms[name].value - text[0] + text[1]
        return data[off:off + 4]

    assert first4("xen_indirect_target") == abi.ENDBR64
    assert first4("xen_extra_version") != abi.ENDBR64


def _section_file_offset(path: Path, name: str) -> tuple[int, int]:
    for line in readelf("-S", path).splitlines():
        parts = line.replace("[ ", "[").split()
        if len(parts) > 5 and parts[1] == name:
            return int(parts[3], 16), int(parts[4], 16)
    raise AssertionError(f"{name} not in {path}")


# ----------------------------------------------------------------------------------------------
# Symbol naming

def test_image_names_statics_by_file(hypervisor: Image) -> None:
    syms = read_image_symbols(hypervisor.path)
    assert f"{HYPERVISOR_NAME}#scale" in syms and "scale" not in syms
    assert "xen_extra_version" in syms and f"{HYPERVISOR_NAME}#xen_extra_version" not in syms
    assert read_build_id(hypervisor.path) == hypervisor.build_id


def test_hypervisor_at_xen_addresses(toolchain: Toolchain, hypervisor: Image,
                                     tmp_path: Path) -> None:
    """The read-only variant at Xen's link address has the same table, shifted by one offset."""
    xen = build_hypervisor(toolchain, tmp_path / "xen-syms", base=XEN_LINK_BASE)
    ours, theirs = read_image_symbols(hypervisor.path), read_image_symbols(xen.path)
    assert set(ours) == set(theirs)
    assert {theirs[n].value - ours[n].value for n in ours} == {XEN_LINK_BASE - IMAGE_BASE}
    assert all(theirs[n].size == ours[n].size for n in ours)


@needs_tree
def test_symbol_naming_matches_debian_map(debian_tree: DebianTree) -> None:
    """Our reading of STT_FILE order gives the names of Debian's own xen-syms map (spec §7)."""
    xen_syms = debian_tree.debian_xen_syms
    mapfile = xen_syms.with_name(xen_syms.name + ".map")
    assert mapfile.is_file(), "the -dbg package ships xen-syms-4.17-amd64.map beside xen-syms"
    ours = read_image_symbols(xen_syms)
    theirs = {}
    for line in mapfile.read_text().splitlines():
        addr, _kind, name = line.split(maxsplit=2)
        theirs.setdefault(name, int(addr, 16))
    common = set(ours) & set(theirs)
    assert len(common) > 0.9 * len(theirs)
    assert "common/version.c#build_info" in common
    assert all(ours[n].value == theirs[n] for n in common)


# ----------------------------------------------------------------------------------------------
# The loader with hand-made payloads

CALLS = [Call("xen_extra_version", (), "str"), Call("xen_scaled", (2,)),
         Call("xen_call_indirect", (1,)), Call("xen_nop_target", (5,))]


def _payload(toolchain: Toolchain, hv: Image, tmp_path: Path, spec: PayloadSpec) -> Path:
    return build_payload(toolchain, hv, spec, tmp_path / f"{spec.name}.livepatch")


def _run(hv: Image, payload: Path, calls: list[Call] = CALLS) -> dict:
    return load_and_apply(hv.path, payload, calls)


def test_hello_world_applies_and_reverts(toolchain: Toolchain, hypervisor: Image,
                                         tmp_path: Path) -> None:
    answer = _run(hypervisor, _payload(toolchain, hypervisor, tmp_path, PayloadSpec("hello")))
    assert answer["error"] is None
    before, _load, patched_at, applied, _rev, reverted, _unload = answer["results"]
    assert before[0] == "-orig" and applied[0] == "Hello World" and reverted == before
    assert applied[1:] == before[1:]  # nothing else changed
    assert [off for _addr, off in patched_at] == [0]


def test_readelf_and_ld_accept_handmade_payload(toolchain: Toolchain, hypervisor: Image,
                                                tmp_path: Path) -> None:
    payload = _payload(toolchain, hypervisor, tmp_path, PayloadSpec("hello"))
    readelf("-SrsW", payload)  # raises on any warning
    subprocess.run(["ld", "-r", "-o", str(tmp_path / "relinked.o"), str(payload)], check=True)


STATIC_SOURCE = """\
#include "xen.h"
int lp_scale(int x);
int lp_scale(int x)
{
    return x * 7;
}
"""


@pytest.mark.parametrize("mode", ["reloc", "zero", "absolute"])
def test_static_function_by_xen_name(toolchain: Toolchain, hypervisor: Image, tmp_path: Path,
                                     mode: str) -> None:
    """A static is patched through ``path#name``, however old_addr is given (spec §1.5, §7)."""
    spec = PayloadSpec(f"static_{mode}", source=STATIC_SOURCE, funcs=[
        FuncEntry(f"{HYPERVISOR_NAME}#scale", "lp_scale", old_addr=mode)])
    answer = _run(hypervisor, _payload(toolchain, hypervisor, tmp_path, spec))
    assert answer["error"] is None, answer
    before, applied, reverted = answer["results"][0], answer["results"][3], answer["results"][5]
    assert (before[1], applied[1], reverted[1]) == (2 * 3 + 42, 2 * 7 + 42, 2 * 3 + 42)


ENDBR_SOURCE = """\
#include "xen.h"
int cf_check lp_indirect_target(int x);
int cf_check lp_indirect_target(int x)
{
    return x - 100;
}
"""


def test_endbr_function_is_patched_after_endbr(toolchain: Toolchain, hypervisor: Image,
                                              tmp_path: Path) -> None:
    spec = PayloadSpec("endbr", source=ENDBR_SOURCE,
                       funcs=[FuncEntry("xen_indirect_target", "lp_indirect_target")])
    answer = _run(hypervisor, _payload(toolchain, hypervisor, tmp_path, spec))
    assert answer["error"] is None, answer
    assert [off for _a, off in answer["results"][2]] == [abi.ENDBR64_LEN]
    assert (answer["results"][0][2], answer["results"][3][2]) == (101, -99)


def test_nop_entry_and_revert(toolchain: Toolchain, hypervisor: Image, tmp_path: Path) -> None:
    """NOP 6 bytes (the leading addl) of xen_nop_target; revert restores them."""
    spec = PayloadSpec("nop", funcs=[FuncEntry("xen_nop_target", None, new_size=6)])
    answer = _run(hypervisor, _payload(toolchain, hypervisor, tmp_path, spec))
    assert answer["error"] is None, answer
    results = answer["results"]
    assert (results[0][3], results[3][3], results[5][3]) == (1005, 5, 1005)


HOOK_SOURCE = """\
#include "xen.h"
int xen_count_calls(void);
void lp_load_hook(void);
void lp_unload_hook(void);
int lp_preapply_veto(const struct payload *p);
void lp_load_hook(void)
{
    xen_count_calls();
    xen_count_calls();
}
void lp_unload_hook(void)
{
    xen_count_calls();
}
int lp_preapply_veto(const struct payload *p)
{
    return -1;
}
""" + "const char *livepatch_xen_extra_version(void);\n" \
      "const char *livepatch_xen_extra_version(void)\n{\n    return \"hooked\";\n}\n"


def test_hooks_run_at_apply_revert_and_preapply_vetoes(toolchain: Toolchain, hypervisor: Image,
                                            tmp_path: Path) -> None:
    calls = [Call("xen_count_calls"), Call("xen_extra_version", (), "str")]
    spec = PayloadSpec("hooks", source=HOOK_SOURCE,
                       hooks={"load": ["lp_load_hook"], "unload": ["lp_unload_hook"]})
    answer = _run(hypervisor, _payload(toolchain, hypervisor, tmp_path, spec), calls)
    assert answer["error"] is None, answer
    assert answer["results"][3] == [4, "hooked"]  # 1 before, 2 from the load hook at APPLY, 4
    assert answer["results"][5] == [6, "-orig"]  # 1 from the unload hook at REVERT, then 6
    veto = replace(spec, name="veto", hooks={"preapply": ["lp_preapply_veto"]})
    answer = _run(hypervisor, _payload(toolchain, hypervisor, tmp_path, veto), calls)
    assert answer["error"]["name"] == "EPERM" and answer["error"]["op"] == 2


REFUSALS = [
    ("unresolved", {"unresolved": "xen_no_such_function"}, "ENOENT", "xen_no_such_function"),
    ("bad_reloc", {"bad_reloc": True}, "EOPNOTSUPP", "R_X86_64_32"),
    ("wx", {"wx_section": True}, "EOPNOTSUPP", "writable and executable"),
    ("no_xen_depends", {"omit": {abi.SEC_XEN_DEPENDS}}, "EINVAL", "xen_depends"),
    ("no_depends", {"omit": {abi.SEC_DEPENDS}}, "EINVAL", "livepatch.depends"),
    ("no_build_id", {"omit": {abi.SEC_BUILD_ID}}, "EINVAL", "build-id"),
    ("wrong_xen_id", {"xen_depends": build_id_note(bytes(20))}, "EINVAL", "hypervisor build-id"),
    ("bad_note_type", {"xen_depends": build_id_note(b"\1" * 20, note_type=4)}, "EINVAL",
     "not a GNU build-id"),
    ("version1", {"funcs": [FuncEntry("xen_extra_version", "livepatch_xen_extra_version",
                                      version=1)]}, "EOPNOTSUPP", "version 1"),
    ("old_size0", {"funcs": [FuncEntry("xen_extra_version", "livepatch_xen_extra_version",
                                       old_size=0)]}, "EINVAL", "old_size is 0"),
    ("old_size4", {"funcs": [FuncEntry("xen_extra_version", "livepatch_xen_extra_version",
                                       old_size=4)]}, "EINVAL", "old_size 4"),
    ("endbr_old_size8", {"funcs": [FuncEntry("xen_indirect_target",
                                             "livepatch_xen_extra_version", old_size=8)]},
     "EINVAL", "old_size 8 < 9"),
    ("nop_too_big", {"funcs": [FuncEntry("xen_nop_target", None, new_size=32,
                                         old_size=40)]}, "EOPNOTSUPP", "NOP of 32"),
    ("by_unknown_name", {"funcs": [FuncEntry("xen_extra_version", "livepatch_xen_extra_version",
                                             old_addr="zero", name="version.c#nope")]},
     "ENOENT", "Could not resolve"),
    ("no_funcs_no_hooks", {"funcs": []}, "EINVAL", "Nothing to patch"),
    ("duplicate_symbol", {"extra_sources": {
        "livepatch/dup.c": "int xen_scaled(int x);\nint xen_scaled(int x)\n{\n    return x;\n}\n"}},
     "EEXIST", "duplicate new symbol: xen_scaled"),
]


@pytest.mark.parametrize(("name", "changes", "errno_name", "message"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_loader_refuses(toolchain: Toolchain, hypervisor: Image, tmp_path: Path, name: str,
                        changes: dict, errno_name: str, message: str) -> None:
    """Each deliberately broken payload is refused at load with Xen's errno (spec §1, §2)."""
    payload = _payload(toolchain, hypervisor, tmp_path, PayloadSpec(name, **changes))
    answer = _run(hypervisor, payload)
    assert answer["error"] is not None, f"{name} was accepted"
    assert (answer["error"]["name"], answer["error"]["op"]) == (errno_name, 1), answer["error"]
    assert message in answer["error"]["message"]


def test_readonly_funcs_section_still_loads(toolchain: Toolchain, hypervisor: Image,
                                            tmp_path: Path) -> None:
    """4.19's in-tree tests make .livepatch.funcs read-only; 4.17.3+ loads that fine."""
    spec = PayloadSpec("ro_funcs", funcs_flags="alloc,readonly")
    payload = _payload(toolchain, hypervisor, tmp_path, spec)
    assert " WA " not in next(ln for ln in readelf("-S", payload).splitlines()
                              if abi.SEC_FUNCS in ln and ".rela" not in ln)
    assert _run(hypervisor, payload)["error"] is None


# ----------------------------------------------------------------------------------------------
# Child failures are test failures, never hangs

def test_crash_in_patched_code_is_reported(toolchain: Toolchain, hypervisor: Image,
                                           tmp_path: Path) -> None:
    source = ('#include "xen.h"\nconst char *crash(void);\nconst char *crash(void)\n{\n'
              "    const char **volatile bad = (const char **)8;\n\n    return *bad;\n}\n")
    spec = PayloadSpec("crash", source=source, funcs=[FuncEntry("xen_extra_version", "crash")])
    with pytest.raises(ChildFailed, match=r"(?s)signal.*Segmentation fault"):
        _run(hypervisor, _payload(toolchain, hypervisor, tmp_path, spec))


def test_hang_in_patched_code_times_out(toolchain: Toolchain, hypervisor: Image,
                                        tmp_path: Path) -> None:
    source = ('#include "xen.h"\nint spin(void);\nint spin(void)\n{\n'
              "    for ( ;; )\n        asm volatile ( \"\" );\n}\n")
    spec = PayloadSpec("spin", source=source, funcs=[FuncEntry("xen_minor_version", "spin")])
    payload = _payload(toolchain, hypervisor, tmp_path, spec)
    ops = [{"op": "load", "payload": str(payload)}, {"op": "apply"},
           {"op": "calls", "calls": [{"fn": "xen_minor_version"}]}]
    with pytest.raises(ChildFailed, match="hung"):
        run_child({"image": str(hypervisor.path), "ops": ops}, timeout=3)

