"""Validate a payload offline, the way the target Xen's loader will at UPLOAD (spec §1, §2, §8).

Public interface (used by the CLI, the simulator and ``build``):

* :func:`check_payload` ``(data, xen_syms=None, loaded=(), target=None) -> CheckReport``
* :class:`CheckReport`: ``problems`` (each with the errno Xen would return), ``ok``, ``info``
  (what the simulator and ``inspect`` need: build-ids, funcs, hooks, new symbols, ...) and the
  ``target`` checked against.

The rules are those of 4.17.5; where a release differs (:mod:`xsbuild.xen_versions`), the
checker asks ``target.has(Rule.X)``.  A problem is of one of two kinds: ``loader`` (that Xen
refuses the payload with this errno) or ``hazard`` (that Xen accepts it and then misbehaves:
crashes the host, patches the wrong bytes, leaves call sites unpatched); xsbuild refuses both.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from xsbuild import xen_abi
from xsbuild.elfraw import (
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_MERGE,
    SHF_WRITE,
    SHN_ABS,
    SHN_COMMON,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_REL,
    SHT_RELA,
    SHT_STRTAB,
    SHT_SYMTAB,
    RawSection,
    cstring,
)
from xsbuild.xen_versions import UNKNOWN_TARGET, Rule, Target
from xsbuild.xensyms import XenSymbols, parse_build_id_note


class ProblemKind(StrEnum):
    LOADER = "loader"  # the loader refuses the payload with this errno
    HAZARD = "hazard"  # the loader accepts it, then the host misbehaves; xsbuild refuses it


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason the hypervisor would reject the payload (or should)."""

    errno: int  # positive Xen errno value, e.g. xen_abi.EINVAL
    message: str
    kind: ProblemKind = ProblemKind.LOADER

    def __str__(self) -> str:
        return f"-{xen_abi.errno_name(self.errno)}: {self.message}"


@dataclass(frozen=True, slots=True)
class FuncInfo:
    """One ``struct livepatch_func`` entry as the loader will see it after relocation."""

    name: str  # the old function's name (Xen naming, statics as path#name); "" if NULL
    new_symbol: str  # payload symbol at new_addr; "" for a NOP entry
    old_addr: int  # as stored (0: resolved by name at load); resolved if xen_syms was given
    new_size: int
    old_size: int
    version: int


@dataclass(slots=True)
class PayloadInfo:
    """What a payload declares, read from its sections."""

    build_id: bytes = b""  # .note.gnu.build-id descriptor
    depends: bytes = b""  # .livepatch.depends descriptor
    xen_depends: bytes = b""  # .livepatch.xen_depends descriptor
    funcs: list[FuncInfo] = field(default_factory=list)
    hooks: dict[str, int] = field(default_factory=dict)  # kind -> number of pointers
    new_symbols: list[str] = field(default_factory=list)  # exported names (duplicate check)
    undefined_symbols: list[str] = field(default_factory=list)
    modinfo: bytes = b""
    safe_to_reapply: bool = True  # spec §1.3

    @property
    def has_vetoing_hooks(self) -> bool:
        return any(self.hooks.get(k) for k in xen_abi.VETOING_HOOK_KINDS)


@dataclass(slots=True)
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    info: PayloadInfo | None = None  # None when the ELF could not be read at all
    target: Target = UNKNOWN_TARGET  # the hypervisor release whose rules were applied

    @property
    def refusals(self) -> list[Problem]:
        """The problems the loader itself reports (what the hypervisor returns)."""
        return [p for p in self.problems if p.kind == ProblemKind.LOADER]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_errno(self) -> int:
        """The errno Xen would return: that of the first problem in load order (0 if ok)."""
        return self.problems[0].errno if self.problems else 0


def check_payload(data: bytes, xen_syms: XenSymbols | None = None,
                  loaded: Iterable[PayloadInfo] = (), target: Target | None = None,
                  xen_build_id: bytes | None = None) -> CheckReport:
    """Check payload bytes as ``target``'s UPLOAD would (spec §2 order, §8 differences).

    ``xen_syms`` enables the checks that need the hypervisor (undefined symbols, funcs names,
    ENDBR sizes, name clashes, xen_depends); ``loaded`` are payloads already uploaded (their new
    symbols and build-ids take part in the -EEXIST checks); ``target`` is the release (unknown:
    the rules common to 4.17 and later); ``xen_build_id`` the hypervisor's build-id when there is
    no ``xen_syms`` (the simulator).  Never raises on malformed input: every problem becomes a
    :class:`Problem`.
    """
    checker = _Checker(data, xen_syms, list(loaded), target or UNKNOWN_TARGET,
                       xen_build_id if xen_build_id is not None
                       else xen_syms.build_id if xen_syms is not None else None)
    try:
        checker.run()
    except _Stop:
        pass
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        checker.fail(xen_abi.EINVAL, f"malformed ELF ({type(exc).__name__}: {exc})")
    return checker.report


