"""Tests of ``xsbuild build``: capture from a built tree, the shadow, refusals, the CLI.

Most tests use a tiny "Xen-like" tree that is really built with gcc, objcopy and ld by a
mini-Kbuild (``mkfake.py``, written into the tree and run by its ``xen/Makefile``): every object
gets a ``.<name>.o.cmd`` in Kbuild's format (``cmd_``, ``source_``, ``deps_`` with
``$(wildcard ...)`` entries), gcc writes ``.<name>.o.tmp`` and ``objcopy --redefine-sym`` makes
``<name>.o`` as CONFIG_ENFORCE_UNIQUE_SYMBOLS does, an init-only object goes through the
``.init.o`` objcopy step, ``built_in.o``/``prelink.o`` are ``ld -r`` links and ``xen-syms`` has a
build-id.  The flags include ``-g`` and a ``-ffile-prefix-map`` of the tree's path, so a replay
that got the paths wrong fails the byte-for-byte self-check.

Tests marked ``slow`` run against Debian's real built tree when it exists on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.xen.debian_tree import DebianTree
from xsbuild.capture import (
    CaptureRequest,
    TreeIndex,
    capture,
    parse_cmd_file,
    parse_patch_files,
    replay_tree,
    split_command,
)
from xsbuild.errors import EXIT_REPLAY, ReplayError, UsageError

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------
# The fake tree

MKFAKE = r'''
"""Mini-Kbuild for the test tree: compile, record .cmd files, link (run from xen/)."""
import os, shlex, subprocess, sys
TOP = os.path.dirname(os.getcwd())
CC = "gcc"
CFLAGS = ["-m64", "-O2", "-g", "-std=gnu99", "-fno-pie", "-fno-common", "-fno-builtin",
          "-nostdinc", "-ffunction-sections", "-fdata-sections", "-mno-red-zone",
          "-fno-asynchronous-unwind-tables", "-Wall", "-Werror", "-I./include",
          "-include", "./include/xen/config.h"]
if not os.environ.get("FAKE_NO_PREFIX_MAP"):  # upstream's defaults: -g, no prefix map
    CFLAGS += ["-ffile-prefix-map=%s=." % TOP, "-fdebug-prefix-map=%s=." % TOP]
INIT_RENAME = ["--rename-section", ".rodata=.init.rodata",
               "--rename-section", ".rodata.str1.1=.init.rodata.str1.1"]

def sh(argv):
    subprocess.run(argv, check=True)

def write_cmd(obj, cmd, source=None, deps=None):
    d, base = os.path.split(obj)
    text = "cmd_%s := %s\n" % (obj, cmd)
    if source:
        text += "\nsource_%s := %s\n\ndeps_%s := \\\n" % (obj, source, obj)
        text += "    $(wildcard include/config/fake/option.h) \\\n"
        text += "".join("  %s \\\n" % x for x in deps) + "\n%s: $(deps_%s)\n" % (obj, obj)
    with open(os.path.join(d, "." + base + ".cmd"), "w") as f:
        f.write(text)

def read_deps(dfile):
    words = open(dfile).read().replace("\\\n", " ").split()
    deps = []
    for w in words[1:]:
        if w.endswith(":"):
            break
        deps.append(os.path.normpath(w))
    return deps

def compile_c(src, extra=()):
    obj = src[:-2] + ".o"
    d, base = os.path.split(obj)
    tmp = os.path.join(d, "." + base + ".tmp")
    dfile = os.path.join(d, "." + base + ".d")
    argv = [CC, "-MMD", "-MP", "-MF", dfile] + CFLAGS + list(extra) + [
        "-D__OBJECT_LABEL__=" + obj, "-c", src, "-o", tmp, "-MQ", obj]
    sh(argv)
    real = os.path.relpath(os.path.realpath(src))  # Rules.mk rel-path: symlinks resolved
    sh(["objcopy", "--redefine-sym", os.path.basename(src) + "=" + real, tmp, obj])
    os.unlink(tmp)
    write_cmd(obj, shlex.join(argv), src, read_deps(dfile))
    return obj

def compile_s(src):
    obj = src[:-2] + ".o"
    d, base = os.path.split(obj)
    dfile = os.path.join(d, "." + base + ".d")
    argv = [CC, "-MMD", "-MP", "-MF", dfile, "-m64", "-D__ASSEMBLY__", "-I./include",
            "-c", src, "-o", obj]
    sh(argv)
    write_cmd(obj, shlex.join(argv), src, read_deps(dfile))
    return obj

def init_o(obj):
    init = obj[:-2] + ".init.o"
    # As in Xen's Rules.mk: a shell loop (recorded with make's $$ escaping), then objcopy.
    cmd = ("objdump -h %s | while read idx name sz rest; do case \"$$name\" in "
           ".data) test $$(echo $$sz | sed 's,00*,0,') != 0 || continue; exit 1;; esac; "
           "done || exit $$?; " % obj) + shlex.join(["objcopy"] + INIT_RENAME + [obj, init])
    subprocess.run(cmd.replace("$$", "$"), shell=True, check=True)
    write_cmd(init, cmd)
    return init

def generate(target, cmd):
    # A generated header, as Xen's compat headers and hypercall-defs.h: a recorded command.
    subprocess.run(cmd.replace("$$", "$"), shell=True, check=True)
    write_cmd(target, cmd)

def ld_r(out, objs):
    argv = ["ld", "-r", "-o", out] + objs
    sh(argv)
    write_cmd(out, shlex.join(argv))

generate("include/xen/gen.h", "awk -F= '{ print \"#define \" $$1 \" \" $$2 }' "
         "<include/xen/gen.def >include/xen/gen.h")
common = [compile_c("common/" + n) for n in ("alpha.c", "beta.c", "gamma.c", "epsilon.c")]
if os.path.exists("common/delta.c"):
    common.append(compile_c("common/delta.c"))
common.append(init_o(compile_c("common/setup.c", ["-DINIT_SECTIONS_ONLY"])))
ld_r("common/built_in.o", common)
# As Xen's efi-common.mk: the build links arch/x86/efi/rt.c to common/efi/rt.c through the
# "source -> ." link and compiles it with its own flags.
if not os.path.lexists("source"):
    os.symlink(".", "source")
if not os.path.lexists("arch/x86/efi/rt.c"):
    os.symlink("../../../source/common/efi/rt.c", "arch/x86/efi/rt.c")
efi = compile_c("arch/x86/efi/rt.c", ["-fshort-wchar", "-iquote", "./common/efi"])
ld_r("arch/x86/built_in.o", [compile_s("arch/x86/entry.S"), efi])
compile_c("arch/x86/boot/helper.c")   # built, never linked (like Xen's 32-bit boot code)
ld_r("prelink.o", ["common/built_in.o", "arch/x86/built_in.o"])
sh(["ld", "--build-id=sha1", "-e", "entry", "-o", "xen-syms", "prelink.o"])
'''

SOURCES = {
    "xen/Rules.mk": "# marker: this is the hypervisor directory\n",
    "xen/.config": "CONFIG_LIVEPATCH=y\nCONFIG_ENFORCE_UNIQUE_SYMBOLS=y\n",
    "xen/Makefile": "all:\n\tpython3 ../mkfake.py\nolddefconfig:\n\ttrue\n",
    "xen/include/xen/config.h": """\
        #define __init __attribute__((__section__(".init.text")))
        """,
    "xen/include/xen/shared.h": """\
        static inline int shared_helper(int x)
        {
            return x * 3;
        }

        struct shared_counter {
            int hits;
            int misses;
        };
        """,
    "xen/include/xen/asmdefs.h": """\
        #define ENTRY_MAGIC 0x42
        """,
    "xen/common/alpha.c": """\
        #include <xen/shared.h>

        int alpha_counter = 5;

        int alpha(int x)
        {
            return shared_helper(x) + 1;
        }

        const char *alpha_version(void)
        {
            return "alpha-1";
        }

        int alpha_get(void)
        {
            return alpha_counter;
        }

        int alpha_misses(const struct shared_counter *c)
        {
            return c->misses;
        }
        """,
    "xen/common/beta.c": """\
        #include <xen/shared.h>

        int beta(int x)
        {
            return shared_helper(x) - 1;
        }
        """,
    "xen/include/xen/gen.def": "GEN_LIMIT=17\nGEN_OTHER=3\n",
    "xen/common/epsilon.c": """\
        #include <xen/gen.h>

        int epsilon_limit(void)
        {
            return GEN_LIMIT;
        }
        """,
    "xen/common/gamma.c": """\
        int gamma_fn(int x)
        {
            return x ^ 0x5a;
        }
        """,
    "xen/common/setup.c": """\
        int __init setup_fn(int x)
        {
            return x + 7;
        }
        """,
    "xen/common/Makefile": "obj-y += alpha.o beta.o gamma.o\nobj-y += setup.init.o\n",
    "xen/common/efi/efi.h": """\
        #define EFI_REVISION 7
        """,
    "xen/common/efi/rt.c": """\
        #include "efi.h"

        int efi_revision(void)
        {
            return EFI_REVISION;
        }
        """,
    "xen/arch/x86/efi/Makefile": "# rt.c is a link made by the build\n",
    "xen/arch/x86/entry.S": """\
        #include <xen/asmdefs.h>
        .text
        .globl entry
        entry:
            mov $ENTRY_MAGIC, %eax
            ret
        """,
    "xen/arch/x86/boot/helper.c": """\
        #include <xen/shared.h>

        int boot_helper(int x)
        {
            return shared_helper(x);
        }
        """,
    "tools/misc/tool.c": "int main(void) { return 0; }\n",
}


def write_tree(top: Path) -> None:
    for rel, text in SOURCES.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    (top / "mkfake.py").write_text(MKFAKE)


def make(top: Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(["make", "-s", "-C", "xen"], cwd=top, check=True, capture_output=True,
                   env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def built_tree_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("fake") / "xen-src"
    write_tree(top)
    make(top)
    return top


@pytest.fixture
def tree(built_tree_master: Path, tmp_path: Path) -> Path:
    """A private copy of the built fake tree.  It is *moved*: the recorded prefix map names
    the master's path, as with a built tree copied elsewhere."""
    top = tmp_path / "tree"
    shutil.copytree(built_tree_master, top, symlinks=True)
    return top


