"""``xsbuild build``: from a Xen source tree and patches to a payload, reusing the built base.

STEP 1  find the base: the tree's built state (``xen/xen-syms`` and the ``.o.cmd`` files).  An
        unbuilt tree is copied into the XDG cache and built there once (:mod:`xsbuild.debian`);
        the user's tree is never written.
STEP 2  check the base is the hypervisor the payload is for (build-id of ``--xen-syms``).
STEP 3  capture the changed objects, original and patched (:mod:`xsbuild.capture`).
STEP 3b refuse struct-layout changes, from the DWARF of ``-g`` twins (:mod:`xsbuild.layout`).
STEP 4  diff each changed object pair, in parallel (:func:`xsbuild.diff.diff_files`).
STEP 5  link the diff objects into the payload, with the build-id notes
        (:func:`xsbuild.linker.link_files`), then check it as Xen's loader would.
STEP 6  write the build log next to the payload; return the summary (``--json``).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from xsbuild import xen_abi
from xsbuild.capture import CapturedObject, CaptureRequest, CaptureResult, TreeIndex, capture
from xsbuild.elf import write_atomic
from xsbuild.errors import (
    InputMismatchError,
    NoChangeError,
    UnsupportedChangeError,
    UsageError,
    XsbuildError,
)
from xsbuild.xensyms import read_build_id

Progress = Callable[[str], None]
SUMMARY_SCHEMA = "xsbuild.build/1"
_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """Everything ``xsbuild build`` was asked to do, already validated by the CLI."""

    srcdir: Path  # top of the source tree (holds xen/), or xen/ itself
    patches: tuple[Path, ...]
    xen_syms: Path
    output: Path
    depends: bytes | None = None  # default: the hypervisor's build-id (first payload)
    xen_depends: bytes | None = None  # default: the hypervisor's build-id
    name: str | None = None  # default: from the first patch's file name
    jobs: int = 2
    prelink: bool = False
    self_check: bool = True
    keep_workdir: bool = False
    # Static locals the user declares new (``foo.0``/``foo``): passed to the differ, which
    # otherwise refuses a static whose state would silently restart (``xsbuild diff
    # --new-static``).
    new_statics: tuple[str, ...] = ()
    # Types whose layout the patch may change (``--allow-layout-change``): "struct domain",
    # or just "domain" for any struct, union or typedef of that name.
    allow_layout_changes: tuple[str, ...] = ()


@dataclass(slots=True)
class BuildSummary:
    """What a build did; :meth:`to_json` is the ``--json`` output (schema xsbuild.build/1)."""

    payload: Path
    name: str
    base_top: Path
    xen_build_id: bytes
    capture: CaptureResult
    diffs: dict[str, dict[str, object]] = field(default_factory=dict)  # obj -> DiffResult json
    link: dict[str, object] = field(default_factory=dict)
    build_id: bytes = b""
    layout_changes: list[dict[str, object]] = field(default_factory=list)
    log: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def functions(self, key: str) -> list[str]:
        """Aggregate one list field (``changed_functions``, ``new_data``, ...) of all diffs."""
        out: list[str] = []
        for obj in sorted(self.diffs):
            out.extend(str(x) if not isinstance(x, dict) else str(x.get("name", x))
                       for x in self.diffs[obj].get(key, []) or [])  # type: ignore[union-attr]
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "schema": SUMMARY_SCHEMA,
            "status": "ok",
            "payload": str(self.payload),
            "name": self.name,
            "build_id": self.build_id.hex(),
            "base": {"top": str(self.base_top), "xen_build_id": self.xen_build_id.hex()},
            "objects": self.capture.to_json(),
            "changed_functions": self.functions("changed_functions"),
            "new_functions": self.functions("new_functions"),
            "new_data": self.functions("new_data"),
            "refused": [],
            "layout_changes": self.layout_changes,
            "diffs": self.diffs,
            "link": self.link,
            "log": str(self.log) if self.log else None,
            "timings": self.timings,
        }


def payload_name(opts: BuildOptions) -> str:
    """The payload's name: ``--name``, else the first patch's file name without its extension,
    with anything outside ``[A-Za-z0-9_-]`` turned into ``-`` (livepatch-build's rule)."""
    if opts.name is not None:
        name = opts.name
        if not name or _NAME_BAD_CHARS.search(name):
            raise UsageError(f"bad payload name {name!r}: use letters, digits, '_' and '-'")
    else:
        stem = opts.patches[0].name
        for ext in (".patch", ".diff"):
            stem = stem.removesuffix(ext)
        name = _NAME_BAD_CHARS.sub("-", stem) or "livepatch"
    if len(name) >= xen_abi.NAME_SIZE:
        raise UsageError(f"payload name is {len(name)} characters; Xen allows "
                         f"{xen_abi.NAME_SIZE - 1}")
    return name


def find_top(srcdir: Path) -> Path:
    """The tree's top (the directory holding ``xen/``), given it or its ``xen/``."""
    srcdir = srcdir.resolve()
    if (srcdir / "xen" / "Rules.mk").is_file():
        return srcdir
    if (srcdir / "Rules.mk").is_file() and srcdir.name == "xen":
        return srcdir.parent
    raise UsageError(f"{srcdir} is not a Xen source tree (no xen/Rules.mk)")


class BuildLog:
    """The build log: every step with its timing, kept in memory, written once at the end."""

    def __init__(self, progress: Progress) -> None:
        self._buf = io.StringIO()
        self._progress = progress
        self._t0 = time.monotonic()

    def note(self, line: str, *, show: bool = False) -> None:
        self._buf.write(f"[{time.monotonic() - self._t0:8.3f}] {line}\n")
        if show:
            self._progress(line)

    @contextlib.contextmanager
    def step(self, name: str, timings: dict[str, float], *, show: bool = True) -> Iterator[None]:
        start = time.monotonic()
        self.note(f"{name} ...", show=show)
        try:
            yield
        finally:
            timings[name] = round(time.monotonic() - start, 3)
            self.note(f"{name}: {timings[name]:.3f} s")

    def write(self, path: Path) -> None:
        write_atomic(path, self._buf.getvalue().encode())


def build_payload(opts: BuildOptions, progress: Progress = lambda _: None) -> BuildSummary:
    """Run STEPs 1-6 of the module docstring and return the summary.

    Raises :class:`UsageError` (bad tree, patch does not apply, compile error),
    :class:`InputMismatchError` (``--xen-syms`` is not the base's hypervisor),
    :class:`UnsupportedChangeError` (every refusal of every object, in one error) and
    :class:`NoChangeError`.  The log is written next to the output in every case.
    """
    if not opts.patches:
        raise UsageError("no --patch given")
    if not opts.output.parent.is_dir():
        raise UsageError(f"output directory {opts.output.parent} does not exist")
    name = payload_name(opts)
    log = BuildLog(progress)
    log_path = opts.output.with_name(opts.output.name + ".log")
    timings: dict[str, float] = {}
    workdir = Path(tempfile.mkdtemp(prefix="xsbuild-build-"))
    try:
        return _build(opts, name, log, timings, workdir, progress, log_path)
    except Exception as exc:
        log.note(f"FAILED: {type(exc).__name__}: {exc}")
        raise
    finally:
        with contextlib.suppress(OSError):
            log.write(log_path)
        if opts.keep_workdir:
            progress(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _build(opts: BuildOptions, name: str, log: BuildLog, timings: dict[str, float],
           workdir: Path, progress: Progress, log_path: Path) -> BuildSummary:
    with log.step("base", timings, show=False):
        top = _ensure_base(find_top(opts.srcdir), opts.jobs, log, progress)
        xen_id = _check_base(top, opts.xen_syms, log)
    with log.step("capture", timings):
        index = TreeIndex.load(top / "xen")
        req = CaptureRequest(top, opts.patches, workdir / "capture", opts.jobs, opts.self_check,
                             debug_info=True)
        layouts: list[dict[str, object]] = []

        def check_layouts(pairs: dict[str, tuple[Path, Path]]) -> None:
            layouts.extend(_check_layouts(pairs, opts.allow_layout_changes, log))

        captured = capture(req, index, lambda line: log.note(line, show=True), check_layouts)
    _log_capture(log, captured)
    summary = BuildSummary(opts.output, name, top, xen_id, captured, log=log_path,
                           timings=timings, layout_changes=layouts)
    if not captured.changed:
        raise NoChangeError("no functional change: the patch changes no object of the "
                            "hypervisor (" + _describe_unchanged(captured) + ")")
    with log.step(f"diff {len(captured.changed)} object(s)", timings):
        diff_dir = workdir / "diff"
        summary.diffs, outputs = _diff_all(captured.changed, diff_dir, opts.jobs, log,
                                           opts.new_statics)
    timings["diff"] = timings.pop(f"diff {len(captured.changed)} object(s)")
    with log.step("link", timings):
        summary.link, summary.build_id = _link(outputs, opts, name, xen_id)
        if "objects" in summary.link:
            summary.link["objects"] = sorted(summary.diffs)
    log.note(f"payload {opts.output} ({name}), build-id {summary.build_id.hex()}", show=True)
    return summary


def _ensure_base(top: Path, jobs: int, log: BuildLog, progress: Progress) -> Path:
    """The built tree to use as the base: ``top`` itself if built, else a cached build of it."""
    if (top / "xen" / "xen-syms").is_file() and (top / "xen" / ".config").is_file():
        log.note(f"base: {top} (already built)")
        return top
    from xsbuild.debian import cached_base_build

    base = cached_base_build(top, jobs=jobs, progress=progress)
    log.note(f"base: {top} is not built; using the cached build {base}")
    return base


def _check_base(top: Path, xen_syms: Path, log: BuildLog) -> bytes:
    """The payload is only valid for the hypervisor the base objects were linked into."""
    want = read_build_id(xen_syms)
    have = read_build_id(top / "xen" / "xen-syms")
    log.note(f"xen-syms {xen_syms}: build-id {want.hex()}; base xen-syms: {have.hex()}")
    if want != have:
        raise InputMismatchError(
            f"--xen-syms {xen_syms} has build-id {want.hex()} but the tree {top} built "
            f"{have.hex()}: the payload would be built against other objects than the running "
            "hypervisor's; use the tree that built it (or rebuild it identically)")
    return want


def _check_layouts(debug_pairs: dict[str, tuple[Path, Path]], allowed: tuple[str, ...],
                   log: BuildLog) -> list[dict[str, object]]:
    """Refuse (every type at once) the struct-layout changes the author did not allow; return
    all of them, allowed ones marked, for the summary."""
    from xsbuild.layout import DebugPair, layout_changes

    pairs = [DebugPair(obj, *paths) for obj, paths in sorted(debug_pairs.items())]
    log.note(f"layout: comparing the DWARF of {', '.join(p.obj for p in pairs)}", show=True)
    changes = layout_changes(pairs)
    by_type: dict[str, list[str]] = {}
    recorded = []
    for change in changes:
        ok = change.type_key in allowed or change.type_key.split(" ", 1)[-1] in allowed
        recorded.append({**change.to_json(), "allowed": ok})
        log.note(f"layout change{' (allowed)' if ok else ''}: {change.describe()}")
        if not ok:
            by_type.setdefault(change.type_key, []).append(change.describe())
    if by_type:
        raise UnsupportedChangeError([_layout_problem(t, lines) for t, lines in by_type.items()])
    return recorded


def _layout_problem(type_key: str, lines: list[str]) -> str:
    """One line per type: its first changes, how many more, why, and the way out."""
    head = lines[0]
    rest = [line.split(": ", 1)[1] for line in lines[1:3]]
    more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
    return (f"struct-layout change: {'; '.join([head, *rest])}{more}: live instances and "
            "unchanged code keep the old layout (--allow-layout-change "
            f"'{type_key}' if no live instance or unchanged code depends on it)")


def _log_capture(log: BuildLog, c: CaptureResult) -> None:
    log.note(f"patched files: {', '.join(c.patched_files)}")
    for f in c.generated_files:
        log.note(f"regenerated from the patched sources, changed: {f}", show=True)
    for obj in c.changed:
        kind = "new object" if obj.new else "changed object"
        log.note(f"{kind}: {obj.obj} (from {', '.join(obj.reasons)})", show=True)
    for obj in c.unchanged:
        log.note(f"unchanged object (identical bytes): {obj}")
    for twin in c.twin_fallbacks:
        log.note(f"layout twin {twin}: did not compile at -O0, compiled with the tree's flags")
    for obj in c.not_linked:
        log.note(f"affected but not linked into xen-syms, skipped: {obj}")
    for f in c.ignored_files:
        log.note(f"patched file compiled into no hypervisor object, ignored: {f}", show=True)
    for step, secs in c.timings.items():
        log.note(f"capture {step}: {secs:.3f} s")


def _describe_unchanged(c: CaptureResult) -> str:
    if c.unchanged:
        return f"{len(c.unchanged)} object(s) recompiled to identical bytes"
    return "no hypervisor object depends on the patched files"


# ------------------------------------------------------------------------------------------
# Diff, link, check


@dataclass(frozen=True, slots=True)
class DiffOutcome:
    """What one diff worker found for one object: its summary (``xsbuild.diff/1``) when it
    changed, else the exception it raised (typed exceptions pickle with their fields)."""

    obj: str
    summary: dict[str, object] | None = None
    error: XsbuildError | None = None


def _diff_one(obj: str, orig: str, patched: str, out: str,
              new_statics: tuple[str, ...] = ()) -> DiffOutcome:
    """Worker: diff one pair; an xsbuild error comes back as data, so every object is heard."""
    from xsbuild.diff import diff_files

    try:
        result = diff_files(Path(orig), Path(patched), Path(out),
                            allow_new_statics=new_statics)
    except XsbuildError as exc:
        return DiffOutcome(obj, error=exc)
    return DiffOutcome(obj, summary=result.to_json() if result.status == "changed" else None)


def _diff_all(changed: list[CapturedObject], out_dir: Path, jobs: int, log: BuildLog,
              new_statics: tuple[str, ...]) -> tuple[dict[str, dict[str, object]], list[Path]]:
    """Diff every changed pair (in parallel processes when there are several) and collect
    every refusal of every object before failing, so the user sees all of them at once."""
    jobs_args = []
    for c in changed:
        out = out_dir / c.obj
        out.parent.mkdir(parents=True, exist_ok=True)
        jobs_args.append((c.obj, str(c.orig), str(c.patched), str(out), new_statics))
    if len(jobs_args) == 1 or jobs <= 1:
        results = [_diff_one(*a) for a in jobs_args]
    else:
        with ProcessPoolExecutor(max_workers=min(jobs, len(jobs_args))) as pool:
            results = list(pool.map(_diff_one, *zip(*jobs_args, strict=True)))
    return _collect_diffs(results, {c.obj: str(c.patched) for c in changed}, out_dir, log)


def _collect_diffs(results: list[DiffOutcome], scratch: dict[str, str], out_dir: Path,
                   log: BuildLog) -> tuple[dict[str, dict[str, object]], list[Path]]:
    diffs: dict[str, dict[str, object]] = {}
    outputs: list[Path] = []
    refused: list[str] = []
    errors: list[str] = []
    for r in results:
        kind = "changed"
        if isinstance(r.error, UnsupportedChangeError):
            kind = "refused"
            # The differ names its input, a scratch path; the object's tree path says it better.
            refused.extend(f"{r.obj}: {p.replace(f'{scratch[r.obj]}: ', '')}"
                           for p in r.error.problems)
        elif isinstance(r.error, NoChangeError):
            kind = "no-change"
        elif r.error is not None:
            kind = "error"
            errors.append(f"{r.obj}: {type(r.error).__name__}: {r.error}")
        elif r.summary is not None:
            # Name the tree's object, not the scratch file that is gone after the build.
            diffs[r.obj] = {**r.summary, "object": r.obj}
            outputs.append(out_dir / r.obj)
        else:
            kind = "no-change"
        log.note(f"diff {r.obj}: {kind}", show=kind != "no-change")
    if errors:
        raise UsageError("diff failed: " + "; ".join(errors))
    if refused:
        raise UnsupportedChangeError(refused)
    if not outputs:
        raise NoChangeError("no functional change: the changed objects differ in no function, "
                            "data or hook a payload would carry")
    return diffs, outputs


def _link(outputs: list[Path], opts: BuildOptions, name: str,
          xen_id: bytes) -> tuple[dict[str, object], bytes]:
    from xsbuild.linker import link_files

    result = link_files(sorted(outputs), opts.output, xen_syms=opts.xen_syms, name=name,
                        depends=opts.depends or xen_id, xen_depends=opts.xen_depends or xen_id,
                        prelink=opts.prelink)
    return result.to_json(), result.build_id
