"""Merge diff objects into one payload model and resolve it against the hypervisor.

Steps of :func:`link`:

1. merge the objects: array-like sections (``.livepatch.funcs``, special sections, string pools,
   hook arrays) are concatenated, since Xen reads only the first section of each name; code and
   data sections stay as they are;
2. bind undefined symbols to definitions in other objects (a new global function in one object
   called from another), then check every remaining one exists in ``xen-syms``, by the exact name
   Xen's loader will look up; with ``prelink`` they become absolute;
3. fill each ``.livepatch.funcs`` entry's ``old_addr`` and ``old_size`` from ``xen-syms`` and
   check the old function is big enough for the 5-byte jump (9 after ENDBR64);
4. rename payload-local symbols whose names Xen already has (a copied ``__func__.0``, a cold part),
   since Xen refuses a payload whose new symbols clash with its own (-EEXIST);
5. hand the model to :mod:`xsbuild.payload_format` for notes, build-id and bytes, and check the
   bytes as the hypervisor will before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xsbuild import xen_abi
from xsbuild.elf import (
    SHN_ABS,
    STB_LOCAL,
    STT_FILE,
    STT_FUNC,
    Elf,
    Reloc,
    Section,
    Symbol,
    read_elf,
    write_atomic,
)
from xsbuild.errors import PayloadRejected, RelocationError, UsageError
from xsbuild.xensyms import XenSymbols

# Sections concatenated across objects (Xen finds a section by its first name only).
_MERGED_PREFIXES = (".rodata.str", ".rodata.cst")
_MERGED_NAMES = frozenset({
    xen_abi.SEC_FUNCS, xen_abi.SEC_STRINGS, xen_abi.SEC_ALTINSTRUCTIONS,
    xen_abi.SEC_ALTINSTR_REPLACEMENT, xen_abi.SEC_EX_TABLE, xen_abi.SEC_FIXUP,
    *xen_abi.BUG_FRAME_SECTIONS, *xen_abi.HOOK_SECTIONS,
})
_SINGLE_HOOKS = frozenset(xen_abi.HOOK_PREFIX + k for k in xen_abi.HOOK_SINGLE_KINDS)


@dataclass(slots=True)
class PatchedFunc:
    name: str
    old_addr: int
    old_size: int
    new_size: int


@dataclass(slots=True)
class LinkResult:
    path: str
    name: str
    build_id: bytes
    depends: bytes
    xen_depends: bytes
    funcs: list[PatchedFunc] = field(default_factory=list)
    size: int = 0
    objects: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "schema": "xsbuild.link/1", "payload": self.path, "name": self.name,
            "build_id": self.build_id.hex(), "depends": self.depends.hex(),
            "xen_depends": self.xen_depends.hex(), "size": self.size, "objects": self.objects,
            "functions": [{"name": f.name, "old_addr": f"{f.old_addr:#x}",
                           "old_size": f.old_size, "new_size": f.new_size} for f in self.funcs],
        }


def link_files(objects: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
               xen_syms: str | os.PathLike[str] | XenSymbols, name: str | None = None,
               depends: bytes | None = None, xen_depends: bytes | None = None,
               prelink: bool = False) -> LinkResult:
    """Link diff objects into the payload file ``out`` (written only if Xen would accept it)."""
    from xsbuild import check, payload_format

    if not objects:
        raise UsageError("no objects to link")
    xs = xen_syms if isinstance(xen_syms, XenSymbols) else XenSymbols.load(xen_syms)
    payload_name = name or Path(out).name.removesuffix(".livepatch")
    elfs = [read_elf(p) for p in objects]
    model, funcs = link(elfs, xs, prelink=prelink, payload_name=payload_name)
    xen_dep = xen_depends if xen_depends is not None else xs.build_id
    dep = depends if depends is not None else xs.build_id
    data, build_id = payload_format.payload_bytes(model, depends=dep, xen_depends=xen_dep,
                                          name=payload_name)
    report = check.check_payload(data, xs)
    if not report.ok:
        raise PayloadRejected("the payload would be rejected by the hypervisor: "
                              + "; ".join(str(p) for p in report.problems))
    write_atomic(out, data, 0o644)
    return LinkResult(path=str(out), name=payload_name, build_id=build_id, depends=dep,
                      xen_depends=xen_dep, funcs=funcs, size=len(data),
                      objects=[str(p) for p in objects])


def link(elfs: Sequence[Elf], xs: XenSymbols, *, prelink: bool = False,
         payload_name: str = "") -> tuple[Elf, list[PatchedFunc]]:
    model = merge(elfs)
    bind_undefined(model, xs, prelink)
    funcs = fill_funcs(model, xs)
    rename_clashes(model, xs, payload_name)
    return model, funcs


# --------------------------------------------------------------------------------------------
# Step 1: merge


def _is_merged(name: str) -> bool:
    return name in _MERGED_NAMES or name.startswith(_MERGED_PREFIXES)


def merge(elfs: Sequence[Elf]) -> Elf:
    out = Elf(path="payload")
    merged: dict[str, Section] = {}
    for elf in elfs:
        placed: dict[int, tuple[Section, int]] = {}  # input section id -> (out section, base)
        for sec in elf.sections:
            if sec.type in (2, 3, 4, 9):  # tables are regenerated
                continue
            if _is_merged(sec.name):
                if sec.name in _SINGLE_HOOKS and sec.name in merged and merged[sec.name].size:
                    raise UsageError(f"{elf.path}: a second {sec.name} hook; Xen takes exactly "
                                     "one pointer per payload")
                target = merged.get(sec.name)
                if target is None:
                    target = Section(name=sec.name, type=sec.type, flags=sec.flags,
                                     addralign=sec.addralign, entsize=sec.entsize)
                    target.sym = Symbol(name="", type=3, sec=target)
                    merged[sec.name] = target
                    out.sections.append(target)
                    out.symbols.append(target.sym)
                base = _append(target, sec)
                placed[id(sec)] = (target, base)
            else:
                copy = Section(name=sec.name, type=sec.type, flags=sec.flags,
                               addralign=sec.addralign, entsize=sec.entsize, data=sec.data,
                               size=sec.size)
                out.sections.append(copy)
                placed[id(sec)] = (copy, 0)
        _carry_symbols(elf, out, placed)
    out.invalidate()
    return out


def _append(target: Section, sec: Section) -> int:
    align = max(sec.addralign, 1)
    pad = -target.size % align
    base = target.size + pad
    if not target.is_nobits:
        target.data = bytes(target.data) + b"\0" * pad + bytes(sec.data)
    target.size = base + sec.size
    target.addralign = max(target.addralign, align)
    return base


def _carry_symbols(elf: Elf, out: Elf, placed: dict[int, tuple[Section, int]]) -> None:
    new_sym: dict[int, Symbol] = {}
    for sym in elf.symbols:
        if sym.sec is not None and id(sym.sec) in placed:
            sec, base = placed[id(sym.sec)]
            if sym.is_section:
                if sec.sym is None:
                    sec.sym = Symbol(name="", type=3, sec=sec)
                    out.symbols.append(sec.sym)
                new_sym[id(sym)] = sec.sym
                continue
            copy = Symbol(name=sym.name, type=sym.type, bind=sym.bind, other=sym.other, sec=sec,
                          value=sym.value + base, size=sym.size)
        else:
            copy = Symbol(name=sym.name, type=sym.type, bind=sym.bind, other=sym.other,
                          value=sym.value, size=sym.size, shndx=sym.shndx)
        if copy.type == STT_FILE and any(s.is_file and s.name == copy.name for s in out.symbols):
            new_sym[id(sym)] = copy
            continue
        new_sym[id(sym)] = copy
        out.symbols.append(copy)
    for sec in elf.sections:
        if id(sec) not in placed or not sec.relocs:
            continue
        target, base = placed[id(sec)]
        for r in sec.relocs:
            addend = r.addend
            if r.sym.is_section and r.sym.sec is not None and id(r.sym.sec) in placed:
                addend += placed[id(r.sym.sec)][1]
            target.relocs.append(Reloc(r.offset + base, r.type, new_sym[id(r.sym)], addend))


# --------------------------------------------------------------------------------------------
# Step 2: undefined symbols


def bind_undefined(model: Elf, xs: XenSymbols, prelink: bool) -> None:
    """Bind every undefined symbol: to the global another object defines, else to the
    hypervisor's table (made absolute when prelinking); then keep one undefined symbol per
    name."""
    defined = global_definitions(model)
    undefined = [s for s in model.symbols if s.is_undefined and s.name]
    to_definition = {s: defined[s.name] for s in undefined if s.name in defined}
    resolve_in_xen([s for s in undefined if s not in to_definition], xs, prelink)
    _redirect(model, to_definition)
    _redirect(model, _duplicate_undefined(model))


def global_definitions(model: Elf) -> dict[str, Symbol]:
    """Name -> the global symbol an object defines; two definitions of one name are refused."""
    defined: dict[str, Symbol] = {}
    for s in model.symbols:
        if s.sec is not None and not s.is_section and s.name and s.bind != STB_LOCAL:
            if s.name in defined:
                raise RelocationError(f"two objects define the global symbol {s.name}")
            defined[s.name] = s
    return defined


def resolve_in_xen(undefined: list[Symbol], xs: XenSymbols, prelink: bool) -> None:
    """Every name must be in the hypervisor's table (all missing names in one error); with
    ``prelink`` each symbol becomes absolute at the hypervisor's address."""
    missing = []
    for s in undefined:
        xsym = xs.lookup(s.name)
        if xsym is None:
            missing.append(s.name)
        elif prelink:
            s.shndx, s.value = SHN_ABS, xsym.addr
    if missing:
        hint = ("; a static must be named path#name as in the hypervisor's table"
                if any("#" in m for m in missing) else "")
        raise RelocationError(
            f"undefined symbol(s) not in {xs.path}: {', '.join(sorted(set(missing)))} "
            f"(was the payload built from the same source and compiler as this hypervisor?{hint})")


