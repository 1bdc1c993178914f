"""The differ's model: units of both objects, the links between them, and the context every pass
reads and fills.

In the manner of objtool's klp-diff, which keeps ``twin`` (orig <-> patched) and ``clone``
(patched -> output) on ``struct symbol``, a :class:`Unit` carries its links itself; the passes
(:mod:`~xsbuild.diff.correlate`, :mod:`~xsbuild.diff.compare`, :mod:`~xsbuild.diff.select`,
:mod:`~xsbuild.diff.clone`) take one :class:`DiffContext` and leave their results on it, so
``xsbuild explain`` reads what the differ decided instead of deciding again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from xsbuild import xen_abi
from xsbuild.elf import STT_FUNC, Elf, Reloc, Section, Symbol
from xsbuild.relocs import (
    InstructionEnds,
    Target,
    by_symbol,
    field_width,
    owned_end,
    target_of,
)


class Status(StrEnum):
    """What the differ decided about one unit (``removed``: only the original has it)."""

    SAME = "same"
    CHANGED = "changed"
    NEW = "new"
    REMOVED = "removed"


class Side(StrEnum):
    ORIG = "orig"
    PATCHED = "patched"


class ChangeKind(StrEnum):
    """Where a unit first differs: its bytes (relocated fields masked), the target of one of its
    relocations, or the number of relocations."""

    CODE = "code"
    RELOCATION = "relocation"
    COUNT = "count"


class Outcome(StrEnum):
    """The diff's verdict on the whole object (``xsbuild diff`` exit 0, 3 or 1)."""

    CHANGED = "changed"
    NO_CHANGE = "no-change"
    REFUSED = "refused"


# Statics the compiler makes for its own purposes; never correlated, always carried fresh when an
# included function uses them (kpatch and klp-diff keep similar lists).  ``__func__.3`` holds the
# function's name for messages: a copy is as good as the original.
SPECIAL_STATIC_PREFIXES = ("__func__.", "__PRETTY_FUNCTION__.", "__FUNCTION__.", "CSWTCH.")

# Sections whose contents never reach a payload and whose changes mean nothing to one.
IGNORED_SECTION_PREFIXES = (".comment", ".note", ".discard", ".debug", ".eh_frame", ".group",
                            xen_abi.SEC_IGNORE_FUNCTIONS, xen_abi.SEC_IGNORE_SECTIONS)

# gcc's clone and split suffixes: ``foo.isra.0``, ``foo.constprop.3``, ``foo.part.1``,
# ``foo.cold``, ``foo.cold.7``; the numbers change between builds of the same function.
CLONE_RE = re.compile(r"\.(isra|constprop|part|cold|lto_priv|localalias)(\.\d+)?")
STATIC_LOCAL_RE = re.compile(r"^(?P<base>[A-Za-z_$][\w$]*)\.(?P<num>\d+)$")


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


def xen_name(sym: Symbol) -> str:
    """How Xen's symbol table names ``sym``: statics as ``<STT_FILE>#name`` (spec §7)."""
    if sym.is_local and sym.file:
        return f"{sym.file}#{sym.name}"
    return sym.name


@dataclass(frozen=True, slots=True)
class Change:
    """Where a unit first differs from its twin, for tools that show the instructions there
    (``xsbuild explain``); :attr:`text` is the same in words."""

    kind: ChangeKind
    offset: int | None  # inside the unit; None for COUNT (the number of relocations)
    text: str


@dataclass(slots=True, eq=False)
class Unit:
    """One function or data object of one side of the diff (hashable by identity)."""

    sym: Symbol
    side: Side
    twin: Unit | None = None  # the other side's unit (correlate)
    clone: Symbol | None = None  # this unit's symbol in the diff object (clone)
    status: Status = Status.SAME
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
        sym = self.twin.sym if (self.side == Side.PATCHED and self.twin) else self.sym
        return xen_name(sym)

    @property
    def end(self) -> int:
        """Where the bytes this unit owns stop (a function's may go on past its symbol:
        :func:`xsbuild.relocs.owned_end`)."""
        return owned_end(self.sym)

    def relocs(self) -> list[Reloc]:
        lo, hi = self.sym.value, self.end
        return [r for r in self.sec.relocs if lo <= r.offset < hi]

    def body(self) -> bytes:
        if self.sec.is_nobits:
            return b"\0" * self.sym.size
        return bytes(self.sec.data[self.sym.value:self.end])

    def __repr__(self) -> str:
        return f"<Unit {self.side} {self.name} {self.status}>"


