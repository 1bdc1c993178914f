"""Issue 3's proof on real Xen: source patches -> ``xsbuild build`` -> Debian's Xen in QEMU.

Every patch of ``tests/xen/patches/`` is built with ``xsbuild build`` against Debian's own tree
and ``-dbg`` ``xen-syms`` (the patch's ``xsbuild-build-args:`` header line, if any, adds
options).  One boot then uploads, applies, observes, reverts and unloads all the good ones with
Debian's ``xen-livepatch``; the effect is read from ``/sys/hypervisor`` (which calls the patched
functions live) or from the hypervisor console.  The two refused patches must fail at build time
with the right message.

| patch | case | observed |
|---|---|---|
| 01 | a changed function | version/extra |
| 02 | stacked on 01 (``--depends``), revert order | changeset; reverting 01 first fails |
| 03 | REPLACE over 01+02 | extra changes, changeset back |
| 04 | new function, new static data | extra counts up between reads |
| 05 | string-only change | changeset |
| 06 | static locals | compilation/compile_date counts up |
| 07 | exception-table entry (do_xen_version) | changeset |
| 08 | alternatives (printk_start_of_line) | console prefix |
| 09 | bug frames: WARN_ON fires once, BUG_ON, ASSERT | "Xen WARN at common/version.c" |
| 10 | load/unload, pre/post apply/revert hooks | hook messages on the console, in order |
| 11 | inline in a header, two objects | extra and changeset |
| 12 | a new source file | extra |
| 13, 14 | changed data, ``__init``-only change | build refused, exit 1 |
| 15 | a member added to ``struct domain`` (a layout change) | build refused, exit 1, by name |
| 16 | a changed static const table, its unchanged reader replaced too | extra |
| 17 | a sized assembly function sharing ``.text`` (load_guest_gprs) | dom0's port reads |

Every good payload is built with ``--prove``: it must be proven against the hypervisor the tree's
own make builds from the same patch (``test_payloads_proven``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import BootFn
from .debian_tree import DebianTree
from .qemu import BootResult, Script

pytestmark = pytest.mark.xen

PATCHES = Path(__file__).resolve().parent / "patches"
# One line per read, whatever the file holds: sysfs ends most values with a newline, and Debian's
# changeset is empty ("\n"); the command substitution strips it, echo adds exactly one.
EXTRA = 'echo "$(cat /sys/hypervisor/version/extra)"'
CHANGESET = 'echo "$(cat /sys/hypervisor/properties/changeset)"'
COMPILE_DATE = 'echo "$(cat /sys/hypervisor/compilation/compile_date)"'
# dom0's kernel runs in ring 3, so each port read traps to Xen, whose emulation stub calls
# load_guest_gprs (patch 17): 20 reads of ports 0x80-0x87 (POST and DMA page registers), one
# line each, through Linux's /dev/port.
PORTS = ("for i in $(seq 20); do dd if=/dev/port bs=8 skip=16 count=1 2>/dev/null "
         "| od -An -tx1; done")
# The WARN_ON of patch 09 fires on purpose: its report is expected, nothing else is.
EXPECTED_XEN_ERRORS = re.compile(r"Xen WARN at common/version\.c|----\[ Xen-")


@dataclass(frozen=True)
class Built:
    """A payload built by ``xsbuild build`` and its ``--json`` summary."""

    name: str
    path: Path
    build_id: str
    summary: dict[str, object]

    @property
    def dom0_path(self) -> str:
        return f"/payload/{self.path.name}"


def patch_path(stem: str) -> Path:
    [path] = PATCHES.glob(f"{stem}-*.patch")
    return path


def header_args(patch: Path) -> list[str]:
    """Extra ``xsbuild build`` options a patch asks for in its header."""
    for line in patch.read_text().splitlines():
        if line.startswith("xsbuild-build-args:"):
            return line.split(":", 1)[1].split()
        if line.startswith("--- "):
            break
    return []


def run_build(tree: DebianTree, patch: Path, out: Path,
              *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "xsbuild", "build", "--srcdir", str(tree.source_top),
            "--patch", str(patch), "--xen-syms", str(tree.debian_xen_syms), "-o", str(out),
            "--json", *header_args(patch), *extra]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def build(tree: DebianTree, stem: str, out_dir: Path, *extra: str) -> Built:
    patch = patch_path(stem)
    out = out_dir / f"{patch.stem}.livepatch"
    # --prove: the payload must also be what the tree's own make builds from the patch
    # (issue 9); the proof is in the summary, and a payload not proven fails the build.
    run = run_build(tree, patch, out, "--prove", *extra)
    assert run.returncode == 0, f"xsbuild build {patch.name} failed:\n{run.stderr}"
    summary = json.loads(run.stdout)
    assert summary["status"] == "ok" and out.is_file()
    return Built(summary["name"], out, summary["build_id"], summary)


# The directories the patches touch.
PATCHED_DIRS = ("xen/common", "xen/include/xen", "xen/drivers/char")


def snapshot(top: Path, subdirs: tuple[str, ...] = PATCHED_DIRS) -> dict[str, tuple[int, int]]:
    """mtime and size of every file under ``subdirs`` of ``top``."""
    snap = {}
    for sub in subdirs:
        for dirpath, _dirs, files in os.walk(top / sub):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                snap[os.path.join(dirpath, name)] = (st.st_mtime_ns, st.st_size)
    return snap


@pytest.fixture(scope="module")
def payloads(debian_tree: DebianTree, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Built]:
    out = tmp_path_factory.mktemp("payloads")
    before = snapshot(debian_tree.source_top)
    built = {"01": build(debian_tree, "01", out)}
    built["02"] = build(debian_tree, "02", out, "--depends", built["01"].build_id)
    for stem in ("03", "04", "05", "06", "07", "08", "09", "10", "11", "12", "16", "17"):
        built[stem] = build(debian_tree, stem, out)
    assert snapshot(debian_tree.source_top) == before, "xsbuild build wrote into the tree"
    return built


# --------------------------------------------------------------------------- build time
def test_payloads_proven(payloads: dict[str, Built]) -> None:
    # Every good scenario's payload is, function by function, the patched hypervisor's code,
    # and carries every function the patch changes in it (xsbuild prove, issue 9).
    for stem, built in payloads.items():
        proof = built.summary["proof"]
        assert proof["verdict"] == "proven", (stem, proof["differences"][:3])
        carried = {f["name"] for f in proof["functions"]}
        assert proof["changed_in_xen"] and set(proof["changed_in_xen"]) <= carried, stem


@pytest.mark.parametrize(("stem", "needles"), [
    ("13", ("sercon_handle", "changed initialised data")),
    ("14", ("cmdline_parse", "__init")),
    ("15", ("struct-layout change: struct domain (include/xen/sched.h:367)",
            "member xsb_audit_count added at offset 4, size 4",
            "member max_vcpus moved: offset 4, size 4 -> offset 8, size 4")),
])
def test_refused_at_build_time(debian_tree: DebianTree, tmp_path: Path, stem: str,
                               needles: tuple[str, ...]) -> None:
    out = tmp_path / "refused.livepatch"
    run = run_build(debian_tree, patch_path(stem), out)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("xsbuild: error: ") and "Traceback" not in run.stderr
    for needle in needles:
        assert needle in run.stderr, run.stderr
    doc = json.loads(run.stdout)
    assert doc["status"] == "UnsupportedChangeError" and doc["refused"]
    assert not out.exists()


def test_build_summaries(payloads: dict[str, Built]) -> None:
    """The JSON summaries say what each payload carries (cross-checked on Xen below)."""
    def objects(stem: str) -> list[str]:
        return payloads[stem].summary["objects"]["changed_objects"]  # type: ignore[index]

    assert objects("01") == ["common/version.o"]
    assert payloads["01"].summary["changed_functions"] == ["xen_extra_version"]
    assert payloads["02"].summary["link"]["depends"] == payloads["01"].build_id  # type: ignore[index]
    assert "xsb_new_extra" in payloads["04"].summary["new_functions"]  # type: ignore[operator]
    assert "drivers/char/console.o" in objects("08")
    assert {"common/version.o", "common/kernel.o"} <= set(objects("11"))
    assert payloads["11"].summary["objects"]["unchanged_objects"]  # type: ignore[index]
    assert "common/xsb_new_file.o" in payloads["12"].summary["objects"]["new_objects"]  # type: ignore[index]
    # The table's unchanged reader is replaced too, so that it reads the payload's copy.
    assert sorted(payloads["16"].summary["changed_functions"]) == [  # type: ignore[arg-type]
        "xen_build_info", "xen_extra_version"]
    # Cut from the .text it shares with save_guest_gprs, which is not carried.
    assert objects("17") == ["arch/x86/pv/gpr_switch.o"]
    assert payloads["17"].summary["changed_functions"] == ["load_guest_gprs"]
    for built in payloads.values():
        assert set(built.summary["timings"]) >= {"capture", "diff", "link"}  # type: ignore[arg-type]


# --------------------------------------------------------------------------- on Xen
@dataclass(frozen=True)
class Tool:
    """The dom0 command that drives the payloads: both take ``upload NAME FILE``, ``apply``,
    ``revert``, ``replace``, ``unload`` and ``list`` alike."""

    command: str

    def once(self, args: str) -> str:
        return f"{self.command} {args}"

    def run(self, args: str) -> str:
        if self.command == "xsbuild":
            # Growing rendezvous timeouts, as on a busy host (TCG gathers vCPUs slowly).
            verb = args.split()[0]
            retry = " --retries 8 --timeout 200ms" if verb in ACTIONS else ""
            return f"xsbuild {args}{retry}"
        # xen-livepatch, retried while it says "busy, retry" (exit 2) as a TCG rendezvous may.
        return (f"(for try in 1 2 3 4 5; do {self.command} {args}; rc=$?; "
                "[ $rc = 2 ] || break; sleep 1; done; exit $rc)")


ACTIONS = ("apply", "revert", "replace", "unload")
XEN_LIVEPATCH = Tool("xen-livepatch")
XSBUILD = Tool("xsbuild")  # the project in dom0 (tests/xen/dom0py.py), privcmd backend


def lp(args: str) -> str:
    return XEN_LIVEPATCH.run(args)


def add_stack_steps(script: Script, p: dict[str, Built], tool: Tool = XEN_LIVEPATCH,
                    tag: str = "stack") -> None:
    """01, then 02 stacked on it; reverting 01 first is refused; the right order works;
    re-apply both; REPLACE the stack with 03; revert 03; unload all three.  Steps are named
    ``<tag>-...``, so one boot can run this with each tool."""
    n1, n2, n3 = p["01"].name, p["02"].name, p["03"].name
    (script.step(f"{tag}-up1", tool.run(f"upload {n1} {p['01'].dom0_path}"))
           .step(f"{tag}-ap1", tool.run(f"apply {n1}"))
           .step(f"{tag}-extra1", EXTRA)
           .step(f"{tag}-up2", tool.run(f"upload {n2} {p['02'].dom0_path}"))
           .step(f"{tag}-ap2", tool.run(f"apply {n2}"))
           .step(f"{tag}-chg2", CHANGESET)
           .step(f"{tag}-rv1-early", f"{tool.once(f'revert {n1}')}; echo rc=$?")
           .step(f"{tag}-extra1b", EXTRA)
           .step(f"{tag}-rv2", tool.run(f"revert {n2}"))
           .step(f"{tag}-rv1", tool.run(f"revert {n1}"))
           .step(f"{tag}-extra0", EXTRA)
           .step(f"{tag}-chg0", CHANGESET)
           .step(f"{tag}-re1", tool.run(f"apply {n1}"))
           .step(f"{tag}-re2", tool.run(f"apply {n2}"))
           .step(f"{tag}-up3", tool.run(f"upload {n3} {p['03'].dom0_path}"))
           .step(f"{tag}-replace3", tool.run(f"replace {n3}"))
           .step(f"{tag}-extra3", EXTRA)
           .step(f"{tag}-chg3", CHANGESET)
           .step(f"{tag}-list3", tool.once("list"))
           .step(f"{tag}-rv3", tool.run(f"revert {n3}"))
           .step(f"{tag}-extra-end", EXTRA)
           .step(f"{tag}-unload", " && ".join(tool.run(f"unload {n}") for n in (n1, n2, n3))))


# The single payloads: what to read while applied.
OBSERVE = {
    "04": f"{EXTRA}; {EXTRA}",
    "05": CHANGESET,
    "06": f"{COMPILE_DATE}; {COMPILE_DATE}",
    "07": CHANGESET,
    "08": EXTRA,
    "09": EXTRA,
    "10": EXTRA,
    "11": f"{EXTRA}; {CHANGESET}",
    "12": EXTRA,
    "16": EXTRA,
    "17": PORTS,
}


def add_single_steps(script: Script, stem: str, built: Built,
                     tool: Tool = XEN_LIVEPATCH) -> None:
    n = built.name
    (script.step(f"s{stem}-up", tool.run(f"upload {n} {built.dom0_path}"))
           .step(f"s{stem}-ap", tool.run(f"apply {n}"))
           .step(f"s{stem}-obs", OBSERVE[stem])
           .step(f"s{stem}-rv", tool.run(f"revert {n}"))
           .step(f"s{stem}-after", f"{EXTRA}; {CHANGESET}; {COMPILE_DATE}")
           .step(f"s{stem}-ul", tool.run(f"unload {n}")))


def lines(result: BootResult, step: str) -> list[str]:
    """The values a read step printed, one per read (empty values included)."""
    return [line.strip() for line in result.step(step).output.splitlines()]


def xen_text(result: BootResult, *steps: str) -> str:
    return "\n".join(line for s in steps for line in result.step(s).xen_lines)


def test_payloads_on_debian_xen(xen_boot: BootFn, payloads: dict[str, Built]) -> None:
    script = (Script()
              .step("extra-before", EXTRA)
              .step("chg-before", CHANGESET)
              .step("date-before", COMPILE_DATE)
              .step("ports-before", PORTS))
    add_stack_steps(script, payloads)
    for stem in OBSERVE:
        add_single_steps(script, stem, payloads[stem])
    script.step("list-end", "xen-livepatch list")
    files = {b.path: b.dom0_path for b in payloads.values()}
    result = xen_boot(script, files, timeout=600)
    why = result.describe()

    expected_failures = {"stack-rv1-early"}
    for step in result.steps.values():
        if step.name not in expected_failures:
            assert step.rc == 0, f"step {step.name} failed (rc={step.rc}):\n{step.output}\n{why}"
    errors = [e for e in result.hypervisor_errors() if not EXPECTED_XEN_ERRORS.search(e)]
    # The refused out-of-order revert is the one livepatch error we provoke.
    errors = [e for e in errors if not re.search(rf"{payloads['01'].name}.*REVERT", e)]
    assert errors == [], why

    extra0, chg0, date0 = (lines(result, s)[0] for s in ("extra-before", "chg-before",
                                                         "date-before"))
    check_stack(result, payloads, extra0, chg0, why)
    check_singles(result, extra0, chg0, date0, why)
    assert "Nothing to list" in result.step("list-end").output, why


def check_stack(result: BootResult, p: dict[str, Built], extra0: str, chg0: str,
                why: str, tag: str = "stack") -> None:
    assert lines(result, f"{tag}-extra1") == [extra0 + "-xsb-changed"], why
    assert lines(result, f"{tag}-chg2") == ["xsb-stacked"], why
    # Revert order rule: 01 cannot be reverted while 02, applied after it, is (-EBUSY).
    early = result.step(f"{tag}-rv1-early").output
    assert "rc=0" not in early, early
    assert lines(result, f"{tag}-extra1b") == [extra0 + "-xsb-changed"], why
    assert lines(result, f"{tag}-extra0") == [extra0], why
    assert lines(result, f"{tag}-chg0") == [chg0], why
    assert lines(result, f"{tag}-extra3") == [extra0 + "-xsb-replace"], why
    assert lines(result, f"{tag}-chg3") == [chg0], why  # 02 was replaced too
    listing = result.step(f"{tag}-list3").output
    assert re.search(rf"^{p['03'].name}\s.*APPLIED", listing, re.MULTILINE), listing
    for stem in ("01", "02"):
        assert re.search(rf"^{p[stem].name}\s.*CHECKED", listing, re.MULTILINE), listing
    assert lines(result, f"{tag}-extra-end") == [extra0], why


def _counts(values: list[str], pattern: str) -> list[int]:
    found = [re.fullmatch(pattern, v) for v in values]
    assert all(found), (values, pattern)
    return [int(m.group(1)) for m in found if m]


def _order(text: str, *hooks: str) -> bool:
    """The hooks' messages appear in ``text``, in this order."""
    at = [text.find(f"xsb-hook: {h}") for h in hooks]
    return -1 not in at and at == sorted(at)


