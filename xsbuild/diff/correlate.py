"""Pass 1: list the units of both objects and link every patched unit to its original twin.

Funnel, widest unique match first (as klp-diff's ``correlate_symbols``): exact name (with
locality and type) for everything but numbered static locals; static locals by base name among
the statics that the twins of their users use; clones and splits by demangled name.  Special
statics stay uncorrelated.  Every decision is logged at DEBUG (``xsbuild --debug``).
"""

from __future__ import annotations

import logging

from xsbuild import xen_abi
from xsbuild.diff.model import (
    CLONE_RE,
    IGNORED_SECTION_PREFIXES,
    STATIC_LOCAL_RE,
    DiffContext,
    Side,
    Unit,
    cold_parent_name,
    demangle,
    is_special_static,
)
from xsbuild.elf import STT_FUNC, STT_OBJECT, Elf, Symbol

log = logging.getLogger(__name__)


def list_units(elf: Elf, side: Side) -> list[Unit]:
    """Every function and data object of ``elf`` a payload could carry, with cold parts linked
    to their parents."""
    units = []
    for sym in elf.symbols:
        if sym.sec is None or sym.type not in (STT_FUNC, STT_OBJECT) or not sym.name:
            continue
        if not sym.sec.is_alloc or sym.sec.name.startswith(xen_abi.HOOK_PREFIX):
            continue
        if sym.sec.name.startswith(IGNORED_SECTION_PREFIXES):
            continue
        units.append(Unit(sym=sym, side=side))
    by_name = {u.name: u for u in units}
    for u in units:
        parent = cold_parent_name(u.name)
        if parent and parent in by_name and u.is_func:
            u.parent = by_name[parent]
            by_name[parent].children.append(u)
    return units


def correlate(ctx: DiffContext) -> None:
    """Fill ``ctx.orig_units``/``ctx.units`` and their indexes, and set every ``twin``."""
    ctx.orig_units = list_units(ctx.orig, Side.ORIG)
    ctx.units = list_units(ctx.patched, Side.PATCHED)
    ctx.orig_unit_of = {u.sym: u for u in ctx.orig_units}
    ctx.unit_of = {u.sym: u for u in ctx.units}
    _match_exact(ctx.orig_units, ctx.units)
    _match_static_locals(ctx)
    _match_demangled(ctx.orig_units, ctx.units)


def _link(o: Unit, p: Unit, how: str) -> None:
    o.twin, p.twin = p, o
    log.debug("correlate: %s <-> %s (%s)", o.name, p.name, how)


def _key(u: Unit) -> tuple[str, bool, int]:
    return (u.name, u.sym.is_local, u.sym.type)


def is_numbered_static(u: Unit) -> bool:
    return (not u.is_func and u.sym.is_local and STATIC_LOCAL_RE.match(u.name) is not None
            and not is_special_static(u.name))


def static_base(name: str) -> str:
    """``count.3`` -> ``count``; other names unchanged."""
    m = STATIC_LOCAL_RE.match(name)
    return m.group("base") if m else name


def _match_exact(orig: list[Unit], patched: list[Unit]) -> None:
    def index(units: list[Unit]) -> dict[tuple[str, bool, int], list[Unit]]:
        out: dict[tuple[str, bool, int], list[Unit]] = {}
        for u in units:
            if not is_special_static(u.name) and not is_numbered_static(u):
                out.setdefault(_key(u), []).append(u)
        return out
    oi, pi = index(orig), index(patched)
    for key, ps in pi.items():
        os_ = oi.get(key, [])
        if len(ps) == len(os_):  # unique, or duplicates matched by position (asm objects)
            for p, o in zip(ps, os_, strict=True):
                _link(o, p, "same name")
        else:
            log.debug("correlate: %s: %d original, %d patched: not matched by name", key[0],
                      len(os_), len(ps))


