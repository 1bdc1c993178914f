"""A user-space stand-in for Xen 4.17's livepatch loader, run in a CHILD process.

Behavioural proof needs a payload to do in a process what it would do in the hypervisor:

* the fixture image (a static ELF standing in for ``xen-syms``) is mapped at its link address;
* the payload's SHF_ALLOC sections are laid out in three regions text / rw / ro exactly as
  ``move_payload`` does (spec §1.3), in one mapping within ±2 GiB of the image;
* undefined symbols resolve against the image's symbol table with Xen's naming (spec §1.7, §7);
* R_X86_64_64 / PC32 / PLT32 are applied with Xen's checks, every other type refused (spec §1.8);
* ``.livepatch.funcs`` gets its per-function checks and ``old_addr`` by name when 0 (spec §1.5);
* apply writes ``E9 rel32`` at ``old_addr`` (+4 after ENDBR64), revert restores the saved bytes
  (spec §3.1); hooks run where Xen runs them (load hooks at APPLY, unload hooks at
  REVERT, spec §3.3).

Errors carry Xen's errno names so tests can compare them with what the hypervisor would return.
Not modelled: alternatives are checked but not applied (the original instructions run), the
exception table is not consulted (fixtures never fault), no stacking between payloads.

Run as ``python -m xsbuild.sandbox.loader`` with a JSON script on stdin (see :func:`run_script`);
it prints one JSON object on stdout.  Only the standard library, pyelftools and
:mod:`xsbuild.xen_abi` are used, so the child starts fast, shares no state with the process that
built the payload, and stays an independent oracle: it reads the image's symbols and the
payload's notes with its own code, not with the readers under test (:mod:`xsbuild.xensyms`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import faulthandler
import io
import json
import mmap
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile

from xsbuild import xen_abi as abi

# Link address of the fixture image: 64 GiB, far from the heap and mmap areas of a Python
# process, so it is free in the child.
IMAGE_BASE = 0x10_0000_0000

MAP_FIXED_NOREPLACE = 0x100000  # Linux mmap flag: fail instead of replacing a mapping
PROT_R, PROT_W, PROT_X = mmap.PROT_READ, mmap.PROT_WRITE, mmap.PROT_EXEC
SHN_LORESERVE = 0xFF00
SHN_ABS = 0xFFF1
SHN_COMMON = 0xFFF2
NOP = b"\x90"


class LoaderError(Exception):
    """A refusal, with the errno the hypervisor would return."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno_value = errno_value


# ----------------------------------------------------------------------------------------------
# The image's symbol table, named as Xen's symbols table names it (spec §7)

@dataclass(frozen=True)
class ImageSymbol:
    """One entry of the hypervisor's symbol table: Xen name, link-time address, size."""

    name: str
    value: int
    size: int


def read_image_symbols(path: Path) -> dict[str, ImageSymbol]:
    """Xen-style names for every defined, non-absolute symbol of ``path``.

    Locals (nm's lowercase letters) become ``<latest STT_FILE>#<name>``; globals and weak
    symbols keep their plain name.  Section and file symbols are not entries.
    """
    table: dict[str, ImageSymbol] = {}
    with path.open("rb") as fh:
        symtab = ELFFile(fh).get_section_by_name(".symtab")
        if symtab is None:
            raise LoaderError(abi.EINVAL, f"{path}: no .symtab")
        current_file = ""
        for sym in symtab.iter_symbols():
            kind, bind, shndx = sym["st_info"]["type"], sym["st_info"]["bind"], sym["st_shndx"]
            if kind == "STT_FILE":
                current_file = sym.name
                continue
            if not sym.name or kind == "STT_SECTION" or shndx in ("SHN_UNDEF", "SHN_ABS"):
                continue
            name = f"{current_file}#{sym.name}" if bind == "STB_LOCAL" else sym.name
            table.setdefault(name, ImageSymbol(name, sym["st_value"], sym["st_size"]))
    return table


