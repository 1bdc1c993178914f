"""Disassembly for review (``inspect``, ``explain``): capstone's Intel syntax, with every
relocation target and every hypervisor address printed as a name.

Two sources of code:

* relocatable code (a payload, a compiled object): the bytes of a function and the relocations
  inside it.  A relocated field holds 0 until load, so capstone alone would print ``call 5`` or
  ``lea rdi, [rip]``; each such operand is replaced by what the relocation designates, e.g.
  ``call <common/version.c#helper>`` or ``lea rdi, [rip + <.rodata.str1.1+0x4 "Hello">]``.
* linked code (``xen-syms``): the replaced function's bytes at its real address; branch targets
  and RIP-relative operands are looked up in the hypervisor's table by address.

A PC-relative field designates ``S + A + (insn_end - r_offset)``: the CPU adds the distance from
the field to the end of the instruction, which is 4 for most instructions but more when an
immediate follows the displacement (see :mod:`xsbuild.relocs`).  That is why the label is
computed per instruction, after decoding it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import zip_longest

from xsbuild.elf import Reloc, Section, Symbol
from xsbuild.relocs import PC_RELATIVE, disassembler, symbol_at, target_of
from xsbuild.xensyms import XenSymbols

# How a relocation's symbol is printed: payloads keep their (Xen) names, objects plain names.
Namer = Callable[[Symbol], str]

_IMMEDIATE = re.compile(r"-?(0x[0-9a-f]+|\d+)")
_RIP = re.compile(r"rip(?: ([+-]) (0x[0-9a-f]+|\d+))?")
_TRAILING_IMMEDIATE = re.compile(r"(^|, )(0x0|0)$")
_MAX_STRING = 48  # characters of a string literal shown in an operand


@dataclass(frozen=True, slots=True)
class Instruction:
    """One decoded instruction of a function."""

    offset: int  # from the start of the function
    address: int  # section offset (relocatable code) or virtual address (xen-syms)
    raw: bytes
    text: str  # mnemonic and operands, targets as <name>

    @property
    def size(self) -> int:
        return len(self.raw)

    def covers(self, offset: int) -> bool:
        return self.offset <= offset < self.offset + self.size

    def to_json(self) -> dict[str, object]:
        return {"offset": self.offset, "address": f"{self.address:#x}", "bytes": self.raw.hex(),
                "text": self.text}


def plain_name(sym: Symbol) -> str:
    """A symbol as the object names it; a section symbol by its section."""
    if sym.name:
        return sym.name
    return sym.sec.name if sym.sec is not None else "?"


def with_offset(name: str, offset: int) -> str:
    if offset == 0:
        return name
    return f"{name}+{offset:#x}" if offset > 0 else f"{name}-{-offset:#x}"


def quote(content: bytes) -> str:
    """A C string literal for display: escaped, shortened, without its NUL."""
    text = content.rstrip(b"\0").decode("utf-8", "replace")
    shown = text if len(text) <= _MAX_STRING else text[:_MAX_STRING - 1] + "…"
    escaped = shown.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def reloc_label(reloc: Reloc, pc_adjust: int, name_of: Namer = plain_name) -> str:
    """What ``reloc`` designates once the CPU has added ``pc_adjust`` (0 for absolute fields
    and for PC-relative fields in data, which point at ``S + A``)."""
    t = target_of(reloc, pc_adjust)
    off = t.delta + pc_adjust
    if t.kind == "sym":
        assert t.sym is not None
        return with_offset(name_of(t.sym), off)
    assert t.section is not None
    if t.kind == "string":
        return f"{t.section.name}+{t.start + off:#x} {quote(t.content)}"
    if t.kind == "const":
        value = int.from_bytes(t.content, "little")
        return f"{t.section.name}+{t.start + off:#x} = {value:#x}"
    return with_offset(t.section.name, off)


def string_of(reloc: Reloc, pc_adjust: int) -> str | None:
    """The literal a relocation designates, without quotes; None if it is not a string."""
    t = target_of(reloc, pc_adjust)
    return t.content.rstrip(b"\0").decode("utf-8", "replace") if t.kind == "string" else None


# --------------------------------------------------------------------------------------------
# Decoding


def _decode(code: bytes, base: int) -> Iterator[tuple[int, int, str, str]]:
    """(address, size, mnemonic, operands); an undecodable byte becomes ``.byte`` and decoding
    resumes after it (data in text, a truncated tail)."""
    md = disassembler()
    pos = 0
    while pos < len(code):
        progressed = False
        for addr, size, mnemonic, ops in md.disasm_lite(code[pos:], base + pos):
            yield addr, size, mnemonic, ops
            pos = addr + size - base
            progressed = True
        if not progressed:
            yield base + pos, 1, ".byte", f"{code[pos]:#04x}"
            pos += 1


def _decode_detail(code: bytes, base: int) -> Iterator[tuple[int, int, str, str, _Fields]]:
    """As :func:`_decode`, with each instruction's field positions (detail mode)."""
    md = disassembler(detail=True)
    pos = 0
    while pos < len(code):
        progressed = False
        for insn in md.disasm(code[pos:], base + pos):
            yield (insn.address, insn.size, insn.mnemonic, insn.op_str,
                   _Fields(insn.disp_offset, insn.disp_size, insn.imm_offset, insn.imm_size,
                           insn.disp))
            pos = insn.address + insn.size - base
            progressed = True
        if not progressed:
            yield base + pos, 1, ".byte", f"{code[pos]:#04x}", _Fields(0, 0, 0, 0)
            pos += 1


