"""Upload, apply, revert, replace and unload payloads, with errors that say what to do next.

The actions are data (:data:`ACTIONS`), as in ``xen-livepatch``'s ``action_options`` table: the
state a payload must be in, the state the action reaches, the progress verb.  Every action runs
the same steps (spec §5, improved):

1. GET: the payload must exist and have no action in flight (rc -EAGAIN).
2. Already in the target state: nothing to do.  Not in an allowed state: refuse, say why.
3. ACTION with a rendezvous timeout (ns; 0 would mean 30 ms in Xen).  APPLY/REVERT/REPLACE return
   at once with rc -EAGAIN; the work runs when every CPU has been gathered.
4. Poll GET until rc is no longer -EAGAIN, with a bounded total wait (xen-livepatch polls once).
5. rc -EBUSY means the CPUs could not be gathered in time and nothing changed.  With
   ``retries`` the action is tried again with a timeout that starts small (1 ms) and grows
   geometrically to the user's ``--timeout``, which the last attempt uses: a busy host is
   retried without stopping its guests for long, and the limit the operator allowed is tried.

Errors are :class:`HypervisorBusy` (exit 4: retrying may work) or :class:`HypercallError`
(exit 1), with one message naming the failed step, the payload's state now and what to do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xsbuild import xen_abi
from xsbuild.errors import (
    ForceUnsupportedError,
    HypercallError,
    HypervisorBusy,
    UsageError,
    XsbuildError,
)
from xsbuild.hypercall import Backend, PayloadEntry, Status, state_name
from xsbuild.hypercall.backend import parse_duration_ns
from xsbuild.xen_versions import UNKNOWN_TARGET, Rule, Target, VersionSource

__all__ = ["ACTIONS", "ActionOptions", "ActionResult", "load", "parse_duration_ns", "run_action",
           "upload"]

CHECKED = xen_abi.LIVEPATCH_STATE_CHECKED
APPLIED = xen_abi.LIVEPATCH_STATE_APPLIED
GONE = "unloaded"  # the state name used after a successful unload

DEFAULT_WAIT_S = 10.0  # bound on polling for an action's completion
DEFAULT_TIMEOUT_START_NS = 1_000_000  # first rendezvous timeout when retrying: 1 ms
RETRY_DELAY_S = 0.01  # pause before the first retry, doubled each time (guests run meanwhile)
RETRY_DELAY_MAX_S = 1.0
POLL_MAX_S = 0.1


@dataclass(frozen=True, slots=True)
class Action:
    """One hypervisor action as data (``xen-livepatch``'s ``action_options``)."""

    key: str  # the command name: apply, revert, replace, unload
    cmd: int  # LIVEPATCH_ACTION_*
    allowed: frozenset[int]  # states the payload may be in beforehand
    target: int | None  # the state reached; None: the payload is gone
    verb: str  # progress verb, as xen-livepatch prints it
    asynchronous: bool  # completes later (rendezvous) rather than in the hypercall


ACTIONS: dict[str, Action] = {
    a.key: a for a in (
        Action("apply", xen_abi.LIVEPATCH_ACTION_APPLY, frozenset({CHECKED}), APPLIED,
               "Applying", True),
        Action("revert", xen_abi.LIVEPATCH_ACTION_REVERT, frozenset({APPLIED}), CHECKED,
               "Reverting", True),
        Action("replace", xen_abi.LIVEPATCH_ACTION_REPLACE, frozenset({CHECKED}), APPLIED,
               "Replacing all live patches with", True),
        Action("unload", xen_abi.LIVEPATCH_ACTION_UNLOAD, frozenset({CHECKED}), None,
               "Unloading", False),
    )
}


@dataclass(frozen=True, slots=True)
class ActionOptions:
    """How to run an action: the user's bound on the rendezvous, retries, the polling bound."""

    timeout_ns: int = xen_abi.DEFAULT_ACTION_TIMEOUT_NS  # longest time guests may be held
    retries: int = 0  # extra attempts after a rendezvous timeout (-EBUSY)
    timeout_start_ns: int = DEFAULT_TIMEOUT_START_NS  # first timeout when retrying
    wait_s: float = DEFAULT_WAIT_S  # how long to poll for completion
    nodeps: bool = False  # APPLY without the .livepatch.depends check

    def __post_init__(self) -> None:
        limit = xen_abi.XEN_LIVEPATCH_ACTION_TIMEOUT_MAX_NS
        if not 0 < self.timeout_ns <= limit:
            raise UsageError(f"--timeout must be between 1 ns and {format_ns(limit)} "
                             f"(Xen's u32 of nanoseconds); got {self.timeout_ns} ns")
        if self.timeout_start_ns <= 0:
            raise UsageError("--timeout-start must be positive")
        if self.retries < 0:
            raise UsageError("--retries must be 0 or more")
        if self.wait_s <= 0:
            raise UsageError("--wait must be positive")

    def timeouts(self) -> list[int]:
        """The rendezvous timeout of each attempt.

        Without retries: just ``timeout_ns``.  With N retries: N+1 attempts growing
        geometrically from ``timeout_start_ns`` to exactly ``timeout_ns`` (1 ms, 10 ms, 100 ms
        for 2 retries up to 100 ms): a busy host first gets short stops of its guests, and the
        last attempt is the longest the operator allowed.
        """
        if not self.retries:
            return [self.timeout_ns]
        start = min(self.timeout_start_ns, self.timeout_ns)
        ratio = (self.timeout_ns / start) ** (1 / self.retries)
        out = [min(round(start * ratio ** i), self.timeout_ns) for i in range(self.retries)]
        return [*out, self.timeout_ns]


@dataclass(slots=True)
class Attempt:
    """One ACTION hypercall and how it ended."""

    timeout_ns: int
    rc: int  # the final GET rc (0 ok), or the hypercall's -errno when it failed synchronously
    synchronous_error: bool = False


@dataclass(slots=True)
class ActionResult:
    """What ``run_action`` did, for text and ``--json`` output."""

    action: str
    name: str
    state_before: str
    state_after: str
    changed: bool  # False: the payload was already in the target state
    attempts: list[Attempt] = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def format_ns(ns: int) -> str:
    """30000000 -> ``30 ms``; 1500 -> ``1.5 us``; 3107232 -> ``3.11 ms`` (3 digits)."""
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns} ns"


