"""disasm: which operand a relocation is comes from capstone's detail mode (displacement or
immediate field), on code gas assembled."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.toolchain import run
from xsbuild.disasm import disassemble_relocatable
from xsbuild.elf import read_elf

ASM = """\
.text
.globl f
.type f, @function
f:
    movl $imm_sym, var(%rip)
    call helper
    leaq str(%rip), %rdi
    movq $abs_sym, %rax
    ret
.size f, . - f
"""


def test_each_relocated_field_is_named_where_it_shows(tmp_path: Path) -> None:
    if shutil.which("as") is None:
        pytest.skip("binutils' as is not installed")
    (tmp_path / "d.s").write_text(ASM)
    run(["as", "--64", "-o", str(tmp_path / "d.o"), str(tmp_path / "d.s")])
    elf = read_elf(tmp_path / "d.o")
    f = next(s for s in elf.symbols if s.name == "f")
    assert f.sec is not None
    texts = [i.text for i in disassemble_relocatable(f.sec, f.value, f.size)]
    assert texts[0] == "mov dword ptr [rip + <var>], <imm_sym>"  # displacement and immediate
    assert texts[1] == "call <helper>"
    assert texts[2] == "lea rdi, [rip + <str>]"
    assert texts[3] == "mov rax, <abs_sym>"