class _Stop(Exception):
    """The loader would stop here: later checks cannot run."""


@dataclass(slots=True)
class _Sym:
    name: str
    info: int
    shndx: int
    value: int
    size: int


class _Checker:
    def __init__(self, data: bytes, xs: XenSymbols | None, loaded: list[PayloadInfo],
                 target: Target, xen_build_id: bytes | None) -> None:
        self.data = data
        self.xs = xs
        self.loaded = loaded
        self.target = target
        self.xen_build_id = xen_build_id
        self.build_id_first = target.has(Rule.XEN_BUILD_ID_FIRST)
        self.report = CheckReport(info=None, target=target)
        self.info = PayloadInfo()
        self.shdrs: list[RawSection] = []
        self.syms: list[_Sym] = []
        self.symtab_index = 0

    def fail(self, errno: int, message: str, kind: ProblemKind = ProblemKind.LOADER) -> None:
        self.report.problems.append(Problem(errno, message, kind))

    def fail_unless(self, rule: Rule, errno: int, message: str) -> None:
        """A loader problem where ``rule`` holds; a hazard (Xen goes ahead) where it does not."""
        kind = ProblemKind.LOADER if self.target.has(rule) else ProblemKind.HAZARD
        self.fail(errno, message, kind)

    def stop(self, errno: int, message: str) -> None:
        self.fail(errno, message)
        raise _Stop

    def run(self) -> None:
        self.check_size()
        self.check_header()
        self.read_sections()
        self.read_symbols()
        self.report.info = self.info
        if self.build_id_first:
            self.check_xen_depends_first()
        self.check_layout()
        self.check_symbols()
        self.check_relocations()
        self.check_notes()
        self.check_patching_sections()
        self.check_funcs()
        self.check_hooks()
        self.check_funcs_writable()
        self.check_arch_sections()
        self.check_build_ids()
        self.check_new_symbols()
        self.info.safe_to_reapply = self.safe_to_reapply()

    # -- §1.9, §1.1 ----------------------------------------------------------------------------
    def check_size(self) -> None:
        if not 0 < len(self.data) <= xen_abi.LIVEPATCH_MAX_SIZE:
            self.stop(xen_abi.EINVAL, f"payload size {len(self.data)} is not in 1..2 MiB")

    def check_header(self) -> None:
        d = self.data
        if len(d) < xen_abi.ELF64_EHDR_SIZE or d[:4] != b"\x7fELF":
            self.stop(xen_abi.EINVAL, "not an ELF file (bad magic or shorter than a header)")
        if d[4] != 2 or d[5] != 1:
            self.stop(xen_abi.EOPNOTSUPP, "not ELF64 little-endian")
        (_ident, e_type, e_machine, e_version, _entry, _phoff, e_shoff, _flags, _ehsize,
         _phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx) = xen_abi.ELF64_EHDR.unpack(d)
        if e_machine != xen_abi.ELF_MACHINE_X86_64:
            self.stop(xen_abi.EOPNOTSUPP, f"e_machine {e_machine} is not x86-64")
        if e_version != 1 or d[6] != 1:
            self.stop(xen_abi.EOPNOTSUPP, "ELF version is not EV_CURRENT")
        if d[7] not in xen_abi.ELF_OSABI_ACCEPTED or d[8] != 0:
            self.stop(xen_abi.EOPNOTSUPP, f"EI_OSABI {d[7]} / ABI version {d[8]} not accepted "
                      "(GNU ld sets OSABI 3 for IFUNC or unique symbols)")
        if e_type != 1:
            self.stop(xen_abi.EOPNOTSUPP, f"e_type {e_type} is not ET_REL")
        if e_phnum:
            self.stop(xen_abi.EOPNOTSUPP, "has program headers")
        if not e_shstrndx or e_shstrndx >= e_shnum:
            self.stop(xen_abi.EINVAL, "bad e_shstrndx")
        if e_shnum >= xen_abi.MAX_SECTIONS:
            self.stop(xen_abi.EOPNOTSUPP, f"{e_shnum} sections: Xen takes fewer than 1024")
        if e_shoff >= len(d):
            self.stop(xen_abi.EINVAL, "e_shoff past the end of the file")
        if e_shentsize < xen_abi.ELF64_SHDR_SIZE:
            self.stop(xen_abi.EINVAL, "e_shentsize too small")
        if (len(d) - e_shoff) // e_shentsize < e_shnum:
            self.stop(xen_abi.EINVAL, "section header table truncated")
        self.e_shoff, self.e_shentsize = e_shoff, e_shentsize
        self.e_shnum, self.e_shstrndx = e_shnum, e_shstrndx

    # -- §1.2 ----------------------------------------------------------------------------------
    def read_sections(self) -> None:
        raw = []
        for i in range(self.e_shnum):
            off = self.e_shoff + i * self.e_shentsize
            # e_shentsize may exceed the Elf64_Shdr size (Xen allows it): read each at its stride
            raw.append(xen_abi.ELF64_SHDR.unpack(self.data, off))
        for i, (_name, stype, flags, addr, offset, size, link, info, align, ent) in \
                enumerate(raw):
            if i == 0:
                self.shdrs.append(RawSection(0, "", 0, 0, 0, 0, 0, 0, 0, 0, 0))
                continue
            if offset < xen_abi.ELF64_EHDR_SIZE:
                self.stop(xen_abi.EINVAL, f"section {i} has sh_offset {offset} (< 64)")
            if stype != SHT_NOBITS and offset + size > len(self.data):
                self.stop(xen_abi.EINVAL, f"section {i} extends past the end of the file")
            if align and align & (align - 1):
                self.stop(xen_abi.EOPNOTSUPP, f"section {i} alignment {align} is not a power "
                          "of two")
            if align and addr % align:
                self.stop(xen_abi.EINVAL, f"section {i} sh_addr not aligned")
            if stype == SHT_NOBITS and flags & (SHF_WRITE | SHF_ALLOC) and \
                    size > xen_abi.LIVEPATCH_MAX_SIZE:
                self.stop(xen_abi.EINVAL, f"NOBITS section {i} larger than 2 MiB")
            self.shdrs.append(RawSection(i, "", stype, flags, addr, offset, size, link, info, align,
                                    ent))
        symtabs = [s for s in self.shdrs if s.type == SHT_SYMTAB]
        if len(symtabs) > 1:
            self.stop(xen_abi.EOPNOTSUPP, "more than one symbol table")
        if not symtabs:
            self.stop(xen_abi.EINVAL, "no symbol table")
        symtab = symtabs[0]
        self.symtab_index = symtab.index
        if symtab.link >= self.e_shnum:
            self.stop(xen_abi.EINVAL, "symbol table sh_link out of range")
        if not symtab.size or symtab.entsize < xen_abi.ELF64_SYM_SIZE or \
                symtab.size % symtab.entsize:
            self.stop(xen_abi.EINVAL, "bad symbol table size or entry size")
        shstr = self._strtab(self.shdrs[self.e_shstrndx], ".shstrtab")
        self.strtab = self._strtab(self.shdrs[symtab.link], "symbol string table")
        for (name, *_rest), sh in zip(raw[1:], self.shdrs[1:], strict=True):
            if name >= len(shstr):
                self.stop(xen_abi.EINVAL, f"section {sh.index} name out of range")
            self.shdrs[sh.index] = dataclasses.replace(sh, name=cstring(shstr, name))

    def _strtab(self, sh: RawSection, what: str) -> bytes:
        body = self.data[sh.offset:sh.offset + sh.size]
        if sh.type != SHT_STRTAB or not body or body[0] != 0 or body[-1] != 0:
            self.stop(xen_abi.EINVAL, f"{what} is not a NUL-delimited SHT_STRTAB")
        return body

    def read_symbols(self) -> None:
        sh = self.shdrs[self.symtab_index]
        for i in range(sh.size // sh.entsize):
            st_name, st_info, _o, st_shndx, st_value, st_size = xen_abi.ELF64_SYM.unpack(
                self.data, sh.offset + i * sh.entsize)
            if st_name >= len(self.strtab):
                self.stop(xen_abi.EINVAL, f"symbol {i} name out of range")
            self.syms.append(_Sym(cstring(self.strtab, st_name), st_info, st_shndx, st_value,
                                  st_size))

    # -- §1.3 ----------------------------------------------------------------------------------
    def check_layout(self) -> None:
        for sh in self.shdrs[1:]:
            if not sh.is_alloc:
                continue
            if sh.flags & SHF_WRITE and sh.flags & SHF_EXECINSTR:
                self.fail(xen_abi.EOPNOTSUPP, f"section {sh.name} is both writable and "
                          "executable")
            if sh.addralign == 0:
                self.fail(xen_abi.EINVAL, f"section {sh.name} has alignment 0: Xen accepts it "
                          "but lays it out at offset 0, overlapping other sections")

    # -- §1.7 ----------------------------------------------------------------------------------
    def _resolve(self, name: str) -> int:
        if self.xs is not None:
            x = self.xs.lookup(name)
            if x is not None:
                return x.addr
        for p in self.loaded:
            if name in p.new_symbols:
                return 1  # a loaded payload's symbol: resolvable, address unknown offline
        return 0

    def check_symbols(self) -> None:
        for i, s in enumerate(self.syms[1:], 1):
            if s.shndx == SHN_COMMON:
                self.fail(xen_abi.EINVAL, f"common symbol {s.name} (compile with -fno-common)")
            elif s.shndx == SHN_UNDEF:
                if not s.name:
                    continue
                self.info.undefined_symbols.append(s.name)
                if (self.xs is not None or self.loaded) and not self._resolve(s.name):
                    self.fail(xen_abi.ENOENT, f"unknown symbol {s.name}: not in the "
                              "hypervisor's table" + (" nor in a loaded payload"
                                                      if self.loaded else ""))
            elif s.shndx >= SHN_LORESERVE and s.shndx != SHN_ABS:
                self.fail(xen_abi.EOPNOTSUPP, f"symbol {i} ({s.name}) has reserved section "
                          f"index {s.shndx:#x}")
            elif s.shndx < SHN_LORESERVE and s.shndx >= self.e_shnum:
                self.fail(xen_abi.EINVAL, f"symbol {s.name} in section {s.shndx} out of range")

    # -- §1.8 ----------------------------------------------------------------------------------
    def check_relocations(self) -> None:
        for sh in self.shdrs[1:]:
            if sh.type not in (SHT_RELA, SHT_REL):
                continue
            if sh.info >= self.e_shnum or not self.shdrs[sh.info].is_alloc or not sh.size:
                continue
            target = self.shdrs[sh.info]
            if sh.type == SHT_REL:
                self.fail(xen_abi.EOPNOTSUPP, f"{sh.name}: SHT_REL relocations are not "
                          "supported")
                continue
            if sh.link != self.symtab_index:
                self.fail(xen_abi.EINVAL, f"{sh.name}: sh_link is not the symbol table")
                continue
            if sh.entsize < xen_abi.ELF64_RELA_SIZE or sh.size % sh.entsize:
                self.fail(xen_abi.EINVAL, f"{sh.name}: bad entry size")
                continue
            for k in range(sh.size // sh.entsize):
                r_offset, r_info, r_addend = xen_abi.ELF64_RELA.unpack(
                    self.data, sh.offset + k * sh.entsize)
                self._check_reloc(sh, target, r_offset, r_info >> 32, r_info & 0xFFFFFFFF,
                                  r_addend)

    def _check_reloc(self, sh: RawSection, target: RawSection, r_offset: int, symi: int, rtype: int,
                     addend: int) -> None:
        where = f"{sh.name}+{r_offset:#x}"
        if symi == 0:
            self.fail(xen_abi.EOPNOTSUPP, f"{where}: relocation against symbol 0")
            return
        if symi >= len(self.syms):
            self.fail(xen_abi.EINVAL, f"{where}: symbol index {symi} out of range")
            return
        sym = self.syms[symi]
        if rtype not in xen_abi.ACCEPTED_RELOC_TYPES:
            self.fail(xen_abi.EOPNOTSUPP, f"{where}: unhandled relocation type "
                      f"{xen_abi.reloc_type_name(rtype)} against {sym.name or 'a section'}")
            return
        if 0 < sym.shndx < SHN_LORESERVE and sym.shndx < self.e_shnum and \
                not self.shdrs[sym.shndx].is_alloc:
            self.fail(xen_abi.EINVAL, f"{where}: relocation against {sym.name or 'section'} in "
                      "a section that is not loaded")
            return
        if r_offset + xen_abi.reloc_width(rtype) > target.size:
            self.fail(xen_abi.EINVAL, f"{where}: relocation past the end of {target.name}")
            return
        if xen_abi.is_pc_relative(rtype) and self.xs is not None \
                and sym.shndx in (SHN_UNDEF, SHN_ABS):
            addr = self._resolve(sym.name) if sym.shndx == SHN_UNDEF else sym.value
            base = self._payload_base()
            if addr > 1 and base and not -(2**31) <= addr + addend - base < 2**31:
                self.fail(xen_abi.EOVERFLOW, f"{where}: PC32 to {sym.name} out of reach of the "
                          "livepatch area")

    def _payload_base(self) -> int:
        x = self.xs.lookup("__2M_rwdata_end") if self.xs is not None else None
        return x.addr if x is not None else 0

    # -- §1.4, §1.6 ----------------------------------------------------------------------------
    def section(self, name: str) -> RawSection | None:
        return next((s for s in self.shdrs[1:] if s.name == name), None)

    def body(self, sh: RawSection) -> bytes:
        return b"" if sh.type == SHT_NOBITS else self.data[sh.offset:sh.offset + sh.size]

    def check_notes(self) -> None:
        for name, attr in ((xen_abi.SEC_DEPENDS, "depends"),
                           (xen_abi.SEC_XEN_DEPENDS, "xen_depends"),
                           (xen_abi.SEC_BUILD_ID, "build_id")):
            sh = self.section(name)
            checked_first = self.build_id_first and name == xen_abi.SEC_XEN_DEPENDS
            if sh is None or not sh.size:
                if not checked_first:
                    self.fail(xen_abi.EINVAL, f"{name} is missing or empty")
                continue
            desc = parse_build_id_note(self.body(sh))
            setattr(self.info, attr, desc)
            if checked_first:
                continue
            if not sh.is_alloc:
                self.fail(xen_abi.EINVAL, f"{name} is not SHF_ALLOC (Xen reads it in memory)")
            if not desc:
                self.fail(xen_abi.EINVAL, f"{name} is not a valid GNU build-id note")

    def check_xen_depends_first(self) -> None:
        """4.18.4, 4.19.1, 4.20+: xen_depends against the hypervisor before anything else, so
        a payload for another hypervisor fails with this -EINVAL whatever else is wrong."""
        sh = self.section(xen_abi.SEC_XEN_DEPENDS)
        if sh is None:
            self.fail(xen_abi.EINVAL, f"{xen_abi.SEC_XEN_DEPENDS} is missing")
            return
        desc = parse_build_id_note(self.body(sh))
        if not sh.size or not desc:
            self.fail(xen_abi.EINVAL, f"failed to parse {xen_abi.SEC_XEN_DEPENDS} as a build-id")
            return
        self.check_xen_depends(desc)

    def check_xen_depends(self, desc: bytes) -> None:
        if self.xen_build_id is not None and desc != self.xen_build_id:
            self.fail(xen_abi.EINVAL, f"check against hypervisor build-id failed: payload built "
                      f"for {desc.hex()}, hypervisor is {self.xen_build_id.hex()}")

    def check_patching_sections(self) -> None:
        present = [self.section(n) for n in xen_abi.PATCHING_SECTIONS]
        found = [s for s in present if s is not None]
        if not found:
            self.fail(xen_abi.EINVAL, "nothing to patch: no .livepatch.funcs and no hook section")
        for s in found:
            if not s.size:
                self.fail(xen_abi.EINVAL, f"{s.name} is present but empty")

    # -- §1.5 ----------------------------------------------------------------------------------
    def _relocs_of(self, target: RawSection) -> dict[int, tuple[_Sym, int, int]]:
        out: dict[int, tuple[_Sym, int, int]] = {}
        for sh in self.shdrs[1:]:
            if sh.type == SHT_RELA and sh.info == target.index and sh.entsize:
                for k in range(sh.size // sh.entsize):
                    r_offset, r_info, r_addend = xen_abi.ELF64_RELA.unpack(
                        self.data, sh.offset + k * sh.entsize)
                    if (r_info >> 32) < len(self.syms):
                        out[r_offset] = (self.syms[r_info >> 32], r_info & 0xFFFFFFFF, r_addend)
        return out

    def _string_at(self, sym: _Sym, addend: int) -> str:
        if sym.shndx == SHN_UNDEF or sym.shndx >= len(self.shdrs):
            return ""
        body = self.body(self.shdrs[sym.shndx])
        start = sym.value + addend
        end = body.find(b"\0", start)
        return body[start:end].decode("utf-8", "replace") if 0 <= start <= end else ""

    def check_funcs(self) -> None:
        sh = self.section(xen_abi.SEC_FUNCS)
        if sh is None or not sh.size:
            return
        if sh.size % xen_abi.FUNC_SIZE:
            self.fail(xen_abi.EINVAL, f"{sh.name} size {sh.size} is not a multiple of "
                      f"{xen_abi.FUNC_SIZE}")
            return
        relocs = self._relocs_of(sh)
        body = self.body(sh)
        for off in range(0, sh.size, xen_abi.FUNC_SIZE):
            (_name, new_addr, old_addr, new_size, old_size, version, _pad,
             _expect) = xen_abi.FUNC_STRUCT.unpack_from(body, off)
            name_rel = relocs.get(off + xen_abi.FUNC_OFF_NAME)
            new_rel = relocs.get(off + xen_abi.FUNC_OFF_NEW_ADDR)
            old_rel = relocs.get(off + xen_abi.FUNC_OFF_OLD_ADDR)
            name = self._string_at(name_rel[0], name_rel[2]) if name_rel else ""
            new_sym = new_rel[0].name if new_rel else ""
            label = name or f"entry {off // xen_abi.FUNC_SIZE}"
            if old_rel is not None and old_rel[0].shndx == SHN_UNDEF:
                old_addr = self._resolve(old_rel[0].name) + old_rel[2]
            # old_addr 0: Xen looks the name up at load (spec §1.5 step 2).
            by_name = (self.xs.lookup(name) if not old_addr and old_rel is None
                       and self.xs is not None else None)
            if by_name is not None:
                old_addr = by_name.addr
            self.info.funcs.append(FuncInfo(name, new_sym, old_addr, new_size, old_size,
                                            version))
            if version != xen_abi.LIVEPATCH_PAYLOAD_VERSION:
                self.fail(xen_abi.EOPNOTSUPP, f"{label}: version {version}, Xen needs "
                          f"{xen_abi.LIVEPATCH_PAYLOAD_VERSION}")
                continue
            if old_size == 0:
                self.fail(xen_abi.EINVAL, f"{label}: old_size is 0")
                continue
            if not old_addr and old_rel is None and self.xs is not None:
                self.fail(xen_abi.ENOENT, f"could not resolve old address of {label}")
                continue
            is_nop = new_rel is None and not new_addr
            if is_nop:
                if new_size > xen_abi.OPAQUE_SIZE:
                    self.fail(xen_abi.EOPNOTSUPP, f"{label}: NOP of {new_size} bytes (max 31)")
                elif old_size < new_size:
                    self.fail(xen_abi.EINVAL, f"{label}: NOP longer than the function")
                continue
            need = xen_abi.PATCH_INSN_SIZE
            if self.xs is not None and old_addr:
                head = self.xs.read(old_addr, xen_abi.ENDBR64_LEN)
                if head in (xen_abi.ENDBR64, xen_abi.ENDBR64_POISON):
                    need += xen_abi.ENDBR64_LEN
            if old_size < need:
                self.fail(xen_abi.EINVAL, f"{label}: old_size {old_size} is too small for the "
                          f"{need}-byte jump")

    # -- hooks and arch sections (§1.4) --------------------------------------------------------
    def check_hooks(self) -> None:
        for kind in xen_abi.HOOK_KINDS:
            sh = self.section(xen_abi.HOOK_PREFIX + kind)
            if sh is None:
                continue
            if kind in xen_abi.HOOK_ARRAY_KINDS:
                if sh.size % xen_abi.HOOK_POINTER_SIZE:
                    self.fail(xen_abi.EINVAL, f"{sh.name}: size {sh.size} is not a multiple of "
                              "8")
                    continue
            elif sh.size != xen_abi.HOOK_POINTER_SIZE:
                self.fail(xen_abi.EINVAL, f"{sh.name}: size {sh.size}, must be exactly 8")
                continue
            self.info.hooks[kind] = sh.size // xen_abi.HOOK_POINTER_SIZE

    def check_arch_sections(self) -> None:
        for name in xen_abi.BUG_FRAME_SECTIONS:
            sh = self.section(name)
            if sh is not None and sh.size % xen_abi.BUG_FRAME_SIZE:
                self.fail(xen_abi.EINVAL, f"{name}: size not a multiple of "
                          f"{xen_abi.BUG_FRAME_SIZE}")
        ex = self.section(xen_abi.SEC_EX_TABLE)
        if ex is not None and ex.size % xen_abi.EX_TABLE_ENTRY_SIZE:
            self.fail(xen_abi.EINVAL, f"{ex.name}: size not a multiple of "
                      f"{xen_abi.EX_TABLE_ENTRY_SIZE}")
        mod = self.section(xen_abi.SEC_MODINFO)
        if mod is not None:
            body = self.body(mod)
            if not body or body[-1] != 0:
                self.fail(xen_abi.EINVAL, ".modinfo does not end with a NUL byte")
            self.info.modinfo = body
        self.check_alternatives()
        self.check_alt_calls()

    def check_alternatives(self) -> None:
        alt = self.section(xen_abi.SEC_ALTINSTRUCTIONS)
        if alt is None or not alt.size:
            return
        if alt.size % xen_abi.ALT_INSTR_SIZE:
            self.fail(xen_abi.EINVAL, f"{alt.name}: size not a multiple of "
                      f"{xen_abi.ALT_INSTR_SIZE}")
            return
        repl = self.section(xen_abi.SEC_ALTINSTR_REPLACEMENT)
        if repl is None:
            self.fail_unless(Rule.ALTERNATIVES_BOUNDS, xen_abi.EINVAL,
                             f"{alt.name} without {xen_abi.SEC_ALTINSTR_REPLACEMENT}")
            return
        relocs = self._relocs_of(alt)
        body = self.body(alt)
        for off in range(0, alt.size, xen_abi.ALT_INSTR_SIZE):
            self._check_alt_entry(alt, repl, relocs, off, xen_abi.ALT_INSTR.unpack(body, off))

    def _check_alt_entry(self, alt: RawSection, repl: RawSection,
                         relocs: dict[int, tuple[_Sym, int, int]], off: int,
                         entry: Any) -> None:
        orig_len, repl_len, pad_len = entry.orig_len, entry.repl_len, entry.pad_len
        where = f"{alt.name} entry {off // xen_abi.ALT_INSTR_SIZE}"
        orig = relocs.get(off + xen_abi.ALT_INSTR.offset("orig_offset"))
        rrel = relocs.get(off + xen_abi.ALT_INSTR.offset("repl_offset"))
        if orig is None or not self._in_text(orig[0], orig[2], orig_len):
            self.fail_unless(Rule.ALTERNATIVES_BOUNDS, xen_abi.EINVAL,
                             f"{where}: original instructions not in the payload's text"
                             + self._unchecked(Rule.ALTERNATIVES_BOUNDS))
        if rrel is None or rrel[0].shndx != repl.index or \
                rrel[0].value + rrel[2] + repl_len > repl.size or rrel[0].value + rrel[2] < 0:
            self.fail_unless(Rule.ALTERNATIVES_BOUNDS, xen_abi.EINVAL,
                             f"{where}: replacement not inside "
                             f"{xen_abi.SEC_ALTINSTR_REPLACEMENT}"
                             + self._unchecked(Rule.ALTERNATIVES_BOUNDS))
        if repl_len > orig_len + pad_len or orig_len + pad_len > 254:
            fits = f"{where}: replacement of {repl_len} bytes does not fit {orig_len}+{pad_len}"
            if self.target.has(Rule.ALTERNATIVES_ERRNO):
                self.fail(xen_abi.ENOSPC, fits)
            else:
                self.fail(xen_abi.EINVAL, f"{fits}: {self._xen()} would BUG() (crash the host) "
                          "applying it", ProblemKind.HAZARD)

    def _xen(self) -> str:
        v = self.target.version
        return f"Xen {v}" if v is not None else "Xen 4.17"

    def _unchecked(self, rule: Rule) -> str:
        """The tail of a hazard's message: this release does not check it."""
        if self.target.has(rule):
            return ""
        return f" ({self._xen()} does not check this and patches wherever it points)"

    # -- per-release sections (§1.5, §8) -------------------------------------------------------
    def check_funcs_writable(self) -> None:
        """4.17.1, 4.17.2, 4.18.0 write into .livepatch.funcs at APPLY with CR0.WP set."""
        sh = self.section(xen_abi.SEC_FUNCS)
        if sh is None or not sh.size or sh.flags & SHF_WRITE:
            return
        if self.target.has(Rule.FUNCS_WRITTEN_AT_APPLY):
            self.fail(xen_abi.EINVAL, f"{sh.name} is read-only: {self._xen()} writes into it "
                      "at APPLY and would page-fault (crash the host); make it writable "
                      "(SHF_ALLOC|SHF_WRITE)", ProblemKind.HAZARD)

    def check_alt_calls(self) -> None:
        """4.21+: .alt_call_sites, s32 offsets each naming a 6-byte indirect call in the text."""
        sh = self.section(xen_abi.SEC_ALT_CALL_SITES)
        if sh is None:
            return
        if not self.target.has(Rule.ALT_CALL_SITES):
            if sh.size:
                self.fail(xen_abi.EOPNOTSUPP, f"{sh.name}: {self._xen()} does not know it "
                          "(4.21+): it would load it as plain data and never patch the call "
                          "sites; build the payload from this hypervisor's tree",
                          ProblemKind.HAZARD)
            return
        if self.target.alternative_call is False:
            self.fail(xen_abi.EOPNOTSUPP, f"{sh.name}: alternative calls not supported (the "
                      "hypervisor is built without CONFIG_ALTERNATIVE_CALL)")
            return
        size = xen_abi.ALT_CALL.size
        if sh.size % size:
            self.fail(xen_abi.EINVAL, f"{sh.name}: size {sh.size} is not a multiple of {size}")
            return
        relocs = self._relocs_of(sh)
        for off in range(0, sh.size, size):
            site = relocs.get(off + xen_abi.ALT_CALL.offset("offset"))
            if site is None or not self._in_text(site[0], site[2], xen_abi.ALT_CALL_SITE_LEN):
                self.fail(xen_abi.EINVAL, f"{sh.name} entry {off // size}: call site outside "
                          "the payload's text")

    def _in_text(self, sym: _Sym, addend: int, length: int) -> bool:
        if not 0 < sym.shndx < len(self.shdrs):
            return False
        sh = self.shdrs[sym.shndx]
        start = sym.value + addend
        return bool(sh.flags & SHF_EXECINSTR) and sh.is_alloc and start >= 0 and \
            start + length <= sh.size

    # -- build-ids and new symbols (§1.6, §1.7) ------------------------------------------------
    def check_build_ids(self) -> None:
        if self.info.build_id and any(p.build_id == self.info.build_id for p in self.loaded):
            self.fail(xen_abi.EEXIST, "a loaded payload has the same build-id")
        if not self.build_id_first and self.info.xen_depends:
            self.check_xen_depends(self.info.xen_depends)

    def check_new_symbols(self) -> None:
        overriding = {f.new_symbol for f in self.info.funcs if f.new_symbol}
        theirs = {n for p in self.loaded for n in p.new_symbols}
        for s in self.syms[1:]:
            if not s.name or not 0 < s.shndx < self.e_shnum:
                continue
            sh = self.shdrs[s.shndx]
            if not sh.is_alloc or (s.name.startswith(".L") and sh.flags & SHF_MERGE):
                continue
            if (s.info & 0xF) == 3:  # section symbols have no name in practice
                continue
            if s.name in overriding:
                continue
            self.info.new_symbols.append(s.name[:xen_abi.KSYM_NAME_LEN - 1])
            if self.xs is not None and s.name in self.xs:
                self.fail(xen_abi.EEXIST, f"duplicate new symbol {s.name}: the hypervisor has it")
            elif s.name in theirs:
                self.fail(xen_abi.EEXIST, f"duplicate new symbol {s.name}: a loaded payload has "
                          "it")

    def safe_to_reapply(self) -> bool:
        writable = [s for s in self.shdrs[1:] if s.is_alloc and s.flags & SHF_WRITE and s.size]
        return not writable or (len(writable) == 1 and writable[0].name == xen_abi.SEC_FUNCS)
