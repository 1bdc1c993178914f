"""``xsbuild demo``: the whole pipeline on a bundled example, ending in patched code that runs.

The example (``xsbuild/data/demo``) is a tiny stand-in for Xen's ``common/version.c`` and a
source patch that fixes a bug in it.  The demo does what a user does with a real hypervisor,
with the real commands' code, and shows each step:

STEP 1  compile the original with Xen 4.17's exact x86 flags and link a stand-in ``xen-syms``
        (:mod:`xsbuild.sandbox.toolchain`);
STEP 2  apply ``fix.patch`` to a copy of the source and compile the patched object;
STEP 3  diff the two objects (:func:`xsbuild.diff.diff_files`, as ``xsbuild diff``);
STEP 4  link the payload against the stand-in ``xen-syms`` (as ``xsbuild link``);
STEP 5  check it as Xen's loader would (as ``xsbuild check``);
STEP 6  run it: a child process maps the stand-in hypervisor, calls its functions, loads and
        applies the payload, calls them again, reverts, calls again (:mod:`xsbuild.sandbox`),
        and the same calls run on the patched build for comparison.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xsbuild.errors import UsageError, XsbuildError
from xsbuild.sandbox.loader import IMAGE_BASE
from xsbuild.sandbox.toolchain import link_image
from xsbuild.xensyms import read_build_id

DEMO_DATA = Path(__file__).resolve().parent / "data" / "demo"
SOURCE = "common/version.c"  # relative to the stand-in hypervisor's xen/ directory
PATCH = "fix.patch"
PAYLOAD_NAME = "demo"

Progress = Callable[[str], None]


class DemoFailed(XsbuildError):
    """A demo step failed although its inputs are bundled: the message says which and why."""


@dataclass(frozen=True, slots=True)
class DemoCall:
    """One call the demo makes, and what it shows."""

    fn: str
    args: tuple[int, ...]
    ret: str  # "str" or "int"/"uint", as :class:`xsbuild.sandbox.runner.Call`
    what: str


CALLS = (
    DemoCall("xen_extra_version", (), "str", "the version suffix (a string literal)"),
    DemoCall("xen_check_vcpus", (0,), "int", "0 vCPUs: the bug (0 = accepted)"),
    DemoCall("xen_check_vcpus", (4,), "int", "4 vCPUs: must stay accepted"),
    DemoCall("xen_extra_version_reads", (), "uint", "a counter the patch must not reset"),
)


@dataclass(slots=True)
class DemoStep:
    title: str
    command: str  # the equivalent xsbuild command line, for the user to copy
    lines: list[str] = field(default_factory=list)


@dataclass(slots=True)
class DemoReport:
    workdir: Path
    steps: list[DemoStep] = field(default_factory=list)
    calls: tuple[DemoCall, ...] = CALLS
    before: list[object] = field(default_factory=list)
    applied: list[object] = field(default_factory=list)
    reverted: list[object] = field(default_factory=list)
    expected_applied: list[object] = field(default_factory=list)  # from the patched build
    mismatches: list[str] = field(default_factory=list)


def run_demo(workdir: Path, progress: Progress = lambda _line: None) -> DemoReport:
    """Run STEPs 1-6 in ``workdir`` (created; must not exist or be empty)."""
    workdir = workdir.resolve()
    _prepare(workdir)
    report = DemoReport(workdir)

    def step(title: str, command: str) -> DemoStep:
        progress(title)
        report.steps.append(DemoStep(title, command))
        return report.steps[-1]

    orig_src, patched_src = _sources(workdir)
    s = step("compile the original and link the stand-in hypervisor (xen-syms)",
             f"gcc <Xen 4.17 flags> -c {SOURCE}; ld ... -o xen-syms")
    orig_obj, thunks, image = _build_original(workdir, orig_src)
    s.lines.append(f"{image.name}: build-id {read_build_id(image).hex()}")
    s = step(f"apply {PATCH} and compile the patched object",
             f"patch -p1 < {PATCH}; gcc <same flags> -c {SOURCE}")
    patched_obj = _compile(workdir / "patched", patched_src)
    s.lines.append(f"{patched_obj.relative_to(workdir)}")
    _diff(workdir, orig_obj, patched_obj, step("diff the two objects, function by function",
                                               "xsbuild diff orig/version.o patched/version.o "
                                               "-o out/version.o"))
    payload = _link(workdir, image, step("link the payload against xen-syms",
                                         f"xsbuild link out/version.o -o {PAYLOAD_NAME}"
                                         ".livepatch --xen-syms xen-syms"))
    _check(payload, image, step("check it the way Xen's loader will",
                                f"xsbuild check {PAYLOAD_NAME}.livepatch --xen-syms xen-syms"))
    step("run it: load the stand-in hypervisor, apply the payload, revert it",
         "(in dom0 on a real host: xsbuild load demo.livepatch)")
    patched_image = link_image([patched_obj, thunks], workdir / "xen-syms.patched",
                               base=IMAGE_BASE)
    _run(report, image, payload, patched_image)
    return report


def _prepare(workdir: Path) -> None:
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise UsageError(f"{workdir} exists and is not an empty directory")
    if shutil.which("patch") is None:
        raise UsageError("the demo needs 'patch' (Debian: apt-get install patch)")
    workdir.mkdir(parents=True, exist_ok=True)


def _sources(workdir: Path) -> tuple[Path, Path]:
    """The bundled source, and a copy with ``fix.patch`` applied by GNU patch (no fuzz)."""
    orig = workdir / "src" / "xen"
    shutil.copytree(DEMO_DATA / "xen", orig)
    patched = workdir / "src-patched" / "xen"
    shutil.copytree(orig, patched)
    shutil.copyfile(DEMO_DATA / PATCH, workdir / PATCH)
    run = subprocess.run(["patch", "-p1", "--batch", "--fuzz=0", "-d", str(patched.parent),
                          "-i", str(workdir / PATCH)], capture_output=True, text=True,
                         check=False)
    if run.returncode != 0:
        output = (run.stdout + run.stderr).strip().replace("\n", " ")
        raise DemoFailed(f"{PATCH} does not apply to the bundled source: {output}")
    return orig / SOURCE, patched / SOURCE


def _compile(out_dir: Path, src: Path) -> Path:
    from xsbuild.sandbox.toolchain import compile_c

    out_dir.mkdir(parents=True, exist_ok=True)
    return compile_c(src.read_text(), SOURCE, out_dir / "version.o")


def _build_original(workdir: Path, src: Path) -> tuple[Path, Path, Path]:
    """The original object, the thunks object, and the stand-in xen-syms linked from both."""
    from xsbuild.sandbox.toolchain import THUNKS, THUNKS_NAME, assemble

    obj = _compile(workdir / "orig", src)
    thunks = assemble(THUNKS.read_text(), THUNKS_NAME, workdir / "orig" / "indirect-thunk.o")
    image = link_image([obj, thunks], workdir / "xen-syms", base=IMAGE_BASE)
    return obj, thunks, image


def _diff(workdir: Path, orig: Path, patched: Path, step: DemoStep) -> None:
    from xsbuild.diff import diff_files

    out = workdir / "out" / "version.o"
    out.parent.mkdir()
    result = diff_files(orig, patched, out)
    for u in result.changed_functions:
        step.lines.append(f"changed: {u.xen_name} ({u.reason})")
    for u in result.new_functions + result.new_data:
        step.lines.append(f"new: {u.name}")
    same = [u.name for u in result.units if u.is_func and u.status == "same"]
    if same:
        step.lines.append(f"unchanged, left in the hypervisor: {', '.join(same)}")


def _link(workdir: Path, image: Path, step: DemoStep) -> Path:
    from xsbuild.linker import link_files

    payload = workdir / f"{PAYLOAD_NAME}.livepatch"
    result = link_files([workdir / "out" / "version.o"], payload, xen_syms=image)
    for f in result.funcs:
        step.lines.append(f"patches {f.name} at {f.old_addr:#x} ({f.old_size} bytes, "
                          f"new code {f.new_size} bytes)")
    step.lines.append(f"{payload.name}: {result.size} bytes, build-id {result.build_id.hex()}")
    return payload


def _check(payload: Path, image: Path, step: DemoStep) -> None:
    from xsbuild.check import check_payload
    from xsbuild.xensyms import XenSymbols

    report = check_payload(payload.read_bytes(), XenSymbols.load(image))
    if not report.ok:
        raise DemoFailed("the demo payload fails the loader checks: "
                         + "; ".join(str(p) for p in report.problems))
    step.lines.append("OK: Xen's loader would accept it")


def _run(report: DemoReport, image: Path, payload: Path, patched_image: Path) -> None:
    """Apply ``payload`` to ``image`` in a child process; ``patched_image`` (the patched build,
    linked the same way) says what the patched code must behave like."""
    from xsbuild.sandbox.runner import Call, behaviour_proof

    calls = [Call(c.fn, c.args, c.ret) for c in report.calls]
    proof = behaviour_proof(image, patched_image, payload, calls)
    report.before, report.applied, report.reverted = proof.before, proof.applied, proof.reverted
    report.expected_applied = proof.expected_applied
    report.mismatches = proof.problems(calls)
    if report.mismatches:
        raise DemoFailed("the applied payload does not behave like the patched build: "
                         + "; ".join(report.mismatches))
