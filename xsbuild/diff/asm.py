"""Assembly objects: sized functions are patched like C functions, anything else is refused.

gcc gives every C function a section of its own, so every reference between functions is a
relocation.  An assembly file puts several functions in one section, and the assembler resolves
a ``call`` or ``jmp`` between two of them itself, leaving no relocation: cut out of its section
(as :mod:`~xsbuild.diff.clone` cuts every unit), such a branch would land anywhere.  So, before
the passes run:

* :func:`add_missing_relocations` decodes the sized functions of an assembly object and, for
  every PC-relative field that leaves the function without a relocation, adds the relocation the
  assembler would have written for a target in another section (section symbol + addend).
  A short (8-bit) branch out of a function cannot be relocated: that function is refused if the
  payload would carry it.

After the passes, :func:`residue_refusals` refuses any change to the bytes or relocations that
no sized function covers (labels without ``.type``/``.size``, data in ``.text``, 4.17's
``ENTRY()`` code): only an ELF ``FUNC`` with a size tells where code starts and ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from xsbuild import xen_abi
from xsbuild.diff.model import DiffContext
from xsbuild.elf import STT_FUNC, STT_OBJECT, STT_SECTION, Elf, Reloc, Section, Symbol
from xsbuild.relocs import disassembler

log = logging.getLogger(__name__)


def is_assembly(elf: Elf) -> bool:
    """Made by the assembler from a ``.S`` file (or without any FILE symbol: ``head.o``)."""
    files = elf.file_symbols()
    return not files or files[0].endswith((".S", ".s"))


def add_missing_relocations(elf: Elf) -> dict[str, str]:
    """Add the relocations :mod:`~xsbuild.diff.clone` needs to cut the sized functions of an
    assembly object apart; return the functions that cannot be cut (a short branch leaves
    them): name -> why."""
    problems: dict[str, str] = {}
    for sec in elf.sections:
        funcs = [s for s in sec.symbols if s.type == STT_FUNC and s.size]
        if not sec.is_text or not funcs:
            continue
        section_sym = _section_symbol(elf, sec)
        for fn in funcs:
            why = _relocate_function(sec, section_sym, fn)
            if why:
                problems[fn.name] = why
    return problems


def _section_symbol(elf: Elf, sec: Section) -> Symbol:
    for s in sec.symbols:
        if s.type == STT_SECTION:
            return s
    sym = Symbol(name="", type=STT_SECTION, sec=sec)
    elf.symbols.insert(1, sym)
    sec.symbols.append(sym)
    return sym


def _relocate_function(sec: Section, section_sym: Symbol, fn: Symbol) -> str:
    """Add ``fn``'s missing relocations; return why it cannot be cut out ("" if it can)."""
    covered = {r.offset for r in sec.relocs}
    start, end = fn.value, fn.value + fn.size
    problem = ""
    md = disassembler(detail=True)
    for insn in md.disasm(bytes(sec.data[start:end]), start):
        field = _pc_relative_field(insn)
        if field is None:
            continue
        offset, size = field
        if offset in covered:
            continue
        value = int.from_bytes(sec.data[offset:offset + size], "little", signed=True)
        target = insn.address + insn.size + value
        if start <= target < end:
            continue  # a branch inside the function travels with it
        if size != 4:
            problem = problem or (
                f"{sec.name}: {fn.name}+{insn.address - start:#x}: a short {insn.mnemonic} "
                f"leaves the function for {sec.name}+{target:#x}; it cannot be moved into a "
                "payload (use a 32-bit branch)")
            continue
        # The assembler's PC32 for a target in another section: S + A - P = target - end.
        addend = target - (insn.address + insn.size - offset)
        sec.relocs.append(Reloc(offset, xen_abi.R_X86_64_PC32, section_sym, addend))
        log.debug("asm: %s+%#x: %s to %s+%#x, relocation added", fn.name, insn.address - start,
                  insn.mnemonic, sec.name, target)
    sec.relocs.sort(key=lambda r: r.offset)
    return problem


