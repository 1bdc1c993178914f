"""Two payloads that copy the same hypervisor symbol can be loaded together.

A payload carries its own copy of some of the hypervisor's code and data (an unchanged
read-only static its functions read, the ``.cold`` part of an unchanged parent), under a name
the hypervisor does not have.  Xen also refuses a payload one of whose named symbols another
loaded payload has (-EEXIST "duplicate new symbol", spec §1.7), so the name must differ between
payloads too: stacked fixes to one object copy the same symbols (Xen 4.21's ``print_version``
inlines three version functions and reads ``build_info``: every fix to one of them copies it).
The scenario ``cold_split`` copies ``req_handle.cold``; it is linked twice, as two payloads, and
the second is checked with the first loaded, then both are uploaded to the simulator.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from elftools.elf.elffile import ELFFile

from tests.support.image import Image, build_image
from tests.support.toolchain import Toolchain
from tests.test_scenarios import SCENARIO_DIRS, base_sources, load_scenario, patched_sources
from xsbuild.linker import copy_suffix


def _xsbuild(*args: str | Path, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *map(str, args)],
                          capture_output=True, text=True, check=False, env=env)


def _copies(payload: Path) -> set[str]:
    with payload.open("rb") as fh:
        return {s.name for s in ELFFile(fh).get_section_by_name(".symtab").iter_symbols()
                if ".lp." in s.name}


def test_two_payloads_copying_one_symbol_load_together(toolchain: Toolchain,
                                                       tmp_path: Path) -> None:
    [directory] = [d for d in SCENARIO_DIRS if d.name == "cold_split"]
    scenario = load_scenario(directory)
    [exp] = scenario.objects
    image: Image = build_image(toolchain, base_sources(), tmp_path / "xen-syms")
    orig = toolchain.compile_source(base_sources()[exp.file], exp.file)
    patched = toolchain.compile_source(patched_sources(scenario.patch, tmp_path)[exp.file],
                                       exp.file)
    diffed = tmp_path / "clones.o"
    assert _xsbuild("diff", orig, patched, "-o", diffed).returncode == 0
    first, second = tmp_path / "first.livepatch", tmp_path / "second.livepatch"
    for payload in (first, second):
        run = _xsbuild("link", diffed, "-o", payload, "--xen-syms", image.path)
        assert run.returncode == 0, run.stderr
    copies = {p: _copies(p) for p in (first, second)}
    assert copies[first] == {f"common/clones.c#req_handle.cold{copy_suffix('first')}"}, copies
    assert copies[second] == {f"common/clones.c#req_handle.cold{copy_suffix('second')}"}, copies

    # Checked as Xen's UPLOAD would with the first loaded, then both uploaded for real (the
    # simulator runs the same loader rules).
    check = _xsbuild("check", second, "--xen-syms", image.path, "--payload", first)
    assert check.returncode == 0, check.stdout + check.stderr
    env = {"XSBUILD_SIM_STATE": str(tmp_path / "sim.json"), "PATH": "/usr/bin:/bin"}
    for i, payload in enumerate((first, second)):
        extra = ["--sim-xen-syms", str(image.path)] if i == 0 else []
        run = _xsbuild("upload", payload.stem, payload, "--backend", "sim", *extra, env=env)
        assert run.returncode == 0, run.stderr
