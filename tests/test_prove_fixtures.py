"""``xsbuild prove``'s comparison on gcc-built fixture hypervisors (fast).

For every fixture scenario that yields a payload: the payload that ``xsbuild diff`` + ``link``
make is proven against the fixture hypervisor linked from the patched sources (equivalence), and
the functions that differ between the original and patched images are exactly the payload's
(completeness).  Then the special-sections scenario is altered on purpose (an alternative's
cpuid, an exception-table fixup, a bug frame's message, a string byte, a dropped replacement)
and each alteration must be caught with the right message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.image import Image, read_build_id
from tests.support.toolchain import Toolchain
from tests.test_scenarios import (
    SCENARIO_DIRS,
    base_sources,
    load_scenario,
    patched_sources,
    xsbuild,
)
from xsbuild import xen_abi
from xsbuild.elf import STT_OBJECT, Elf, elf_bytes, read_elf
from xsbuild.errors import UsageError
from xsbuild.patched import object_functions
from xsbuild.prove import (
    DiffKind,
    LinkedImage,
    PayloadImage,
    ProofReport,
    Verdict,
    prove_images,
)
from xsbuild.sandbox.loader import IMAGE_BASE
from xsbuild.sandbox.toolchain import THUNKS, THUNKS_NAME, link_image

PROVABLE = [d for d in SCENARIO_DIRS
            if load_scenario(d).payload_expected and load_scenario(d).link_exit == 0]
# The author told the differ to leave these out (livepatch ignore annotations): the patched
# hypervisor differs in them, the payload does not carry them, and the proof must say so.
LEFT_OUT = {"ignore_function": "sched_runs", "ignore_section": "sched_runs"}


def stable_file(name: str) -> tuple[str, ...]:
    """``__FILE__`` as Xen's build makes it (the path from xen/, by -ffile-prefix-map), not the
    fixture compiler's scratch path, which differs between the original and patched compile
    and would change every bug frame's file string."""
    return (f'-D__FILE__="{name}"', "-Wno-builtin-macro-redefined")


def compile_fixture(toolchain: Toolchain, text: str, name: str) -> Path:
    return toolchain.compile_source(text, name, stable_file(name))


def build_image(toolchain: Toolchain, sources: dict[str, str], out: Path) -> Image:
    objects = [compile_fixture(toolchain, text, name) for name, text in sorted(sources.items())]
    objects.append(toolchain.assemble(THUNKS.read_text(), THUNKS_NAME))
    link_image(objects, out, base=IMAGE_BASE)
    return Image(out, read_build_id(out), tuple(objects))


@dataclass
class Built:
    payload: Path
    orig: LinkedImage
    patched: LinkedImage
    candidates: set[str]


