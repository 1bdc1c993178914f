"""Capture the objects a source patch changes, original and patched, without touching the tree.

A built Xen tree records, for every object, the exact gcc line that made it
(``xen/<dir>/.<name>.o.cmd``: ``cmd_<obj>``, ``source_<obj>``, ``deps_<obj>``).  Replaying that
line, plus the ``objcopy --redefine-sym <file>.c=<dir>/<file>.c`` step that
CONFIG_ENFORCE_UNIQUE_SYMBOLS adds after gcc (Rules.mk ``cmd_objcopy_fix_sym``, not recorded in
the ``.cmd`` file), reproduces each object byte for byte (target-notes "The tree").  So a payload
build never runs make:

STEP 1  parse the patches: which files they touch, create or delete (:func:`parse_patch_files`).
STEP 2  build a *shadow* of the tree in a scratch directory: real directories, symlinked files
        (links inside the tree mirrored as links, so ``arch/x86/efi/*.c`` reach the shadow's
        ``common/efi/``), real copies of the touched files (:class:`Shadow`).  Nothing is ever
        written through a symlink, so the user's tree stays exactly as it was, whatever fails.
STEP 3  ``patch --dry-run`` in the shadow: a patch that does not apply stops here; then apply.
STEP 4  regenerate the generated files whose inputs the patch touched (compat headers,
        ``hypercall-defs.h``: the commands their ``.cmd`` files record), inputs first.
STEP 5  find the affected objects: a changed source, or a changed header or generated file
        through ``deps_`` (:meth:`TreeIndex.affected`); new ``.c`` files borrow a sibling's flags.
STEP 6  compile the patched objects; one byte-identical to the tree's is unchanged and done.
STEP 7  only for the objects whose bytes changed: ``-g`` twins (at ``-O0``) of the fewest that
        show every touched file's types (the layout check), then undo the patches and compile
        the original twins and the originals in one pool, each original to equal the tree's
        object (self-check: the replay is faithful and the tree up to date, else we say which).

Everything here is independent of the differ and linker, so it is tested on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shlex
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from xsbuild.errors import ReplayError, UnsupportedChangeError, UsageError

# Called with one line of progress for the long steps (the CLI prints it on stderr).
Progress = Callable[[str], None]

# objcopy as Xen's Rules.mk calls it ($(OBJCOPY) = $(CROSS_COMPILE)objcopy; Debian sets no prefix).
OBJCOPY = "objcopy"
_CMD_LINE_RE = re.compile(r"^(cmd|source|deps)_(\S+)\s*:=\s*(.*)$")


def _noop(_: str) -> None:
    """Default progress sink."""


# ------------------------------------------------------------------------------------------
# The tree's .o.cmd files


@dataclass(frozen=True, slots=True)
class ObjectCmd:
    """How one object of the tree was made, from its ``.<name>.o.cmd`` file.

    ``obj`` and every path are relative to the hypervisor directory (``xen/``), as make ran
    there.  ``init_cmd`` is the shell line that turns ``foo.o`` into ``foo.init.o`` (objcopy
    renaming data sections to ``.init.*``, Rules.mk ``cmd_obj_init_o``), when the tree links
    ``foo.init.o`` instead of ``foo.o``.
    """

    obj: str
    argv: tuple[str, ...]
    source: str
    deps: frozenset[str]
    init_cmd: str | None = None
    # The source with symlinks resolved, relative to ``xen/`` (Rules.mk ``rel-path``: realpath,
    # then the tree's top stripped).  It differs from ``source`` for the EFI objects, whose
    # ``arch/x86/efi/*.c`` are links into ``common/efi/`` made by ``efi-common.mk``: the FILE
    # symbol names the real file, and a patch to the real file reaches the object.
    real_source: str = ""

    @property
    def file_symbol(self) -> str:
        """What ``objcopy --redefine-sym`` names the STT_FILE symbol."""
        return self.real_source or self.source

    @property
    def is_asm(self) -> bool:
        return self.source.endswith(".S")

    @property
    def final(self) -> str:
        """The object the hypervisor links (``foo.init.o`` for init-only objects)."""
        return self.obj[: -len(".o")] + ".init.o" if self.init_cmd else self.obj

    @property
    def unique_symbols(self) -> bool:
        """True when gcc wrote ``.<name>.o.tmp`` and make ran ``objcopy --redefine-sym``."""
        out = _arg_after(self.argv, "-o")
        return out is not None and out.endswith(".tmp")


def _arg_after(argv: Iterable[str], flag: str) -> str | None:
    args = list(argv)
    for i, a in enumerate(args[:-1]):
        if a == flag:
            return args[i + 1]
    return None


def parse_cmd_file(text: str) -> dict[str, dict[str, str]]:
    """Parse a Kbuild ``.cmd`` file into ``{target: {"cmd"|"source"|"deps": value}}``.

    ``deps_`` spans backslash-continued lines; ``$(wildcard include/config/...)`` entries are
    Kconfig pseudo-dependencies and are dropped by the caller.
    """
    joined = re.sub(r"\\\n", " ", text)
    out: dict[str, dict[str, str]] = {}
    for line in joined.splitlines():
        m = _CMD_LINE_RE.match(line)
        if m:
            out.setdefault(m.group(2), {})[m.group(1)] = m.group(3).strip()
    return out


def _parse_deps(value: str) -> frozenset[str]:
    without_wildcards = re.sub(r"\$\(wildcard [^)]*\)", " ", value)
    return frozenset(os.path.normpath(d) for d in without_wildcards.split()
                     if not d.startswith("$"))


@dataclass(slots=True)
class TreeIndex:
    """Every compiled object of a built Xen tree and what it depends on.

    ``linked`` holds the final objects that reach ``xen-syms``: the closure of ``prelink.o``'s
    ``.cmd`` through each ``built_in.o`` and ``lib.a``.  An object outside it (the 32-bit boot
    helpers under ``arch/x86/boot/``, say) is compiled by the build but never patched.
    """

    xen_dir: Path
    objects: dict[str, ObjectCmd]
    linked: frozenset[str]
    recorded_top: str | None  # the tree's top as gcc saw it (the -ffile-prefix-map source)
    # Files the build generates from others (compat headers, hypercall-defs.h, ...) that some
    # object includes, directly or through another generated file: a patch to their inputs
    # must regenerate them, in this order (inputs before outputs).
    generated: tuple[GeneratedFile, ...] = ()

    @classmethod
    def load(cls, xen_dir: Path) -> TreeIndex:
        if not (xen_dir / "xen-syms").is_file() or not (xen_dir / ".config").is_file():
            raise UsageError(f"{xen_dir} is not a built Xen tree (no xen-syms or .config)")
        entries: dict[str, dict[str, str]] = {}
        for dirpath, dirnames, filenames in os.walk(xen_dir):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") and name.endswith(".cmd"):
                    text = (Path(dirpath) / name).read_text(errors="replace")
                    entries.update(parse_cmd_file(text))
        objects = _with_real_sources(_objects_from_entries(entries), xen_dir)
        if not objects:
            raise UsageError(f"{xen_dir}: no .o.cmd files with compile lines; is it built?")
        return cls(xen_dir, objects, _linked_closure(entries), _recorded_top(objects),
                   _generated_files(entries, objects, xen_dir))

    @property
    def top(self) -> Path:
        """The tree's top, where gcc ran (absolute, as the build saw it)."""
        return self.xen_dir.absolute().parent

    def affected(self, path: str) -> list[ObjectCmd]:
        """Objects compiled from ``path`` (directly or through a symlink) or including it
        (paths relative to ``xen/``)."""
        path = os.path.normpath(path)
        return [o for o in self.objects.values()
                if path in (o.source, o.real_source) or path in o.deps]

    def sibling_template(self, new_source: str) -> ObjectCmd:
        """The compile line a new ``.c`` file gets: that of a C object in the same directory.

        Kbuild gives every object of a directory the same flags except per-object ``CFLAGS-y``
        additions, so the most common flag set of the directory's non-init objects is the one
        a plain new file would get.
        """
        directory = os.path.dirname(new_source)
        siblings = [o for o in self.objects.values()
                    if os.path.dirname(o.source) == directory and o.source.endswith(".c")
                    and not o.init_cmd and o.final in self.linked]
        if not siblings:
            raise UnsupportedChangeError(
                [f"new source file {new_source}: no compiled C object in {directory or '.'}/ "
                 "to take compile flags from"])
        counts = Counter(_flags_signature(o) for o in siblings)
        best = max(siblings, key=lambda o: (counts[_flags_signature(o)], o.obj))
        return _retarget(best, new_source)