def parse_build_id_note(note: bytes, what: str) -> bytes:
    """The descriptor of a GNU build-id note, with the 4.17 checks (spec §1.6)."""
    if len(note) <= abi.NOTE_HEADER.size:
        raise LoaderError(abi.EINVAL, f"{what}: note too small")
    namesz, descsz, ntype = abi.NOTE_HEADER.unpack_from(note)
    if ntype != abi.NT_GNU_BUILD_ID or namesz < 4 or descsz == 0:
        raise LoaderError(abi.EINVAL, f"{what}: not a GNU build-id note")
    if namesz + descsz > len(note) - abi.NOTE_HEADER.size:
        raise LoaderError(abi.EINVAL, f"{what}: note sizes exceed the section")
    if note[12:12 + namesz] != abi.NOTE_NAME_GNU:
        raise LoaderError(abi.EINVAL, f"{what}: note name is not GNU")
    start = 12 + ((namesz + 3) & ~3)
    return note[start:start + descsz]


# ----------------------------------------------------------------------------------------------
# Process memory through libc

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _page_down(addr: int) -> int:
    return addr & ~(abi.PAGE_SIZE - 1)


def _page_up(size: int) -> int:
    return (size + abi.PAGE_SIZE - 1) & ~(abi.PAGE_SIZE - 1)


def _roundup(value: int, align: int) -> int:
    # Xen's ROUNDUP: an alignment of 0 yields 0 (the hazard of spec §1.2), kept on purpose.
    return (value + align - 1) & ~(align - 1)


def mprotect(addr: int, size: int, prot: int) -> None:
    start = _page_down(addr)
    if _libc.mprotect(start, _page_up(addr + size - start), prot) != 0:
        raise OSError(ctypes.get_errno(), f"mprotect({addr:#x}, {size})")


def map_near(anchor: int, size: int) -> int:
    """Map ``size`` bytes RWX within 2 GiB above ``anchor`` (Xen's vmap area is that close)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
    length = _page_up(max(size, 1))
    for step in range(1, 64):
        hint = _page_up(anchor) + step * 0x0100_0000  # 16 MiB steps above the image
        addr = _libc.mmap(hint, length, PROT_R | PROT_W | PROT_X, flags, -1, 0)
        if addr not in (None, ctypes.c_void_p(-1).value) and addr == hint:
            return addr
    raise LoaderError(abi.ENOMEM, "no free address range within 2 GiB of the image")


# ----------------------------------------------------------------------------------------------
# The loaded image

PF_X, PF_W, PF_R = 1, 2, 4


def _map_segment(vaddr: int, memsz: int, data: bytes, p_flags: int) -> None:
    start = _page_down(vaddr)
    length = _page_up(vaddr + memsz - start)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
    addr = _libc.mmap(start, length, PROT_R | PROT_W, flags, -1, 0)
    if addr != start:
        raise LoaderError(abi.ENOMEM, f"cannot map the image at {start:#x} (got {addr})")
    ctypes.memmove(vaddr, data, len(data))
    prot = ((PROT_R if p_flags & PF_R else 0) | (PROT_W if p_flags & PF_W else 0)
            | (PROT_X if p_flags & PF_X else 0))
    mprotect(start, length, prot)

@dataclass
class LoadedImage:
    """The fixture image mapped at its link addresses: symbols, build-id, end of its mapping.

    Static and linked at a fixed address, it needs no relocation: each PT_LOAD segment is
    mapped where it was linked, file bytes copied, the rest zeroed, then given its permissions,
    as a boot loader does for the hypervisor.
    """

    path: Path
    symbols: dict[str, ImageSymbol]
    build_id: bytes
    end: int

    @classmethod
    def load(cls, path: Path) -> LoadedImage:
        with path.open("rb") as fh:
            elf = ELFFile(fh)
            if elf["e_type"] != "ET_EXEC":
                raise LoaderError(abi.EINVAL, f"{path}: the image must be a static executable")
            segments = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
            for seg in segments:
                _map_segment(seg["p_vaddr"], seg["p_memsz"], seg.data(), seg["p_flags"])
            note = elf.get_section_by_name(abi.SEC_BUILD_ID).data()
            end = max(seg["p_vaddr"] + seg["p_memsz"] for seg in segments)
        return cls(path, read_image_symbols(path), parse_build_id_note(note, "image"), end)

    def lookup(self, name: str) -> int:
        """Xen's ``symbols_lookup_by_name``: an exact match, 0 when absent."""
        sym = self.symbols.get(name)
        return sym.value if sym else 0


