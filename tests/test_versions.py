"""Per-release rules (xsbuild/xen_versions.py), each pinned by a mutation: one gcc-built payload
that one Xen release accepts and another refuses, with the exact errno and message on each side;
and the release read from xen-syms (Debian's real one when present, gcc-built stand-ins).

The payloads come from ``tests/support/handmade.py`` (gcc with Xen's flags, ``ld -r``); the
hypervisor side is the session's hand-made image, or the simulator running a given release.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.support.handmade import build_hypervisor
from tests.support.image import Image
from tests.support.toolchain import Toolchain
from tests.test_apply_sim import (  # noqa: F401 - fixtures shared with the apply tests
    PayloadFactory,
    _no_real_hypercalls,
    hv,
    make_payload,
    other_hv,
)
from xsbuild import xen_abi
from xsbuild.check import CheckReport, ProblemKind, check_payload
from xsbuild.cli import main
from xsbuild.errors import HypercallError
from xsbuild.hypercall import SysctlBackend
from xsbuild.hypercall.sim import SimTransport
from xsbuild.xen_versions import (
    Target,
    VersionSource,
    XenVersion,
    read_xen_version,
    target_for,
)
from xsbuild.xensyms import XenSymbols

DEBIAN_XEN_SYMS = (Path.home() / ".cache/xsbuild/debian/4.17.5+72-g01140da4e8-1"
                   / "xen-4.17.5+72-g01140da4e8/xen/xen-syms")


def at(version: str, **config: object) -> Target:
    return Target(XenVersion.parse(version), VersionSource.OPTION, **config)  # type: ignore[arg-type]


def check(path: Path, version: str, xs: XenSymbols | None = None, **config: object
          ) -> CheckReport:
    return check_payload(path.read_bytes(), xs, target=at(version, **config))


def only(report: CheckReport) -> tuple[int, str, ProblemKind]:
    assert len(report.problems) == 1, report.problems
    p = report.problems[0]
    return p.errno, p.message, p.kind


# ------------------------------------------------------------------------------------------------
# Payload sources: alternatives and alternative calls written in assembly, as Xen's macros emit

ALT_SITE = """\
asm ( ".pushsection .text.lp_alt_site, \\"ax\\", @progbits\\n"
      ".globl lp_alt_site\\n.hidden lp_alt_site\\n.type lp_alt_site, @function\\n"
      "lp_alt_site:\\n 662: nop; nop; nop; nop\\n 663: ret\\n"
      ".size lp_alt_site, . - lp_alt_site\\n"
      ".popsection\\n"
      ".pushsection .rodata.lp_alt_data, \\"a\\", @progbits\\n"
      "lp_alt_data: .quad 0\\n"
      ".popsection\\n"
      ".pushsection .altinstr_replacement, \\"ax\\", @progbits\\n"
      "664: .skip %d, 0x90\\n 665:\\n"
      ".popsection\\n"
      ".pushsection .altinstructions, \\"a\\", @progbits\\n"
      " .long %s - .\\n .long 664b - .\\n .word 0\\n"
      " .byte 663b - 662b\\n .byte 665b - 664b\\n .byte 0\\n .byte 0\\n"
      ".popsection" );
"""

ALT_CALL_SITE = """\
void (*lp_hook_ptr)(void);
asm ( ".pushsection .text.lp_altcall, \\"ax\\", @progbits\\n"
      ".globl lp_altcall\\n.hidden lp_altcall\\n.type lp_altcall, @function\\n"
      "lp_altcall:\\n 666: call *lp_hook_ptr(%%rip)\\n ret\\n"
      ".size lp_altcall, . - lp_altcall\\n"
      ".popsection\\n"
      ".pushsection .alt_call_sites, \\"a\\", @progbits\\n"
      " .long %s - .\\n"
      ".popsection" );
