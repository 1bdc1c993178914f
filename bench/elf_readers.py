#!/usr/bin/env python3
"""ELF readers on every object of the tree: xsbuild's own (``xsbuild.elfraw``) against pyelftools
and, when installed, lief, each in a fresh interpreter (import time measured apart).

Each reader decodes, per object, what the differ needs: the section table, every section's
bytes, the symbol table and every relocation.  The table shows import and parse seconds and the
ratio to pyelftools (the baseline, the reader xsbuild used before issue 11).

    python3 bench/elf_readers.py [--tree XEN_TOP] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from debian_tree import default_top

REPO = Path(__file__).resolve().parents[1]


def parse_elfraw(paths: list[str]) -> int:
    from xsbuild.elfraw import read_raw

    n = 0
    for p in paths:
        ef = read_raw(p, Path(p).read_bytes())
        for sec in ef.sections:
            ef.body(sec)
            if sec.type == 2:
                n += len(ef.symbols(sec))
            elif sec.type == 4:
                n += sum(1 for _ in ef.relocations(sec))
    return n


def parse_pyelftools(paths: list[str]) -> int:
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection
    from elftools.elf.sections import SymbolTableSection

    n = 0
    for p in paths:
        with open(p, "rb") as f:
            ef = ELFFile(f)
            for sec in ef.iter_sections():
                sec.data()
                if isinstance(sec, SymbolTableSection):
                    n += sum(1 for _ in sec.iter_symbols())
                elif isinstance(sec, RelocationSection):
                    n += sum(1 for _ in sec.iter_relocations())
    return n


def parse_lief(paths: list[str]) -> int:
    import lief

    lief.logging.disable()
    n = 0
    for p in paths:
        binary = lief.ELF.parse(p)
        for sec in binary.sections:
            bytes(sec.content)
        n += len(binary.symtab_symbols) + len(binary.object_relocations)
    return n


READERS = {"pyelftools": parse_pyelftools, "xsbuild.elfraw": parse_elfraw, "lief": parse_lief}
MODULES = {"pyelftools": "elftools.elf.elffile", "xsbuild.elfraw": "xsbuild.elfraw",
           "lief": "lief"}


def child(name: str) -> None:
    paths = json.loads(sys.stdin.read())
    start = time.monotonic()
    __import__(MODULES[name])
    imported = time.monotonic()
    count = READERS[name](paths)
    print(json.dumps({"import": imported - start, "parse": time.monotonic() - imported,
                      "count": count}))


def measure(name: str, paths: list[str]) -> dict[str, float] | None:
    proc = subprocess.run([sys.executable, __file__, "--child", name], input=json.dumps(paths),
                          capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        if "ModuleNotFoundError" in proc.stderr:
            return None
        raise SystemExit(f"{name}: {proc.stderr}")
    return json.loads(proc.stdout)


def _is_object(path: Path) -> bool:
    """An ELF64 relocatable object (the tree also holds empty placeholder ``.o`` files)."""
    with open(path, "rb") as f:
        head = f.read(18)
    return head[:5] == b"\x7fELF\x02" and head[16] == 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=default_top())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0
    paths = sorted(str(p) for p in (args.tree / "xen").rglob("*.o")
                   if p.name not in ("built_in.o", "prelink.o") and _is_object(p))
    results = {}
    for name in READERS:
        runs = [r for r in (measure(name, paths) for _ in range(args.repeat)) if r is not None]
        if runs:
            results[name] = min(runs, key=lambda r: r["parse"])
    base = results["pyelftools"]
    print(f"{len(paths)} objects of {args.tree}; best of {args.repeat}, fresh interpreter each")
    print(f"{'reader':<16} {'import s':>9} {'parse s':>9} {'parse ratio':>12} {'entries':>9}")
    for name, r in results.items():
        print(f"{name:<16} {r['import']:>9.3f} {r['parse']:>9.3f} "
              f"{r['parse'] / base['parse']:>12.2f} {int(r['count']):>9}")
    if "lief" not in results:
        print("lief: not installed (pip install lief) - not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