def pc_adjust(u: Unit, r: Reloc, ends: InstructionEnds) -> int:
    """``insn_end - r_offset`` for a PC-relative field of an instruction of ``u`` (the addend of
    ``call helper`` is -4, its target ``helper+0``); 0 for everything else."""
    if u.sec.is_text and xen_abi.is_pc_relative(r.type):
        return ends.pc_adjust(u.sec, u.sym.value, u.end, r.offset, field_width(r.type))
    return 0


def unit_targets(u: Unit, ends: InstructionEnds) -> list[tuple[Reloc, Target]]:
    """Every relocation inside ``u`` with what it points at.  A relocation against a named
    symbol points at it whatever the instruction: only the others make the decoder run."""
    return [(r, target_of(r, 0 if by_symbol(r) else pc_adjust(u, r, ends))) for r in u.relocs()]


@dataclass(slots=True)
class DiffContext:
    """Everything the passes read and decide about one pair of objects.

    ``units`` is the patched side (the one the payload is cut from), ``orig_units`` the original;
    ``unit_of`` finds a patched unit by its symbol (one index, built once); ``ends`` is the
    instruction decoder's cache, shared by every pass and by :mod:`~xsbuild.diff.clone`.
    """

    object: str  # the label messages name the object by (the patched path)
    orig: Elf
    patched: Elf
    orig_units: list[Unit] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    unit_of: dict[Symbol, Unit] = field(default_factory=dict)
    orig_unit_of: dict[Symbol, Unit] = field(default_factory=dict)
    ends: InstructionEnds = field(default_factory=InstructionEnds)
    ignored_sections: set[str] = field(default_factory=set)
    allow_new_statics: set[str] = field(default_factory=set)
    included: list[Unit] = field(default_factory=list)  # in patched-object order
    hook_sections: list[Section] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Changed read-only tables select judged (carried with their readers, or refused naming the
    # reader that cannot be replaced): the generic changed-data refusal leaves them alone.
    tables: list[Unit] = field(default_factory=list)
    out: Elf | None = None  # the diff object, once cloned

    def targets(self, u: Unit) -> list[tuple[Reloc, Target]]:
        return unit_targets(u, self.ends)

    @property
    def changed_functions(self) -> list[Unit]:
        return [u for u in self.units
                if u.is_func and u.status == Status.CHANGED and u.parent is None]

    @property
    def new_functions(self) -> list[Unit]:
        return [u for u in self.included if u.is_func and u.status == Status.NEW]

    @property
    def new_data(self) -> list[Unit]:
        return [u for u in self.included if not u.is_func and u.status == Status.NEW]

    @property
    def removed(self) -> list[Unit]:
        """Units of the original without a twin in the patched object."""
        return [u for u in self.orig_units if u.twin is None]

    @property
    def status(self) -> Outcome:
        if self.refused:
            return Outcome.REFUSED
        return Outcome.CHANGED if (self.changed_functions or self.hook_sections
                                   or any(u.sym.bind != 0 for u in self.included)) \
            else Outcome.NO_CHANGE

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
            "status": str(self.status),
            "changed_functions": [item(u, True) for u in self.changed_functions],
            "new_functions": [item(u) for u in self.new_functions],
            "new_data": [item(u) for u in self.new_data],
            "included": [item(u, True) | {"status": str(u.status)} for u in self.included],
            "hooks": [s.name for s in self.hook_sections],
            "refused": [{"message": m} for m in self.refused],
            "notes": list(self.notes),
        }


# The name the differ's result had before it became the passes' shared context.
DiffResult = DiffContext
