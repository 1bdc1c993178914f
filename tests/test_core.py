"""The core compiler's own contracts: the ELF model against binutils, xen-syms naming, the
offline checker against each loader rule it mirrors, and bad input.

Objects are real gcc output compiled with Xen 4.17's flags (tests/support/toolchain.py); the
"hypervisor" is a fixture image linked by real ld (tests/support/image.py).
"""

from __future__ import annotations

import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.image import Image, build_image
from tests.support.toolchain import Toolchain
from xsbuild import xen_abi
from xsbuild.check import check_payload
from xsbuild.diff import diff_files
from xsbuild.elf import elf_bytes, read_elf
from xsbuild.errors import ElfParseError, InputMismatchError
from xsbuild.linker import link_files
from xsbuild.xensyms import XenSymbols

UNIT = "common/counter.c"
ORIG = r"""
#include "compiler.h"
static int calls;
static const char *const names[] = { "zero", "one", "two" };
int global_total = 3;

static noinline int scale(int x) { return x * 3; }

int counter_step(int x)
{
    calls++;
    return scale(x) + calls;
}

const char *counter_name(int i)
{
    return (i >= 0 && i < 3) ? names[i] : "many";
}

int counter_calls(void) { return calls; }
"""
PATCHED = ORIG.replace('"many"', '"lots"').replace("return scale(x) + calls;",
                                                  "return scale(x) + calls + 100;")


@dataclass
class Built:
    orig: Path
    patched: Path
    image: Image
    payload: Path