def check_singles(result: BootResult, extra0: str, chg0: str, date0: str, why: str,
                  stems: tuple[str, ...] = tuple(OBSERVE)) -> None:
    """What each single payload of ``stems`` did while applied, and that reverting it restored
    the original behaviour."""
    for stem in stems:
        SINGLE_CHECKS[stem](result, extra0, why)
        assert lines(result, f"s{stem}-after") == [extra0, chg0, date0], (stem, why)


def _check_04(result: BootResult, extra0: str, why: str) -> None:
    n04 = _counts(lines(result, "s04-obs"), re.escape(extra0) + r"-xsb-new-(\d+)")
    assert len(n04) == 2 and n04[1] > n04[0], n04


def _check_06(result: BootResult, extra0: str, why: str) -> None:
    n06 = _counts(lines(result, "s06-obs"), r"xsb-static-local-(\d+)")
    assert len(n06) == 2 and n06[1] > n06[0], n06


def _check_08(result: BootResult, extra0: str, why: str) -> None:
    applied = xen_text(result, "s08-ap", "s08-obs")
    assert "(XEN) xsb-alt " in applied, applied
    assert "xsb-alt" not in xen_text(result, "s08-after", "s08-ul"), why


def _check_09(result: BootResult, extra0: str, why: str) -> None:
    assert lines(result, "s09-obs") == [extra0 + "-xsb-bug"], why
    assert "Xen WARN at common/version.c" in xen_text(result, "s09-obs"), why


