"""Normalise relocations: what does each one really point at?

gcc and gas express most references to local things as *section symbol + addend*: a call to a
static function is ``.text.helper - 4``, a string literal is ``.rodata.str1.1 + 0x1c - 4``, a
``__read_mostly`` static is ``.data.read_mostly + 0x40 - 8``.  Comparing such relocations between
two builds, or moving their targets into a payload, needs the *entity* they point at: a named
symbol plus a delta, a string by its content, a merged constant by its bytes.

The addend is not the target offset: for a PC-relative field inside an instruction the CPU adds
the distance from the field to the end of the instruction, so the target is ``addend + (insn_end -
r_offset)``.  That distance is 4 for most instructions but 5, 6 or 8 when an immediate follows the
displacement (``movl $1, var(%rip)``: addend = var - 8), so it is measured by decoding the
instruction with capstone rather than guessed.  Xen's bug frames pack the source line into the
upper bits of their 32-bit displacement fields; their targets are the low ``BUG_DISP_WIDTH`` bits.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from xsbuild import xen_abi
from xsbuild.elf import STT_FUNC, STT_NOTYPE, STT_OBJECT, STT_SECTION, Reloc, Section, Symbol

# Kept under their old names for the readers of payloads; the table is xen_abi.RELOC_KINDS.
PC_RELATIVE = xen_abi.PC_RELATIVE_RELOC_TYPES


class TargetKind(StrEnum):
    SYM = "sym"
    STRING = "string"
    CONST = "const"
    ANON = "anon"


@dataclass(frozen=True, slots=True)
class Target:
    """What a relocation points at, independent of where things sit in their sections.

    kind:
      ``sym``    a named symbol (function/object, or an undefined one); ``delta`` is the addend
                 relative to the symbol's start
      ``string`` a NUL-terminated literal in a SHF_MERGE|SHF_STRINGS section, by ``content``;
                 ``delta`` is relative to the string's first byte
      ``const``  an ``entsize`` constant of a ``.rodata.cst<N>`` section, by ``content``
      ``anon``   a place in ``section`` covered by no symbol (``.fixup``, replacement code, ...);
                 ``delta`` is relative to the section start
    """

    kind: TargetKind
    delta: int
    sym: Symbol | None = None
    content: bytes = b""
    section: Section | None = None
    start: int = 0  # the entity's offset inside its section (string/const/anon: where it begins)


def field_width(rtype: int) -> int:
    return xen_abi.reloc_width(rtype)


def target_of(reloc: Reloc, pc_adjust: int = 0, real_offset: int | None = None) -> Target:
    """Resolve ``reloc`` to the entity it designates.

    ``pc_adjust`` is ``insn_end - r_offset`` for a PC-relative field inside an instruction (0 for
    fields in data); ``real_offset``, when given, overrides the computed target offset (bug frames).
    """
    sym = reloc.sym
    sec = sym.sec
    if by_symbol(reloc):
        return Target(TargetKind.SYM, reloc.addend, sym=sym)
    assert sec is not None
    base = sym.value  # 0 for a section symbol; the label's offset for .LC<n> labels
    where = base + (reloc.addend + pc_adjust if real_offset is None else real_offset)
    field_value = base + reloc.addend  # what the addend designates, before the pc adjustment
    if sec.is_string:
        start = string_start(sec, where)
        end = sec.data.find(b"\0", max(where, start))
        content = sec.data[start:end + 1 if end >= 0 else len(sec.data)]
        return Target(TargetKind.STRING, field_value - start, content=content, section=sec,
                      start=start)
    if sec.is_merge_const and sec.entsize:
        start = max(0, where) // sec.entsize * sec.entsize
        return Target(TargetKind.CONST, field_value - start,
                      content=sec.data[start:start + sec.entsize], section=sec, start=start)
    owner = symbol_at(sec, where)
    if owner is not None:
        return Target(TargetKind.SYM, field_value - owner.value, sym=owner)
    return Target(TargetKind.ANON, field_value, section=sec)


def by_symbol(reloc: Reloc) -> bool:
    """Does ``reloc`` designate its own named (or undefined) symbol, whatever its addend?  Then
    neither ``pc_adjust`` nor ``real_offset`` changes its target, and nobody need decode the
    instruction around it."""
    sym = reloc.sym
    sec = sym.sec
    named = sym.type in (STT_FUNC, STT_OBJECT) or (
        sym.type == STT_NOTYPE and bool(sym.name) and not sym.name.startswith(".L"))
    return sec is None or (named and not sec.is_string and not sec.is_merge_const)


def string_start(sec: Section, offset: int) -> int:
    offset = min(max(offset, 0), len(sec.data))
    return sec.data.rfind(b"\0", 0, offset) + 1


def symbol_at(sec: Section, offset: int) -> Symbol | None:
    """The function/object symbol of ``sec`` covering ``offset``.

    A reference just past the end of the last object of a section (``&array[N]``, a loop bound)
    belongs to that object, as kpatch also decides; a zero-size symbol only owns its own offset.
    """
    best: Symbol | None = None
    for s in sec.symbols:
        if s.type == STT_SECTION or not s.name or s.name.startswith(".L"):
            continue
        covers = s.value <= offset < s.value + max(s.size, 1)
        if covers and (best is None or s.size > best.size or s.type in (STT_FUNC, STT_OBJECT)):
            best = s
    if best is None:
        for s in sec.symbols:
            if s.type in (STT_FUNC, STT_OBJECT) and s.size and s.value + s.size == offset:
                return s
            if s.type == STT_FUNC and s.end < offset < owned_end(s):
                return s
    return best


def owned_end(sym: Symbol) -> int:
    """Where the bytes a function owns stop.  Its symbol stops at its last instruction, but
    code the compiler put after it in its own section (an unlikely path inline asm moves to
    ``.subsection 1``, such as the ``ud2`` of Xen's vmread helpers, with their bug frames) is
    reached only by the function's own jumps, resolved without relocations: it belongs to
    the function and must travel with it, or those jumps land past the payload's copy."""
    sec = sym.sec
    if sec is None or sym.type != STT_FUNC or not sec.is_text or sym.end >= sec.size:
        return sym.end
    alone = all(s is sym or s.type not in (STT_FUNC, STT_OBJECT) for s in sec.symbols)
    return sec.size if alone else sym.end


class InstructionEnds:
    """Maps a relocation's offset inside a text section to ``insn_end - r_offset``.

    Decodes lazily, once per (section, start) range, with capstone's lite API; keeps each
    range's instruction starts and ends, sorted, and bisects.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[Section, int], tuple[list[int], list[int]]] = {}

    def pc_adjust(self, sec: Section, start: int, end: int, r_offset: int, width: int) -> int:
        key = (sec, start)
        table = self._cache.get(key)
        if table is None:
            table = _decode_bounds(bytes(sec.data[start:end]), start)
            self._cache[key] = table
        starts, ends = table
        i = bisect.bisect_right(starts, r_offset) - 1
        if i >= 0 and r_offset < ends[i]:
            return ends[i] - r_offset
        return width  # not inside a decoded instruction: the field's own width


def _decode_bounds(code: bytes, start: int) -> tuple[list[int], list[int]]:
    """Start and end offsets of every instruction decoded in ``code`` (which sits at ``start``)."""
    md = disassembler()
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    while pos < len(code):
        decoded = False
        for addr, size, _mn, _ops in md.disasm_lite(code[pos:], start + pos):
            starts.append(addr)
            ends.append(addr + size)
            pos = addr + size - start
            decoded = True
        if not decoded:
            pos += 1  # undecodable byte (data in text): skip it, fields there use the default
    return starts, ends


@lru_cache(maxsize=2)
def disassembler(detail: bool = False):  # type: ignore[no-untyped-def]
    """The one capstone decoder (x86-64) of xsbuild, shared with :mod:`xsbuild.disasm`; with
    ``detail`` each instruction says where its displacement and immediate fields are."""
    import capstone  # imported here: commands that decode nothing must not pay for it

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = detail
    return md


def bug_frame_real_offset(addend: int, field_offset: int) -> int:
    """Target offset designated by a bug-frame displacement field.

    Xen adds every displacement of a frame to the frame's *start* (``bug_loc``/``bug_ptr``/
    ``bug_msg`` in x86 asm/bug.h), while the field is relocated PC-relative at its own place
    (``field_offset`` bytes into the frame, 0, 4 or 12): the assembler's addend is therefore the
    target's offset plus ``field_offset``, in the low BUG_DISP_WIDTH bits (the upper bits carry
    the line number).
    """
    width = xen_abi.BUG_DISP_WIDTH
    low = addend & ((1 << width) - 1)
    disp = low - (1 << width) if low & (1 << (width - 1)) else low
    return disp - field_offset