# A shell word made of unquoted characters and single-quoted strings only.
_PLAIN_WORD_RE = re.compile(r"(?:[^\s'\"\\]+|'[^']*')+")


def split_command(cmd: str) -> list[str]:
    """``shlex.split(cmd)``, fast for what Kbuild writes (unquoted words, ``'-D...'``).

    shlex reads a character at a time: for the few hundred compile lines of a tree it is most
    of the index's load time, which every build pays.  A line with double quotes or backslashes
    goes to shlex; without them a word is its unquoted and single-quoted parts, concatenated,
    and a single-quoted part holds no quote, so dropping every ``'`` unquotes it.
    """
    if '"' in cmd or "\\" in cmd:
        return shlex.split(cmd)
    if cmd.count("'") % 2:
        return shlex.split(cmd)  # an unterminated quote: let shlex say so
    return [w.replace("'", "") for w in _PLAIN_WORD_RE.findall(cmd)]


def _objects_from_entries(entries: dict[str, dict[str, str]]) -> dict[str, ObjectCmd]:
    objects: dict[str, ObjectCmd] = {}
    for target, e in entries.items():
        cmd, source = e.get("cmd"), e.get("source")
        if not cmd or not source or not target.endswith(".o") or not source.endswith((".c", ".S")):
            continue
        argv = tuple(split_command(cmd))
        if "-c" not in argv:
            continue
        init = entries.get(target[: -len(".o")] + ".init.o", {}).get("cmd")
        objects[target] = ObjectCmd(target, argv, os.path.normpath(source),
                                    _parse_deps(e.get("deps", "")), init)
    return objects


@dataclass(frozen=True, slots=True)
class GeneratedFile:
    """A file make generates with a recorded command (``cmd_<target>`` in its ``.cmd`` file)."""

    target: str  # relative to xen/
    cmd: str  # the shell line, make's $$ already turned into $
    inputs: frozenset[str]  # its source, its deps, and the tree's files its command names


_CMD_WORD_RE = re.compile(r"[^\s<>|;&]+")


def _generated_files(entries: dict[str, dict[str, str]], objects: dict[str, ObjectCmd],
                     xen_dir: Path) -> tuple[GeneratedFile, ...]:
    """Every generated file some object depends on (through any chain), inputs first."""
    candidates: dict[str, GeneratedFile] = {}
    for target, e in entries.items():
        cmd = e.get("cmd")
        if not cmd or target in objects or target.endswith((".o", ".a")) or target == "xen-syms":
            continue
        cmd = cmd.replace("$$", "$")
        named = {os.path.normpath(w) for w in _CMD_WORD_RE.findall(cmd)
                 if not w.startswith(("-", "/")) and (xen_dir / w).is_file()}
        inputs = named | _parse_deps(e.get("deps", ""))
        if e.get("source"):
            inputs.add(os.path.normpath(e["source"]))
        candidates[target] = GeneratedFile(target, cmd, frozenset(inputs - {target}))
    wanted = {d for o in objects.values() for d in (*o.deps, o.source) if d in candidates}
    todo = list(wanted)
    while todo:
        for dep in candidates[todo.pop()].inputs:
            if dep in candidates and dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return tuple(_inputs_first([candidates[t] for t in sorted(wanted)]))


def _inputs_first(files: list[GeneratedFile]) -> list[GeneratedFile]:
    """Order generated files so each comes after the generated files it reads (a cycle, which
    make would refuse, keeps the rest of its members in name order)."""
    by_target = {g.target: g for g in files}
    done: set[str] = set()
    out: list[GeneratedFile] = []

    def visit(g: GeneratedFile, path: frozenset[str]) -> None:
        if g.target in done or g.target in path:
            return
        for dep in sorted(g.inputs):
            if dep in by_target:
                visit(by_target[dep], path | {g.target})
        done.add(g.target)
        out.append(g)

    for g in files:
        visit(g, frozenset())
    return out


def _with_real_sources(objects: dict[str, ObjectCmd], xen_dir: Path) -> dict[str, ObjectCmd]:
    """Record each object's symlink-resolved source (see :attr:`ObjectCmd.real_source`)."""
    top = os.path.realpath(xen_dir)
    out = {}
    for name, o in objects.items():
        real = os.path.realpath(xen_dir / o.source)
        rel = os.path.relpath(real, top) if real.startswith(top + os.sep) else real
        out[name] = dataclasses.replace(o, real_source=rel)
    return out


def _linked_closure(entries: dict[str, dict[str, str]]) -> frozenset[str]:
    """Objects reachable from prelink.o through the ld -r / ar lines of the .cmd files."""
    seen: set[str] = set()
    todo = ["prelink.o"]
    while todo:
        target = todo.pop()
        cmd = entries.get(target, {}).get("cmd", "")
        for tok in cmd.replace(";", " ").split():
            if tok.endswith((".o", ".a")) and tok != target and tok not in seen:
                seen.add(tok)
                todo.append(tok)
    return frozenset(seen)


