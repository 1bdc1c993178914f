"""The simulated 4.17 hypervisor and the apply library, through the real sysctl encoding.

Every test drives ``SysctlBackend(SimTransport(...))``: the same ctypes encoding privcmd uses,
decoded again by the simulator, with payloads built by ``tests/support/handmade.py`` (gcc with
Xen's flags, ``ld -r --build-id=sha1``) against a small hypervisor ELF.  The rules pinned here are
those of spec §2, §3.2 and §4.2; each test's docstring names its rule.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.support.handmade import PayloadSpec, build_hypervisor, build_id_note, build_payload
from tests.support.image import Image, read_build_id
from tests.support.toolchain import OBJCOPY, Toolchain
from tests.support.toolchain import run as run_tool
from xsbuild import apply as lp
from xsbuild import xen_abi
from xsbuild.errors import ElfParseError, HypercallError, HypervisorBusy, UsageError
from xsbuild.hypercall import SysctlBackend
from xsbuild.hypercall.privcmd import PrivcmdTransport
from xsbuild.hypercall.sim import SimHypervisor, SimTransport, XenError

CHECKED, APPLIED = xen_abi.LIVEPATCH_STATE_CHECKED, xen_abi.LIVEPATCH_STATE_APPLIED

DATA_SOURCE = """\
#include "xen.h"
static int calls = 1;
const char *livepatch_xen_extra_version(void)
{
    calls++;
    return calls > 1 ? "Hello data" : "";
}
"""

HOOK_IMPL = """\
int lp_preapply(void);
int lp_preapply(void)
{
    return 0;
}
"""


@pytest.fixture(autouse=True)
def _no_real_hypercalls(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach a real hypervisor, even on a dom0."""

    def refuse(*_args: object, **_kwargs: object) -> int:
        raise AssertionError("a unit test tried a real privcmd hypercall")

    monkeypatch.setattr(PrivcmdTransport, "hypercall", refuse)


@pytest.fixture(scope="session")
def hv(hypervisor: Image) -> Image:
    """The session's hand-made hypervisor (tests/conftest.py), as the simulator's xen-syms."""
    return hypervisor


