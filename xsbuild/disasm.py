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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import zip_longest

from xsbuild.elf import Reloc, Section, Symbol
from xsbuild.relocs import PC_RELATIVE, disassembler, symbol_at, target_of
from xsbuild.xensyms import XenSymbols

# How a relocation's symbol is printed: payloads keep their (Xen) names, objects plain names.
Namer = Callable[[Symbol], str]

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

_ADDRESS_MASK = 2**64 - 1  # capstone prints branch targets unsigned, its operand is signed
_HEX_THRESHOLD = 9  # capstone prints numbers above 9 in hex, the others in decimal
_LOADED_WIDTHS = (1, 2, 4, 8)  # accesses whose value xen_literal shows as a constant


@dataclass(frozen=True, slots=True)
class _Decoded:
    """One instruction with what capstone's detail mode says about its operands; the text is
    capstone's, only ever edited where a known operand renders."""

    address: int
    size: int
    mnemonic: str
    ops: str
    branch: bool = False  # a jump, call or relative branch (capstone's instruction groups)
    target: int | None = None  # the immediate operand of a branch: where it goes
    rip_disp: int | None = None  # the displacement of a RIP-relative memory operand
    disp_offset: int = 0  # where the displacement is encoded (bytes into the instruction)
    width: int = 0  # bytes a non-``lea`` memory operand accesses (0: none, or ``lea``)
    imm_offset: int = 0  # where the immediate is encoded (0: none)
    imm_zero_last: bool = False  # the encoded immediate is the last operand and holds 0

    def text(self) -> str:
        return _join(self.mnemonic, self.ops)


def _decode(code: bytes, base: int) -> Iterator[_Decoded]:
    """The instructions of ``code`` (which sits at ``base``); an undecodable byte becomes
    ``.byte`` and decoding resumes after it (data in text, a truncated tail)."""
    md = disassembler(detail=True)
    pos = 0
    while pos < len(code):
        progressed = False
        for insn in md.disasm(code[pos:], base + pos):
            yield _describe(insn)
            pos = insn.address + insn.size - base
            progressed = True
        if not progressed:
            yield _Decoded(base + pos, 1, ".byte", f"{code[pos]:#04x}")
            pos += 1


def _describe(insn) -> _Decoded:  # type: ignore[no-untyped-def]
    """Read a capstone instruction's operands (detail mode) into a :class:`_Decoded`."""
    from capstone import x86_const as x86  # capstone is loaded only by commands that decode

    groups = set(insn.groups)
    branch = bool(groups & {x86.X86_GRP_JUMP, x86.X86_GRP_CALL, x86.X86_GRP_BRANCH_RELATIVE})
    ops = list(insn.operands)
    target = ops[0].imm if branch and len(ops) == 1 and ops[0].type == x86.X86_OP_IMM else None
    mem = next((op for op in ops if op.type == x86.X86_OP_MEM), None)
    rip = mem is not None and mem.mem.base == x86.X86_REG_RIP and insn.disp_size > 0
    # The encoded immediate is the last immediate operand (``enter`` has two, capstone places
    # the field at the second); only a last operand renders at the end of the text.
    imms = [i for i, op in enumerate(ops) if op.type == x86.X86_OP_IMM]
    imm_zero_last = (insn.imm_size > 0 and bool(imms) and imms[-1] == len(ops) - 1
                     and ops[-1].imm == 0)
    return _Decoded(
        insn.address, insn.size, insn.mnemonic, insn.op_str, branch=branch, target=target,
        rip_disp=mem.mem.disp if rip else None,
        disp_offset=insn.disp_offset if insn.disp_size else 0,
        width=mem.size if mem is not None and insn.id != x86.X86_INS_LEA else 0,
        imm_offset=insn.imm_offset if insn.imm_size else 0, imm_zero_last=imm_zero_last)


def _join(mnemonic: str, ops: str) -> str:
    return f"{mnemonic} {ops}" if ops else mnemonic


def _number(value: int) -> str:
    """A non-negative number as capstone's Intel syntax prints it."""
    return f"{value:#x}" if value > _HEX_THRESHOLD else str(value)