def _recorded_top(objects: dict[str, ObjectCmd]) -> str | None:
    for o in objects.values():
        for a in o.argv:
            for flag in ("-ffile-prefix-map=", "-fdebug-prefix-map="):
                if a.startswith(flag) and a.endswith("=."):
                    return a[len(flag):-2]
    return None


def _flags_signature(o: ObjectCmd) -> tuple[str, ...]:
    """The flags of ``o`` with everything naming the object itself removed."""
    stem = o.obj[: -len(".o")]
    return tuple(a for a in o.argv if stem not in a and a not in ("-o", "-c", "-MF", "-MQ"))


def _retarget(template: ObjectCmd, new_source: str) -> ObjectCmd:
    """``template``'s compile line, rewritten to compile ``new_source`` into its own object."""
    old_stem, new_stem = template.obj[: -len(".o")], new_source[: -len(".c")]
    old_base, new_base = os.path.basename(old_stem), os.path.basename(new_stem)
    pattern = re.compile(re.escape(os.path.dirname(old_stem)) + r"/\.?" + re.escape(old_base)
                         + r"(?=\.)")

    def fix(arg: str) -> str:
        return pattern.sub(lambda m: m.group(0).replace(old_base, new_base), arg)

    argv = tuple(fix(a) for a in template.argv)
    return ObjectCmd(new_stem + ".o", argv, new_source, frozenset({new_source}))


# ------------------------------------------------------------------------------------------
# Patches


@dataclass(frozen=True, slots=True)
class PatchedFile:
    """One file a patch touches, relative to the patch root (``-p1`` already stripped)."""

    path: str
    created: bool = False
    deleted: bool = False


def parse_patch_files(text: str, patch_name: str = "patch") -> list[PatchedFile]:
    """Files touched by a unified diff (plain or ``git diff``), as ``patch -p1`` would see them.

    Absolute paths and ``..`` are refused: the shadow must contain every file patch writes.
    A file is created when its old side is ``/dev/null`` or, as ``diff -N`` writes it, when its
    only hunk starts from nothing (``@@ -0,0``); deleted likewise (``+0,0 @@``).
    """
    files: dict[str, PatchedFile] = {}
    pending = False  # a "--- " header was seen and waits for its "+++ "
    old: str | None = None
    first_hunk_of: str | None = None  # the file whose first hunk header comes next
    for line in text.splitlines():
        if line.startswith("--- "):
            old, pending = _patch_path(line[4:]), True
        elif line.startswith("+++ ") and pending:
            pending = False
            new = _patch_path(line[4:])
            path = new or old
            if path is None:
                raise UsageError(f"{patch_name}: a file header names /dev/null on both sides")
            if path.startswith("/") or ".." in path.split("/"):
                raise UsageError(f"{patch_name}: refusing to patch {path!r} outside the tree")
            files[path] = PatchedFile(path, created=old is None, deleted=new is None)
            first_hunk_of = path
        elif line.startswith("@@ ") and first_hunk_of is not None:
            f = files[first_hunk_of]
            files[f.path] = PatchedFile(f.path, created=f.created or line.startswith("@@ -0,0 "),
                                        deleted=f.deleted or " +0,0 @@" in line)
            first_hunk_of = None
    if not files:
        raise UsageError(f"{patch_name}: not a unified diff (no ---/+++ file headers)")
    return list(files.values())


def _patch_path(field_text: str) -> str | None:
    """The path of a ---/+++ header with one leading component stripped (-p1)."""
    name = field_text.split("\t")[0].strip()
    if name.startswith('"') and name.endswith('"'):
        name = name[1:-1]
    if name == "/dev/null":
        return None
    parts = name.split("/", 1)
    return os.path.normpath(parts[1] if len(parts) == 2 else parts[0])


# ------------------------------------------------------------------------------------------
# The shadow tree


class Shadow:
    """A scratch mirror of a source tree: real directories, symlinked files.

    Files named in :meth:`materialize` become real copies, so ``patch`` can rewrite them.  All
    directories under ``xen/`` are real, so a path such as ``include/xen/../foo.h`` never leaves
    the shadow through a directory symlink; other top-level entries (``tools/``, ``docs/``) are
    single symlinks, which patch never writes through because their files are materialized
    first.
    """

    def __init__(self, src_top: Path, dst_top: Path, hyp_rel: str = "xen",
                 skip: Callable[[str], bool] | None = None) -> None:
        self.src = src_top
        self.dst = dst_top
        dst_top.mkdir(parents=True)
        for entry in sorted(os.listdir(src_top)):
            if entry != hyp_rel:
                os.symlink(src_top / entry, dst_top / entry)
        self._farm(src_top / hyp_rel, dst_top / hyp_rel, skip or (lambda _name: False))

    @staticmethod
    def _farm(src: Path, dst: Path, skip: Callable[[str], bool]) -> None:
        for dirpath, dirnames, filenames in os.walk(src):
            rel = os.path.relpath(dirpath, src)
            out = dst / rel if rel != "." else dst
            out.mkdir(exist_ok=True)
            for name in filenames:
                if not skip(name):
                    os.symlink(_mirrored_link(os.path.join(dirpath, name), src, dst), out / name)
            for name in list(dirnames):
                if os.path.islink(os.path.join(dirpath, name)):
                    os.symlink(_mirrored_link(os.path.join(dirpath, name), src, dst), out / name)
                    dirnames.remove(name)

    def materialize(self, rel: str) -> Path:
        """Make ``rel`` (relative to the top) a real file in the shadow, creating real parents."""
        path = self.real_parents(rel)
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            path.unlink()
            if target.is_dir():
                raise UsageError(f"the patch names {rel}, which is a directory in the tree")
            shutil.copy2(target, path)
        return path

    def real_parents(self, rel: str) -> Path:
        """Make every directory above ``rel`` a real directory of the shadow; return its path."""
        parts = Path(rel).parts
        cur = self.dst
        for part in parts[:-1]:
            nxt = cur / part
            if nxt.is_symlink():
                target = Path(os.path.realpath(nxt))
                nxt.unlink()
                nxt.mkdir()
                for entry in os.listdir(target):
                    os.symlink(target / entry, nxt / entry)
            elif not nxt.exists():
                nxt.mkdir()
            cur = nxt
        return cur / parts[-1]


def build_record(name: str) -> bool:
    """True for the files of a built tree no compile line or generator reads: objects and
    Kbuild's ``.<target>.cmd`` records, a third of a built tree's files.

    A capture's shadow leaves them out: on a slow disk each symlink costs a fraction of a
    millisecond, and the shadow is on the critical path of every build (gcc reads sources and
    headers; the generators of :attr:`TreeIndex.generated` read sources, headers and ``.i``)."""
    return name.endswith(".o") or (name.startswith(".") and name.endswith(".cmd"))


