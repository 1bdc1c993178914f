"""Benchmark: `xsbuild diff` on the largest objects of Debian's Xen tree, against gcc.

The claim (issue 2, "Speed"): diffing an object against a patched version of itself, and against
itself, takes less time than gcc takes to compile that file.  Baseline and candidate are measured
in the same run on the same machine: for each object,

* ``gcc``        replay the object's own compile command (its ``.o.cmd``) into a scratch file;
* ``diff-self``  ``xsbuild diff orig.o orig.o`` as a user runs it (a new process each time);
* ``diff-patch`` ``xsbuild diff orig.o patched.o -o out.o``, where the patched object comes from
  the same compile command on a source with one error return changed (the last
  ``return -EINVAL;`` becomes ``-EFAULT``, or the first of the other :data:`EDITS` that exists);
  the ``status`` column says what the differ decided (changed, or refused when the edit lands in
  ``__init`` code).

Each figure is the best of ``--repeat`` runs (default 3).  Needs a built tree: by default the
one ``xsbuild build --debian`` keeps in the cache (``bench/debian_tree.py``), or ``--tree`` (the
``xen/`` folder of a built tree).

    python bench/diff_speed.py [--tree PATH] [--repeat N] [OBJ ...]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from debian_tree import default_top

DEFAULT_OBJECTS = ("arch/x86/mm.o", "common/grant_table.o", "arch/x86/hvm/hvm.o",
                   "arch/x86/traps.o", "common/sched/core.o")
DEFAULT_TREE = default_top() / "xen"


def compile_command(tree: Path, obj: str, source: Path, out: Path) -> list[str]:
    """The object's recorded gcc line, compiling ``source`` into ``out`` instead."""
    cmd_file = tree / Path(obj).parent / f".{Path(obj).name}.cmd"
    text = cmd_file.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("cmd_"))
    args = shlex.split(line.split(":=", 1)[1])
    out_args: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-MF", "-MQ", "-o"):
            skip = True
            continue
        if a in ("-MMD", "-MP"):
            continue
        out_args.append(a)
    src_rel = str(Path(obj).with_suffix(".c"))
    out_args = [str(source) if a == src_rel else a for a in out_args]
    # The copy lives elsewhere: let its "local.h" includes find the original's neighbours.
    return [*out_args, "-iquote", str(tree / Path(obj).parent), "-o", str(out)]


def build(tree: Path, obj: str, source: Path, out: Path) -> float:
    start = time.perf_counter()
    tmp = out.with_suffix(".tmp.o")
    subprocess.run(compile_command(tree, obj, source, tmp), cwd=tree, check=True)
    elapsed = time.perf_counter() - start
    c_name = Path(obj).with_suffix(".c")
    subprocess.run(["objcopy", "--redefine-sym", f"{source.name}={c_name}", str(tmp), str(out)],
                   check=True)
    return elapsed


# One-token edits, tried in order; the last occurrence is edited (rarely in __init code).
EDITS = (("return -EINVAL;", "return -EFAULT;"), ("return -EFAULT;", "return -EINVAL;"),
         ("return -ENOMEM;", "return -EINVAL;"), ("return -EPERM;", "return -EINVAL;"),
         ("return 0;", "return 1;"))
STATUS = {0: "changed", 1: "refused", 3: "no-change"}


def patched_text(text: str) -> str | None:
    for old, new in EDITS:
        at = text.rfind(old)
        if at >= 0:
            return text[:at] + new + text[at + len(old):]
    return None


def timed(cmd: list[str], ok: tuple[int, ...] = (0, 3)) -> tuple[float, int]:
    start = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    elapsed = time.perf_counter() - start
    if rc not in ok:
        raise SystemExit(f"{' '.join(cmd)} exited {rc}")
    return elapsed, rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=DEFAULT_TREE)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("objects", nargs="*", default=list(DEFAULT_OBJECTS))
    args = ap.parse_args()
    if not (args.tree / "xen-syms").exists():
        sys.exit(f"no built Xen tree at {args.tree} (set --tree or XSBUILD_XEN_TREE)")
    xsbuild = [sys.executable, "-m", "xsbuild"]
    print(f"{'object':28} {'size':>8} {'gcc':>8} {'diff-self':>10} {'diff-patch':>11} "
          f"{'status':>10}  verdict")
    failures = 0
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for obj in args.objects:
            src = args.tree / Path(obj).with_suffix(".c")
            base = Path(obj).stem
            orig_src, patched_src = tmp / f"{base}.c", tmp / f"{base}_patched.c"
            text = src.read_text()
            orig_src.write_text(text)
            patched = patched_text(text)
            if patched is None:
                sys.exit(f"{src}: none of the edits of EDITS applies; pick another object")
            patched_src.write_text(patched)
            orig_o, patched_o = tmp / f"{base}.o", tmp / f"{base}_p.o"
            gcc_cmd = (args.tree, obj, orig_src, orig_o)
            t_gcc = min(build(*gcc_cmd) for _ in range(args.repeat))
            build(args.tree, obj, patched_src, patched_o)
            self_cmd = [*xsbuild, "diff", str(orig_o), str(orig_o)]
            patch_cmd = [*xsbuild, "diff", str(orig_o), str(patched_o), "-o", str(tmp / "out.o")]
            t_self = min(timed(self_cmd)[0] for _ in range(args.repeat))
            runs = [timed(patch_cmd, ok=(0, 1, 3)) for _ in range(args.repeat)]
            t_patch, status = min(t for t, _rc in runs), STATUS[runs[0][1]]
            ok = max(t_self, t_patch) < t_gcc
            failures += not ok
            size = (args.tree / obj).stat().st_size
            print(f"{obj:28} {size:8d} {t_gcc:7.2f}s {t_self:9.2f}s {t_patch:10.2f}s "
                  f"{status:>10}  {'faster than gcc' if ok else 'SLOWER than gcc'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