def _rip_operand(disp: int) -> str:
    """The end of a RIP-relative memory operand as capstone prints it: ``rip]``,
    ``rip + 0x10]``, ``rip - 8]``."""
    if disp == 0:
        return "rip]"
    return f"rip + {_number(disp)}]" if disp > 0 else f"rip - {_number(-disp)}]"


def _name_rip(ops: str, disp: int, label: str) -> str | None:
    """``ops`` with its RIP-relative operand pointing at ``<label>``; None if the operand does
    not render as capstone prints it (the caller then shows the label as a comment)."""
    shown = _rip_operand(disp)
    return ops.replace(shown, f"rip + <{label}>]", 1) if shown in ops else None


def _symbolise(insn: _Decoded, ops: str, label: str, field: int,
               named: set[int]) -> tuple[str, str]:
    """Put ``<label>`` where the relocated field (``field`` bytes into the instruction) shows in
    the operands ``ops`` (capstone's, with the fields in ``named`` already replaced); returns the
    operands and a comment (for a field the operands do not show, e.g. an absolute
    displacement).  Which operand the field is comes from the decoder, not from the text."""
    if field in named:
        return ops, f"<{label}>"
    if field == insn.imm_offset and insn.target is not None:
        named.add(field)
        return f"<{label}>", ""
    if field == insn.disp_offset and insn.rip_disp is not None:
        shown = _name_rip(ops, insn.rip_disp, label)
        if shown is not None:
            named.add(field)
            return shown, ""
    if field == insn.imm_offset and not insn.branch and insn.imm_zero_last:
        named.add(field)
        return ops.removesuffix("0") + f"<{label}>", ""
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
    for insn in _decode(code, start):
        addr, length, ops = insn.address, insn.size, insn.ops
        mine = [r for r in relocs if addr <= r.offset < addr + length]
        comments = []
        named: set[int] = set()
        for r in mine:
            pc = r.type in PC_RELATIVE
            label = reloc_label(r, addr + length - r.offset if pc else 0, name_of)
            ops, comment = _symbolise(insn, ops, label, r.offset - addr, named)
            comments += [comment] if comment else []
        if not mine and insn.target is not None:
            ops = _local_branch(sec, insn.target & _ADDRESS_MASK, name_of) or ops
        text = _join(insn.mnemonic, ops) + "".join(f"  # {c}" for c in comments)
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


def xen_literal(xs: XenSymbols, addr: int, width: int) -> str | None:
    """What hypervisor code reads at an unnamed ``addr`` in a data section, shown as the
    payload side shows it: ``.rodata+0x10 "text"`` for a string whose address is taken,
    ``.rodata+0x20 = 0x2a`` for a constant loaded (its value in xen-syms, ``width`` bytes: the
    memory operand's size, 0 for ``lea``); None otherwise."""
    place = xs.data_at(addr)
    if place is None:
        return None
    name, offset, body = place
    where = f"{name}+{offset:#x}"
    if width in _LOADED_WIDTHS:
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
    return [Instruction(insn.address - addr, insn.address,
                        code[insn.address - addr:insn.address - addr + insn.size],
                        _linked_text(insn, xs))
            for insn in _decode(code, addr)]


def _linked_text(insn: _Decoded, xs: XenSymbols) -> str:
    """An instruction of hypervisor code with its branch target or RIP-relative operand named;
    an unnamed RIP-relative place shows the literal or constant there, else its address."""
    if insn.target is not None:
        label = xen_label(xs, insn.target & _ADDRESS_MASK)
        return f"{insn.mnemonic} <{label}>" if label else insn.text()
    if insn.rip_disp is None:
        return insn.text()
    target = insn.address + insn.size + insn.rip_disp
    label = xen_label(xs, target) or xen_literal(xs, target, insn.width)
    shown = _name_rip(insn.ops, insn.rip_disp, label) if label else None
    return _join(insn.mnemonic, shown) if shown is not None else insn.text() + f"  # {target:#x}"


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