def _duplicate_undefined(model: Elf) -> dict[Symbol, Symbol]:
    """Each undefined symbol whose name an earlier one has -> that earlier one."""
    seen: dict[str, Symbol] = {}
    dup: dict[Symbol, Symbol] = {}
    for s in model.symbols:
        if s.is_undefined and s.name:
            if s.name in seen:
                dup[s] = seen[s.name]
            else:
                seen[s.name] = s
    return dup


def _redirect(model: Elf, mapping: dict[Symbol, Symbol]) -> None:
    """Point every relocation at ``mapping[its symbol]`` and drop the mapped symbols."""
    if not mapping:
        return
    for sec in model.sections:
        for r in sec.relocs:
            r.sym = mapping.get(r.sym, r.sym)
    model.symbols = [s for s in model.symbols if s not in mapping]


# --------------------------------------------------------------------------------------------
# Step 3: the funcs table


def fill_funcs(model: Elf, xs: XenSymbols) -> list[PatchedFunc]:
    funcs = model.section(xen_abi.SEC_FUNCS)
    if funcs is None:
        return []
    if funcs.size % xen_abi.FUNC_SIZE:
        raise RelocationError(f"{xen_abi.SEC_FUNCS}: size {funcs.size} is not a multiple of "
                              f"{xen_abi.FUNC_SIZE}")
    data = bytearray(funcs.data)
    out, problems, seen = [], [], set()
    for off in range(0, funcs.size, xen_abi.FUNC_SIZE):
        name = _entry_name(model, funcs, off)
        entry = list(xen_abi.FUNC_STRUCT.unpack_from(data, off))
        xsym = xs.lookup(name)
        if xsym is None:
            problems.append(f"patched function {name} is not in {xs.path}")
            continue
        if name in seen:
            problems.append(f"function {name} is patched twice in one payload")
        seen.add(name)
        head = xs.read(xsym.addr, xen_abi.ENDBR64_LEN)
        need = xen_abi.PATCH_INSN_SIZE + (xen_abi.ENDBR64_LEN if head in (
            xen_abi.ENDBR64, xen_abi.ENDBR64_POISON) else 0)
        if xsym.size < need:
            problems.append(f"{name} is too small to patch: {xsym.size} bytes in the hypervisor, "
                            f"the jump needs {need}")
        entry[2], entry[4] = xsym.addr, xsym.size
        xen_abi.FUNC_STRUCT.pack_into(data, off, *entry)
        out.append(PatchedFunc(name, xsym.addr, xsym.size, entry[3]))
    if problems:
        raise RelocationError("; ".join(problems))
    funcs.data = bytes(data)
    return out