def read_cstring(addr: int, limit: int = abi.KSYM_NAME_LEN + 1) -> str:
    return ctypes.string_at(addr, limit).split(b"\0", 1)[0].decode("latin-1")


# ----------------------------------------------------------------------------------------------
# The payload

@dataclass
class PatchState:
    """What apply saved for one function, to restore at revert (livepatch_fstate)."""

    where: int
    saved: bytes


@dataclass
class Payload:
    """One payload loaded into the process: regions, symbols, funcs, hooks, applied state."""

    name: str
    base: int = 0
    size: int = 0
    sections: dict[int, int] = field(default_factory=dict)  # section index -> address
    funcs: list[int] = field(default_factory=list)  # addresses of struct livepatch_func
    hooks: dict[str, list[int]] = field(default_factory=dict)
    patched: list[PatchState] = field(default_factory=list)


@dataclass
class _Layout:
    """Region sizes and each section's offset inside its region (``calc_section``)."""

    sizes: dict[str, int] = field(default_factory=lambda: {"text": 0, "rw": 0, "ro": 0})
    place: dict[int, tuple[str, int]] = field(default_factory=dict)


def _region(flags: int, name: str) -> str:
    writable, executable = flags & SH_FLAGS.SHF_WRITE, flags & SH_FLAGS.SHF_EXECINSTR
    if writable and executable:
        raise LoaderError(abi.EOPNOTSUPP, f"section {name} is both writable and executable")
    return "text" if executable else "rw" if writable else "ro"


def _layout(elf: ELFFile) -> _Layout:
    layout = _Layout()
    for idx, sec in enumerate(elf.iter_sections()):
        if idx == 0 or not sec["sh_flags"] & SH_FLAGS.SHF_ALLOC:
            continue
        region = _region(sec["sh_flags"], sec.name)
        offset = _roundup(layout.sizes[region], sec["sh_addralign"])
        layout.place[idx] = (region, offset)
        layout.sizes[region] = offset + sec["sh_size"]
    return layout


def _check_header(data: bytes) -> None:
    if len(data) < abi.ELF64_EHDR_SIZE or data[:4] != b"\x7fELF":
        raise LoaderError(abi.EINVAL, "not an ELF file")
    if data[4] != 2 or data[5] != 1 or data[7] not in abi.ELF_OSABI_ACCEPTED or data[8] != 0:
        raise LoaderError(abi.EOPNOTSUPP, "unsupported ELF class, data or OS ABI")
    e_type, e_machine = int.from_bytes(data[16:18], "little"), int.from_bytes(data[18:20],
                                                                               "little")
    if e_type != 1 or e_machine != abi.ELF_MACHINE_X86_64:
        raise LoaderError(abi.EOPNOTSUPP, "not an x86-64 relocatable object")
    if len(data) > abi.LIVEPATCH_MAX_SIZE:
        raise LoaderError(abi.EINVAL, "payload larger than 2 MiB")


def _move(elf: ELFFile, image: LoadedImage, payload: Payload) -> dict[str, int]:
    layout = _layout(elf)
    text, rw = _page_up(layout.sizes["text"]), _page_up(layout.sizes["rw"])
    payload.size = text + rw + layout.sizes["ro"]
    payload.base = map_near(image.end, payload.size)
    starts = {"text": payload.base, "rw": payload.base + text, "ro": payload.base + text + rw}
    for idx, (region, offset) in layout.place.items():
        sec = elf.get_section(idx)
        addr = starts[region] + offset
        payload.sections[idx] = addr
        if sec["sh_type"] != "SHT_NOBITS" and sec["sh_size"]:
            ctypes.memmove(addr, sec.data(), sec["sh_size"])
    return {"text_size": layout.sizes["text"], "text": starts["text"], "rw_size": rw,
            "rw": starts["rw"], "ro_size": layout.sizes["ro"], "ro": starts["ro"]}


