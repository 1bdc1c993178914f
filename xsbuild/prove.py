"""``xsbuild prove``: the payload's code is the patched hypervisor's code, and nothing is missing.

Two linked-code comparisons, one normal form:

* **Equivalence.**  Every function the payload carries (each ``.livepatch.funcs`` replacement,
  every other function symbol it defines: new functions, ``.cold`` parts, hooks) is compared
  instruction by instruction with the function of the same Xen name (statics ``file#name``,
  spec §7) in the *patched* ``xen-syms``, the one the tree's own make builds from the patched
  source.
* **Completeness.**  The functions that differ between the original ``xen-syms`` and the
  patched one, compared the same way (init code excluded), must be exactly the functions the
  payload carries.

The normal form of an instruction is its bytes with every *address field* zeroed (branch
displacements, RIP-relative displacements, relocated fields; located with capstone's detail
mode: ``disp_offset``/``imm_offset``) plus what each field points at:

* payload side: the relocation's target: symbol + offset (section symbols mapped to the symbol
  covering the offset), string literals and ``.rodata.cst*`` constants by their bytes;
* linked side: the absolute target mapped to symbol + offset through the hypervisor's symbol
  table, unnamed data by its bytes.

Code no symbol covers but a branch reaches (``.fixup``, replacement code) is followed and
compared as numbered fragments.  Alternatives, exception-table entries and bug frames whose
patch site lies in a function are part of that function's normal form.

Completeness looks at the functions of the objects the patched build's make rewrote (no other
function can change), init code excluded, bug-frame line numbers aside (the differ does not
carry a function whose only change is the line its WARN/BUG reports).  A changed ``foo.cold``
needs ``foo`` replaced (only ``foo`` reaches it); a new copy of it serves.

A static local the patched build renumbers (``count.0`` -> ``count.1``) while the payload keeps
using the running hypervisor's (its state carries over) is matched by position
(:func:`static_aliases`).  Functions the author told the differ to ignore
(``.livepatch.ignore.*``) are reported missing, which they are.
"""

from __future__ import annotations

import bisect
import io
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from xsbuild import xen_abi
from xsbuild.elf import STT_FUNC, STT_OBJECT, STT_SECTION, Elf, Reloc, Section, Symbol, read_elf
from xsbuild.xensyms import XenSymbols, parse_build_id_note, read_build_id

PROOF_SCHEMA = "xsbuild.prove/1"
_MAX_FRAGMENT = 64  # instructions followed in one fragment of unnamed code
_MAX_STRING = 256  # bytes of a string literal compared (up to its NUL)
_PC_RELATIVE = frozenset({xen_abi.R_X86_64_PC32, xen_abi.R_X86_64_PLT32})
_TERMINATORS = frozenset({"jmp", "ret", "ud2", "int3", "hlt"})
_MAX_REPORTED = 200  # differences listed per proof (the count is always exact)
_LP_SUFFIX = re.compile(r"\.lp\d*$")  # xsbuild.linker.rename_clashes' suffix


class Verdict(StrEnum):
    PROVEN = "proven"
    NOT_PROVEN = "not-proven"
    CANNOT_JUDGE = "cannot-judge"


class DiffKind(StrEnum):
    CODE = "code"  # an instruction differs
    FRAGMENT = "fragment"  # unnamed code reached from the function differs
    ALTERNATIVE = "alternative"
    EX_TABLE = "ex-table"
    BUG_FRAME = "bug-frame"
    ABSENT = "absent"  # the payload's function does not exist in the patched hypervisor
    MISSING = "missing"  # changed in the patched hypervisor, not carried by the payload
    EXTRA = "extra"  # carried by the payload, unchanged in the patched hypervisor


@dataclass(frozen=True, slots=True)
class Difference:
    """One reason the payload is not the patched hypervisor's code."""

    kind: DiffKind
    function: str
    offset: int | None = None
    payload: str = ""  # the payload's instruction / entry at that place
    xen: str = ""  # the patched hypervisor's
    detail: str = ""

    def describe(self) -> str:
        where = self.function if self.offset is None else f"{self.function}+{self.offset:#x}"
        if self.kind is DiffKind.MISSING:
            return (f"missing: {self.function} differs between the original and the patched "
                    f"hypervisor but the payload does not carry it{self._why()}")
        if self.kind is DiffKind.EXTRA:
            return (f"extra: the payload carries {self.function}, which the patch does not "
                    f"change in the hypervisor{self._why()}")
        if self.kind is DiffKind.ABSENT:
            return f"absent: {self.function} is in the payload but not in the patched hypervisor"
        return (f"{self.kind}: {where}{self._why()}: payload `{self.payload or '(nothing)'}` "
                f"vs patched xen-syms `{self.xen or '(nothing)'}`")

    def _why(self) -> str:
        return f" ({self.detail})" if self.detail else ""

    def to_json(self) -> dict[str, object]:
        return {"kind": str(self.kind), "function": self.function, "offset": self.offset,
                "payload": self.payload, "xen": self.xen, "detail": self.detail,
                "message": self.describe()}


@dataclass(slots=True)
class FunctionProof:
    """The equivalence verdict of one function the payload carries."""

    name: str
    role: str  # "replaced" or "new"
    instructions: int = 0
    fragments: int = 0
    alternatives: int = 0
    ex_table: int = 0
    bug_frames: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def proven(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "proven": self.proven,
                "instructions": self.instructions, "fragments": self.fragments,
                "alternatives": self.alternatives, "ex_table": self.ex_table,
                "bug_frames": self.bug_frames,
                "differences": [d.to_json() for d in self.differences]}


