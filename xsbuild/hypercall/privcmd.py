"""The real transport: ``IOCTL_PRIVCMD_HYPERCALL`` on ``/dev/xen/privcmd`` in dom0 (spec §4.1).

Xen reads and writes the caller's buffers by virtual address while the hypercall runs and cannot
page anything in, so every byte the hypercall touches lives in memory mapped from
``/dev/xen/hypercall`` (the kernel's privcmd-buf: pages that never fault), or, when that device is
missing or refuses the size (old kernels capped it at 64 pages per open file), in anonymous memory
that is ``mlock``ed, excluded from fork and touched first -- what libxencall does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
from dataclasses import dataclass, field

from xsbuild import xen_abi
from xsbuild.errors import UsageError
from xsbuild.hypercall import abi

PRIVCMD_PATHS = ("/dev/xen/privcmd", "/proc/xen/privcmd")
HYPERCALL_BUF_PATH = "/dev/xen/hypercall"


def privcmd_available() -> bool:
    """True when this looks like a Xen dom0 (or a domU with privcmd): used by ``--backend auto``."""
    return any(os.path.exists(p) for p in PRIVCMD_PATHS)


def _round_pages(size: int) -> int:
    return max(1, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE) * mmap.PAGESIZE


def _address(mm: mmap.mmap) -> int:
    # The export is dropped at once so that the mmap can be closed later; the mapping (and the
    # address) stays valid until then.
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    del anchor
    return addr


@dataclass(slots=True)
class MappedBuffer:
    """A page-granular hypercall buffer (``mm`` keeps the mapping alive)."""

    mm: mmap.mmap
    address: int
    size: int
    locked: bool = False
    _closed: bool = field(default=False, repr=False)

    def free(self) -> None:
        if self._closed:
            return
        if self.locked:
            _libc().munlock(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size))
        self.mm.close()
        self._closed = True


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC


def _locked_anonymous(size: int) -> MappedBuffer:
    """libxencall's fallback: anonymous memory, locked, not inherited by children, touched."""
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = _address(mm)
    if _libc().mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size)) != 0:
        err = ctypes.get_errno()
        mm.close()
        raise OSError(err, f"mlock of {size} bytes for a hypercall buffer failed: "
                           f"{os.strerror(err)}")
    if hasattr(mmap, "MADV_DONTFORK"):
        mm.madvise(mmap.MADV_DONTFORK)
    for off in range(0, size, mmap.PAGESIZE):
        mm[off] = 0  # fault every page in now, not during the hypercall
    return MappedBuffer(mm, addr, size, locked=True)


class PrivcmdTransport:
    """Hypercalls through the privcmd driver.  Needs root in dom0."""

    def __init__(self, privcmd_path: str | None = None, use_hypercall_dev: bool = True) -> None:
        self.fd = self._open_privcmd(privcmd_path)
        self.buf_fd = -1
        if use_hypercall_dev and os.path.exists(HYPERCALL_BUF_PATH):
            try:
                self.buf_fd = os.open(HYPERCALL_BUF_PATH, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                self.buf_fd = -1  # fall back to locked memory
        kind = HYPERCALL_BUF_PATH if self.buf_fd >= 0 else "locked memory"
        self.description = f"privcmd ({self.path}, buffers from {kind})"

    def _open_privcmd(self, path: str | None) -> int:
        for candidate in ([path] if path else PRIVCMD_PATHS):
            try:
                fd = os.open(candidate, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except PermissionError as exc:
                raise UsageError(f"cannot open {candidate}: {exc.strerror}; run as root in "
                                 "dom0") from None
            self.path = candidate
            return fd
        raise UsageError("no Xen privcmd device (/dev/xen/privcmd): this is not a Xen dom0; "
                         "use --backend sim to try the tool without a hypervisor")

    def alloc(self, size: int) -> MappedBuffer:
        size = _round_pages(size)
        if self.buf_fd >= 0:
            try:
                mm = mmap.mmap(self.buf_fd, size, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
                return MappedBuffer(mm, _address(mm), size)
            except OSError:
                pass  # e.g. a privcmd-buf page limit: use locked memory for this one
        return _locked_anonymous(size)

    def hypercall(self, op: int, *args: int) -> int:
        """Issue hypercall ``op``; the kernel returns its result or -1 with errno."""
        if len(args) > xen_abi.HYPERCALL_PRIVCMD_ARGS:
            raise AssertionError(f"hypercall {op}: {len(args)} arguments")
        call = abi.PrivcmdHypercall(op=op)
        for i, value in enumerate(args):
            call.arg[i] = value
        arg = bytearray(bytes(call))
        return fcntl.ioctl(self.fd, xen_abi.IOCTL_PRIVCMD_HYPERCALL, arg, True)

    def close(self) -> None:
        for fd in (self.fd, self.buf_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.buf_fd = -1