def _resolve_symbols(elf: ELFFile, image: LoadedImage, payload: Payload) -> list[int | None]:
    """Symbol index -> address (None: "ignored", in a non-ALLOC section)."""
    values: list[int | None] = []
    for idx, sym in enumerate(elf.get_section_by_name(".symtab").iter_symbols()):
        shndx = sym["st_shndx"]
        if idx == 0:
            values.append(0)
        elif shndx == "SHN_UNDEF":
            addr = image.lookup(sym.name)
            if not addr:
                raise LoaderError(abi.ENOENT, f"Unknown symbol: {sym.name}")
            values.append(addr)
        elif shndx == "SHN_COMMON":
            raise LoaderError(abi.EINVAL, f"Unexpected common symbol: {sym.name}")
        elif shndx == "SHN_ABS":
            values.append(sym["st_value"])
        elif isinstance(shndx, str) or shndx >= SHN_LORESERVE:
            raise LoaderError(abi.EOPNOTSUPP, f"symbol {sym.name}: unsupported index {shndx}")
        elif shndx in payload.sections:
            values.append(payload.sections[shndx] + sym["st_value"])
        else:
            values.append(None)
    return values


def _apply_rela(sec: Any, target: Any, base: int, values: list[int | None], names: list[str]
                ) -> None:
    for rel in sec.iter_relocations():
        rtype, symidx, offset = rel["r_info_type"], rel["r_info_sym"], rel["r_offset"]
        if symidx == 0:
            raise LoaderError(abi.EOPNOTSUPP, f"{sec.name}+{offset:#x}: relocation to STN_UNDEF")
        if symidx >= len(values):
            raise LoaderError(abi.EINVAL, f"{sec.name}+{offset:#x}: bad symbol index")
        if rtype not in abi.ACCEPTED_RELOC_TYPES:
            raise LoaderError(abi.EOPNOTSUPP, f"Unhandled relocation "
                              f"{abi.reloc_type_name(rtype)} against {names[symidx]} "
                              f"in {target.name}+{offset:#x}")
        if rtype == abi.R_X86_64_NONE:
            continue
        value = values[symidx]
        if value is None:
            raise LoaderError(abi.EINVAL, f"relocation against ignored symbol {names[symidx]}")
        value += rel["r_addend"]
        kind = abi.RELOC_KINDS[rtype]
        width = kind.width
        if offset + width > target["sh_size"]:
            raise LoaderError(abi.EINVAL, f"{target.name}+{offset:#x}: relocation past the end")
        place = base + offset
        if not kind.pc_relative:
            ctypes.c_uint64.from_address(place).value = value & (2**64 - 1)
            continue
        value -= place
        if not -(2**31) <= value < 2**31:
            raise LoaderError(abi.EOVERFLOW, f"{target.name}+{offset:#x}: PC32 to "
                              f"{names[symidx]} overflows")
        ctypes.c_int32.from_address(place).value = value


def _relocate(elf: ELFFile, payload: Payload, values: list[int | None]) -> None:
    symtab_idx = next(i for i, s in enumerate(elf.iter_sections()) if s.name == ".symtab")
    names = [s.name for s in elf.get_section(symtab_idx).iter_symbols()]
    for sec in elf.iter_sections():
        if sec["sh_type"] not in ("SHT_RELA", "SHT_REL"):
            continue
        target_idx = sec["sh_info"]
        if target_idx >= elf.num_sections() or target_idx not in payload.sections:
            continue
        if sec["sh_link"] != symtab_idx:
            raise LoaderError(abi.EINVAL, f"{sec.name}: sh_link is not the symbol table")
        if sec["sh_size"] == 0:
            continue
        if sec["sh_type"] == "SHT_REL":
            raise LoaderError(abi.EOPNOTSUPP, f"{sec.name}: SHT_REL is not supported")
        _apply_rela(sec, elf.get_section(target_idx), payload.sections[target_idx], values,
                    names)