@dataclass(slots=True)
class ProofReport:
    """Everything ``xsbuild prove`` found; :meth:`to_json` is schema ``xsbuild.prove/1``."""

    payload: str
    payload_build_id: str = ""
    base_build_id: str = ""
    patched_build_id: str = ""
    verdict: Verdict = Verdict.CANNOT_JUDGE
    reason: str = ""  # why it cannot be judged
    functions: list[FunctionProof] = field(default_factory=list)
    changed_in_xen: list[str] = field(default_factory=list)
    missing: list[Difference] = field(default_factory=list)
    extra: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def differences(self) -> list[Difference]:
        out = [d for f in self.functions for d in f.differences]
        return out + self.missing + self.extra

    def decide(self) -> None:
        if self.verdict is not Verdict.CANNOT_JUDGE or not self.reason:
            self.verdict = Verdict.NOT_PROVEN if self.differences() else Verdict.PROVEN

    def to_json(self) -> dict[str, object]:
        diffs = self.differences()
        return {
            "schema": PROOF_SCHEMA,
            "verdict": str(self.verdict),
            "reason": self.reason or None,
            "payload": self.payload,
            "build_ids": {"payload": self.payload_build_id, "base": self.base_build_id,
                          "patched": self.patched_build_id},
            "functions": [f.to_json() for f in self.functions],
            "changed_in_xen": self.changed_in_xen,
            "missing": [d.function for d in self.missing],
            "extra": [d.function for d in self.extra],
            "differences": [d.to_json() for d in diffs[:_MAX_REPORTED]],
            "difference_count": len(diffs),
            "notes": self.notes,
            "timings": self.timings,
        }


# ------------------------------------------------------------------------------------------
# The normal form


Ref = tuple[str, ...]  # what an address field designates; the linked side may offer two names


@dataclass(frozen=True, slots=True)
class NInsn:
    """One instruction in normal form."""

    offset: int
    text: str  # for people: mnemonic, operands, targets as <name>
    masked: bytes  # the encoding with every address field zeroed
    refs: tuple[Ref, ...]

    def same_as(self, other: NInsn, *, exact: bool = False) -> bool:
        """Same encoding, and each field designates the same thing: one of the names the
        linked side offers (payload against hypervisor) or, ``exact``, all of them (two
        hypervisors: an end-of-object name and the literal after it must both agree)."""
        return self.masked == other.masked and _refs_match(self.refs, other.refs, exact)


def _refs_match(a: tuple[Ref, ...], b: tuple[Ref, ...], exact: bool) -> bool:
    if len(a) != len(b):
        return False
    if exact:
        return a == b
    return all(set(x) & set(y) for x, y in zip(a, b, strict=True))


@dataclass(frozen=True, slots=True)
class Entry:
    """An alternative, exception-table entry or bug frame whose site is in the function, in
    normal form: ``fields`` compared exactly, ``refs`` compared as targets, ``line`` (bug
    frames) compared only for equivalence (the differ does not carry line-only changes)."""

    kind: DiffKind
    offset: int  # of the patch site in the function
    fields: tuple[object, ...]
    refs: tuple[Ref, ...] = ()
    code: tuple[NInsn, ...] = ()  # an alternative's replacement
    line: int = 0

    def text(self) -> str:
        refs = " ".join("<" + "|".join(r) + ">" for r in self.refs)
        code = "; ".join(i.text for i in self.code)
        parts = [f"{self.kind} at +{self.offset:#x}", " ".join(map(str, self.fields)), refs]
        if self.kind is DiffKind.BUG_FRAME:
            parts.append(f"line {self.line}")
        if code:
            parts.append(f"[{code}]")
        return " ".join(p for p in parts if p)

    def same_as(self, other: Entry, *, lines: bool, exact: bool = False) -> bool:
        return (self.kind == other.kind and self.offset == other.offset
                and self.fields == other.fields and (not lines or self.line == other.line)
                and _refs_match(self.refs, other.refs, exact)
                and len(self.code) == len(other.code)
                and all(a.same_as(b, exact=exact)
                        for a, b in zip(self.code, other.code, strict=True)))


@dataclass(slots=True)
class Unit:
    """A function in normal form, with the unnamed code it reaches and its special entries."""

    name: str
    insns: list[NInsn]
    fragments: list[list[NInsn]]
    entries: list[Entry]


def compare_units(a: Unit, b: Unit, *, lines: bool = True, exact: bool = False,
                  first_only: bool = True) -> list[Difference]:
    """Differences of ``a`` (payload or original) against ``b`` (patched hypervisor)."""
    # Code, then entries, then the unnamed code both reach: a wrong target shows where it is
    # written, not as the fragment it makes differ.
    out = _compare_insns(a.name, a.insns, b.insns, DiffKind.CODE, "", exact)
    ea = sorted(a.entries, key=_entry_order)
    eb = sorted(b.entries, key=_entry_order)
    for x, y in _pair_entries(ea, eb):
        if x is not None and y is not None and x.same_as(y, lines=lines, exact=exact):
            continue
        ref = x or y
        assert ref is not None
        out.append(Difference(ref.kind, a.name, ref.offset, x.text() if x else "",
                              y.text() if y else ""))
    for k in range(max(len(a.fragments), len(b.fragments))):
        fa = a.fragments[k] if k < len(a.fragments) else []
        fb = b.fragments[k] if k < len(b.fragments) else []
        out += _compare_insns(a.name, fa, fb, DiffKind.FRAGMENT, f"unnamed code #{k}", exact)
    return out[:1] if first_only and out else out


def _entry_order(e: Entry) -> tuple[str, int, str]:
    return (str(e.kind), e.offset, repr(e.fields))


def _pair_entries(a: list[Entry], b: list[Entry]) -> Iterable[tuple[Entry | None, Entry | None]]:
    """Pair entries by (kind, site); the leftovers pair with nothing."""
    rest = list(b)
    for x in a:
        match = next((y for y in rest if y.kind == x.kind and y.offset == x.offset), None)
        if match is not None:
            rest.remove(match)
        yield x, match
    for y in rest:
        yield None, y


def _compare_insns(name: str, a: list[NInsn], b: list[NInsn], kind: DiffKind,
                   detail: str, exact: bool) -> list[Difference]:
    for x, y in zip(a, b, strict=False):
        if not x.same_as(y, exact=exact):
            return [Difference(kind, name, x.offset, x.text, y.text, detail)]
    if len(a) != len(b):
        longer = a if len(a) > len(b) else b
        extra = longer[min(len(a), len(b))]
        side = "payload" if len(a) > len(b) else "patched hypervisor"
        return [Difference(kind, name, extra.offset,
                           extra.text if longer is a else "", extra.text if longer is b else "",
                           (detail + "; " if detail else "") + f"only the {side} goes on")]
    return []


