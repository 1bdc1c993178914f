"""What a payload changes, as data: the model behind ``xsbuild inspect``.

:func:`inspect_payload` reads a payload with the project's own readers (:func:`xsbuild.elf.read_elf`
for the object model, :func:`xsbuild.check.check_payload` for what the loader sees and would
refuse) and returns an :class:`InspectReport`: the ``.livepatch.funcs`` table, the functions and
data the payload brings (each function disassembled, relocation targets named), hooks,
dependencies and whom they belong to, relocations grouped by target, and every special-section
entry with the function it belongs to.  Given the hypervisor's ``xen-syms``, each replaced
function's old code is disassembled too, and addresses the payload leaves to the loader are
resolved as the loader will.

Nothing here prints; :mod:`xsbuild.report` renders the report as text, JSON or HTML, and
:meth:`InspectReport.to_json` is the ``xsbuild.inspect/1`` document
(``docs/json-schema/xsbuild.inspect-1.schema.json``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xsbuild import xen_abi
from xsbuild.check import PayloadInfo, check_payload
from xsbuild.disasm import (
    Instruction,
    disassemble_linked,
    disassemble_relocatable,
    function_extent,
    plain_name,
    quote,
    reloc_label,
    string_of,
    with_offset,
)
from xsbuild.elf import STT_FUNC, STT_OBJECT, Elf, Reloc, Section, Symbol, read_elf
from xsbuild.errors import UsageError
from xsbuild.relocs import (
    PC_RELATIVE,
    InstructionEnds,
    bug_frame_real_offset,
    field_width,
    symbol_at,
    target_of,
)
from xsbuild.xensyms import XenSymbols

SCHEMA = "xsbuild.inspect/1"

# Sections that describe the payload rather than hold its code or data.
_METADATA_PREFIXES = (".livepatch.", ".note", xen_abi.SEC_MODINFO, xen_abi.SEC_ALTINSTRUCTIONS,
                      xen_abi.SEC_EX_TABLE, ".bug_frames.")
BUG_FRAME_KINDS = ("run_fn", "warn", "bug", "assert")  # .bug_frames.0 .. .3 (spec §1.4)
# Xen's asm/bug.h: a frame's displacement fields keep the line in the bits above
# BUG_DISP_WIDTH; the low part of the line (this many bits) is in the second field.
_BUG_LINE_LO_WIDTH = 31 - xen_abi.BUG_DISP_WIDTH


# --------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True, slots=True)
class FuncEntry:
    """One ``struct livepatch_func``: what is patched, where, by what."""

    index: int
    name: str  # the old function, in the hypervisor's naming ("" when NULL)
    old_addr: int  # 0 when not known offline
    old_addr_source: str  # "payload", "xen-syms" (resolved here) or "load" (left to the loader)
    old_size: int
    new_symbol: str  # "" for a NOP entry
    new_section: str
    new_offset: int
    new_size: int
    source_file: str  # "" when the payload does not say
    version: int
    is_nop: bool  # new_addr 0 and not relocated: NOP out new_size bytes at old_addr

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "name": self.name, "old_addr": _hex(self.old_addr),
                "old_addr_source": self.old_addr_source, "old_size": self.old_size,
                "new_symbol": self.new_symbol or None,
                "new_section": self.new_section or None, "new_offset": self.new_offset,
                "new_size": self.new_size, "nop": self.is_nop,
                "source_file": self.source_file or None, "version": self.version}


@dataclass(slots=True)
class PayloadFunction:
    """A function the payload brings: a replacement, a hook, or a new function."""

    name: str
    section: str
    offset: int
    size: int
    binding: str  # "local", "global", "weak"
    role: str  # "replacement", "hook" or "new"
    replaces: str = ""  # the funcs entry's name, for a replacement
    old_addr: int = 0
    code: list[Instruction] = field(default_factory=list)
    old_code: list[Instruction] | None = None  # the replaced code, from xen-syms
    old_code_note: str = ""  # why old_code is missing

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "section": self.section, "offset": self.offset,
                "size": self.size, "binding": self.binding, "role": self.role,
                "replaces": self.replaces or None,
                "old_addr": _hex(self.old_addr) if self.replaces else None,
                "code": [i.to_json() for i in self.code],
                "old_code": (None if self.old_code is None
                             else [i.to_json() for i in self.old_code]),
                "old_code_note": self.old_code_note or None}


@dataclass(frozen=True, slots=True)
class PayloadData:
    name: str
    section: str
    offset: int
    size: int
    kind: str  # "read-only", "writable", "zero-initialised"
    binding: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "section": self.section, "offset": self.offset,
                "size": self.size, "kind": self.kind, "binding": self.binding}


@dataclass(frozen=True, slots=True)
class Hook:
    kind: str  # "load", "preapply", ...
    index: int
    function: str  # "" for a NULL pointer (a disabled single hook)

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "index": self.index, "function": self.function or None}


@dataclass(frozen=True, slots=True)
class Dependency:
    """One of the three build-id notes and what it names."""

    section: str
    build_id: bytes
    belongs_to: str  # in words: "this hypervisor (xen-syms)", "payload base (base.livepatch)"
    kind: str  # "hypervisor", "payload", "self", "unknown"

    def to_json(self) -> dict[str, object]:
        return {"section": self.section, "build_id": self.build_id.hex() or None,
                "kind": self.kind, "belongs_to": self.belongs_to}


@dataclass(slots=True)
class RelocGroup:
    """Every relocation that designates one target, and where each one is."""

    target: str
    kind: str  # "hypervisor", "payload", "string", "constant", "section"
    types: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.sites)

    def to_json(self) -> dict[str, object]:
        return {"target": self.target, "kind": self.kind, "count": self.count,
                "types": self.types, "sites": self.sites}


@dataclass(frozen=True, slots=True)
class SpecialEntry:
    """One entry of a special section, decoded, with the function it belongs to."""

    section: str
    index: int
    offset: int
    owner: str  # the payload function the entry belongs to ("" if none)
    summary: str
    fields: dict[str, str | int]

    def to_json(self) -> dict[str, object]:
        return {"section": self.section, "index": self.index, "offset": self.offset,
                "owner": self.owner or None, "summary": self.summary, "fields": self.fields}


@dataclass(slots=True)
class InspectReport:
    payload: str
    size: int
    name: str
    xen_syms: str | None
    loader_ok: bool
    problems: list[str]
    safe_to_reapply: bool
    modinfo: list[tuple[str, str]]
    funcs: list[FuncEntry]
    functions: list[PayloadFunction]
    data: list[PayloadData]
    hooks: list[Hook]
    dependencies: list[Dependency]
    relocations: list[RelocGroup]
    special: list[SpecialEntry]
    notes: list[str] = field(default_factory=list)
    # ``inspect --proof FILE`` (HTML): each function's entry of an xsbuild.prove/1 report, by
    # Xen name and by plain name, and the proof's verdict.
    proof: dict[str, dict[str, object]] = field(default_factory=dict)
    proof_verdict: str = ""

    def function(self, name: str) -> PayloadFunction | None:
        return next((f for f in self.functions if f.name == name), None)

    def to_json(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "payload": self.payload,
            "size": self.size,
            "name": self.name,
            "xen_syms": self.xen_syms,
            "loader": {"ok": self.loader_ok, "problems": self.problems,
                       "safe_to_reapply": self.safe_to_reapply},
            "modinfo": [{"key": k, "value": v} for k, v in self.modinfo],
            "funcs": [f.to_json() for f in self.funcs],
            "functions": [f.to_json() for f in self.functions],
            "data": [d.to_json() for d in self.data],
            "hooks": [h.to_json() for h in self.hooks],
            "dependencies": [d.to_json() for d in self.dependencies],
            "relocations": [g.to_json() for g in self.relocations],
            "special": [e.to_json() for e in self.special],
            "notes": self.notes,
        }


def _hex(value: int) -> str | None:
    # Addresses are strings: Xen's (0xffff82d0...) do not fit a JSON consumer's double.
    return f"{value:#x}" if value else None


# --------------------------------------------------------------------------------------------
# Driver


@dataclass(frozen=True, slots=True)
class OtherPayload:
    """A payload given with ``--payload``: by its build-id, a ``depends`` note can name it."""

    path: str
    name: str
    info: PayloadInfo


def load_other_payload(path: str | os.PathLike[str]) -> OtherPayload:
    data = _read(path)
    read_elf(path, data)  # a one-line ElfParseError for anything that is not an object
    report = check_payload(data)
    if report.info is None or not report.info.build_id:
        raise UsageError(f"{path}: not a live-patch payload (no {xen_abi.SEC_BUILD_ID})")
    return OtherPayload(str(path), _payload_name(report.info, Path(path)), report.info)


def inspect_payload(path: str | os.PathLike[str], xen_syms: XenSymbols | None = None,
                    others: Sequence[OtherPayload] = ()) -> InspectReport:
    """Everything a reviewer needs to know about the payload at ``path``.

    Raises :class:`xsbuild.errors.ElfParseError` for a file that is not a relocatable x86-64
    ELF, :class:`UsageError` for an object that is not a payload.  Problems the loader would
    find are part of the report, not errors.
    """
    data = _read(path)
    elf = read_elf(path, data)
    if not any(_is_patching(s) for s in elf.sections):
        raise UsageError(f"{path}: not a live-patch payload: no {xen_abi.SEC_FUNCS} and no "
                         f"{xen_abi.HOOK_PREFIX}* section (to review two objects, use "
                         "`xsbuild explain`)")
    check = check_payload(data, xen_syms, [o.info for o in others])
    info = check.info or PayloadInfo()
    builder = _Builder(elf, xen_syms)
    funcs = builder.funcs()
    hooks = builder.hooks()
    return InspectReport(
        payload=str(path), size=len(data), name=_payload_name(info, Path(path)),
        xen_syms=xen_syms.path if xen_syms else None, loader_ok=check.ok,
        problems=[str(p) for p in check.problems], safe_to_reapply=info.safe_to_reapply,
        modinfo=_modinfo(info.modinfo), funcs=funcs,
        functions=builder.functions(funcs, hooks), data=builder.data(), hooks=hooks,
        dependencies=dependencies(info, xen_syms, others), relocations=builder.relocations(),
        special=builder.special(), notes=builder.notes)


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _is_patching(sec: Section) -> bool:
    return sec.name == xen_abi.SEC_FUNCS or sec.name.startswith(xen_abi.HOOK_PREFIX)


def _payload_name(info: PayloadInfo, path: Path) -> str:
    for key, value in _modinfo(info.modinfo):
        if key == "name" and value:
            return value
    return path.name.removesuffix(".livepatch")


def _modinfo(raw: bytes) -> list[tuple[str, str]]:
    out = []
    for item in raw.split(b"\0"):
        if item:
            key, _eq, value = item.decode("utf-8", "replace").partition("=")
            out.append((key, value))
    return out


def dependencies(info: PayloadInfo, xs: XenSymbols | None,
                 others: Sequence[OtherPayload]) -> list[Dependency]:
    """The three build-id notes (spec §1.6), each with what it belongs to."""
    def whose(build_id: bytes) -> tuple[str, str]:
        if not build_id:
            return "missing or malformed note", "unknown"
        if xs is not None and build_id == xs.build_id:
            return "this hypervisor (xen-syms)", "hypervisor"
        for o in others:
            if build_id == o.info.build_id:
                return f"payload {o.name} ({o.path}): stacked on it", "payload"
        return "", "unknown"

    xen_text, xen_kind = whose(info.xen_depends)
    if not xen_text:  # by definition a hypervisor's id, only not the one given
        xen_text = ("another hypervisor build, not the given xen-syms: Xen would refuse the "
                    "payload" if xs is not None else
                    "the hypervisor it was built for (give --xen-syms to check which)")
        xen_kind = "hypervisor"
    dep_text, dep_kind = whose(info.depends)
    if dep_kind == "hypervisor":
        dep_text += ": not stacked"
    elif not dep_text:
        if info.depends == info.xen_depends:
            dep_text, dep_kind = "the hypervisor (same as xen_depends): not stacked", "hypervisor"
        else:
            dep_text = "another payload (stacked); give --payload FILE to name it"
            dep_kind = "payload"
    own = "this payload: a payload stacked on it names this id in its depends"
    return [Dependency(xen_abi.SEC_XEN_DEPENDS, info.xen_depends, xen_text, xen_kind),
            Dependency(xen_abi.SEC_DEPENDS, info.depends, dep_text, dep_kind),
            Dependency(xen_abi.SEC_BUILD_ID, info.build_id,
                       own if info.build_id else "missing or malformed note",
                       "self" if info.build_id else "unknown")]


# --------------------------------------------------------------------------------------------
# Reading the payload's sections


def _binding(sym: Symbol) -> str:
    return {0: "local", 1: "global", 2: "weak"}.get(sym.bind, str(sym.bind))


class _Builder:
    """Reads one payload's sections into report pieces."""

    def __init__(self, elf: Elf, xs: XenSymbols | None) -> None:
        self.elf = elf
        self.xs = xs
        self.ends = InstructionEnds()
        self.notes: list[str] = []
        files = [f for f in elf.file_symbols() if f]
        # Only a payload of one object tells which file a global came from (see docs/inspect.md).
        self.only_file = files[0] if len(set(files)) == 1 else ""

    # -- .livepatch.funcs ----------------------------------------------------------------------
    def funcs(self) -> list[FuncEntry]:
        sec = self.elf.section(xen_abi.SEC_FUNCS)
        if sec is None or sec.is_nobits or sec.size % xen_abi.FUNC_SIZE:
            return []
        relocs = {r.offset: r for r in sec.relocs}
        out = []
        for index, off in enumerate(range(0, sec.size, xen_abi.FUNC_SIZE)):
            (_n, stored_new, stored_old, new_size, old_size, version, _pad,
             _expect) = xen_abi.FUNC_STRUCT.unpack_from(sec.data, off)
            name = self._string(relocs.get(off + xen_abi.FUNC_OFF_NAME))
            new_rel = relocs.get(off + xen_abi.FUNC_OFF_NEW_ADDR)
            new_sym, new_sec, new_off = self._new_addr(new_rel)
            old_addr, source = self._old_addr(name, stored_old,
                                              relocs.get(off + xen_abi.FUNC_OFF_OLD_ADDR))
            out.append(FuncEntry(index, name, old_addr, source, old_size, new_sym, new_sec,
                                 new_off, new_size, self._source_file(name, new_sym), version,
                                 is_nop=new_rel is None and not stored_new))
        return out

    def _string(self, r: Reloc | None) -> str:
        if r is None or r.sym.sec is None:
            return ""
        body = bytes(r.sym.sec.data)
        start = r.sym.value + r.addend
        end = body.find(b"\0", start)
        return body[start:end].decode("utf-8", "replace") if 0 <= start <= end else ""

    def _new_addr(self, r: Reloc | None) -> tuple[str, str, int]:
        if r is None or r.sym.sec is None:
            return (r.sym.name if r is not None else ""), "", 0
        sec, off = r.sym.sec, r.sym.value + r.addend
        owner = symbol_at(sec, off)
        name = with_offset(plain_name(owner), off - owner.value) if owner is not None else ""
        return name, sec.name, off

    def _old_addr(self, name: str, stored: int, r: Reloc | None) -> tuple[int, str]:
        if r is None and stored:
            x = self.xs.lookup(name) if (self.xs is not None and name) else None
            if x is not None and x.addr != stored:
                self.notes.append(f"{name}: old_addr {stored:#x} in the payload, but "
                                  f"{self.xs.path if self.xs else ''} has it at {x.addr:#x}")
            return stored, "payload"
        # Left to the loader: by relocation against a hypervisor symbol, or by name.
        target = r.sym.name if r is not None else name
        addend = r.addend if r is not None else 0
        x = self.xs.lookup(target) if (self.xs is not None and target) else None
        if x is None:
            return 0, "load"
        return x.addr + addend, "xen-syms"

    def _source_file(self, name: str, new_symbol: str) -> str:
        for n in (name, new_symbol):
            if "#" in n:
                return n.split("#", 1)[0]
        return self.only_file

    # -- functions and data --------------------------------------------------------------------
    def _defined(self, kind: int) -> list[Symbol]:
        return [s for s in self.elf.symbols
                if s.type == kind and s.sec is not None and s.sec.is_alloc and s.name]

    def functions(self, funcs: list[FuncEntry], hooks: list[Hook]) -> list[PayloadFunction]:
        by_place = {(f.new_section, f.new_offset): f for f in funcs if f.new_section}
        hooked = {h.function for h in hooks}
        out = []
        for sym in self._defined(STT_FUNC):
            assert sym.sec is not None
            if not sym.sec.is_text:
                continue
            size = function_extent(sym)
            entry = by_place.get((sym.sec.name, sym.value))
            role = "replacement" if entry else ("hook" if sym.name in hooked else "new")
            fn = PayloadFunction(sym.name, sym.sec.name, sym.value, size, _binding(sym), role,
                                 code=disassemble_relocatable(sym.sec, sym.value, size))
            if entry is not None:
                fn.replaces, fn.old_addr = entry.name, entry.old_addr
                fn.old_code, fn.old_code_note = self._old_code(entry)
            out.append(fn)
        # Replacements in funcs order (the review's subject), then new functions, then hooks.
        index = {f.new_symbol: f.index for f in funcs}
        rank = {"replacement": 0, "new": 1, "hook": 2}
        return sorted(out, key=lambda f: (rank[f.role], index.get(f.name, 0)))

    def _old_code(self, entry: FuncEntry) -> tuple[list[Instruction] | None, str]:
        if self.xs is None:
            return None, "give --xen-syms to see the code it replaces"
        if not entry.old_addr:
            return None, f"{entry.name} is not in {self.xs.path}"
        x = self.xs.lookup(entry.name)
        size = entry.old_size or (x.size if x is not None else 0)
        code = self.xs.read(entry.old_addr, size)
        if not code:
            return None, f"no code at {entry.old_addr:#x} in {self.xs.path}"
        return disassemble_linked(code, entry.old_addr, self.xs), ""

    def data(self) -> list[PayloadData]:
        out = []
        for sym in self._defined(STT_OBJECT):
            sec = sym.sec
            assert sec is not None
            if sec.name.startswith(_METADATA_PREFIXES):
                continue
            kind = ("zero-initialised" if sec.is_nobits else
                    "writable" if sec.is_writable else "read-only")
            out.append(PayloadData(sym.name, sec.name, sym.value, sym.size, kind,
                                   _binding(sym)))
        return out

    # -- hooks ---------------------------------------------------------------------------------
    def hooks(self) -> list[Hook]:
        out = []
        for kind in xen_abi.HOOK_KINDS:
            sec = self.elf.section(xen_abi.HOOK_PREFIX + kind)
            if sec is None or sec.is_nobits:
                continue
            relocs = {r.offset: r for r in sec.relocs}
            for i, off in enumerate(range(0, sec.size - sec.size % 8, 8)):
                r = relocs.get(off)
                out.append(Hook(kind, i, self._function_name(r) if r is not None else ""))
        return out

    def _function_name(self, r: Reloc) -> str:
        t = target_of(r)
        if t.kind == "sym" and t.sym is not None:
            return with_offset(plain_name(t.sym), t.delta)
        return reloc_label(r, 0)

    # -- relocations ---------------------------------------------------------------------------
    def relocations(self) -> list[RelocGroup]:
        groups: dict[tuple[str, str], RelocGroup] = {}
        for sec in self.elf.sections:
            if not sec.is_alloc:
                continue
            for r in sec.relocs:
                target, kind = self._group_key(sec, r)
                g = groups.setdefault((kind, target), RelocGroup(target, kind))
                tname = xen_abi.reloc_type_name(r.type)
                if tname not in g.types:
                    g.types.append(tname)
                g.sites.append(self._site(sec, r.offset))
        order = {"hypervisor": 0, "payload": 1, "string": 2, "constant": 3, "section": 4}
        return sorted(groups.values(), key=lambda g: (order.get(g.kind, 9), g.target))

    def _pc_adjust(self, sec: Section, r: Reloc) -> int:
        if not sec.is_text or r.type not in PC_RELATIVE:
            return 0
        owner = symbol_at(sec, r.offset)
        start, end = (owner.value, owner.value + function_extent(owner)) if owner else \
            (0, sec.size)
        return self.ends.pc_adjust(sec, start, end, r.offset, field_width(r.type))

    def _group_key(self, sec: Section, r: Reloc) -> tuple[str, str]:
        if sec.name in xen_abi.BUG_FRAME_SECTIONS:  # see _bug_target
            frame = r.offset - r.offset % xen_abi.special_entry_size(sec.name)
            t = target_of(r, real_offset=bug_frame_real_offset(r.addend, r.offset - frame))
        else:
            t = target_of(r, self._pc_adjust(sec, r))
        if t.kind == "sym":
            assert t.sym is not None
            return plain_name(t.sym), "hypervisor" if t.sym.sec is None else "payload"
        assert t.section is not None
        if t.kind == "string":
            return f"{t.section.name}+{t.start:#x} {quote(t.content)}", "string"
        if t.kind == "const":
            return f"{t.section.name}+{t.start:#x}", "constant"
        return t.section.name, "section"

    def _site(self, sec: Section, offset: int) -> str:
        """Where a relocation sits, in the reader's terms: ``function+0x12``,
        ``.livepatch.funcs[0].new_addr``, ``.ex_table[1]``, else ``section+0xoff``."""
        if sec.name == xen_abi.SEC_FUNCS:
            i, rest = divmod(offset, xen_abi.FUNC_SIZE)
            field_name = {xen_abi.FUNC_OFF_NAME: "name", xen_abi.FUNC_OFF_NEW_ADDR: "new_addr",
                          xen_abi.FUNC_OFF_OLD_ADDR: "old_addr"}.get(rest, f"+{rest:#x}")
            return f"{sec.name}[{i}].{field_name}"
        size = xen_abi.special_entry_size(sec.name) or (
            xen_abi.HOOK_POINTER_SIZE if sec.name.startswith(xen_abi.HOOK_PREFIX) else 0)
        if size:
            return f"{sec.name}[{offset // size}]"
        owner = symbol_at(sec, offset)
        if owner is not None and not owner.is_section and owner.name:
            return with_offset(plain_name(owner), offset - owner.value)
        return with_offset(sec.name, offset)

    # -- special sections ----------------------------------------------------------------------
    def special(self) -> list[SpecialEntry]:
        out: list[SpecialEntry] = []
        for name, decode in self._decoders():
            sec = self.elf.section(name)
            size = xen_abi.special_entry_size(name)
            if sec is None or sec.is_nobits or not size or sec.size % size:
                continue
            relocs = {r.offset: r for r in sec.relocs}
            for i, off in enumerate(range(0, sec.size, size)):
                out.append(decode(sec, i, off, relocs))
        for hook in self.hooks():
            fn = hook.function or "nothing (NULL: disabled)"
            out.append(SpecialEntry(xen_abi.HOOK_PREFIX + hook.kind, hook.index,
                                    hook.index * xen_abi.HOOK_POINTER_SIZE, hook.function,
                                    f"{hook.kind} hook calls {fn}",
                                    {"kind": hook.kind, "function": hook.function}))
        mod = self.elf.section(xen_abi.SEC_MODINFO)
        if mod is not None and not mod.is_nobits:
            pos, index = 0, 0
            for item in bytes(mod.data).split(b"\0")[:-1]:
                if item:
                    key, value = _modinfo(item)[0]
                    out.append(SpecialEntry(mod.name, index, pos, "", f"{key}={value}",
                                            {"key": key, "value": value}))
                    index += 1
                pos += len(item) + 1
        return out

    def _decoders(self) -> list[tuple[str, Callable[..., SpecialEntry]]]:
        return [(xen_abi.SEC_ALTINSTRUCTIONS, self._alt), (xen_abi.SEC_EX_TABLE, self._ex),
                *((n, self._bug) for n in xen_abi.BUG_FRAME_SECTIONS)]

    @staticmethod
    def _place(r: Reloc | None) -> tuple[str, str]:
        """(label, owning function) of a data field's target: ``S + A`` (a relative field in data
        is ``target - .``, so no instruction end is added)."""
        if r is None:
            return "(no relocation)", ""
        t = target_of(r)
        owner = plain_name(t.sym) if t.kind == "sym" and t.sym is not None and t.sym.is_func else ""
        return reloc_label(r, 0), owner

    def _alt(self, sec: Section, i: int, off: int, relocs: dict[int, Reloc]) -> SpecialEntry:
        entry = xen_abi.ALT_INSTR.unpack(sec.data, off)
        cpuid, orig_len, repl_len, pad_len = (entry.cpuid, entry.orig_len, entry.repl_len,
                                              entry.pad_len)
        orig_rel = relocs.get(off + xen_abi.ALT_INSTR.offset("orig_offset"))
        repl_rel = relocs.get(off + xen_abi.ALT_INSTR.offset("repl_offset"))
        orig, owner = self._place(orig_rel)
        repl, _ = self._place(repl_rel)
        repl_code = self._code_at(repl_rel, repl_len)
        orig_code = self._code_at(orig_rel, orig_len)
        feature = f"{cpuid // 32}*32+{cpuid % 32}"
        summary = f"{orig_code} -> {repl_code} when CPU feature {feature} is present"
        return SpecialEntry(sec.name, i, off, owner, summary,
                            {"orig": orig, "orig_len": orig_len, "repl": repl,
                             "repl_len": repl_len, "pad_len": pad_len, "cpuid": cpuid,
                             "feature": feature, "orig_code": orig_code,
                             "repl_code": repl_code})

    def _code_at(self, r: Reloc | None, length: int | None) -> str:
        """The code a special entry points at, on one line.  ``length`` None: a ``.fixup``
        fragment, which ends where the next one that anything points at begins."""
        if r is None or r.sym.sec is None:
            return "?"
        sec, start = r.sym.sec, r.sym.value + r.addend
        if length is None:
            starts = [x.sym.value + x.addend for other in self.elf.sections
                      for x in other.relocs if x.sym.sec is sec]
            length = min((b for b in starts if b > start), default=sec.size) - start
        code = disassemble_relocatable(sec, start, length)
        return "; ".join(i.text for i in code) or "(empty)"

    def _ex(self, sec: Section, i: int, off: int, relocs: dict[int, Reloc]) -> SpecialEntry:
        addr, owner = self._place(relocs.get(off + xen_abi.EX_TABLE_ENTRY.offset("addr")))
        cont_rel = relocs.get(off + xen_abi.EX_TABLE_ENTRY.offset("cont"))
        cont, _ = self._place(cont_rel)
        fields: dict[str, str | int] = {"addr": addr, "cont": cont}
        summary = f"a fault at {addr} continues at {cont}"
        if cont_rel is not None and cont_rel.sym.sec is not None and \
                cont_rel.sym.sec.name == xen_abi.SEC_FIXUP:
            fields["cont_code"] = self._code_at(cont_rel, None)
            summary += f": {fields['cont_code']}"
        return SpecialEntry(sec.name, i, off, owner, summary, fields)

    def _bug(self, sec: Section, i: int, off: int, relocs: dict[int, Reloc]) -> SpecialEntry:
        """A bug frame (spec §1.4): where the ``ud2`` is, and the file and line it reports."""
        kind = BUG_FRAME_KINDS[xen_abi.BUG_FRAME_SECTIONS.index(sec.name)]
        loc_rel = relocs.get(off + xen_abi.BUG_FRAME.offset("loc_disp"))
        ptr_rel = relocs.get(off + xen_abi.BUG_FRAME.offset("ptr_disp"))
        loc, owner = self._place(_bug_target(loc_rel, off))
        line = (_line_bits(loc_rel) << _BUG_LINE_LO_WIDTH) | _line_bits(ptr_rel)
        fields: dict[str, str | int] = {"kind": kind, "location": loc, "line": line}
        if kind == "run_fn":
            fields["function"] = self._place(_bug_target(ptr_rel, off))[0]
            return SpecialEntry(sec.name, i, off, owner,
                                f"run_fn at {loc} calls {fields['function']}", fields)
        fields["file"] = _string_or_label(_bug_target(ptr_rel, off))
        summary = f"{kind.upper()} at {loc}: {fields['file']}:{line}"
        if kind == "assert":
            msg_rel = relocs.get(off + xen_abi.ASSERT_FRAME.offset("msg_disp"))
            fields["message"] = _string_or_label(_bug_target(msg_rel, off))
            summary += f": assertion '{fields['message']}' failed"
        return SpecialEntry(sec.name, i, off, owner, summary, fields)


def _bug_target(r: Reloc | None, frame: int) -> Reloc | None:
    """A bug-frame field's relocation as one that designates its target: the line bits taken
    out of the addend, and the field's distance from the frame start too, since Xen adds each
    displacement to the frame's address, not to the field's (asm/bug.h ``bug_ptr``/``bug_msg``);
    ``S + A`` of the message field of an assert frame is 12 bytes past the message."""
    if r is None:
        return None
    return Reloc(r.offset, r.type, r.sym, bug_frame_real_offset(r.addend, r.offset - frame))


def _line_bits(r: Reloc | None) -> int:
    if r is None:
        return 0
    return (r.addend - bug_frame_real_offset(r.addend, 0)) >> xen_abi.BUG_DISP_WIDTH


def _string_or_label(r: Reloc | None) -> str:
    if r is None:
        return "(none)"
    sec, where = r.sym.sec, r.sym.value + r.addend
    if sec is not None and not 0 <= where < sec.size:  # what Xen would print is not in it
        return f"<outside {with_offset(sec.name, where)}>"
    text = string_of(r, 0)
    return text if text is not None else reloc_label(r, 0)