def _section(elf: ELFFile, payload: Payload, name: str) -> tuple[int, int] | None:
    """(address, size) of the first ALLOC section called ``name``."""
    for idx, sec in enumerate(elf.iter_sections()):
        if sec.name == name and idx in payload.sections:
            return payload.sections[idx], sec["sh_size"]
    return None


def _check_sections(elf: ELFFile, payload: Payload) -> None:
    for name in abi.REQUIRED_NOTE_SECTIONS:
        found = _section(elf, payload, name)
        if not found or not found[1]:
            raise LoaderError(abi.EINVAL, f"{name} is missing or empty")
    present = [s for s in (_section(elf, payload, n) for n in abi.PATCHING_SECTIONS) if s]
    if not present:
        raise LoaderError(abi.EINVAL, "Nothing to patch")
    if any(size == 0 for _, size in present):
        raise LoaderError(abi.EINVAL, "an empty patching section")


def _func_fields(addr: int) -> tuple[int, int, int, int, int, int, bytes]:
    raw = ctypes.string_at(addr, abi.FUNC_SIZE)
    name, new_addr, old_addr, new_size, old_size, version, _pad, expect = \
        abi.FUNC_STRUCT.unpack(raw)
    return name, new_addr, old_addr, new_size, old_size, version, expect


def _has_endbr(addr: int) -> bool:
    return ctypes.string_at(addr, abi.ENDBR64_LEN) in (abi.ENDBR64, abi.ENDBR64_POISON)


def _prepare_funcs(elf: ELFFile, image: LoadedImage, payload: Payload) -> None:
    found = _section(elf, payload, abi.SEC_FUNCS)
    if not found:
        return
    addr, size = found
    if size % abi.FUNC_SIZE:
        raise LoaderError(abi.EINVAL, f"{abi.SEC_FUNCS} size is not a multiple of 104")
    for entry in range(addr, addr + size, abi.FUNC_SIZE):
        name, new_addr, old_addr, new_size, old_size, version, _ = _func_fields(entry)
        label = read_cstring(name) if name else f"<entry at {entry:#x}>"
        if version != abi.LIVEPATCH_PAYLOAD_VERSION:
            raise LoaderError(abi.EOPNOTSUPP, f"{label}: version {version}")
        if old_size == 0:
            raise LoaderError(abi.EINVAL, f"{label}: old_size is 0")
        if old_addr == 0:
            old_addr = image.lookup(read_cstring(name)) if name else 0
            if not old_addr:
                raise LoaderError(abi.ENOENT, f"Could not resolve old address of {label}")
            ctypes.c_uint64.from_address(entry + abi.FUNC_OFF_OLD_ADDR).value = old_addr
        if new_addr == 0:
            if new_size > abi.OPAQUE_SIZE:
                raise LoaderError(abi.EOPNOTSUPP, f"{label}: NOP of {new_size} bytes")
            if old_size < new_size:
                raise LoaderError(abi.EINVAL, f"{label}: NOP larger than the function")
        else:
            needed = abi.PATCH_INSN_SIZE + (abi.ENDBR64_LEN if _has_endbr(old_addr) else 0)
            if old_size < needed:
                raise LoaderError(abi.EINVAL, f"{label}: old_size {old_size} < {needed}")
            if not -abi.LIVEPATCH_RANGE <= old_addr - new_addr < abi.LIVEPATCH_RANGE:
                raise LoaderError(abi.EOVERFLOW, f"{label}: too far from its replacement")
        payload.funcs.append(entry)