# ------------------------------------------------------------------------------------------
# Decoding


@lru_cache(maxsize=1)
def _cs():  # type: ignore[no-untyped-def]
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return md


@dataclass(frozen=True, slots=True)
class _Field:
    """An address field of one instruction: where it is and what kind it is."""

    at: int  # offset in the instruction
    size: int
    pc_relative: bool  # branch displacement or RIP-relative displacement
    target: int  # as decoded (absolute, or section offset for relocatable code)
    operand_size: int  # bytes a memory operand reads (0: the address itself is used)
    maybe_constant: bool = False  # a 64-bit immediate: an address only if it points at one


def _insns(code: bytes, base: int) -> Iterable[tuple[object, list[_Field]]]:
    """Capstone instructions with their address fields; an undecodable byte ends decoding."""
    from capstone import x86

    for insn in _cs().disasm(code, base):
        fields: list[_Field] = []
        is_branch = bool(set(insn.groups) & {1, 2})  # CS_GRP_JUMP, CS_GRP_CALL
        lea = insn.mnemonic == "lea"
        for op in insn.operands:
            if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP:
                target = insn.address + insn.size + op.mem.disp
                fields.append(_Field(insn.disp_offset, insn.disp_size, True, target,
                                     0 if lea or is_branch else op.size))
            elif op.type == x86.X86_OP_IMM and is_branch and insn.imm_size:
                fields.append(_Field(insn.imm_offset, insn.imm_size, True,
                                     op.imm & (2**64 - 1), 0))
            elif op.type == x86.X86_OP_IMM and insn.imm_size == 8:
                fields.append(_Field(insn.imm_offset, 8, False, op.imm & (2**64 - 1), 0, True))
        yield insn, fields


def _mask(raw: bytes, spans: Iterable[tuple[int, int]]) -> bytes:
    out = bytearray(raw)
    for at, size in spans:
        out[at:at + size] = bytes(size)
    return bytes(out)


def _text(insn: object, refs: list[Ref]) -> str:
    text = f"{insn.mnemonic} {insn.op_str}".strip()  # type: ignore[attr-defined]
    if refs:
        text += "  <" + ">, <".join("|".join(r) for r in refs) + ">"
    return text


def _data_ref(body: bytes, operand_size: int) -> Ref:
    """Unnamed data by content: the value read (its operand size) or, for an address taken,
    the string starting there."""
    if operand_size:
        return (f"={body[:operand_size].hex()}",)
    end = body.find(b"\0", 0, _MAX_STRING)
    raw = body[:end + 1] if end >= 0 else body[:_MAX_STRING]
    return ('"' + raw.rstrip(b"\0").decode("utf-8", "backslashreplace")
            .replace("\n", "\\n") + '"',)


class _Fragments:
    """Unnamed code reached from a function, numbered in the order it is first reached."""

    def __init__(self) -> None:
        self.keys: dict[object, int] = {}
        self.todo: list[tuple[int, object]] = []
        self.sections: dict[int, Section] = {}  # payload side: id -> the section a key names

    def ref(self, key: object, delta: int = 0) -> Ref:
        if key not in self.keys:
            self.keys[key] = len(self.keys)
            self.todo.append((self.keys[key], key))
        return (f"code#{self.keys[key]}" + (f"+{delta:#x}" if delta else ""),)


def _is_terminator(insn: object) -> bool:
    return insn.mnemonic.split()[-1] in _TERMINATORS  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------
# Linked side: xen-syms


@dataclass(frozen=True, slots=True)
class _LinkedSection:
    name: str
    addr: int
    data: bytes
    executable: bool


