"""The hypervisor's own symbol table, read from ``xen-syms``, named as Xen names them at run time.

Xen's loader resolves a payload's undefined symbols (and ``funcs[].name`` when ``old_addr`` is 0)
by exact string compare against the table that ``xen/tools/symbols`` builds into the hypervisor
(spec §7): global symbols under their plain name, local ones as ``<STT_FILE>#<name>`` where the
file is the most recent STT_FILE before the symbol in ``.symtab`` order.  With
CONFIG_ENFORCE_UNIQUE_SYMBOLS the file is the source path relative to ``xen/``, for example
``common/version.c#build_info``.  Absolute, undefined, file and section symbols are not in the
table, nor names that start with ``$`` or contain ``_compiled.``.

``xen-syms`` is large (3 MB, ~20,000 symbols); it is decoded by :mod:`xsbuild.elfraw`, the
symbol table in one ``struct`` pass.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

from xsbuild import xen_abi
from xsbuild.elfraw import read_raw
from xsbuild.errors import ElfParseError, UsageError

_STT_SECTION, _STT_FILE = 3, 4
_STB_LOCAL = 0
_SHN_ABS = 0xFFF1


@dataclass(frozen=True, slots=True)
class XenSymbol:
    name: str  # as stored in the hypervisor's table (statics as path#name)
    addr: int
    size: int
    is_func: bool
    is_local: bool


class XenSymbols:
    """Name -> symbol for one hypervisor build, plus its build-id and its code bytes."""

    def __init__(self, path: str, build_id: bytes, symbols: dict[str, XenSymbol],
                 text: list[tuple[int, bytes]],
                 data: tuple[tuple[str, int, memoryview], ...] = ()) -> None:
        self.path = path
        self.build_id = build_id
        self.by_name = symbols
        self._text = text  # (start address, bytes) of each executable SHF_ALLOC PROGBITS section
        self.data = data  # (name, address, bytes) of each non-executable SHF_ALLOC PROGBITS
        self._by_addr: list[tuple[int, XenSymbol]] | None = None  # built on first symbol_at
        self._max_size = 0

    def lookup(self, name: str) -> XenSymbol | None:
        return self.by_name.get(name)

    def symbol_at(self, addr: int) -> XenSymbol | None:
        """The symbol at or covering ``addr`` (functions preferred), for naming call and jump
        targets in disassembly; None when none does.  A zero-size symbol (an assembly label such
        as a thunk) names only its own address."""
        by_addr = self._sorted()
        i = bisect.bisect_right(by_addr, addr, key=lambda e: e[0])
        while i > 0:
            start, sym = by_addr[i - 1]
            if start == addr or start + sym.size > addr:
                return sym
            if addr - start >= self._max_size:  # no symbol is big enough to reach further
                return None
            i -= 1
        return None

    def starting_at(self, addr: int) -> list[XenSymbol]:
        """Every symbol at exactly ``addr``: an object and the linker labels that share its
        address (``nr_cpu_ids`` and ``__init_end``, ``_stext`` and ``_start``)."""
        by_addr = self._sorted()
        lo = bisect.bisect_left(by_addr, addr, key=lambda e: e[0])
        hi = bisect.bisect_right(by_addr, addr, key=lambda e: e[0])
        return [sym for _a, sym in by_addr[lo:hi]]

    def _sorted(self) -> list[tuple[int, XenSymbol]]:
        if self._by_addr is None:
            # Functions sort after objects at one address, so the last entry <= addr wins a tie.
            self._by_addr = sorted(((s.addr, s) for s in self.by_name.values()),
                                   key=lambda e: (e[0], e[1].is_func, e[1].size, e[1].name))
            self._max_size = max((s.size for s in self.by_name.values()), default=0)
        return self._by_addr

    def data_at(self, addr: int) -> tuple[str, int, memoryview] | None:
        """(section name, offset, bytes from ``addr`` to the section's end) when ``addr`` is in
        a data section, where string literals and constants live; else None."""
        for name, start, body in self.data:
            if start <= addr < start + len(body):
                return name, addr - start, body[addr - start:]
        return None

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def read(self, addr: int, length: int) -> bytes:
        """Bytes of the hypervisor image at ``addr`` (b"" when not in a loaded section)."""
        for start, body in self._text:
            if start <= addr and addr + length <= start + len(body):
                return body[addr - start:addr - start + length]
        return b""

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> XenSymbols:
        label = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"{label}: cannot read xen-syms: {exc.strerror or exc}") from exc
        from xsbuild.elf import check_elf_header

        check_elf_header(label, data)  # not an ELF, truncated, another machine: one line, exit 2
        return _parse(label, data)


def _parse(label: str, data: bytes) -> XenSymbols:
    ef = read_raw(label, data)
    symtab = ef.section(".symtab")
    if symtab is None:
        raise ElfParseError(f"{label}: no .symtab: need the unstripped xen-syms (Debian: the "
                            "-dbg package's /usr/lib/debug/boot/xen-syms-*)")
    note = ef.section(xen_abi.SEC_BUILD_ID)
    build_id = parse_build_id_note(ef.body(note)) if note is not None else b""
    if not build_id:
        raise ElfParseError(f"{label}: no GNU build-id note; livepatch needs a hypervisor built "
                            "with a build-id")
    alloc = {sec.index for sec in ef.sections if sec.flags & 0x2}
    text = [(sec.addr, ef.body(sec)) for sec in ef.sections
            if sec.flags & 0x4 and sec.type == 1]  # SHF_EXECINSTR, SHT_PROGBITS
    symbols: dict[str, XenSymbol] = {}
    current_file = ""
    for rsym in ef.symbols(symtab):
        name, stype, st_shndx = rsym.name, rsym.type, rsym.shndx
        if stype == _STT_FILE:
            current_file = name
            continue
        if (stype == _STT_SECTION or not name or st_shndx == 0 or st_shndx == _SHN_ABS
                or st_shndx not in alloc or name.startswith("$") or "_compiled." in name):
            continue
        is_local = rsym.bind == _STB_LOCAL
        full = f"{current_file}#{name}" if is_local else name
        symbols.setdefault(full, XenSymbol(full, rsym.value, rsym.size, stype == 2, is_local))
    # Data sections (SHF_ALLOC, not EXECINSTR), where string literals and constants live, to
    # name what old code reads.  Not only read-only ones: Xen links .rodata writable.  ~1 MiB.
    data_secs = tuple((sec.name, sec.addr, memoryview(ef.body(sec))) for sec in ef.sections
                      if sec.type == 1 and sec.flags & 0x6 == 0x2)
    return XenSymbols(label, build_id, symbols, text, data_secs)


def parse_build_id_note(note: bytes) -> bytes:
    """The descriptor of a GNU build-id note, or b"" if the note is not one (spec §1.6)."""
    hdr = xen_abi.NOTE_HEADER
    if len(note) <= hdr.size:
        return b""
    namesz, descsz, ntype = hdr.unpack_from(note)
    if ntype != xen_abi.NT_GNU_BUILD_ID or namesz < 4 or descsz == 0:
        return b""
    if namesz + descsz > len(note) - hdr.size:
        return b""
    if note[hdr.size:hdr.size + namesz] != xen_abi.NOTE_NAME_GNU:
        return b""
    desc_off = hdr.size + ((namesz + 3) & ~3)
    return note[desc_off:desc_off + descsz]


def read_build_id(path: str | os.PathLike[str]) -> bytes:
    """The GNU build-id of an ELF file (``xen-syms`` or a payload), without reading its
    symbols; :class:`UsageError` when there is none."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        ef = read_raw(str(path), data)
        sec = ef.section(xen_abi.SEC_BUILD_ID)
        note = ef.body(sec) if sec is not None else b""
    except ElfParseError as exc:
        raise UsageError(f"{path}: not an ELF file: {exc}") from exc
    build_id = parse_build_id_note(note)
    if not build_id:
        raise UsageError(f"{path}: no GNU build-id note")
    return build_id


def build_id_note(build_id: bytes) -> bytes:
    """A GNU build-id note carrying ``build_id`` (the layout ``ld --build-id`` writes)."""
    return (xen_abi.NOTE_HEADER.pack(len(xen_abi.NOTE_NAME_GNU), len(build_id),
                                     xen_abi.NT_GNU_BUILD_ID)
            + xen_abi.NOTE_NAME_GNU + build_id + b"\0" * (-len(build_id) % 4))