def _prepare_hooks(elf: ELFFile, payload: Payload) -> None:
    for kind in abi.HOOK_KINDS:
        found = _section(elf, payload, abi.HOOK_PREFIX + kind)
        if not found:
            continue
        addr, size = found
        if kind in abi.HOOK_ARRAY_KINDS and size % abi.HOOK_POINTER_SIZE:
            raise LoaderError(abi.EINVAL, f"hooks.{kind}: size not a multiple of 8")
        if kind in abi.HOOK_SINGLE_KINDS and size != abi.HOOK_POINTER_SIZE:
            raise LoaderError(abi.EINVAL, f"hooks.{kind}: size is not 8")
        payload.hooks[kind] = [ctypes.c_uint64.from_address(p).value
                               for p in range(addr, addr + size, abi.HOOK_POINTER_SIZE)]


def _check_special(elf: ELFFile, payload: Payload, regions: dict[str, int]) -> None:
    for name in abi.BUG_FRAME_SECTIONS:
        found = _section(elf, payload, name)
        if found and found[1] % abi.BUG_FRAME_SIZE:
            raise LoaderError(abi.EINVAL, f"{name}: size not a multiple of 8")
    found = _section(elf, payload, abi.SEC_EX_TABLE)
    if found and found[1] % abi.EX_TABLE_ENTRY_SIZE:
        raise LoaderError(abi.EINVAL, f"{abi.SEC_EX_TABLE}: size not a multiple of 8")
    alt = _section(elf, payload, abi.SEC_ALTINSTRUCTIONS)
    if alt and alt[1]:
        _check_alternatives(elf, payload, alt, regions)
    modinfo = _section(elf, payload, abi.SEC_MODINFO)
    if modinfo and modinfo[1] and ctypes.string_at(modinfo[0] + modinfo[1] - 1, 1) != b"\0":
        raise LoaderError(abi.EINVAL, ".modinfo is not NUL-terminated")


def _check_alternatives(elf: ELFFile, payload: Payload, alt: tuple[int, int],
                        regions: dict[str, int]) -> None:
    addr, size = alt
    repl = _section(elf, payload, abi.SEC_ALTINSTR_REPLACEMENT)
    if size % abi.ALT_INSTR_SIZE or not regions["text_size"] or not repl:
        raise LoaderError(abi.EINVAL, "bad .altinstructions")
    text_lo, text_hi = regions["text"], regions["text"] + regions["text_size"]
    for entry in range(addr, addr + size, abi.ALT_INSTR_SIZE):
        alt = abi.ALT_INSTR.unpack(ctypes.string_at(entry, abi.ALT_INSTR_SIZE))
        orig_len, repl_len = alt.orig_len, alt.repl_len
        # Each offset is relative to its own field.
        orig = entry + abi.ALT_INSTR.offset("orig_offset") + alt.orig_offset
        new = entry + abi.ALT_INSTR.offset("repl_offset") + alt.repl_offset
        if not (text_lo <= orig and orig + orig_len <= text_hi):
            raise LoaderError(abi.EINVAL, f"alternative at {orig:#x} outside the text region")
        if not (repl[0] <= new and new + repl_len <= repl[0] + repl[1]):
            raise LoaderError(abi.EINVAL, "alternative replacement outside .altinstr_replacement")


def _check_new_symbols(elf: ELFFile, image: LoadedImage, payload: Payload) -> None:
    """``build_symbol_table``: a non-overriding payload symbol may not shadow an image name."""
    new_addrs = {_func_fields(f)[1] for f in payload.funcs}
    sections = list(elf.iter_sections())
    for sym in elf.get_section_by_name(".symtab").iter_symbols():
        shndx = sym["st_shndx"]
        if not sym.name or not isinstance(shndx, int) or shndx not in payload.sections:
            continue
        if sym.name.startswith(".L") and sections[shndx]["sh_flags"] & SH_FLAGS.SHF_MERGE:
            continue
        if payload.sections[shndx] + sym["st_value"] in new_addrs:
            continue  # overriding: not exported
        if sym.name in image.symbols:
            raise LoaderError(abi.EEXIST, f"duplicate new symbol: {sym.name}")


