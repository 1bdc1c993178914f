"""Compare an original and a patched object function by function.

The driver :func:`diff_objects` runs these steps over the two parsed objects:

1. check the inputs belong together (same translation unit, split sections, a symbol table);
2. list the *units* of each side: every function and data object;
3. correlate each patched unit with its original twin (name, then static locals by the functions
   that use them, then compiler clones such as ``foo.constprop.1`` by their demangled name);
4. fingerprint every unit position-independently (:mod:`xsbuild.relocs`: relocation targets as
   symbol + delta, strings by content) and classify it SAME, CHANGED or NEW;
5. refuse what cannot be live-patched: changed data, ``__init`` code, used statics that lost their
   twin, with one message per problem naming object, section and symbol;
6. choose what the payload carries: changed functions, the new things they reach, hooks.

The result (:class:`DiffResult`) is handed to :mod:`xsbuild.extract`, which cuts the chosen units
out of the patched object into the diff object that ``xsbuild link`` consumes.  After step 3 no
step looks a symbol up by name again: twins are explicit links.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from xsbuild import xen_abi
from xsbuild.elf import STT_FUNC, STT_OBJECT, Elf, Reloc, Section, Symbol, read_elf
from xsbuild.errors import InputMismatchError, UnsupportedChangeError
from xsbuild.relocs import InstructionEnds, Target, field_width, target_of

SAME, CHANGED, NEW = "same", "changed", "new"

# Statics the compiler makes for its own purposes; never correlated, always carried fresh when an
# included function uses them (kpatch and klp-diff keep similar lists).  ``__func__.3`` holds the
# function's name for messages: a copy is as good as the original.
SPECIAL_STATIC_PREFIXES = ("__func__.", "__PRETTY_FUNCTION__.", "__FUNCTION__.", "CSWTCH.")

# Sections whose contents never reach a payload and whose changes mean nothing to one.
IGNORED_SECTION_PREFIXES = (".comment", ".note", ".discard", ".debug", ".eh_frame", ".group",
                            xen_abi.SEC_IGNORE_FUNCTIONS, xen_abi.SEC_IGNORE_SECTIONS)

# gcc's clone and split suffixes: ``foo.isra.0``, ``foo.constprop.3``, ``foo.part.1``,
# ``foo.cold``, ``foo.cold.7``; the numbers change between builds of the same function.
_CLONE_RE = re.compile(r"\.(isra|constprop|part|cold|lto_priv|localalias)(\.\d+)?")
_STATIC_LOCAL_RE = re.compile(r"^(?P<base>[A-Za-z_$][\w$]*)\.(?P<num>\d+)$")


def is_init_section(name: str) -> bool:
    """``__init`` code and data: ``.init.text``, ``.init.data``, ``.initcall*``, ``.init.setup``."""
    return name.startswith(".init") or name.startswith(".exit.")


def is_special_static(name: str) -> bool:
    return name.startswith(SPECIAL_STATIC_PREFIXES)


def demangle(name: str) -> str:
    """The name with gcc's per-build numbers masked: ``foo.constprop.3`` -> ``foo.constprop.#``."""
    return re.sub(r"\.\d+", ".#", name)


def cold_parent_name(name: str) -> str | None:
    """``foo.cold`` / ``foo.cold.3`` / ``foo.part.0.cold`` -> ``foo`` / ``foo.part.0``."""
    m = re.search(r"\.cold(\.\d+)?$", name)
    return name[:m.start()] if m else None


@dataclass(frozen=True, slots=True)
class Change:
    """Where a unit first differs from its twin, for tools that show the instructions there
    (``xsbuild explain``); :attr:`text` is the same in words."""

    kind: str  # "code" (bytes, relocated fields masked), "relocation" (a target) or "count"
    offset: int | None  # inside the unit; None for "count" (the number of relocations)
    text: str