# ------------------------------------------------------------------------------------------------
# Hints: what to do next, per action and errno.  Xen returns the same errno for several causes,
# so a hint names each cause it can mean; `xl dmesg` has the hypervisor's own message.

_SYNC_HINTS: dict[tuple[str, int], str] = {
    ("apply", xen_abi.EINVAL): "its .livepatch.depends matches neither the hypervisor nor the "
    "last applied payload (apply that one first, or pass --nodeps), or its expectations do not "
    "match the running code; `xl dmesg` says which",
    ("replace", xen_abi.EINVAL): "REPLACE needs .livepatch.depends equal to the hypervisor's "
    "build-id; build the payload against the hypervisor, not against another payload",
    ("replace", xen_abi.EOPNOTSUPP): "this payload or an applied one has pre/post hooks, which "
    "veto REPLACE: revert the applied payloads (newest first), then apply this one",
    ("revert", xen_abi.EBUSY): "only the most recently applied payload can be reverted: revert "
    "the payloads applied after it first (or another livepatch action is still running)",
    ("unload", xen_abi.EINVAL): "an applied payload cannot be unloaded: revert it first",
}
_ERRNO_HINTS: dict[int, str] = {
    xen_abi.EBUSY: "another livepatch action is in progress: retry shortly",
    xen_abi.EAGAIN: "another livepatch action is in progress: retry shortly",
    xen_abi.EPERM: "a pre-apply/pre-revert hook of the payload refused, or this domain may not "
    "use livepatch (XSM); `xl dmesg` says which",
    xen_abi.ENOENT: "no payload by that name is loaded: `xsbuild list` shows what is",
    xen_abi.ENOSYS: "this hypervisor was built without CONFIG_LIVEPATCH",
    xen_abi.EACCES: "the hypervisor speaks another sysctl interface version",
}
_ASYNC_HINTS: dict[tuple[str, int], str] = {
    ("apply", xen_abi.EINVAL): "Xen will not apply a reverted payload again when it has "
    "writable data (.data/.bss), or the apply failed in the hypervisor: unload it and upload it "
    "afresh; `xl dmesg` has details",
}