def _is_branch(mnemonic: str) -> bool:
    op = mnemonic.split()[-1]  # "notrack jmp", "bnd jmp"
    return op in ("call", "jmp", "xbegin", "jrcxz", "jecxz") or op.startswith(("j", "loop"))


def _join(mnemonic: str, ops: str) -> str:
    return f"{mnemonic} {ops}" if ops else mnemonic


@dataclass(frozen=True, slots=True)
class _Fields:
    """Where capstone's detail mode puts an instruction's displacement and immediate (offsets
    from the instruction's first byte; 0 when it has none)."""

    disp_offset: int
    disp_size: int
    imm_offset: int
    imm_size: int
    disp: int = 0  # the displacement's value

    def is_disp(self, at: int) -> bool:
        return bool(self.disp_size) and at == self.disp_offset

    def is_imm(self, at: int) -> bool:
        return bool(self.imm_size) and at == self.imm_offset


def _symbolise(mnemonic: str, ops: str, label: str, field: int,
               fields: _Fields) -> tuple[str, str]:
    """Put ``<label>`` where the relocated field (``field`` bytes into the instruction) shows in
    the operands; returns the operands and a comment (for a field the operands do not show, e.g.
    an absolute displacement).  Which operand the field is comes from the decoder, not from the
    text."""
    if fields.is_imm(field) and _is_branch(mnemonic) and _IMMEDIATE.fullmatch(ops):
        return f"<{label}>", ""
    if fields.is_disp(field) and _RIP.search(ops):
        return _RIP.sub(f"rip + <{label}>", ops, count=1), ""
    if fields.is_imm(field) and not _is_branch(mnemonic) and _TRAILING_IMMEDIATE.search(ops):
        return _TRAILING_IMMEDIATE.sub(rf"\g<1><{label}>", ops, count=1), ""
    return ops, f"<{label}>"


# --------------------------------------------------------------------------------------------
# Relocatable code


def function_extent(sym: Symbol) -> int:
    """A function's size; for an unsized assembly label, up to the next symbol or section end."""
    if sym.size or sym.sec is None:
        return sym.size
    later = [s.value for s in sym.sec.symbols if s.value > sym.value and not s.is_section]
    return (min(later) if later else sym.sec.size) - sym.value


def disassemble_relocatable(sec: Section, start: int, size: int,
                            name_of: Namer = plain_name) -> list[Instruction]:
    """Instructions of ``sec[start:start+size]`` with relocated operands named.  Branches that
    stay inside the section (no relocation) are named after the section's function symbols."""
    code = bytes(sec.data[start:start + size])
    relocs = [r for r in sec.relocs if start <= r.offset < start + size]
    out = []
    for addr, length, mnemonic, ops, fields in _decode_detail(code, start):
        mine = [r for r in relocs if addr <= r.offset < addr + length]
        comments = []
        for r in mine:
            pc = r.type in PC_RELATIVE
            label = reloc_label(r, addr + length - r.offset if pc else 0, name_of)
            ops, comment = _symbolise(mnemonic, ops, label, r.offset - addr, fields)
            comments += [comment] if comment else []
        if not mine and _is_branch(mnemonic) and _IMMEDIATE.fullmatch(ops):
            ops = _local_branch(sec, int(ops, 0), name_of) or ops
        text = _join(mnemonic, ops) + "".join(f"  # {c}" for c in comments)
        out.append(Instruction(addr - start, addr,
                               code[addr - start:addr - start + length], text))
    return out


