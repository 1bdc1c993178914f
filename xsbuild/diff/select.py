"""Pass 3: refuse what cannot be live-patched, and choose what the payload carries.

Refusals are collected, one message per problem naming object, section and symbol: changed data,
changed ``__init`` code or data, used statics that lost their twin, relocation types Xen's
loader does not perform.  The payload carries the changed functions (with their cold parts), new
global things, hook targets, and every new unit or special static they reach; SAME units stay in
the hypervisor and are referenced by name.
"""

from __future__ import annotations

import logging

from xsbuild import xen_abi
from xsbuild.diff.correlate import is_numbered_static, static_base
from xsbuild.diff.model import (
    STATIC_LOCAL_RE,
    DiffContext,
    Status,
    Unit,
    is_init_section,
    is_special_static,
)
from xsbuild.elf import STT_OBJECT
from xsbuild.relocs import target_of

log = logging.getLogger(__name__)


def select(ctx: DiffContext) -> None:
    """Fill ``ctx.refused``, ``ctx.hook_sections``, ``ctx.included`` and ``ctx.notes``."""
    carry_changed_tables(ctx)
    ctx.refused += find_refusals(ctx)
    ctx.hook_sections = [s for s in ctx.patched.sections
                         if s.name.startswith(xen_abi.HOOK_PREFIX) and s.size]
    chosen = reachable(ctx, roots(ctx))
    ctx.included = [u for u in ctx.units if u in chosen]
    ctx.notes += unused_new_functions(ctx, chosen)
    ctx.refused += unsupported_relocations(ctx.object, ctx.included)


# --------------------------------------------------------------------------------------------
# Refusals


def find_refusals(ctx: DiffContext) -> list[str]:
    """Every reason the change cannot be live-patched (collected, not raised one by one)."""
    problems = []
    for u in ctx.units:
        where = f"{ctx.object}: {u.sec.name}: {u.name}"
        if u.sec.name in ctx.ignored_sections:
            continue
        if is_init_section(u.sec.name) and u.status != Status.SAME:
            what = "function" if u.is_func else "data"
            problems.append(f"{where}: {u.status} __init {what} cannot be live-patched (init code "
                            "and data ran at boot and were freed); put the fix in a runtime "
                            "function or mark the section in .livepatch.ignore.sections")
        elif not u.is_func and u.status == Status.CHANGED and not is_special_static(u.name) \
                and u not in ctx.tables:
            kind = ("read-only data" if not u.sec.is_writable else
                    "zero-initialised data (bss)" if u.sec.is_nobits else "initialised data")
            problems.append(f"{where}: changed {kind} cannot be live-patched ({u.reason}): the "
                            "running hypervisor keeps the old value; use a new variable and a "
                            "load hook instead")
    problems += uncorrelated_statics(ctx)
    return problems


def carry_changed_tables(ctx: DiffContext) -> None:
    """A changed read-only static (a lookup table, a list of known digests) can travel as new
    data when the payload replaces every function that reads it: each reader, changed or not,
    is replaced by its copy in the payload, which reads the payload's table.  Refused, naming
    the reader, when something that cannot be replaced still reads the old table: data holding
    its address, a place covered by no symbol; and when it is global (other objects may read
    it).  ``__init`` readers ran at boot and are gone: they do not count.  Writable data stays
    refused (:func:`find_refusals`)."""
    tables = [u for u in ctx.units if _is_changed_table(ctx, u)]
    if not tables:
        return
    readers = _readers(ctx, set(tables))
    for table in tables:
        ctx.tables.append(table)
        where = f"{ctx.object}: {table.sec.name}: {table.name}"
        blockers = [why for reader, why in readers.get(table, []) if why]
        if not table.sym.is_local:
            blockers.insert(0, "it is global, so code in other objects may read it")
        if blockers:
            ctx.refused.append(f"{where}: changed read-only data cannot be live-patched "
                               f"({table.reason}): {blockers[0]}, and the running hypervisor "
                               "keeps the old value there; use a new table read only by "
                               "replaced functions")
            continue
        promoted, names = [], set()
        for reader, _why in readers.get(table, []):
            fn = reader.parent or reader  # a cold part is replaced with its function
            names.add(fn.name)
            if fn.status == Status.SAME:
                fn.status, fn.reason = Status.CHANGED, f"reads the changed table {table.name}"
                promoted.append(fn.name)
        log.debug("select: table %s carried; readers replaced: %s", table.name, promoted)
        alone = f"; replaced for that alone: {', '.join(sorted(set(promoted)))}" if promoted else ""
        ctx.notes.append(f"changed read-only table {table.name} is carried as new data, read "
                         f"only by replaced functions ({', '.join(sorted(names))}{alone})")