def _hint(action: str, errno_value: int, table: dict[tuple[str, int], str]) -> str:
    return (table.get((action, errno_value)) or _ERRNO_HINTS.get(errno_value)
            or "`xl dmesg` shows the hypervisor's message")


def _state_now(backend: Backend, name: str) -> str:
    """The payload's state for an error message, best effort."""
    try:
        return describe_status(backend.get(name))
    except HypercallError as exc:
        return GONE if exc.errno_value == xen_abi.ENOENT else "unknown (GET failed)"


def describe_status(status: Status) -> str:
    text = status.state_name
    if status.rc:
        text += f" (rc -{xen_abi.errno_name(status.rc)})"
    return text


def _fail(busy: bool, errno_value: int, text: str) -> HypercallError:
    cls = HypervisorBusy if busy else HypercallError
    return cls(text, errno_value)


# ------------------------------------------------------------------------------------------------
# Actions


@dataclass(slots=True)
class _Runner:
    """Runs one action: the steps of the module docstring, with injectable sleep and clock."""

    backend: Backend
    action: Action
    name: str
    opts: ActionOptions
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def error(self, step: str, errno_value: int, what: str, hint: str, busy: bool
              ) -> HypercallError:
        state = _state_now(self.backend, self.name)
        return _fail(busy, errno_value, f"{self.action.key} {self.name}: {step} failed: {what}. "
                                        f"{self.name} is now {state}. Next: {hint}")

    def current(self) -> Status:
        """Step 1: GET."""
        try:
            status = self.backend.get(self.name)
        except HypercallError as exc:
            hint = _ERRNO_HINTS.get(exc.errno_value, "check `xsbuild list`")
            raise _fail(isinstance(exc, HypervisorBusy), exc.errno_value,
                        f"{self.action.key} {self.name}: GET failed: {exc}. Next: {hint}") \
                from None
        if status.rc == -xen_abi.EAGAIN:
            raise HypervisorBusy(f"{self.action.key} {self.name}: an action on {self.name} is "
                                 f"already in progress (GET rc -EAGAIN). Next: wait for it, then "
                                 f"check with `xsbuild list`", xen_abi.EAGAIN)
        return status

    def check_state(self, status: Status) -> bool:
        """Step 2: True when the action is needed; raises when it is not allowed."""
        if status.state == self.action.target:
            return False
        if status.state not in self.action.allowed:
            want = " or ".join(state_name(s) for s in sorted(self.action.allowed))
            raise HypercallError(
                f"{self.action.key} {self.name}: {self.name} is {status.state_name}, "
                f"{self.action.key} needs {want}. Next: "
                f"{_hint(self.action.key, xen_abi.EINVAL, _SYNC_HINTS)}", xen_abi.EINVAL)
        return True

    def attempt(self, timeout_ns: int) -> Attempt:
        """Steps 3-4: one ACTION, then poll until it settles; returns the final rc."""
        flags = xen_abi.LIVEPATCH_ACTION_APPLY_NODEPS if self.opts.nodeps else 0
        try:
            self.backend.action(self.name, self.action.cmd, timeout_ns, flags)
        except HypercallError as exc:
            return Attempt(timeout_ns, -exc.errno_value, synchronous_error=True)
        if not self.action.asynchronous:
            return Attempt(timeout_ns, 0)
        return Attempt(timeout_ns, self.poll(timeout_ns).rc)

    def poll(self, timeout_ns: int) -> Status:
        """GET until rc != -EAGAIN; the first look after twice the timeout (as xen-livepatch)."""
        deadline = self.clock() + self.opts.wait_s
        interval = max(2 * timeout_ns / 1e9, 0.001)
        while True:
            self.sleep(min(interval, max(deadline - self.clock(), 0.0)))
            status = self.backend.get(self.name)
            if status.rc != -xen_abi.EAGAIN:
                return status
            if self.clock() >= deadline:
                raise HypervisorBusy(
                    f"{self.action.key} {self.name}: waiting for completion failed: the action "
                    f"did not finish within {self.opts.wait_s:g} s and is still pending in the "
                    f"hypervisor (GET rc -EAGAIN). {self.name} is now {status.state_name}. "
                    f"Next: check later with `xsbuild list`; start no other action until it "
                    f"finishes", xen_abi.EAGAIN)
            interval = min(interval * 2, POLL_MAX_S)

    def run(self) -> ActionResult:
        start = self.clock()
        before = self.current()
        result = ActionResult(self.action.key, self.name, before.state_name, before.state_name,
                              changed=False)
        if not self.check_state(before):
            return result
        delay = RETRY_DELAY_S
        timeouts = self.opts.timeouts()
        for i, timeout_ns in enumerate(timeouts):
            att = self.attempt(timeout_ns)
            result.attempts.append(att)
            if att.rc == 0:
                break
            if -att.rc not in (xen_abi.EBUSY, xen_abi.EAGAIN) or i + 1 == len(timeouts):
                raise self.failure(att)
            self.sleep(delay)  # let the guests run before the next try
            delay = min(delay * 2, RETRY_DELAY_MAX_S)
        result.state_after, result.changed = self.verify(), True
        result.elapsed_s = round(self.clock() - start, 6)
        return result

    def failure(self, att: Attempt) -> HypercallError:
        err = -att.rc
        busy = err in (xen_abi.EBUSY, xen_abi.EAGAIN)
        if att.synchronous_error:
            return self.error(f"the {self.action.key.upper()} hypercall", err,
                              f"-{xen_abi.errno_name(err)}",
                              _hint(self.action.key, err, _SYNC_HINTS), busy)
        if err == xen_abi.EBUSY:
            tries = len(self.opts.timeouts())
            what = (f"the hypervisor could not gather every CPU within "
                    f"{format_ns(att.timeout_ns)} (rc -EBUSY"
                    + (f", {tries} attempts" if tries > 1 else "") + "); nothing was changed")
            hint = ("retry, with --retries N to try again with timeouts growing from "
                    f"{format_ns(self.opts.timeout_start_ns)} up to --timeout, or allow a longer "
                    "--timeout (guests stop for at most that long)")
            return self.error("the rendezvous", err, what, hint, busy=True)
        return self.error(f"the {self.action.key} in the hypervisor", err,
                          f"rc -{xen_abi.errno_name(err)}",
                          _hint(self.action.key, err, _ASYNC_HINTS), busy)

    def verify(self) -> str:
        """The state after success; refuses a result that is not the target."""
        try:
            status = self.backend.get(self.name)
        except HypercallError as exc:
            if self.action.target is None and exc.errno_value == xen_abi.ENOENT:
                return GONE
            raise
        if status.state != self.action.target:
            raise HypercallError(
                f"{self.action.key} {self.name}: the action completed but {self.name} is "
                f"{describe_status(status)}, not "
                f"{state_name(self.action.target) if self.action.target else 'unloaded'}. "
                "Next: `xl dmesg` shows what the hypervisor did", xen_abi.EINVAL)
        return status.state_name


