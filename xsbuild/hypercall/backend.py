"""The apply tool's backend interface, and the sysctl backend that privcmd and the simulator share.

A :class:`Backend` speaks the four livepatch sysctl commands (UPLOAD, GET, LIST, ACTION) plus the
build-id query.  :class:`SysctlBackend` implements it by encoding ``struct xen_sysctl`` with the
ctypes structures of :mod:`xsbuild.hypercall.abi` into resident memory and handing its address
to a :class:`Transport`: the privcmd ioctl on a real dom0 (:mod:`.privcmd`), or the simulator's
in-process hypervisor (:mod:`.sim`), so the simulator exercises the same encoding as a real host.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from xsbuild import xen_abi
from xsbuild.errors import HypercallError, HypervisorBusy, UsageError
from xsbuild.hypercall import abi
from xsbuild.xen_versions import XenVersion

_ALIGN = 8
_BUSY_ERRNOS = frozenset({xen_abi.EBUSY, xen_abi.EAGAIN})


@dataclass(frozen=True, slots=True)
class Status:
    """``struct xen_livepatch_status``: the payload's state and the result of its last action."""

    state: int  # LIVEPATCH_STATE_CHECKED or _APPLIED
    rc: int  # 0, -EAGAIN while an action is pending, else the last action's negative errno

    @property
    def state_name(self) -> str:
        return state_name(self.state)


@dataclass(frozen=True, slots=True)
class PayloadEntry:
    """One row of LIST, in upload order."""

    name: str
    state: int
    rc: int
    metadata: bytes  # the payload's .modinfo, NUL-separated strings

    @property
    def state_name(self) -> str:
        return state_name(self.state)


def version_from_xenver(packed: int, extra: str) -> XenVersion:
    """``XENVER_version``'s ``(major << 16) | minor`` and the extra version (".5", "-rc")."""
    base = f"{packed >> 16}.{packed & 0xFFFF}"
    return XenVersion.parse(base + (extra if extra[:1] in (".", "-", "+") else ""))


def state_name(state: int) -> str:
    return xen_abi.STATE_NAMES.get(state, f"unknown({state})")


def hypercall_error(what: str, errno_value: int) -> HypercallError:
    """The exception for a failed hypercall: EBUSY/EAGAIN are :class:`HypervisorBusy` (retry)."""
    err = abs(errno_value)
    text = f"{what}: -{xen_abi.errno_name(err)}"
    cls = HypervisorBusy if err in _BUSY_ERRNOS else HypercallError
    return cls(text, err)


def encode_name(name: str) -> bytes:
    """The payload name as Xen wants it: bytes plus NUL, at most ``NAME_SIZE`` in all."""
    raw = name.encode()
    if not raw or b"\0" in raw:
        raise UsageError(f"invalid payload name {name!r}: it must be non-empty and have no NUL")
    if len(raw) + 1 > xen_abi.NAME_SIZE:
        raise UsageError(f"payload name {name!r} is {len(raw)} bytes; Xen allows at most "
                         f"{xen_abi.NAME_SIZE - 1}")
    return raw + b"\0"


def parse_duration_ns(text: str) -> int:
    """``30ms``, ``500us``, ``1.5s``, ``2000ns`` or a bare number of nanoseconds."""
    raw = text.strip().lower()
    for suffix, scale in (("ms", 10**6), ("us", 10**3), ("ns", 1), ("s", 10**9)):
        if raw.endswith(suffix):
            raw, factor = raw[: -len(suffix)].strip(), scale
            break
    else:
        factor = 1
    try:
        value = float(raw) * factor
    except ValueError:
        raise UsageError(f"bad duration {text!r}: use e.g. 30ms, 500us, 1s or nanoseconds")\
            from None
    if value < 0 or value != value:  # negative or NaN
        raise UsageError(f"bad duration {text!r}: it must be positive")
    return int(value)


class Backend(Protocol):
    """What the apply tool needs from a hypervisor.  Every method raises ``HypercallError``
    (``HypervisorBusy`` for EBUSY/EAGAIN) when the hypervisor refuses."""

    description: str

    def interface_version(self) -> int: ...

    def build_id(self) -> bytes: ...

    def xen_version(self) -> XenVersion: ...

    def upload(self, name: str, data: bytes, flags: int = 0) -> None: ...

    def get(self, name: str) -> Status: ...

    def list(self) -> list[PayloadEntry]: ...

    def action(self, name: str, cmd: int, timeout_ns: int, flags: int = 0) -> None: ...

    def close(self) -> None: ...