def _is_changed_table(ctx: DiffContext, u: Unit) -> bool:
    return (not u.is_func and u.status == Status.CHANGED and not is_special_static(u.name)
            and not u.sec.is_writable and not u.sec.is_nobits
            and not is_init_section(u.sec.name) and u.sec.name not in ctx.ignored_sections)


def _readers(ctx: DiffContext, tables: set[Unit]) -> dict[Unit, list[tuple[Unit | None, str]]]:
    """For each table, who refers to it: (unit, "") for a function the payload can replace,
    (unit or None, why not) for anything else.  Every relocation of every allocated section is
    looked at, so a reference from outside any unit is not missed."""
    found: dict[Unit, list[tuple[Unit | None, str]]] = {}
    for u in ctx.units:
        if is_init_section(u.sec.name):
            continue
        for _r, t in ctx.targets(u):
            table = ctx.unit_of.get(t.sym) if t.kind == "sym" and t.sym is not None else None
            if table in tables and table is not u:
                why = "" if u.is_func else f"the data {u.name} holds its address"
                found.setdefault(table, []).append((u, why))
    covered = {(u.sec, r.offset) for u in ctx.units for r in u.relocs()}
    for sec in ctx.patched.sections:
        if not sec.is_alloc or is_init_section(sec.name):
            continue
        for r in sec.relocs:
            if (sec, r.offset) in covered:
                continue
            t = target_of(r)
            table = ctx.unit_of.get(t.sym) if t.kind == "sym" and t.sym is not None else None
            if table in tables:
                found.setdefault(table, []).append(
                    (None, f"{sec.name}+{r.offset:#x} (covered by no symbol) refers to it"))
    return found


def uncorrelated_statics(ctx: DiffContext) -> list[str]:
    """A static local used by a *changed* function but without an original twin starts from its
    initial value in the payload while the old one keeps its state.  That is refused when some
    old state could have been its twin: the changed function's original used a static that is
    now left without a counterpart, or an uncorrelated old static has the same base name (a
    rename or a correlation xsbuild could not make).  A static nothing old can claim (inlined
    from a new function, say) is new.  ``--new-static`` accepts one explicitly."""
    problems: list[str] = []
    orphans = [o for o in ctx.orig_units if is_numbered_static(o) and o.twin is None]
    orphan_bases = {static_base(o.name) for o in orphans}
    allow = ctx.allow_new_statics
    for u in ctx.units:
        if u.status != Status.CHANGED or not u.is_func or u.twin is None:
            continue
        lost = [o.name for o in orphans if _references(ctx, u.twin, o)]
        for _r, t in ctx.targets(u):
            s = t.sym
            if t.kind != "sym" or s is None or s.sec is None or not s.is_local:
                continue
            m = STATIC_LOCAL_RE.match(s.name)
            if s.type != STT_OBJECT or m is None or is_special_static(s.name):
                continue
            unit = ctx.unit_of.get(s)
            if (unit is not None and unit.twin is not None) or s.name in allow \
                    or m.group("base") in allow:
                continue
            if not lost and m.group("base") not in orphan_bases:
                continue
            why = (f"the original {u.name} used {', '.join(lost)}, which has no counterpart now"
                   if lost else f"an old static {m.group('base')} has no counterpart")
            msg = (f"{ctx.object}: {s.sec.name}: {s.name}: static local used by changed function "
                   f"{u.name} has no counterpart in the original object ({why}); its state "
                   f"would restart from its initial value. If it is really new, allow it with "
                   f"--new-static {s.name}")
            if msg not in problems:
                problems.append(msg)
    return problems


