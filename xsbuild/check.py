"""Validate a payload offline, the way Xen 4.17's loader will at UPLOAD (spec §1 and §2).

Public interface (used by the CLI, the simulator and ``build``):

* :func:`check_payload` ``(data, xen_syms=None, loaded=()) -> CheckReport``
* :class:`CheckReport`: ``problems`` (each with the errno Xen would return), ``ok``, and ``info``
  (what the simulator and ``inspect`` need: build-ids, funcs, hooks, new symbols, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from xsbuild import xen_abi


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason the hypervisor would reject the payload."""

    errno: int  # positive Xen errno value, e.g. xen_abi.EINVAL
    message: str

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

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_errno(self) -> int:
        """The errno Xen would return: that of the first problem in load order (0 if ok)."""
        return self.problems[0].errno if self.problems else 0


def check_payload(data: bytes, xen_syms: object | None = None,
                  loaded: Iterable[PayloadInfo] = ()) -> CheckReport:
    """Check payload bytes as Xen's UPLOAD would; ``loaded`` are payloads already uploaded
    (their new symbols and build-ids take part in the -EEXIST checks)."""
    raise NotImplementedError  # written in the core-compiler work