class Buffer(Protocol):
    """Hypercall-safe memory: resident while the hypercall runs, addressed by ``address``."""

    address: int
    size: int

    def free(self) -> None: ...


class Transport(Protocol):
    """Issues raw hypercalls; raises ``OSError`` with the (positive) errno on failure."""

    description: str

    def alloc(self, size: int) -> Buffer: ...

    def hypercall(self, op: int, *args: int) -> int: ...

    def close(self) -> None: ...


class Arena:
    """A bump allocator over one transport buffer: every piece of one hypercall lives in it."""

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.used = 0

    def reserve(self, size: int) -> int:
        """Address of ``size`` zeroed bytes, 8-aligned."""
        start = (self.used + _ALIGN - 1) // _ALIGN * _ALIGN
        if start + max(size, 1) > self.buf.size:
            raise AssertionError(f"hypercall arena overflow ({start}+{size} > {self.buf.size})")
        self.used = start + max(size, 1)
        ctypes.memset(self.buf.address + start, 0, max(size, 1))
        return self.buf.address + start

    def put(self, data: bytes) -> int:
        addr = self.reserve(len(data))
        ctypes.memmove(addr, data, len(data))
        return addr

    @staticmethod
    def read(addr: int, size: int) -> bytes:
        return ctypes.string_at(addr, size) if size else b""