def _mirrored_link(path: str, src: Path, dst: Path) -> str:
    """What the shadow's entry for the tree's ``path`` points at.

    A plain file or directory: the tree's own path.  A symlink that stays inside the tree (the
    EFI sources ``arch/x86/efi/boot.c -> ../../../source/common/efi/boot.c``, ``source -> .``):
    the same link, relative links verbatim, so it resolves to the *shadow's* copy, which the
    patch may have changed.  A symlink leaving the tree: its target, as it is.
    """
    if not os.path.islink(path):
        return path
    target = os.readlink(path)
    real = os.path.realpath(path)
    top = os.path.realpath(src)
    if real != top and not real.startswith(top + os.sep):
        return path
    if not os.path.isabs(target):
        return target
    return str(dst / os.path.relpath(real, top))


# ------------------------------------------------------------------------------------------
# Compiling


@dataclass(slots=True)
class CompiledObject:
    """One object compiled from the shadow: where it is, or why it failed."""

    obj: str  # final object name, relative to xen/ (``common/foo.o``, ``common/bar.init.o``)
    path: Path
    error: str = ""
    seconds: float = 0.0


def compile_object(o: ObjectCmd, *, cwd: Path, out_dir: Path, new_top: Path | None,
                   recorded_top: str | None, tree_top: Path | None = None) -> CompiledObject:
    """Replay ``o``'s compile line in ``cwd`` (the shadow's ``xen/``), writing under ``out_dir``.

    Output (``-o``) and dependency file (``-MF``) are redirected to ``out_dir`` so nothing is
    written next to the sources; the prefix maps point at the shadow so ``__FILE__`` and friends
    come out as they did in the tree.  Neither redirect changes the object's bytes (the
    self-check proves it on every build).
    """
    start = time.monotonic()
    final = out_dir / o.final
    final.parent.mkdir(parents=True, exist_ok=True)
    raw = out_dir / (o.obj + ".raw")
    argv = _rewrite_argv(o, raw, out_dir / (o.obj + ".d"), new_top, recorded_top, tree_top)
    run = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        return CompiledObject(o.final, final, _tail(run.stderr or run.stdout), _since(start))
    plain = out_dir / o.obj
    steps: list[list[str] | str] = []
    if o.unique_symbols and not o.is_asm:
        base = os.path.basename(o.source)
        steps.append([OBJCOPY, f"--redefine-sym={base}={o.file_symbol}", str(raw), str(plain)])
    else:
        steps.append(["mv", "-f", str(raw), str(plain)])
    if o.init_cmd:
        steps.append(_init_cmd(o, plain, final))
    for step in steps:
        run = subprocess.run(step, cwd=cwd, shell=isinstance(step, str), capture_output=True,
                             text=True, check=False)
        if run.returncode != 0:
            return CompiledObject(o.final, final, _tail(run.stderr or run.stdout), _since(start))
    raw.unlink(missing_ok=True)
    return CompiledObject(o.final, final, "", _since(start))


def _rewrite_argv(o: ObjectCmd, out: Path, depfile: Path, new_top: Path | None,
                  recorded_top: str | None, tree_top: Path | None = None) -> list[str]:
    argv = list(o.argv)
    for i, a in enumerate(argv[:-1]):
        if a == "-o":
            argv[i + 1] = str(out)
        elif a == "-MF":
            argv[i + 1] = str(depfile)
    if new_top is not None and recorded_top:
        argv = [a.replace(f"={recorded_top}=", f"={new_top}=") if "prefix-map=" in a else a
                for a in argv]
    elif new_top is not None and tree_top is not None:
        # The tree was built without a prefix map (upstream's defaults, with -g): gcc wrote
        # the tree's absolute path (DW_AT_comp_dir, absolute file names).  Map the shadow back
        # to it; gcc does not record prefix-map options in DW_AT_producer.
        at = argv.index("-c") if "-c" in argv else len(argv)
        argv.insert(at, f"-ffile-prefix-map={new_top}={tree_top}")
    return argv


def _init_cmd(o: ObjectCmd, plain: Path, final: Path) -> str:
    """The tree's ``foo.o -> foo.init.o`` shell line with both paths pointed at ``out``."""
    assert o.init_cmd is not None
    cmd = o.init_cmd.replace("$$", "$")  # .cmd files keep make's escaping of the shell's $
    for old, new in ((o.final, final), (o.obj, plain)):
        cmd = re.sub(r"(?<![\w/.-])" + re.escape(old) + r"(?![\w/.-])", shlex.quote(str(new)), cmd)
    return cmd


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _since(start: float) -> float:
    return round(time.monotonic() - start, 3)


def compile_many(objs: list[ObjectCmd], *, cwd: Path, out_dir: Path, jobs: int,
                 new_top: Path | None, recorded_top: str | None,
                 tree_top: Path | None = None) -> list[CompiledObject]:
    """Compile ``objs`` in parallel (gcc runs in subprocesses, so threads are enough)."""
    def one(o: ObjectCmd) -> CompiledObject:
        return compile_object(o, cwd=cwd, out_dir=out_dir, new_top=new_top,
                              recorded_top=recorded_top, tree_top=tree_top)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, objs))


# ------------------------------------------------------------------------------------------
# The capture driver


@dataclass(slots=True)
class CapturedObject:
    """An object whose bytes the patch changed: the differ's two inputs."""

    obj: str  # final object, relative to xen/
    orig: Path
    patched: Path
    new: bool = False  # compiled from a source file the patch creates
    reasons: list[str] = field(default_factory=list)  # the touched files that reach it
    # The same object compiled with -g (original, patched), for the layout check; only for the
    # few objects chosen to show the types of the touched files (:func:`_debug_plan`).
    debug: tuple[Path, Path] | None = None


@dataclass(slots=True)
class CaptureResult:
    """What :func:`capture` found; ``changed`` goes to the differ, the rest to the summary."""

    changed: list[CapturedObject] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # recompiled, identical bytes
    not_linked: list[str] = field(default_factory=list)  # affected but not part of xen-syms
    ignored_files: list[str] = field(default_factory=list)  # touched, compiled into nothing
    generated_files: list[str] = field(default_factory=list)  # regenerated, content changed
    patched_files: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # "<phase> <object>": -g twins that did not compile at TWIN_OPTIMISATION and were
    # compiled with the tree's own flags instead.
    twin_fallbacks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "changed_objects": [c.obj for c in self.changed],
            "new_objects": [c.obj for c in self.changed if c.new],
            "unchanged_objects": self.unchanged,
            "not_linked_objects": self.not_linked,
            "ignored_files": self.ignored_files,
            "generated_files": self.generated_files,
            "patched_files": self.patched_files,
        }


