"""The normal form both sides are compared in: instructions with their address fields masked
and named by what they designate, unnamed code as numbered fragments, special entries."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from xsbuild import xen_abi
from xsbuild.elf import Section
from xsbuild.prove.report import Difference, DiffKind
from xsbuild.relocs import disassembler

MAX_FRAGMENT = 64  # instructions followed in one fragment of unnamed code
MAX_STRING = 256  # bytes of a string literal compared (up to its NUL)
PC_RELATIVE = frozenset({xen_abi.R_X86_64_PC32, xen_abi.R_X86_64_PLT32})
TERMINATORS = frozenset({"jmp", "ret", "ud2", "int3", "hlt"})


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
        return all(_exact_key(x) == _exact_key(y) for x, y in zip(a, b, strict=True))
    return all(set(x) & set(y) for x, y in zip(a, b, strict=True))


def _exact_key(ref: Ref) -> Ref:
    """What must agree between two hypervisors: the literal when there is one (a string's
    neighbours in ``.rodata`` move when the patch adds or drops an object: the name of the
    object that ends before it is noise), else the first name (the covering symbol; the
    labels that share its address are aliases)."""
    literal = tuple(r for r in ref if r[:1] in ('"', "="))
    return literal or ref[:1]


def alt_fields(alt: object) -> tuple[object, ...]:
    """An ``xen_abi.ALT_INSTR`` record's fields compared exactly (the two offsets are compared as
    the site and the replacement's code instead)."""
    return tuple(f"{name}={getattr(alt, name)}"
                 for name in ("cpuid", "orig_len", "repl_len", "pad_len", "priv"))


