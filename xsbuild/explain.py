"""Why the differ decided what it did: the model behind ``xsbuild explain``.

:func:`explain_files` runs :func:`xsbuild.diff.diff_objects` on an original and a patched object
and turns the decisions it leaves on its :class:`~xsbuild.diff.model.DiffContext` (nothing is
decided twice) into an :class:`ExplainReport` a reviewer can check against the source patch:

* every function of both objects, ``same``, ``changed``, ``new`` or ``removed``, with the reason:
  for changed code the *first differing instruction* on both sides (the differ only knows the
  byte offset), for a relocation that now points elsewhere the instruction and both targets,
  with the old and new text when the target is a string literal;
* changed, new and removed data;
* what the payload carries, and for each unit why: a changed function, a hook, a new global, the
  cold part of an included function, or the included unit and instruction that refers to it
  (:attr:`xsbuild.diff.Unit.pulled_by`);
* what was refused, and why.  A refused diff is explained too: that is when a reviewer most needs
  to see it.

Nothing here prints; :mod:`xsbuild.report` renders the report, and :meth:`ExplainReport.to_json`
is the ``xsbuild.explain/1`` document (``docs/json-schema/xsbuild.explain-1.schema.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from xsbuild.diff import DiffContext, Status, Unit, diff_objects
from xsbuild.diff.model import ChangeKind
from xsbuild.disasm import (
    Instruction,
    disassemble_relocatable,
    plain_name,
    reloc_label,
    reloc_pc_adjust,
    string_of,
)
from xsbuild.elf import Reloc, Symbol, read_elf
from xsbuild.errors import EXIT_NO_CHANGE, EXIT_OK, EXIT_REFUSED
from xsbuild.relocs import target_of

SCHEMA = "xsbuild.explain/1"
CHANGED, NEW, REMOVED, SAME = Status.CHANGED, Status.NEW, Status.REMOVED, Status.SAME
_STATUS_ORDER = {CHANGED: 0, NEW: 1, REMOVED: 2, SAME: 3}



@dataclass(frozen=True, slots=True)
class Difference:
    """The first place where a changed function differs from its original, both ways."""

    kind: str  # "code", "relocation" or "other" (the differ's reason says it all)
    offset: int | None
    old: Instruction | None  # None: past the end of the old function
    new: Instruction | None
    old_target: str = ""
    new_target: str = ""
    old_string: str | None = None
    new_string: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "offset": self.offset,
                "old": self.old.to_json() if self.old else None,
                "new": self.new.to_json() if self.new else None,
                "old_target": self.old_target or None, "new_target": self.new_target or None,
                "old_string": self.old_string, "new_string": self.new_string}


@dataclass(slots=True)
class FunctionExplanation:
    name: str
    xen_name: str  # how the hypervisor names it (statics as path#name)
    status: str  # same, changed, new, removed
    section: str
    old_size: int | None
    new_size: int | None
    reason: str
    included: bool
    difference: Difference | None = None
    old_code: list[Instruction] | None = None  # changed and removed functions
    new_code: list[Instruction] | None = None  # changed and new functions

    def to_json(self) -> dict[str, object]:
        def code(listing: list[Instruction] | None) -> list[dict[str, object]] | None:
            return None if listing is None else [i.to_json() for i in listing]
        return {"name": self.name, "xen_name": self.xen_name, "status": self.status,
                "section": self.section, "old_size": self.old_size, "new_size": self.new_size,
                "reason": self.reason, "included": self.included,
                "difference": self.difference.to_json() if self.difference else None,
                "old_code": code(self.old_code), "new_code": code(self.new_code)}


@dataclass(frozen=True, slots=True)
class DataExplanation:
    name: str
    xen_name: str
    status: str  # changed, new, removed
    section: str
    old_size: int | None
    new_size: int | None
    reason: str
    included: bool
    offset: int | None = None  # first differing byte of changed contents
    old_bytes: bytes = b""  # up to 8 bytes from ``offset``, each side
    new_bytes: bytes = b""

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "xen_name": self.xen_name, "status": self.status,
                "section": self.section, "old_size": self.old_size, "new_size": self.new_size,
                "reason": self.reason, "included": self.included, "offset": self.offset,
                "old_bytes": self.old_bytes.hex() if self.offset is not None else None,
                "new_bytes": self.new_bytes.hex() if self.offset is not None else None}


@dataclass(frozen=True, slots=True)
class Inclusion:
    """One unit the payload carries, and why."""

    name: str
    xen_name: str
    kind: str  # "function" or "data"
    status: str  # changed, new, same (an unchanged constant or cold part carried along)
    why: str  # "changed", "hook", "cold part", "referenced", "new global", "carried"
    by: str = ""  # the referring unit, cold part's parent or hook section
    at: int | None = None  # offset of the reference inside ``by``
    via: str = ""  # the referring instruction

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "xen_name": self.xen_name, "kind": self.kind,
                "status": self.status, "why": self.why, "by": self.by or None, "at": self.at,
                "via": self.via or None}


@dataclass(slots=True)
class ExplainReport:
    orig: str
    patched: str
    unit: str  # the translation unit (STT_FILE), e.g. common/version.c
    status: str  # changed, no-change, refused
    functions: list[FunctionExplanation]
    data: list[DataExplanation]
    included: list[Inclusion]
    hooks: list[str]
    refused: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """As ``xsbuild diff``: 1 refused, 3 no functional change, 0 changes found."""
        return {"refused": EXIT_REFUSED, "no-change": EXIT_NO_CHANGE}.get(self.status, EXIT_OK)

    def function(self, name: str) -> FunctionExplanation | None:
        return next((f for f in self.functions if f.name == name), None)

    def count(self, status: str) -> int:
        return sum(f.status == status for f in self.functions)

    def to_json(self) -> dict[str, object]:
        return {"schema": SCHEMA, "orig": self.orig, "patched": self.patched,
                "unit": self.unit, "status": self.status,
                "summary": {s: self.count(s) for s in (CHANGED, NEW, REMOVED, SAME)},
                "functions": [f.to_json() for f in self.functions],
                "data": [d.to_json() for d in self.data],
                "included": [i.to_json() for i in self.included],
                "hooks": self.hooks, "refused": self.refused, "notes": self.notes}


# --------------------------------------------------------------------------------------------
# Driver


def explain_files(orig: str | os.PathLike[str], patched: str | os.PathLike[str], *,
                  allow_new_statics: Iterable[str] = ()) -> ExplainReport:
    """Diff ``orig`` against ``patched`` and explain every decision.

    Raises :class:`xsbuild.errors.UsageError` subclasses for bad input (not an object, different
    translation units); a change that cannot be live-patched is part of the report
    (``status == "refused"``), not an error.
    """
    result = diff_objects(read_elf(orig), read_elf(patched), label=str(patched),
                          allow_new_statics=allow_new_statics)
    return explain(result, str(orig))


def explain(result: DiffContext, orig_label: str) -> ExplainReport:
    removed = result.removed
    included = set(result.included)
    functions = [_function(u, u in included) for u in result.units if u.is_func]
    functions += [_removed_function(u) for u in removed if u.is_func]
    functions.sort(key=lambda f: _STATUS_ORDER[f.status])
    data = [_data(u, u in included) for u in result.units
            if not u.is_func and u.status != SAME]
    data += [DataExplanation(u.name, u.xen_name, REMOVED, u.sec.name, u.sym.size, None,
                             "not in the patched object: the hypervisor keeps it", False)
             for u in removed if not u.is_func]
    files = result.patched.file_symbols()
    return ExplainReport(
        orig=orig_label, patched=result.object, unit=files[0] if files else "",
        status=str(result.status), functions=functions, data=data,
        included=inclusions(result), hooks=[s.name for s in result.hook_sections],
        refused=list(result.refused), notes=list(result.notes))


def code_of(u: Unit) -> list[Instruction]:
    return disassemble_relocatable(u.sec, u.sym.value, u.sym.size, plain_name)


def _function(u: Unit, included: bool) -> FunctionExplanation:
    old = u.twin
    fn = FunctionExplanation(u.name, u.xen_name, u.status, u.sec.name,
                             old.sym.size if old else None, u.sym.size, u.reason, included)
    if u.status == NEW:
        fn.new_code = code_of(u)
        if not included:
            fn.reason = "new, but nothing the payload carries uses it: left out"
    elif u.status == CHANGED and old is not None:
        fn.old_code, fn.new_code = code_of(old), code_of(u)
        fn.difference = d = show_difference(old, u, fn.old_code, fn.new_code)
        if d.kind == ChangeKind.RELOCATION and d.old_target and d.new_target:
            # The disassembler's labels name strings by their text; say it that way.
            fn.reason = (f"relocation at +{d.offset or 0:#x} now points to "
                         f"{_target_words(d.new_target, d.new_string)} "
                         f"(was {_target_words(d.old_target, d.old_string)})")
    elif u.status == SAME and not u.reason:
        fn.reason = "same code and same relocation targets"
    return fn


def _removed_function(u: Unit) -> FunctionExplanation:
    return FunctionExplanation(u.name, u.xen_name, REMOVED, u.sec.name, u.sym.size, None,
                               "not in the patched object: the hypervisor keeps its copy, "
                               "which nothing in the payload calls", False)


def _data(u: Unit, included: bool) -> DataExplanation:
    old = u.twin
    change = u.change
    if old is None or change is None or change.kind != ChangeKind.CODE or change.offset is None:
        return DataExplanation(u.name, u.xen_name, u.status, u.sec.name,
                               old.sym.size if old else None, u.sym.size, u.reason, included)
    # The value a reviewer wants to see: the bytes where the contents start to differ.
    off = change.offset
    return DataExplanation(u.name, u.xen_name, u.status, u.sec.name, old.sym.size, u.sym.size,
                           u.reason, included, off, old.body()[off:off + 8],
                           u.body()[off:off + 8])


# --------------------------------------------------------------------------------------------
# First differences


def show_difference(old: Unit, new: Unit, old_code: list[Instruction],
                     new_code: list[Instruction]) -> Difference:
    """The differ's :class:`xsbuild.diff.Change`, with the instructions it is about."""
    change = new.change
    if change is not None and change.kind == ChangeKind.CODE and change.offset is not None:
        off = change.offset
        return Difference("code", off, _covering(old_code, off), _covering(new_code, off))
    if change is not None and change.kind == ChangeKind.RELOCATION and change.offset is not None:
        off = change.offset
        old_r, new_r = _reloc_at(old, off), _reloc_at(new, off)
        old_i, new_i = _covering(old_code, off), _covering(new_code, off)
        diff = Difference("relocation", off, old_i, new_i)
        if old_r is not None and new_r is not None:
            old_pc = reloc_pc_adjust(old_code, old_r, old.sym.value)
            new_pc = reloc_pc_adjust(new_code, new_r, new.sym.value)
            diff = Difference("relocation", off, old_i, new_i,
                              reloc_label(old_r, old_pc), reloc_label(new_r, new_pc),
                              string_of(old_r, old_pc), string_of(new_r, new_pc))
        return diff
    return Difference("other", None, None, None)


