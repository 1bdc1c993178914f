"""disasm: which operand a relocation is comes from capstone's detail mode (displacement or
immediate field), on code gas assembled."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.toolchain import run
from xsbuild.disasm import disassemble_linked, disassemble_relocatable
from xsbuild.elf import read_elf
from xsbuild.xensyms import XenSymbols


def texts_of(tmp_path: Path, source: str, func: str) -> list[str]:
    """The disassembly texts of ``func`` in ``source``, assembled by gas."""
    if shutil.which("as") is None:
        pytest.skip("binutils' as is not installed")
    (tmp_path / "t.s").write_text(source)
    run(["as", "--64", "-o", str(tmp_path / "t.o"), str(tmp_path / "t.s")])
    elf = read_elf(tmp_path / "t.o")
    sym = next(s for s in elf.symbols if s.name == func)
    assert sym.sec is not None
    return [i.text for i in disassemble_relocatable(sym.sec, sym.value, sym.size)]

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
    texts = texts_of(tmp_path, ASM, "f")
    assert texts[0] == "mov dword ptr [rip + <var>], <imm_sym>"  # displacement and immediate
    assert texts[1] == "call <helper>"
    assert texts[2] == "lea rdi, [rip + <str>]"
    assert texts[3] == "mov rax, <abs_sym>"


# Each line's field layout is what makes it a test: the same bytes (0) stand in the displacement
# and in the immediate, so only the decoder's field positions tell which operand a relocation is.
CASES = """\
.text
.globl g
.type g, @function
g:
    movl $imm_sym, 0(%rip)
    movl $0, var(%rip)
    movl $0, 0(%rip)
    cmpb $imm8_sym, var(%rip)
    call helper
    jmp 1f
1:  notrack jmp *%rax
    notrack jmp *table(%rip)
    xbegin abort_sym
    loop 1b
    leaq -16(%rip), %rdi
    ret
.size g, . - g
"""


def test_operands_are_named_by_field_position_not_by_text(tmp_path: Path) -> None:
    texts = texts_of(tmp_path, CASES, "g")
    assert texts == [
        "mov dword ptr [rip], <imm_sym>",  # the immediate relocated, the displacement not
        "mov dword ptr [rip + <var>], 0",  # the displacement relocated, the immediate not
        "mov dword ptr [rip], 0",  # nothing relocated: capstone's text as it is
        "cmp byte ptr [rip + <var>], <imm8_sym>",  # the immediate after the displacement
        "call <helper>",
        "jmp <g+0x2c>",  # a jmp rel8 inside the section, named after its function
        "notrack jmp rax",
        "notrack jmp qword ptr ds:[rip + <table>]",
        "xbegin <abort_sym>",  # a relative branch with its field after a 2-byte opcode
        "loop <g+0x2c>",  # in capstone's relative-branch group only
        "lea rdi, [rip - 0x10]",  # an unrelocated negative displacement is left as printed
        "ret",
    ]


STRINGS = """\
.section .rodata.str1.1,"aMS",@progbits,1
.LC0: .string "a\\\\b\\n"
.text
.globl h
.type h, @function
h:
    leaq .LC0(%rip), %rdi
    ret
.size h, . - h
"""


def test_a_literal_label_keeps_its_escapes(tmp_path: Path) -> None:
    """The label goes into the text as it is: a backslash or ``\\n`` in a string literal stays
    escaped (regex substitution used to turn them back into the characters)."""
    texts = texts_of(tmp_path, STRINGS, "h")
    assert texts[0] == 'lea rdi, [rip + <.rodata.str1.1+0x0 "a\\\\b\\n">]'


def test_linked_code_reads_as_wide_as_its_memory_operand() -> None:
    """In hypervisor code an unnamed RIP-relative place shows its value at the width capstone
    gives the memory operand, its string for ``lea``, and its address when it is neither."""
    text_at, data_at = 0x1000, 0x2000
    data = (0x11223344).to_bytes(4, "little") + b"hi\0"
    code = b"".join([
        bytes.fromhex("0fb605") + (data_at - (text_at + 7)).to_bytes(4, "little", signed=True),
        bytes.fromhex("8b05") + (data_at - (text_at + 13)).to_bytes(4, "little", signed=True),
        bytes.fromhex("488d3d") + (data_at + 4 - (text_at + 20)).to_bytes(4, "little",
                                                                          signed=True),
        bytes.fromhex("0f2805") + (data_at - (text_at + 27)).to_bytes(4, "little", signed=True),
    ])
    xs = XenSymbols("xen-syms", b"", {}, [(text_at, code)],
                    ((".rodata", data_at, memoryview(data)),))
    texts = [i.text for i in disassemble_linked(code, text_at, xs)]
    assert texts == [
        "movzx eax, byte ptr [rip + <.rodata+0x0 = 0x44>]",
        "mov eax, dword ptr [rip + <.rodata+0x0 = 0x11223344>]",
        'lea rdi, [rip + <.rodata+0x4 "hi">]',
        "movaps xmm0, xmmword ptr [rip + 0xfe5]  # 0x2000",  # 16 bytes: not a constant shown
    ]