def tree_hash(top: Path) -> str:
    """Content, names, modes and mtimes of everything in the tree."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames + dirnames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(top)}|{st.st_mode}|{st.st_mtime_ns}|{st.st_size}".encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()


def make_patch(top: Path, edits: dict[str, str | None], path: Path) -> Path:
    """A -p1 patch from the tree's top: ``edits`` maps a path to its new content (None:
    delete).  Made with ``diff -u`` on scratch copies, never touching ``top``."""
    scratch = path.parent / (path.name + ".d")
    out = []
    for rel, new in edits.items():
        a, b = scratch / "a" / rel, scratch / "b" / rel
        a.parent.mkdir(parents=True, exist_ok=True)
        b.parent.mkdir(parents=True, exist_ok=True)
        old = top / rel
        left = str(old) if old.exists() else "/dev/null"
        if new is not None:
            b.write_text(textwrap.dedent(new))
        right = str(b) if new is not None else "/dev/null"
        run = subprocess.run(["diff", "-u", "--label", f"a/{rel}" if old.exists() else "/dev/null",
                              "--label", f"b/{rel}" if new is not None else "/dev/null",
                              left, right], capture_output=True, text=True, check=False)
        assert run.returncode == 1, run.stderr
        out.append(run.stdout)
    path.write_text("".join(out))
    shutil.rmtree(scratch, ignore_errors=True)
    return path


def replace_in(top: Path, rel: str, old: str, new: str) -> str:
    text = (top / rel).read_text()
    assert old in text
    return text.replace(old, new)


def run_capture(top: Path, tmp_path: Path, *patches: Path, jobs: int = 2):
    return capture(CaptureRequest(top, tuple(patches), tmp_path / "work", jobs=jobs))


def file_symbol(obj: Path) -> list[str]:
    out = subprocess.run(["readelf", "-sW", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if " FILE " in line]


def section_names(obj: Path) -> list[str]:
    out = subprocess.run(["readelf", "-SW", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    names = []
    for line in out.splitlines():
        if line.strip().startswith("["):
            parts = line.split("]", 1)[1].split()
            if parts:
                names.append(parts[0])
    return names


def defined_functions(obj: Path) -> set[str]:
    out = subprocess.run(["readelf", "-sW", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1] for line in out.splitlines()
            if " FUNC " in line and " UND " not in line}


# ------------------------------------------------------------------------------------------
# Parsing


def test_parse_cmd_file_reads_kbuild_format() -> None:
    text = ("cmd_common/a.o := gcc -c common/a.c -o common/.a.o.tmp\n\n"
            "source_common/a.o := common/a.c\n\n"
            "deps_common/a.o := \\\n    $(wildcard include/config/x.h) \\\n"
            "  include/xen/a.h \\\n  include/xen/b.h \\\n\ncommon/a.o: $(deps_common/a.o)\n")
    entries = parse_cmd_file(text)
    assert entries["common/a.o"]["source"] == "common/a.c"
    assert "include/xen/b.h" in entries["common/a.o"]["deps"]
    assert entries["common/a.o"]["cmd"].endswith("-o common/.a.o.tmp")


def test_parse_patch_files_git_and_plain() -> None:
    text = ("diff --git a/xen/common/a.c b/xen/common/a.c\n--- a/xen/common/a.c\n"
            "+++ b/xen/common/a.c\n@@ -1 +1 @@\n-x\n+y\n"
            "--- /dev/null\n+++ b/xen/common/new.c\t2024-01-01\n@@ -0,0 +1 @@\n+z\n"
            "--- a/xen/common/old.c\n+++ /dev/null\n@@ -1 +0,0 @@\n-q\n")
    files = {f.path: f for f in parse_patch_files(text)}
    assert set(files) == {"xen/common/a.c", "xen/common/new.c", "xen/common/old.c"}
    assert files["xen/common/new.c"].created and not files["xen/common/new.c"].deleted
    assert files["xen/common/old.c"].deleted
    assert not files["xen/common/a.c"].created


def test_parse_patch_files_diff_n_creations_and_deletions() -> None:
    # diff -Nru names both sides and starts a new file's only hunk from nothing (GNU patch
    # creates the file); a file that was modified keeps created=False.
    text = ("diff -Nru a/xen/common/new.c b/xen/common/new.c\n"
            "--- a/xen/common/new.c\t1970-01-01 00:00:00.000000000 +0000\n"
            "+++ b/xen/common/new.c\t2026-12-03 08:00:00.000000000 +0000\n"
            "@@ -0,0 +1,2 @@\n+a\n+b\n"
            "--- a/xen/common/gone.c\t2026-12-03 08:00:00.000000000 +0000\n"
            "+++ b/xen/common/gone.c\t1970-01-01 00:00:00.000000000 +0000\n"
            "@@ -1 +0,0 @@\n-q\n"
            "--- a/xen/common/a.c\n+++ b/xen/common/a.c\n@@ -1 +1 @@\n-x\n+y\n@@ -0,0 +9 @@\n")
    files = {f.path: f for f in parse_patch_files(text)}
    assert files["xen/common/new.c"].created and not files["xen/common/new.c"].deleted
    assert files["xen/common/gone.c"].deleted and not files["xen/common/gone.c"].created
    assert not files["xen/common/a.c"].created and not files["xen/common/a.c"].deleted


@pytest.mark.parametrize("bad", ["--- a/../etc/x\n+++ b/../etc/x\n", "no headers at all\n"])
def test_parse_patch_files_refuses_escapes_and_non_patches(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_patch_files(bad)


def test_tree_index_reads_objects_and_link_closure(tree: Path) -> None:
    index = TreeIndex.load(tree / "xen")
    assert index.objects["common/alpha.o"].source == "common/alpha.c"
    assert "include/xen/shared.h" in index.objects["common/alpha.o"].deps
    assert index.objects["common/setup.o"].final == "common/setup.init.o"
    assert "common/setup.init.o" in index.linked
    assert "arch/x86/boot/helper.o" not in index.linked
    assert index.objects["common/alpha.o"].unique_symbols
    assert not index.objects["arch/x86/entry.o"].unique_symbols


# ------------------------------------------------------------------------------------------
# Capture


def test_changed_function_captured_and_self_checked(tree: Path, tmp_path: Path) -> None:
    new = replace_in(tree, "xen/common/alpha.c", '"alpha-1"', '"alpha-2"')
    patch = make_patch(tree, {"xen/common/alpha.c": new}, tmp_path / "p.patch")
    before = tree_hash(tree)
    result = run_capture(tree, tmp_path, patch)
    assert tree_hash(tree) == before
    assert [c.obj for c in result.changed] == ["common/alpha.o"]
    c = result.changed[0]
    # The original is the tree's object, byte for byte, even though the tree was moved.
    assert c.orig.read_bytes() == (tree / "xen/common/alpha.o").read_bytes()
    assert c.patched.read_bytes() != c.orig.read_bytes()
    # The objcopy --redefine-sym step ran: the FILE symbol carries the directory.
    assert file_symbol(c.patched) == ["common/alpha.c"]
    assert b"alpha-2" in c.patched.read_bytes()


def test_header_change_captures_every_dependent_object(tree: Path, tmp_path: Path) -> None:
    new = replace_in(tree, "xen/include/xen/shared.h", "x * 3", "x * 5")
    patch = make_patch(tree, {"xen/include/xen/shared.h": new}, tmp_path / "h.patch")
    result = run_capture(tree, tmp_path, patch)
    assert sorted(c.obj for c in result.changed) == ["common/alpha.o", "common/beta.o"]
    assert all(c.reasons == ["xen/include/xen/shared.h"] for c in result.changed)
    assert result.not_linked == ["arch/x86/boot/helper.o"]
    assert "common/gamma.o" not in result.unchanged  # does not include the header at all


def test_header_change_without_effect_is_unchanged(tree: Path, tmp_path: Path) -> None:
    # Appended, so no line number moves (the objects carry -g line tables).
    new = (tree / "xen/include/xen/shared.h").read_text() + "/* a comment */\n"
    patch = make_patch(tree, {"xen/include/xen/shared.h": new}, tmp_path / "c.patch")
    result = run_capture(tree, tmp_path, patch)
    assert result.changed == []
    assert sorted(result.unchanged) == ["common/alpha.o", "common/beta.o"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_patch_that_does_not_apply_leaves_tree_identical(tree: Path, tmp_path: Path,
                                                         jobs: int) -> None:
    good = make_patch(tree, {"xen/common/beta.c": replace_in(
        tree, "xen/common/beta.c", "- 1", "- 2")}, tmp_path / "good.patch")
    bad = make_patch(tree, {"xen/common/alpha.c": replace_in(
        tree, "xen/common/alpha.c", '"alpha-1"', '"alpha-2"')}, tmp_path / "bad.patch")
    bad.write_text(bad.read_text().replace('"alpha-1"', '"alpha-0"'))  # context mismatch
    before = tree_hash(tree)
    with pytest.raises(UsageError, match=r"bad\.patch does not apply"):
        run_capture(tree, tmp_path, good, bad, jobs=jobs)
    assert tree_hash(tree) == before


def test_compile_error_leaves_tree_identical(tree: Path, tmp_path: Path) -> None:
    new = replace_in(tree, "xen/common/beta.c", "- 1;", "- ;")
    patch = make_patch(tree, {"xen/common/beta.c": new}, tmp_path / "e.patch")
    before = tree_hash(tree)
    with pytest.raises(UsageError, match=r"compiling common/beta\.o failed in the patched tree"):
        run_capture(tree, tmp_path, patch)
    assert tree_hash(tree) == before


def test_new_source_file_uses_sibling_flags(tree: Path, tmp_path: Path) -> None:
    makefile = (tree / "xen/common/Makefile").read_text() + "obj-y += delta.o\n"
    patch = make_patch(tree, {
        "xen/common/delta.c": "int delta_fn(int x)\n{\n    return x - 40;\n}\n",
        "xen/common/Makefile": makefile}, tmp_path / "n.patch")
    before = tree_hash(tree)
    result = run_capture(tree, tmp_path, patch)
    assert tree_hash(tree) == before
    assert not (tree / "xen/common/delta.c").exists()
    [c] = result.changed
    assert c.obj == "common/delta.o" and c.new
    assert defined_functions(c.orig) == set()
    assert defined_functions(c.patched) == {"delta_fn"}
    assert file_symbol(c.patched) == ["common/delta.c"]
    assert "xen/common/Makefile" in result.ignored_files
    # Cross-check against the real build: adding the file and running the mini-Kbuild with
    # the sibling flags gives the very same object.
    other = tmp_path / "rebuilt"
    shutil.copytree(tree, other, symlinks=True)
    subprocess.run(["patch", "-p1", "-s", "-i", str(patch)], cwd=other, check=True)
    make(other)
    index = TreeIndex.load(other / "xen")
    assert index.objects["common/delta.o"].argv[-1] == "common/delta.o"
    rebuilt = (other / "xen/common/delta.o").read_bytes()
    again = capture(CaptureRequest(other, (make_patch(other, {"xen/common/delta.c": replace_in(
        other, "xen/common/delta.c", "40", "41")}, tmp_path / "d2.patch"),), tmp_path / "w2"))
    assert again.changed[0].orig.read_bytes() == rebuilt


def test_init_only_object_goes_through_init_step(tree: Path, tmp_path: Path) -> None:
    new = replace_in(tree, "xen/common/setup.c", "x + 7", "x + 8")
    patch = make_patch(tree, {"xen/common/setup.c": new}, tmp_path / "i.patch")
    result = run_capture(tree, tmp_path, patch)
    [c] = result.changed
    assert c.obj == "common/setup.init.o"
    assert c.orig.read_bytes() == (tree / "xen/common/setup.init.o").read_bytes()
    assert ".init.text" in section_names(c.patched)


def test_assembly_source_change_goes_to_the_differ(tree: Path, tmp_path: Path) -> None:
    # entry.S is captured like C; the differ decides (here: a bare label, refused by name).
    new = replace_in(tree, "xen/arch/x86/entry.S", "ret", "nop\n    ret")
    patch = make_patch(tree, {"xen/arch/x86/entry.S": new}, tmp_path / "s.patch")
    [c] = run_capture(tree, tmp_path, patch).changed
    assert c.obj == "arch/x86/entry.o"
    assert c.orig.read_bytes() == (tree / "xen/arch/x86/entry.o").read_bytes()
    run = cli_build(tree, patch, tmp_path / "out.livepatch")
    assert run.returncode == 1, run.stderr
    assert "arch/x86/entry.o: .text: entry+0x0: changed assembly outside any function with an " \
           "ELF type FUNC and a size" in run.stderr


def test_header_change_reaching_assembly_is_captured(tree: Path, tmp_path: Path) -> None:
    new = replace_in(tree, "xen/include/xen/asmdefs.h", "0x42", "0x43")
    patch = make_patch(tree, {"xen/include/xen/asmdefs.h": new}, tmp_path / "a.patch")
    [c] = run_capture(tree, tmp_path, patch).changed
    assert c.obj == "arch/x86/entry.o" and c.reasons == ["xen/include/xen/asmdefs.h"]


def test_self_check_detects_a_stale_tree(tree: Path, tmp_path: Path) -> None:
    # The source no longer matches the object built from it: refuse, don't build a payload
    # from objects that are not what the hypervisor runs, and blame the tree with the evidence.
    src = tree / "xen/common/gamma.c"
    src.write_text(src.read_text().replace("0x5a", "0x5b"))
    patch = make_patch(tree, {"xen/common/gamma.c": replace_in(
        tree, "xen/common/gamma.c", "x ^", "x |")}, tmp_path / "g.patch")
    with pytest.raises(UsageError, match=r"not up to date.*common/gamma\.o: common/gamma\.c is "
                                         r"newer than the object"):
        run_capture(tree, tmp_path, patch)


def test_self_check_names_another_compiler(tree: Path, tmp_path: Path) -> None:
    # Same sources, but the tree's object says another gcc made it: the tree is at fault.
    obj = tree / "xen/common/gamma.o"
    comment = tmp_path / "comment"
    comment.write_bytes(b"\0GCC: (Other) 99.1.0\0")
    subprocess.run(["objcopy", f"--update-section=.comment={comment}", str(obj)], check=True)
    patch = make_patch(tree, {"xen/common/gamma.c": replace_in(
        tree, "xen/common/gamma.c", "x ^", "x |")}, tmp_path / "g.patch")
    with pytest.raises(UsageError, match=r"another compiler.*GCC: \(Other\) 99\.1\.0"):
        run_capture(tree, tmp_path, patch)


def test_self_check_blames_xsbuild_without_evidence(tree: Path, tmp_path: Path) -> None:
    # The tree's object differs from the replay, yet it is newer than its sources and made by
    # this compiler: xsbuild's replay is at fault (exit 5), naming the object and the step.
    obj = tree / "xen/common/gamma.o"
    subprocess.run(["objcopy", "--rename-section", ".text.gamma_fn=.text.gamma_other",
                    str(obj)], check=True)
    patch = make_patch(tree, {"xen/common/gamma.c": replace_in(
        tree, "xen/common/gamma.c", "x ^", "x |")}, tmp_path / "g.patch")
    with pytest.raises(ReplayError) as info:
        run_capture(tree, tmp_path, patch)
    assert info.value.return_code == EXIT_REPLAY == 5
    assert info.value.problems == [
        "common/gamma.o: the compile (gcc, then objcopy --redefine-sym) differs "
        "(other sections: .text.gamma_fn, .text.gamma_other)"]
    assert "limitation of xsbuild" in str(info.value)


def test_self_check_names_the_init_step(tree: Path, tmp_path: Path) -> None:
    # Only the .init.o copy differs: the message names that step, not the compile.
    obj = tree / "xen/common/setup.init.o"
    subprocess.run(["objcopy", "--rename-section", ".init.text=.init.text.x", str(obj)],
                   check=True)
    patch = make_patch(tree, {"xen/common/setup.c": replace_in(
        tree, "xen/common/setup.c", "x + 7", "x + 8")}, tmp_path / "i.patch")
    with pytest.raises(ReplayError, match=r"common/setup\.init\.o: the setup\.o -> "
                                          r"setup\.init\.o objcopy step differs"):
        run_capture(tree, tmp_path, patch)


def test_symlinked_source_named_by_its_real_path(tree: Path, tmp_path: Path) -> None:
    # The EFI pattern: arch/x86/efi/rt.c is a link into common/efi/.  A header change reaches
    # it, the replay reproduces the tree's object (FILE symbol = the real path), and a patch to
    # the real file reaches the object through the link -- the shadow's copy, not the tree's.
    index = TreeIndex.load(tree / "xen")
    assert index.objects["arch/x86/efi/rt.o"].real_source == "common/efi/rt.c"
    assert file_symbol(tree / "xen/arch/x86/efi/rt.o") == ["common/efi/rt.c"]
    header = make_patch(tree, {"xen/common/efi/efi.h": replace_in(
        tree, "xen/common/efi/efi.h", "7", "8")}, tmp_path / "h.patch")
    result = run_capture(tree, tmp_path, header)
    [c] = result.changed
    assert c.obj == "arch/x86/efi/rt.o"
    assert c.orig.read_bytes() == (tree / "xen/arch/x86/efi/rt.o").read_bytes()
    source = make_patch(tree, {"xen/common/efi/rt.c": replace_in(
        tree, "xen/common/efi/rt.c", "return EFI_REVISION;", "return EFI_REVISION + 1;")},
        tmp_path / "s.patch")
    before = tree_hash(tree)
    again = capture(CaptureRequest(tree, (source,), tmp_path / "w2"))
    assert tree_hash(tree) == before
    [c] = again.changed
    assert c.obj == "arch/x86/efi/rt.o" and c.reasons == ["xen/common/efi/rt.c"]
    assert c.orig.read_bytes() == (tree / "xen/arch/x86/efi/rt.o").read_bytes()
    assert file_symbol(c.patched) == ["common/efi/rt.c"]


def test_originals_compiled_only_where_the_patch_changed_bytes(tree: Path,
                                                               tmp_path: Path) -> None:
    # shared.h reaches alpha.o and beta.o; only alpha.c uses the new macro, so only alpha.o
    # changes and only its original is compiled (and proven against the tree's).
    text = (tree / "xen/include/xen/shared.h").read_text() + "#define SHARED_BIAS 1\n"
    alpha = replace_in(tree, "xen/common/alpha.c", "shared_helper(x) + 1",
                       "shared_helper(x) + SHARED_BIAS + 1")
    patch = make_patch(tree, {"xen/include/xen/shared.h": text, "xen/common/alpha.c": alpha},
                       tmp_path / "b.patch")
    result = run_capture(tree, tmp_path, patch)
    assert [c.obj for c in result.changed] == ["common/alpha.o"]
    assert result.unchanged == ["common/beta.o"]
    assert sorted(p.name for p in (tmp_path / "work/patched/common").glob("*.o")) == [
        "alpha.o", "beta.o"]
    assert sorted(p.name for p in (tmp_path / "work/orig/common").glob("*.o")) == ["alpha.o"]


def test_replay_tree_reproduces_every_object(tree: Path, tmp_path: Path) -> None:
    index = TreeIndex.load(tree / "xen")
    before = tree_hash(tree)
    report = replay_tree(tree, tmp_path / "w", jobs=2, index=index)
    assert tree_hash(tree) == before
    assert (report.different, report.failed) == ([], [])
    assert sorted(report.identical) == sorted(o.final for o in index.objects.values())
    # ... and it can fail: a tree object that is not what its line makes is named, with a step.
    subprocess.run(["objcopy", "--rename-section", ".text.beta=.text.other",
                    str(tree / "xen/common/beta.o")], check=True)
    report = replay_tree(tree, tmp_path / "w2", jobs=1)
    assert report.different == [
        "common/beta.o: the compile (gcc, then objcopy --redefine-sym) differs "
        "(other sections: .text.beta, .text.other)"]


def test_generated_header_is_regenerated_in_the_shadow(tree: Path, tmp_path: Path) -> None:
    # gen.h is made from gen.def by a recorded command: a patch to gen.def regenerates it in
    # the shadow (never through a link into the tree) and reaches the objects that include it.
    index = TreeIndex.load(tree / "xen")
    assert [g.target for g in index.generated] == ["include/xen/gen.h"]
    assert index.generated[0].inputs == {"include/xen/gen.def"}
    patch = make_patch(tree, {"xen/include/xen/gen.def": replace_in(
        tree, "xen/include/xen/gen.def", "17", "18")}, tmp_path / "g.patch")
    before = tree_hash(tree)
    result = run_capture(tree, tmp_path, patch)
    assert tree_hash(tree) == before
    assert result.generated_files == ["xen/include/xen/gen.h"]
    [c] = result.changed
    assert c.obj == "common/epsilon.o" and c.reasons == ["xen/include/xen/gen.h"]
    assert c.orig.read_bytes() == (tree / "xen/common/epsilon.o").read_bytes()
    assert "common/epsilon.o" in result.to_json()["changed_objects"]
    # A generator whose output the patch does not change reaches nothing.
    same = make_patch(tree, {"xen/include/xen/gen.def": replace_in(
        tree, "xen/include/xen/gen.def", "GEN_OTHER=3", "GEN_OTHER=3 ")}, tmp_path / "s.patch")
    again = capture(CaptureRequest(tree, (same,), tmp_path / "w2"))
    assert again.generated_files == ["xen/include/xen/gen.h"] and again.changed == []


def test_generator_that_does_not_reproduce_is_xsbuilds_limitation(tree: Path,
                                                                  tmp_path: Path) -> None:
    # The tree's gen.h is not what its recorded command makes from the unpatched gen.def
    # (as with a generator embedding the time): exit 5, naming the file.
    (tree / "xen/include/xen/gen.h").write_text("#define GEN_LIMIT 17 /* hand-edited */\n"
                                                 "#define GEN_OTHER 3\n")
    patch = make_patch(tree, {"xen/include/xen/gen.def": replace_in(
        tree, "xen/include/xen/gen.def", "17", "18")}, tmp_path / "g.patch")
    with pytest.raises(ReplayError, match=r"include/xen/gen\.h: regenerating it from the "
                                          r"unpatched sources does not reproduce"):
        run_capture(tree, tmp_path, patch)


def test_tree_built_without_prefix_map_replays(tmp_path: Path) -> None:
    # As upstream's defconfig builds: -g and no -ffile-prefix-map, so every object holds the
    # tree's absolute path (DW_AT_comp_dir).  The replay maps the shadow back to it: N of N,
    # and a patch's original is the tree's object.
    top = tmp_path / "nomap"
    write_tree(top)
    make(top, {"FAKE_NO_PREFIX_MAP": "1"})
    index = TreeIndex.load(top / "xen")
    assert index.recorded_top is None
    assert str(top).encode() in (top / "xen/common/alpha.o").read_bytes()
    report = replay_tree(top, tmp_path / "w", jobs=2, index=index)
    assert (report.different, report.failed) == ([], [])
    patch = make_patch(top, {"xen/common/alpha.c": replace_in(
        top, "xen/common/alpha.c", '"alpha-1"', '"alpha-2"')}, tmp_path / "p.patch")
    [c] = run_capture(top, tmp_path, patch).changed
    assert c.orig.read_bytes() == (top / "xen/common/alpha.o").read_bytes()


def test_files_outside_the_hypervisor_are_ignored(tree: Path, tmp_path: Path) -> None:
    patch = make_patch(tree, {"tools/misc/tool.c": "int main(void) { return 1; }\n"},
                       tmp_path / "t.patch")
    result = run_capture(tree, tmp_path, patch)
    assert result.changed == [] and result.ignored_files == ["tools/misc/tool.c"]
    assert (tree / "tools/misc/tool.c").read_text() == SOURCES["tools/misc/tool.c"]


def test_patch_relative_to_xen_dir(tree: Path, tmp_path: Path) -> None:
    new = replace_in(tree, "xen/common/beta.c", "- 1", "- 3")
    patch = make_patch(tree, {"xen/common/beta.c": new}, tmp_path / "x.patch")
    patch.write_text(patch.read_text().replace("a/xen/", "a/").replace("b/xen/", "b/"))
    result = run_capture(tree, tmp_path, patch)
    assert [c.obj for c in result.changed] == ["common/beta.o"]


# ------------------------------------------------------------------------------------------
# The command line


def xsbuild(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *args], capture_output=True,
                          text=True, check=False, env={**os.environ, **(env or {})})


def cli_build(tree: Path, patch: Path, out: Path, *extra: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return xsbuild("build", "--srcdir", str(tree), "--patch", str(patch), "--xen-syms",
                   str(tree / "xen/xen-syms"), "-o", str(out), *extra, env=env)


def test_cli_patch_not_applying_exit_2_no_output(tree: Path, tmp_path: Path) -> None:
    patch = make_patch(tree, {"xen/common/beta.c": replace_in(
        tree, "xen/common/beta.c", "- 1", "- 2")}, tmp_path / "b.patch")
    patch.write_text(patch.read_text().replace("shared_helper(x) -", "shared_helpr(x) -"))
    before = tree_hash(tree)
    out = tmp_path / "out.livepatch"
    run = cli_build(tree, patch, out, "--json")
    assert run.returncode == 2, run.stderr
    assert "b.patch does not apply" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()[-1].split("\n")) == 1
    assert json.loads(run.stdout)["status"] == "UsageError"
    assert not out.exists() and (tmp_path / "out.livepatch.log").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert tree_hash(tree) == before


def test_cli_refused_changed_data_exit_1(tree: Path, tmp_path: Path) -> None:
    pytest.importorskip("xsbuild.diff")
    new = replace_in(tree, "xen/common/alpha.c", "alpha_counter = 5", "alpha_counter = 6")
    patch = make_patch(tree, {"xen/common/alpha.c": new}, tmp_path / "d.patch")
    out = tmp_path / "out.livepatch"
    run = cli_build(tree, patch, out, "--json")
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()
    assert any("alpha_counter" in line for line in last), run.stderr
    doc = json.loads(run.stdout)
    assert doc["status"] == "UnsupportedChangeError"
    assert any("common/alpha.o" in p and "alpha_counter" in p for p in doc["refused"])
    assert not out.exists()


def test_cli_struct_layout_change_refused_naming_the_type(tree: Path, tmp_path: Path) -> None:
    # A member inserted into a struct of a header: alpha.o reads a moved member, so the build
    # refuses it, naming type, member, both offsets and the header line; nothing is written.
    new = replace_in(tree, "xen/include/xen/shared.h", "    int hits;\n",
                     "    int hits;\n    int resets;\n")
    patch = make_patch(tree, {"xen/include/xen/shared.h": new}, tmp_path / "l.patch")
    out = tmp_path / "out.livepatch"
    run = cli_build(tree, patch, out, "--json")
    assert run.returncode == 1, run.stderr
    doc = json.loads(run.stdout)
    assert doc["status"] == "UnsupportedChangeError"
    [problem] = doc["refused"]
    assert problem.startswith("struct-layout change: struct shared_counter "
                              "(include/xen/shared.h:6): size changes from 8 bytes to 12 bytes; "
                              "member resets added at offset 4, size 4; "
                              "member misses moved: offset 4, size 4 -> offset 8, size 4")
    assert "--allow-layout-change 'struct shared_counter'" in problem
    assert not out.exists()
    # Allowed by name, the build goes on past the check, which the log records.
    cli_build(tree, patch, out, "--allow-layout-change", "shared_counter")
    log = (tmp_path / "out.livepatch.log").read_text()
    assert "layout change (allowed): struct shared_counter" in log
    assert "refused" not in log.split("layout: ")[1].split("\n")[0]


@pytest.mark.parametrize("cmd", [
    "gcc -O2 -c common/a.c -o common/.a.o.tmp '-D__OBJECT_LABEL__=common/a.o'",
    "a 'b c' d'e'f '' x\ty\n z", "-D'X=1' 'a'b'c'", 'say "two words" \\x', "odd 'quote"])
def test_split_command_is_shlex(cmd: str) -> None:
    try:
        want = shlex.split(cmd)
    except ValueError:
        with pytest.raises(ValueError):
            split_command(cmd)
        return
    assert split_command(cmd) == want


def test_layout_twins_fall_back_to_the_trees_flags(tree: Path, tmp_path: Path) -> None:
    # The twins compile at -O0; code that needs the optimiser (an "i" asm constraint fed by an
    # inline function) fails there, so that twin is compiled with the tree's -O2 instead, and
    # the payload's objects are the same as without twins.
    new = replace_in(tree, "xen/common/alpha.c",
                     "int alpha_get(void)\n{\n    return alpha_counter;",
                     "static inline int four(void)\n{\n    return 4;\n}\n\n"
                     "int alpha_get(void)\n{\n    asm volatile (\"\" :: \"i\" (four()));\n"
                     "    return alpha_counter;")
    patch = make_patch(tree, {"xen/common/alpha.c": new}, tmp_path / "i.patch")
    result = capture(CaptureRequest(tree, (patch,), tmp_path / "work", debug_info=True))
    assert result.twin_fallbacks == ["debug-patched common/alpha.o"]
    [c] = result.changed
    assert c.debug is not None and all(p.is_file() for p in c.debug)
    plain = run_capture(tree, tmp_path / "plain", patch)
    assert [x.patched.read_bytes() for x in plain.changed] == [c.patched.read_bytes()]


def test_cli_no_change_exit_3(tree: Path, tmp_path: Path) -> None:
    new = (tree / "xen/common/gamma.c").read_text() + "/* comment only */\n"
    patch = make_patch(tree, {"xen/common/gamma.c": new}, tmp_path / "n.patch")
    run = cli_build(tree, patch, tmp_path / "out.livepatch")
    assert run.returncode == 3, run.stderr
    assert "no functional change" in run.stderr


def test_cli_xen_syms_of_another_build_exit_2(tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-syms"
    subprocess.run(["ld", "--build-id=sha1", "-e", "0", "-o", str(other),
                    str(tree / "xen/common/gamma.o")], check=True)
    patch = make_patch(tree, {"xen/common/gamma.c": replace_in(
        tree, "xen/common/gamma.c", "0x5a", "0x5b")}, tmp_path / "g.patch")
    run = xsbuild("build", "--srcdir", str(tree), "--patch", str(patch), "--xen-syms", str(other),
                  "-o", str(tmp_path / "o.livepatch"))
    assert run.returncode == 2
    assert "has build-id" in run.stderr and "but the tree" in run.stderr


def test_cli_unbuilt_tree_is_built_once_in_the_cache(tmp_path: Path) -> None:
    top = tmp_path / "unbuilt"
    write_tree(top)
    ref = tmp_path / "ref"
    shutil.copytree(top, ref)
    make(ref)  # the "running hypervisor": the same sources built elsewhere
    before = tree_hash(top)
    patch = make_patch(top, {"xen/common/gamma.c": "int gamma_fn(int x)\n{\n    return x;\n}\n"},
                       tmp_path / "u.patch")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "u.livepatch"
    args = ("build", "--srcdir", str(top), "--patch", str(patch), "--xen-syms",
            str(ref / "xen/xen-syms"), "-o", str(out))
    first = xsbuild(*args, env=env)
    assert "building the base hypervisor once" in first.stderr, first.stderr
    # The mini-Kbuild maps the tree's path away (like Debian's prefix maps), so the cached build
    # is the same hypervisor as the reference: the build goes on to capture from it.
    assert "changed object: common/gamma.o" in first.stderr, first.stderr
    assert tree_hash(top) == before
    [base] = [p for p in (tmp_path / "cache/xsbuild/bases").iterdir() if p.name[0] != "."]
    assert (base / "xsbuild-base.ok").is_file() and (base / "xen/xen-syms").is_file()
    assert (base / "xen/xen-syms").read_bytes() == (ref / "xen/xen-syms").read_bytes()
    second = xsbuild(*args, env=env)
    assert "building the base hypervisor once" not in second.stderr
    assert "changed object: common/gamma.o" in second.stderr, second.stderr
    assert out.exists() == (second.returncode == 0)


def test_cli_unbuilt_tree_without_config_says_so(tmp_path: Path) -> None:
    top = tmp_path / "unconfigured"
    write_tree(top)
    (top / "xen/.config").unlink()
    patch = make_patch(top, {"xen/common/gamma.c": "int gamma_fn(int x)\n{\n    return x;\n}\n"},
                       tmp_path / "u.patch")
    ref = tmp_path / "ref"
    shutil.copytree(top, ref)
    (ref / "xen/.config").write_text("CONFIG_LIVEPATCH=y\n")
    make(ref)
    run = xsbuild("build", "--srcdir", str(top), "--patch", str(patch), "--xen-syms",
                  str(ref / "xen/xen-syms"), "-o", str(tmp_path / "o.livepatch"),
                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert run.returncode == 2
    assert "has no .config" in run.stderr and "Traceback" not in run.stderr
    assert [p for p in (tmp_path / "cache/xsbuild/bases").iterdir() if p.name[0] != "."] == []


# ------------------------------------------------------------------------------------------
# Debian's real tree (slow: only where the tree is built)

def debian_patch(top: Path, tmp_path: Path, rel: str, old: str, new: str) -> Path:
    return make_patch(top, {rel: replace_in(top, rel, old, new)}, tmp_path / "deb.patch")


@pytest.mark.slow
def test_debian_capture_reproduces_objects(debian_tree: DebianTree, tmp_path: Path) -> None:
    top = debian_tree.source_top
    patch = debian_patch(top, tmp_path, "xen/common/version.c", "return XEN_EXTRAVERSION;",
                         'return XEN_EXTRAVERSION "-xsb";')
    before = tree_hash(top / "xen/common")
    result = run_capture(top, tmp_path, patch)
    assert [c.obj for c in result.changed] == ["common/version.o"]
    assert result.changed[0].orig.read_bytes() == (top / "xen/common/version.o").read_bytes()
    assert file_symbol(result.changed[0].patched) == ["common/version.c"]
    assert tree_hash(top / "xen/common") == before


@pytest.mark.slow
def test_debian_init_object_and_header(debian_tree: DebianTree, tmp_path: Path) -> None:
    top = debian_tree.source_top
    index = TreeIndex.load(top / "xen")
    users = index.affected("include/xen/earlycpio.h")
    assert users, "expected users of earlycpio.h"
    patch = debian_patch(top, tmp_path, "xen/include/xen/earlycpio.h",
                         "#define MAX_CPIO_FILE_NAME 18", "#define MAX_CPIO_FILE_NAME 19")
    result = run_capture(top, tmp_path, patch, jobs=2)
    touched = {c.obj for c in result.changed} | set(result.unchanged)
    assert touched == {o.final for o in users if o.final in index.linked}


@pytest.mark.slow
def test_debian_replay_reproduces_every_object(debian_tree: DebianTree, tmp_path: Path) -> None:
    # Every object of Debian's tree, EFI objects, .init.o copies, assembly and host tools
    # included, comes out of the capture path byte for byte: N of N.
    report = replay_tree(debian_tree.source_top, tmp_path / "w", jobs=os.cpu_count() or 2)
    assert report.different == [] and report.failed == []
    assert report.total == len(report.identical) > 300
    assert {"arch/x86/efi/runtime.o", "arch/x86/efi/boot.init.o",
            "common/version.o"} <= set(report.identical)


@pytest.mark.slow
def test_debian_header_reaching_efi_objects(debian_tree: DebianTree, tmp_path: Path) -> None:
    # A header the EFI objects include (the blocker of a quarter of real fixes) plus the real
    # file behind the arch/x86/efi/runtime.c link: every EFI object is recompiled, only
    # runtime.o changes, and only its original is compiled and proven against the tree's.
    top = debian_tree.source_top
    rel_h, rel_c = "xen/common/efi/efi.h", "xen/common/efi/runtime.c"
    patch = make_patch(top, {
        rel_h: replace_in(top, rel_h, "extern const CHAR16 *efi_fw_vendor;",
                          "extern const CHAR16 *efi_fw_vendor;\nextern int xsb_unused;"),
        rel_c: replace_in(top, rel_c, "while ( n && *s != c )", "while ( n > 1 && *s != c )"),
    }, tmp_path / "efi.patch")
    result = run_capture(top, tmp_path, patch)
    [c] = result.changed
    assert c.obj == "arch/x86/efi/runtime.o"
    assert c.orig.read_bytes() == (top / "xen" / c.obj).read_bytes()
    assert file_symbol(c.patched) == ["common/efi/runtime.c"]
    assert {"arch/x86/efi/compat.o", "arch/x86/efi/boot.init.o",
            "arch/x86/efi/pe.init.o"} <= set(result.unchanged)
    assert sorted(p.name for p in (tmp_path / "work/orig").rglob("*.o")) == ["runtime.o"]


# ------------------------------------------------------------------------------------------
# --debian VERSION, offline: a cache seeded with a Debian-like fake tree and a "shipped" xen-syms

DEB_VERSION = "4.17.5+72-g01140da4e8-1"
CHANGELOG = f"""\
xen ({DEB_VERSION}) bookworm; urgency=medium

  * Test tree.

 -- Test Maintainer <test@example.org>  Sat, 29 Nov 2025 13:52:25 +0000
