"""The patched hypervisor, built the way the tree builds itself, for ``xsbuild prove``.

A private copy of the built base tree lives in the XDG cache, one per base build-id
(``$XDG_CACHE_HOME/xsbuild/prove/<build-id>/tree``); the user's tree is never written.  The copy
keeps the base's objects and their timestamps, and its ``.cmd`` files are rewritten from the
base's path to the copy's, so that Kbuild sees the same command lines and the tree's own
``make`` is incremental: it rebuilds what the patches touch, then relinks ``xen-syms``.  Once,
when the copy is made, ``make`` must reproduce the base's build-id exactly; otherwise the copy
cannot stand for the base and the proof cannot judge.  A tree built the ordinary way (not
Debian's) embeds its build date, user and host and its own path in the debug info: the copy is
built with the identity its ``compile.h`` records and with its path mapped to the base's
(:func:`xsbuild.debian.make_recipe`), which costs one full rebuild when the copy is made.

One proof at a time per copy (a file lock).  A proof applies its patches, runs ``make``,
reads the patched ``xen-syms`` and the objects ``make`` rebuilt, then reverses the patches so
the next proof starts from the base again (its ``make`` also rebuilds what this patch touched).
A copy left patched by a killed proof is found by its marker and rebuilt from the base.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xsbuild.debian import cache_root, make_recipe
from xsbuild.errors import UsageError, XsbuildError
from xsbuild.xensyms import read_build_id

Progress = Callable[[str], None]
_READY = "xsbuild-prove.ok"  # written once the copy reproduces the base
_ERROR_LINE = re.compile(r"error:|\*\*\*|Error \d")  # compiler, linker or make; not -Werror
_APPLIED = "xsbuild-prove.applied"  # present while patches are applied (holds their list)


class CannotJudgeError(XsbuildError):
    """The proof cannot be made (the patched build cannot be produced); exit 2."""

    return_code = 2


@dataclass(slots=True)
class PatchedBuild:
    """The patched ``xen-syms`` (bytes, read while the copy was locked) and what make rebuilt."""

    xen_syms: bytes
    rebuilt_objects: list[Path]  # objects (``.o`` with a source beside them) make rewrote
    functions: set[str]  # the functions they define (Xen names), read under the lock
    copy: Path
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def copy_folder(base_build_id: bytes) -> Path:
    return cache_root() / "prove" / base_build_id.hex()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_patched(base_top: Path, patches: tuple[Path, ...], *, jobs: int = 2,
                  progress: Progress = lambda _: None) -> PatchedBuild:
    """Build the hypervisor of ``base_top`` + ``patches`` incrementally in the private copy."""
    base_id = read_build_id(base_top / "xen" / "xen-syms")
    folder = copy_folder(base_id)
    timings: dict[str, float] = {}
    notes: list[str] = []
    with _locked(folder):
        start = time.monotonic()
        copy, built_at = _ready_copy(base_top, folder, base_id, jobs, progress)
        timings["copy"] = round(time.monotonic() - start, 3)
        log = folder / "make.log"
        log.write_text("")
        applied = copy / _APPLIED
        applied.write_text("".join(f"{p.resolve()}\n" for p in patches))
        saved = [folder / f"applied-{i}.patch" for i in range(len(patches))]
        for src, dst in zip(patches, saved, strict=True):
            shutil.copyfile(src, dst)
        done: list[Path] = []
        try:
            _apply(copy, saved, done)
            before = _object_stamps(copy / "xen")
            syms = copy / "xen" / "xen-syms"
            syms_before = syms.stat().st_mtime_ns
            start = time.monotonic()
            progress(f"building the patched hypervisor in {copy} (incremental make)")
            try:
                _make(copy, jobs, log, "the patched hypervisor", built_at=built_at)
            except CannotJudgeError as exc:
                # xen-syms is linked before xen.efi, whose PE link refuses sections a patch
                # may add (livepatch hook sections): a new xen-syms is all the proof needs.
                if syms.stat().st_mtime_ns == syms_before:
                    raise
                notes.append(f"make failed after linking xen-syms ({exc})")
            timings["make"] = round(time.monotonic() - start, 3)
            xen_syms = (copy / "xen" / "xen-syms").read_bytes()
            after = _object_stamps(copy / "xen")
            # rebuilt, and other than the base's: an object recompiled identically (a header
            # change reaches many) cannot hold a changed function
            rebuilt = sorted(p for p, stamp in after.items() if before.get(p) != stamp
                             and _differs(p, base_top / p.relative_to(copy)))
            functions: set[str] = set()
            for obj in rebuilt:
                functions |= object_functions(obj)
        finally:
            _restore(copy, done)
            for patch in saved:
                patch.unlink(missing_ok=True)
    return PatchedBuild(xen_syms, rebuilt, functions, copy, timings, notes)


def _ready_copy(base_top: Path, folder: Path, base_id: bytes, jobs: int,
                progress: Progress) -> tuple[Path, Path]:
    """The copy, and the path its debug info names (the base's, when the copy was made: every
    later make of the copy must use the same flags, or Kbuild rebuilds everything)."""
    copy = folder / "tree"
    ready = copy / _READY
    if ready.is_file() and not (copy / _APPLIED).exists():
        lines = ready.read_text().splitlines()
        return copy, Path(lines[1]) if len(lines) > 1 else base_top
    shutil.rmtree(copy, ignore_errors=True)
    progress(f"copying the base tree {base_top} to {copy} (once per base)")
    shutil.copytree(base_top, copy, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    _rewrite_cmd_files(copy / "xen", str(base_top), str(copy))
    log = folder / "make.log"
    log.write_text("")
    _make(copy, jobs, log, "the base copy", built_at=base_top)
    got = read_build_id(copy / "xen" / "xen-syms")
    if got != base_id:
        raise CannotJudgeError(
            f"rebuilding the base in its private copy {copy} gives build-id {got.hex()}, not "
            f"the base's {base_id.hex()}: the tree does not rebuild reproducibly (a build date "
            "or path in the binary?), so no patched build can be compared with it")
    ready.write_text(f"{base_id.hex()}\n{base_top.resolve()}\n")
    return copy, base_top


def _rewrite_cmd_files(xen: Path, old: str, new: str) -> None:
    """Kbuild rebuilds an object whose recorded command line changed: record the copy's."""
    old_b, new_b = old.encode(), new.encode()
    for dirpath, _dirs, files in os.walk(xen):
        for name in files:
            if not name.endswith(".cmd"):
                continue
            path = Path(dirpath, name)
            data = path.read_bytes()
            if old_b in data:
                st = path.stat()
                path.write_bytes(data.replace(old_b, new_b))
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _patch(copy: Path, patch: Path, *, reverse: bool) -> subprocess.CompletedProcess[str]:
    args = ["patch", "-p1", "-E", "--batch", "--no-backup-if-mismatch", "-s", "-i", str(patch)]
    return subprocess.run([*args, *(["-R"] if reverse else [])], cwd=copy, capture_output=True,
                          text=True, check=False)


