"""Talking to the hypervisor's livepatch sysctl: ABI (:mod:`.abi`), backends, transports.

``open_backend`` picks one: ``privcmd`` (dom0, the real hypervisor), ``libxc`` (the same through
Xen's libxenctrl), ``sim`` (the simulator of :mod:`.sim`, state kept in a file) or ``auto``
(privcmd when ``/dev/xen/privcmd`` exists).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from xsbuild.errors import UsageError
from xsbuild.hypercall.backend import (
    Backend,
    PayloadEntry,
    Status,
    SysctlBackend,
    action_name,
    hypercall_error,
    state_name,
)

BACKENDS = ("auto", "privcmd", "libxc", "sim")

__all__ = ["BACKENDS", "Backend", "BackendChoice", "PayloadEntry", "Status", "SysctlBackend",
           "action_name", "hypercall_error", "open_backend", "state_name"]


@dataclass(frozen=True, slots=True)
class BackendChoice:
    """Which backend to open, straight from the command line."""

    kind: str = "auto"
    sim_state: str | None = None
    sim_xen_syms: str | None = None


def open_backend(choice: BackendChoice, env: Mapping[str, str] | None = None) -> Backend:
    """Open the backend ``choice`` names; raises ``UsageError`` when it cannot be used here."""
    from xsbuild.hypercall import privcmd, sim

    env = os.environ if env is None else env
    kind = choice.kind
    if kind == "auto":
        if privcmd.privcmd_available():
            kind = "privcmd"
        elif choice.sim_state or env.get(sim.ENV_STATE):
            kind = "sim"
        else:
            raise UsageError("no hypervisor here (/dev/xen/privcmd is missing): run in a "
                             "Xen dom0, or use --backend sim --sim-state FILE to simulate one")
    if kind == "privcmd":
        return SysctlBackend(privcmd.PrivcmdTransport())
    if kind == "libxc":
        from xsbuild.hypercall.libxc import LibxcBackend

        return LibxcBackend()
    if kind == "sim":
        path = choice.sim_state or env.get(sim.ENV_STATE)
        if not path:
            raise UsageError(f"--backend sim needs --sim-state FILE (or ${sim.ENV_STATE})")
        return SysctlBackend(sim.SimTransport(path, choice.sim_xen_syms, env))
    raise UsageError(f"unknown backend {choice.kind!r}; choose one of {', '.join(BACKENDS)}")
