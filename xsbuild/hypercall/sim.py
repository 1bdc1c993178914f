"""A simulated Xen livepatch hypervisor (4.17 to 4.21), reached through the same sysctl encoding.

:class:`SimTransport` is a :class:`~xsbuild.hypercall.backend.Transport`: it receives the address
of a ``struct xen_sysctl`` exactly as privcmd would, decodes it with the ctypes structures of
:mod:`.abi`, runs the op on :class:`SimHypervisor` and writes the results back into the caller's
buffers.  So ``--backend sim`` exercises the whole tool, ABI encoding included, without Xen.

State lives in a JSON file between invocations (``--sim-state`` or ``XSBUILD_SIM_STATE``), guarded
by ``flock`` on its folder and replaced atomically.  What is modelled (spec §2, §3.2, §4.2):

* UPLOAD: name/size checks (-EINVAL), same name (-EEXIST), payload validation through
  ``xsbuild.check.check_payload`` (a minimal note reader until that lands), xen_depends against the
  hypervisor build-id (-EINVAL), a duplicate build-id (-EEXIST); ``payload_version`` counting.
* States CHECKED/APPLIED and the applied stack: only the top can be reverted (-EBUSY);
  ``.livepatch.depends`` must match the hypervisor or the last applied payload (NODEPS skips it);
  REPLACE reverts everything newest first, needs depends == hypervisor, and refuses vetoing hooks
  (-EOPNOTSUPP); re-apply after revert without ``safe_to_reapply`` sets rc -EINVAL but returns 0;
  UNLOAD only from CHECKED; REVERT/APPLY in the wrong state return 0 and do nothing; APPLY
  refused (-EBUSY) while a vCPU sits on a vm_event wait queue.
* Asynchronous actions: ACTION sets rc -EAGAIN; the work runs on a later GET/LIST (after
  ``completion_polls`` of them; -1: never, to test a stuck action).  It is a rendezvous of N CPUs,
  each with an arrival delay: if the slowest exceeds the timeout (0 = 30 ms) the result is -EBUSY
  and nothing changes.  One action at a time system-wide (-EBUSY).
* LIST: the nr=0 probe, paging with idx/nr, -E2BIG, -EINVAL for idx past the end, a version counter,
  and interface 0x16's IN/OUT buffer sizes with -ENOBUFS.
* An interface version mismatch gives -EACCES, so the client's detection is exercised.
* The release (``xen_version``, default 4.17.5) selects what differs (:mod:`xsbuild.xen_versions`):
  the sysctl interface (0x15, 0x16 from 4.21 with LIST's IN sizes and -ENOBUFS), the op's
  ``flags`` (FORCE from 4.19; before, a non-zero pad is -EINVAL), the loader's order (xen_depends
  first from 4.18.4/4.19.1/4.20) and every other loader rule, through ``check_payload``.
  ``XENVER_version``/``XENVER_extraversion`` answer with it.

Configuration (state file ``config``, overridden per run by the environment):
``XSBUILD_SIM_CPU_DELAYS`` (comma-separated arrival delays, ns or with a ``us``/``ms`` suffix),
``XSBUILD_SIM_POLLS`` (GETs before work completes), ``XSBUILD_SIM_XEN_VERSION`` (4.17.5,
4.19.6, 4.21.2, ...), ``XSBUILD_SIM_INTERFACE`` (0x15 or 0x16, overriding the release's) and
``XSBUILD_SIM_WAITQUEUE=1`` (a vCPU waits on a vm_event queue: APPLY gets -EBUSY).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xsbuild import xen_abi
from xsbuild.check import FuncInfo, PayloadInfo
from xsbuild.errors import UsageError
from xsbuild.hypercall import abi
from xsbuild.hypercall.backend import parse_duration_ns
from xsbuild.xen_versions import Rule, Target, VersionSource, XenVersion
from xsbuild.xensyms import read_build_id

STATE_FORMAT = 1
ENV_STATE = "XSBUILD_SIM_STATE"
ENV_CPU_DELAYS = "XSBUILD_SIM_CPU_DELAYS"
ENV_POLLS = "XSBUILD_SIM_POLLS"
ENV_INTERFACE = "XSBUILD_SIM_INTERFACE"
ENV_XEN_VERSION = "XSBUILD_SIM_XEN_VERSION"
DEFAULT_XEN_VERSION = "4.17.5"  # Debian bookworm's (spec §0)
ENV_WAITQUEUE = "XSBUILD_SIM_WAITQUEUE"
CONSOLE_LINES = 200  # how much of the simulated `xl dmesg` the state keeps


class XenError(Exception):
    """A hypercall result of ``-errno`` inside the simulator."""

    def __init__(self, errno_value: int, message: str = "") -> None:
        super().__init__(message or xen_abi.errno_name(errno_value))
        self.errno_value = errno_value


# ------------------------------------------------------------------------------------------------
# Model


@dataclass(slots=True)
class SimConfig:
    """How the simulated host behaves."""

    cpu_delays_ns: list[int] = field(default_factory=lambda: [0, 20_000])  # 2 CPUs, 20 us apart
    completion_polls: int = 1  # GET/LIST calls after ACTION before the work runs; -1: never
    interface_version: int | None = None  # None: the release's (0x15; 0x16 from 4.21)
    xen_version: str = DEFAULT_XEN_VERSION
    # A domain has a vCPU on a vm_event wait queue: arch_livepatch_safety_check refuses APPLY
    # (and the apply half of REPLACE) with -EBUSY, inside the rendezvous (spec §3.2 item 7).
    active_waitqueue: bool = False

    @property
    def target(self) -> Target:
        return Target(XenVersion.parse(self.xen_version), VersionSource.SIMULATOR, True)

    @property
    def interface(self) -> int:
        if self.interface_version is not None:
            return self.interface_version
        return self.target.interface_version


@dataclass(slots=True)
class SimPayload:
    """One uploaded payload, with what the loader learnt from it."""

    name: str
    info: PayloadInfo
    state: int = xen_abi.LIVEPATCH_STATE_CHECKED
    rc: int = 0
    reverted: bool = False


@dataclass(slots=True)
class SimWork:
    """The one scheduled action (``livepatch_work``)."""

    name: str
    cmd: int
    timeout_ns: int
    flags: int
    polls_left: int


@dataclass(slots=True)
class SimState:
    """Everything the simulated hypervisor remembers."""

    build_id: bytes
    xen_syms: str | None = None
    config: SimConfig = field(default_factory=SimConfig)
    payload_version: int = 1
    payloads: list[SimPayload] = field(default_factory=list)  # upload order
    applied: list[str] = field(default_factory=list)  # apply order; the last is the top
    work: SimWork | None = None
    console: list[str] = field(default_factory=list)


def default_timeout(timeout_ns: int) -> int:
    return timeout_ns or xen_abi.DEFAULT_ACTION_TIMEOUT_NS


class SimHypervisor:
    """The livepatch subsystem of Xen 4.17, as state transitions on :class:`SimState`."""

    def __init__(self, state: SimState, config: SimConfig | None = None) -> None:
        self.state = state
        self.config = config or state.config

    # ---------------------------------------------------------------- helpers
    def log(self, message: str) -> None:
        self.state.console = [*self.state.console, f"livepatch: {message}"][-CONSOLE_LINES:]

    def find(self, name: str) -> SimPayload:
        for p in self.state.payloads:
            if p.name == name:
                return p
        raise XenError(xen_abi.ENOENT, f"{name}: no such payload")

    def _top_build_id(self) -> bytes:
        if self.state.applied:
            return self.find(self.state.applied[-1]).info.build_id
        return self.state.build_id

    # ---------------------------------------------------------------- UPLOAD
    def upload(self, name: str, data: bytes) -> None:
        if not 0 < len(data) <= xen_abi.LIVEPATCH_MAX_SIZE:
            raise XenError(xen_abi.EINVAL, f"payload size {len(data)}")
        if any(p.name == name for p in self.state.payloads):
            raise XenError(xen_abi.EEXIST, f"{name}: a payload with this name exists")
        loaded = [p.info for p in self.state.payloads]
        info = validate_payload(data, self.state.xen_syms, loaded, self.state.build_id,
                                self.config.target)
        for p in self.state.payloads:
            if p.info.build_id == info.build_id:
                raise XenError(xen_abi.EEXIST, f"{name}: build-id already used by {p.name}")
        self.state.payloads.append(SimPayload(name, info))
        self.state.payload_version += 1
        self.log(f"{name}: loaded")

    # ---------------------------------------------------------------- GET
    def get(self, name: str) -> tuple[int, int]:
        self.progress()
        p = self.find(name)
        return p.state, p.rc

    # ---------------------------------------------------------------- ACTION
    def action(self, name: str, cmd: int, timeout_ns: int, flags: int) -> int:
        p = self.find(name)
        if self.state.work is not None:
            raise XenError(xen_abi.EBUSY, f"{self.state.work.name}: action pending")
        handler = {xen_abi.LIVEPATCH_ACTION_UNLOAD: self._unload,
                   xen_abi.LIVEPATCH_ACTION_REVERT: self._revert,
                   xen_abi.LIVEPATCH_ACTION_APPLY: self._apply,
                   xen_abi.LIVEPATCH_ACTION_REPLACE: self._replace}.get(cmd)
        if handler is None:
            raise XenError(xen_abi.EOPNOTSUPP, f"action {cmd}")
        return handler(p, cmd, timeout_ns, flags)

    def _schedule(self, p: SimPayload, cmd: int, timeout_ns: int, flags: int) -> int:
        p.rc = -xen_abi.EAGAIN
        self.state.work = SimWork(p.name, cmd, timeout_ns, flags, self.config.completion_polls)
        return 0

    def _unload(self, p: SimPayload, cmd: int, timeout_ns: int, flags: int) -> int:
        if p.state != xen_abi.LIVEPATCH_STATE_CHECKED:
            raise XenError(xen_abi.EINVAL, f"{p.name}: can't unload an applied payload")
        self.state.payloads.remove(p)
        self.state.payload_version += 1
        self.log(f"{p.name}: unloaded")
        return 0

    def _revert(self, p: SimPayload, cmd: int, timeout_ns: int, flags: int) -> int:
        if p.state != xen_abi.LIVEPATCH_STATE_APPLIED:
            return 0  # quirk: wrong state is not an error, and rc is left alone
        if self.state.applied[-1] != p.name:
            self.log(f"{p.name}: can't unload. Top is {self.state.applied[-1]}")
            raise XenError(xen_abi.EBUSY, f"top is {self.state.applied[-1]}")
        return self._schedule(p, cmd, timeout_ns, flags)

    def _apply(self, p: SimPayload, cmd: int, timeout_ns: int, flags: int) -> int:
        if p.state != xen_abi.LIVEPATCH_STATE_CHECKED:
            return 0
        if p.reverted and not p.info.safe_to_reapply:
            self.log(f"{p.name}: can't revert as payload has .data. Please unload")
            p.rc = -xen_abi.EINVAL  # quirk: the hypercall itself succeeds
            return 0
        if not flags & xen_abi.LIVEPATCH_ACTION_APPLY_NODEPS:
            self._check_depends(p, self._top_build_id())
        return self._schedule(p, cmd, timeout_ns, flags)

    def _replace(self, p: SimPayload, cmd: int, timeout_ns: int, flags: int) -> int:
        if p.state != xen_abi.LIVEPATCH_STATE_CHECKED:
            return 0
        self._check_depends(p, self.state.build_id)  # NODEPS is ignored for REPLACE
        vetoing = [q.name for q in (p, *map(self.find, self.state.applied))
                   if q.info.has_vetoing_hooks]
        if vetoing:
            self.log(f"{p.name}: REPLACE refused, pre/post hooks in {', '.join(vetoing)}")
            raise XenError(xen_abi.EOPNOTSUPP, "pre/post hooks veto REPLACE")
        return self._schedule(p, cmd, timeout_ns, flags)

    def _check_depends(self, p: SimPayload, want: bytes) -> None:
        if p.info.depends != want:
            owner = self.state.applied[-1] if want != self.state.build_id else "hypervisor"
            self.log(f"{p.name}: check against {owner} build-id failed")
            raise XenError(xen_abi.EINVAL, f"depends does not match {owner}")

    # ---------------------------------------------------------------- the rendezvous
    def progress(self) -> None:
        """Let time pass: run the scheduled work once enough GET/LIST calls have been made."""
        work = self.state.work
        if work is None:
            return
        if work.polls_left < 0:  # a stuck action: it stays stuck while the config says so
            if self.config.completion_polls < 0:
                return
            work.polls_left = 1
        if work.polls_left > 0:
            work.polls_left -= 1
            if work.polls_left > 0:
                return
        self.state.work = None
        self._run(work)

    def _run(self, work: SimWork) -> None:
        p = self.find(work.name)
        timeout = default_timeout(work.timeout_ns)
        delays = self.config.cpu_delays_ns or [0]
        arrived = sum(1 for d in delays[1:] if d <= timeout)
        verb = backend_verb(work.cmd)
        if max(delays) > timeout:
            self.log(f"{p.name}: Timed out on semaphore in CPU quiesce phase "
                     f"{arrived}/{len(delays) - 1}")
            self.log(f"{p.name} finished {verb} with rc={-xen_abi.EBUSY}")
            p.rc = -xen_abi.EBUSY  # nothing patched, state unchanged
            return
        if work.cmd == xen_abi.LIVEPATCH_ACTION_REVERT:
            self._do_revert(p)
        else:
            if work.cmd == xen_abi.LIVEPATCH_ACTION_REPLACE:
                for name in reversed(list(self.state.applied)):
                    self._do_revert(self.find(name))
            if not self._do_apply(p):  # REPLACE leaves the system unpatched then, as Xen does
                self.log(f"{p.name} finished {verb} with rc={-xen_abi.EBUSY}")
                return
        self.log(f"{p.name} finished {verb} with rc=0")

    def _do_apply(self, p: SimPayload) -> bool:
        if self.config.active_waitqueue:
            self.log(f"{p.name}: CPU0 - d1v0 found with active waitqueue")
            p.rc = -xen_abi.EBUSY
            return False
        p.state, p.rc = xen_abi.LIVEPATCH_STATE_APPLIED, 0
        self.state.applied.append(p.name)
        return True

    def _do_revert(self, p: SimPayload) -> None:
        p.state, p.rc, p.reverted = xen_abi.LIVEPATCH_STATE_CHECKED, 0, True
        self.state.applied.remove(p.name)

    # ---------------------------------------------------------------- LIST
    def list_page(self, idx: int, nr: int, name_room: int | None, meta_room: int | None
                  ) -> tuple[list[SimPayload], int]:
        """Entries ``idx``.. (at most ``nr``) and the count remaining after them.

        ``name_room``/``meta_room`` are the caller's buffer sizes (interface 0x16) or ``None``.
        """
        self.progress()
        count = len(self.state.payloads)
        if nr > xen_abi.LIST_MAX_NR:
            raise XenError(xen_abi.E2BIG)
        if count and idx >= count:
            raise XenError(xen_abi.EINVAL, f"idx {idx} >= {count}")
        out: list[SimPayload] = []
        names = metas = 0
        for p in self.state.payloads[idx:idx + nr]:
            need_n, need_m = len(p.name.encode()) + 1, len(p.info.modinfo)
            if (name_room is not None and names + need_n > name_room) or (
                    meta_room is not None and metas + need_m > meta_room):
                if not out:
                    raise XenError(xen_abi.ENOBUFS)
                break
            out.append(p)
            names, metas = names + need_n, metas + need_m
        return out, count - idx - len(out)


def backend_verb(cmd: int) -> str:
    return {xen_abi.LIVEPATCH_ACTION_APPLY: "APPLY", xen_abi.LIVEPATCH_ACTION_REVERT: "REVERT",
            xen_abi.LIVEPATCH_ACTION_REPLACE: "REPLACE"}.get(cmd, str(cmd))


# ------------------------------------------------------------------------------------------------
# Upload validation


def validate_payload(data: bytes, xen_syms: str | None, loaded: list[PayloadInfo],
                     hypervisor_build_id: bytes, target: Target | None = None) -> PayloadInfo:
    """What the loader learns from ``data``, or :class:`XenError` with the errno Xen returns.

    Uses ``xsbuild.check.check_payload``, the offline copy of ``target``'s loader: its
    refusals, in that release's order (hazards are accepted, as Xen accepts them).
    """
    from xsbuild import check

    report = check.check_payload(data, _open_xen_syms(xen_syms), loaded=loaded, target=target,
                                 xen_build_id=hypervisor_build_id)
    if report.refusals:
        first = report.refusals[0]
        raise XenError(first.errno, first.message)
    assert report.info is not None
    return report.info


def _open_xen_syms(path: str | None) -> object | None:
    """The hypervisor symbol table ``check_payload`` takes (None: no xen-syms, skip symbols)."""
    if path is None:
        return None
    from xsbuild.xensyms import XenSymbols

    return XenSymbols.load(path)


# ------------------------------------------------------------------------------------------------
# Persistence


def _info_to_json(info: PayloadInfo) -> dict[str, Any]:
    raw = dataclasses.asdict(info)
    for key in ("build_id", "depends", "xen_depends", "modinfo"):
        raw[key] = raw[key].hex()
    return raw


def _info_from_json(raw: Mapping[str, Any]) -> PayloadInfo:
    data = dict(raw)
    for key in ("build_id", "depends", "xen_depends", "modinfo"):
        data[key] = bytes.fromhex(str(data.get(key, "")))
    data["funcs"] = [FuncInfo(**f) for f in data.get("funcs", [])]
    known = {f.name for f in dataclasses.fields(PayloadInfo)}
    return PayloadInfo(**{k: v for k, v in data.items() if k in known})


def state_to_json(state: SimState) -> dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "build_id": state.build_id.hex(),
        "xen_syms": state.xen_syms,
        "config": dataclasses.asdict(state.config),
        "payload_version": state.payload_version,
        "payloads": [{"name": p.name, "state": p.state, "rc": p.rc, "reverted": p.reverted,
                      "info": _info_to_json(p.info)} for p in state.payloads],
        "applied": state.applied,
        "work": dataclasses.asdict(state.work) if state.work else None,
        "console": state.console,
    }


def state_from_json(raw: Mapping[str, Any]) -> SimState:
    if raw.get("format") != STATE_FORMAT:
        raise UsageError(f"simulator state has format {raw.get('format')!r}, expected "
                         f"{STATE_FORMAT}: remove the state file to start over")
    work = raw.get("work")
    return SimState(
        build_id=bytes.fromhex(str(raw["build_id"])),
        xen_syms=raw.get("xen_syms"),
        config=SimConfig(**raw.get("config", {})),
        payload_version=int(raw.get("payload_version", 1)),
        payloads=[SimPayload(p["name"], _info_from_json(p["info"]), p["state"], p["rc"],
                             p["reverted"]) for p in raw.get("payloads", [])],
        applied=list(raw.get("applied", [])),
        work=SimWork(**work) if isinstance(work, dict) else None,
        console=list(raw.get("console", [])),
    )


def config_from_env(base: SimConfig, env: Mapping[str, str]) -> SimConfig:
    """``base`` with the ``XSBUILD_SIM_*`` overrides of this run applied (not persisted)."""
    cfg = dataclasses.replace(base, cpu_delays_ns=list(base.cpu_delays_ns))
    try:
        if env.get(ENV_CPU_DELAYS):
            cfg.cpu_delays_ns = [parse_duration_ns(x) for x in env[ENV_CPU_DELAYS].split(",")]
        if env.get(ENV_POLLS):
            cfg.completion_polls = int(env[ENV_POLLS])
        if env.get(ENV_INTERFACE):
            cfg.interface_version = int(env[ENV_INTERFACE], 0)
        if env.get(ENV_XEN_VERSION):
            cfg.xen_version = str(XenVersion.parse(env[ENV_XEN_VERSION]))
        if env.get(ENV_WAITQUEUE):
            cfg.active_waitqueue = env[ENV_WAITQUEUE] not in ("0", "")
    except (ValueError, UsageError) as exc:
        raise UsageError(f"bad simulator setting in the environment: {exc}") from None
    return cfg


# ------------------------------------------------------------------------------------------------
# The transport


class SimBuffer:
    """Ordinary process memory: the simulator runs in-process, so nothing has to be locked."""

    def __init__(self, size: int) -> None:
        self._mem: ctypes.Array[ctypes.c_char] | None = ctypes.create_string_buffer(size)
        self.address = ctypes.addressof(self._mem)
        self.size = size

    def free(self) -> None:
        self._mem = None


class SimTransport:
    """Hypercalls answered by a :class:`SimHypervisor` whose state is kept in a JSON file."""

    def __init__(self, state_path: str | os.PathLike[str], xen_syms: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.path = Path(state_path)
        self.env = dict(os.environ if env is None else env)
        self.description = f"simulator (state {self.path})"
        self._init_state(xen_syms)

    def _init_state(self, xen_syms: str | None) -> None:
        """Create the state file on first use, from ``xen_syms``'s build-id."""
        with self._locked_state() as state:
            if state is None and xen_syms is None:
                raise UsageError(f"no simulator state at {self.path}: give --sim-xen-syms "
                                 "XEN_SYMS once to create it (its build-id becomes the "
                                 "simulated hypervisor's)")
            if xen_syms is None:
                return
            build_id = read_build_id(xen_syms)
            if state is None:
                self._save(SimState(build_id=build_id, xen_syms=os.path.abspath(xen_syms)))
            elif state.build_id != build_id:
                raise UsageError(f"the simulator at {self.path} runs another hypervisor "
                                 f"(build-id {state.build_id.hex()}); remove the state file "
                                 "to start over with this xen-syms")

    @contextlib.contextmanager
    def _locked_state(self) -> Iterator[SimState | None]:
        """The state, under an exclusive lock on its folder: no lock file is left behind, and
        a folder that does not exist is the user's mistake, not something to create."""
        folder = self.path.parent
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            what = "does not exist" if not folder.exists() else (exc.strerror or str(exc))
            raise UsageError(f"--sim-state {self.path}: directory {folder} {what}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._load()
        finally:
            os.close(fd)  # closing releases the lock

    def _load(self) -> SimState | None:
        try:
            return state_from_json(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read simulator state {self.path}: {exc!r}; fix or remove "
                             "it") from None

    def _save(self, state: SimState) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(state_to_json(state), fh, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def state(self) -> SimState:
        """A snapshot of the state (for tests and ``--json`` diagnostics)."""
        with self._locked_state() as state:
            assert state is not None
            return state

    def alloc(self, size: int) -> SimBuffer:
        return SimBuffer(size)

    def hypercall(self, op: int, *args: int) -> int:
        with self._locked_state() as state:
            assert state is not None
            hv = SimHypervisor(state, config_from_env(state.config, self.env))
            try:
                if op == xen_abi.HYPERVISOR_SYSCTL:
                    return _do_sysctl(hv, args[0])
                if op == xen_abi.HYPERVISOR_XEN_VERSION:
                    return _do_xen_version(hv, args[0], args[1])
                raise OSError(xen_abi.ENOSYS, f"hypercall {op} is not simulated")
            finally:
                self._save(state)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# Decoding the caller's memory, as do_sysctl / livepatch_op do


def _read_name(nm: ctypes.Structure) -> str:
    """``verify_payload``'s name rules: size 1..128, pads zero, NUL-terminated (else -EINVAL)."""
    if not 0 < nm.size <= xen_abi.NAME_SIZE or any(nm.pad):
        raise XenError(xen_abi.EINVAL, "bad name size or pad")
    raw = ctypes.string_at(nm.name, nm.size)
    if raw[-1] != 0:
        raise XenError(xen_abi.EINVAL, "name not NUL-terminated")
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _do_sysctl(hv: SimHypervisor, addr: int) -> int:
    size = ctypes.sizeof(abi.XenSysctl)
    sysctl = abi.XenSysctl.from_buffer_copy(ctypes.string_at(addr, size))
    if sysctl.interface_version != hv.config.interface:
        raise OSError(xen_abi.EACCES, "interface version mismatch")
    if sysctl.cmd != xen_abi.XEN_SYSCTL_LIVEPATCH_OP:
        raise OSError(xen_abi.ENOSYS, f"sysctl {sysctl.cmd} is not simulated")
    op = sysctl.u.livepatch_op
    try:
        _check_op_flags(hv.config.target, op.pad)
        ret = _dispatch(hv, op, sysctl.interface_version)
    except XenError as exc:
        if exc.errno_value not in (xen_abi.ENOSYS, xen_abi.EOPNOTSUPP):
            ctypes.memmove(addr, ctypes.addressof(sysctl), size)  # copied back on errors too
        raise OSError(exc.errno_value, str(exc)) from None
    ctypes.memmove(addr, ctypes.addressof(sysctl), size)
    return ret


def _check_op_flags(target: Target, flags: int) -> None:
    """The op's ``pad`` (4.17, 4.18: must be 0) or ``flags`` (4.19+: FORCE, and other bits only
    with FORCE), spec §4.2."""
    if not flags:
        return
    if not target.has(Rule.FLAG_FORCE):
        raise XenError(xen_abi.EINVAL, "op pad")
    if flags & ~xen_abi.LIVEPATCH_FLAGS_MASK and not flags & xen_abi.LIVEPATCH_FLAG_FORCE:
        raise XenError(xen_abi.EINVAL, "op flags")


def _dispatch(hv: SimHypervisor, op: ctypes.Structure, version: int) -> int:
    if op.cmd == xen_abi.LIVEPATCH_CMD_UPLOAD:
        up = op.u.upload
        name = _read_name(up.name)
        if not 0 < up.size <= xen_abi.LIVEPATCH_MAX_SIZE:
            raise XenError(xen_abi.EINVAL, f"payload size {up.size}")
        hv.upload(name, ctypes.string_at(up.payload, up.size))
        return 0
    if op.cmd == xen_abi.LIVEPATCH_CMD_GET:
        get = op.u.get
        get.status.state, get.status.rc = hv.get(_read_name(get.name))
        return 0
    if op.cmd == xen_abi.LIVEPATCH_CMD_ACTION:
        act = op.u.action
        if act.pad:
            raise XenError(xen_abi.EINVAL, "action pad")
        return hv.action(_read_name(act.name), act.cmd, act.timeout, act.flags)
    if op.cmd == xen_abi.LIVEPATCH_CMD_LIST:
        return _do_list(hv, op.u.list, version)
    raise XenError(xen_abi.EOPNOTSUPP, f"livepatch op {op.cmd}")


def _do_list(hv: SimHypervisor, lst: ctypes.Structure, version: int) -> int:
    if lst.pad:
        raise XenError(xen_abi.EINVAL, "list pad")
    lst.version = hv.state.payload_version
    if lst.nr == 0:  # the probe
        hv.progress()
        lst.nr = len(hv.state.payloads)
        lst.name_total_size = sum(len(p.name.encode()) + 1 for p in hv.state.payloads)
        lst.metadata_total_size = sum(len(p.info.modinfo) for p in hv.state.payloads)
        return 0
    if not (lst.status and lst.len and lst.metadata_len and lst.name):
        raise XenError(xen_abi.EINVAL, "bad list handles")
    sized = version >= xen_abi.SYSCTL_INTERFACE_VERSION_4_21
    rows, remaining = hv.list_page(lst.idx, lst.nr, lst.name_total_size if sized else None,
                                   lst.metadata_total_size if sized else None)
    names = b"".join(p.name.encode() + b"\0" for p in rows)
    metas = b"".join(p.info.modinfo for p in rows)
    status_t = abi.XenLivepatchStatus
    for k, p in enumerate(rows):
        status_t.from_address(lst.status + k * ctypes.sizeof(status_t)).state = p.state
        status_t.from_address(lst.status + k * ctypes.sizeof(status_t)).rc = p.rc
        ctypes.c_uint32.from_address(lst.len + 4 * k).value = len(p.name.encode()) + 1
        ctypes.c_uint32.from_address(lst.metadata_len + 4 * k).value = len(p.info.modinfo)
    ctypes.memmove(lst.name, names, len(names))
    if metas:
        ctypes.memmove(lst.metadata, metas, len(metas))
    lst.nr = remaining
    lst.name_total_size, lst.metadata_total_size = len(names), len(metas)
    return len(rows)


def _do_xen_version(hv: SimHypervisor, cmd: int, addr: int) -> int:
    """``__HYPERVISOR_xen_version``: the release, its extra version, the build-id."""
    version = hv.config.target.version
    assert version is not None
    if cmd == xen_abi.XENVER_VERSION:
        return version.major << 16 | version.minor
    if cmd == xen_abi.XENVER_EXTRAVERSION:
        extra = (f".{version.patch}" if version.patch is not None else "").encode()
        ctypes.memmove(addr, extra + b"\0", len(extra) + 1)
        return 0
    if cmd == xen_abi.XENVER_BUILD_ID:
        return _do_build_id(hv, addr)
    raise OSError(xen_abi.ENOSYS, f"xen_version {cmd} is not simulated")


def _do_build_id(hv: SimHypervisor, addr: int) -> int:
    room = ctypes.c_uint32.from_address(addr).value
    bid = hv.state.build_id
    if len(bid) > room:
        raise OSError(xen_abi.ENOBUFS, "build-id buffer too small")
    ctypes.memmove(addr + xen_abi.XEN_BUILD_ID_HEADER_SIZE, bid, len(bid))
    return len(bid)