def _secure(payload: Payload, regions: dict[str, int]) -> None:
    if regions["text_size"]:
        mprotect(regions["text"], regions["text_size"], PROT_R | PROT_X)
    if regions["rw_size"]:
        mprotect(regions["rw"], regions["rw_size"], PROT_R | PROT_W)
    if regions["ro_size"]:
        mprotect(regions["ro"], regions["ro_size"], PROT_R)


def load_payload(path: Path, image: LoadedImage) -> Payload:
    """UPLOAD (spec §2, in its order): checks, move, resolve, relocate, prepare, secure."""
    data = path.read_bytes()
    _check_header(data)
    elf = ELFFile(io.BytesIO(data))
    payload = Payload(path.name)
    try:
        regions = _move(elf, image, payload)
        values = _resolve_symbols(elf, image, payload)
        _relocate(elf, payload, values)
        _check_sections(elf, payload)
        _prepare_funcs(elf, image, payload)
        _prepare_hooks(elf, payload)
        _check_special(elf, payload, regions)
        depends = _section(elf, payload, abi.SEC_XEN_DEPENDS)
        xen_id = parse_build_id_note(ctypes.string_at(*depends), abi.SEC_XEN_DEPENDS)
        parse_build_id_note(ctypes.string_at(*_section(elf, payload, abi.SEC_BUILD_ID)),
                            abi.SEC_BUILD_ID)
        if xen_id != image.build_id:
            raise LoaderError(abi.EINVAL, "check against hypervisor build-id failed")
        _check_new_symbols(elf, image, payload)
        _secure(payload, regions)
    except BaseException:
        if payload.base:
            _libc.munmap(payload.base, _page_up(payload.size))
        raise
    return payload


# ----------------------------------------------------------------------------------------------
# Apply / revert (spec §3.1) and hooks (spec §1.4)

def _call_hook(payload: Payload, kind: str) -> int | None:
    """Call a single-pointer hook with a NULL ``struct payload *``; None if absent/disabled."""
    pointers = payload.hooks.get(kind, [0])
    if not pointers[0]:
        return None
    if kind in ("postapply", "postrevert"):
        ctypes.CFUNCTYPE(None, ctypes.c_void_p)(pointers[0])(None)
        return 0
    return ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(pointers[0])(None)


def _call_array(payload: Payload, kind: str) -> None:
    """Run a load/unload hook array in order (NULL entries are called too, as in Xen)."""
    for hook in payload.hooks.get(kind, []):
        ctypes.CFUNCTYPE(None)(hook)()


def _check_expectations(payload: Payload) -> None:
    for entry in payload.funcs:
        _name, _new, old_addr, _ns, old_size, _v, expect = _func_fields(entry)
        if not expect[0] & 1:
            continue
        length, reserved = (expect[0] >> 1) & 0x1F, expect[0] >> 6
        if reserved:
            raise LoaderError(abi.EINVAL, "expectation rsv bits set")
        if old_size < length:
            raise LoaderError(abi.ERANGE, "expectation longer than the function")
        if ctypes.string_at(old_addr, length) != expect[1:1 + length]:
            raise LoaderError(abi.EINVAL, "expectation does not match the code")


def _patch_one(entry: int) -> PatchState:
    _name, new_addr, old_addr, new_size, _os, _v, _e = _func_fields(entry)
    offset = abi.ENDBR64_LEN if _has_endbr(old_addr) else 0
    where = old_addr + offset
    if new_addr:
        rel = new_addr - (where + abi.PATCH_INSN_SIZE)
        insn = b"\xe9" + rel.to_bytes(4, "little", signed=True)
    else:
        insn = NOP * (new_size - offset)
    state = PatchState(where, ctypes.string_at(where, len(insn)))
    mprotect(where, len(insn), PROT_R | PROT_W | PROT_X)
    ctypes.memmove(where, insn, len(insn))
    return state


