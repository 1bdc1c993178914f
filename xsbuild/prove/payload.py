"""The payload side: a payload's functions in normal form; targets are relocation targets
(symbol + addend, section symbols mapped to the symbol covering the offset, literals by their
bytes)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from xsbuild import xen_abi
from xsbuild.elf import STT_FUNC, STT_OBJECT, STT_SECTION, Elf, Reloc, Section, Symbol, read_elf
from xsbuild.prove.normal import (
    MAX_FRAGMENT,
    MAX_STRING,
    PC_RELATIVE,
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
from xsbuild.xensyms import parse_build_id_note

_LP_SUFFIX = re.compile(r"\.lp\.[0-9a-f]{8}(\.\d+)?$")  # xsbuild.linker.copy_suffix


# ------------------------------------------------------------------------------------------
# Payload side


# Sections of the payload's own making (metadata, special sections): never carried tables.
_PAYLOAD_OWN_SECTIONS = (".livepatch", ".note", ".modinfo", ".altinstr", ".ex_table",
                         ".bug_frames")


def xen_name(sym: Symbol) -> str:
    """The name a payload symbol has in the patched hypervisor's table: statics as
    ``file#name``; a payload-local copy the linker renamed so as not to clash with the
    hypervisor's (``foo.cold.lp.1a2b3c4d``) by the name it copies."""
    if sym.sec is None:
        return sym.name
    name = _LP_SUFFIX.sub("", sym.name)
    if "#" in name or not sym.is_local or not sym.file:
        return name
    return f"{sym.file}#{name}"