class LinkedImage:
    """A linked hypervisor (``xen-syms``): its symbols, sections and special-section entries."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.syms = XenSymbols.load(path)
        self.build_id = self.syms.build_id
        self.sections = _linked_sections(Path(path))
        self._starts = [s.addr for s in self.sections]
        self.functions = {n: s for n, s in self.syms.by_name.items() if s.is_func}
        self._entries: dict[str, list[tuple[str, int, int]]] | None = None
        self._by_end: dict[int, tuple[str, int]] | None = None
        # patched static local -> the original's it continues (see static_aliases)
        self.aliases: dict[str, str] = {}

    def section_at(self, addr: int) -> _LinkedSection | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            sec = self.sections[i]
            if addr < sec.addr + len(sec.data):
                return sec
        return None

    def read(self, addr: int, size: int) -> bytes:
        sec = self.section_at(addr)
        if sec is None:
            return b""
        return sec.data[addr - sec.addr:addr - sec.addr + size]

    def is_init(self, addr: int) -> bool:
        sec = self.section_at(addr)
        return sec is not None and sec.name.startswith(".init")

    def _range(self, start: str, stop: str, section: str) -> tuple[int, int]:
        """Where one special section's entries lie: between the linker script's start/stop
        symbols (xen-syms merges them into .rodata/.data), else the output section of that
        name (a plain ``ld`` link keeps it), else nowhere."""
        first, last = self.syms.lookup(start), self.syms.lookup(stop)
        if first is not None and last is not None:
            return first.addr, last.addr
        sec = next((s for s in self.sections if s.name == section), None)
        return (sec.addr, sec.addr + len(sec.data)) if sec is not None else (0, 0)

    def entries_for(self, func: str) -> list[tuple[str, int, int]]:
        """(kind, entry address, bug-frame type) of every special entry whose site is in
        ``func``."""
        if self._entries is None:
            self._entries = {}
            for kind, addr, typ, site in self._all_entries():
                owner = self.syms.symbol_at(site)
                if owner is not None and owner.is_func:
                    self._entries.setdefault(owner.name, []).append((kind, addr, typ))
        return self._entries.get(func, [])

    def _all_entries(self) -> Iterable[tuple[str, int, int, int]]:
        start, end = self._range("__alt_instructions", "__alt_instructions_end",
                                 xen_abi.SEC_ALTINSTRUCTIONS)
        for addr in range(start, end, xen_abi.ALT_INSTR_SIZE):
            (off,) = struct.unpack("<i", self.read(addr, 4))
            yield "alt", addr, 0, addr + off
        start, end = self._range("__start___ex_table", "__stop___ex_table",
                                 xen_abi.SEC_EX_TABLE)
        for addr in range(start, end, xen_abi.EX_TABLE_ENTRY_SIZE):
            (off,) = struct.unpack("<i", self.read(addr, 4))
            yield "ex", addr, 0, addr + off
        starts = ["__start_bug_frames"] + [f"__stop_bug_frames_{n}" for n in range(3)]
        for typ, section in enumerate(xen_abi.BUG_FRAME_SECTIONS):
            step = xen_abi.special_entry_size(section)
            start, end = self._range(starts[typ], f"__stop_bug_frames_{typ}", section)
            for addr in range(start, end, step):
                (value,) = struct.unpack("<I", self.read(addr, 4))
                yield "bug", addr, typ, addr + _bug_disp(value)

    def target_ref(self, addr: int, operand_size: int, frags: _Fragments) -> Ref:
        """What hypervisor code designates at ``addr``: symbol + offset (also the object that
        ends there), else unnamed code as a fragment, unnamed data by its bytes."""
        names: list[str] = []
        sym = self.syms.symbol_at(addr)
        if sym is not None:
            names.append(_with_offset(self.aliases.get(sym.name, sym.name), addr - sym.addr))
        ended = self._ends().get(addr)
        if ended is not None and (sym is None or sym.size == 0):
            names.append(_with_offset(ended[0], ended[1]))
        sec = self.section_at(addr)
        if sym is not None and sym.size:  # inside a sized symbol: that is what it is
            return tuple(names)
        if sec is None:
            return tuple(names) or (f"abs:{addr:#x}",)
        if sec.executable:
            return tuple(names) or frags.ref(("x", addr))
        # a label or the end of an object: the payload side may see a literal there
        return tuple(names) + _data_ref(sec.data[addr - sec.addr:], operand_size)

    def _ends(self) -> dict[int, tuple[str, int]]:
        if self._by_end is None:
            self._by_end = {s.addr + s.size: (s.name, s.size)
                            for s in self.syms.by_name.values() if s.size and not s.is_func}
        return self._by_end


def _linked_sections(path: Path) -> list[_LinkedSection]:
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as f:
        ef = ELFFile(io.BytesIO(f.read()))
        out = [_LinkedSection(s.name, s["sh_addr"], s.data(), bool(s["sh_flags"] & 0x4))
               for s in ef.iter_sections()
               if s["sh_flags"] & 0x2 and s["sh_type"] == "SHT_PROGBITS" and s["sh_addr"]]
    return sorted(out, key=lambda s: s.addr)


def _bug_disp(value: int) -> int:
    """The displacement in the low BUG_DISP_WIDTH bits of a bug-frame field (sign-extended)."""
    width = xen_abi.BUG_DISP_WIDTH
    low = value & ((1 << width) - 1)
    return low - (1 << width) if low & (1 << (width - 1)) else low


def _bug_line_bits(value: int) -> int:
    """The source-line bits a bug-frame field keeps above its displacement."""
    return ((value - _bug_disp(value)) >> xen_abi.BUG_DISP_WIDTH) & 0xFF


def _with_offset(name: str, off: int) -> str:
    return name if off == 0 else f"{name}{off:+#x}"


def linked_unit(image: LinkedImage, name: str) -> Unit | None:
    """The function ``name`` of a linked hypervisor in normal form (None: no such function)."""
    sym = image.functions.get(name)
    if sym is None:
        return None
    frags = _Fragments()
    insns = _linked_insns(image, sym.addr, image.read(sym.addr, sym.size), frags, sym.addr)
    entries = [_linked_entry(image, kind, addr, typ, sym.addr, frags)
               for kind, addr, typ in image.entries_for(name)]
    return Unit(name, insns, _linked_fragments(image, frags), entries)


def _linked_insns(image: LinkedImage, addr: int, code: bytes, frags: _Fragments,
                  origin: int, *, fragment: bool = False) -> list[NInsn]:
    out: list[NInsn] = []
    for insn, found in _insns(code, addr):
        fields = [f for f in found
                  if not f.maybe_constant or image.section_at(f.target) is not None]
        refs = [image.target_ref(f.target, f.operand_size, frags) for f in fields]
        raw = bytes(insn.bytes)  # type: ignore[attr-defined]
        masked = _mask(raw, ((f.at, f.size) for f in fields))
        out.append(NInsn(insn.address - origin, _text(insn, refs), masked,  # type: ignore
                         tuple(refs)))
        if fragment and (_is_terminator(insn) or len(out) >= _MAX_FRAGMENT):
            break
    return out


def _linked_fragments(image: LinkedImage, frags: _Fragments) -> list[list[NInsn]]:
    out: list[list[NInsn]] = []
    while frags.todo:
        _k, key = frags.todo.pop(0)
        addr = key[1]  # type: ignore[index]
        sec = image.section_at(addr)
        code = sec.data[addr - sec.addr:addr - sec.addr + 16 * _MAX_FRAGMENT] if sec else b""
        out.append(_linked_insns(image, addr, code, frags, addr, fragment=True))
    return out


def _linked_entry(image: LinkedImage, kind: str, addr: int, typ: int, func_addr: int,
                  frags: _Fragments) -> Entry:
    if kind == "alt":
        orig, repl, cpuid, orig_len, repl_len, pad_len, priv = struct.unpack(
            xen_abi.ALT_INSTR_FORMAT, image.read(addr, xen_abi.ALT_INSTR_SIZE))
        repl_addr = addr + 4 + repl
        code = _linked_insns(image, repl_addr, image.read(repl_addr, repl_len), frags,
                             repl_addr)
        return Entry(DiffKind.ALTERNATIVE, addr + orig - func_addr,
                     (f"cpuid={cpuid}", f"orig_len={orig_len}", f"repl_len={repl_len}",
                      f"pad_len={pad_len}", f"priv={priv}"), code=tuple(code))
    if kind == "ex":
        site, cont = struct.unpack("<ii", image.read(addr, 8))
        return Entry(DiffKind.EX_TABLE, addr + site - func_addr, (),
                     (image.target_ref(addr + 4 + cont, 0, frags),))
    values = struct.unpack("<II", image.read(addr, 8))
    refs: list[Ref] = [image.target_ref(addr + _bug_disp(values[1]), 0, frags)]
    if typ == 3:  # assert frames: the message follows (spec §1.4)
        (msg,) = struct.unpack("<I", image.read(addr + 12, 4))
        refs.append(image.target_ref(addr + _bug_disp(msg), 0, frags))
    line = (_bug_line_bits(values[0]) << 8) | _bug_line_bits(values[1])
    return Entry(DiffKind.BUG_FRAME, addr + _bug_disp(values[0]) - func_addr,
                 (f"type={typ}",), tuple(refs), line=line)


# ------------------------------------------------------------------------------------------
# Payload side


def xen_name(sym: Symbol) -> str:
    """The name a payload symbol has in the patched hypervisor's table: statics as
    ``file#name``; a payload-local copy the linker renamed so as not to clash with the
    hypervisor's (``foo.cold.lp``, ``foo.lp2``) by the name it copies."""
    if sym.sec is None:
        return sym.name
    name = _LP_SUFFIX.sub("", sym.name)
    if "#" in name or not sym.is_local or not sym.file:
        return name
    return f"{sym.file}#{name}"