def _arena_size(*parts: int) -> int:
    return sum((p + _ALIGN) // _ALIGN * _ALIGN + _ALIGN for p in parts) + _ALIGN


@dataclass(slots=True)
class _ListPage:
    """What one LIST call returned (the OUT fields and the decoded rows)."""

    version: int
    remaining: int  # OUT nr: total for the probe, entries left after this page otherwise
    name_total: int
    metadata_total: int
    rows: list[PayloadEntry]


def _decode_rows(arena: Arena, lst: ctypes.Structure, count: int) -> list[PayloadEntry]:
    """Unpack ``count`` entries: statuses, lengths, and the packed name/metadata strings."""
    u32s = ctypes.c_uint32 * count
    lens = u32s.from_buffer_copy(arena.read(lst.len, 4 * count))
    mlens = u32s.from_buffer_copy(arena.read(lst.metadata_len, 4 * count))
    stats = (abi.XenLivepatchStatus * count).from_buffer_copy(
        arena.read(lst.status, count * ctypes.sizeof(abi.XenLivepatchStatus)))
    names = arena.read(lst.name, sum(lens))
    metas = arena.read(lst.metadata, sum(mlens))
    rows: list[PayloadEntry] = []
    npos = mpos = 0
    for k in range(count):
        name = names[npos:npos + lens[k]].rstrip(b"\0").decode(errors="replace")
        rows.append(PayloadEntry(name, stats[k].state, stats[k].rc,
                                 metas[mpos:mpos + mlens[k]]))
        npos += lens[k]
        mpos += mlens[k]
    return rows


class SysctlBackend:
    """A :class:`Backend` that encodes the sysctl livepatch op and sends it through a transport.

    The interface version is detected: 0x15 (Xen 4.17-4.20) first, then 0x16 (4.21+) when the
    hypervisor answers -EACCES (``do_sysctl``'s version mismatch), and cached.
    """

    def __init__(self, transport: Transport, interface_version: int | None = None,
                 list_batch: int = xen_abi.LIST_MAX_NR) -> None:
        self.transport = transport
        self._version = interface_version
        self.list_batch = list_batch  # entries per LIST call (smaller: more paging)
        self.description = transport.description

    # ---------------------------------------------------------------- plumbing
    @contextmanager
    def _arena(self, *parts: int) -> Iterator[Arena]:
        buf = self.transport.alloc(_arena_size(ctypes.sizeof(abi.XenSysctl), *parts))
        try:
            yield Arena(buf)
        finally:
            buf.free()

    def _sysctl(self, arena: Arena, slot: int, sysctl: ctypes.Structure,
                what: str) -> tuple[int, ctypes.Structure]:
        """Run one sysctl whose struct lives at ``slot``; return (result, struct copied back)."""
        candidates = ([self._version] if self._version is not None
                      else list(xen_abi.SYSCTL_INTERFACE_VERSIONS))
        for i, version in enumerate(candidates):
            sysctl.interface_version = version
            ctypes.memmove(slot, ctypes.addressof(sysctl), ctypes.sizeof(sysctl))
            try:
                ret = self.transport.hypercall(xen_abi.HYPERVISOR_SYSCTL, slot)
            except OSError as exc:
                err = exc.errno or xen_abi.EINVAL
                if err == xen_abi.EACCES and i + 1 < len(candidates):
                    continue  # interface version mismatch: try the next one
                raise hypercall_error(what, err) from None
            self._version = version
            out = abi.XenSysctl.from_buffer_copy(arena.read(slot, ctypes.sizeof(abi.XenSysctl)))
            return ret, out
        raise AssertionError("unreachable")

    def interface_version(self) -> int:
        """The sysctl interface version the hypervisor accepts (detected with a LIST probe)."""
        if self._version is None:
            self._list_call(0, 0, 0, 0)
        assert self._version is not None
        return self._version

    # ---------------------------------------------------------------- the four commands
    def upload(self, name: str, data: bytes, flags: int = 0) -> None:
        """UPLOAD; ``flags`` (``LIVEPATCH_FLAG_FORCE``) go in the op's ``pad`` field, which
        4.19 renamed ``flags`` (spec §4.2): the caller checks the hypervisor has it."""
        raw = encode_name(name)
        with self._arena(len(raw), len(data)) as arena:
            slot = arena.reserve(ctypes.sizeof(abi.XenSysctl))
            sysctl = abi.new_sysctl(0, xen_abi.LIVEPATCH_CMD_UPLOAD)
            sysctl.u.livepatch_op.pad = flags
            up = sysctl.u.livepatch_op.u.upload
            up.name.name = arena.put(raw)
            up.name.size = len(raw)
            up.size = len(data)
            up.payload = arena.put(data)
            self._sysctl(arena, slot, sysctl, f"UPLOAD {name}")

    def get(self, name: str) -> Status:
        raw = encode_name(name)
        with self._arena(len(raw)) as arena:
            slot = arena.reserve(ctypes.sizeof(abi.XenSysctl))
            sysctl = abi.new_sysctl(0, xen_abi.LIVEPATCH_CMD_GET)
            get = sysctl.u.livepatch_op.u.get
            get.name.name = arena.put(raw)
            get.name.size = len(raw)
            _, out = self._sysctl(arena, slot, sysctl, f"GET {name}")
        status = out.u.livepatch_op.u.get.status
        return Status(state=status.state, rc=status.rc)

    def action(self, name: str, cmd: int, timeout_ns: int, flags: int = 0) -> None:
        raw = encode_name(name)
        if not 0 <= timeout_ns <= xen_abi.XEN_LIVEPATCH_ACTION_TIMEOUT_MAX_NS:
            raise UsageError(f"timeout {timeout_ns} ns does not fit Xen's u32 of nanoseconds")
        with self._arena(len(raw)) as arena:
            slot = arena.reserve(ctypes.sizeof(abi.XenSysctl))
            sysctl = abi.new_sysctl(0, xen_abi.LIVEPATCH_CMD_ACTION)
            act = sysctl.u.livepatch_op.u.action
            act.name.name = arena.put(raw)
            act.name.size = len(raw)
            act.cmd = cmd
            act.timeout = timeout_ns
            act.flags = flags
            self._sysctl(arena, slot, sysctl, f"ACTION {action_name(cmd)} {name}")

    def list(self) -> list[PayloadEntry]:
        """Every loaded payload, paging with idx/nr and restarting when ``version`` changes."""
        for _ in range(xen_abi.LIST_VERSION_RESTARTS + 1):
            probe = self._list_call(0, 0, 0, 0)
            entries = self._walk(probe)
            if entries is not None:
                return entries
        raise HypervisorBusy("LIST: the payload list kept changing while it was read",
                             xen_abi.EBUSY)

    def _list_call(self, idx: int, nr: int, name_size: int, meta_size: int) -> _ListPage:
        """One LIST hypercall asking for ``nr`` entries from ``idx`` (``nr`` = 0: the probe)."""
        status_size = nr * ctypes.sizeof(abi.XenLivepatchStatus)
        with self._arena(status_size, 4 * nr, 4 * nr, name_size, meta_size) as arena:
            slot = arena.reserve(ctypes.sizeof(abi.XenSysctl))
            sysctl = abi.new_sysctl(0, xen_abi.LIVEPATCH_CMD_LIST)
            lst = sysctl.u.livepatch_op.u.list
            lst.idx, lst.nr = idx, nr
            lst.status = arena.reserve(status_size)
            lst.len = arena.reserve(4 * nr)
            lst.metadata_len = arena.reserve(4 * nr)
            lst.name = arena.reserve(name_size)
            lst.metadata = arena.reserve(meta_size)
            # 0x16 (4.21+): the sizes are IN as well, the room in each buffer.  4.17 ignores
            # them on input, so sending them always is harmless and works before detection.
            lst.name_total_size, lst.metadata_total_size = name_size, meta_size
            count, out = self._sysctl(arena, slot, sysctl, "LIST")
            res = out.u.livepatch_op.u.list
            rows = _decode_rows(arena, lst, count) if nr else []
        return _ListPage(version=res.version, remaining=res.nr, name_total=res.name_total_size,
                         metadata_total=res.metadata_total_size, rows=rows)

    def _walk(self, probe: _ListPage) -> list[PayloadEntry] | None:
        """Read every entry; ``None`` if the list changed underneath (the caller restarts)."""
        total = probe.remaining  # the probe returns the count in nr
        entries: list[PayloadEntry] = []
        batch = min(total, self.list_batch)
        for _ in range(total + xen_abi.LIST_VERSION_RESTARTS * 8):  # bounded: no endless loop
            if len(entries) >= total:
                break
            batch = min(batch, total - len(entries))
            try:
                page = self._list_call(len(entries), batch, probe.name_total,
                                       probe.metadata_total)
            except HypercallError as exc:
                if exc.errno_value == xen_abi.E2BIG and batch > 1:
                    batch //= 2  # as libxc does
                    continue
                if exc.errno_value in (xen_abi.EINVAL, xen_abi.ENOBUFS):
                    return None  # the list shrank or grew since the probe
                raise
            if page.version != probe.version:
                return None
            entries.extend(page.rows)  # no rows: preempted before the first entry, ask again
        return entries if len(entries) >= total else None

    def xen_version(self) -> XenVersion:
        """The running hypervisor's release (``XENVER_version``, ``XENVER_extraversion``)."""
        size = xen_abi.XEN_EXTRAVERSION_LEN
        with self._arena(size) as arena:
            addr = arena.reserve(size)
            try:
                packed = self.transport.hypercall(xen_abi.HYPERVISOR_XEN_VERSION,
                                                  xen_abi.XENVER_VERSION, 0)
                self.transport.hypercall(xen_abi.HYPERVISOR_XEN_VERSION,
                                         xen_abi.XENVER_EXTRAVERSION, addr)
            except OSError as exc:
                raise hypercall_error("XENVER_version", exc.errno or xen_abi.EINVAL) from None
            extra = arena.read(addr, size).split(b"\0", 1)[0].decode("ascii", "replace")
        return version_from_xenver(packed, extra)

    def build_id(self) -> bytes:
        """The running hypervisor's build-id (``XENVER_build_id``)."""
        room = 1024
        with self._arena(xen_abi.XEN_BUILD_ID_HEADER_SIZE + room) as arena:
            addr = arena.reserve(xen_abi.XEN_BUILD_ID_HEADER_SIZE + room)
            ctypes.c_uint32.from_address(addr).value = room
            try:
                size = self.transport.hypercall(xen_abi.HYPERVISOR_XEN_VERSION,
                                                xen_abi.XENVER_BUILD_ID, addr)
            except OSError as exc:
                raise hypercall_error("XENVER_build_id", exc.errno or xen_abi.EINVAL) from None
            return arena.read(addr + xen_abi.XEN_BUILD_ID_HEADER_SIZE, size)

    def close(self) -> None:
        self.transport.close()


_ACTION_NAMES = {xen_abi.LIVEPATCH_ACTION_UNLOAD: "UNLOAD",
                 xen_abi.LIVEPATCH_ACTION_REVERT: "REVERT",
                 xen_abi.LIVEPATCH_ACTION_APPLY: "APPLY",
                 xen_abi.LIVEPATCH_ACTION_REPLACE: "REPLACE"}


def action_name(cmd: int) -> str:
    return _ACTION_NAMES.get(cmd, f"<action {cmd}>")
