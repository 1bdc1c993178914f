"""The linked side: a hypervisor (``xen-syms``) and its functions in normal form; targets are
absolute addresses named through its symbol table."""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from xsbuild import xen_abi
from xsbuild.prove.normal import (
    MAX_FRAGMENT,
    MAX_STRING,
    Entry,
    Fragments,
    NInsn,
    Ref,
    Unit,
    alt_fields,
    bug_disp,
    bug_line_bits,
    content_ref,
    data_ref,
    decode,
    decoded_end,
    insn_text,
    is_terminator,
    mask,
    with_offset,
)
from xsbuild.prove.report import DiffKind
from xsbuild.xensyms import XenSymbol, XenSymbols

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
        # entries whose site no function covers (unnamed code), (site, kind, address, type)
        self._loose: list[tuple[int, str, int, int]] = []
        self._by_end: dict[int, tuple[str, int]] | None = None
        self._contents: dict[int, str] = {}  # data object's address -> content_ref at +0
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
        return self._index_entries().get(func, [])

    def entries_between(self, start: int, end: int) -> list[tuple[int, str, int, int]]:
        """(site, kind, entry address, type) of the entries whose site is in unnamed code
        between ``start`` and ``end``."""
        self._index_entries()
        lo = bisect.bisect_left(self._loose, (start,))
        hi = bisect.bisect_left(self._loose, (end,))
        return self._loose[lo:hi]

    def _index_entries(self) -> dict[str, list[tuple[str, int, int]]]:
        """Every special entry once: by the function its site is in, else (unnamed code) in
        ``_loose`` by site."""
        if self._entries is None:
            self._entries = {}
            for kind, addr, typ, site in self._all_entries():
                owner = self.syms.symbol_at(site)
                if owner is not None and owner.is_func:
                    self._entries.setdefault(owner.name, []).append((kind, addr, typ))
                elif self.section_at(site) is not None:
                    self._loose.append((site, kind, addr, typ))
            self._loose.sort()
        return self._entries

    def _all_entries(self) -> Iterable[tuple[str, int, int, int]]:
        start, end = self._range(*xen_abi.XEN_ALT_RANGE, xen_abi.SEC_ALTINSTRUCTIONS)
        for addr in range(start, end, xen_abi.ALT_INSTR_SIZE):
            at = addr + xen_abi.ALT_OFF_ORIG
            yield "alt", addr, 0, at + _s32(self.read(at, 4))
        start, end = self._range(*xen_abi.XEN_EX_TABLE_RANGE, xen_abi.SEC_EX_TABLE)
        for addr in range(start, end, xen_abi.EX_TABLE_ENTRY_SIZE):
            at = addr + xen_abi.EX_TABLE_OFF_ADDR
            yield "ex", addr, 0, at + _s32(self.read(at, 4))
        start, end = self._range(*xen_abi.XEN_ALT_CALL_RANGE, xen_abi.SEC_ALT_CALL_SITES)
        for addr in range(start, end, xen_abi.ALT_CALL.size):
            yield "altcall", addr, 0, addr + _s32(self.read(addr, 4))
        for typ, section in enumerate(xen_abi.BUG_FRAME_SECTIONS):
            step = xen_abi.special_entry_size(section)
            start, end = self._range(*xen_abi.XEN_BUG_FRAME_RANGES[typ], section)
            for addr in range(start, end, step):
                value = _u32(self.read(addr + xen_abi.BUG_FRAME_OFF_LOC, 4))
                yield "bug", addr, typ, addr + bug_disp(value)

    def target_ref(self, addr: int, operand_size: int, frags: Fragments) -> Ref:
        """What hypervisor code designates at ``addr``: symbol + offset (also the object that
        ends there), else unnamed code as a fragment, unnamed data by its bytes."""
        names: list[str] = []
        sym = self.syms.symbol_at(addr)
        if sym is not None:
            names.append(with_offset(self.aliases.get(sym.name, sym.name), addr - sym.addr))
        # Every name of that address: a payload's relocation may use any of them (an object
        # and the linker label it shares its address with, two labels of one place).
        sharing = [s for s in self.syms.starting_at(addr) if s is not sym]
        names += sorted(self.aliases.get(s.name, s.name) for s in sharing)
        sized = (sym is not None and sym.size > 0) or any(s.size for s in sharing)
        ended = self._ends().get(addr)
        if ended is not None and not sized:
            names.append(with_offset(ended[0], ended[1]))
        sec = self.section_at(addr)
        if sized:  # inside a sized symbol: that is what it is
            # Data also by its bytes (xen-syms' .rodata is not marked read-only, so any
            # object: only a payload's read-only copy offers a content to match it).
            if sym is not None and sym.size and not sym.is_func and sec is not None \
                    and not sec.executable:
                names.append(self._content(sym, sec) + with_offset("", addr - sym.addr))
            return tuple(names)
        if sec is None:
            return tuple(names) or (f"abs:{addr:#x}",)
        if sec.executable:
            return tuple(names) or frags.ref(("x", addr))
        # a label or the end of an object: the payload side may see a literal there
        at = addr - sec.addr  # a bounded slice: a whole .rodata copy per reference is slow
        return tuple(names) + data_ref(sec.data[at:at + MAX_STRING], operand_size)

    def _content(self, sym: XenSymbol, sec: _LinkedSection) -> str:
        """A data object by its bytes, hashed once (code refers to big tables often)."""
        if sym.addr not in self._contents:
            at = sym.addr - sec.addr
            self._contents[sym.addr] = content_ref(sec.data[at:at + sym.size])
        return self._contents[sym.addr]

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