@pytest.fixture(scope="session")
def other_hv(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """A hypervisor with a different build-id (another source file name)."""
    src = Path(__file__).resolve().parents[1] / "fixtures" / "handmade" / "version.c"
    return build_hypervisor(toolchain, tmp_path_factory.mktemp("apply-hv2") / "xen-syms",
                            sources={"common/version2.c": src.read_text()})


PayloadFactory = Callable[..., Path]
# Names every handmade payload defines (its funcs table and strings).  Xen refuses a second
# payload exporting the same name (-EEXIST "duplicate new symbol"), so each payload gets its own.
_SHARED_NAMES = re.compile(r"^(hello|lp_\w+)$")


def uniquify_symbols(path: Path, tag: str) -> Path:
    """Rename the payload's generated symbols to ``<name>_<tag>`` (objcopy --redefine-sym)."""
    with path.open("rb") as fh:
        symtab = ELFFile(fh).get_section_by_name(".symtab")
        names = {sym.name for sym in symtab.iter_symbols()
                 if sym["st_shndx"] != "SHN_UNDEF" and _SHARED_NAMES.match(sym.name)}
    if names:
        run_tool([OBJCOPY, *(f"--redefine-sym={n}={n}_{tag}" for n in sorted(names)), str(path)])
    return path


@pytest.fixture(scope="session")
def make_payload(toolchain: Toolchain, hv: Image,
                 tmp_path_factory: pytest.TempPathFactory) -> PayloadFactory:
    """``make_payload(name, **PayloadSpec fields)`` -> path, built once per session."""
    out_dir = tmp_path_factory.mktemp("apply-payloads")
    cache: dict[str, Path] = {}

    def make(name: str, against: Image | None = None, **fields: object) -> Path:
        if name not in cache:
            spec = PayloadSpec(name, **fields)  # type: ignore[arg-type]
            out = out_dir / f"{name}.livepatch"
            build_payload(toolchain, against or hv, spec, out)
            cache[name] = uniquify_symbols(out, name)
        return cache[name]

    return make


@pytest.fixture
def env() -> dict[str, str]:
    return {}


@pytest.fixture
def transport(tmp_path: Path, hv: Image, env: dict[str, str]) -> SimTransport:
    return SimTransport(tmp_path / "sim.json", str(hv.path), env)


@pytest.fixture
def backend(transport: SimTransport) -> Iterator[SysctlBackend]:
    b = SysctlBackend(transport)
    yield b
    b.close()


def no_sleep(_seconds: float) -> None:
    pass


def run(backend: SysctlBackend, action: str, name: str, **opts: object) -> lp.ActionResult:
    return lp.run_action(backend, action, name, lp.ActionOptions(**opts),  # type: ignore[arg-type]
                         sleep=no_sleep)


def states(backend: SysctlBackend) -> dict[str, str]:
    return {e.name: e.state_name for e in backend.list()}


# ------------------------------------------------------------------------------------------------
# UPLOAD


def test_upload_get_list(backend: SysctlBackend, make_payload: PayloadFactory) -> None:
    """UPLOAD is synchronous: the payload is CHECKED with rc 0 at once (spec §2 step 11)."""
    lp.upload(backend, "hello", make_payload("hello"))
    status = backend.get("hello")
    assert (status.state, status.rc) == (CHECKED, 0)
    assert states(backend) == {"hello": "CHECKED"}


def test_upload_same_name_twice_is_eexist(backend: SysctlBackend,
                                          make_payload: PayloadFactory) -> None:
    lp.upload(backend, "hello", make_payload("hello"))
    with pytest.raises(HypercallError) as exc:
        lp.upload(backend, "hello", make_payload("hello"))
    assert exc.value.errno_value == xen_abi.EEXIST
    assert "Nothing was loaded" in str(exc.value) and "xsbuild list" in str(exc.value)


def test_upload_same_build_id_under_another_name_is_eexist(
        backend: SysctlBackend, make_payload: PayloadFactory) -> None:
    """A payload's own build-id must be unique among loaded payloads (spec §1.6)."""
    lp.upload(backend, "one", make_payload("hello"))
    with pytest.raises(HypercallError) as exc:
        lp.upload(backend, "two", make_payload("hello"))
    assert exc.value.errno_value == xen_abi.EEXIST
    assert states(backend) == {"one": "CHECKED"}


def test_upload_for_another_hypervisor_is_einval(backend: SysctlBackend, other_hv: Image,
                                                 make_payload: PayloadFactory) -> None:
    """.livepatch.xen_depends must equal the running hypervisor's build-id (spec §1.6)."""
    path = make_payload("foreign", against=other_hv)
    with pytest.raises(HypercallError) as exc:
        lp.upload(backend, "foreign", path)
    assert exc.value.errno_value == xen_abi.EINVAL
    assert "xsbuild check" in str(exc.value)
    assert backend.list() == []


@pytest.mark.parametrize("missing", sorted(xen_abi.REQUIRED_NOTE_SECTIONS))
def test_upload_without_a_required_note_is_einval(backend: SysctlBackend,
                                                  make_payload: PayloadFactory,
                                                  missing: str) -> None:
    path = make_payload(f"no{missing.replace('.', '_')}", omit=frozenset({missing}))
    with pytest.raises(HypercallError) as exc:
        lp.upload(backend, "bad", path)
    assert exc.value.errno_value == xen_abi.EINVAL


def test_upload_bad_note_type_is_einval(backend: SysctlBackend, hv: Image,
                                        make_payload: PayloadFactory) -> None:
    note = build_id_note(bytes.fromhex(hv.build_id), note_type=4)
    with pytest.raises(HypercallError) as exc:
        lp.upload(backend, "bad", make_payload("badnote", xen_depends=note))
    assert exc.value.errno_value == xen_abi.EINVAL


def test_upload_not_an_elf_is_rejected_and_missing_file_is_usage(
        backend: SysctlBackend, tmp_path: Path) -> None:
    junk = tmp_path / "junk.livepatch"
    junk.write_bytes(b"not an elf at all")
    with pytest.raises(ElfParseError, match="not an ELF file"):  # before any hypercall
        lp.upload(backend, "junk", junk)
    with pytest.raises(UsageError):
        lp.upload(backend, "nothing", tmp_path / "missing.livepatch")
    big = tmp_path / "big.livepatch"
    big.write_bytes(b"\0" * (xen_abi.LIVEPATCH_MAX_SIZE + 1))
    with pytest.raises(UsageError, match="at most"):
        lp.upload(backend, "big", big)


def test_name_rules_enforced_by_the_simulator_too(transport: SimTransport) -> None:
    """verify_payload: size 1..128, NUL-terminated, pads zero, else -EINVAL (spec §2)."""
    from xsbuild.hypercall import abi

    for size, raw in ((0, b"x\0"), (129, b"x" * 128 + b"\0"), (2, b"xy")):
        buf = ctypes.create_string_buffer(raw, len(raw))
        sysctl = abi.new_sysctl(0x15, xen_abi.LIVEPATCH_CMD_GET)
        sysctl.u.livepatch_op.u.get.name.name = ctypes.addressof(buf)
        sysctl.u.livepatch_op.u.get.name.size = size
        with pytest.raises(OSError) as exc:
            transport.hypercall(xen_abi.HYPERVISOR_SYSCTL, ctypes.addressof(sysctl))
        assert exc.value.errno == xen_abi.EINVAL


def test_interface_version_mismatch_is_eacces_and_detected(tmp_path: Path, hv: Image) -> None:
    tr = SimTransport(tmp_path / "s.json", str(hv.path), {"XSBUILD_SIM_INTERFACE": "0x16"})
    assert SysctlBackend(tr).interface_version() == 0x16
    with pytest.raises(HypercallError) as exc:
        SysctlBackend(tr, interface_version=0x15).list()
    assert exc.value.errno_value == xen_abi.EACCES


def test_build_id_query(backend: SysctlBackend, hv: Image) -> None:
    assert backend.build_id().hex() == hv.build_id


# ------------------------------------------------------------------------------------------------
# Actions and states


def test_apply_revert_unload_cycle(backend: SysctlBackend, make_payload: PayloadFactory) -> None:
    lp.upload(backend, "hello", make_payload("hello"))
    res = run(backend, "apply", "hello")
    assert (res.state_before, res.state_after, res.changed) == ("CHECKED", "APPLIED", True)
    assert run(backend, "apply", "hello").changed is False  # already there: nothing to do
    assert run(backend, "revert", "hello").state_after == "CHECKED"
    assert run(backend, "revert", "hello").changed is False
    assert run(backend, "unload", "hello").state_after == lp.GONE
    assert backend.list() == []


def test_unload_applied_is_refused_with_next_step(backend: SysctlBackend,
                                                  make_payload: PayloadFactory) -> None:
    lp.upload(backend, "hello", make_payload("hello"))
    run(backend, "apply", "hello")
    with pytest.raises(HypercallError) as exc:
        run(backend, "unload", "hello")
    assert "revert it first" in str(exc.value)
    assert not isinstance(exc.value, HypervisorBusy)


def test_simulator_unload_applied_is_einval(backend: SysctlBackend,
                                            make_payload: PayloadFactory) -> None:
    """The raw ACTION, bypassing the tool's state check: UNLOAD of APPLIED gives -EINVAL."""
    lp.upload(backend, "hello", make_payload("hello"))
    run(backend, "apply", "hello")
    with pytest.raises(HypercallError) as exc:
        backend.action("hello", xen_abi.LIVEPATCH_ACTION_UNLOAD, 0)
    assert exc.value.errno_value == xen_abi.EINVAL


def test_quirk_revert_of_checked_returns_0_and_leaves_rc(backend: SysctlBackend,
                                                         make_payload: PayloadFactory) -> None:
    """REVERT when not APPLIED returns 0 and does nothing (spec §4.2)."""
    lp.upload(backend, "hello", make_payload("hello"))
    backend.action("hello", xen_abi.LIVEPATCH_ACTION_REVERT, 0)
    status = backend.get("hello")
    assert (status.state, status.rc) == (CHECKED, 0)


def test_unknown_payload(backend: SysctlBackend) -> None:
    with pytest.raises(HypercallError) as exc:
        run(backend, "apply", "ghost")
    assert exc.value.errno_value == xen_abi.ENOENT
    assert "xsbuild list" in str(exc.value)


def test_stacking_depends_revert_order_and_nodeps(backend: SysctlBackend,
                                                  make_payload: PayloadFactory) -> None:
    """B depends on A: APPLY B alone is -EINVAL, NODEPS skips it, revert only the top (§4.2)."""
    a = make_payload("stack_a")
    b = make_payload("stack_b", depends=build_id_note(bytes.fromhex(read_build_id(a))))
    lp.upload(backend, "a", a)
    lp.upload(backend, "b", b)
    with pytest.raises(HypercallError) as exc:
        run(backend, "apply", "b")
    assert exc.value.errno_value == xen_abi.EINVAL and "--nodeps" in str(exc.value)
    assert "b is now CHECKED" in str(exc.value)

    run(backend, "apply", "a")
    run(backend, "apply", "b")
    with pytest.raises(HypervisorBusy) as busy:
        run(backend, "revert", "a")
    assert busy.value.errno_value == xen_abi.EBUSY and "most recently applied" in str(busy.value)
    run(backend, "revert", "b")
    run(backend, "revert", "a")

    run(backend, "apply", "b", nodeps=True)  # NODEPS: no dependency check
    assert states(backend) == {"a": "CHECKED", "b": "APPLIED"}
    with pytest.raises(HypercallError):
        run(backend, "apply", "a")  # depends = hypervisor, but the top is now b


def test_replace_reverts_the_stack(backend: SysctlBackend, make_payload: PayloadFactory) -> None:
    """REPLACE reverts every applied payload newest first, then applies (spec §3.3)."""
    a = make_payload("stack_a")
    b = make_payload("stack_b", depends=build_id_note(bytes.fromhex(read_build_id(a))))
    for name, path in (("a", a), ("b", b), ("r", make_payload("replacement"))):
        lp.upload(backend, name, path)
    run(backend, "apply", "a")
    run(backend, "apply", "b")
    assert run(backend, "replace", "r").state_after == "APPLIED"
    assert states(backend) == {"a": "CHECKED", "b": "CHECKED", "r": "APPLIED"}


def test_replace_needs_hypervisor_depends(backend: SysctlBackend,
                                          make_payload: PayloadFactory) -> None:
    a = make_payload("stack_a")
    b = make_payload("stack_b", depends=build_id_note(bytes.fromhex(read_build_id(a))))
    lp.upload(backend, "a", a)
    lp.upload(backend, "b", b)
    run(backend, "apply", "a")
    with pytest.raises(HypercallError) as exc:
        run(backend, "replace", "b")
    assert exc.value.errno_value == xen_abi.EINVAL and "REPLACE" in str(exc.value)


def test_replace_vetoed_by_pre_post_hooks(backend: SysctlBackend,
                                          make_payload: PayloadFactory) -> None:
    """Pre/post hooks veto REPLACE with -EOPNOTSUPP (spec §4.2)."""
    hooked = make_payload("hooked", hooks={"preapply": ["lp_preapply"]},
                          extra_sources={"livepatch/hook_impl.c": HOOK_IMPL})
    lp.upload(backend, "h", hooked)
    with pytest.raises(HypercallError) as exc:
        run(backend, "replace", "h")
    assert exc.value.errno_value == xen_abi.EOPNOTSUPP and "veto" in str(exc.value)
    assert states(backend) == {"h": "CHECKED"}


def test_reapply_after_revert_refused_with_writable_data(backend: SysctlBackend,
                                                         make_payload: PayloadFactory) -> None:
    """Not safe_to_reapply: the hypercall returns 0 but GET rc is -EINVAL (spec §1.3)."""
    lp.upload(backend, "d", make_payload("with_data", source=DATA_SOURCE))
    run(backend, "apply", "d")
    run(backend, "revert", "d")
    backend.action("d", xen_abi.LIVEPATCH_ACTION_APPLY, 0)  # returns 0 ...
    assert backend.get("d").rc == -xen_abi.EINVAL  # ... and says no in rc
    with pytest.raises(HypercallError) as exc:
        run(backend, "apply", "d")
    assert "unload it and upload it afresh" in str(exc.value)


def test_reapply_after_revert_allowed_without_data(backend: SysctlBackend,
                                                   make_payload: PayloadFactory) -> None:
    lp.upload(backend, "hello", make_payload("hello"))
    for _ in range(2):
        run(backend, "apply", "hello")
        run(backend, "revert", "hello")
    assert states(backend) == {"hello": "CHECKED"}


# ------------------------------------------------------------------------------------------------
# Asynchronous actions and the rendezvous


@pytest.mark.parametrize("env", [{"XSBUILD_SIM_POLLS": "3"}])
def test_action_returns_eagain_then_completes_after_polls(
        backend: SysctlBackend, make_payload: PayloadFactory, env: dict[str, str]) -> None:
    lp.upload(backend, "hello", make_payload("hello"))
    backend.action("hello", xen_abi.LIVEPATCH_ACTION_APPLY, 0)
    assert backend.get("hello").rc == -xen_abi.EAGAIN
    with pytest.raises(HypervisorBusy):  # one action at a time, system-wide
        backend.action("hello", xen_abi.LIVEPATCH_ACTION_REVERT, 0)
    assert backend.get("hello").rc == -xen_abi.EAGAIN
    status = backend.get("hello")
    assert (status.state, status.rc) == (APPLIED, 0)


@pytest.mark.parametrize("env", [{"XSBUILD_SIM_POLLS": "4"}])
def test_tool_polls_until_done(backend: SysctlBackend, make_payload: PayloadFactory,
                               env: dict[str, str]) -> None:
    slept: list[float] = []
    lp.upload(backend, "hello", make_payload("hello"))
    res = lp.run_action(backend, "apply", "hello", sleep=slept.append)
    assert res.state_after == "APPLIED"
    assert len(slept) == 4 and slept[0] == pytest.approx(0.06)  # first look after 2 x 30 ms
    assert slept == sorted(slept)  # the interval only grows


@pytest.mark.parametrize("env", [{"XSBUILD_SIM_POLLS": "-1"}])
def test_stuck_action_gives_up_after_wait(backend: SysctlBackend, make_payload: PayloadFactory,
                                          env: dict[str, str]) -> None:
    lp.upload(backend, "hello", make_payload("hello"))
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(HypervisorBusy) as exc:
        lp.run_action(backend, "apply", "hello", lp.ActionOptions(wait_s=0.5), sleep=sleep,
                      clock=lambda: now[0])
    assert "still pending" in str(exc.value)
    assert 0.5 <= now[0] < 0.7
    with pytest.raises(HypervisorBusy, match="already in progress"):
        run(backend, "revert", "hello")


@pytest.mark.parametrize("env", [{"XSBUILD_SIM_CPU_DELAYS": "0,3ms,5ms"}])
def test_rendezvous_timeout_is_ebusy_and_changes_nothing(
        backend: SysctlBackend, make_payload: PayloadFactory, transport: SimTransport,
        env: dict[str, str]) -> None:
    lp.upload(backend, "hello", make_payload("hello"))
    with pytest.raises(HypervisorBusy) as exc:
        run(backend, "apply", "hello", timeout_ns=4_000_000)
    assert exc.value.return_code == 4
    assert "4 ms" in str(exc.value) and "nothing was changed" in str(exc.value)
    assert "hello is now CHECKED (rc -EBUSY)" in str(exc.value)
    assert any("hello: Timed out on semaphore in CPU quiesce phase 1/2" in line
               for line in transport.state().console)
    assert run(backend, "apply", "hello", timeout_ns=5_000_000).state_after == "APPLIED"


@pytest.mark.parametrize("env", [{"XSBUILD_SIM_CPU_DELAYS": "0,5ms"}])
def test_retries_grow_the_timeout_up_to_the_bound(
        backend: SysctlBackend, make_payload: PayloadFactory, env: dict[str, str]) -> None:
    """1, 1.58, 2.51, 3.98 ms miss a 5 ms CPU; 6.31 ms gathers it (geometric from 1 ms to the
    10 ms bound, which the last attempt would use).  The bound is never exceeded."""
    lp.upload(backend, "hello", make_payload("hello"))
    res = run(backend, "apply", "hello", retries=5, timeout_ns=10_000_000)
    assert [a.timeout_ns for a in res.attempts] == [1_000_000, 1_584_893, 2_511_886, 3_981_072,
                                                    6_309_573]
    assert [a.rc for a in res.attempts] == [-xen_abi.EBUSY] * 4 + [0]
    run(backend, "revert", "hello", timeout_ns=10_000_000)
    with pytest.raises(HypervisorBusy) as exc:
        run(backend, "apply", "hello", retries=5, timeout_ns=4_000_000)
    assert "6 attempts" in str(exc.value) and "4 ms" in str(exc.value)


def test_timeouts_schedule() -> None:
    assert lp.ActionOptions().timeouts() == [30_000_000]
    opts = lp.ActionOptions(timeout_ns=16_000_000, retries=4)
    assert opts.timeouts() == [1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000]
    opts = lp.ActionOptions(timeout_ns=100_000_000, retries=2)
    assert opts.timeouts() == [1_000_000, 10_000_000, 100_000_000]
    with pytest.raises(UsageError):
        lp.ActionOptions(timeout_ns=2**32)
    with pytest.raises(UsageError):
        lp.ActionOptions(timeout_ns=0)


# ------------------------------------------------------------------------------------------------
# LIST


def test_list_pages_and_keeps_upload_order(transport: SimTransport,
                                           make_payload: PayloadFactory) -> None:
    backend = SysctlBackend(transport, list_batch=2)
    names = [f"p{i}" for i in range(5)]
    for i, name in enumerate(names):
        lp.upload(backend, name, make_payload(f"page{i}", modinfo=f"id={i}"))
    entries = backend.list()
    assert [e.name for e in entries] == names
    assert [e.metadata for e in entries] == [f"id={i}\0".encode() for i in range(5)]


def test_list_restarts_when_the_version_changes(transport: SimTransport,
                                                make_payload: PayloadFactory) -> None:
    """A LIST walk that sees ``version`` change starts again (spec §4.2 paging)."""
    backend = SysctlBackend(transport, list_batch=1)
    for i in range(3):
        lp.upload(backend, f"p{i}", make_payload(f"page{i}", modinfo=f"id={i}"))
    calls = {"n": 0}
    real = transport.hypercall

    def meddling(op: int, *args: int) -> int:
        calls["n"] += 1
        if calls["n"] == 3:  # after the probe and the first page: another tool unloads p2
            SysctlBackend(SimTransport(transport.path, env={})).action(
                "p2", xen_abi.LIVEPATCH_ACTION_UNLOAD, 0)
        return real(op, *args)

    transport.hypercall = meddling  # type: ignore[method-assign]
    assert [e.name for e in backend.list()] == ["p0", "p1"]
    assert calls["n"] > 4  # it did restart


def test_list_raw_rules(transport: SimTransport, make_payload: PayloadFactory) -> None:
    backend = SysctlBackend(transport)
    lp.upload(backend, "p0", make_payload("page0", modinfo="id=0"))
    hv = SimHypervisor(transport.state())
    with pytest.raises(XenError) as big:
        hv.list_page(0, xen_abi.LIST_MAX_NR + 1, None, None)
    assert big.value.errno_value == xen_abi.E2BIG
    with pytest.raises(XenError) as past:
        hv.list_page(1, 1, None, None)
    assert past.value.errno_value == xen_abi.EINVAL
    with pytest.raises(XenError) as small:  # 0x16: the name buffer is too small for the entry
        hv.list_page(0, 1, 2, 100)
    assert small.value.errno_value == xen_abi.ENOBUFS


@pytest.mark.parametrize("env", [{"XSBUILD_SIM_INTERFACE": "0x16"}])
def test_list_on_interface_0x16(backend: SysctlBackend, make_payload: PayloadFactory,
                                env: dict[str, str]) -> None:
    for i in range(3):
        lp.upload(backend, f"p{i}", make_payload(f"page{i}", modinfo=f"id={i}"))
    assert [e.name for e in backend.list()] == ["p0", "p1", "p2"]
    assert backend.interface_version() == 0x16


# ------------------------------------------------------------------------------------------------
# load, and the state file


def test_load_unloads_again_when_apply_fails(backend: SysctlBackend,
                                             make_payload: PayloadFactory) -> None:
    a = make_payload("stack_a")
    b = make_payload("stack_b", depends=build_id_note(bytes.fromhex(read_build_id(a))))
    with pytest.raises(HypercallError) as exc:
        lp.load(backend, b, sleep=no_sleep)
    assert "was unloaded again" in str(exc.value)
    assert backend.list() == []
    up, res = lp.load(backend, a, sleep=no_sleep)
    assert (up.name, res.state_after) == ("stack_a", "APPLIED")


def test_name_from_path() -> None:
    assert lp.name_from_path("/x/fix.livepatch") == "fix"
    assert lp.name_from_path("a.b.livepatch") == "a.b"
    assert lp.name_from_path("plain") == "plain"


def test_state_survives_between_transports(tmp_path: Path, hv: Image,
                                           make_payload: PayloadFactory) -> None:
    path = tmp_path / "s.json"
    lp.upload(SysctlBackend(SimTransport(path, str(hv.path), {})), "hello",
              make_payload("hello"))
    again = SysctlBackend(SimTransport(path, env={}))
    assert states(again) == {"hello": "CHECKED"}


def test_state_needs_xen_syms_first_and_refuses_another(tmp_path: Path, hv: Image,
                                                        other_hv: Image) -> None:
    with pytest.raises(UsageError, match="--sim-xen-syms"):
        SimTransport(tmp_path / "new.json", env={})
    SimTransport(tmp_path / "s.json", str(hv.path), {})
    with pytest.raises(UsageError, match="another hypervisor"):
        SimTransport(tmp_path / "s.json", str(other_hv.path), {})


@pytest.mark.parametrize("env", [{"XSBUILD_SIM_WAITQUEUE": "1"}])
def test_active_waitqueue_refuses_apply_and_leaves_replace_unpatched(
        backend: SysctlBackend, make_payload: PayloadFactory, transport: SimTransport,
        env: dict[str, str]) -> None:
    """arch_livepatch_safety_check: APPLY -EBUSY; REPLACE has reverted everything by then."""
    lp.upload(backend, "a", make_payload("stack_a"))
    lp.upload(backend, "r", make_payload("replacement"))
    with pytest.raises(HypervisorBusy):
        run(backend, "apply", "a")
    assert backend.get("a").rc == -xen_abi.EBUSY
    calm = SysctlBackend(SimTransport(transport.path, env={}))
    run(calm, "apply", "a")  # the wait queue drained: now it applies
    with pytest.raises(HypervisorBusy):
        run(backend, "replace", "r")
    assert states(calm) == {"a": "CHECKED", "r": "CHECKED"}  # "SYSTEM MIGHT BE INSECURE"
    assert any("active waitqueue" in line for line in transport.state().console)


def test_corrupt_state_is_a_usage_error(tmp_path: Path, hv: Image) -> None:
    path = tmp_path / "s.json"
    SimTransport(path, str(hv.path), {})
    path.write_text('{"format": 1, "payloads": []}')  # no build_id
    with pytest.raises(UsageError, match="fix or remove"):
        SimTransport(path, env={})
