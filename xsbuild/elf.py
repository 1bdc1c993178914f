"""The ELF object model shared by every stage, with a reader (on :mod:`xsbuild.elfraw`) and a
writer.

Only relocatable x86-64 objects (ET_REL, ELF64, little-endian) are modelled: the diff inputs, the
diff outputs and the payload itself.  The model is mutable and identity-keyed, in the manner of
objtool's ``struct elf``/``section``/``symbol``/``reloc``: an ``Elf`` owns ordered lists of
sections and symbols; each ``Section`` knows its relocations (``relocs``) and the symbols defined in
it; each ``Reloc`` points at a ``Symbol`` object, never at an index.  Indexes are assigned only when
writing.

:mod:`xsbuild.elfraw` decodes the file (raw integers: a section type is kept as the number it
was, so a read-then-write never changes it); this module builds the model on top and checks what
the model relies on, each problem an :class:`ElfParseError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xsbuild import xen_abi
from xsbuild.elfraw import (  # noqa: F401  (the gABI numbers are part of this module's API)
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_GROUP,
    SHF_INFO_LINK,
    SHF_MERGE,
    SHF_STRINGS,
    SHF_WRITE,
    SHN_ABS,
    SHN_COMMON,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHN_XINDEX,
    SHT_GROUP,
    SHT_NOBITS,
    SHT_NOTE,
    SHT_NULL,
    SHT_PROGBITS,
    SHT_REL,
    SHT_RELA,
    SHT_STRTAB,
    SHT_SYMTAB,
    RawElf,
    RawSection,
    RawSymbol,
    read_raw,
)
from xsbuild.errors import ElfParseError

# gABI constants (System V ABI, "Object Files" chapter)
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE = 0, 1, 2, 3, 4
STT_COMMON, STT_TLS, STT_GNU_IFUNC = 5, 6, 10
STB_LOCAL, STB_GLOBAL, STB_WEAK, STB_GNU_UNIQUE = 0, 1, 2, 10
ET_REL = 1
_MAX_NOBITS = 1 << 30  # a larger .bss is a corrupt header, not a hypervisor object


@dataclass(slots=True, eq=False)
class Symbol:
    name: str
    type: int = STT_NOTYPE
    bind: int = STB_LOCAL
    other: int = 0
    sec: Section | None = None  # None: undefined, absolute or common (see shndx)
    value: int = 0  # offset inside ``sec`` for defined symbols
    size: int = 0
    shndx: int = SHN_UNDEF  # raw index, meaningful for SHN_ABS / SHN_COMMON / SHN_UNDEF
    file: str = ""  # the STT_FILE name in force where the symbol stands (statics: path#name)
    index: int = 0  # position in the symbol table as read (informational)

    @property
    def is_func(self) -> bool:
        return self.type == STT_FUNC

    @property
    def is_object(self) -> bool:
        return self.type == STT_OBJECT

    @property
    def is_section(self) -> bool:
        return self.type == STT_SECTION

    @property
    def is_file(self) -> bool:
        return self.type == STT_FILE

    @property
    def is_local(self) -> bool:
        return self.bind == STB_LOCAL

    @property
    def is_undefined(self) -> bool:
        return self.sec is None and self.shndx == SHN_UNDEF and not self.is_file

    @property
    def end(self) -> int:
        return self.value + self.size

    def __repr__(self) -> str:
        where = self.sec.name if self.sec else ("UND" if self.is_undefined else hex(self.shndx))
        return f"<Symbol {self.name or '(unnamed)'} @{where}+{self.value:#x} size={self.size}>"


@dataclass(slots=True, eq=False)
class Reloc:
    offset: int
    type: int
    sym: Symbol
    addend: int

    def __repr__(self) -> str:
        target = self.sym.name or (self.sym.sec.name if self.sym.sec else "?")
        return (f"<Reloc {xen_abi.reloc_type_name(self.type)} @{self.offset:#x} -> "
                f"{target}{self.addend:+#x}>")


@dataclass(slots=True, eq=False)
class Section:
    name: str
    type: int = SHT_PROGBITS
    flags: int = 0
    addralign: int = 1
    entsize: int = 0
    data: bytes = b""  # empty for SHT_NOBITS; see ``size``
    size: int = 0
    link: int = 0  # raw sh_link / sh_info as read, for sections the model does not interpret
    info: int = 0
    relocs: list[Reloc] = field(default_factory=list)
    symbols: list[Symbol] = field(default_factory=list)  # defined here, by offset
    sym: Symbol | None = None  # the STT_SECTION symbol
    index: int = 0

    @property
    def is_alloc(self) -> bool:
        return bool(self.flags & SHF_ALLOC)

    @property
    def is_text(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR)

    @property
    def is_writable(self) -> bool:
        return bool(self.flags & SHF_WRITE)

    @property
    def is_nobits(self) -> bool:
        return self.type == SHT_NOBITS

    @property
    def is_string(self) -> bool:
        return bool(self.flags & SHF_STRINGS) and bool(self.flags & SHF_MERGE)

    @property
    def is_merge_const(self) -> bool:
        """``.rodata.cst<N>``: mergeable fixed-size constants (not strings)."""
        return bool(self.flags & SHF_MERGE) and not self.flags & SHF_STRINGS

    def named_symbols(self) -> list[Symbol]:
        """Function/object symbols defined here (no section or file symbols)."""
        return [s for s in self.symbols if s.type in (STT_FUNC, STT_OBJECT, STT_NOTYPE)
                and s.name and not s.is_section]

    def __repr__(self) -> str:
        return f"<Section {self.name} size={self.size:#x}>"


@dataclass(slots=True, eq=False)
class Elf:
    path: str
    sections: list[Section] = field(default_factory=list)  # excludes the null section
    symbols: list[Symbol] = field(default_factory=list)  # excludes the null symbol
    osabi: int = 0
    flags: int = 0
    _by_name: dict[str, Section] | None = None

    def section(self, name: str) -> Section | None:
        """The first section with this name (as Xen's ``livepatch_elf_sec_by_name`` does)."""
        if self._by_name is None:
            self._by_name = {}
            for sec in self.sections:
                self._by_name.setdefault(sec.name, sec)
        return self._by_name.get(name)

    def invalidate(self) -> None:
        self._by_name = None

    def file_symbols(self) -> list[str]:
        return [s.name for s in self.symbols if s.is_file]

    def defined(self) -> Iterator[Symbol]:
        return (s for s in self.symbols if s.sec is not None and not s.is_section)


# --------------------------------------------------------------------------------------------
# Reading


# e_machine values a user may meet, named as binutils names them (readelf -h).
_MACHINE_NAMES = {3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S/390", 40: "ARM",
                  62: "x86-64", 183: "AArch64", 243: "RISC-V"}


def machine_name(e_machine: int) -> str:
    return _MACHINE_NAMES.get(e_machine, f"machine {e_machine}")


def check_elf_header(label: str, data: bytes) -> int:
    """What every reader checks first, one line each: an ELF, whole, for x86-64.  Returns
    e_type.  Raises :class:`ElfParseError` (exit 2: bad input) naming the problem."""
    if len(data) < 4 or data[:4] != b"\x7fELF":
        raise ElfParseError(f"{label}: not an ELF file")
    if len(data) < 20:
        raise ElfParseError(f"{label}: truncated ELF header ({len(data)} bytes)")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != xen_abi.ELF_MACHINE_X86_64:
        raise ElfParseError(f"{label}: built for {machine_name(e_machine)} (e_machine "
                            f"{e_machine}), not x86-64")
    if data[4] != 2 or data[5] != 1:
        raise ElfParseError(f"{label}: not a 64-bit little-endian ELF (x86-64 objects only)")
    if len(data) < xen_abi.ELF64_EHDR_SIZE:
        raise ElfParseError(f"{label}: truncated ELF header ({len(data)} bytes)")
    _check_extent(label, data)
    return e_type


def _check_extent(label: str, data: bytes) -> None:
    """The section header table and every section's bytes lie inside the file."""
    ehdr = xen_abi.ELF64_EHDR.unpack(data)
    shoff, shentsize, shnum = ehdr.e_shoff, ehdr.e_shentsize, ehdr.e_shnum
    if shnum >= xen_abi.MAX_SECTIONS:
        return  # Xen's loader refuses that many sections first (-EOPNOTSUPP): a rule, not input
    if shnum and shentsize < xen_abi.ELF64_SHDR_SIZE:
        raise ElfParseError(f"{label}: malformed ELF: e_shentsize {shentsize}")
    end = shoff + shnum * shentsize
    if end > len(data):
        raise ElfParseError(f"{label}: truncated: its section headers end at byte {end}, the "
                            f"file has {len(data)}")
    for i in range(shnum):
        sh = xen_abi.ELF64_SHDR.unpack(data, shoff + i * shentsize)
        if sh.sh_type != SHT_NOBITS and sh.sh_offset + sh.sh_size > len(data):
            raise ElfParseError(f"{label}: truncated: section {i} ends at byte "
                                f"{sh.sh_offset + sh.sh_size}, the file has {len(data)}")


def read_elf(path: str | os.PathLike[str], data: bytes | None = None) -> Elf:
    """Parse a relocatable x86-64 ELF object into the model.

    Raises :class:`ElfParseError` with one line naming the file and the problem for anything that
    is not such an object (non-ELF, truncated, wrong class/machine/type, malformed tables).
    """
    label = str(path)
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ElfParseError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    e_type = check_elf_header(label, data)
    if e_type != ET_REL:
        raise ElfParseError(f"{label}: not a relocatable object (e_type {e_type}; need ET_REL)")
    return _parse(read_raw(label, data))


def _parse(raw: RawElf) -> Elf:
    label = raw.label
    elf = Elf(path=label, osabi=raw.header.osabi, flags=raw.header.flags)
    by_index: dict[int, Section] = {}
    symtab_raw: RawSection | None = None
    for rs in raw.sections[1:]:
        if rs.type == SHT_SYMTAB:
            if symtab_raw is not None:
                raise ElfParseError(f"{label}: more than one symbol table")
            symtab_raw = rs
        if rs.type == SHT_NOBITS and rs.size > _MAX_NOBITS:
            raise ElfParseError(f"{label}: section {rs.name} claims {rs.size} bytes")
        sec = Section(name=rs.name, type=rs.type, flags=rs.flags, addralign=rs.addralign,
                      entsize=rs.entsize, data=raw.body(rs), size=rs.size, link=rs.link,
                      info=rs.info, index=rs.index)
        by_index[rs.index] = sec
        elf.sections.append(sec)
    if symtab_raw is None:
        raise ElfParseError(f"{label}: no symbol table (stripped object?)")
    syms = _read_symbols(label, raw.symbols(symtab_raw), by_index)
    elf.symbols = syms[1:]
    for rs in raw.sections[1:]:
        sec = by_index[rs.index]
        if sec.type == SHT_REL:
            target = by_index.get(sec.info)
            if target is not None and target.is_alloc:
                raise ElfParseError(f"{label}: SHT_REL section {sec.name} (only RELA is supported)")
        if sec.type != SHT_RELA:
            continue
        target = by_index.get(sec.info)
        if target is None:
            continue
        target.relocs = _read_relocs(label, raw, rs, syms)
        if target.relocs and target.relocs[-1].offset + 4 > target.size and target.is_alloc:
            raise ElfParseError(f"{label}: {sec.name}: relocation past the end of {target.name}")
    for sec in elf.sections:
        sec.symbols.sort(key=lambda s: (s.value, -s.size))
    return elf


def _read_symbols(label: str, raw_syms: list[RawSymbol],
                  by_index: dict[int, Section]) -> list[Symbol]:
    out: list[Symbol] = []
    current_file = ""
    for rsym in raw_syms:
        i, name, stype, bind = rsym.index, rsym.name, rsym.type, rsym.bind
        st_shndx, st_value, st_size = rsym.shndx, rsym.value, rsym.size
        sec = None
        if st_shndx == SHN_XINDEX:
            raise ElfParseError(f"{label}: extended section indexes are not supported")
        if SHN_UNDEF < st_shndx < SHN_LORESERVE:
            sec = by_index.get(st_shndx)
            if sec is None:
                raise ElfParseError(f"{label}: symbol {name!r} in bad section {st_shndx}")
        if stype == STT_FILE:
            current_file = name
        sym = Symbol(name=name, type=stype, bind=bind, other=rsym.other, sec=sec,
                     value=st_value, size=st_size, shndx=st_shndx,
                     file=current_file if bind == STB_LOCAL else "", index=i)
        if sec is not None and stype != STT_SECTION and st_value + st_size > sec.size:
            raise ElfParseError(f"{label}: symbol {name!r} extends past the end of {sec.name}")
        if sec is not None and i:
            sec.symbols.append(sym)
            if stype == STT_SECTION and sec.sym is None:
                sec.sym = sym
        out.append(sym)
    return out


def _read_relocs(label: str, raw: RawElf, rela: RawSection, syms: list[Symbol]) -> list[Reloc]:
    out = []
    for r_offset, symi, rtype, r_addend in raw.relocations(rela):
        if symi >= len(syms):
            raise ElfParseError(f"{label}: {rela.name}: relocation symbol {symi} out of range")
        out.append(Reloc(offset=r_offset, type=rtype, sym=syms[symi], addend=r_addend))
    out.sort(key=lambda r: r.offset)
    return out


# --------------------------------------------------------------------------------------------
# Writing


def _align(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1) if align > 1 else value


class _StrTab:
    def __init__(self) -> None:
        self.buf = bytearray(b"\0")
        self.index: dict[str, int] = {"": 0}

    def add(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.buf)
            self.buf += text.encode() + b"\0"
        return self.index[text]


_GENERATED_TYPES = frozenset({SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_REL})


def elf_bytes(elf: Elf) -> bytes:
    """Serialise the model as an ET_REL ELF64 x86-64 object: :func:`layout` decides every
    section's contents and header, :func:`serialise` places them in the file.

    Layout: header, section contents in model order, ``.rela`` sections, ``.symtab``, ``.strtab``,
    ``.shstrtab``, section header table.  Every section gets an offset of at least 64 (Xen rejects
    offset 0 even for empty and NOBITS sections, spec §1.2).  Symbols: null, section symbols, the
    other locals in model order (each FILE symbol ahead of the locals of its file, as ``ld -r``
    lays them out: readers, Xen's symbol tool included, attribute a local to the FILE symbol
    before it), then globals; ``sh_info`` of ``.symtab`` is the first global's index, as the gABI
    requires.  A model that breaks its own invariants (a symbol in a section that is not in the
    object) is a bug: ``ValueError``.
    """
    return serialise(elf, layout(elf))


@dataclass(frozen=True, slots=True)
class PlannedSection:
    """One output section as laid out: everything its header says but its file offset."""

    name: str
    type: int
    flags: int
    body: bytes  # b"" for SHT_NOBITS
    size: int
    link: int
    info: int
    addralign: int
    entsize: int
    file_align: int  # alignment of its offset in the file


def symbol_order(elf: Elf) -> tuple[list[Symbol], int]:
    """The symbol table's order (without the null symbol) and the index of the first global."""
    locals_ = [s for s in elf.symbols if s.bind == STB_LOCAL]
    secsyms = [s for s in locals_ if s.is_section]
    others = [s for s in locals_ if not s.is_section]
    globals_ = [s for s in elf.symbols if s.bind != STB_LOCAL]
    return secsyms + others + globals_, 1 + len(secsyms) + len(others)


def layout(elf: Elf) -> list[PlannedSection]:
    """Every section of the output in file order, tables generated from the model."""
    # Tables are regenerated from the model; a read object's own tables are not content.
    sections = [s for s in elf.sections if s.type not in _GENERATED_TYPES]
    ordered, first_global = symbol_order(elf)
    sec_index = {s: i + 1 for i, s in enumerate(sections)}
    sym_index = {s: i + 1 for i, s in enumerate(ordered)}
    rela_secs = [s for s in sections if s.relocs]
    symtab_idx = len(sections) + len(rela_secs) + 1
    strtab = _StrTab()
    symtab = _symtab_bytes(ordered, sec_index, strtab)
    planned = [_content(sec) for sec in sections]
    planned += [_rela(sec, sym_index, sec_index[sec], symtab_idx) for sec in rela_secs]
    planned.append(PlannedSection(".symtab", SHT_SYMTAB, 0, symtab, len(symtab), symtab_idx + 1,
                                  first_global, 8, xen_abi.ELF64_SYM_SIZE, 8))
    planned.append(PlannedSection(".strtab", SHT_STRTAB, 0, bytes(strtab.buf), len(strtab.buf),
                                  0, 0, 1, 0, 1))
    return planned


def _content(sec: Section) -> PlannedSection:
    body = b"" if sec.is_nobits else bytes(sec.data)
    if not sec.is_nobits and len(body) != sec.size:
        raise ValueError(f"section {sec.name}: data length {len(body)} != size {sec.size}")
    return PlannedSection(sec.name, sec.type, sec.flags, body, sec.size, sec.link, sec.info,
                          sec.addralign, sec.entsize, sec.addralign)


def _symtab_bytes(ordered: list[Symbol], sec_index: dict[Section, int],
                  strtab: _StrTab) -> bytes:
    symtab = bytearray(xen_abi.ELF64_SYM_SIZE)
    for s in ordered:
        if s.sec is not None:
            if s.sec not in sec_index:
                raise ValueError(f"symbol {s.name} refers to a section not in the object")
            shndx = sec_index[s.sec]
        else:
            shndx = s.shndx
        symtab += xen_abi.ELF64_SYM.struct.pack(strtab.add(s.name), (s.bind << 4) | s.type,
                                                s.other, shndx, s.value, s.size)
    return bytes(symtab)


def _rela(sec: Section, sym_index: dict[Symbol, int], target: int,
          symtab_idx: int) -> PlannedSection:
    body = bytearray()
    for r in sorted(sec.relocs, key=lambda r: r.offset):
        if r.sym not in sym_index:
            raise ValueError(f"relocation in {sec.name} refers to a symbol not in the object: "
                             f"{r.sym!r}")
        body += xen_abi.ELF64_RELA.struct.pack(r.offset, (sym_index[r.sym] << 32) | r.type,
                                               r.addend)
    return PlannedSection(".rela" + sec.name, SHT_RELA, SHF_INFO_LINK, bytes(body), len(body),
                          symtab_idx, target, 8, xen_abi.ELF64_RELA_SIZE, 8)


def serialise(elf: Elf, planned: list[PlannedSection]) -> bytes:
    """The file: ELF header, each planned section at its aligned offset, ``.shstrtab``, the
    section header table."""
    shstrtab = _StrTab()
    names = [shstrtab.add(p.name) for p in planned]
    names.append(shstrtab.add(".shstrtab"))
    planned = [*planned, PlannedSection(".shstrtab", SHT_STRTAB, 0, bytes(shstrtab.buf),
                                        len(shstrtab.buf), 0, 0, 1, 0, 1)]
    out = bytearray(xen_abi.ELF64_EHDR_SIZE)
    headers = bytearray(xen_abi.ELF64_SHDR_SIZE)  # the null section
    for p, name in zip(planned, names, strict=True):
        out += b"\0" * (_align(len(out), max(p.file_align, 1)) - len(out))
        headers += xen_abi.ELF64_SHDR.struct.pack(name, p.type, p.flags, 0, len(out), p.size,
                                                  p.link, p.info, p.addralign, p.entsize)
        out += p.body
    shoff = _align(len(out), 8)
    out += b"\0" * (shoff - len(out))
    out += headers
    shnum = len(planned) + 1
    ident = b"\x7fELF" + bytes([2, 1, 1, elf.osabi, 0]) + b"\0" * 7
    xen_abi.ELF64_EHDR.struct.pack_into(out, 0, ident, ET_REL, xen_abi.ELF_MACHINE_X86_64, 1,
                                        0, 0, shoff, elf.flags, xen_abi.ELF64_EHDR_SIZE, 0, 0,
                                        xen_abi.ELF64_SHDR_SIZE, shnum, shnum - 1)
    return bytes(out)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename:
    a failure never leaves a partial output behind."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