@dataclass(slots=True, eq=False)
class Unit:
    """One function or data object of one side of the diff."""

    sym: Symbol
    side: str  # "orig" or "patched"
    twin: Unit | None = None
    status: str = SAME
    reason: str = ""
    change: Change | None = None  # set for CHANGED units whose own bytes or targets differ
    parent: Unit | None = None  # for .cold children
    children: list[Unit] = field(default_factory=list)
    fingerprint: bytes = b""
    ignored: bool = False  # listed in .livepatch.ignore.functions
    # For a unit the payload carries only because an included unit refers to it (a new static
    # helper, a string-holding static): that unit and the referring relocation's offset in it.
    pulled_by: Unit | None = None
    pulled_at: int = 0

    @property
    def name(self) -> str:
        return self.sym.name

    @property
    def sec(self) -> Section:
        assert self.sym.sec is not None
        return self.sym.sec

    @property
    def is_func(self) -> bool:
        return self.sym.type == STT_FUNC

    @property
    def xen_name(self) -> str:
        """The name of this unit (its original, for a patched unit) in the hypervisor's table."""
        sym = self.twin.sym if (self.side == "patched" and self.twin) else self.sym
        return xen_name(sym)

    def relocs(self) -> list[Reloc]:
        lo, hi = self.sym.value, self.sym.value + self.sym.size
        return [r for r in self.sec.relocs if lo <= r.offset < hi]

    def body(self) -> bytes:
        if self.sec.is_nobits:
            return b"\0" * self.sym.size
        return bytes(self.sec.data[self.sym.value:self.sym.value + self.sym.size])

    def __repr__(self) -> str:
        return f"<Unit {self.side} {self.name} {self.status}>"


def xen_name(sym: Symbol) -> str:
    """How Xen's symbol table names ``sym``: statics as ``<STT_FILE>#name`` (spec §7)."""
    if sym.is_local and sym.file:
        return f"{sym.file}#{sym.name}"
    return sym.name