def _local_branch(sec: Section, target: int, name_of: Namer) -> str | None:
    owner = symbol_at(sec, target)
    if owner is None or owner.is_section:
        return None
    return f"<{with_offset(name_of(owner), target - owner.value)}>"


def reloc_pc_adjust(code: list[Instruction], reloc: Reloc, base: int) -> int:
    """``insn_end - r_offset`` for a PC-relative relocation inside decoded ``code`` whose
    first instruction sits at section offset ``base``; 0 for absolute relocations."""
    if reloc.type not in PC_RELATIVE:
        return 0
    for insn in code:
        if insn.covers(reloc.offset - base):
            return insn.offset + insn.size - (reloc.offset - base)
    return 4


# --------------------------------------------------------------------------------------------
# Linked code (xen-syms)


def xen_label(xs: XenSymbols, addr: int) -> str | None:
    sym = xs.symbol_at(addr)
    return with_offset(sym.name, addr - sym.addr) if sym is not None else None


_PTR_SIZE = re.compile(r"\b(byte|word|dword|qword) ptr")
_PTR_BYTES = {"byte": 1, "word": 2, "dword": 4, "qword": 8}


def xen_literal(xs: XenSymbols, addr: int, mnemonic: str, ops: str) -> str | None:
    """What hypervisor code reads at an unnamed ``addr`` in a data section, shown as the
    payload side shows it: ``.rodata+0x10 "text"`` for a string whose address is taken,
    ``.rodata+0x20 = 0x2a`` for a constant loaded (its value in xen-syms); None otherwise."""
    place = xs.data_at(addr)
    if place is None:
        return None
    name, offset, body = place
    where = f"{name}+{offset:#x}"
    size = _PTR_SIZE.search(ops)
    if mnemonic != "lea" and size:
        width = _PTR_BYTES[size.group(1)]
        if len(body) >= width:
            return f"{where} = {int.from_bytes(body[:width], 'little'):#x}"
        return None
    end = bytes(body[:_MAX_STRING * 4]).find(b"\0")
    raw = bytes(body[:end]) if end > 0 else b""
    if raw and all(32 <= c < 127 or c in (9, 10) for c in raw):
        return f"{where} {quote(raw)}"
    return None


def disassemble_linked(code: bytes, addr: int, xs: XenSymbols) -> list[Instruction]:
    """Instructions of hypervisor code at ``addr``, targets named from ``xs``."""
    out = []
    for at, length, mnemonic, ops, fields in _decode_detail(code, addr):
        text = _join(mnemonic, ops)
        if _is_branch(mnemonic) and _IMMEDIATE.fullmatch(ops):
            label = xen_label(xs, int(ops, 0) & (2**64 - 1))
            if label:
                text = f"{mnemonic} <{label}>"
        elif fields.disp_size and _RIP.search(ops):
            target = at + length + fields.disp  # the decoder's displacement, signed
            label = xen_label(xs, target)
            if label:
                text = _join(mnemonic, _RIP.sub(f"rip + <{label}>", ops, count=1))
            else:  # an unnamed place: the literal or constant there, else its address
                label = xen_literal(xs, target, mnemonic, ops)
                text = (_join(mnemonic, _RIP.sub(f"rip + <{label}>", ops, count=1))
                        if label else text + f"  # {target:#x}")
        out.append(Instruction(at - addr, at, code[at - addr:at - addr + length], text))
    return out


# --------------------------------------------------------------------------------------------
# Side by side


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a side-by-side listing: ``same``, ``changed``, ``old`` only or ``new`` only."""

    kind: str
    old: Instruction | None
    new: Instruction | None


def align(old: list[Instruction], new: list[Instruction]) -> list[Row]:
    """Pair old and new instructions as a diff of their texts would, so that a reviewer sees
    the unchanged code level on both sides and the changes between."""
    rows: list[Row] = []
    matcher = difflib.SequenceMatcher(a=[i.text for i in old], b=[i.text for i in new],
                                      autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            rows.extend(Row("same", o, n) for o, n in zip(old[i1:i2], new[j1:j2], strict=True))
            continue
        for o, n in zip_longest(old[i1:i2], new[j1:j2]):
            rows.append(Row("changed" if o and n else ("old" if o else "new"), o, n))
    return rows