def linked_unit(image: LinkedImage, name: str) -> Unit | None:
    """The function ``name`` of a linked hypervisor in normal form (None: no such function)."""
    sym = image.functions.get(name)
    if sym is None:
        return None
    frags = Fragments()
    insns = _linked_insns(image, sym.addr, image.read(sym.addr, sym.size), frags, sym.addr)
    entries = [_linked_entry(image, kind, addr, typ, sym.addr, frags)
               for kind, addr, typ in image.entries_for(name)]
    return Unit(name, insns, _linked_fragments(image, frags, entries), entries)


def _linked_insns(image: LinkedImage, addr: int, code: bytes, frags: Fragments,
                  origin: int, *, fragment: bool = False) -> list[NInsn]:
    out: list[NInsn] = []
    for insn, found in decode(code, addr):
        fields = [f for f in found
                  if not f.maybe_constant or image.section_at(f.target) is not None]
        refs = [image.target_ref(f.target, f.operand_size, frags) for f in fields]
        raw = bytes(insn.bytes)  # type: ignore[attr-defined]
        masked = mask(raw, ((f.at, f.size) for f in fields))
        out.append(NInsn(insn.address - origin, insn_text(insn, refs), masked,  # type: ignore
                         tuple(refs)))
        if fragment and (is_terminator(insn) or len(out) >= MAX_FRAGMENT):
            break
    return out


def _linked_fragments(image: LinkedImage, frags: Fragments,
                      entries: list[Entry]) -> list[list[NInsn]]:
    """The unnamed code reached, fragment by fragment, adding to ``entries`` those whose site
    is in it (the bug frames of an unlikely path's ``ud2``)."""
    out: list[list[NInsn]] = []
    while frags.todo:
        k, key = frags.todo.pop(0)
        addr = key[1]  # type: ignore[index]
        sec = image.section_at(addr)
        end = frags.end_of(None, addr, addr + 16 * MAX_FRAGMENT)
        code = sec.data[addr - sec.addr:end - sec.addr] if sec else b""
        insns = _linked_insns(image, addr, code, frags, addr, fragment=True)
        out.append(insns)
        for _site, kind, at, typ in image.entries_between(addr, addr + decoded_end(insns)):
            entries.append(_linked_entry(image, kind, at, typ, addr, frags, f"code#{k}"))
    return out


def _linked_entry(image: LinkedImage, kind: str, addr: int, typ: int, func_addr: int,
                  frags: Fragments, where: str = "") -> Entry:
    """The entry at ``addr``, its site relative to ``func_addr`` (the function's, or the
    start of the fragment ``where`` names)."""
    if kind == "alt":
        alt = xen_abi.ALT_INSTR.unpack(image.read(addr, xen_abi.ALT_INSTR_SIZE))
        repl_addr = addr + xen_abi.ALT_OFF_REPL + alt.repl_offset
        frags.bound(None, repl_addr, repl_addr + alt.repl_len)
        code = _linked_insns(image, repl_addr, image.read(repl_addr, alt.repl_len), frags,
                             repl_addr)
        return Entry(DiffKind.ALTERNATIVE, addr + alt.orig_offset - func_addr,
                     alt_fields(alt), code=tuple(code), where=where)
    if kind == "ex":
        site_at, cont_at = addr + xen_abi.EX_TABLE_OFF_ADDR, addr + xen_abi.EX_TABLE_OFF_CONT
        return Entry(DiffKind.EX_TABLE, site_at + _s32(image.read(site_at, 4)) - func_addr, (),
                     (image.target_ref(cont_at + _s32(image.read(cont_at, 4)), 0, frags),),
                     where=where)
    if kind == "altcall":
        return Entry(DiffKind.ALT_CALL, addr + _s32(image.read(addr, 4)) - func_addr, (),
                     where=where)
    loc = _u32(image.read(addr + xen_abi.BUG_FRAME_OFF_LOC, 4))
    ptr = _u32(image.read(addr + xen_abi.BUG_FRAME_OFF_PTR, 4))
    refs: list[Ref] = [image.target_ref(addr + bug_disp(ptr), 0, frags)]
    if xen_abi.BUG_FRAME_SECTIONS[typ] == xen_abi.BUG_FRAME_ASSERT:  # the message follows
        msg = _u32(image.read(addr + xen_abi.BUG_FRAME_OFF_MSG, 4))
        refs.append(image.target_ref(addr + bug_disp(msg), 0, frags))
    line = (bug_line_bits(loc) << 8) | bug_line_bits(ptr)
    return Entry(DiffKind.BUG_FRAME, addr + bug_disp(loc) - func_addr,
                 (f"type={typ}",), tuple(refs), line=line, where=where)


def _s32(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True)


def _u32(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