def apply_payload(payload: Payload) -> None:
    """APPLY: expectations, pre-hook veto, default action or apply hook, post-hook."""
    _check_expectations(payload)
    rc = _call_hook(payload, "preapply")
    if rc:
        raise LoaderError(-rc if rc < 0 else rc, f"preapply hook returned {rc}")
    rc = _call_hook(payload, "apply")
    if rc is None:  # the default action (spec §3.3): load hooks, then patch every function
        _call_array(payload, "load")
        payload.patched = [_patch_one(entry) for entry in payload.funcs]
    elif rc:
        raise LoaderError(-rc if rc < 0 else rc, f"apply hook returned {rc}")
    _call_hook(payload, "postapply")


def revert_payload(payload: Payload) -> None:
    """REVERT: restore every saved instruction, newest first, with the revert hooks."""
    rc = _call_hook(payload, "prerevert")
    if rc:
        raise LoaderError(-rc if rc < 0 else rc, f"prerevert hook returned {rc}")
    rc = _call_hook(payload, "revert")
    if rc is None:  # the default action: restore every function, then the unload hooks
        for state in reversed(payload.patched):
            ctypes.memmove(state.where, state.saved, len(state.saved))
        payload.patched = []
        _call_array(payload, "unload")
    elif rc:
        raise LoaderError(-rc if rc < 0 else rc, f"revert hook returned {rc}")
    _call_hook(payload, "postrevert")


def unload_payload(payload: Payload) -> None:
    _libc.munmap(payload.base, _page_up(payload.size))


# ----------------------------------------------------------------------------------------------
# Calls into the image, and the JSON script

RET_TYPES = {"int": ctypes.c_int, "uint": ctypes.c_uint, "long": ctypes.c_long,
             "str": ctypes.c_void_p, "void": None}


def call_function(image: LoadedImage, name: str, args: list[int], ret: str = "int") -> Any:
    """Call an image function by its Xen name with integer arguments."""
    addr = image.lookup(name)
    if not addr:
        raise LoaderError(abi.ENOENT, f"no function {name} in the image")
    proto = ctypes.CFUNCTYPE(RET_TYPES[ret], *[ctypes.c_long] * len(args))
    result = proto(addr)(*args)
    if ret == "str":
        return None if result is None else ctypes.string_at(result).decode("latin-1")
    return result


def _run_op(op: dict[str, Any], image: LoadedImage, loaded: list[Payload]) -> Any:
    kind = op["op"]
    if kind == "calls":
        return [call_function(image, c["fn"], c.get("args", []), c.get("ret", "int"))
                for c in op["calls"]]
    if kind == "load":
        loaded.append(load_payload(Path(op["payload"]), image))
        return "ok"
    if kind == "apply":
        apply_payload(loaded[-1])
        # Where each jump/NOP went, relative to its function: 4 after an ENDBR64, else 0.
        return [[_func_fields(e)[2], s.where - _func_fields(e)[2]]
                for e, s in zip(loaded[-1].funcs, loaded[-1].patched, strict=False)]
    {"revert": revert_payload, "unload": unload_payload}[kind](loaded[-1])
    if kind == "unload":
        loaded.pop()
    return "ok"


def run_script(script: dict[str, Any]) -> dict[str, Any]:
    """Run ``{"image": path, "ops": [{"op": "calls"|"load"|"apply"|"revert"|"unload", ...}]}``.

    Returns ``{"results": [...], "error": None | {"errno": n, "name": "ENOENT", "message": ...,
    "op": index}}``; the script stops at the first refusal.
    """
    image = LoadedImage.load(Path(script["image"]))
    results: list[Any] = []
    loaded: list[Payload] = []
    for index, op in enumerate(script["ops"]):
        try:
            results.append(_run_op(op, image, loaded))
        except LoaderError as exc:
            return {"results": results, "error": {
                "errno": exc.errno_value, "name": abi.errno_name(exc.errno_value),
                "message": str(exc), "op": index}}
    return {"results": results, "error": None}


def main() -> None:
    faulthandler.enable()  # a crash in patched code shows where, on stderr
    output = run_script(json.load(sys.stdin))
    sys.stdout.write(json.dumps(output) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