def run_action(backend: Backend, action: str, name: str, opts: ActionOptions | None = None, *,
               sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic) -> ActionResult:
    """Run ``action`` (a key of :data:`ACTIONS`) on payload ``name``; raises on failure."""
    if action not in ACTIONS:
        raise UsageError(f"unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
    return _Runner(backend, ACTIONS[action], name, opts or ActionOptions(), sleep, clock).run()


# ------------------------------------------------------------------------------------------------
# Upload, load, list


@dataclass(slots=True)
class UploadResult:
    name: str
    path: str
    size: int
    forced: bool = False

    def to_json(self) -> dict[str, object]:
        return asdict(self)


_UPLOAD_HINTS = {
    xen_abi.EEXIST: "a payload with this name, or with the same build-id, or one exporting the "
    "same symbol, is already loaded: see `xsbuild list`; unload it or choose another name",
    xen_abi.EINVAL: "the hypervisor's loader rejected the payload (e.g. built for another "
    "hypervisor: .livepatch.xen_depends must equal its build-id); `xsbuild check FILE "
    "--xen-syms XEN_SYMS` explains offline, `xl dmesg` has Xen's message",
    xen_abi.ENOENT: "the payload uses a symbol the hypervisor does not have; `xsbuild check` "
    "names it",
    xen_abi.EOPNOTSUPP: "the payload uses an ELF feature the loader does not support; "
    "`xsbuild check` names it",
    xen_abi.ENOMEM: "the hypervisor is out of memory for the payload",
}


def read_payload(path: str | os.PathLike[str]) -> bytes:
    """The payload file's bytes; ``UsageError`` when it cannot be read or is too large."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read payload {p}: {exc.strerror or exc}") from None
    if not data:
        raise UsageError(f"payload {p} is empty")
    if len(data) > xen_abi.LIVEPATCH_MAX_SIZE:
        raise UsageError(f"payload {p} is {len(data)} bytes; Xen accepts at most "
                         f"{xen_abi.LIVEPATCH_MAX_SIZE}")
    return data


def precheck_payload(path: str | os.PathLike[str], name: str,
                     running: tuple[Target, bytes | None] = (UNKNOWN_TARGET, None)) -> bytes:
    """The payload's bytes once the offline check (``xsbuild check``, payload only) passes.

    Run before any hypercall, so that a file that is not a payload is named as such instead of
    surfacing as the loader's bare -EINVAL: ``ElfParseError`` (exit 2) for something that is not
    an x86-64 ELF or is truncated, ``HypercallError`` with Xen's errno (exit 1) for a payload
    the loader would reject.  ``running`` is the running hypervisor (:func:`running_target`):
    its release's loader rules apply (the RO funcs trap of 4.17.1, say) and
    ``.livepatch.xen_depends`` must be its build-id.
    """
    from xsbuild.check import check_payload
    from xsbuild.elf import check_elf_header

    data = read_payload(path)
    check_elf_header(str(path), data)
    target, build_id = running
    report = check_payload(data, target=target, xen_build_id=build_id)
    if report.problems:
        first = report.problems[0]
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        against = "" if target.version is None else f" (Xen {target.version})"
        raise HypercallError(f"upload {name}: {path} would be rejected by Xen's loader{against}: "
                             f"{first}{more}. Nothing was uploaded. Next: `xsbuild check {path}` "
                             "lists every problem", first.errno)
    return data


def running_target(backend: Backend) -> tuple[Target, bytes | None]:
    """The running hypervisor's release (XENVER_version; unknown when refused: the rules common
    to every release) and build-id (None when refused)."""
    try:
        target = Target(backend.xen_version(), VersionSource.HYPERVISOR)
    except (HypercallError, UsageError):
        target = UNKNOWN_TARGET
    try:
        build_id: bytes | None = backend.build_id()
    except HypercallError:
        build_id = None
    return target, build_id


def upload_flags(backend: Backend, name: str, force: bool,
                 target: Target = UNKNOWN_TARGET) -> int:
    """The op flags for UPLOAD: ``LIVEPATCH_FLAG_FORCE`` with ``force``, which only 4.19 and
    later can carry (before, the field is a pad that must be 0, spec §4.2): refused at once,
    before any UPLOAD, against an older hypervisor."""
    if not force:
        return 0
    version = target.version or backend.xen_version()  # probed again: say why it cannot be
    if not Target(version, VersionSource.HYPERVISOR).has(Rule.FLAG_FORCE):
        raise ForceUnsupportedError(
            f"upload {name}: --force needs Xen 4.19 or later (LIVEPATCH_FLAG_FORCE); this "
            f"hypervisor is Xen {version}, whose livepatch op has no flags. Nothing was "
            "uploaded. Next: upload without --force")
    return xen_abi.LIVEPATCH_FLAG_FORCE


def upload(backend: Backend, name: str, path: str | os.PathLike[str],
           force: bool = False) -> UploadResult:
    """UPLOAD ``path`` as ``name`` (synchronous: the loader's checks run in the hypercall)."""
    running = running_target(backend)
    data = precheck_payload(path, name, running)
    flags = upload_flags(backend, name, force, running[0])
    try:
        backend.upload(name, data, flags)
    except HypercallError as exc:
        hint = _upload_hint(backend, name, exc.errno_value)
        raise _fail(isinstance(exc, HypervisorBusy), exc.errno_value,
                    f"upload {name}: the UPLOAD hypercall failed: "
                    f"-{xen_abi.errno_name(exc.errno_value)}. Nothing was loaded. Next: {hint}")\
            from None
    return UploadResult(name, str(path), len(data), forced=bool(flags))


def _upload_hint(backend: Backend, name: str, errno_value: int) -> str:
    """What to do after a failed UPLOAD; for -EEXIST, which of its three causes it is."""
    if errno_value == xen_abi.EEXIST:
        try:
            names = {e.name for e in backend.list()}
        except HypercallError:
            names = None
        if names is not None and name in names:
            return (f"a payload named {name} is already loaded (see `xsbuild list`): unload "
                    "it or upload under another name")
        if names is not None:
            return (f"no payload named {name} is loaded, so a loaded payload has the same "
                    "build-id (this very payload under another name: `xsbuild list`) or "
                    "exports a symbol this one also defines; `xl dmesg` says which")
    return _UPLOAD_HINTS.get(errno_value) or _ERRNO_HINTS.get(errno_value) \
        or "`xl dmesg` shows the loader's message"


def name_from_path(path: str | os.PathLike[str]) -> str:
    """``xen-livepatch load``'s naming: the basename with its last extension removed."""
    base = os.path.basename(os.fspath(path))
    stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
    return stem or base


def _with_context(exc: XsbuildError, text: str) -> XsbuildError:
    """The same kind of error (same exit code) with ``text`` as its message."""
    if isinstance(exc, HypercallError):
        return type(exc)(text, exc.errno_value)
    try:
        return type(exc)(text)
    except TypeError:
        return HypercallError(text)


def load(backend: Backend, path: str | os.PathLike[str], opts: ActionOptions | None = None, *,
         name: str | None = None, force: bool = False,
         sleep: Callable[[float], None] = time.sleep,
         clock: Callable[[], float] = time.monotonic) -> tuple[UploadResult, ActionResult]:
    """Upload then apply; if the apply fails, unload again so nothing is left half-done."""
    name = name or name_from_path(path)
    up = upload(backend, name, path, force=force)
    try:
        applied = run_action(backend, "apply", name, opts, sleep=sleep, clock=clock)
    except XsbuildError as exc:
        try:
            run_action(backend, "unload", name, sleep=sleep, clock=clock)
        except XsbuildError as unload_exc:
            raise _with_context(exc, f"load {name}: {exc} (and unloading it again failed: "
                                     f"{unload_exc})") from None
        raise _with_context(exc, f"load {name}: {exc} ({name} was unloaded again)") from None
    return up, applied


def list_payloads(backend: Backend) -> list[PayloadEntry]:
    try:
        return backend.list()
    except HypercallError as exc:
        hint = _ERRNO_HINTS.get(exc.errno_value, "`xl dmesg` shows the hypervisor's message")
        raise _fail(isinstance(exc, HypervisorBusy), exc.errno_value,
                    f"list: {exc}. Next: {hint}") from None


def entry_to_json(entry: PayloadEntry) -> dict[str, object]:
    return {"name": entry.name, "state": entry.state_name, "rc": entry.rc,
            "rc_name": xen_abi.errno_name(entry.rc) if entry.rc else None,
            "metadata": [m.decode(errors="replace") for m in entry.metadata.split(b"\0") if m]}


def format_list(entries: list[PayloadEntry]) -> str:
    """``xen-livepatch list``'s exact table, so scripts that parse it keep working.

    Name padded to 40, the state, `` (<-rc>, <strerror>)`` when rc != 0, then the metadata
    with its NULs shown as ``;`` (spec §5).
    """
    if not entries:
        return "Nothing to list"
    width = xen_abi.XEN_LIVEPATCH_LIST_NAME_WIDTH
    lines = [f"{' ID':<{width}}| status     | metadata",
             f"{'-' * width}+{'-' * 12}+{'-' * 15}"]
    for e in entries:
        rc = f" ({-e.rc}, {os.strerror(-e.rc)})" if e.rc else ""
        meta = e.metadata.rstrip(b"\0").replace(b"\0", b";").decode(errors="replace")
        lines.append(f"{e.name:<{width}}| {e.state_name}{rc}    | {meta}")
    return "\n".join(lines)