"""


def alt_payload(make: PayloadFactory, name: str, orig: str, repl_len: int) -> Path:
    return make(name, extra_sources={f"livepatch/{name}_alt.c": ALT_SITE % (repl_len, orig)})


def altcall_payload(make: PayloadFactory, name: str, site: str) -> Path:
    return make(name, extra_sources={f"livepatch/{name}_altcall.c": ALT_CALL_SITE % site})


# ------------------------------------------------------------------------------------------------
# Loader rules, one mutation each


def test_xen_depends_first_from_4_20_and_backports(make_payload: PayloadFactory,  # noqa: F811
                                                   other_hv: Image, hv: Image) -> None:  # noqa: F811
    """Spec §1.6/§8: 4.17 checks .livepatch.xen_depends last, 4.20 (and 4.18.4, 4.19.1) first:
    a payload for another hypervisor that also has a relocation Xen refuses fails with
    -EOPNOTSUPP on one and -EINVAL on the other."""
    path = make_payload("foreign_bad_reloc", against=other_hv, bad_reloc=True)
    xs = XenSymbols.load(hv.path)
    old, new = check(path, "4.17.5", xs), check(path, "4.20.4", xs)
    assert old.first_errno == xen_abi.EOPNOTSUPP
    assert "unhandled relocation type R_X86_64_32" in old.problems[0].message
    assert new.first_errno == xen_abi.EINVAL
    assert new.problems[0].message.startswith("check against hypervisor build-id failed")
    for version in ("4.18.4", "4.19.1"):
        assert check(path, version, xs).first_errno == xen_abi.EINVAL
    for version in ("4.18.3", "4.19.0"):
        assert check(path, version, xs).first_errno == xen_abi.EOPNOTSUPP


@pytest.mark.parametrize(("version", "errno"), [("4.17.5", xen_abi.EOPNOTSUPP),
                                                ("4.19.0", xen_abi.EOPNOTSUPP),
                                                ("4.20.4", xen_abi.EINVAL)])
def test_simulated_upload_order(tmp_path: Path, hv: Image, other_hv: Image,  # noqa: F811
                                make_payload: PayloadFactory, version: str,  # noqa: F811
                                errno: int) -> None:
    """The simulator's UPLOAD returns the errno of the release it runs (the loader's order)."""
    path = make_payload("foreign_bad_reloc", against=other_hv, bad_reloc=True)
    backend = SysctlBackend(SimTransport(tmp_path / "s.json", str(hv.path),
                                         {"XSBUILD_SIM_XEN_VERSION": version}))
    with pytest.raises(HypercallError) as exc:
        backend.upload("x", path.read_bytes())
    assert exc.value.errno_value == errno


def test_alternatives_bounds_from_4_17_4(make_payload: PayloadFactory) -> None:  # noqa: F811
    """Spec §1.4: from 4.17.4 an alternative whose original instructions are not in the
    payload's text is -EINVAL; 4.17.3 accepts it and patches wherever it points (a hazard)."""
    path = alt_payload(make_payload, "alt_outside", "lp_alt_data", 4)
    assert check(path, "4.17.3").problems and check(path, "4.17.5").problems
    errno, message, kind = only(check(path, "4.17.5"))
    assert (errno, kind) == (xen_abi.EINVAL, ProblemKind.LOADER)
    assert message == ".altinstructions entry 0: original instructions not in the payload's text"
    errno, message, kind = only(check(path, "4.17.3"))
    assert (errno, kind) == (xen_abi.EINVAL, ProblemKind.HAZARD)
    assert message.endswith("(Xen 4.17.3 does not check this and patches wherever it points)")
    assert check(alt_payload(make_payload, "alt_inside", "662b", 4), "4.17.5").ok


def test_alternative_too_long_enospc_from_4_20(make_payload: PayloadFactory) -> None:  # noqa: F811
    """Spec §1.4: a replacement longer than its site BUG()s 4.17 while applying it (the host
    crashes: a hazard); 4.20 (and 4.18.4, 4.19.1) refuses the upload with -ENOSPC."""
    path = alt_payload(make_payload, "alt_long", "662b", 9)
    errno, message, kind = only(check(path, "4.17.5"))
    assert (errno, kind) == (xen_abi.EINVAL, ProblemKind.HAZARD)
    assert message == (".altinstructions entry 0: replacement of 9 bytes does not fit 4+0: "
                       "Xen 4.17.5 would BUG() (crash the host) applying it")
    errno, message, kind = only(check(path, "4.20.4"))
    assert (errno, kind) == (xen_abi.ENOSPC, ProblemKind.LOADER)
    assert message == ".altinstructions entry 0: replacement of 9 bytes does not fit 4+0"


