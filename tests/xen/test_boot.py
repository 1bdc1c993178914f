"""The QEMU plumbing itself: Debian's Xen boots, its tools and our Python work in dom0.

The canary of the real-Xen suite (:func:`canary_steps`, :func:`check_canary`) runs in the boot of
``tests/xen/test_apply_real.py`` as ``test_debian_xen_boots``: if it fails, every other test of
``tests/xen`` fails for the same reason.  The parser tests here need no QEMU and run in the fast
suite.
"""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from .qemu import BootResult, Script, _split_steps

# Debian bookworm's xen-hypervisor-4.17-amd64 4.17.5+72-g01140da4e8-1 (target-notes.md).
DEBIAN_BUILD_ID = "39a640e6f1412319235087391df9f1c5e13ae920"

# Opens the two device nodes the privcmd transport needs and maps one hypercall page.
_PRIVCMD_PROBE = """\
import mmap, os
fd = os.open("/dev/xen/privcmd", os.O_RDWR)
hc = os.open("/dev/xen/hypercall", os.O_RDWR)
page = mmap.mmap(hc, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
page[:4] = b"xsb!"
print("privcmd", fd >= 0, "hypercall page", bytes(page[:4]))
"""


def canary_steps(script: Script) -> Script:
    """The canary's steps, first in the boot of ``tests/xen/test_apply_real.py`` (a boot of its
    own cost a minute of TCG): the build-id, Debian's tools, the device nodes, privcmd from
    Python, xsbuild installed in dom0."""
    return (script
            .step("buildid", "od -An -tx1 /sys/hypervisor/properties/buildid | tr -d ' \\n'")
            .step("list", "xen-livepatch list")
            .step("devices", "test -c /dev/xen/privcmd && test -c /dev/xen/hypercall")
            .step("privcmd-python", f"python3 - <<'EOF'\n{_PRIVCMD_PROBE}EOF")
            .step("xsbuild-help", "python3 -m xsbuild --help")
            .step("xsbuild-version", "xsbuild --version"))


def check_canary(result: BootResult) -> None:
    why = result.describe()
    assert result.build_id == DEBIAN_BUILD_ID, why
    assert result.step("buildid").output.strip() == DEBIAN_BUILD_ID, why
    listed = result.step("list")
    assert listed.rc == 0 and "Nothing to list" in listed.output, why
    assert result.step("devices").rc == 0, f"/dev/xen/privcmd or hypercall missing\n{why}"
    probe = result.step("privcmd-python")
    assert probe.rc == 0 and "privcmd True hypercall page b'xsb!'" in probe.output, probe.output
    helped = result.step("xsbuild-help")
    assert helped.rc == 0 and "Usage: xsbuild" in helped.output, helped.output
    version = result.step("xsbuild-version")
    assert version.rc == 0 and version.output.startswith("xsbuild, version"), version.output


# --------------------------------------------------------------------------- parser, no QEMU
def _result(serial: str, output: str) -> BootResult:
    return BootResult(rc=0, output=output, serial=serial, harness_log="", seconds=1.0)


def test_steps_split_output_and_serial_log() -> None:
    output = textwrap.dedent("""\
        @@XSB-STEP-BEGIN upload
        Uploading /payload/a.livepatch... completed

        @@XSB-STEP-END upload rc=0
        @@XSB-STEP-BEGIN apply
        no newline at end@@XSB-STEP-END apply rc=1
        @@XSB-STEP-BEGIN hang
        started
        """)
    serial = textwrap.dedent("""\
        (XEN) before any step
        @@XSB-STEP-BEGIN upload
        (XEN) livepatch: a: loaded
        dom0 text is not a Xen line
        @@XSB-STEP-END upload rc=0
        @@XSB-STEP-BEGIN apply
        Applying a... (XEN) livepatch: a: Applying 1 functions
        (XEN) livepatch: a finished APPLY with rc=-22
        @@XSB-STEP-END apply rc=1
        XENQEMU-DONE rc=0 uptime=3.1
        """)
    result = _result(serial, output)
    upload, apply, hang = (result.step(n) for n in ("upload", "apply", "hang"))
    assert (upload.rc, upload.output) == (0, "Uploading /payload/a.livepatch... completed\n\n")
    assert upload.xen_lines == ["(XEN) livepatch: a: loaded"]
    assert (apply.rc, apply.output) == (1, "no newline at end\n")
    assert apply.xen_lines == ["(XEN) livepatch: a: Applying 1 functions",
                               "(XEN) livepatch: a finished APPLY with rc=-22"]
    assert (hang.rc, hang.output) == (None, "started\n")
    assert result.booted
    assert result.hypervisor_errors() == ["(XEN) livepatch: a finished APPLY with rc=-22"]
    assert result.hypervisor_errors(expected=[r"finished APPLY with rc=-22$"]) == []
    with pytest.raises(AssertionError, match="step 'missing' did not run"):
        result.step("missing")


def test_hypervisor_errors_recognise_crashes_not_normal_boot() -> None:
    serial = textwrap.dedent("""\
        (XEN) MTRR default type: write-back
        (XEN) livepatch: lp finished APPLY with rc=0
        [    1.5] PCI: Using host bridge windows from ACPI; if necessary, report a bug
        (XEN) ----[ Xen-4.17.5  x86_64  debug=n  Not tainted ]----
        (XEN) Xen call trace:
        (XEN) Panic on CPU 0:
        Applying lp... (XEN) FATAL PAGE FAULT
        (XEN) Assertion 'x' failed at common/livepatch.c:42
        [    2.0] Kernel panic - not syncing: Attempted to kill init!
        """)
    errors = _result(serial, "").hypervisor_errors()
    assert errors == [
        "(XEN) ----[ Xen-4.17.5  x86_64  debug=n  Not tainted ]----",
        "(XEN) Panic on CPU 0:",
        "(XEN) FATAL PAGE FAULT",
        "(XEN) Assertion 'x' failed at common/livepatch.c:42",
        "[    2.0] Kernel panic - not syncing: Attempted to kill init!",
    ]
    assert not _result(serial, "").booted


def test_script_rejects_bad_and_duplicate_step_names() -> None:
    script = Script().step("a", "true")
    with pytest.raises(ValueError, match="defined twice"):
        script.step("a", "true")
    with pytest.raises(ValueError, match="use letters"):
        script.step("two words", "true")


def test_rendered_script_runs_in_a_real_shell() -> None:
    # The same file dom0's busybox sh runs, here under the host's POSIX sh.
    script = (Script(preamble="GREETING=hello")
              .step("ok", "echo $GREETING; echo to-stderr >&2")
              .step("fails", "echo partial; exit 3")
              .step("after", "printf 'no newline'"))
    proc = subprocess.run(["sh", "-c", script.render()], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    steps = _split_steps(proc.stdout, xen_only=False)
    assert [(s.name, s.rc, s.output) for s in steps.values()] == [
        ("ok", 0, "hello\nto-stderr\n"),
        ("fails", 3, "partial\n"),
        ("after", 0, "no newline\n"),
    ]
