"""Objects without an STT_FILE symbol (xsbuild/diff/__init__.py ``name_fileless``).

Xen's ``arch/x86/boot/head.o`` (assembly without ``.file``) and ``common/config_data.o`` (a
generated ``.S``) have none; the linker names their statics after the object file
(``head.o#multiboot1_header`` in Xen's map).  The differ must accept them, report no change
against themselves, and name their statics the way ``xen-syms`` does.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from xsbuild.diff import diff_files, diff_objects
from xsbuild.diff.model import xen_name
from xsbuild.elf import read_elf

SOURCE = """\
.text
.globl entry_fn
.type entry_fn,@function
entry_fn:
    call helper
    ret
.size entry_fn, .-entry_fn
helper:
    mov $1, %eax
    ret
.data
local_word: .long 5
"""


def assemble(tmp_path: Path, text: str, name: str = "head.o") -> Path:
    src = tmp_path / (name + ".s")
    src.write_text(text)
    out = tmp_path / name
    subprocess.run(["as", "--64", str(src), "-o", str(out)], check=True)
    return out


def test_fileless_object_self_diffs_to_no_change(tmp_path: Path) -> None:
    obj = assemble(tmp_path, SOURCE)
    assert " FILE " not in subprocess.run(["readelf", "-sW", str(obj)], capture_output=True,
                                          text=True, check=True).stdout
    copy = tmp_path / "copy" / "head.o"
    copy.parent.mkdir()
    shutil.copyfile(obj, copy)
    assert diff_files(obj, copy).status == "no-change"


def test_fileless_statics_are_named_as_the_linker_names_them(tmp_path: Path) -> None:
    obj = assemble(tmp_path, SOURCE)
    orig, patched = read_elf(obj), read_elf(obj)
    diff_objects(orig, patched)
    names = {xen_name(s) for s in patched.symbols if s.name and not s.is_file}
    assert {"head.o#helper", "head.o#local_word", "entry_fn"} <= names
    # ... and the symbol table ld would write for it starts with that FILE symbol.
    linked = tmp_path / "linked.o"
    subprocess.run(["ld", "-r", "-o", str(linked), str(obj)], check=True)
    table = subprocess.run(["readelf", "-sW", str(linked)], capture_output=True, text=True,
                           check=True).stdout
    files = [line.split()[-1] for line in table.splitlines() if " FILE " in line]
    assert files == ["head.o"]