def _owner(sec: Section, offset: int) -> Symbol | None:
    """The function/object symbol of ``sec`` covering ``offset`` (or ending there)."""
    best = None
    for s in sec.symbols:
        if s.type not in (STT_FUNC, STT_OBJECT) or not s.name:
            continue
        if s.value <= offset < s.value + max(s.size, 1):
            return s
        if s.size and s.value + s.size == offset:
            best = s
    return best


@dataclass(slots=True)
class PayloadImage:
    """A payload read for the proof: its functions and special-section entries by site."""

    path: str
    elf: Elf
    replaced: dict[str, Symbol]  # Xen name of the replaced function -> the new code's symbol
    functions: dict[str, Symbol]  # every function the payload defines, by Xen name
    entries: dict[int, list[tuple[Section, int, int]]]  # id(func sym) -> (sec, offset, type)
    xen_depends: bytes

    @classmethod
    def load(cls, path: str | Path) -> PayloadImage:
        elf = read_elf(path)
        functions = {xen_name(s): s for s in elf.symbols
                     if s.type == STT_FUNC and s.sec is not None and s.sec.is_text}
        replaced = _replaced(elf)
        dep = elf.section(xen_abi.SEC_XEN_DEPENDS)
        payload = cls(str(path), elf, replaced, functions, {},
                      parse_build_id_note(dep.data) if dep is not None else b"")
        payload._index_entries()
        return payload

    def _index_entries(self) -> None:
        specs = [(xen_abi.SEC_ALTINSTRUCTIONS, -1), (xen_abi.SEC_EX_TABLE, -2)]
        specs += [(name, typ) for typ, name in enumerate(xen_abi.BUG_FRAME_SECTIONS)]
        for name, typ in specs:
            sec = self.elf.section(name)
            if sec is None:
                continue
            step = xen_abi.special_entry_size(name)
            for off in range(0, sec.size, step):
                reloc = _reloc_at(sec, off)
                if reloc is None or reloc.sym.sec is None:
                    continue
                site = reloc.sym.value + (_bug_target(reloc.addend, 0) if typ >= 0
                                          else reloc.addend)
                owner = _owner(reloc.sym.sec, site)
                if owner is not None:
                    self.entries.setdefault(id(owner), []).append((sec, off, typ))


def _reloc_at(sec: Section, offset: int) -> Reloc | None:
    return next((r for r in sec.relocs if r.offset == offset), None)


def _bug_target(addend: int, field_offset: int) -> int:
    """Target offset of a bug-frame field relocation (its addend keeps line bits too)."""
    return _bug_disp(addend & 0xFFFFFFFF) - field_offset


def _replaced(elf: Elf) -> dict[str, Symbol]:
    funcs = elf.section(xen_abi.SEC_FUNCS)
    out: dict[str, Symbol] = {}
    if funcs is None:
        return out
    for base in range(0, funcs.size, xen_abi.FUNC_SIZE):
        name_r = _reloc_at(funcs, base + xen_abi.FUNC_OFF_NAME)
        new_r = _reloc_at(funcs, base + xen_abi.FUNC_OFF_NEW_ADDR)
        if name_r is None or name_r.sym.sec is None or new_r is None:
            continue
        data = name_r.sym.sec.data
        start = name_r.sym.value + name_r.addend
        name = data[start:data.find(b"\0", start)].decode("utf-8", "replace")
        sym = new_r.sym
        if sym.type == STT_SECTION and sym.sec is not None:
            sym = _owner(sym.sec, new_r.addend) or sym
        out[name] = sym
    return out


def payload_unit(payload: PayloadImage, sym: Symbol, name: str) -> Unit:
    """The payload's function ``sym`` in normal form, named ``name``."""
    assert sym.sec is not None
    frags = _Fragments()
    size = sym.size or (sym.sec.size - sym.value)
    insns = _payload_insns(sym.sec, sym.value, size, frags, sym.value)
    entries = [_payload_entry(sec, off, typ, sym, frags)
               for sec, off, typ in payload.entries.get(id(sym), [])]
    return Unit(name, insns, _payload_fragments(frags), entries)