@dataclass(frozen=True, slots=True)
class CaptureRequest:
    """Inputs of :func:`capture`: a built tree, the patches in order, a scratch directory."""

    top: Path  # the source tree's top (holds xen/)
    patches: tuple[Path, ...]
    workdir: Path  # must not exist yet; capture creates it (shadow/, orig/, patched/)
    jobs: int = 2
    self_check: bool = True
    debug_info: bool = False  # also compile -g twins of some changed objects (layout check)


def capture(req: CaptureRequest, index: TreeIndex | None = None,
            progress: Progress = _noop,
            on_debug_pairs: Callable[[dict[str, tuple[Path, Path]]], None] | None = None,
            ) -> CaptureResult:
    """Run STEPs 1-7 of the module docstring; raise on a patch that does not apply, a compile
    error, a self-check mismatch or an unsupported kind of change (a deleted source file).

    With ``req.debug_info``, ``on_debug_pairs`` gets the ``-g`` twins (object -> original,
    patched) as soon as they exist, before the originals are compiled, so a check of them
    (the layout check) can refuse a change early."""
    t0 = time.monotonic()
    result = CaptureResult()
    hyp_prefix = _hypervisor_prefix(req)
    touched = _touched_files(req.patches, hyp_prefix)
    result.patched_files = sorted(t.path for t in touched)

    index, shadow = _index_and_shadow(req, index)
    for t in touched:
        if not t.created:
            if not (req.top / t.path).is_file():
                raise UsageError(f"the patch modifies {t.path}, which is not in {req.top}")
            shadow.materialize(t.path)
        else:
            shadow.real_parents(t.path)  # patch creates the file in a real directory
    _apply_patches(req.patches, shadow.dst, hyp_prefix, dry_run=True)
    result.timings["prepare"] = _since(t0)

    _apply_patches(req.patches, shadow.dst, hyp_prefix, dry_run=False)
    regenerated = _regenerate(index, {t.path.removeprefix("xen/") for t in touched}, shadow)
    result.generated_files = [f"xen/{g}" for g in regenerated]
    plan = _plan(index, [*touched, *(PatchedFile(f"xen/{g}") for g in regenerated)], result)
    # A regenerated intermediate (a .i feeding a header) reaches objects only through its
    # outputs: it is not a patched file that nothing uses.
    result.ignored_files = [f for f in result.ignored_files if f not in result.generated_files]
    progress(f"compiling {len(plan)} patched object(s) (-j{req.jobs})")
    t1 = time.monotonic()
    patched = _compile_phase(plan, req, shadow, index, "patched")
    result.timings["compile_patched"] = _since(t1)
    # An object the patch leaves byte-identical to the tree's needs no original: only where
    # the bytes differ must the replay be proven faithful, by recompiling the original.
    differing = [p for p in plan if p.new or not _same_as_tree(p, patched, index)]
    result.unchanged.extend(p.cmd.final for p in plan if p not in differing)
    orig: dict[str, CompiledObject] = {}
    debug: dict[str, tuple[Path, Path]] = {}
    if differing:
        t2 = time.monotonic()
        twins = _debug_plan(differing) if req.debug_info else []
        patched_g = _compile_twins(twins, req, shadow, index, result)
        _apply_patches(req.patches, shadow.dst, hyp_prefix, dry_run=False, reverse=True)
        _regenerate_originals(index, regenerated, shadow)
        progress(f"compiling the original of {len(differing)} changed object(s)"
                 + (f" and {len(twins)} -g twin(s)" if twins else ""))

        def twins_done(orig_g: dict[str, CompiledObject]) -> None:
            debug.update((k, (orig_g[k].path, patched_g[k].path)) for k in orig_g)
            if on_debug_pairs is not None and debug:
                on_debug_pairs(debug)  # may refuse the change while the originals compile

        orig = _compile_originals(differing, twins, req, shadow, index, result, twins_done)
        result.timings["compile_orig"] = _since(t2)
        if req.self_check:
            _self_check(differing, orig, index)
    _compare(differing, orig, patched, result)
    for c in result.changed:
        c.debug = debug.get(c.obj)
    result.unchanged.sort()
    result.timings["capture_total"] = _since(t0)
    return result


def _index_and_shadow(req: CaptureRequest, index: TreeIndex | None) -> tuple[TreeIndex, Shadow]:
    """The tree's index and the capture's shadow, the shadow built while the index is read.

    The shadow is thousands of symlinks (system calls, which release the GIL) and the index
    parses every ``.cmd`` file (Python): neither needs the other, so a thread overlaps them.
    """
    with ThreadPoolExecutor(max_workers=1) as background:
        shadow = background.submit(Shadow, req.top, req.workdir / "shadow", skip=build_record)
        index = index or TreeIndex.load(req.top / "xen")
        return index, shadow.result()


def _compile_twins(twins: list[_Planned], req: CaptureRequest, shadow: Shadow,
                   index: TreeIndex, result: CaptureResult) -> dict[str, CompiledObject]:
    """The patched ``-g`` twins, in their own pool: they need the patched sources, and which
    objects they are is known only once the patched objects are compared with the tree's."""
    with ThreadPoolExecutor(max_workers=max(1, req.jobs)) as pool:
        done = list(pool.map(lambda p: _compile_twin(p, req, shadow, index, "debug-patched",
                                                     result), twins))
    return _succeeded(done, "debug-patched")


def _compile_originals(differing: list[_Planned], twins: list[_Planned], req: CaptureRequest,
                       shadow: Shadow, index: TreeIndex, result: CaptureResult,
                       twins_done: Callable[[dict[str, CompiledObject]], None],
                       ) -> dict[str, CompiledObject]:
    """The originals of the changed objects and the original ``-g`` twins, in one pool: both
    need the unpatched sources, and one pool keeps every core busy to the end.

    The twins go in first (the pool starts work in order), so they are done while originals
    still compile: ``twins_done`` (the layout check) runs then, and if it refuses the change
    the originals not yet started are dropped.  The early refusal costs the pool nothing.
    """
    with _placeholders(differing, shadow, "orig"), \
            ThreadPoolExecutor(max_workers=max(1, req.jobs)) as pool:
        twin_jobs = [pool.submit(_compile_twin, p, req, shadow, index, "debug-orig", result)
                     for p in twins]
        orig_jobs = [pool.submit(_compile_in_shadow, p.cmd, req, shadow, index, "orig")
                     for p in differing]
        try:
            if twin_jobs:
                twins_done(_succeeded([j.result() for j in twin_jobs], "debug-orig"))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return _succeeded([j.result() for j in orig_jobs], "orig")