def _owner(sec: Section, offset: int, *, ending: bool = True) -> Symbol | None:
    """The function/object symbol of ``sec`` covering ``offset`` (or, ``ending``, ending
    there: the end of an array is named after it)."""
    best = None
    for s in sec.symbols:
        if s.type not in (STT_FUNC, STT_OBJECT) or not s.name:
            continue
        if s.value <= offset < s.value + max(s.size, 1):
            return s
        if ending and s.size and s.value + s.size == offset:
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
    # read-only data objects the payload defines (changed const tables it carries), by Xen name
    tables: dict[str, Symbol] = field(default_factory=dict)
    # entries whose site no function covers (unnamed code after a function in its section):
    # id(code section) -> (site, entry section, offset, type)
    loose: dict[int, list[tuple[int, Section, int, int]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> PayloadImage:
        elf = read_elf(path)
        functions = {xen_name(s): s for s in elf.symbols
                     if s.type == STT_FUNC and s.sec is not None and s.sec.is_text}
        replaced = _replaced(elf)
        dep = elf.section(xen_abi.SEC_XEN_DEPENDS)
        tables = {xen_name(s): s for s in elf.symbols
                  if s.type == STT_OBJECT and s.size and s.sec is not None and s.sec.is_alloc
                  and not s.sec.is_text and not s.sec.is_writable
                  and not s.sec.name.startswith(_PAYLOAD_OWN_SECTIONS)}
        payload = cls(str(path), elf, replaced, functions, {},
                      parse_build_id_note(dep.data) if dep is not None else b"", tables)
        payload._index_entries()
        return payload

    def _index_entries(self) -> None:
        specs = [(xen_abi.SEC_ALTINSTRUCTIONS, -1), (xen_abi.SEC_EX_TABLE, -2),
                 (xen_abi.SEC_ALT_CALL_SITES, -3)]
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
                owner = _owner(reloc.sym.sec, site, ending=False)
                if owner is not None:
                    self.entries.setdefault(id(owner), []).append((sec, off, typ))
                else:
                    self.loose.setdefault(id(reloc.sym.sec), []).append((site, sec, off, typ))
        for sites in self.loose.values():
            sites.sort(key=lambda e: e[0])


def _reloc_at(sec: Section, offset: int) -> Reloc | None:
    return next((r for r in sec.relocs if r.offset == offset), None)


def _bug_target(addend: int, field_offset: int) -> int:
    """Target offset of a bug-frame field relocation (its addend keeps line bits too)."""
    return bug_disp(addend & 0xFFFFFFFF) - field_offset


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
    frags = Fragments()
    size = sym.size or (sym.sec.size - sym.value)
    insns = _payload_insns(sym.sec, sym.value, size, frags, sym.value)
    entries = [_payload_entry(sec, off, typ, sym.value, frags)
               for sec, off, typ in payload.entries.get(id(sym), [])]
    return Unit(name, insns, _payload_fragments(payload, frags, entries), entries)


def _payload_insns(sec: Section, start: int, size: int, frags: Fragments, origin: int,
                   *, fragment: bool = False) -> list[NInsn]:
    code = bytes(sec.data[start:start + size])
    relocs = {r.offset: r for r in sec.relocs if start <= r.offset < start + size}
    out: list[NInsn] = []
    for insn, found in decode(code, start):
        addr, length = insn.address, insn.size  # type: ignore[attr-defined]
        spans, refs = [], []
        # A 64-bit immediate is an address only when relocated.
        by_at = {f.at: f for f in found if not f.maybe_constant or addr + f.at in relocs}
        inside = sorted(off - addr for off in relocs if addr <= off < addr + length)
        for at in sorted(set(by_at) | set(inside)):
            f = by_at.get(at)
            reloc = relocs.get(addr + at)
            width = f.size if f is not None else (
                8 if reloc and reloc.type == xen_abi.R_X86_64_64 else 4)
            spans.append((at, width))
            operand = f.operand_size if f is not None else 0
            if reloc is not None:
                pc = addr + length - reloc.offset if reloc.type in PC_RELATIVE else 0
                refs.append(_reloc_ref(reloc, pc, operand, frags))
            else:  # a branch or RIP-relative access inside this section, resolved by ld -r
                assert f is not None
                refs.append(_local_ref(sec, f.target, operand, frags))
        raw = bytes(insn.bytes)  # type: ignore[attr-defined]
        out.append(NInsn(addr - origin, insn_text(insn, refs), mask(raw, spans), tuple(refs)))
        if fragment and (is_terminator(insn) or len(out) >= MAX_FRAGMENT):
            break
    return out


def _reloc_ref(reloc: Reloc, pc_adjust: int, operand_size: int, frags: Fragments) -> Ref:
    """What a relocated field designates: ``S + A`` plus, inside an instruction, the distance
    from the field to the instruction's end the CPU adds."""
    sym, sec = reloc.sym, reloc.sym.sec
    target = reloc.addend + pc_adjust
    if sec is None:  # undefined: a hypervisor (or earlier payload) symbol, by name
        return (with_offset(sym.name, target),)
    where = sym.value + target
    return _section_ref(sec, where, operand_size, frags,
                        None if sym.type == STT_SECTION or sym.name.startswith(".L") else sym)


def _section_ref(sec: Section, where: int, operand_size: int, frags: Fragments,
                 named: Symbol | None = None) -> Ref:
    if sec.is_string or sec.is_merge_const:
        return data_ref(bytes(sec.data[where:where + MAX_STRING]), operand_size)
    # Code right after a function in its section is not the function's end but unnamed code
    # (an unlikely path ``.subsection 1`` puts there, e.g. the ``ud2`` of Xen's vmread
    # helpers): the linked side, where the function's symbol stops there too, sees it so.
    owner = named if named is not None and named.type != STT_SECTION else _owner(
        sec, where, ending=not sec.is_text or where >= sec.size)
    if owner is not None:
        name = with_offset(xen_name(owner), where - owner.value)
        if owner.type == STT_OBJECT and owner.size and not sec.is_writable and not sec.is_text:
            body = bytes(sec.data[owner.value:owner.value + owner.size])
            return (name, with_offset(content_ref(body), where - owner.value))
        return (name,)
    if sec.is_text:
        frags.sections[id(sec)] = sec
        return frags.ref(("p", id(sec), where))
    return data_ref(bytes(sec.data[where:where + MAX_STRING]), operand_size)


def _local_ref(sec: Section, target: int, operand_size: int, frags: Fragments) -> Ref:
    return _section_ref(sec, target, operand_size, frags)


def table_fields(sym: Symbol) -> list[tuple[int, int, int, Ref]]:
    """The relocated fields of a payload data object: (offset in it, width, relocation type,
    what it points at: ``S + A``, also for a PC-relative field)."""
    assert sym.sec is not None
    frags = Fragments()
    out = []
    for r in sorted(sym.sec.relocs, key=lambda r: r.offset):
        if sym.value <= r.offset < sym.value + sym.size:
            out.append((r.offset - sym.value, xen_abi.reloc_width(r.type), r.type,
                        _reloc_ref(r, 0, 0, frags)))
    return out


def _payload_fragments(payload: PayloadImage, frags: Fragments,
                       entries: list[Entry]) -> list[list[NInsn]]:
    """The unnamed code reached, fragment by fragment, adding to ``entries`` those whose site
    is in it (the bug frames of an unlikely path's ``ud2``)."""
    out: list[list[NInsn]] = []
    while frags.todo:
        k, key = frags.todo.pop(0)
        _tag, sec_id, where = key  # type: ignore[misc]
        sec = frags.sections[sec_id]
        end = frags.end_of(sec_id, where, len(sec.data))
        insns = _payload_insns(sec, where, end - where, frags, where, fragment=True)
        out.append(insns)
        stop = where + decoded_end(insns)
        for site, esec, off, typ in payload.loose.get(sec_id, []):
            if where <= site < stop:
                entries.append(_payload_entry(esec, off, typ, where, frags, f"code#{k}"))
    return out


def _payload_entry(sec: Section, off: int, typ: int, origin: int, frags: Fragments,
                   where: str = "") -> Entry:
    """The entry at ``off`` of ``sec``, its site relative to ``origin`` (the function's
    offset, or the start of the fragment ``where`` names)."""
    if typ == -1:  # .altinstructions
        alt = xen_abi.ALT_INSTR.unpack(sec.data, off)
        orig = _reloc_at(sec, off + xen_abi.ALT_OFF_ORIG)
        repl = _reloc_at(sec, off + xen_abi.ALT_OFF_REPL)
        site = orig.sym.value + orig.addend - origin if orig else -1
        code: list[NInsn] = []
        if repl is not None and repl.sym.sec is not None:
            start = repl.sym.value + repl.addend
            frags.bound(id(repl.sym.sec), start, start + alt.repl_len)
            code = _payload_insns(repl.sym.sec, start, alt.repl_len, frags, start)
        return Entry(DiffKind.ALTERNATIVE, site, alt_fields(alt), code=tuple(code), where=where)
    if typ == -2:  # .ex_table
        site_r = _reloc_at(sec, off + xen_abi.EX_TABLE_OFF_ADDR)
        cont_r = _reloc_at(sec, off + xen_abi.EX_TABLE_OFF_CONT)
        site = site_r.sym.value + site_r.addend - origin if site_r else -1
        refs = (_reloc_ref(cont_r, 0, 0, frags),) if cont_r else (("?",),)
        return Entry(DiffKind.EX_TABLE, site, (), refs, where=where)
    if typ == -3:  # .alt_call_sites
        site_r = _reloc_at(sec, off)
        return Entry(DiffKind.ALT_CALL, site_r.sym.value + site_r.addend - origin
                     if site_r else -1, (), where=where)
    loc_r = _reloc_at(sec, off + xen_abi.BUG_FRAME_OFF_LOC)
    ptr_r = _reloc_at(sec, off + xen_abi.BUG_FRAME_OFF_PTR)
    site = loc_r.sym.value + _bug_target(loc_r.addend, 0) - origin if loc_r else -1
    refs_l: list[Ref] = [_bug_ref(ptr_r, xen_abi.BUG_FRAME_OFF_PTR, frags)]
    if xen_abi.BUG_FRAME_SECTIONS[typ] == xen_abi.BUG_FRAME_ASSERT:  # the message follows
        msg = xen_abi.BUG_FRAME_OFF_MSG
        refs_l.append(_bug_ref(_reloc_at(sec, off + msg), msg, frags))
    line = ((bug_line_bits(loc_r.addend & 0xFFFFFFFF) if loc_r else 0) << 8) | (
        bug_line_bits(ptr_r.addend & 0xFFFFFFFF) if ptr_r else 0)
    return Entry(DiffKind.BUG_FRAME, site, (f"type={typ}",), tuple(refs_l), line=line,
                 where=where)


def _bug_ref(reloc: Reloc | None, field_offset: int, frags: Fragments) -> Ref:
    if reloc is None:
        return ("?",)
    if reloc.sym.sec is None:
        return (with_offset(reloc.sym.name, _bug_target(reloc.addend, field_offset)),)
    where = reloc.sym.value + _bug_target(reloc.addend, field_offset)
    return _section_ref(reloc.sym.sec, where, 0, frags)