def _payload_insns(sec: Section, start: int, size: int, frags: _Fragments, origin: int,
                   *, fragment: bool = False) -> list[NInsn]:
    code = bytes(sec.data[start:start + size])
    relocs = {r.offset: r for r in sec.relocs if start <= r.offset < start + size}
    out: list[NInsn] = []
    for insn, found in _insns(code, start):
        addr, length = insn.address, insn.size  # type: ignore[attr-defined]
        spans, refs = [], []
        # A 64-bit immediate is an address only when relocated.
        by_at = {f.at: f for f in found if not f.maybe_constant or addr + f.at in relocs}
        inside = sorted(off - addr for off in relocs if addr <= off < addr + length)
        for at in sorted(set(by_at) | set(inside)):
            f = by_at.get(at)
            reloc = relocs.get(addr + at)
            width = f.size if f is not None else (8 if reloc and reloc.type == 1 else 4)
            spans.append((at, width))
            operand = f.operand_size if f is not None else 0
            if reloc is not None:
                pc = addr + length - reloc.offset if reloc.type in _PC_RELATIVE else 0
                refs.append(_reloc_ref(reloc, pc, operand, frags))
            else:  # a branch or RIP-relative access inside this section, resolved by ld -r
                assert f is not None
                refs.append(_local_ref(sec, f.target, operand, frags))
        raw = bytes(insn.bytes)  # type: ignore[attr-defined]
        out.append(NInsn(addr - origin, _text(insn, refs), _mask(raw, spans), tuple(refs)))
        if fragment and (_is_terminator(insn) or len(out) >= _MAX_FRAGMENT):
            break
    return out


def _reloc_ref(reloc: Reloc, pc_adjust: int, operand_size: int, frags: _Fragments) -> Ref:
    """What a relocated field designates: ``S + A`` plus, inside an instruction, the distance
    from the field to the instruction's end the CPU adds."""
    sym, sec = reloc.sym, reloc.sym.sec
    target = reloc.addend + pc_adjust
    if sec is None:  # undefined: a hypervisor (or earlier payload) symbol, by name
        return (_with_offset(sym.name, target),)
    where = sym.value + target
    return _section_ref(sec, where, operand_size, frags,
                        None if sym.type == STT_SECTION or sym.name.startswith(".L") else sym)


def _section_ref(sec: Section, where: int, operand_size: int, frags: _Fragments,
                 named: Symbol | None = None) -> Ref:
    if sec.is_string or sec.is_merge_const:
        return _data_ref(bytes(sec.data[where:]), operand_size)
    owner = named if named is not None and named.type != STT_SECTION else _owner(sec, where)
    if owner is not None:
        return (_with_offset(xen_name(owner), where - owner.value),)
    if sec.is_text:
        frags.sections[id(sec)] = sec
        return frags.ref(("p", id(sec), where))
    return _data_ref(bytes(sec.data[where:]), operand_size)


def _local_ref(sec: Section, target: int, operand_size: int, frags: _Fragments) -> Ref:
    return _section_ref(sec, target, operand_size, frags)


def _payload_fragments(frags: _Fragments) -> list[list[NInsn]]:
    out: list[list[NInsn]] = []
    while frags.todo:
        _k, key = frags.todo.pop(0)
        _tag, sec_id, where = key  # type: ignore[misc]
        sec = frags.sections[sec_id]
        out.append(_payload_insns(sec, where, len(sec.data) - where, frags, where,
                                  fragment=True))
    return out


def _payload_entry(sec: Section, off: int, typ: int, func: Symbol, frags: _Fragments) -> Entry:
    if typ == -1:  # .altinstructions
        _o, _r, cpuid, orig_len, repl_len, pad_len, priv = struct.unpack(
            xen_abi.ALT_INSTR_FORMAT, bytes(sec.data[off:off + xen_abi.ALT_INSTR_SIZE]))
        orig = _reloc_at(sec, off)
        repl = _reloc_at(sec, off + 4)
        site = orig.sym.value + orig.addend - func.value if orig else -1
        code: list[NInsn] = []
        if repl is not None and repl.sym.sec is not None:
            start = repl.sym.value + repl.addend
            code = _payload_insns(repl.sym.sec, start, repl_len, frags, start)
        return Entry(DiffKind.ALTERNATIVE, site,
                     (f"cpuid={cpuid}", f"orig_len={orig_len}", f"repl_len={repl_len}",
                      f"pad_len={pad_len}", f"priv={priv}"), code=tuple(code))
    if typ == -2:  # .ex_table
        site_r, cont_r = _reloc_at(sec, off), _reloc_at(sec, off + 4)
        site = site_r.sym.value + site_r.addend - func.value if site_r else -1
        refs = (_reloc_ref(cont_r, 0, 0, frags),) if cont_r else (("?",),)
        return Entry(DiffKind.EX_TABLE, site, (), refs)
    loc_r, ptr_r = _reloc_at(sec, off), _reloc_at(sec, off + 4)
    site = loc_r.sym.value + _bug_target(loc_r.addend, 0) - func.value if loc_r else -1
    refs_l: list[Ref] = [_bug_ref(ptr_r, 4, frags)]
    if typ == 3:
        refs_l.append(_bug_ref(_reloc_at(sec, off + 12), 12, frags))
    line = ((_bug_line_bits(loc_r.addend & 0xFFFFFFFF) if loc_r else 0) << 8) | (
        _bug_line_bits(ptr_r.addend & 0xFFFFFFFF) if ptr_r else 0)
    return Entry(DiffKind.BUG_FRAME, site, (f"type={typ}",), tuple(refs_l), line=line)


def _bug_ref(reloc: Reloc | None, field_offset: int, frags: _Fragments) -> Ref:
    if reloc is None:
        return ("?",)
    if reloc.sym.sec is None:
        return (_with_offset(reloc.sym.name, _bug_target(reloc.addend, field_offset)),)
    where = reloc.sym.value + _bug_target(reloc.addend, field_offset)
    return _section_ref(reloc.sym.sec, where, 0, frags)


# ------------------------------------------------------------------------------------------
# The proof


