"""``xsbuild base export/import`` and ``xsbuild build --base``: a built tree as one reproducible,
verified archive, and payloads built from it byte-identical to those built from the tree.

The fast tests use the small gcc-built fake tree of ``tests/test_build.py``; one slow test uses
Debian's real built tree.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.test_build import (  # noqa: F401 - fixtures
    REPO,
    built_tree_master,
    make_patch,
    replace_in,
    tree,
    xsbuild,
)
from xsbuild.base_archive import MANIFEST, archive_name, read_manifest
from xsbuild.xensyms import read_build_id


def validate(doc: dict, name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / f"docs/json-schema/{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def cache_env(tmp_path: Path, name: str = "cache") -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(tmp_path / name)}


def export(src: Path, out: Path, env: dict[str, str] | None = None) -> Path:
    run = xsbuild("base", "export", "--srcdir", str(src), "-o", str(out), "--json", env=env)
    assert run.returncode == 0, run.stderr
    validate(json.loads(run.stdout), "xsbuild.base-export-1")
    return Path(json.loads(run.stdout)["archive"])


def gamma_patch(top: Path, tmp_path: Path) -> Path:
    return make_patch(top, {"xen/common/gamma.c": replace_in(
        top, "xen/common/gamma.c", "0x5a", "0x5b")}, tmp_path / "gamma-fix.patch")


def test_export_is_reproducible_and_named_by_build_id(tree: Path, built_tree_master: Path,  # noqa: F811
                                                       tmp_path: Path) -> None:
    # ``tree`` is a copy of the master elsewhere, written at other times: same contents, so
    # the same bytes; a change of one file changes them.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = export(built_tree_master, tmp_path / "a")
    second = export(tree, tmp_path / "b")
    build_id = read_build_id(tree / "xen/xen-syms")
    assert first.name == second.name == archive_name(build_id)
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    assert members[0].name == MANIFEST
    names = [m.name for m in members[1:]]
    assert names == sorted(names)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    assert first.read_bytes()[4:8] == b"\0\0\0\0"  # gzip header: no time
    manifest = read_manifest(first)
    assert manifest.xen_build_id == build_id
    with tarfile.open(first) as tar:
        validate(json.loads(tar.extractfile(MANIFEST).read()), "xsbuild.base-1")
    files = {e.path: e for e in manifest.entries}
    assert files["xen/common/gamma.o"].sha256 == hashlib.sha256(
        (tree / "xen/common/gamma.o").read_bytes()).hexdigest()
    assert files["xen/source"].kind == "symlink" and files["xen/source"].target == "."
    (tree / "xen/common/gamma.c").write_text((tree / "xen/common/gamma.c").read_text() + "\n")
    third = export(tree, tmp_path / "c.tar.gz")
    assert third.read_bytes() != first.read_bytes()


def test_build_from_imported_base_is_byte_identical(tree: Path, tmp_path: Path) -> None:  # noqa: F811
    # The archive is imported into another place (the cache) than the tree it was made from:
    # the compile lines name the tree's old path, and the payload must not notice.
    archive = export(tree, tmp_path)
    patch = gamma_patch(tree, tmp_path)
    direct = tmp_path / "direct.livepatch"
    run = xsbuild("build", "--srcdir", str(tree), "--patch", str(patch), "--xen-syms",
                  str(tree / "xen/xen-syms"), "-o", str(direct))
    assert run.returncode == 0, run.stderr
    env = cache_env(tmp_path)
    shutil.rmtree(tree)  # the original tree is gone: only the archive remains
    via_base = tmp_path / "base.livepatch"
    run = xsbuild("build", "--base", str(archive), "--patch", str(patch), "-o", str(via_base),
                  "--json", env=env)
    assert run.returncode == 0, run.stderr
    assert "unpacking and verifying" in run.stderr
    assert via_base.read_bytes() == direct.read_bytes()
    top = Path(json.loads(run.stdout)["base"]["top"])
    assert top.parent == tmp_path / "cache/xsbuild/imported"
    # A second build (another CI job on the same runner) reuses the cache entry.
    again = tmp_path / "again.livepatch"
    run = xsbuild("build", "--base", str(archive), "--patch", str(patch), "-o", str(again),
                  env=env)
    assert run.returncode == 0, run.stderr
    assert "already in the cache" in run.stderr and "unpacking" not in run.stderr
    assert again.read_bytes() == direct.read_bytes()
    # And importing explicitly says where it is.
    run = xsbuild("base", "import", str(archive), "--json", env=env)
    assert run.returncode == 0 and json.loads(run.stdout)["reused"] is True
    validate(json.loads(run.stdout), "xsbuild.base-import-1")
    assert json.loads(run.stdout)["top"] == str(top)


def rewrite(archive: Path, out: Path, change=lambda name, data: data,
            extra: tuple[tuple[tarfile.TarInfo, bytes | None], ...] = ()) -> Path:
    """A copy of ``archive`` with ``change(name, data) -> data | None`` (None: drop) applied to
    its members, and ``extra`` members appended."""
    buf = io.BytesIO()
    with tarfile.open(archive) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers():
            data = change(m.name, src.extractfile(m).read() if m.isreg() else b"")
            if data is None:
                continue
            m.size = len(data) if m.isreg() else 0
            dst.addfile(m, io.BytesIO(data) if m.isreg() else None)
        for m, data in extra:
            m.size = len(data or b"")
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    out.write_bytes(gzip.compress(buf.getvalue()))
    return out


def flip_gamma(name: str, data: bytes) -> bytes:
    if name == "tree/xen/common/gamma.o":
        return data[:-1] + bytes([data[-1] ^ 1])
    return data


def edit_manifest(edit):
    def change(name: str, data: bytes) -> bytes:
        if name != MANIFEST:
            return data
        doc = json.loads(data)
        edit(doc)
        return json.dumps(doc).encode()
    return change


def member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


UP = {"path": "xen/up", "type": "symlink", "target": "../../etc"}
BAD_ARCHIVES = {
    "checksum": (lambda a, b: rewrite(a, b, flip_gamma), "does not match its checksum"),
    "missing": (lambda a, b: rewrite(a, b, lambda n, d: None if n == "tree/xen/common/beta.c"
                                     else d), "missing, e.g. xen/common/beta.c"),
    "extra": (lambda a, b: rewrite(a, b, extra=((member("tree/xen/evil.o"), b"bad"),)),
              "not in the manifest"),
    "build-id": (lambda a, b: rewrite(a, b, edit_manifest(
        lambda doc: doc.update(xen_build_id="ab" * 20))), "the manifest says abab"),
    "escape": (lambda a, b: rewrite(a, b, edit_manifest(lambda doc: doc["entries"].append(UP)),
                                    extra=((member("tree/xen/up", tarfile.SYMTYPE, "../../etc"),
                                            None),)), "points outside the tree"),
    # Each link stays inside by itself; together they lead out of the tree.
    "link-chain": (lambda a, b: rewrite(a, b, edit_manifest(lambda doc: doc["entries"].extend([
        {"path": "xen/c", "type": "symlink", "target": ".."},
        {"path": "xen/b", "type": "symlink", "target": "c/.."},
        {"path": "xen/b/evil", "type": "file", "mode": "644", "size": 1,
         "sha256": hashlib.sha256(b"x").hexdigest()}])),
        extra=((member("tree/xen/c", tarfile.SYMTYPE, ".."), None),
               (member("tree/xen/b", tarfile.SYMTYPE, "c/.."), None),
               (member("tree/xen/b/evil"), b"x"))),
        "would be written outside the tree"),
    "outside": (lambda a, b: rewrite(a, b, extra=((member("../evil"), b"x"),)),
                "lies outside tree/"),
    "truncated": (lambda a, b: b.write_bytes(a.read_bytes()[: a.stat().st_size // 2]),
                  "not a readable base archive"),
    "not-archive": (lambda a, b: b.write_bytes(b"not a tar file\n" * 10),
                    "not a readable base archive"),
    "no-manifest": (lambda a, b: rewrite(a, b, lambda n, d: None if n == MANIFEST else d),
                    "its first member is not manifest.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_import_refuses_bad_archives_and_writes_nothing(tree: Path, tmp_path: Path,  # noqa: F811
                                                        case: str) -> None:
    archive = export(tree, tmp_path)
    bad = tmp_path / "bad" / "base.tar.gz"
    bad.parent.mkdir()
    make, why = BAD_ARCHIVES[case]
    make(archive, bad)
    env = cache_env(tmp_path)
    run = xsbuild("base", "import", "-q", str(bad), env=env)
    assert run.returncode == 2, run.stderr
    assert why in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    imported = tmp_path / "cache/xsbuild/imported"
    assert not imported.exists() or [p.name for p in imported.iterdir()] == [".lock"]
    # The good archive still imports afterwards (nothing half-written was left to trip on).
    assert xsbuild("base", "import", str(archive), env=env).returncode == 0


def test_import_refuses_a_renamed_archive(tree: Path, tmp_path: Path) -> None:  # noqa: F811
    archive = export(tree, tmp_path)
    bad = tmp_path / archive_name(b"\xcd" * 20)
    shutil.copyfile(archive, bad)
    run = xsbuild("base", "import", str(bad), env=cache_env(tmp_path))
    assert run.returncode == 2 and "its name says build-id cdcd" in run.stderr, run.stderr


def test_build_base_excludes_srcdir(tree: Path, tmp_path: Path) -> None:  # noqa: F811
    archive = export(tree, tmp_path)
    run = xsbuild("build", "--base", str(archive), "--srcdir", str(tree), "--patch",
                  str(gamma_patch(tree, tmp_path)), "-o", str(tmp_path / "x.livepatch"))
    assert run.returncode == 2 and "only one of --srcdir, --debian and --base" in run.stderr
    run = xsbuild("build", "--patch", str(gamma_patch(tree, tmp_path)), "-o",
                  str(tmp_path / "x.livepatch"))
    assert run.returncode == 2 and "exactly one of --srcdir, --debian and --base" in run.stderr


def test_export_into_the_tree_refused(tree: Path, tmp_path: Path) -> None:  # noqa: F811
    run = xsbuild("base", "export", "--srcdir", str(tree), "-o", str(tree / "b.tar.gz"))
    assert run.returncode == 2 and "inside the tree it archives" in run.stderr, run.stderr
    assert not list(tree.glob("*b.tar.gz*"))


def test_export_of_unbuilt_tree_refused(tmp_path: Path) -> None:
    (tmp_path / "t/xen").mkdir(parents=True)
    (tmp_path / "t/xen/Rules.mk").write_text("#\n")
    run = xsbuild("base", "export", "--srcdir", str(tmp_path / "t"), "-o",
                  str(tmp_path / "o.tar.gz"), env=cache_env(tmp_path))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert not (tmp_path / "o.tar.gz").exists()


DEBIAN_TOP = Path.home() / ".cache/xsbuild/debian/4.17.5+72-g01140da4e8-1/xen-4.17.5+72-g01140da4e8"


@pytest.mark.slow
@pytest.mark.skipif(not (DEBIAN_TOP / "xsbuild-base.ok").is_file(),
                    reason="needs Debian's built tree")
def test_debian_base_archive_builds_identical_payload(tmp_path: Path) -> None:
    patch = REPO / "tests/xen/patches/01-changed-function.patch"
    archive = export(DEBIAN_TOP, tmp_path)
    direct = tmp_path / "direct.livepatch"
    run = xsbuild("build", "--srcdir", str(DEBIAN_TOP), "--patch", str(patch), "--xen-syms",
                  str(DEBIAN_TOP / "xen/xen-syms"), "-o", str(direct))
    assert run.returncode == 0, run.stderr
    via_base = tmp_path / "base.livepatch"
    run = xsbuild("build", "--base", str(archive), "--patch", str(patch), "-o", str(via_base),
                  env=cache_env(tmp_path))
    assert run.returncode == 0, run.stderr
    assert via_base.read_bytes() == direct.read_bytes()
    assert archive.name == archive_name(bytes.fromhex("39a640e6f1412319235087391df9f1c5e13ae920"))
    # Reproducible on the real tree too.
    again = tmp_path / "again"
    again.mkdir()
    assert export(DEBIAN_TOP, again).read_bytes() == archive.read_bytes()