@dataclass(frozen=True, slots=True)
class Entry:
    """An alternative, exception-table entry or bug frame whose site is in the function, in
    normal form: ``fields`` compared exactly, ``refs`` compared as targets, ``line`` (bug
    frames) compared only for equivalence (the differ does not carry line-only changes)."""

    kind: DiffKind
    offset: int  # of the patch site in the function (or in the fragment ``where`` names)
    fields: tuple[object, ...]
    refs: tuple[Ref, ...] = ()
    code: tuple[NInsn, ...] = ()  # an alternative's replacement
    line: int = 0
    where: str = ""  # "code#k" for a site in unnamed code the function reaches

    def text(self) -> str:
        refs = " ".join("<" + "|".join(r) + ">" for r in self.refs)
        code = "; ".join(i.text for i in self.code)
        at = f"{self.where}+{self.offset:#x}" if self.where else f"+{self.offset:#x}"
        parts = [f"{self.kind} at {at}", " ".join(map(str, self.fields)), refs]
        if self.kind is DiffKind.BUG_FRAME:
            parts.append(f"line {self.line}")
        if code:
            parts.append(f"[{code}]")
        return " ".join(p for p in parts if p)

    def same_as(self, other: Entry, *, lines: bool, exact: bool = False) -> bool:
        return (self.kind == other.kind and self.offset == other.offset
                and self.where == other.where
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


def _entry_order(e: Entry) -> tuple[str, str, int, str]:
    return (e.where, str(e.kind), e.offset, repr(e.fields))


def _pair_entries(a: list[Entry], b: list[Entry]) -> Iterable[tuple[Entry | None, Entry | None]]:
    """Pair entries by (kind, site); the leftovers pair with nothing."""
    rest = list(b)
    for x in a:
        match = next((y for y in rest if y.kind == x.kind and y.offset == x.offset
                      and y.where == x.where), None)
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


@dataclass(frozen=True, slots=True)
class Field:
    """An address field of one instruction: where it is and what kind it is."""

    at: int  # offset in the instruction
    size: int
    pc_relative: bool  # branch displacement or RIP-relative displacement
    target: int  # as decoded (absolute, or section offset for relocatable code)
    operand_size: int  # bytes a memory operand reads (0: the address itself is used)
    maybe_constant: bool = False  # a 64-bit immediate: an address only if it points at one


def decode(code: bytes, base: int) -> Iterable[tuple[object, list[Field]]]:
    """Capstone instructions with their address fields; an undecodable byte ends decoding."""
    from capstone import x86

    for insn in disassembler(detail=True).disasm(code, base):
        fields: list[Field] = []
        is_branch = bool(set(insn.groups) & {x86.X86_GRP_JUMP, x86.X86_GRP_CALL})
        lea = insn.mnemonic == "lea"
        for op in insn.operands:
            if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP:
                target = insn.address + insn.size + op.mem.disp
                fields.append(Field(insn.disp_offset, insn.disp_size, True, target,
                                     0 if lea or is_branch else op.size))
            elif op.type == x86.X86_OP_IMM and is_branch and insn.imm_size:
                fields.append(Field(insn.imm_offset, insn.imm_size, True,
                                     op.imm & (2**64 - 1), 0))
            elif op.type == x86.X86_OP_IMM and insn.imm_size == 8:
                fields.append(Field(insn.imm_offset, 8, False, op.imm & (2**64 - 1), 0, True))
        yield insn, fields


def mask(raw: bytes, spans: Iterable[tuple[int, int]]) -> bytes:
    out = bytearray(raw)
    for at, size in spans:
        out[at:at + size] = bytes(size)
    return bytes(out)


def insn_text(insn: object, refs: list[Ref]) -> str:
    text = f"{insn.mnemonic} {insn.op_str}".strip()  # type: ignore[attr-defined]
    if refs:
        text += "  <" + ">, <".join("|".join(r) for r in refs) + ">"
    return text


def content_ref(body: bytes) -> str:
    """A read-only object by its bytes (``with_offset`` adds where in it): a payload's own
    copy of a static string such as ``__func__.4`` is the same data as the patched
    hypervisor's, whatever number gcc gave each; pointer tables never match this way (a
    payload's fields are not relocated yet) and go by name."""
    return f"bytes:{len(body)}:{hashlib.blake2b(body, digest_size=8).hexdigest()}"


def data_ref(body: bytes, operand_size: int) -> Ref:
    """Unnamed data by content: the value read (its operand size) or, for an address taken,
    the string starting there."""
    if operand_size:
        return (f"={body[:operand_size].hex()}",)
    end = body.find(b"\0", 0, MAX_STRING)
    raw = body[:end + 1] if end >= 0 else body[:MAX_STRING]
    return ('"' + raw.rstrip(b"\0").decode("utf-8", "backslashreplace")
            .replace("\n", "\\n") + '"',)


class Fragments:
    """Unnamed code reached from a function, numbered in the order it is first reached."""

    def __init__(self) -> None:
        self.keys: dict[object, int] = {}
        self.todo: list[tuple[int, object]] = []
        self.sections: dict[int, Section] = {}  # payload side: id -> the section a key names
        # Alternatives' replacement code, (space, start, end): a fragment starting inside one
        # ends with it on both sides.  (A payload keeps only its own replacements, xen-syms
        # every one back to back, so decoding on would compare unrelated code.)  The space is
        # the payload section's id, or None for the hypervisor's addresses.
        self.bounded: list[tuple[int | None, int, int]] = []

    def bound(self, space: int | None, start: int, end: int) -> None:
        self.bounded.append((space, start, end))

    def end_of(self, space: int | None, where: int, default: int) -> int:
        """Where a fragment starting at ``where`` must stop decoding."""
        return next((end for sp, start, end in self.bounded
                     if sp == space and start <= where < end), default)

    def ref(self, key: object, delta: int = 0) -> Ref:
        if key not in self.keys:
            self.keys[key] = len(self.keys)
            self.todo.append((self.keys[key], key))
        return (f"code#{self.keys[key]}" + (f"+{delta:#x}" if delta else ""),)


def decoded_end(insns: list[NInsn]) -> int:
    """How far from its start a fragment's decoded instructions reach."""
    return insns[-1].offset + len(insns[-1].masked) if insns else 0


def is_terminator(insn: object) -> bool:
    return insn.mnemonic.split()[-1] in TERMINATORS  # type: ignore[attr-defined]



def bug_disp(value: int) -> int:
    """The displacement in the low BUG_DISP_WIDTH bits of a bug-frame field (sign-extended)."""
    width = xen_abi.BUG_DISP_WIDTH
    low = value & ((1 << width) - 1)
    return low - (1 << width) if low & (1 << (width - 1)) else low


def bug_line_bits(value: int) -> int:
    """The source-line bits a bug-frame field keeps above its displacement."""
    return ((value - bug_disp(value)) >> xen_abi.BUG_DISP_WIDTH) & 0xFF


def with_offset(name: str, off: int) -> str:
    return name if off == 0 else f"{name}{off:+#x}"