def prove_images(payload: PayloadImage, patched: LinkedImage, orig: LinkedImage,
                 candidates: Iterable[str], report: ProofReport) -> ProofReport:
    """Equivalence of every function the payload carries with ``patched``, and completeness:
    the functions among ``candidates`` (every function of the objects the patched build
    recompiled) that differ between ``orig`` and ``patched`` are exactly the payload's."""
    report.payload_build_id = _payload_build_id(payload.elf)
    report.base_build_id = orig.build_id.hex()
    report.patched_build_id = patched.build_id.hex()
    if payload.xen_depends and payload.xen_depends != orig.build_id:
        report.reason = (f"the payload is for the hypervisor {payload.xen_depends.hex()}, not "
                         f"the base {orig.build_id.hex()}")
        return report
    patched.aliases = static_aliases(orig, patched)
    if patched.aliases:
        report.notes.append("renumbered static locals taken as the original's: " + ", ".join(
            f"{new} = {old}" for new, old in sorted(patched.aliases.items())))
    by_id = {id(s): n for n, s in payload.replaced.items()}
    units = {by_id.get(id(sym), name): (sym, payload_unit(payload, sym,
                                                          by_id.get(id(sym), name)))
             for name, sym in payload.functions.items()}
    carried: set[str] = set()
    for target, (sym, mine) in sorted(units.items()):
        proof = FunctionProof(target, "replaced" if id(sym) in by_id else "new")
        if proof.role == "replaced" or target not in orig.functions or _cold_part_of(
                target, by_id.values()):
            carried.add(target)
        else:
            # Hypervisor code that calls the function keeps calling the original: a changed
            # function must be replaced, a copy is not enough.  Only a .cold part is reached
            # from its parent alone, so a new copy of it serves the replaced parent.
            report.notes.append(f"{target}: the payload's copy does not replace the "
                                "hypervisor's function of that name (not in .livepatch.funcs)")
        proof.instructions, proof.fragments = len(mine.insns), len(mine.fragments)
        for kind, attr in ((DiffKind.ALTERNATIVE, "alternatives"), (DiffKind.EX_TABLE,
                           "ex_table"), (DiffKind.BUG_FRAME, "bug_frames")):
            setattr(proof, attr, sum(e.kind is kind for e in mine.entries))
        theirs = linked_unit(patched, target)
        if theirs is None:
            proof.differences.append(Difference(DiffKind.ABSENT, target))
        else:
            proof.differences += compare_units(mine, theirs)
        report.functions.append(proof)
    for name in sorted(set(payload.replaced) - carried):
        report.notes.append(f"{name}: replaced by a symbol that is not a payload function")
    changed = changed_functions(orig, patched, candidates)
    for name in list(changed):  # a changed .cold part is reached only through its parent,
        parent = _cold_parent(name, patched)  # which must be replaced to reach the new one
        if parent is not None and parent not in changed:
            changed[parent] = f"its unlikely path {name} changed"
    report.changed_in_xen = sorted(changed)
    report.missing = [Difference(DiffKind.MISSING, n, detail=changed[n])
                      for n in sorted(set(changed) - carried)]
    report.extra = [Difference(DiffKind.EXTRA, n) for n in sorted(carried - set(changed))
                    if n in payload.replaced]
    report.decide()
    return report


_STATIC_LOCAL = re.compile(r"^(.+#[^#]+)\.(\d+)$")


def static_aliases(orig: LinkedImage, patched: LinkedImage) -> dict[str, str]:
    """Static locals gcc renumbered (``f.c#count.0`` -> ``f.c#count.1``, its counter is shared
    by every static local of the file): when a file has as many ``base.N`` data symbols in
    both hypervisors, the k-th by address in the patched one continues the k-th in the
    original (the differ binds the payload to the running hypervisor's, whose state carries
    over).  Only differing names are returned; a static added or removed maps nothing."""
    def groups(image: LinkedImage) -> dict[str, list[str]]:
        out: dict[str, list[tuple[int, str]]] = {}
        for name, sym in image.syms.by_name.items():
            m = _STATIC_LOCAL.match(name)
            if m and not sym.is_func and sym.is_local:
                out.setdefault(m.group(1), []).append((sym.addr, name))
        return {base: [n for _a, n in sorted(v)] for base, v in out.items()}

    old = groups(orig)
    aliases: dict[str, str] = {}
    for base, names in groups(patched).items():
        before = old.get(base, [])
        if len(before) == len(names):
            aliases.update((new, was) for new, was in zip(names, before, strict=True)
                           if new != was)
    return aliases


def _cold_part_of(name: str, replaced: Iterable[str]) -> bool:
    """``foo.cold`` (gcc's split-off unlikely path) of a replaced ``foo`` (the parent may be
    global, the part is always local: compared without the ``file#``)."""
    parent, dot, suffix = name.rpartition(".cold")
    bare = {r.rpartition("#")[2] for r in replaced}
    return bool(dot) and suffix.strip(".0123456789") == "" and (
        parent in set(replaced) or parent.rpartition("#")[2] in bare)


def _cold_parent(name: str, image: LinkedImage) -> str | None:
    parent, dot, suffix = name.rpartition(".cold")
    if not dot or suffix.strip(".0123456789"):
        return None
    for cand in (parent, parent.rpartition("#")[2]):
        if cand in image.functions:
            return cand
    return None


def _payload_build_id(elf: Elf) -> str:
    note = elf.section(xen_abi.SEC_BUILD_ID)
    return parse_build_id_note(note.data).hex() if note is not None else ""


def changed_functions(orig: LinkedImage, patched: LinkedImage,
                      candidates: Iterable[str]) -> dict[str, str]:
    """Functions among ``candidates`` whose normal form differs between the two hypervisors
    (bug-frame line numbers aside), init code excluded; name -> what differs."""
    out: dict[str, str] = {}
    for name in sorted(set(candidates)):
        new = patched.functions.get(name)
        if new is None or patched.is_init(new.addr):
            continue
        old = orig.functions.get(name)
        if old is None:
            out[name] = "new in the patched hypervisor"
            continue
        a, b = linked_unit(orig, name), linked_unit(patched, name)
        assert a is not None and b is not None
        diffs = compare_units(a, b, lines=False, exact=True)
        if diffs:
            d = diffs[0]
            at = f" at +{d.offset:#x}" if d.offset is not None else ""
            out[name] = f"{d.kind}{at}: `{d.payload}` -> `{d.xen}`"
    return out


