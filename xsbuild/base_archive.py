"""A built base tree as one reproducible archive: what a CI cache or artifact store keeps.

``xsbuild base export`` packs the built tree (sources, ``.o.cmd`` files, objects, ``xen-syms``)
into ``xsbuild-base-<build-id>.tar.gz``; ``xsbuild base import`` (and ``xsbuild build --base``)
unpacks it into the cache, verified, once per hypervisor build-id.

Reproducible: the same tree gives the same bytes.  Members are sorted, owners are 0/0 without
names, every mtime is :data:`ARCHIVE_MTIME`, modes are reduced to 0644/0755, and gzip's header
carries no name and no time.  The first member, ``manifest.json`` (schema ``xsbuild.base/1``),
names the hypervisor's build-id and lists every member with its size and SHA-256; import refuses
an archive whose members, checksums or ``xen/xen-syms`` build-id disagree with it, and writes
nothing into the cache until the whole tree checked out.

The tree records its own absolute path (``-ffile-prefix-map=<top>=.`` in every compile line);
an imported tree lives elsewhere, which capture handles (``TreeIndex.recorded_top``), so a payload
built from the import is byte-identical to one built from the original tree.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from xsbuild.errors import InputMismatchError, UsageError

Progress = Callable[[str], None]
SCHEMA = "xsbuild.base/1"
MANIFEST = "manifest.json"
TREE = "tree"
ARCHIVE_MTIME = 0  # every member's mtime: the archive must not depend on when files were written
GZIP_LEVEL = 6  # zlib's default: the size/time balance of `gzip`; deterministic for a zlib
STAMP = "xsbuild-base.ok"  # the same completion stamp as debian.py's cached bases
# Not part of a base: version control, the cache's lock, and the log of the base build (it holds
# timings, so it would make the archive differ between two builds of the same tree).
_SKIP_NAMES = frozenset({".git", ".lock", "xsbuild-base-build.log", STAMP})
_ARCHIVE_NAME_RE = re.compile(r"xsbuild-base-([0-9a-f]{16,})\.tar\.gz$")


@dataclass(frozen=True, slots=True)
class Entry:
    """One member of the tree: a directory, a regular file or a symbolic link."""

    path: str  # relative to the tree's top, POSIX form
    kind: str  # "dir" | "file" | "symlink"
    mode: int = 0o755
    size: int = 0
    sha256: str = ""
    target: str = ""

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"path": self.path, "type": self.kind}
        if self.kind == "file":
            data.update(mode=f"{self.mode:o}", size=self.size, sha256=self.sha256)
        elif self.kind == "symlink":
            data["target"] = self.target
        return data

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Entry:
        kind = str(data["type"])
        if kind == "file":
            return cls(str(data["path"]), kind, int(str(data["mode"]), 8), int(str(data["size"])),
                       str(data["sha256"]))
        if kind == "symlink":
            return cls(str(data["path"]), kind, target=str(data["target"]))
        if kind == "dir":
            return cls(str(data["path"]), kind)
        raise ValueError(f"unknown member type {kind!r}")


@dataclass(frozen=True, slots=True)
class Manifest:
    xen_build_id: bytes
    recorded_top: str | None  # where the tree was built (its compile lines name it)
    entries: tuple[Entry, ...]

    def to_bytes(self) -> bytes:
        doc = {"schema": SCHEMA, "xen_build_id": self.xen_build_id.hex(),
               "recorded_top": self.recorded_top,
               "entries": [e.to_json() for e in self.entries]}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("schema") != SCHEMA:
                raise ValueError(f"schema {doc.get('schema')!r}, expected {SCHEMA!r}")
            entries = tuple(Entry.from_json(e) for e in doc["entries"])
            return cls(bytes.fromhex(doc["xen_build_id"]), doc.get("recorded_top"), entries)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{where}: not an xsbuild base archive (bad manifest: {exc})") \
                from None

    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def archive_name(build_id: bytes) -> str:
    return f"xsbuild-base-{build_id.hex()}.tar.gz"


# ------------------------------------------------------------------------------------------
# Export


def scan_tree(top: Path) -> list[Entry]:
    """Every member of ``top`` in sorted order, hashed; refuses what a tar of a base cannot
    faithfully carry (device files, sockets)."""
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_NAMES)
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            if name in _SKIP_NAMES:
                continue
            path = base / name
            rel = path.relative_to(top).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out.append(Entry(rel, "symlink", target=os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(Entry(rel, "dir"))
            elif stat.S_ISREG(st.st_mode):
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                out.append(Entry(rel, "file", mode, st.st_size, _sha256(path)))
            else:
                raise UsageError(f"{path}: not a file, directory or symbolic link; a base "
                                 "archive cannot carry it")
    out.sort(key=lambda e: e.path)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _info(name: str, kind: bytes, mode: int, size: int = 0, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, target
    info.mtime, info.uid, info.gid, info.uname, info.gname = ARCHIVE_MTIME, 0, 0, "", ""
    return info


def export_base(top: Path, output: Path, progress: Progress = lambda _: None) -> Manifest:
    """Write the built tree ``top`` as a base archive to ``output`` (whole or not at all)."""
    from xsbuild.capture import TreeIndex
    from xsbuild.xensyms import read_build_id

    xen_syms = top / "xen" / "xen-syms"
    if output.resolve().is_relative_to(top.resolve()):
        raise UsageError(f"-o {output} is inside the tree it archives; write it elsewhere")
    if not xen_syms.is_file():
        raise UsageError(f"{top} is not a built Xen tree (no xen/xen-syms)")
    index = TreeIndex.load(top / "xen")  # refuses an unbuilt tree, with the reason
    progress(f"hashing {top}")
    manifest = Manifest(read_build_id(xen_syms), index.recorded_top, tuple(scan_tree(top)))
    progress(f"writing {output} ({len(manifest.entries)} members)")
    # gzip.GzipFile with mtime=0 and no filename: the header holds no name and no time.
    with _atomic_output(output) as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL,
                          mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        data = manifest.to_bytes()
        tar.addfile(_info(MANIFEST, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
        for e in manifest.entries:
            _add(tar, top, e)
    return manifest


def _add(tar: tarfile.TarFile, top: Path, e: Entry) -> None:
    name = f"{TREE}/{e.path}"
    if e.kind == "dir":
        tar.addfile(_info(name, tarfile.DIRTYPE, 0o755))
    elif e.kind == "symlink":
        tar.addfile(_info(name, tarfile.SYMTYPE, 0o777, target=e.target))
    else:
        data = (top / e.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != e.sha256:
            raise UsageError(f"{top / e.path} changed while it was being archived; is a build "
                             "running in the tree?")
        tar.addfile(_info(name, tarfile.REGTYPE, e.mode, len(data)), io.BytesIO(data))


@contextlib.contextmanager
def _atomic_output(output: Path) -> Iterator[io.BufferedWriter]:
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------
# Import


def read_manifest(archive: Path) -> Manifest:
    """The manifest alone (the first member: no need to unpack the tree to learn the id)."""
    with _open_archive(archive) as tar:
        return _first_manifest(tar, archive)


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[tarfile.TarFile]:
    if not archive.is_file():
        raise UsageError(f"{archive}: no such file")
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            yield tar
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UsageError(f"{archive}: not a readable base archive ({exc})") from None


def _first_manifest(tar: tarfile.TarFile, archive: Path) -> Manifest:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isreg():
        raise UsageError(f"{archive}: not an xsbuild base archive (its first member is not "
                         f"{MANIFEST})")
    f = tar.extractfile(first)
    assert f is not None
    return Manifest.from_bytes(f.read(), str(archive))


def _check_name(archive: Path, manifest: Manifest) -> None:
    """A renamed archive of another hypervisor is a mix-up worth stopping at."""
    m = _ARCHIVE_NAME_RE.search(archive.name)
    if m and m.group(1) != manifest.xen_build_id.hex():
        raise InputMismatchError(f"{archive}: its name says build-id {m.group(1)} but its "
                                 f"manifest holds {manifest.xen_build_id.hex()}")


def unpack(archive: Path, dest: Path) -> Manifest:
    """Unpack ``archive`` into the new folder ``dest``, verifying every member against the
    manifest and the tree's ``xen-syms`` against the manifest's build-id."""
    from xsbuild.xensyms import read_build_id

    dest.mkdir(parents=True)
    with _open_archive(archive) as tar:
        manifest = _first_manifest(tar, archive)
        _check_name(archive, manifest)
        want = {e.path: e for e in manifest.entries}
        seen: set[str] = set()
        while (member := tar.next()) is not None:
            rel = _member_path(member.name, archive)
            e = want.get(rel)
            if e is None or rel in seen:
                raise InputMismatchError(f"{archive}: member {member.name} is "
                                         f"{'repeated' if e else 'not in the manifest'}")
            seen.add(rel)
            _extract(tar, member, e, dest, archive)
    missing = sorted(set(want) - seen)
    if missing:
        raise InputMismatchError(f"{archive}: {len(missing)} member(s) of the manifest are "
                                 f"missing, e.g. {missing[0]} (truncated archive?)")
    syms = dest / "xen" / "xen-syms"
    have = read_build_id(syms) if syms.is_file() else b""
    if have != manifest.xen_build_id:
        raise InputMismatchError(f"{archive}: xen/xen-syms has build-id {have.hex() or 'none'}, "
                                 f"the manifest says {manifest.xen_build_id.hex()}")
    return manifest


def _member_path(name: str, archive: Path) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or len(p.parts) < 2 or p.parts[0] != TREE:
        raise InputMismatchError(f"{archive}: member {name} lies outside {TREE}/")
    return PurePosixPath(*p.parts[1:]).as_posix()


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, e: Entry, dest: Path,
             archive: Path) -> None:
    path = dest / e.path
    # Links are checked one by one (_check_link); a chain of them could still lead out, so the
    # folder a member is written into must really be inside the tree.
    parent = path.parent.resolve()
    if not parent.is_relative_to(dest.resolve()) or not parent.is_dir():
        raise InputMismatchError(f"{archive}: member {member.name} would be written outside "
                                 "the tree, or before its folder")
    if e.kind == "dir" and member.isdir():
        path.mkdir(exist_ok=True)
    elif e.kind == "symlink" and member.issym() and member.linkname == e.target:
        _check_link(e, archive)
        os.symlink(e.target, path)
    elif e.kind == "file" and member.isreg():
        f = tar.extractfile(member)
        assert f is not None
        data = f.read()
        if len(data) != e.size or hashlib.sha256(data).hexdigest() != e.sha256:
            raise InputMismatchError(f"{archive}: {e.path} does not match its checksum in the "
                                     "manifest (corrupted archive?)")
        path.write_bytes(data)
        os.chmod(path, e.mode)
        os.utime(path, (ARCHIVE_MTIME, ARCHIVE_MTIME))
    else:
        raise InputMismatchError(f"{archive}: member {member.name} is not the {e.kind} the "
                                 "manifest lists")


def _check_link(e: Entry, archive: Path) -> None:
    """A link must stay inside the tree (it is followed by every later build)."""
    target = PurePosixPath(e.target)
    resolved = PurePosixPath(e.path).parent / target
    depth = 0
    for part in resolved.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            break
    if target.is_absolute() or depth < 0:
        raise InputMismatchError(f"{archive}: link {e.path} -> {e.target} points outside the "
                                 "tree")


# ------------------------------------------------------------------------------------------
# The cache


def imported_root() -> Path:
    from xsbuild.debian import cache_root

    return cache_root() / "imported"


@dataclass(frozen=True, slots=True)
class ImportedBase:
    top: Path
    xen_build_id: bytes
    reused: bool  # the cache already held this build-id


def import_base(archive: Path, progress: Progress = lambda _: None) -> ImportedBase:
    """The cached tree of ``archive``'s hypervisor: unpacked and verified now, or reused when
    the cache already holds that build-id."""
    from xsbuild.debian import _locked

    manifest = read_manifest(archive)
    _check_name(archive, manifest)
    root = imported_root()
    final = root / manifest.xen_build_id.hex()
    with _locked(root):
        if (final / STAMP).is_file():
            progress(f"base {manifest.xen_build_id.hex()} already in the cache: {final}")
            return ImportedBase(final, manifest.xen_build_id, True)
        shutil.rmtree(final, ignore_errors=True)
        tmp = root / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        progress(f"unpacking and verifying {archive}")
        try:
            unpack(archive, tmp)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (final / STAMP).write_text(manifest.digest() + "\n")
    return ImportedBase(final, manifest.xen_build_id, False)