def _compile_twin(p: _Planned, req: CaptureRequest, shadow: Shadow, index: TreeIndex,
                  phase: str, result: CaptureResult) -> CompiledObject:
    """One ``-g`` twin, at ``-O0`` if that compiles, else with the tree's own flags.

    A type's layout is the ABI's, whatever the optimisation (the layouts read from ``-O0`` and
    ``-O2`` twins of Xen objects are equal), and ``-O0`` compiles in a quarter to two thirds of
    the time.  Code that needs the optimiser (an ``"i"`` asm constraint fed through an inline
    function, an ``#error`` without ``__OPTIMIZE__``) fails at ``-O0``: then the tree's flags,
    which are known to compile.
    """
    cheap = _compile_in_shadow(_with_debug_info(p.cmd, TWIN_OPTIMISATION), req, shadow, index,
                               phase)
    if not cheap.error:
        return cheap
    result.twin_fallbacks.append(f"{phase} {p.cmd.final}")  # list.append is thread-safe
    return _compile_in_shadow(_with_debug_info(p.cmd), req, shadow, index, phase)


def _compile_in_shadow(o: ObjectCmd, req: CaptureRequest, shadow: Shadow, index: TreeIndex,
                       phase: str) -> CompiledObject:
    """One object compiled in the shadow's current state, into ``<workdir>/<phase>``."""
    return compile_object(o, cwd=shadow.dst / "xen", out_dir=req.workdir / phase,
                          new_top=shadow.dst, recorded_top=index.recorded_top,
                          tree_top=index.top)


def _debug_plan(differing: list[_Planned]) -> list[_Planned]:
    """The changed objects to compile again with ``-g`` so that every touched file's types
    show in some DWARF: the fewest objects such that each touched file ("reason") reaches one
    of them (a touched source reaches its object, which also includes the touched headers it
    uses), the cheapest such set (fewest dependencies in all, a stand-in for compile time).

    With ``-fno-eliminate-unused-debug-types`` one includer has all of a header's types, so a
    header fix reaching 300 objects costs one or two extra compiles, not 600.
    """
    by_cover: dict[frozenset[str], _Planned] = {}
    for p in sorted(differing, key=_twin_cost):
        if not p.new and not p.cmd.is_asm:
            by_cover.setdefault(frozenset(p.reasons), p)  # the cheapest of each reason set
    chosen = _smallest_cover(list(by_cover.values()))
    return sorted(chosen, key=lambda p: p.cmd.obj)


def _twin_cost(p: _Planned) -> tuple[int, str]:
    return len(p.cmd.deps), p.cmd.obj


# Up to this many distinct candidates the smallest cover is found exactly (2^12 subsets at
# most, in practice a handful of reason sets); beyond it, greedily.
_EXACT_COVER_LIMIT = 12


def _smallest_cover(candidates: list[_Planned]) -> list[_Planned]:
    """The fewest candidates whose reasons together are all of theirs; ties: the cheapest."""
    universe = {r for p in candidates for r in p.reasons}
    if len(candidates) > _EXACT_COVER_LIMIT:
        return _greedy_cover(candidates, universe)
    for size in range(1, len(candidates) + 1):
        covers = [c for c in itertools.combinations(candidates, size)
                  if {r for p in c for r in p.reasons} == universe]
        if covers:
            return list(min(covers, key=lambda c: sum(len(p.cmd.deps) for p in c)))
    return []


def _greedy_cover(candidates: list[_Planned], universe: set[str]) -> list[_Planned]:
    """Repeatedly the candidate reaching the most reasons not yet covered, cheapest first."""
    left, chosen = set(universe), []
    while left:
        best = max(candidates, key=lambda p: (len(left & set(p.reasons)), -len(p.cmd.deps)))
        chosen.append(best)
        left -= set(best.reasons)
    return chosen


# What the twins are compiled at instead of the tree's -O2/-Os (see _compile_twin).
TWIN_OPTIMISATION = "-O0"
_OPTIMISATION_FLAG = re.compile(r"-O([0-3sgz]|fast)?")


def _with_debug_info(o: ObjectCmd, optimisation: str | None = None) -> ObjectCmd:
    """``o``'s compile line with DWARF for every type, and ``optimisation`` instead of the
    tree's optimisation flags when given (only the twins' lines change, never the objects')."""
    argv = o.argv
    if optimisation is not None:
        argv = tuple(optimisation if _OPTIMISATION_FLAG.fullmatch(a) else a for a in argv)
    at = argv.index("-c")
    extra = ("-g", "-fno-eliminate-unused-debug-types")
    return dataclasses.replace(o, argv=argv[:at] + extra + argv[at:])


def _regenerate(index: TreeIndex, touched: set[str], shadow: Shadow) -> list[str]:
    """Rerun, in the patched shadow, the command of every generated file whose inputs the patch
    touched (or that another regenerated file feeds); return those whose content changed.

    A file regenerated to the tree's own bytes changes nothing downstream.  Every output a
    command writes is a real file of the shadow first, never a link into the user's tree.
    """
    changed: set[str] = set(touched)
    out: list[str] = []
    for g in index.generated:
        if g.inputs & changed:
            path = _run_generator(g, shadow, index)
            if path.read_bytes() != (index.xen_dir / g.target).read_bytes():
                changed.add(g.target)
                out.append(g.target)
    return out


def _regenerate_originals(index: TreeIndex, regenerated: list[str], shadow: Shadow) -> None:
    """Back in the unpatched shadow, regenerate what :func:`_regenerate` changed; each must
    come out as the tree's own file, or the replay of the generator is not faithful."""
    bad = []
    for g in index.generated:
        if g.target in regenerated:
            path = _run_generator(g, shadow, index)
            if path.read_bytes() != (index.xen_dir / g.target).read_bytes():
                bad.append(f"{g.target}: regenerating it from the unpatched sources does not "
                           "reproduce the tree's file")
    if bad:
        raise ReplayError(bad)


def _run_generator(g: GeneratedFile, shadow: Shadow, index: TreeIndex) -> Path:
    xen = shadow.dst / "xen"
    for word in _CMD_WORD_RE.findall(g.cmd):
        rel = os.path.normpath(word)
        if not word.startswith(("-", "/")) and (xen / rel).is_symlink() and \
                (xen / rel).is_file():
            shadow.materialize(f"xen/{rel}")  # a command may write any file it names
    target = shadow.real_parents(f"xen/{g.target}")
    target.unlink(missing_ok=True)
    cmd = g.cmd
    if index.recorded_top:
        cmd = cmd.replace(f"={index.recorded_top}=", f"={shadow.dst}=")
    run = subprocess.run(cmd, shell=True, cwd=xen, capture_output=True, text=True, check=False)
    if run.returncode != 0 or not target.is_file():
        raise UsageError(f"regenerating {g.target} failed in the patched tree:\n"
                         f"{_tail(run.stderr or run.stdout)}")
    return target