def _target_words(label: str, string: str | None) -> str:
    return f"string {json.dumps(string)}" if string is not None else label


def _covering(code: list[Instruction], offset: int) -> Instruction | None:
    return next((i for i in code if i.covers(offset)), None)


def _reloc_at(u: Unit, offset: int) -> Reloc | None:
    return next((r for r in u.relocs() if r.offset - u.sym.value == offset), None)


# --------------------------------------------------------------------------------------------
# What the payload carries


def inclusions(result: DiffContext) -> list[Inclusion]:
    hooks: dict[Symbol, str] = {}
    for sec in result.hook_sections:
        for r in sec.relocs:
            t = target_of(r)
            if t.kind == "sym" and t.sym is not None:
                hooks.setdefault(t.sym, sec.name)
    chosen = set(result.included)
    return [_inclusion(u, hooks, chosen) for u in result.included]


def _inclusion(u: Unit, hooks: dict[Symbol, str], chosen: set[Unit]) -> Inclusion:
    kind = "function" if u.is_func else "data"

    def make(why: str, by: str = "", at: int | None = None, via: str = "") -> Inclusion:
        return Inclusion(u.name, u.xen_name, kind, u.status, why, by, at, via)

    if u.sym in hooks:
        return make("hook", hooks[u.sym])
    if u.status == CHANGED and u.is_func and u.parent is None:
        return make("changed")
    if u.parent is not None and u.parent in chosen:
        return make("cold part", u.parent.name)
    if u.pulled_by is not None:
        by = u.pulled_by
        insn = _covering(code_of(by), u.pulled_at) if by.is_func else None
        via = insn.text if insn else f"a pointer at +{u.pulled_at:#x}"
        return make("referenced", by.name, u.pulled_at, via)
    if u.status == NEW and not u.sym.is_local:
        return make("new global")
    return make("carried")