def _entry_name(model: Elf, funcs: Section, off: int) -> str:
    for r in funcs.relocs:
        if r.offset == off + xen_abi.FUNC_OFF_NAME and r.sym.sec is not None:
            body = r.sym.sec.data
            start = r.sym.value + r.addend
            return bytes(body[start:body.index(b"\0", start)]).decode()
    raise RelocationError(f"{xen_abi.SEC_FUNCS} entry at {off:#x} has no name")


# --------------------------------------------------------------------------------------------
# Step 4: names


def copy_suffix(payload_name: str) -> str:
    """The suffix of a payload-local copy's name: ``.lp.`` and 8 hex digits of the payload's
    name.  Xen checks every named symbol of a payload against its own table *and* the other
    loaded payloads' new symbols (spec §1.7), and payloads have unique names: two payloads
    that each copy ``common/version.c#build_info`` (stacked fixes to one object) get two
    names."""
    return ".lp." + hashlib.sha1(payload_name.encode()).hexdigest()[:8]


def rename_clashes(model: Elf, xs: XenSymbols, payload_name: str = "") -> None:
    """Give payload-local copies names Xen does not have (Xen checks every named symbol of an
    SHF_ALLOC section against its table, except those at a funcs ``new_addr``), and that no
    other payload has (:func:`copy_suffix`)."""
    overriding = _overriding(model)
    taken = {s.name for s in model.symbols if s.name}
    suffix = copy_suffix(payload_name)
    for s in model.symbols:
        if s.sec is None or s.is_section or not s.name or id(s) in overriding:
            continue
        if s.name in xs:
            n = 1
            candidate = s.name + suffix
            while candidate in xs or candidate in taken:
                n += 1
                candidate = f"{s.name}{suffix}.{n}"
            taken.add(candidate)
            s.name = candidate


def _overriding(model: Elf) -> set[int]:
    funcs = model.section(xen_abi.SEC_FUNCS)
    if funcs is None:
        return set()
    return {id(r.sym) for r in funcs.relocs
            if r.offset % xen_abi.FUNC_SIZE == xen_abi.FUNC_OFF_NEW_ADDR and r.sym.type == STT_FUNC}