def _apply(copy: Path, patches: list[Path], done: list[Path]) -> None:
    for patch in patches:
        dry = subprocess.run(["patch", "-p1", "--dry-run", "--batch", "-s", "-i", str(patch)],
                             cwd=copy, capture_output=True, text=True, check=False)
        if dry.returncode != 0:
            why = (dry.stdout + dry.stderr).strip().splitlines()
            raise UsageError(f"patch {patch.name} does not apply to the base tree: "
                             f"{why[0] if why else 'patch failed'}")
        run = _patch(copy, patch, reverse=False)
        if run.returncode != 0:
            raise UsageError(f"patch {patch.name} failed: {run.stdout.strip()}")
        done.append(patch)


def _restore(copy: Path, applied: list[Path]) -> None:
    """Reverse the patches (last first); a copy that cannot be restored is dropped whole."""
    for patch in reversed(applied):
        if _patch(copy, patch, reverse=True).returncode != 0:
            shutil.rmtree(copy, ignore_errors=True)
            return
    (copy / _APPLIED).unlink(missing_ok=True)


def _make(top: Path, jobs: int, log: Path, what: str, *, built_at: Path) -> None:
    recipe = make_recipe(top, built_at=built_at)
    with log.open("a") as out:
        run = subprocess.run(["make", "-C", "xen", *recipe.args, f"-j{max(1, jobs)}"],
                             cwd=top, env=recipe.env, stdout=out, stderr=subprocess.STDOUT,
                             check=False)
    if run.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        first = next((ln for ln in lines if _ERROR_LINE.search(ln)),
                     lines[-1] if lines else "make failed")
        raise CannotJudgeError(f"building {what} failed (log {log}): {first.strip()[:300]}")


def _differs(obj: Path, base_obj: Path) -> bool:
    """The rebuilt object is not the base tree's (the copy's objects may be a former proof's)."""
    try:
        return obj.read_bytes() != base_obj.read_bytes()
    except FileNotFoundError:
        return True


def _object_stamps(xen: Path) -> dict[Path, tuple[int, int, int, bytes]]:
    """(mtime, inode, size) of every object of a compiled source: make rewrites (or replaces)
    exactly the ones it rebuilds.  The link steps' ``built_in.o``/``prelink.o`` hold
    everything and are left out."""
    out = {}
    for dirpath, _dirs, files in os.walk(xen):
        for name in files:
            if not name.endswith(".o"):
                continue
            stem = name[:-2].removesuffix(".init")
            if not any(Path(dirpath, stem + ext).exists() for ext in (".c", ".S")):
                continue
            path = Path(dirpath, name)
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).digest()
            out[path] = (st.st_mtime_ns, st.st_ino, st.st_size, digest)
    return out


def object_functions(obj: Path) -> set[str]:
    """The Xen names (statics ``file#name``, spec §7) of the functions an object defines."""
    from elftools.elf.elffile import ELFFile

    names: set[str] = set()
    with obj.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        if symtab is None:
            return names
        current = ""
        for sym in symtab.iter_symbols():
            kind, bind = sym["st_info"]["type"], sym["st_info"]["bind"]
            if kind == "STT_FILE":
                current = sym.name
            elif kind == "STT_FUNC" and sym["st_shndx"] != "SHN_UNDEF" and sym.name:
                names.add(f"{current}#{sym.name}" if bind == "STB_LOCAL" and current
                          else sym.name)
    return names