def _match_static_locals(ctx: DiffContext) -> None:
    """gcc numbers function-scope statics per translation unit (``count.0``, ``count.1``); a new
    static earlier in the file renumbers the old ones.  Match by base name among the statics used
    by the twin of a unit that uses the patched one; several of one base name in one user (two
    ``warned`` flags of two ``printk_once`` in one function) by their order of first use.  Repeat
    until nothing moves, since statics are also used by statics (``__setup_str`` by ``__setup``).
    """
    p_statics = [u for u in ctx.units if is_numbered_static(u)]
    if not p_statics:
        return
    o_uses = _uses(ctx, ctx.orig_units, ctx.orig_unit_of)
    p_uses = _uses(ctx, ctx.units, ctx.unit_of)
    p_users = _invert(ctx.units, p_uses)
    progress = True
    while progress:
        progress = False
        for p in p_statics:
            if p.twin is None:
                o = _static_twin(p, p_users, o_uses, p_uses)
                if o is not None:
                    _link(o, p, f"static used by {_user_names(p, p_users)}")
                    progress = True
        # Statics nothing uses (a __setup entry found by walking its section): exact name.
        left_o = {o.name: o for o in ctx.orig_units if is_numbered_static(o) and o.twin is None}
        for p in p_statics:
            if p.twin is None and p.name in left_o and not p_users.get(p):
                _link(left_o.pop(p.name), p, "unused static, same name")
                progress = True
    for p in p_statics:
        if p.twin is None:
            log.debug("correlate: static %s has no original twin", p.name)


def _user_names(p: Unit, users: dict[Unit, list[Unit]]) -> str:
    return ", ".join(u.name for u in users.get(p, [])) or "nothing"


def _static_twin(p: Unit, p_users: dict[Unit, list[Unit]], o_uses: dict[Unit, list[Unit]],
                 p_uses: dict[Unit, list[Unit]]) -> Unit | None:
    base = static_base(p.name)
    for user in p_users.get(p, []):
        if user.twin is None:
            continue
        mine = [s for s in p_uses[user] if is_numbered_static(s) and static_base(s.name) == base]
        theirs = [s for s in o_uses.get(user.twin, [])
                  if is_numbered_static(s) and static_base(s.name) == base]
        free = [o for o in theirs if o.twin is None or o.twin is p]
        if len(free) == 1 and len(mine) - sum(s.twin is not None for s in mine) == 1:
            return free[0]
        if len(mine) == len(theirs):  # same statics in the same order of first use
            o = theirs[mine.index(p)]
            if o.twin is None:
                return o
    return None


def _uses(ctx: DiffContext, units: list[Unit],
          unit_of: dict[Symbol, Unit]) -> dict[Unit, list[Unit]]:
    """Unit -> the units it references, in order of first reference."""
    uses: dict[Unit, list[Unit]] = {}
    for u in units:
        lst: list[Unit] = []
        for _r, t in ctx.targets(u):
            if t.kind == "sym" and t.sym is not None:
                v = unit_of.get(t.sym)
                if v is not None and v not in lst:
                    lst.append(v)
        uses[u] = lst
    return uses


def _invert(units: list[Unit], uses: dict[Unit, list[Unit]]) -> dict[Unit, list[Unit]]:
    """Unit -> the units that reference it."""
    users: dict[Unit, list[Unit]] = {}
    for u in units:
        for v in uses[u]:
            users.setdefault(v, []).append(u)
    return users


def _match_demangled(orig: list[Unit], patched: list[Unit]) -> None:
    def index(units: list[Unit]) -> dict[tuple[str, int], list[Unit]]:
        out: dict[tuple[str, int], list[Unit]] = {}
        for u in units:
            if u.twin is None and CLONE_RE.search(u.name) and not is_special_static(u.name):
                out.setdefault((demangle(u.name), u.sym.type), []).append(u)
        return out
    oi, pi = index(orig), index(patched)
    for key, ps in pi.items():
        os_ = oi.get(key, [])
        if len(ps) == 1 and len(os_) == 1:
            _link(os_[0], ps[0], f"same demangled name {key[0]}")