@dataclass(slots=True)
class DiffResult:
    """What the diff decided, and the patched object it decided it about."""

    object: str
    orig: Elf
    patched: Elf
    units: list[Unit]  # patched side
    included: list[Unit]  # units the payload carries, in patched-object order
    hook_sections: list[Section]
    refused: list[str]
    notes: list[str] = field(default_factory=list)
    ends: InstructionEnds = field(default_factory=InstructionEnds)

    @property
    def changed_functions(self) -> list[Unit]:
        return [u for u in self.units if u.is_func and u.status == CHANGED and u.parent is None]

    @property
    def new_functions(self) -> list[Unit]:
        return [u for u in self.included if u.is_func and u.status == NEW]

    @property
    def new_data(self) -> list[Unit]:
        return [u for u in self.included if not u.is_func and u.status == NEW]

    @property
    def status(self) -> str:
        if self.refused:
            return "refused"
        return "changed" if (self.changed_functions or self.hook_sections
                             or any(u.sym.bind != 0 for u in self.included)) else "no-change"

    def to_json(self) -> dict[str, object]:
        def item(u: Unit, with_reason: bool = False) -> dict[str, object]:
            d: dict[str, object] = {"name": u.name, "xen_name": u.xen_name,
                                    "section": u.sec.name, "size": u.sym.size}
            if with_reason:
                d["reason"] = u.reason
            return d
        return {
            "schema": "xsbuild.diff/1",
            "object": self.object,
            "status": self.status,
            "changed_functions": [item(u, True) for u in self.changed_functions],
            "new_functions": [item(u) for u in self.new_functions],
            "new_data": [item(u) for u in self.new_data],
            "included": [item(u, True) | {"status": u.status} for u in self.included],
            "hooks": [s.name for s in self.hook_sections],
            "refused": [{"message": m} for m in self.refused],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------
# Driver


def diff_files(orig: str | os.PathLike[str], patched: str | os.PathLike[str],
               out: str | os.PathLike[str] | None = None, *,
               allow_new_statics: Iterable[str] = ()) -> DiffResult:
    """Diff two object files; when something changed, write the diff object to ``out``.

    Raises :class:`UnsupportedChangeError` when the change cannot be live-patched (nothing is
    written then), :class:`xsbuild.errors.UsageError` subclasses for bad input.
    """
    from xsbuild import extract
    from xsbuild.elf import elf_bytes, write_atomic

    result = diff_objects(read_elf(orig), read_elf(patched), label=str(patched),
                          allow_new_statics=allow_new_statics)
    if result.refused:
        raise UnsupportedChangeError(result.refused)
    if out is not None and result.status == "changed":
        write_atomic(out, elf_bytes(extract.extract(result, Path(out).name)))
    return result


def diff_objects(orig: Elf, patched: Elf, *, label: str = "",
                 allow_new_statics: Iterable[str] = ()) -> DiffResult:
    label = label or patched.path
    check_inputs(orig, patched, label)
    ignored_secs = ignored_sections(patched)
    orig_units, patched_units = list_units(orig), list_units(patched)
    ends = InstructionEnds()
    correlate(orig_units, patched_units, ends)
    fingerprint_all(orig_units)
    fingerprint_all(patched_units)
    mark_ignored_functions(patched, patched_units, ignored_secs)
    twins = classify(patched_units, ends)
    refused = find_refusals(label, patched_units, orig_units, ignored_secs,
                            set(allow_new_statics), ends, twins)
    hooks = [s for s in patched.sections
             if s.name.startswith(xen_abi.HOOK_PREFIX) and s.size]
    included, notes = choose_included(patched_units, hooks, ends)
    refused += unsupported_relocations(label, included)
    return DiffResult(object=label, orig=orig, patched=patched, units=patched_units,
                      included=included, hook_sections=hooks, refused=refused, notes=notes,
                      ends=ends)


# --------------------------------------------------------------------------------------------
# Step 1: inputs


def check_inputs(orig: Elf, patched: Elf, label: str) -> None:
    of, pf = orig.file_symbols(), patched.file_symbols()
    if not pf:
        raise InputMismatchError(f"{label}: no STT_FILE symbol: a stripped object, or assembly "
                                 "without a .file directive; xsbuild needs the compiler's object "
                                 "with its full symbol table")
    if of[:1] != pf[:1]:
        raise InputMismatchError(
            f"{label}: objects of different translation units: {of[0] if of else '(none)'!r} vs "
            f"{pf[0]!r}")
    for elf in (orig, patched):
        for sec in elf.sections:
            funcs = [s for s in sec.symbols if s.type == STT_FUNC]
            if sec.name == ".text" and len(funcs) > 1 and _compiled_from_c(elf):
                raise InputMismatchError(
                    f"{elf.path}: functions share section .text: build with "
                    "-ffunction-sections -fdata-sections (Xen does with CONFIG_LIVEPATCH)")


def _compiled_from_c(elf: Elf) -> bool:
    files = elf.file_symbols()
    return bool(files) and files[0].endswith(".c")


def list_units(elf: Elf) -> list[Unit]:
    units = []
    for sym in elf.symbols:
        if sym.sec is None or sym.type not in (STT_FUNC, STT_OBJECT) or not sym.name:
            continue
        if not sym.sec.is_alloc or sym.sec.name.startswith(xen_abi.HOOK_PREFIX):
            continue
        if sym.sec.name.startswith(IGNORED_SECTION_PREFIXES):
            continue
        units.append(Unit(sym=sym, side=""))
    by_name = {u.name: u for u in units}
    for u in units:
        parent = cold_parent_name(u.name)
        if parent and parent in by_name and u.is_func:
            u.parent = by_name[parent]
            by_name[parent].children.append(u)
    return units


# --------------------------------------------------------------------------------------------
# Step 3: correlation


def correlate(orig: list[Unit], patched: list[Unit], ends: InstructionEnds) -> None:
    """Link every patched unit to its original twin where one exists.

    Funnel, widest unique match first: exact name (with locality and type) for everything but
    numbered static locals; static locals by base name among the statics that the twins of their
    users use; clones and splits by demangled name.  Special statics stay uncorrelated.
    """
    for u in orig:
        u.side = "orig"
    for u in patched:
        u.side = "patched"
    _match_exact(orig, patched)
    _match_static_locals(orig, patched, ends)
    _match_demangled(orig, patched)


def _key(u: Unit) -> tuple[str, bool, int]:
    return (u.name, u.sym.is_local, u.sym.type)


def _is_numbered_static(u: Unit) -> bool:
    return (not u.is_func and u.sym.is_local and _STATIC_LOCAL_RE.match(u.name) is not None
            and not is_special_static(u.name))


def _match_exact(orig: list[Unit], patched: list[Unit]) -> None:
    def index(units: list[Unit]) -> dict[tuple[str, bool, int], list[Unit]]:
        out: dict[tuple[str, bool, int], list[Unit]] = {}
        for u in units:
            if not is_special_static(u.name) and not _is_numbered_static(u):
                out.setdefault(_key(u), []).append(u)
        return out
    oi, pi = index(orig), index(patched)
    for key, ps in pi.items():
        os_ = oi.get(key, [])
        if len(ps) == len(os_):  # unique, or duplicates matched by position (asm objects)
            for p, o in zip(ps, os_, strict=True):
                _link(o, p)


def _link(o: Unit, p: Unit) -> None:
    o.twin, p.twin = p, o


def _match_static_locals(orig: list[Unit], patched: list[Unit], ends: InstructionEnds) -> None:
    """gcc numbers function-scope statics per translation unit (``count.0``, ``count.1``); a new
    static earlier in the file renumbers the old ones.  Match by base name among the statics used
    by the twin of a unit that uses the patched one; several of one base name in one user (two
    ``warned`` flags of two ``printk_once`` in one function) by their order of first use.  Repeat
    until nothing moves, since statics are also used by statics (``__setup_str`` by ``__setup``).
    """
    p_statics = [u for u in patched if _is_numbered_static(u)]
    if not p_statics:
        return
    o_uses, p_uses = _uses(orig, ends), _uses(patched, ends)
    p_users = _invert(patched, p_uses)
    progress = True
    while progress:
        progress = False
        for p in p_statics:
            if p.twin is None:
                o = _static_twin(p, p_users, o_uses, p_uses)
                if o is not None:
                    _link(o, p)
                    progress = True
        # Statics nothing uses (a __setup entry found by walking its section): exact name.
        left_o = {o.name: o for o in orig if _is_numbered_static(o) and o.twin is None}
        for p in p_statics:
            if p.twin is None and p.name in left_o and not p_users.get(id(p)):
                _link(left_o.pop(p.name), p)
                progress = True


def _base(u: Unit) -> str:
    m = _STATIC_LOCAL_RE.match(u.name)
    return m.group("base") if m else u.name


def _static_twin(p: Unit, p_users: dict[int, list[Unit]], o_uses: dict[int, list[Unit]],
                 p_uses: dict[int, list[Unit]]) -> Unit | None:
    for user in p_users.get(id(p), []):
        if user.twin is None:
            continue
        mine = [s for s in p_uses[id(user)] if _is_numbered_static(s) and _base(s) == _base(p)]
        theirs = [s for s in o_uses.get(id(user.twin), [])
                  if _is_numbered_static(s) and _base(s) == _base(p)]
        free = [o for o in theirs if o.twin is None or o.twin is p]
        if len(free) == 1 and len(mine) - sum(s.twin is not None for s in mine) == 1:
            return free[0]
        if len(mine) == len(theirs):  # same statics in the same order of first use
            o = theirs[mine.index(p)]
            if o.twin is None:
                return o
    return None


def _uses(units: list[Unit], ends: InstructionEnds) -> dict[int, list[Unit]]:
    """Unit id -> the units it references, in order of first reference."""
    by_sym = {id(u.sym): u for u in units}
    uses: dict[int, list[Unit]] = {}
    for u in units:
        lst: list[Unit] = []
        for _r, t in unit_targets(u, ends):
            if t.kind == "sym" and t.sym is not None:
                v = by_sym.get(id(t.sym))
                if v is not None and v not in lst:
                    lst.append(v)
        uses[id(u)] = lst
    return uses


def _invert(units: list[Unit], uses: dict[int, list[Unit]]) -> dict[int, list[Unit]]:
    """Unit id -> the units that reference it."""
    users: dict[int, list[Unit]] = {}
    for u in units:
        for v in uses[id(u)]:
            users.setdefault(id(v), []).append(u)
    return users


def _match_demangled(orig: list[Unit], patched: list[Unit]) -> None:
    def index(units: list[Unit]) -> dict[tuple[str, int], list[Unit]]:
        out: dict[tuple[str, int], list[Unit]] = {}
        for u in units:
            if u.twin is None and _CLONE_RE.search(u.name) and not is_special_static(u.name):
                out.setdefault((demangle(u.name), u.sym.type), []).append(u)
        return out
    oi, pi = index(orig), index(patched)
    for key, ps in pi.items():
        os_ = oi.get(key, [])
        if len(ps) == 1 and len(os_) == 1:
            _link(os_[0], ps[0])


# --------------------------------------------------------------------------------------------
# Step 4: fingerprints and classification


@dataclass(slots=True)
class TwinNames:
    """Patched-side unit symbol id -> its original twin's name ("" for a new unit)."""

    names: dict[int, str]

    @classmethod
    def of(cls, patched: list[Unit]) -> TwinNames:
        return cls({id(u.sym): (u.twin.name if u.twin else "") for u in patched})


def fingerprint_all(units: list[Unit]) -> None:
    for u in units:
        u.fingerprint = fingerprint(u)


def pc_adjust(u: Unit, r: Reloc, ends: InstructionEnds) -> int:
    """``insn_end - r_offset`` for a PC-relative field of an instruction of ``u`` (the addend of
    ``call helper`` is -4, its target ``helper+0``); 0 for everything else."""
    if u.sec.is_text and r.type in (xen_abi.R_X86_64_PC32, xen_abi.R_X86_64_PLT32):
        return ends.pc_adjust(u.sec, u.sym.value, u.sym.end, r.offset, field_width(r.type))
    return 0


def unit_targets(u: Unit, ends: InstructionEnds) -> list[tuple[Reloc, Target]]:
    """Every relocation inside ``u`` with what it points at."""
    return [(r, target_of(r, pc_adjust(u, r, ends))) for r in u.relocs()]


def canonical(t: Target, side: str, twins: TwinNames) -> tuple[object, ...]:
    """A target as both sides can agree on: patched-side symbols by their twin's name."""
    if t.kind == "sym":
        sym = t.sym
        assert sym is not None
        name = sym.name
        if is_special_static(name):
            name = "special:" + demangle(name)
        elif side == "patched" and id(sym) in twins.names:
            name = twins.names[id(sym)] or "new:" + name
        return ("sym", name, t.delta)
    if t.kind in ("string", "const"):
        return (t.kind, t.content, t.delta)
    assert t.section is not None
    return ("anon", t.section.name, t.delta,
            hashlib.blake2b(bytes(t.section.data), digest_size=8).digest())




def _masked_body(u: Unit) -> bytes:
    body = bytearray(u.body())
    for r in u.relocs():
        off = r.offset - u.sym.value
        width = field_width(r.type)
        body[off:off + width] = b"\0" * min(width, len(body) - off)
    return bytes(body)


def fingerprint(u: Unit) -> bytes:
    """Digest of a unit's bytes with every relocated field zeroed: the cheap first comparison.
    Relocations are compared afterwards (:func:`reloc_keys`), once twins are known, so that a
    renumbered static or a renamed clone compares equal."""
    h = hashlib.blake2b(digest_size=16)
    h.update(u.sym.size.to_bytes(8, "little"))
    h.update(_masked_body(u))
    return h.digest()


def reloc_keys(u: Unit, ends: InstructionEnds, twins: TwinNames) -> list[tuple[object, ...]]:
    """Each relocation of ``u`` as (offset in unit, type, canonical target)."""
    return [(r.offset - u.sym.value, r.type, *canonical(t, u.side, twins))
            for r, t in unit_targets(u, ends)]


def classify(patched: list[Unit], ends: InstructionEnds) -> TwinNames:
    twins = TwinNames.of(patched)
    for u in patched:
        if u.twin is None:
            u.status, u.reason = NEW, "new"
            continue
        if u.ignored:
            u.status, u.reason = SAME, "ignored (.livepatch.ignore.functions/.sections)"
            continue
        u.change = first_difference(u.twin, u, ends, twins)
        u.reason = u.change.text if u.change else ""
        u.status = CHANGED if u.change else SAME
    # A changed .cold part is only reached through its parent: the parent must be replaced.
    for u in patched:
        if u.parent is not None and u.status == CHANGED and u.parent.status == SAME \
                and not u.parent.ignored:
            u.parent.status = CHANGED
            u.parent.reason = f"its cold part {u.name} changed: {u.reason}"
    return twins


def first_difference(o: Unit, p: Unit, ends: InstructionEnds,
                     twins: TwinNames) -> Change | None:
    """Where ``p`` first differs from its twin ``o``; None when they are the same."""
    what = "code" if p.is_func else "contents"
    if o.fingerprint != p.fingerprint:
        ob, pb = _masked_body(o), _masked_body(p)
        at = next((i for i, (a, b) in enumerate(zip(ob, pb, strict=False)) if a != b),
                  min(len(ob), len(pb)))
        size = f" (size {o.sym.size:#x} -> {p.sym.size:#x})" if o.sym.size != p.sym.size else ""
        return Change("code", at, f"{what} differs at +{at:#x}{size}")
    ok, pk = reloc_keys(o, ends, twins), reloc_keys(p, ends, twins)
    for a, b, ro, rp in zip(ok, pk, o.relocs(), p.relocs(), strict=False):
        if a != b:
            new, old = _describe(b, pc_adjust(p, rp, ends)), _describe(a, pc_adjust(o, ro, ends))
            return Change("relocation", int(b[0]),  # type: ignore[call-overload]
                          f"relocation at +{b[0]:#x} now points to {new} (was {old})")
    if len(ok) != len(pk):
        return Change("count", None, f"relocations differ ({len(ok)} -> {len(pk)})")
    return None


def _describe(key: tuple[object, ...], pc: int) -> str:
    """A canonical target in words; ``pc`` turns a PC-relative addend into the real offset."""
    kind = key[2]
    if kind in ("string", "const"):
        content = key[3]
        assert isinstance(content, bytes)
        text = content.rstrip(b"\0").decode("utf-8", "replace")
        return f"string {text!r}" if kind == "string" else f"constant {content.hex()}"
    name, delta = key[3], int(key[4]) + pc  # type: ignore[call-overload]
    return f"{name}{delta:+#x}" if delta else str(name)


# --------------------------------------------------------------------------------------------
# Ignore marks (.livepatch.ignore.functions / .sections)


def _pointer_targets(elf: Elf, secname: str) -> list[Target]:
    sec = elf.section(secname)
    if sec is None:
        return []
    return [target_of(r) for r in sec.relocs if r.type == xen_abi.R_X86_64_64]


def ignored_sections(patched: Elf) -> set[str]:
    return {t.content.rstrip(b"\0").decode() for t in
            _pointer_targets(patched, xen_abi.SEC_IGNORE_SECTIONS) if t.kind == "string"}


def mark_ignored_functions(patched: Elf, units: list[Unit], ignored_secs: set[str]) -> None:
    """Units named in ``.livepatch.ignore.functions`` or living in a section named in
    ``.livepatch.ignore.sections`` count as unchanged, whatever their bytes say."""
    for u in units:
        if u.sec.name in ignored_secs:
            u.ignored = True
    by_sym = {id(u.sym): u for u in units}
    for t in _pointer_targets(patched, xen_abi.SEC_IGNORE_FUNCTIONS):
        if t.kind == "sym" and t.sym is not None and id(t.sym) in by_sym:
            u = by_sym[id(t.sym)]
            u.ignored = True
            for child in u.children:
                child.ignored = True


# --------------------------------------------------------------------------------------------
# Step 5: refusals


def find_refusals(label: str, units: list[Unit], orig: list[Unit], ignored_secs: set[str],
                  allow_new_statics: set[str], ends: InstructionEnds,
                  twins: TwinNames) -> list[str]:
    """Every reason the change cannot be live-patched (collected, not raised one by one)."""
    problems = []
    for u in units:
        where = f"{label}: {u.sec.name}: {u.name}"
        if u.sec.name in ignored_secs:
            continue
        if is_init_section(u.sec.name) and u.status != SAME:
            what = "function" if u.is_func else "data"
            problems.append(f"{where}: {u.status} __init {what} cannot be live-patched (init code "
                            "and data ran at boot and were freed); put the fix in a runtime "
                            "function or mark the section in .livepatch.ignore.sections")
        elif not u.is_func and u.status == CHANGED and not is_special_static(u.name):
            kind = ("read-only data" if not u.sec.is_writable else
                    "zero-initialised data (bss)" if u.sec.is_nobits else "initialised data")
            problems.append(f"{where}: changed {kind} cannot be live-patched ({u.reason}): the "
                            "running hypervisor keeps the old value; use a new variable and a "
                            "load hook instead")
    problems += _uncorrelated_statics(label, units, orig, allow_new_statics, ends, twins)
    return problems


def _uncorrelated_statics(label: str, units: list[Unit], orig: list[Unit], allow: set[str],
                          ends: InstructionEnds, twins: TwinNames) -> list[str]:
    """A static local used by a *changed* function but without an original twin starts from its
    initial value in the payload while the old one keeps its state.  That is refused when some
    old state could have been its twin: the changed function's original used a static that is
    now left without a counterpart, or an uncorrelated old static has the same base name (a
    rename or a correlation xsbuild could not make).  A static nothing old can claim (inlined
    from a new function, say) is new.  ``--new-static`` accepts one explicitly."""
    problems = []
    orphans = [o for o in orig if _is_numbered_static(o) and o.twin is None]
    orphan_bases = {_base(o) for o in orphans}
    for u in units:
        if u.status != CHANGED or not u.is_func or u.twin is None:
            continue
        lost = [o.name for o in orphans if _references(u.twin, o, ends)]
        for _r, t in unit_targets(u, ends):
            s = t.sym
            if t.kind != "sym" or s is None or s.sec is None or not s.is_local:
                continue
            m = _STATIC_LOCAL_RE.match(s.name)
            if s.type != STT_OBJECT or m is None or is_special_static(s.name):
                continue
            if twins.names.get(id(s)) or s.name in allow or m.group("base") in allow:
                continue
            if not lost and m.group("base") not in orphan_bases:
                continue
            why = (f"the original {u.name} used {', '.join(lost)}, which has no counterpart now"
                   if lost else f"an old static {m.group('base')} has no counterpart")
            msg = (f"{label}: {s.sec.name}: {s.name}: static local used by changed function "
                   f"{u.name} has no counterpart in the original object ({why}); its state "
                   f"would restart from its initial value. If it is really new, allow it with "
                   f"--new-static {s.name}")
            if msg not in problems:
                problems.append(msg)
    return problems


def _references(u: Unit, target: Unit, ends: InstructionEnds) -> bool:
    return any(t.kind == "sym" and t.sym is target.sym for _r, t in unit_targets(u, ends))


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
# Step 6: inclusion


def choose_included(units: list[Unit], hooks: list[Section],
                    ends: InstructionEnds) -> tuple[list[Unit], list[str]]:
    """The units the payload carries: changed functions (with their cold parts), new global
    things, hook targets, and every new unit or special static they reach.  SAME units stay in
    the hypervisor and are referenced by name."""
    by_sym = {id(u.sym): u for u in units}
    chosen: dict[int, Unit] = {}
    work = [u for u in units if (u.status == CHANGED and u.is_func)
            or (u.status == NEW and not u.sym.is_local and not is_init_section(u.sec.name))]
    for sec in hooks:  # hook functions are reached through the hook sections' pointers
        for r in sec.relocs:
            t = target_of(r)
            if t.kind == "sym" and t.sym is not None and id(t.sym) in by_sym:
                work.append(by_sym[id(t.sym)])
    roots = {id(u.sym) for u in work}
    while work:
        u = work.pop()
        if id(u.sym) in chosen:
            continue
        chosen[id(u.sym)] = u
        work.extend(u.children)
        for r, t in unit_targets(u, ends):
            if t.kind != "sym" or t.sym is None:
                continue
            v = by_sym.get(id(t.sym))
            if v is not None and needs_copy(v):
                if v.pulled_by is None and id(v.sym) not in roots:  # first reference found
                    v.pulled_by, v.pulled_at = u, r.offset - u.sym.value
                work.append(v)
    included = [u for u in units if id(u.sym) in chosen]
    notes = [f"new function {u.name} is not used by any change and is left out"
             for u in units if u.is_func and u.status == NEW and id(u.sym) not in chosen
             and u.sym.is_local]
    return included, notes


def needs_copy(u: Unit) -> bool:
    """Must this unit travel in the payload when an included unit refers to it?"""
    if u.status in (NEW, CHANGED) or is_special_static(u.name):
        return True
    if u.parent is not None:  # a cold part goes with its parent
        return u.parent.status != SAME
    # Unchanged read-only statics are copied: constant, so a copy is exact, and Xen's table need
    # not hold them (gcc may have merged them away).
    return not u.is_func and u.sym.is_local and not u.sec.is_writable and not u.sec.is_nobits
