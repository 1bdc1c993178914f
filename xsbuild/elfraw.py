"""The one ELF reader: headers, sections, symbols and notes of an ELF64 little-endian file, as raw
integers.

Nothing is interpreted beyond the gABI layout: a section's type is the number in its header, so
a read-then-write never changes it, and every caller (the object model :mod:`xsbuild.elf`, the
hypervisor's table :mod:`xsbuild.xensyms`) applies its own rules on top.  Every malformation
this layer can see (a table past the end of the file, a name outside its string table) is an
:class:`~xsbuild.errors.ElfParseError` naming the file; nothing else is caught here, so a bug in
xsbuild stays a bug (exit 70) instead of turning into "malformed ELF".

``bench/elf_readers.py`` measures this reader against pyelftools (and lief, when installed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from xsbuild import xen_abi
from xsbuild.errors import ElfParseError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB = 2, 1
# The gABI numbers every ELF module of xsbuild uses (the object model re-exports them); the
# structure layouts are xen_abi.ELF64_EHDR, ELF64_SHDR, ELF64_SYM and ELF64_RELA.
SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA = 0, 1, 2, 3, 4
SHT_NOTE, SHT_NOBITS, SHT_REL, SHT_GROUP = 7, 8, 9, 17
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 0x1, 0x2, 0x4
SHF_MERGE, SHF_STRINGS, SHF_INFO_LINK, SHF_GROUP = 0x10, 0x20, 0x40, 0x200
SHN_UNDEF, SHN_LORESERVE, SHN_ABS, SHN_COMMON, SHN_XINDEX = 0, 0xFF00, 0xFFF1, 0xFFF2, 0xFFFF
_EHDR = xen_abi.ELF64_EHDR.struct
_SHDR = xen_abi.ELF64_SHDR.struct
_SYM = xen_abi.ELF64_SYM.struct
_RELA = xen_abi.ELF64_RELA.struct


@dataclass(frozen=True, slots=True)
class RawHeader:
    osabi: int
    type: int
    machine: int
    flags: int
    shoff: int
    shnum: int
    shstrndx: int


@dataclass(frozen=True, slots=True)
class RawSection:
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int

    @property
    def is_nobits(self) -> bool:
        return self.type == SHT_NOBITS

    @property
    def is_alloc(self) -> bool:
        return bool(self.flags & SHF_ALLOC)


@dataclass(frozen=True, slots=True)
class RawSymbol:
    index: int
    name: str
    info: int
    other: int
    shndx: int
    value: int
    size: int

    @property
    def type(self) -> int:
        return self.info & 0xF

    @property
    def bind(self) -> int:
        return self.info >> 4


@dataclass(frozen=True, slots=True)
class RawNote:
    name: bytes  # without the NUL
    type: int
    desc: bytes


class RawElf:
    """One ELF64 little-endian file: its header and section table, decoded on construction;
    section bodies, symbols, relocations and notes on request."""

    def __init__(self, label: str, data: bytes) -> None:
        self.label = label
        self.data = data
        self.header = _header(label, data)
        self.sections = _sections(label, data, self.header)
        self._by_name: dict[str, RawSection] = {}
        for sec in self.sections:
            self._by_name.setdefault(sec.name, sec)

    def section(self, name: str) -> RawSection | None:
        """The first section of that name (as Xen's ``livepatch_elf_sec_by_name``)."""
        return self._by_name.get(name)

    def body(self, sec: RawSection) -> bytes:
        """A section's bytes (b"" for SHT_NOBITS); :class:`ElfParseError` past the file's end."""
        if sec.is_nobits:
            return b""
        if sec.offset + sec.size > len(self.data):
            raise ElfParseError(f"{self.label}: section {sec.name} extends past the end of the "
                                "file (truncated?)")
        return self.data[sec.offset:sec.offset + sec.size]

    def symbols(self, symtab: RawSection) -> list[RawSymbol]:
        """Every entry of ``symtab`` (the null symbol included), names from its ``sh_link``."""
        if symtab.entsize != xen_abi.ELF64_SYM_SIZE or symtab.size % xen_abi.ELF64_SYM_SIZE:
            raise ElfParseError(f"{self.label}: bad symbol table entry size")
        if not 0 < symtab.link < len(self.sections) or \
                self.sections[symtab.link].type != SHT_STRTAB:
            raise ElfParseError(f"{self.label}: symbol table has no string table")
        strings = self.body(self.sections[symtab.link])
        out = []
        for i, (st_name, info, other, shndx, value, size) in enumerate(
                _SYM.iter_unpack(self.body(symtab))):
            if st_name >= len(strings) and st_name:
                raise ElfParseError(f"{self.label}: symbol {i} name out of range")
            out.append(RawSymbol(i, cstring(strings, st_name), info, other, shndx, value, size))
        return out

    def relocations(self, rela: RawSection) -> Iterator[tuple[int, int, int, int]]:
        """(r_offset, symbol index, type, addend) of each entry of a SHT_RELA section."""
        if rela.entsize != xen_abi.ELF64_RELA_SIZE or rela.size % xen_abi.ELF64_RELA_SIZE:
            raise ElfParseError(f"{self.label}: {rela.name}: bad relocation entry size")
        for r_offset, r_info, r_addend in _RELA.iter_unpack(self.body(rela)):
            yield r_offset, r_info >> 32, r_info & 0xFFFFFFFF, r_addend

    def notes(self, sec: RawSection) -> list[RawNote]:
        """The notes of a SHT_NOTE section; a malformed tail ends the list (as readers do)."""
        return list(iter_notes(self.body(sec)))


def cstring(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    return table[offset:end if end >= 0 else len(table)].decode("utf-8", "replace")


def iter_notes(body: bytes) -> Iterator[RawNote]:
    hdr = xen_abi.NOTE_HEADER
    at = 0
    while at + hdr.size <= len(body):
        namesz, descsz, ntype = hdr.unpack_from(body, at)
        name_at = at + hdr.size
        desc_at = name_at + ((namesz + 3) & ~3)
        end = desc_at + ((descsz + 3) & ~3)
        if desc_at + descsz > len(body):
            return
        yield RawNote(body[name_at:name_at + namesz].rstrip(b"\0"), ntype,
                      body[desc_at:desc_at + descsz])
        at = end


def read_raw(label: str, data: bytes) -> RawElf:
    """Decode the header and section table of ``data``; :class:`ElfParseError` (one line naming
    ``label``) when it is not an ELF64 little-endian file with a readable section table."""
    return RawElf(label, data)


def _header(label: str, data: bytes) -> RawHeader:
    if len(data) < 4 or data[:4] != ELF_MAGIC:
        raise ElfParseError(f"{label}: not an ELF file")
    if len(data) < xen_abi.ELF64_EHDR_SIZE:
        raise ElfParseError(f"{label}: truncated ELF header")
    if data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise ElfParseError(f"{label}: not a 64-bit little-endian ELF (x86-64 objects only)")
    (_ident, e_type, e_machine, _version, _entry, _phoff, e_shoff, e_flags, _ehsize, _phentsize,
     _phnum, e_shentsize, e_shnum, e_shstrndx) = _EHDR.unpack_from(data)
    if e_shnum and e_shentsize != _SHDR.size:
        raise ElfParseError(f"{label}: bad section header size {e_shentsize}")
    return RawHeader(data[7], e_type, e_machine, e_flags, e_shoff, e_shnum, e_shstrndx)


def _sections(label: str, data: bytes, h: RawHeader) -> list[RawSection]:
    if h.shoff + h.shnum * _SHDR.size > len(data):
        raise ElfParseError(f"{label}: section header table past the end of the file "
                            "(truncated?)")
    raw = [_SHDR.unpack_from(data, h.shoff + i * _SHDR.size) for i in range(h.shnum)]
    if h.shnum and not h.shstrndx < h.shnum:
        raise ElfParseError(f"{label}: section name table index {h.shstrndx} out of range")
    names = b""
    if h.shnum:
        _n, _t, _f, _a, off, size, *_rest = raw[h.shstrndx]
        if off + size > len(data):
            raise ElfParseError(f"{label}: section name table past the end of the file")
        names = data[off:off + size]
    out = []
    for i, (sh_name, sh_type, flags, addr, off, size, link, info, align, entsize) in \
            enumerate(raw):
        if sh_name >= len(names) and sh_name:
            raise ElfParseError(f"{label}: section {i} name out of range")
        out.append(RawSection(i, cstring(names, sh_name), sh_type, flags, addr, off, size, link,
                              info, align, entsize))
    return out