@pytest.fixture(scope="module")
def orig_fixture_image(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build_image(toolchain, base_sources(), tmp_path_factory.mktemp("orig") / "xen-syms")


def build(directory: Path, toolchain: Toolchain, orig: Image, work: Path) -> Built:
    scenario = load_scenario(directory)
    patched = patched_sources(scenario.patch, work)
    base = base_sources()
    outputs, candidates = [], set()
    for index, exp in enumerate(scenario.objects):
        if exp.exit != 0:
            continue
        orig_obj = compile_fixture(toolchain, base[exp.file], exp.file)
        patched_obj = compile_fixture(toolchain, patched[exp.file], exp.file)
        candidates |= object_functions(orig_obj) | object_functions(patched_obj)
        out = work / f"out{index}" / Path(exp.file).with_suffix(".o").name
        out.parent.mkdir()
        proc = xsbuild("diff", orig_obj, patched_obj, "-o", out, *exp.diff_args)
        assert proc.returncode == 0, proc.stderr
        outputs.append(out)
    payload = work / "p.livepatch"
    proc = xsbuild("link", *outputs, "-o", payload, "--xen-syms", orig.path)
    assert proc.returncode == 0, proc.stderr
    image = build_image(toolchain, patched, work / "xen-syms.patched")
    return Built(payload, LinkedImage(orig.path), LinkedImage(image.path), candidates)


def prove(b: Built, path: Path | None = None) -> ProofReport:
    path = path or b.payload
    return prove_images(PayloadImage.load(path), b.patched, b.orig, b.candidates,
                        ProofReport(str(path)))


@pytest.mark.parametrize("directory", PROVABLE, ids=[d.name for d in PROVABLE])
def test_fixture_payload_proven(directory: Path, toolchain: Toolchain,
                                orig_fixture_image: Image, tmp_path: Path) -> None:
    b = build(directory, toolchain, orig_fixture_image, tmp_path)
    report = prove(b)
    if directory.name in LEFT_OUT:
        assert [d.function for d in report.differences()] == [LEFT_OUT[directory.name]]
        assert report.missing[0].describe().startswith(f"missing: {LEFT_OUT[directory.name]} ")
        return
    assert report.verdict is Verdict.PROVEN, [d.describe() for d in report.differences()]
    assert set(report.changed_in_xen) <= {f.name for f in report.functions}
    replaced = {f.name for f in report.functions if f.role == "replaced"}
    assert replaced <= set(report.changed_in_xen) | set(report.promoted)
    tables = {f.name for f in report.functions if f.role == "table"}
    assert {t for read in report.promoted.values() for t in read} <= tables
    if directory.name.startswith("const_table"):  # the table's bytes were proven too
        assert tables, report.to_json()
    if directory.name == "const_table_carried":  # its readers only read the changed table
        assert set(report.promoted) == replaced, report.to_json()


@pytest.fixture(scope="module")
def special(toolchain: Toolchain, orig_fixture_image: Image,
            tmp_path_factory: pytest.TempPathFactory) -> Built:
    directory = next(d for d in PROVABLE if d.name == "special_sections")
    return build(directory, toolchain, orig_fixture_image, tmp_path_factory.mktemp("special"))


def mutate(b: Built, tmp_path: Path, change: Callable[[Elf], None]) -> ProofReport:
    elf = read_elf(b.payload)
    change(elf)
    out = tmp_path / "m.livepatch"
    out.write_bytes(elf_bytes(elf))
    return prove(b, out)


def caught(report: ProofReport, kind: DiffKind) -> str:
    assert report.verdict is Verdict.NOT_PROVEN
    found = [d.describe() for d in report.differences() if d.kind is kind]
    assert found, [d.describe() for d in report.differences()]
    return found[0]


def test_special_sections_counted(special: Built) -> None:
    report = prove(special)
    assert report.verdict is Verdict.PROVEN
    by_name = {f.name: f for f in report.functions}
    assert by_name["traps_fence"].alternatives == 1 and by_name["traps_fence"].bug_frames == 1
    assert by_name["traps_read"].ex_table == 1 and by_name["traps_read"].fragments >= 1


def test_fixture_mutation_alternative_cpuid(special: Built, tmp_path: Path) -> None:
    def change(elf: Elf) -> None:
        sec = elf.section(xen_abi.SEC_ALTINSTRUCTIONS)
        assert sec is not None
        data = bytearray(sec.data)
        (cpuid,) = struct.unpack_from("<H", data, 8)
        struct.pack_into("<H", data, 8, cpuid ^ 1)
        sec.data = bytes(data)

    msg = caught(mutate(special, tmp_path, change), DiffKind.ALTERNATIVE)
    assert msg.startswith("alternative: traps_fence+0x") and "cpuid=" in msg


def test_fixture_mutation_ex_table_fixup(special: Built, tmp_path: Path) -> None:
    def change(elf: Elf) -> None:
        sec = elf.section(xen_abi.SEC_EX_TABLE)
        assert sec is not None
        next(r for r in sec.relocs if r.offset == 4).addend += 2

    report = mutate(special, tmp_path, change)
    assert report.verdict is Verdict.NOT_PROVEN
    # the fixup now lands 2 bytes into its code: the code reached differs, or the entry does
    kinds = {d.kind for d in report.differences()}
    assert kinds & {DiffKind.EX_TABLE, DiffKind.FRAGMENT}, kinds


def test_fixture_mutation_bug_frame(special: Built, tmp_path: Path) -> None:
    def change(elf: Elf) -> None:
        sec = elf.section(xen_abi.BUG_FRAME_SECTIONS[1])
        assert sec is not None
        next(r for r in sec.relocs if r.offset == 0).addend += 1 << xen_abi.BUG_DISP_WIDTH

    msg = caught(mutate(special, tmp_path, change), DiffKind.BUG_FRAME)
    assert msg.startswith("bug-frame: traps_fence+0x") and "line" in msg


def test_fixture_mutation_string_byte(toolchain: Toolchain, orig_fixture_image: Image,
                                      tmp_path: Path) -> None:
    directory = next(d for d in PROVABLE if d.name == "string_literal")
    b = build(directory, toolchain, orig_fixture_image, tmp_path / "b")

    def change(elf: Elf) -> None:
        sec = next(s for s in elf.sections if s.is_string and s.data.strip(b"\0"))
        data = bytearray(sec.data)
        data[0] ^= 0x20
        sec.data = bytes(data)

    msg = caught(mutate(b, tmp_path, change), DiffKind.CODE)
    assert '"' in msg  # both strings shown


def test_fixture_mutation_replacement_dropped(special: Built, tmp_path: Path) -> None:
    def change(elf: Elf) -> None:
        funcs = elf.section(xen_abi.SEC_FUNCS)
        assert funcs is not None
        size = xen_abi.FUNC_SIZE
        funcs.data = funcs.data[size:]
        funcs.size -= size
        funcs.relocs = [r for r in funcs.relocs if r.offset >= size]
        for r in funcs.relocs:
            r.offset -= size

    dropped = sorted(PayloadImage.load(special.payload).replaced.items(),
                     key=lambda kv: kv[1].index)
    report = mutate(special, tmp_path, change)
    missing = [d.function for d in report.missing]
    assert report.verdict is Verdict.NOT_PROVEN and len(missing) == 1
    assert missing[0] in {name for name, _sym in dropped}


@pytest.fixture(scope="module")
def table(toolchain: Toolchain, orig_fixture_image: Image,
          tmp_path_factory: pytest.TempPathFactory) -> Built:
    directory = next(d for d in PROVABLE if d.name == "const_table_carried")
    return build(directory, toolchain, orig_fixture_image, tmp_path_factory.mktemp("table"))


def test_fixture_mutation_table_byte(table: Built, tmp_path: Path) -> None:
    def change(elf: Elf) -> None:
        sym = next(s for s in elf.symbols if s.type == STT_OBJECT and s.sec is not None
                   and "prio_weight" in s.name)  # common/tables.c#prio_weight.lp
        data = bytearray(sym.sec.data)
        data[sym.value + 12] ^= 0x01  # the patched weight, 16 -> 17
        sym.sec.data = bytes(data)

    msg = caught(mutate(table, tmp_path, change), DiffKind.DATA)
    assert "prio_weight+0xc" in msg and "the bytes differ" in msg, msg


def test_fixture_mutation_table_reader_dropped(table: Built, tmp_path: Path) -> None:
    """The payload carries the new table but one of its readers is no longer replaced: that
    reader keeps reading the hypervisor's old table, and the proof must name it."""
    entries = sorted(PayloadImage.load(table.payload).replaced.items(), key=lambda kv: kv[0])
    first = entries[0][0]

    def change(elf: Elf) -> None:
        funcs = elf.section(xen_abi.SEC_FUNCS)
        assert funcs is not None
        size = xen_abi.FUNC_SIZE
        keep = [i for i in range(funcs.size // size) if _func_name(funcs, i * size) != first]
        _keep_funcs(funcs, keep)

    report = mutate(table, tmp_path, change)
    assert [d.function for d in report.missing] == [first], report.to_json()
    assert "reads" in report.missing[0].describe() and "prio_weight" in \
        report.missing[0].describe()


def _func_name(funcs: object, base: int) -> str:
    reloc = next(r for r in funcs.relocs  # type: ignore[attr-defined]
                 if r.offset == base + xen_abi.FUNC_OFF_NAME)
    data, start = reloc.sym.sec.data, reloc.sym.value + reloc.addend
    return data[start:data.find(b"\0", start)].decode()


def _keep_funcs(funcs: object, keep: list[int]) -> None:
    """Keep only the ``.livepatch.funcs`` entries numbered ``keep``, relocations moved along."""
    size = xen_abi.FUNC_SIZE
    old_data, old_relocs = funcs.data, funcs.relocs  # type: ignore[attr-defined]
    data, relocs = b"", []
    for new_i, i in enumerate(keep):
        data += old_data[i * size:(i + 1) * size]
        for r in old_relocs:
            if i * size <= r.offset < (i + 1) * size:
                r.offset += (new_i - i) * size
                relocs.append(r)
    funcs.data, funcs.size, funcs.relocs = data, len(data), relocs  # type: ignore[attr-defined]


def test_proof_json_schema_and_inspect_html(special: Built, tmp_path: Path) -> None:
    import json

    import jsonschema

    schema = json.loads((Path(__file__).resolve().parent.parent / "docs" / "json-schema"
                         / "xsbuild.prove-1.schema.json").read_text())
    good = prove(special).to_json()
    bad = mutate(special, tmp_path, _flip_cpuid).to_json()
    for doc in (good, bad):
        jsonschema.validate(doc, schema)
    assert bad["verdict"] == "not-proven" and bad["difference_count"] >= 1
    for name, doc, needle in (("good", good, "the same as <span class=\"mono\">traps_fence"),
                              ("bad", bad, "alternative: traps_fence+0x")):
        proof = tmp_path / f"{name}.json"
        proof.write_text(json.dumps(doc))
        html = tmp_path / f"{name}.html"
        proc = xsbuild("inspect", special.payload, "--format", "html", "--proof", proof,
                       "-o", html)
        assert proc.returncode == 0, proc.stderr
        assert needle in html.read_text()
    proc = xsbuild("inspect", special.payload, "--format", "html", "--proof", special.payload)
    assert proc.returncode == 2 and "not a JSON proof" in proc.stderr


def _flip_cpuid(elf: Elf) -> None:
    sec = elf.section(xen_abi.SEC_ALTINSTRUCTIONS)
    assert sec is not None
    data = bytearray(sec.data)
    (cpuid,) = struct.unpack_from("<H", data, 8)
    struct.pack_into("<H", data, 8, cpuid ^ 1)
    sec.data = bytes(data)


def test_cli_help_and_bad_input(special: Built, tmp_path: Path) -> None:
    proc = xsbuild("prove", "--help")
    assert proc.returncode == 0
    assert "xsbuild prove fix.livepatch --srcdir XEN_TREE --patch fix.patch" in proc.stdout
    assert "0 proven, 1 not proven" in proc.stdout and "2 cannot judge" in proc.stdout
    patch = tmp_path / "p.patch"
    patch.write_text("--- a/x\n+++ b/x\n")
    not_elf = tmp_path / "not.livepatch"
    not_elf.write_text("hello")
    for args, needle in (
            ((not_elf, "--srcdir", tmp_path, "--patch", patch), "not.livepatch"),
            ((special.payload, "--srcdir", tmp_path, "--patch", patch), "not a Xen source tree"),
            ((special.payload, "--srcdir", tmp_path / "nowhere", "--patch", patch),
             "does not exist")):
        proc = xsbuild("prove", *args, "--json")
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.splitlines()
        assert line.startswith("xsbuild: error: ") and needle in line, line
        assert '"schema": "xsbuild.error/1"' in proc.stdout


# ------------------------------------------------------------------------------------------
# The patched build's private copy (xsbuild/patched.py), on a small make-built tree

MAKEFILE = """\
xen-syms: foo.o bar.o
\tld -o xen-syms --build-id=sha1 -e 0 foo.o bar.o
%.o: %.c
\tgcc -O2 -ffunction-sections -c $< -o $@
"""


def small_tree(top: Path) -> Path:
    (top / "xen").mkdir(parents=True)
    (top / "xen" / "Rules.mk").write_text("")
    (top / "xen" / "Makefile").write_text(MAKEFILE)
    (top / "xen" / "foo.c").write_text("int foo(int x) { return x + 1; }\n"
                                       "static __attribute__((noinline)) int helper(int x)"
                                       " { return x * 3; }\n"
                                       "int foo2(int x) { return helper(x) + 2; }\n")
    (top / "xen" / "bar.c").write_text("int bar(int x) { return x - 1; }\n")
    import subprocess

    subprocess.run(["make", "-C", "xen", "-s"], cwd=top, check=True, capture_output=True)
    return top


def diff_patch(top: Path, rel: str, old: str, new: str, out: Path) -> Path:
    import difflib

    text = (top / rel).read_text()
    lines = difflib.unified_diff(text.splitlines(True), text.replace(old, new).splitlines(True),
                                 f"a/{rel}", f"b/{rel}")
    out.write_text("".join(lines))
    return out


def test_private_copy_build_restore_and_lock(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from xsbuild.patched import _APPLIED, build_patched, copy_folder
    from xsbuild.xensyms import read_build_id

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    top = small_tree(tmp_path / "tree")
    before = {p: p.read_bytes() for p in (top / "xen").iterdir()}
    fix = diff_patch(top, "xen/foo.c", "x * 3", "x * 5", tmp_path / "fix.patch")
    built = build_patched(top, (fix,))
    copy = copy_folder(read_build_id(top / "xen" / "xen-syms")) / "tree"
    assert built.copy == copy
    assert [p.name for p in built.rebuilt_objects] == ["foo.o"]
    assert built.functions == {"foo", "foo2", "foo.c#helper"}
    assert built.xen_syms != (top / "xen" / "xen-syms").read_bytes()
    # the user's tree is untouched; the copy is back at the base, ready for the next proof
    assert {p: p.read_bytes() for p in (top / "xen").iterdir()} == before
    assert (copy / "xen" / "foo.c").read_bytes() == before[top / "xen" / "foo.c"]
    assert not (copy / _APPLIED).exists()
    # the next proof also recompiles what the last one touched (reversed), but only objects
    # other than the base's are candidates
    other = diff_patch(top, "xen/bar.c", "x - 1", "x - 2", tmp_path / "other.patch")
    assert {p.name for p in build_patched(top, (other,)).rebuilt_objects} == {"bar.o"}
    # a patch that does not apply: bad input, the copy left at the base
    stale = diff_patch(top, "xen/bar.c", "x - 1", "x - 3", tmp_path / "stale.patch")
    stale.write_text(stale.read_text().replace("x - 1", "x - 9"))
    with pytest.raises(UsageError, match="does not apply"):
        build_patched(top, (fix, stale))
    assert (copy / "xen" / "foo.c").read_bytes() == before[top / "xen" / "foo.c"]
    assert not (copy / _APPLIED).exists()


def test_private_copy_must_reproduce_the_base(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from xsbuild.patched import CannotJudgeError, build_patched

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # the link embeds the time it ran (a build date): no rebuild reproduces the base
    makefile = MAKEFILE.replace(
        "xen-syms: foo.o bar.o\n\tld -o xen-syms --build-id=sha1 -e 0 foo.o bar.o\n",
        "xen-syms: foo.o bar.o FORCE\n"
        "\techo \"const char *stamp = \\\"$$(date +%s%N)\\\";\" > stamp.c\n"
        "\tgcc -c stamp.c -o stamp.obj\n"
        "\tld -o xen-syms --build-id=sha1 -e 0 foo.o bar.o stamp.obj\nFORCE:\n")
    top = tmp_path / "tree"
    (top / "xen").mkdir(parents=True)
    for name, text in (("Rules.mk", ""), ("Makefile", makefile),
                       ("foo.c", "int foo(int x) { return x * 3; }\n"),
                       ("bar.c", "int bar(int x) { return x - 1; }\n")):
        (top / "xen" / name).write_text(text)
    import subprocess

    subprocess.run(["make", "-C", "xen", "-s"], cwd=top, check=True, capture_output=True)
    fix = diff_patch(top, "xen/foo.c", "x * 3", "x * 5", tmp_path / "fix.patch")
    with pytest.raises(CannotJudgeError, match="does not rebuild reproducibly"):
        build_patched(top, (fix,))