@pytest.mark.parametrize("version", ["4.17.1", "4.17.2", "4.18.0", "4.17", "4.18"])
def test_read_only_funcs_trap(make_payload: PayloadFactory, version: str) -> None:  # noqa: F811
    """Spec §1.5: 4.17.1, 4.17.2 and 4.18.0 write into .livepatch.funcs at APPLY with CR0.WP
    set, so a read-only one crashes the host; 4.17.0, 4.17.3+ and 4.18.1+ take it.  A release
    whose patch level is unknown is refused too (it may be one of them)."""
    path = make_payload("ro_funcs", funcs_flags="alloc,readonly")
    errno, message, kind = only(check(path, version))
    assert (errno, kind) == (xen_abi.EINVAL, ProblemKind.HAZARD)
    assert message == (f".livepatch.funcs is read-only: Xen {version} writes into it at APPLY "
                       "and would page-fault (crash the host); make it writable "
                       "(SHF_ALLOC|SHF_WRITE)")
    for fine in ("4.17.0", "4.17.3", "4.17.5", "4.18.1", "4.19.6", "4.21.2"):
        assert check(path, fine).ok, fine
    assert check_payload(path.read_bytes()).ok  # no version: the rules all releases share


def test_alt_call_sites_from_4_21(make_payload: PayloadFactory) -> None:  # noqa: F811
    """Spec §8: 4.21 patches the indirect calls .alt_call_sites names; older releases load the
    section as plain data and never patch them (refused as a hazard, -EOPNOTSUPP); a 4.21 built
    without CONFIG_ALTERNATIVE_CALL refuses it (-EOPNOTSUPP); a site outside the text: -EINVAL."""
    good = altcall_payload(make_payload, "altcall", "666b")
    assert check(good, "4.21.2").ok and check(good, "4.21.2", alternative_call=True).ok
    errno, message, kind = only(check(good, "4.20.4"))
    assert (errno, kind) == (xen_abi.EOPNOTSUPP, ProblemKind.HAZARD)
    assert message.startswith(".alt_call_sites: Xen 4.20.4 does not know it (4.21+)")
    errno, message, kind = only(check(good, "4.21.2", alternative_call=False))
    assert (errno, kind) == (xen_abi.EOPNOTSUPP, ProblemKind.LOADER)
    assert "CONFIG_ALTERNATIVE_CALL" in message
    outside = altcall_payload(make_payload, "altcall_data", "lp_hook_ptr")
    assert only(check(outside, "4.21.2")) == (
        xen_abi.EINVAL, ".alt_call_sites entry 0: call site outside the payload's text",
        ProblemKind.LOADER)


@pytest.mark.parametrize("version", ["4.17.5", "4.18.0", "4.19.6", "4.20.4", "4.21.2"])
def test_force_flag_in_the_hypervisor(tmp_path: Path, hv: Image,  # noqa: F811
                                      make_payload: PayloadFactory, version: str) -> None:  # noqa: F811
    """Spec §4.2: the op's pad must be 0 before 4.19 (-EINVAL); from 4.19 it is flags and FORCE
    is accepted.  Sent raw (the apply library refuses it earlier, see test_apply_cli)."""
    backend = SysctlBackend(SimTransport(tmp_path / "s.json", str(hv.path),
                                         {"XSBUILD_SIM_XEN_VERSION": version}))
    assert str(backend.xen_version()) == version
    data = make_payload("hello").read_bytes()
    if XenVersion.parse(version) < XenVersion(4, 19, 0):
        with pytest.raises(HypercallError) as exc:
            backend.upload("hello", data, xen_abi.LIVEPATCH_FLAG_FORCE)
        assert exc.value.errno_value == xen_abi.EINVAL
    else:
        backend.upload("hello", data, xen_abi.LIVEPATCH_FLAG_FORCE)
        with pytest.raises(HypercallError) as exc:
            backend.upload("other", data, 2)  # another bit without FORCE
        assert exc.value.errno_value == xen_abi.EINVAL
    expect = 0x16 if version == "4.21.2" else 0x15
    assert backend.interface_version() == expect


# ------------------------------------------------------------------------------------------------
# The release, read from xen-syms


@pytest.mark.skipif(not DEBIAN_XEN_SYMS.exists(), reason="Debian's built 4.17 tree is not cached")
def test_debian_xen_syms_is_4_17_5() -> None:
    """Debian's xen-syms embeds its .config ("# Xen/x86 4.17.5 Configuration"), and its version
    functions return 4 and 17 with extra version ".5": both sources agree."""
    from xsbuild import xen_versions

    xs = XenSymbols.load(DEBIAN_XEN_SYMS)
    target = read_xen_version(xs)
    assert target == Target(XenVersion(4, 17, 5), VersionSource.CONFIG, True)
    assert xen_versions._version_from_code(xs) == XenVersion(4, 17, 5)