def _check_10(result: BootResult, extra0: str, why: str) -> None:
    # Xen runs the load hooks inside APPLY and the unload hooks inside REVERT (spec §3.3), in
    # this order around the pre/post hooks; nothing at upload or unload.
    hooks = {step: xen_text(result, f"s10-{step}") for step in ("up", "ap", "rv", "ul")}
    assert "xsb-hook" not in hooks["up"] + hooks["ul"], hooks
    assert _order(hooks["ap"], "preapply", "load", "postapply"), hooks
    assert _order(hooks["rv"], "prerevert", "unload", "postrevert"), hooks
    assert lines(result, "s10-obs") == [extra0 + "-xsb-hooks"], why


def _check_17(result: BootResult, extra0: str, why: str) -> None:
    # Every port read of dom0 went through the patched load_guest_gprs, and read what it did
    # before the patch (the change is invisible to guests by design).
    ports0, ports17 = lines(result, "ports-before"), lines(result, "s17-obs")
    assert len(ports17) == 20 and all(re.fullmatch(r"([0-9a-f]{2} ){7}[0-9a-f]{2}", v)
                                      for v in ports17), ports17
    assert set(ports17) == set(ports0), (ports0, ports17)


def _reads(step: str, *expected: str) -> Callable[[BootResult, str, str], None]:
    """A check that ``step`` read exactly ``expected``."""
    def check(result: BootResult, extra0: str, why: str) -> None:
        assert lines(result, step) == list(expected), why
    return check


SINGLE_CHECKS: dict[str, Callable[[BootResult, str, str], None]] = {
    "04": _check_04,
    "05": _reads("s05-obs", "xsb-string-only"),
    "06": _check_06,
    "07": _reads("s07-obs", "xsb-extable"),
    "08": _check_08,
    "09": _check_09,
    "10": _check_10,
    "11": _reads("s11-obs", "xsb-inline", "xsb-inline"),
    "12": _reads("s12-obs", "xsb-new-file"),
    "16": _reads("s16-obs", "xsb-tbl debug=n"),
    "17": _check_17,
}