def _references(ctx: DiffContext, u: Unit, target: Unit) -> bool:
    return any(t.kind == "sym" and t.sym is target.sym for _r, t in ctx.targets(u))


def unsupported_relocations(label: str, included: list[Unit]) -> list[str]:
    """Relocation types Xen's loader does not perform (spec §1.8) in anything the payload
    carries: refused now, with the place, rather than at upload with -EOPNOTSUPP."""
    problems = []
    for u in included:
        for r in u.relocs():
            if r.type not in xen_abi.ACCEPTED_RELOC_TYPES:
                target = r.sym.name or (r.sym.sec.name if r.sym.sec else "?")
                problems.append(
                    f"{label}: {u.sec.name}: {u.name}+{r.offset - u.sym.value:#x}: relocation "
                    f"{xen_abi.reloc_type_name(r.type)} against {target}: Xen's loader performs "
                    "only R_X86_64_64, PC32 and PLT32 (absolute 32-bit addresses cannot reach "
                    "a payload; use RIP-relative addressing)")
    return problems


# --------------------------------------------------------------------------------------------
# Inclusion


def roots(ctx: DiffContext) -> list[Unit]:
    """What the payload carries for its own sake: changed functions, new global things outside
    ``__init``, and the functions the hook sections point at."""
    found = [u for u in ctx.units
             if (u.status == Status.CHANGED and u.is_func)
             or (u.status == Status.NEW and not u.sym.is_local
                 and not is_init_section(u.sec.name))]
    for sec in ctx.hook_sections:  # hook functions are reached through the hooks' pointers
        for r in sec.relocs:
            t = target_of(r)
            u = ctx.unit_of.get(t.sym) if t.kind == "sym" and t.sym is not None else None
            if u is not None:
                found.append(u)
    return found


def reachable(ctx: DiffContext, start: list[Unit]) -> set[Unit]:
    """``start`` and everything it reaches that must travel with it (:func:`needs_copy`); each
    unit pulled in records the first unit and offset found referring to it (``pulled_by``)."""
    is_root = set(start)
    chosen: set[Unit] = set()
    work = list(start)
    while work:
        u = work.pop()
        if u in chosen:
            continue
        chosen.add(u)
        work.extend(u.children)
        for r, t in ctx.targets(u):
            v = ctx.unit_of.get(t.sym) if t.kind == "sym" and t.sym is not None else None
            if v is not None and needs_copy(v):
                if v.pulled_by is None and v not in is_root:  # first reference found
                    v.pulled_by, v.pulled_at = u, r.offset - u.sym.value
                    log.debug("select: %s pulled in by %s+%#x", v.name, u.name, v.pulled_at)
                work.append(v)
    return chosen


def unused_new_functions(ctx: DiffContext, chosen: set[Unit]) -> list[str]:
    return [f"new function {u.name} is not used by any change and is left out"
            for u in ctx.units if u.is_func and u.status == Status.NEW and u not in chosen
            and u.sym.is_local]


def needs_copy(u: Unit) -> bool:
    """Must this unit travel in the payload when an included unit refers to it?"""
    if u.status in (Status.NEW, Status.CHANGED) or is_special_static(u.name):
        return True
    if u.parent is not None:  # a cold part goes with its parent
        return u.parent.status != Status.SAME
    # Unchanged read-only statics are copied: constant, so a copy is exact, and Xen's table need
    # not hold them (gcc may have merged them away).
    return not u.is_func and u.sym.is_local and not u.sec.is_writable and not u.sec.is_nobits