"""


def seed_debian_cache(cache: Path, shipped_syms: Path | None) -> Path:
    """``$XDG_CACHE_HOME/xsbuild/debian/VERSION`` with an unbuilt source tree and ``ref/``
    (what ``apt-get source`` and ``apt-get download`` would have left there)."""
    folder = cache / "xsbuild" / "debian" / DEB_VERSION
    top = folder / "xen-4.17.5+72-g01140da4e8"
    write_tree(top)
    (top / "debian").mkdir()
    (top / "debian/changelog").write_text(CHANGELOG)
    (top / "debian/control").write_text("Source: xen\nMaintainer: Test <test@example.org>\n")
    boot = folder / "ref/usr/lib/debug/boot"
    boot.mkdir(parents=True)
    if shipped_syms is not None:
        shutil.copyfile(shipped_syms, boot / "xen-syms-4.17-amd64")
    (folder / "ref/.complete").write_text(DEB_VERSION)
    return top


@pytest.mark.skipif(shutil.which("dpkg-parsechangelog") is None, reason="needs dpkg-dev")
def test_debian_base_built_once_and_used(built_tree_master: Path, tmp_path: Path) -> None:
    # The fake tree maps its own path away, so its build-id does not depend on where it is
    # built: the master's xen-syms plays Debian's shipped one.
    top = seed_debian_cache(tmp_path / "cache", built_tree_master / "xen/xen-syms")
    patch = make_patch(top, {"xen/common/beta.c": replace_in(
        top, "xen/common/beta.c", "- 1", "- 4")}, tmp_path / "b.patch")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ("build", "--debian", DEB_VERSION, "--patch", str(patch), "-o",
            str(tmp_path / "b.livepatch"))
    first = xsbuild(*args, env=env)
    assert "building the base hypervisor once" in first.stderr, first.stderr
    assert "changed object: common/beta.o" in first.stderr, first.stderr
    assert (top / "xsbuild-base.ok").is_file()
    second = xsbuild(*args, env=env)
    assert "building the base hypervisor once" not in second.stderr, second.stderr
    assert "changed object: common/beta.o" in second.stderr, second.stderr


@pytest.mark.skipif(shutil.which("dpkg-parsechangelog") is None, reason="needs dpkg-dev")
def test_debian_base_build_id_mismatch_stops(tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-syms"
    subprocess.run(["ld", "--build-id=sha1", "-e", "0", "-o", str(other),
                    str(tree / "xen/common/gamma.o")], check=True)
    top = seed_debian_cache(tmp_path / "cache", other)
    patch = make_patch(top, {"xen/common/beta.c": replace_in(
        top, "xen/common/beta.c", "- 1", "- 4")}, tmp_path / "b.patch")
    out = tmp_path / "b.livepatch"
    run = xsbuild("build", "--debian", DEB_VERSION, "--patch", str(patch), "-o", str(out),
                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert run.returncode == 2, run.stderr
    assert "differs from Debian's" in run.stderr and "not bit-identical" in run.stderr
    assert not (top / "xsbuild-base.ok").exists() and not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt")
def test_debian_one_command(tmp_path: Path) -> None:
    """The real thing: apt-get source + -dbg, a bit-identical rebuild (once per machine, in the
    XDG cache: minutes the first time), then a payload for the hypervisor Debian ships."""
    patch = REPO / "tests/xen/patches/01-changed-function.patch"
    out = tmp_path / "deb.livepatch"
    run = xsbuild("build", "--debian", DEB_VERSION, "--patch", str(patch), "-o", str(out),
                  "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["base"]["xen_build_id"] == "39a640e6f1412319235087391df9f1c5e13ae920"
    assert doc["changed_functions"] == ["xen_extra_version"] and out.is_file()