def _pc_relative_field(insn: object) -> tuple[int, int] | None:
    """(offset in the section, size) of an instruction's PC-relative field, if it has one: a
    relative branch's immediate, or a RIP-relative displacement."""
    import capstone.x86 as x86

    branch = set(insn.groups) & {x86.X86_GRP_JUMP, x86.X86_GRP_CALL}  # type: ignore[attr-defined]
    operands = insn.operands  # type: ignore[attr-defined]
    if branch and insn.imm_size and any(op.type == x86.X86_OP_IMM for op in operands):  # type: ignore[attr-defined]
        return insn.address + insn.imm_offset, insn.imm_size  # type: ignore[attr-defined]
    for op in insn.operands:  # type: ignore[attr-defined]
        if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP and insn.disp_size:  # type: ignore[attr-defined]
            return insn.address + insn.disp_offset, insn.disp_size  # type: ignore[attr-defined]
    return None


def residue_refusals(ctx: DiffContext) -> list[str]:
    """Changes an assembly object makes outside its sized functions and objects."""
    problems = []
    for sec in ctx.patched.sections:
        if not sec.is_alloc or sec.is_nobits:
            continue
        twin = ctx.orig.section(sec.name)
        ours = _residue(sec)
        theirs = _residue(twin) if twin is not None else []
        if ours != theirs:
            at = next((chunk.start for chunk, other in zip(ours, theirs, strict=False)
                       if chunk != other), (ours[len(theirs)] if len(ours) > len(theirs)
                                            else ours[-1] if ours else _Chunk(0)).start)
            problems.append(f"{ctx.object}: {sec.name}: {_label_near(sec, at)}: changed "
                            "assembly outside any function with an ELF type FUNC and a size "
                            "(.type/.size, or Xen's FUNC()/END() annotations): xsbuild cannot "
                            "tell where that code starts and ends, so it cannot be live-patched")
    return problems


@dataclass(frozen=True, slots=True)
class _Chunk:
    """A stretch of a section no sized symbol covers: its bytes and relocations, compared by
    content (``start`` is where it is, for messages only)."""

    start: int
    data: bytes = b""
    relocs: tuple[tuple[int, int, str, int], ...] = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Chunk) and (self.data, self.relocs) == (other.data,
                                                                          other.relocs)

    def __hash__(self) -> int:
        return hash((self.data, self.relocs))


def _residue(sec: Section) -> list[_Chunk]:
    """The stretches of ``sec`` between its sized functions and objects, padding left out."""
    spans = sorted((s.value, s.value + s.size) for s in sec.symbols
                   if s.type in (STT_FUNC, STT_OBJECT) and s.size)
    chunks, pos = [], 0
    for lo, hi in [*spans, (len(sec.data), len(sec.data))]:
        if lo > pos:
            relocs = tuple((r.offset - pos, r.type, r.sym.name or (r.sym.sec.name if r.sym.sec
                                                                    else ""), r.addend)
                           for r in sec.relocs if pos <= r.offset < lo)
            data = bytes(sec.data[pos:lo])
            if relocs or not _is_padding(data, sec.is_text):
                chunks.append(_Chunk(pos, data, relocs))
        pos = max(pos, hi)
    return chunks


def _is_padding(data: bytes, is_text: bool) -> bool:
    """Alignment fill between functions: zeros, or (in code) nothing but NOPs and INT3s."""
    if not data.strip(b"\0"):
        return True
    if not is_text:
        return False
    insns = list(disassembler().disasm(data, 0))
    return sum(i.size for i in insns) == len(data) and all(
        i.mnemonic in ("nop", "int3") for i in insns)


def _label_near(sec: Section, offset: int) -> str:
    """The last symbol at or before ``offset`` (a label, without a size), to name the place."""
    best = None
    for s in sec.symbols:
        if s.name and s.type != STT_SECTION and s.value <= offset and (
                best is None or s.value >= best.value):
            best = s
    return f"{best.name}+{offset - best.value:#x}" if best else f"offset {offset:#x}"