def _version_source(major: int, minor: int, extra: str) -> str:
    return (f'unsigned int xen_major_version(void);\nunsigned int xen_minor_version(void);\n'
            f'const char *xen_extra_version(void);\n'
            f'unsigned int xen_major_version(void) {{ return {major}; }}\n'
            f'unsigned int xen_minor_version(void) {{ return {minor}; }}\n'
            f'const char *xen_extra_version(void) {{ return "{extra}"; }}\n')


def _config_source(config: str) -> str:
    blob = gzip.compress(config.encode(), mtime=0)
    body = ", ".join(str(b) for b in blob)
    return (f"extern const unsigned char xen_config_data[];\n"
            f"extern const unsigned int xen_config_data_size;\n"
            f"const unsigned char xen_config_data[] = {{ {body} }};\n"
            f"const unsigned int xen_config_data_size = {len(blob)};\n")


@pytest.fixture(scope="module")
def stand_ins(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """gcc-built xen-syms stand-ins: one with an embedded .config (4.21.2, no altcall), one with
    only the version functions (4.19.6), one with neither."""
    out = tmp_path_factory.mktemp("versions")
    config = "#\n# Automatically generated file; DO NOT EDIT.\n# Xen/x86 4.21.2 Configuration\n" \
             "#\nCONFIG_LIVEPATCH=y\n# CONFIG_ALTERNATIVE_CALL is not set\n"
    images = {
        "config": {"common/version.c": _version_source(4, 21, ".2"),
                   "common/config_data.c": _config_source(config)},
        "code": {"common/version.c": _version_source(4, 19, ".6-vendor")},
        "none": None,
    }
    return {name: build_hypervisor(toolchain, out / f"{name}-xen-syms", sources=src).path
            for name, src in images.items()}


def test_version_from_stand_ins(stand_ins: dict[str, Path]) -> None:
    assert read_xen_version(XenSymbols.load(stand_ins["config"])) == Target(
        XenVersion(4, 21, 2), VersionSource.CONFIG, False)
    assert read_xen_version(XenSymbols.load(stand_ins["code"])) == Target(
        XenVersion(4, 19, 6), VersionSource.CODE, None)
    assert read_xen_version(XenSymbols.load(stand_ins["none"])) is None


def test_option_and_xen_syms_must_agree(stand_ins: dict[str, Path]) -> None:
    from xsbuild.errors import UsageError

    xs = XenSymbols.load(stand_ins["code"])
    assert target_for("4.19", xs).version == XenVersion(4, 19, 6)
    assert target_for(None, None).version is None
    assert target_for("4.20.1", None) == Target(XenVersion(4, 20, 1), VersionSource.OPTION)
    with pytest.raises(UsageError, match="contradicts"):
        target_for("4.17.5", xs)
    with pytest.raises(UsageError, match=r"older than 4\.17"):
        target_for("4.16.2", None)


@pytest.mark.parametrize("text", ["4", "four.17", "4.17.x", ""])
def test_bad_versions(text: str) -> None:
    from xsbuild.errors import UsageError

    with pytest.raises(UsageError, match="bad Xen version"):
        XenVersion.parse(text)


def test_check_cli_reports_the_version(stand_ins: dict[str, Path], make_payload: PayloadFactory,  # noqa: F811
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`xsbuild check` says which release it checked against and how it learned it."""
    good = altcall_payload(make_payload, "altcall", "666b")

    def run(*args: str) -> tuple[int, str]:
        try:
            main(["check", str(good), *args])
        except SystemExit as exc:
            return int(exc.code or 0), capsys.readouterr().out
        return 0, capsys.readouterr().out

    rc, out = run("--xen-version", "4.21.2", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["xen_version"]["version"] == "4.21.2"
    assert doc["xen_version"]["source"] == "option" and doc["xen_version"]["rules"][
        "alt-call-sites"] is True
    rc, out = run("--xen-version", "4.19.6")
    assert rc == 1 and "(hazard: Xen accepts it)" in out
    assert "checked with the loader rules of Xen 4.19.6 (from option)" in out
    rc, out = run("--xen-syms", str(stand_ins["config"]), "--json")
    doc = json.loads(out)
    assert doc["xen_version"] == {**doc["xen_version"], "version": "4.21.2",
                                  "source": "xen-syms .config", "alternative_call": False}
    assert doc["problems"][0]["kind"] == "loader"
    rc, _ = run("--xen-syms", str(stand_ins["code"]), "--xen-version", "4.20")
    assert rc == 2
