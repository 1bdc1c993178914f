"""xen_abi's tables: relocation numbers against glibc's elf.h, the PC-relative flag against what
gas emits for ``sym - .`` and absolute fields, and the struct layouts' derived offsets."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import pytest

from tests.support.toolchain import run
from xsbuild import xen_abi
from xsbuild.elf import read_elf

ELF_H = Path("/usr/include/elf.h")


def test_relocation_numbers_match_elf_h() -> None:
    if not ELF_H.exists():
        pytest.skip("no /usr/include/elf.h")
    defined = {m.group(1): int(m.group(2)) for m in
               re.finditer(r"#define\s+(R_X86_64_\w+)\s+(\d+)", ELF_H.read_text())}
    for kind in xen_abi.RELOC_KINDS.values():
        assert defined[kind.name] == kind.type, kind.name


def test_pc_relative_flag_matches_what_gas_emits(tmp_path: Path) -> None:
    if shutil.which("as") is None:
        pytest.skip("binutils' as is not installed")
    src = tmp_path / "r.s"
    src.write_text(".text\n.globl f\nf: ret\nmovq f@GOTPCREL(%rip), %rax\ncall f@PLT\n"
                   ".data\n.long f - .\n.quad f - .\n.quad f\n.long f\n")
    run(["as", "--64", "-o", str(tmp_path / "r.o"), str(src)])
    elf = read_elf(tmp_path / "r.o")
    pc = {r.type for s in elf.sections for r in s.relocs if r.sym.name == "f"}
    relative = {t for t in pc if xen_abi.RELOC_KINDS[t].name.endswith(
        ("PC32", "PC64", "PLT32", "GOTPCRELX", "GOTPCREL"))}
    assert relative and all(xen_abi.is_pc_relative(t) for t in relative)
    assert not any(xen_abi.is_pc_relative(t) for t in pc - relative)
    assert pc - relative == {xen_abi.R_X86_64_64, 10}  # R_X86_64_64 and R_X86_64_32


def test_accepted_types_are_the_loaders() -> None:
    assert {0, 1, 2, 4} == xen_abi.ACCEPTED_RELOC_TYPES
    assert xen_abi.reloc_width(xen_abi.R_X86_64_64) == 8
    assert xen_abi.reloc_width(12345) == xen_abi.DEFAULT_RELOC_WIDTH


@pytest.mark.parametrize("layout", [xen_abi.ALT_INSTR, xen_abi.EX_TABLE_ENTRY, xen_abi.BUG_FRAME,
                                    xen_abi.ASSERT_FRAME, xen_abi.LIVEPATCH_FUNC])
def test_layout_offsets_are_prefix_sizes(layout: xen_abi.Layout) -> None:
    codes = [code for _f, code in layout.fields]
    for i, (name, _code) in enumerate(layout.fields):
        assert layout.offset(name) == struct.calcsize("<" + "".join(codes[:i]))
    values = {name: (b"\1" * struct.calcsize("<" + code) if code.endswith("s") else 1)
              for name, code in layout.fields}
    entry = layout.unpack(layout.pack(**values))
    assert entry._asdict() == values


def test_layout_sizes_of_the_spec() -> None:
    assert (xen_abi.ALT_INSTR.size, xen_abi.EX_TABLE_ENTRY.size, xen_abi.BUG_FRAME.size,
            xen_abi.LIVEPATCH_FUNC.size) == (14, 8, 8, 104)
    assert xen_abi.ALT_INSTR.offset("repl_len") == 11
    assert xen_abi.ASSERT_FRAME.offset("msg_disp") == 12
    assert xen_abi.special_entry_size(xen_abi.BUG_FRAME_ASSERT) == 16