@pytest.fixture(scope="module")
def built(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Built:
    work = tmp_path_factory.mktemp("core")
    orig = toolchain.compile_source(ORIG, UNIT)
    patched = toolchain.compile_source(PATCHED, UNIT)
    image = build_image(toolchain, {UNIT: ORIG}, work / "xen-syms")
    diff_files(orig, patched, work / "counter.o")
    link_files([work / "counter.o"], work / "fix.livepatch", xen_syms=image.path)
    return Built(orig, patched, image, work / "fix.livepatch")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------
# ELF model


def test_roundtrip_disassembly_and_relocations_match_objdump(built: Built, tmp_path: Path):
    """Reading then writing an object keeps every instruction and relocation (objdump -dr)."""
    out = tmp_path / "copy.o"
    out.write_bytes(elf_bytes(read_elf(built.patched)))

    def dump(p: Path) -> list[str]:
        text = subprocess.run(["objdump", "-dr", str(p)], capture_output=True, text=True,
                              check=True)
        assert not text.stderr, text.stderr
        return text.stdout.splitlines()[2:]
    assert dump(out) == dump(built.patched)
    subprocess.run(["ld", "-r", "-o", str(tmp_path / "relinked.o"), str(out)], check=True)


def test_payload_is_accepted_by_binutils(built: Built, tmp_path: Path):
    proc = subprocess.run(["readelf", "-SsrnW", str(built.payload)], capture_output=True,
                          text=True, check=True)
    assert "warning" not in proc.stderr.lower() and not proc.stderr
    assert ".livepatch.funcs" in proc.stdout and "Build ID" in proc.stdout
    subprocess.run(["ld", "-r", "-o", str(tmp_path / "p.o"), str(built.payload)], check=True)


# --------------------------------------------------------------------------------------------
# xen-syms naming (spec §7)


def test_xensyms_names_statics_by_file(built: Built):
    xs = XenSymbols.load(built.image.path)
    nm = subprocess.run(["nm", str(built.image.path)], capture_output=True, text=True,
                        check=True).stdout
    # Every function nm lists is in the table: globals plain, locals as path#name.
    for line in nm.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tT" and not parts[2].startswith("."):
            name = parts[2] if parts[1] == "T" else None
            if name:
                assert name in xs, name
    assert f"{UNIT}#calls" in xs and "calls" not in xs
    assert f"{UNIT}#scale" in xs or any(n.startswith(f"{UNIT}#scale.") for n in xs.by_name)
    assert xs.build_id.hex() == built.image.build_id


# --------------------------------------------------------------------------------------------
# the diff result on a small real change


def test_diff_reports_reasons_and_keeps_state_outside(built: Built, tmp_path: Path):
    result = diff_files(built.orig, built.patched, tmp_path / "o.o")
    changed = {u.name: u.reason for u in result.changed_functions}
    assert set(changed) == {"counter_step", "counter_name"}
    assert "lots" in changed["counter_name"] and "many" in changed["counter_name"]
    assert changed["counter_step"].startswith("code differs")
    out = read_elf(tmp_path / "o.o")
    undefined = {s.name for s in out.symbols if s.is_undefined and s.name}
    # The unchanged static state and helper stay in the hypervisor, referenced by Xen name.
    assert f"{UNIT}#calls" in undefined
    assert any(n.startswith(f"{UNIT}#scale") for n in undefined)
    # Only the referenced string literal travels, by content.
    strings = b"".join(s.data for s in out.sections if s.name.startswith(".rodata.str"))
    assert b"lots\0" in strings and b"zero" not in strings


def test_self_diff_reports_no_change(built: Built):
    proc = run_cli("diff", built.orig, built.orig, "--json")
    assert proc.returncode == 3, proc.stderr
    assert '"status": "no-change"' in proc.stdout


# --------------------------------------------------------------------------------------------
# check: one mutation per loader rule; each must give Xen's error code


def _shdrs(data: bytes) -> list[tuple[int, str, int]]:
    """(header offset, name, sh_flags offset) of every section."""
    shoff, = struct.unpack_from("<Q", data, 40)
    shnum, shstrndx = struct.unpack_from("<HH", data, 60)
    str_off = struct.unpack_from("<Q", data, shoff + shstrndx * 64 + 24)[0]
    out = []
    for i in range(shnum):
        h = shoff + i * 64
        name_off = struct.unpack_from("<I", data, h)[0]
        end = data.index(b"\0", str_off + name_off)
        out.append((h, data[str_off + name_off:end].decode(), h + 8))
    return out


def _section_header(data: bytes, name: str) -> int:
    return next(h for h, n, _ in _shdrs(data) if n == name)


def _rename_section(data: bytearray, name: str, new: str) -> None:
    assert len(new) == len(name)
    shoff, = struct.unpack_from("<Q", data, 40)
    shstrndx, = struct.unpack_from("<H", data, 62)
    str_off = struct.unpack_from("<Q", data, shoff + shstrndx * 64 + 24)[0]
    h = _section_header(data, name)
    name_off = struct.unpack_from("<I", data, h)[0]
    data[str_off + name_off:str_off + name_off + len(name)] = new.encode()


def _funcs_body_offset(data: bytes) -> int:
    h = _section_header(data, xen_abi.SEC_FUNCS)
    return struct.unpack_from("<Q", data, h + 24)[0]


def _mutations() -> dict[str, tuple[object, int]]:
    def osabi_gnu(d: bytearray) -> None:
        d[7] = 3

    def not_rel(d: bytearray) -> None:
        struct.pack_into("<H", d, 16, 2)

    def no_depends(d: bytearray) -> None:
        _rename_section(d, xen_abi.SEC_DEPENDS, ".livepatch.dependx")

    def version_1(d: bytearray) -> None:
        d[_funcs_body_offset(d) + xen_abi.FUNC_OFF_VERSION] = 1

    def old_size_0(d: bytearray) -> None:
        struct.pack_into("<I", d, _funcs_body_offset(d) + xen_abi.FUNC_OFF_OLD_SIZE, 0)

    def old_size_4(d: bytearray) -> None:
        struct.pack_into("<I", d, _funcs_body_offset(d) + xen_abi.FUNC_OFF_OLD_SIZE, 4)

    def write_exec(d: bytearray) -> None:
        h = next(h for h, n, _ in _shdrs(d) if n.startswith(".text."))
        flags, = struct.unpack_from("<Q", d, h + 8)
        struct.pack_into("<Q", d, h + 8, flags | 1)

    def abs32_reloc(d: bytearray) -> None:
        h = next(h for h, n, _ in _shdrs(d) if n.startswith(".rela.text."))
        off, = struct.unpack_from("<Q", d, h + 24)
        info, = struct.unpack_from("<Q", d, off + 8)
        struct.pack_into("<Q", d, off + 8, (info & ~0xFFFFFFFF) | 11)  # R_X86_64_32S

    def offset_zero(d: bytearray) -> None:
        h = _section_header(d, xen_abi.SEC_MODINFO)
        struct.pack_into("<Q", d, h + 24, 0)

    def two_symtabs(d: bytearray) -> None:
        h = _section_header(d, ".strtab")
        struct.pack_into("<I", d, h + 4, 2)  # SHT_SYMTAB

    def modinfo_no_nul(d: bytearray) -> None:
        h = _section_header(d, xen_abi.SEC_MODINFO)
        off, size = struct.unpack_from("<QQ", d, h + 24)
        d[off + size - 1] = ord("x")

    def unknown_symbol(d: bytearray) -> None:
        i = d.index(b"__x86_return_thunk\0")
        d[i:i + 4] = b"XX86"

    def truncated(d: bytearray) -> None:
        del d[len(d) // 2:]

    def too_many_sections(d: bytearray) -> None:
        struct.pack_into("<H", d, 60, 1100)

    return {
        "osabi_gnu": (osabi_gnu, xen_abi.EOPNOTSUPP),
        "not_relocatable": (not_rel, xen_abi.EOPNOTSUPP),
        "missing_depends": (no_depends, xen_abi.EINVAL),
        "funcs_version_1": (version_1, xen_abi.EOPNOTSUPP),
        "old_size_0": (old_size_0, xen_abi.EINVAL),
        "old_size_too_small": (old_size_4, xen_abi.EINVAL),
        "write_and_exec": (write_exec, xen_abi.EOPNOTSUPP),
        "unsupported_reloc": (abs32_reloc, xen_abi.EOPNOTSUPP),
        "section_offset_zero": (offset_zero, xen_abi.EINVAL),
        "two_symbol_tables": (two_symtabs, xen_abi.EOPNOTSUPP),
        "modinfo_without_nul": (modinfo_no_nul, xen_abi.EINVAL),
        "unknown_symbol": (unknown_symbol, xen_abi.ENOENT),
        "truncated": (truncated, xen_abi.EINVAL),
        "too_many_sections": (too_many_sections, xen_abi.EOPNOTSUPP),
    }


def test_valid_payload_passes_check(built: Built):
    report = check_payload(built.payload.read_bytes(), XenSymbols.load(built.image.path))
    assert report.ok, report.problems
    assert report.info is not None and len(report.info.funcs) == 2
    assert report.info.xen_depends.hex() == built.image.build_id


@pytest.mark.parametrize("case", sorted(_mutations()))
def test_check_gives_xens_error_code(built: Built, case: str, tmp_path: Path):
    mutate, errno = _mutations()[case]
    data = bytearray(built.payload.read_bytes())
    mutate(data)  # type: ignore[operator]
    report = check_payload(bytes(data), XenSymbols.load(built.image.path))
    assert not report.ok
    assert errno in {p.errno for p in report.problems}, report.problems
    bad = tmp_path / "bad.livepatch"
    bad.write_bytes(bytes(data))
    proc = run_cli("check", bad, "--xen-syms", built.image.path)
    assert "Traceback" not in proc.stderr
    if case == "truncated":  # the CLI's rule for every command: a truncated file is bad input
        assert proc.returncode == 2 and "truncated" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 1 and f"-{xen_abi.errno_name(errno)}" in proc.stdout


def test_wrong_hypervisor_is_rejected(built: Built, toolchain: Toolchain, tmp_path: Path):
    other = build_image(toolchain, {UNIT: ORIG + "\nint extra_symbol;\n"}, tmp_path / "other")
    report = check_payload(built.payload.read_bytes(), XenSymbols.load(other.path))
    assert any(p.errno == xen_abi.EINVAL and "build-id" in p.message for p in report.problems)


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def _bad_inputs(built: Built, toolchain: Toolchain, tmp: Path) -> dict[str, tuple[Path, Path]]:
    text = tmp / "notelf.o"
    text.write_text("hello\n")
    trunc = tmp / "trunc.o"
    trunc.write_bytes(built.orig.read_bytes()[:200])
    machine = tmp / "machine.o"
    data = bytearray(built.orig.read_bytes())
    struct.pack_into("<H", data, 18, 3)  # EM_386
    machine.write_bytes(bytes(data))
    other_tu = toolchain.compile_source(ORIG, "common/other.c")
    stripped = tmp / "stripped.o"
    subprocess.run(["strip", "--strip-all", "-o", str(stripped), str(built.orig)], check=True)
    unsplit = toolchain.compile_source(ORIG, UNIT, extra=("-fno-function-sections",
                                                          "-fno-data-sections"))
    return {"not_elf": (text, built.patched), "truncated": (trunc, built.patched),
            "wrong_machine": (machine, built.patched), "different_units": (other_tu, built.patched),
            "stripped": (stripped, built.patched), "no_split_sections": (unsplit, unsplit)}


@pytest.mark.parametrize("case", ["not_elf", "truncated", "wrong_machine", "different_units",
                                  "stripped", "no_split_sections"])
def test_bad_input_is_one_line_exit_2_and_no_output(built: Built, toolchain: Toolchain,
                                                    tmp_path: Path, case: str):
    orig, patched = _bad_inputs(built, toolchain, tmp_path)[case]
    out = tmp_path / "out.o"
    proc = run_cli("diff", orig, patched, "-o", out)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xsbuild: error:"), proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.o.*"))


def test_library_errors_are_typed(built: Built, toolchain: Toolchain, tmp_path: Path):
    bad = _bad_inputs(built, toolchain, tmp_path)
    with pytest.raises(ElfParseError):
        read_elf(bad["not_elf"][0])
    with pytest.raises(InputMismatchError):
        diff_files(*bad["different_units"])


def test_link_refuses_unknown_symbol_and_writes_nothing(built: Built, toolchain: Toolchain,
                                                        tmp_path: Path):
    """A diff object needing a symbol the hypervisor lacks: exit 1, no payload file."""
    other = build_image(toolchain, {"common/unrelated.c": "int unrelated(void) { return 1; }\n"},
                        tmp_path / "unrelated-syms")
    diff_files(built.orig, built.patched, tmp_path / "d.o")
    out = tmp_path / "x.livepatch"
    proc = run_cli("link", tmp_path / "d.o", "-o", out, "--xen-syms", other.path)
    assert proc.returncode == 1 and "not in" in proc.stderr
    assert not out.exists()