# ------------------------------------------------------------------------------------------
# From a payload, a tree and patches


@dataclass(frozen=True, slots=True)
class ProveOptions:
    """What ``xsbuild prove`` was asked to do."""

    payload: Path
    srcdir: Path
    patches: tuple[Path, ...]
    xen_syms: Path | None = None  # the original hypervisor; default: the base tree's
    jobs: int = 2


def prove_payload(opts: ProveOptions, progress: Callable[[str], None] = lambda _: None
                  ) -> ProofReport:
    """Build the patched hypervisor (incrementally, in the private copy) and prove the payload
    against it.  Bad input raises :class:`UsageError`; a proof that cannot be made returns a
    report with verdict ``cannot-judge`` and the reason."""
    import tempfile
    import time

    from xsbuild.patched import CannotJudgeError, build_patched, object_functions

    report = ProofReport(str(opts.payload))
    start = time.monotonic()
    payload = PayloadImage.load(opts.payload)
    base = _base_tree(opts.srcdir, opts.jobs, progress)
    orig = LinkedImage(opts.xen_syms or base / "xen" / "xen-syms")
    base_image = base / "xen" / "xen-syms"
    base_id = orig.build_id if opts.xen_syms is None else read_build_id(base_image)
    if base_id != orig.build_id:
        report.reason = (f"--xen-syms {opts.xen_syms} has build-id {orig.build_id.hex()} but "
                         f"the tree {base} built {base_id.hex()}")
        return report
    report.timings["read"] = round(time.monotonic() - start, 3)
    try:
        built = build_patched(base, opts.patches, jobs=opts.jobs, progress=progress)
    except CannotJudgeError as exc:
        report.reason = str(exc)
        return report
    report.timings.update(built.timings)
    start = time.monotonic()
    with tempfile.NamedTemporaryFile(prefix="xsbuild-patched-xen-syms-") as f:
        f.write(built.xen_syms)
        f.flush()
        patched = LinkedImage(f.name)
    candidates: set[str] = set()
    for obj in built.rebuilt_objects:
        candidates |= object_functions(obj)
    report.notes.append(f"make rebuilt {len(built.rebuilt_objects)} object(s): "
                        + ", ".join(str(o.relative_to(built.copy / 'xen'))
                                    for o in built.rebuilt_objects[:20]))
    prove_images(payload, patched, orig, candidates, report)
    report.timings["compare"] = round(time.monotonic() - start, 3)
    return report


def _base_tree(srcdir: Path, jobs: int, progress: Callable[[str], None]) -> Path:
    from xsbuild.build import find_top

    top = find_top(srcdir)
    if (top / "xen" / "xen-syms").is_file() and (top / "xen" / ".config").is_file():
        return top
    from xsbuild.debian import cached_base_build

    return cached_base_build(top, jobs=jobs, progress=progress)


# ------------------------------------------------------------------------------------------
# Text


def report_text(report: ProofReport) -> str:
    lines = [f"{report.payload}: {report.verdict}"]
    if report.verdict is Verdict.CANNOT_JUDGE:
        lines.append(f"  cannot judge: {report.reason}")
        return "\n".join(lines) + "\n"
    lines.append(f"  base {report.base_build_id}, patched build {report.patched_build_id}")
    for f in report.functions:
        what = (f"{f.instructions} instructions, {f.fragments} unnamed fragment(s), "
                f"{f.alternatives} alternative(s), {f.ex_table} ex_table, "
                f"{f.bug_frames} bug frame(s)")
        lines.append(f"  {'same' if f.proven else 'DIFFERS'}  {f.role:8} {f.name} ({what})")
    changed = ", ".join(report.changed_in_xen) or "none"
    lines.append(f"  functions the patch changes in the hypervisor: {changed}")
    for d in report.differences():
        lines.append(f"  - {d.describe()}")
    return "\n".join(lines) + "\n"


def report_html(report: ProofReport) -> str:
    """One self-contained page: the verdict, every function with its status, every
    difference with both instructions."""
    from html import escape

    rows = []
    for f in report.functions:
        diffs = "".join(f"<div class=d><code>{escape(d.describe())}</code></div>"
                        for d in f.differences)
        rows.append(f"<tr class={'ok' if f.proven else 'bad'}><td>{escape(f.name)}</td>"
                    f"<td>{f.role}</td><td>{'same' if f.proven else 'differs'}</td>"
                    f"<td>{f.instructions}</td><td>{f.fragments}/{f.alternatives}/"
                    f"{f.ex_table}/{f.bug_frames}</td><td>{diffs}</td></tr>")
    other = "".join(f"<li><code>{escape(d.describe())}</code></li>"
                    for d in report.missing + report.extra)
    reason = f"<p>cannot judge: {escape(report.reason)}</p>" if report.reason else ""
    return f"""<!doctype html>
<html><head><meta charset=utf-8><title>proof of {escape(report.payload)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 8px;text-align:left;
vertical-align:top}} tr.ok td:nth-child(3){{color:#070}} tr.bad td:nth-child(3){{color:#b00}}
.verdict{{font-size:1.4em}} code{{white-space:pre-wrap}}</style></head><body>
<h1>Proof of {escape(report.payload)}</h1>
<p class=verdict>verdict: <b>{report.verdict}</b></p>{reason}
<p>base {report.base_build_id}, patched build {report.patched_build_id}, payload
{report.payload_build_id}</p>
<table><tr><th>function</th><th>role</th><th>status</th><th>instructions</th>
<th>fragments/alternatives/ex_table/bug frames</th><th>differences</th></tr>
{''.join(rows)}</table>
<h2>Completeness</h2><p>functions the patch changes in the hypervisor:
{escape(', '.join(report.changed_in_xen) or 'none')}</p><ul>{other}</ul>
</body></html>
"""