def _same_as_tree(p: _Planned, compiled: dict[str, CompiledObject], index: TreeIndex) -> bool:
    tree_obj = index.xen_dir / p.cmd.final
    return tree_obj.is_file() and tree_obj.read_bytes() == compiled[p.cmd.final].path.read_bytes()


def _hypervisor_prefix(req: CaptureRequest) -> str:
    """``""`` when the patches are relative to the tree's top (XSA style: ``a/xen/common/...``),
    ``"xen/"`` when they are relative to ``xen/`` itself, as some hand-made patches are."""
    for patch in req.patches:
        for t in parse_patch_files(_read_patch(patch), patch.name):
            if t.path.startswith("xen/") or (not t.created and (req.top / t.path).exists()):
                return ""
            if (req.top / "xen" / t.path).exists():
                return "xen/"
    return ""


def _read_patch(patch: Path) -> str:
    try:
        return patch.read_text(errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read patch {patch}: {exc.strerror}") from exc


def _touched_files(patches: tuple[Path, ...], prefix: str) -> list[PatchedFile]:
    """Every file any patch touches, relative to the top; later patches may touch new files."""
    seen: dict[str, PatchedFile] = {}
    for patch in patches:
        for t in parse_patch_files(_read_patch(patch), patch.name):
            path = prefix + t.path
            prior = seen.get(path)
            created = t.created if prior is None else prior.created
            seen[path] = PatchedFile(path, created=created, deleted=t.deleted)
    return list(seen.values())


def _apply_patches(patches: tuple[Path, ...], shadow_top: Path, prefix: str, *,
                   dry_run: bool, reverse: bool = False) -> None:
    """Apply (or try) every patch in order inside the shadow, refusing fuzz; with ``reverse``,
    undo them, last first (the shadow goes back to the tree's sources).

    A dry run of patch N can only be trusted if patches 1..N-1 are in place, so for several
    patches the dry run is done on a scratch copy of the materialized files.
    """
    root = shadow_top / prefix if prefix else shadow_top
    if dry_run and len(patches) > 1:
        scratch = shadow_top.parent / "dry-run"
        shutil.copytree(shadow_top, scratch, symlinks=True)
        try:
            _apply_patches(patches, scratch, prefix, dry_run=False)
        finally:
            shutil.rmtree(scratch)
        return
    for patch in reversed(patches) if reverse else patches:
        args = ["patch", "-p1", "--batch", "--fuzz=0", "--no-backup-if-mismatch",
                "-d", str(root), "-i", str(patch.resolve())]
        args.append("--reverse" if reverse else "--forward")
        if dry_run:
            args.append("--dry-run")
        run = subprocess.run(args, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise UsageError(f"patch {patch.name} does not apply to the tree "
                             f"(nothing was changed): {_first_failure(run.stdout + run.stderr)}")


def _first_failure(text: str) -> str:
    for line in text.splitlines():
        if "FAILED" in line or "can't find" in line or "Reversed" in line or "malformed" in line:
            return line.strip()
    return _tail(text, 2).replace("\n", " ")


@dataclass(slots=True)
class _Planned:
    cmd: ObjectCmd
    new: bool
    reasons: list[str]


def _plan(index: TreeIndex, touched: list[PatchedFile], result: CaptureResult) -> list[_Planned]:
    """Objects to compile, with the files that reach each; refuse what cannot be patched."""
    plan: dict[str, _Planned] = {}
    problems: list[str] = []
    for t in touched:
        rel = t.path[len("xen/"):] if t.path.startswith("xen/") else None
        if rel is None:
            result.ignored_files.append(t.path)  # tools/, docs/: not part of the hypervisor
            continue
        if t.created and rel.endswith(".c"):
            cmd = index.sibling_template(rel)
            plan[cmd.obj] = _Planned(cmd, True, [t.path])
            continue
        if t.created and rel.endswith(".S"):
            problems.append(f"{t.path}: new assembly source files are not supported")
            continue
        objs = index.affected(rel)
        if t.deleted and objs:
            problems.append(f"{t.path}: deleting a source file cannot be live-patched")
        for o in objs:
            if o.final not in index.linked:
                result.not_linked.append(o.final)
            else:
                plan.setdefault(o.obj, _Planned(o, False, [])).reasons.append(t.path)
        if not objs:
            result.ignored_files.append(t.path)  # Makefile, Kconfig, a header nothing includes
    if problems:
        raise UnsupportedChangeError(problems)
    result.not_linked = sorted(set(result.not_linked))
    return sorted(plan.values(), key=lambda p: p.cmd.obj)


def _compile_phase(plan: list[_Planned], req: CaptureRequest, shadow: Shadow, index: TreeIndex,
                   phase: str) -> dict[str, CompiledObject]:
    """Compile every planned object in the shadow's current state (before or after patching)."""
    with _placeholders(plan, shadow, phase):
        done = compile_many([p.cmd for p in plan], cwd=shadow.dst / "xen",
                            out_dir=req.workdir / phase, jobs=req.jobs, new_top=shadow.dst,
                            recorded_top=index.recorded_top, tree_top=index.top)
    return _succeeded(done, phase)


@contextlib.contextmanager
def _placeholders(plan: list[_Planned], shadow: Shadow, phase: str) -> Iterator[None]:
    """For the originals: an empty file for each source the patch creates, while they compile.

    A new source file does not exist before the patch: its "original" is compiled from an empty
    file of the same name, so the differ sees an object with the same FILE symbol and nothing
    in it, and every function of the patched one counts as new.
    """
    paths = []
    if phase == "orig":
        for p in plan:
            if p.new:
                path = shadow.dst / "xen" / p.cmd.source
                path.parent.mkdir(parents=True, exist_ok=True)  # patch -R may remove it
                path.write_text("")
                paths.append(path)
    try:
        yield
    finally:
        for path in paths:
            path.unlink()


def _succeeded(done: list[CompiledObject], phase: str) -> dict[str, CompiledObject]:
    """``done`` by object name; the first failure, if any, is raised."""
    failed = [c for c in done if c.error]
    if failed:
        what = "the unpatched tree" if phase in ("orig", "debug-orig") else "the patched tree"
        first = failed[0]
        raise UsageError(f"compiling {first.obj} failed in {what} "
                         f"({len(failed)} object(s) failed):\n{first.error}")
    return {c.obj: c for c in done}


def _self_check(plan: list[_Planned], orig: dict[str, CompiledObject], index: TreeIndex) -> None:
    """Each recompiled original must equal the tree's object, byte for byte.

    When one does not, say whose fault it is, and only with evidence: a source or header newer
    than the object, or a ``.comment`` naming another compiler, means the tree is not the
    build of its sources (exit 2); otherwise the replay is at fault, which is xsbuild's
    limitation (:class:`ReplayError`), and the message names the object and the step.
    """
    bad = [p for p in plan if not p.new and not _same_as_tree(p, orig, index)]
    if not bad:
        return
    stale = [f"{p.cmd.final}: {why}" for p in bad if (why := _staleness(p.cmd, index))]
    if stale:
        raise UsageError(
            f"the tree is not up to date with its sources ({stale[0]}"
            f"{f'; and {len(stale) - 1} more' if len(stale) > 1 else ''}): rebuild it "
            "(make -C xen) and retry")
    compilers = [f"{p.cmd.final}: {why}" for p in bad
                 if (why := _other_compiler(p.cmd, orig[p.cmd.final].path, index))]
    if compilers:
        raise UsageError(f"the tree was built with another compiler than this machine's "
                         f"({compilers[0]}): build the payload where the tree was built")
    raise ReplayError([f"{p.cmd.final}: {_replay_difference(p.cmd, orig, index)}"
                       for p in bad])


def _staleness(o: ObjectCmd, index: TreeIndex) -> str:
    """Evidence that the tree's object predates its inputs, or ``""``."""
    obj = index.xen_dir / o.final
    if not obj.is_file():
        return "the object is missing from the tree"
    built = obj.stat().st_mtime_ns
    for dep in sorted({o.source, *o.deps}):
        path = index.xen_dir / dep
        with contextlib.suppress(OSError):
            if path.stat().st_mtime_ns > built:
                return f"{dep} is newer than the object"
    return ""


def _other_compiler(o: ObjectCmd, replayed: Path, index: TreeIndex) -> str:
    """Evidence that another compiler made the tree's object (its ``.comment``), or ``""``."""
    theirs = _comment(index.xen_dir / o.final)
    ours = _comment(replayed)
    if theirs != ours:
        return f"its .comment says {theirs or 'nothing'!r}, this compiler writes {ours!r}"
    return ""


def _comment(obj: Path) -> str:
    from elftools.elf.elffile import ELFFile

    with obj.open("rb") as f:
        sec = ELFFile(f).get_section_by_name(".comment")
        data = sec.data() if sec is not None else b""
    return " ".join(part.decode(errors="replace") for part in data.split(b"\0") if part)


def _replay_difference(o: ObjectCmd, compiled: dict[str, CompiledObject],
                       index: TreeIndex) -> str:
    """Which step of the replay made a different object, and where the bytes first differ."""
    final = compiled[o.final].path
    if o.init_cmd:
        plain_ours, plain_tree = final.parent / Path(o.obj).name, index.xen_dir / o.obj
        if plain_tree.is_file() and plain_ours.read_bytes() == plain_tree.read_bytes():
            return (f"the {Path(o.obj).name} -> {Path(o.final).name} objcopy step differs "
                    f"({_first_section_difference(final, index.xen_dir / o.final)})")
        step = "the compile (gcc, then objcopy --redefine-sym), before the .init.o step"
    elif o.unique_symbols and not o.is_asm:
        step = "the compile (gcc, then objcopy --redefine-sym)"
    else:
        step = "the compile"
    return f"{step} differs ({_first_section_difference(final, index.xen_dir / o.final)})"


def _first_section_difference(ours: Path, theirs: Path) -> str:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with ours.open("rb") as fa, theirs.open("rb") as fb:
            a, b = ELFFile(fa), ELFFile(fb)
            names_a = [sec.name for sec in a.iter_sections()]
            names_b = [sec.name for sec in b.iter_sections()]
            if names_a != names_b:
                only = sorted(set(names_a) ^ set(names_b))
                return f"other sections: {', '.join(only[:3]) or 'same names, other order'}"
            pairs = list(zip(a.iter_sections(), b.iter_sections(), strict=True))
            for sa, sb in pairs:
                if sa.data() != sb.data():
                    return f"first in the contents of section {sa.name}"
            for sa, sb in pairs:
                if sa.header != sb.header:
                    return f"same contents, other header of section {sa.name}"
    except (OSError, ELFError) as exc:
        return f"cannot read the objects: {exc}"
    return "same sections, other file layout"


def _compare(plan: list[_Planned], orig: dict[str, CompiledObject],
             patched: dict[str, CompiledObject], result: CaptureResult) -> None:
    """Sort the recompiled pairs into changed (for the differ) and unchanged; assembly objects
    go to the differ too, which patches their sized functions and refuses the rest."""
    for p in plan:
        name = p.cmd.final
        o, n = orig[name].path, patched[name].path
        if o.read_bytes() == n.read_bytes():
            result.unchanged.append(name)
        else:
            result.changed.append(CapturedObject(name, o, n, p.new, p.reasons))


# ------------------------------------------------------------------------------------------
# Proving the replay on a whole tree


@dataclass(slots=True)
class ReplayReport:
    """:func:`replay_tree`'s findings: every object of the tree, identical or not."""

    identical: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)  # "obj: which step differs (where)"
    failed: list[str] = field(default_factory=list)  # "obj: compiler output"
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return len(self.identical) + len(self.different) + len(self.failed)


def replay_tree(top: Path, workdir: Path, *, jobs: int = 2,
                index: TreeIndex | None = None) -> ReplayReport:
    """Recompile every object of the built tree at ``top`` through the capture path (shadow,
    rewritten compile lines, objcopy steps) and compare each with the tree's, byte for byte.

    This is what every payload build relies on: for an N-of-N tree, any object a patch reaches
    is reproduced exactly, whatever header the patch changes.  ``workdir`` must not exist.
    """
    start = time.monotonic()
    index = index or TreeIndex.load(top / "xen")
    shadow = Shadow(top, workdir / "shadow")
    cmds = sorted(index.objects.values(), key=lambda o: o.obj)
    done = compile_many(cmds, cwd=shadow.dst / "xen", out_dir=workdir / "replay", jobs=jobs,
                        new_top=shadow.dst, recorded_top=index.recorded_top, tree_top=index.top)
    compiled = {c.obj: c for c in done}
    report = ReplayReport()
    for o in cmds:
        c = compiled[o.final]
        if c.error:
            report.failed.append(f"{o.final}: {c.error.splitlines()[-1] if c.error else ''}")
        elif (index.xen_dir / o.final).read_bytes() == c.path.read_bytes():
            report.identical.append(o.final)
        else:
            report.different.append(f"{o.final}: {_replay_difference(o, compiled, index)}")
    report.seconds = _since(start)
    return report

