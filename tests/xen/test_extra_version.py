"""Issue 2's proof on real Xen: a payload that changes ``xen_extra_version()`` applies and reverts.

Debian's own hypervisor boots under QEMU and Debian's own ``xen-livepatch`` uploads, applies,
reverts and unloads the payload while dom0 reads ``/sys/hypervisor/version/extra``, which calls
``xen_extra_version()`` live.

* ``test_extra_version`` builds the payload with xsbuild (``diff`` of Debian's ``common/version.o``
  against an exact recompile of a patched ``common/version.c``, then ``link`` and ``check``).
* ``test_handmade_payload`` builds the same kind of payload by hand, the way Xen's in-tree test
  payloads are built (spec §6): a C initializer of Xen's own ``struct livepatch_func`` compiled
  with the hypervisor's real flags, build-id notes from Debian's ``xen-syms``, ``ld -r
  --build-id=sha1``, with an enabled expectation of the bytes the jump replaces.  It proves the
  harness independently of xsbuild's builder, and checks ``xen_abi``'s struct layout against
  Xen's header at compile time.  The same boot shows a refused upload (wrong xen build-id).
  Both payloads go through one boot (``lifecycle_boot``), one after the other.
* The recompile tests prove the object xsbuild diffs against is the object Debian shipped.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from xsbuild import xen_abi

from .conftest import logged_boot
from .debian_tree import DebianTree, compile_like, read_build_id, recompile
from .qemu import BootResult, Script

pytestmark = pytest.mark.xen

VERSION_OBJ = "common/version.o"
VERSION_SRC = "common/version.c"
ORIGINAL_BODY = "const char *xen_extra_version(void)\n{\n    return XEN_EXTRAVERSION;\n}\n"
READ_EXTRA = "cat /sys/hypervisor/version/extra; echo"
LD = ("ld", "-melf_x86_64")


# --------------------------------------------------------------------------- recompile
def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


# console.o embeds __FILE__ (assertions, BUG frames): it fails unless the replay keeps the
# source's recorded name; version.o checks the plain case.
@pytest.mark.parametrize("obj", [VERSION_OBJ, "drivers/char/console.o"])
def test_recompile_unmodified_is_byte_identical(debian_tree: DebianTree, tmp_path: Path,
                                                obj: str) -> None:
    obj_dir = debian_tree.xen_dir / Path(obj).parent
    before = _snapshot(obj_dir)
    source = debian_tree.xen_dir / obj.replace(".o", ".c")
    out = recompile(debian_tree, obj, source, tmp_path / Path(obj).name)
    assert out.read_bytes() == (debian_tree.xen_dir / obj).read_bytes()
    assert _snapshot(obj_dir) == before, "the recompile touched the shared tree"
    assert [p.name for p in tmp_path.iterdir()] == [Path(obj).name]  # no partial files left


def patched_version_source(tree: DebianTree, new_string: str) -> str:
    """common/version.c with ``xen_extra_version()`` returning ``new_string``."""
    text = (tree.xen_dir / VERSION_SRC).read_text()
    assert text.count(ORIGINAL_BODY) == 1, "Debian's xen_extra_version() is not as expected"
    return text.replace(ORIGINAL_BODY, ORIGINAL_BODY.replace("XEN_EXTRAVERSION",
                                                             f'"{new_string}"'))


def test_recompile_patched_source_changes_the_object(debian_tree: DebianTree,
                                                     tmp_path: Path) -> None:
    source = patched_version_source(debian_tree, "xsb-recompiled")
    out = recompile(debian_tree, VERSION_OBJ, source, tmp_path / "version.o")
    # gcc puts the literal in a per-function string section (.rodata.<func>.str1.1).
    sections = subprocess.run(["readelf", "-SW", str(out)], capture_output=True, text=True,
                              check=True).stdout
    string_sections = re.findall(r"\s(\.rodata\S*\.str\S*)\s", sections)
    dumps = subprocess.run(["readelf", *(f"-p{s}" for s in string_sections), str(out)],
                           capture_output=True, text=True, check=True).stdout
    assert "xsb-recompiled" in dumps, dumps
    # The STT_FILE symbol is renamed as CONFIG_ENFORCE_UNIQUE_SYMBOLS does.
    symbols = subprocess.run(["readelf", "-sW", str(out)], capture_output=True, text=True,
                             check=True).stdout
    assert re.search(rf"\bFILE\b.*\s{re.escape(VERSION_SRC)}$", symbols, re.MULTILINE), symbols


# --------------------------------------------------------------------------- lifecycle in dom0
def lifecycle_script(name: str, payload: str, *, reapply: bool, tag: str = "",
                     script: Script | None = None) -> Script:
    """Upload, apply, revert (optionally apply and revert again), unload, reading extra each time;
    steps named ``<tag>upload`` and so on, appended to ``script`` if given.

    Each xen-livepatch call is retried while it exits 2 (EAGAIN/EBUSY: "retry", spec §5), which
    a rendezvous under TCG may occasionally need; it then reports "No action needed".
    """
    def livepatch(args: str) -> str:
        return (f"for try in 1 2 3 4 5; do xen-livepatch {args}; rc=$?; "
                "[ $rc = 2 ] || break; sleep 1; done; exit $rc")

    script = script if script is not None else Script()
    (script.step(f"{tag}extra-before", READ_EXTRA)
           .step(f"{tag}upload", livepatch(f"upload {name} {payload}"))
           .step(f"{tag}list-checked", "xen-livepatch list")
           .step(f"{tag}apply", livepatch(f"apply {name}"))
           .step(f"{tag}extra-applied", READ_EXTRA)
           .step(f"{tag}list-applied", "xen-livepatch list")
           .step(f"{tag}revert", livepatch(f"revert {name}"))
           .step(f"{tag}extra-reverted", READ_EXTRA))
    if reapply:
        (script.step(f"{tag}apply-again", livepatch(f"apply {name}"))
               .step(f"{tag}extra-again", READ_EXTRA)
               .step(f"{tag}revert-again", livepatch(f"revert {name}")))
    return (script.step(f"{tag}unload", livepatch(f"unload {name}"))
                  .step(f"{tag}list-end", "xen-livepatch list"))


LIFECYCLE_STEPS = ("extra-before", "upload", "list-checked", "apply", "extra-applied",
                   "list-applied", "revert", "extra-reverted", "unload", "list-end")
REAPPLY_STEPS = ("apply-again", "extra-again", "revert-again")


def assert_lifecycle(result: BootResult, name: str, new_string: str, *, reapply: bool,
                     tag: str = "", also_busy: tuple[str, ...] = ()) -> None:
    """The steps of :func:`lifecycle_script` (``tag``) all succeeded and extra changed and came
    back; ``also_busy`` names other payloads of the boot whose rendezvous may have been retried."""
    assert len(new_string) < xen_abi.XEN_EXTRAVERSION_LEN, "sysfs would show it truncated"
    why = result.describe()
    for step_name in LIFECYCLE_STEPS + (REAPPLY_STEPS if reapply else ()):
        step = result.step(tag + step_name)
        assert step.rc == 0, f"step {step.name} failed (rc={step.rc}):\n{step.output}\n{why}"
    before = result.step(f"{tag}extra-before").output.strip()
    assert before and before != new_string, why
    assert result.step(f"{tag}extra-applied").output.strip() == new_string, why
    assert result.step(f"{tag}extra-reverted").output.strip() == before, why
    if reapply:
        assert result.step(f"{tag}extra-again").output.strip() == new_string, why
    assert re.search(rf"^{re.escape(name)}\s.*CHECKED", result.step(f"{tag}list-checked").output,
                     re.MULTILINE), result.step(f"{tag}list-checked").output
    assert re.search(rf"^{re.escape(name)}\s.*APPLIED", result.step(f"{tag}list-applied").output,
                     re.MULTILINE), result.step(f"{tag}list-applied").output
    assert "Nothing to list" in result.step(f"{tag}list-end").output, why
    messages = "\n".join(result.livepatch_messages())
    applies = 2 if reapply else 1
    assert messages.count(f"livepatch: {name} finished APPLY with rc=0") == applies, messages
    assert messages.count(f"livepatch: {name} finished REVERT with rc=0") == applies, messages
    # A rendezvous that timed out under TCG (-EBUSY) was retried above and then succeeded.
    busy = [rf"livepatch: {re.escape(n)} finished \w+ with rc=-{xen_abi.EBUSY}$"
            for n in (name, *also_busy)]
    assert result.hypervisor_errors(expected=busy) == [], why


# --------------------------------------------------------------------------- handmade payload
def _nm_size(elf: Path, symbol: str) -> int:
    out = subprocess.run(["nm", "-S", str(elf)], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[3] == symbol:
            return int(fields[1], 16)
    raise AssertionError(f"{symbol} not in {elf}")


def _code_bytes(elf: Path, symbol: str, count: int) -> bytes:
    """The first ``count`` bytes of ``symbol`` in ``elf`` as the file holds them."""
    with open(elf, "rb") as handle:
        image = ELFFile(handle)
        sym = image.get_section_by_name(".symtab").get_symbol_by_name(symbol)[0]
        section = image.get_section(sym["st_shndx"])
        start = sym["st_value"] - section["sh_addr"]
        return section.data()[start:start + count]


def _note(build_id: str) -> bytes:
    desc = bytes.fromhex(build_id)
    name = xen_abi.NOTE_NAME_GNU
    return xen_abi.NOTE_HEADER.pack(len(name), len(desc), xen_abi.NT_GNU_BUILD_ID) + name + desc


def _c_array(data: bytes) -> str:
    return ", ".join(f"0x{b:02x}" for b in data)


HANDMADE_FUNC = """\
const char *{func}(void);
const char *{func}(void)
{{
    return "{string}";
}}
"""

HANDMADE_TABLE = """\
#include <xen/types.h>
#include <public/sysctl.h>

/* xsbuild/xen_abi.py must agree with the hypervisor's own header. */
_Static_assert(sizeof(struct livepatch_func) == {size}, "FUNC_SIZE");
_Static_assert(__builtin_offsetof(struct livepatch_func, new_addr) == {off_new}, "new_addr");
_Static_assert(__builtin_offsetof(struct livepatch_func, old_addr) == {off_old}, "old_addr");
_Static_assert(__builtin_offsetof(struct livepatch_func, new_size) == {off_new_size}, "new_size");
_Static_assert(__builtin_offsetof(struct livepatch_func, old_size) == {off_old_size}, "old_size");
_Static_assert(__builtin_offsetof(struct livepatch_func, version) == {off_version}, "version");
_Static_assert(__builtin_offsetof(struct livepatch_func, expect) == {off_expect}, "expect");
_Static_assert(LIVEPATCH_PAYLOAD_VERSION == {version}, "version value");
_Static_assert(sizeof(livepatch_expectation_t) == {expect_size}, "EXPECT_SIZE");
_Static_assert(LIVEPATCH_OPAQUE_SIZE == {opaque}, "OPAQUE_SIZE");

const char *xen_extra_version(void);
const char *{func}(void);
static const char xsb_old_name[] = "xen_extra_version";

struct livepatch_func __attribute__((used, section("{sec_funcs}"))) xsb_funcs[] = {{ {{
    .name = xsb_old_name,
    .new_addr = {func},
    .old_addr = xen_extra_version,
    .new_size = {new_size},
    .old_size = {old_size},
    .version = LIVEPATCH_PAYLOAD_VERSION,
    .expect = {{ .enabled = 1, .len = {expect_len}, .data = {{ {expect} }} }},
}} }};

static const uint8_t __attribute__((used, aligned(4), section("{sec_depends}")))
    xsb_depends[] = {{ {note} }};
static const uint8_t __attribute__((used, aligned(4), section("{sec_xen_depends}")))
    xsb_xen_depends[] = {{ {note} }};
"""


def build_handmade_payload(tree: DebianTree, folder: Path, name: str, new_string: str, *,
                           xen_build_id: str | None = None) -> Path:
    """A one-function payload for ``xen_extra_version`` against Debian's xen-syms, by hand.

    ``xen_build_id`` replaces the hypervisor build-id of both dependency notes (for a payload
    Xen must refuse); by default it is read from Debian's xen-syms.
    """
    xen_syms = tree.debian_xen_syms
    build_id = xen_build_id or read_build_id(xen_syms)
    objs = folder / f"{name}.objs"
    func = "xsb_handmade_extra_version"
    func_obj = compile_like(tree, VERSION_OBJ, "xsb_handmade_func.c",
                            HANDMADE_FUNC.format(func=func, string=new_string),
                            objs / "func.o")
    expect = _code_bytes(xen_syms, "xen_extra_version", xen_abi.PATCH_INSN_SIZE)
    table = HANDMADE_TABLE.format(
        size=xen_abi.FUNC_SIZE, off_new=xen_abi.FUNC_OFF_NEW_ADDR,
        off_old=xen_abi.FUNC_OFF_OLD_ADDR, off_new_size=xen_abi.FUNC_OFF_NEW_SIZE,
        off_old_size=xen_abi.FUNC_OFF_OLD_SIZE, off_version=xen_abi.FUNC_OFF_VERSION,
        off_expect=xen_abi.FUNC_OFF_EXPECT, version=xen_abi.LIVEPATCH_PAYLOAD_VERSION,
        expect_size=xen_abi.EXPECT_SIZE, opaque=xen_abi.OPAQUE_SIZE,
        func=func, new_size=_nm_size(func_obj, func),
        old_size=_nm_size(xen_syms, "xen_extra_version"),
        expect_len=len(expect), expect=_c_array(expect),
        sec_funcs=xen_abi.SEC_FUNCS, sec_depends=xen_abi.SEC_DEPENDS,
        sec_xen_depends=xen_abi.SEC_XEN_DEPENDS, note=_c_array(_note(build_id)))
    table_obj = compile_like(tree, VERSION_OBJ, "xsb_handmade_table.c", table, objs / "table.o")
    payload = folder / f"{name}.livepatch"
    subprocess.run([*LD, "-r", "--build-id=sha1", "-o", str(payload), str(func_obj),
                    str(table_obj)], check=True)
    return payload


def _section_bytes(elf: Path, section: str, tmp: Path) -> bytes:
    out = tmp / f"{section.strip('.')}.bin"
    subprocess.run(["objcopy", "-O", "binary", f"--only-section={section}", str(elf), str(out)],
                   check=True)
    return out.read_bytes()


def check_handmade_payload(payload: Path, xen_syms: Path, tmp: Path) -> None:
    """binutils' view of the payload: what the 4.17 loader needs is there (spec §1)."""
    header = subprocess.run(["readelf", "-hW", str(payload)], capture_output=True, text=True,
                            check=True).stdout
    assert re.search(r"Type:\s+REL ", header) and "UNIX - System V" in header, header
    sections = subprocess.run(["readelf", "-SW", str(payload)], capture_output=True, text=True,
                              check=True).stdout
    funcs = re.search(rf"\s{re.escape(xen_abi.SEC_FUNCS)}\s+PROGBITS\s+\S+\s+\S+\s+(\S+)\s+\S+"
                      r"\s+WA\s", sections)
    assert funcs and int(funcs.group(1), 16) == xen_abi.FUNC_SIZE, sections
    relocs = subprocess.run(["readelf", "-rW", str(payload)], capture_output=True, text=True,
                            check=True).stdout
    types = set(re.findall(r"\b(R_X86_64_\w+)\b", relocs))
    accepted = {xen_abi.reloc_type_name(t) for t in xen_abi.ACCEPTED_RELOC_TYPES}
    assert types and types <= accepted, relocs
    assert re.search(r"R_X86_64_64\s+0+\s+xen_extra_version\b", relocs), relocs
    xen_note = _section_bytes(xen_syms, xen_abi.SEC_BUILD_ID, tmp)
    assert _section_bytes(payload, xen_abi.SEC_XEN_DEPENDS, tmp) == xen_note
    assert _section_bytes(payload, xen_abi.SEC_DEPENDS, tmp) == xen_note
    assert len(_section_bytes(payload, xen_abi.SEC_BUILD_ID, tmp)) == len(xen_note)


def _other_build_id(build_id: str) -> str:
    """``build_id`` with its last byte changed: the same length, a different hypervisor."""
    raw = bytearray(bytes.fromhex(build_id))
    raw[-1] ^= 0xFF
    return raw.hex()


# --------------------------------------------------------------------------- xsbuild payload
def _xsbuild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *args], capture_output=True,
                          text=True, check=False)


HANDMADE = ("xsb_handmade", "xsb-handmade")
XSBUILD_MADE = ("xsb_extra_version", "xsbuild-e2e")


def xsbuild_payload(tree: DebianTree, folder: Path, name: str, new_string: str) -> Path:
    """``xsbuild diff``, ``link`` and ``check`` of a recompiled patched version.o."""
    patched = recompile(tree, VERSION_OBJ, patched_version_source(tree, new_string),
                        folder / "patched" / "version.o")
    diffed = folder / "diff" / "version.o"
    diffed.parent.mkdir()
    payload = folder / f"{name}.livepatch"
    xen_syms = str(tree.debian_xen_syms)
    for argv in (("diff", str(tree.xen_dir / VERSION_OBJ), str(patched), "-o", str(diffed)),
                 ("link", str(diffed), "-o", str(payload), "--xen-syms", xen_syms),
                 ("check", str(payload), "--xen-syms", xen_syms)):
        proc = _xsbuild(*argv)
        assert proc.returncode == 0, f"xsbuild {argv[0]}: rc={proc.returncode}\n{proc.stderr}"
    return payload


@pytest.fixture(scope="module")
def lifecycle_boot(qemu_host: None, debian_tree: DebianTree,
                   tmp_path_factory: pytest.TempPathFactory) -> BootResult:
    """One boot (a boot costs a minute of TCG) for both payloads, one after the other: the
    handmade one (applied twice), the same payload for another hypervisor (refused), then
    xsbuild's."""
    folder = tmp_path_factory.mktemp("extra-version")
    handmade = build_handmade_payload(debian_tree, folder, *HANDMADE)
    check_handmade_payload(handmade, debian_tree.debian_xen_syms, folder)
    # The same payload for another hypervisor: upload must fail with -EINVAL (spec §1.6), which
    # also shows that this harness sees a refusal as one.
    wrong_id = _other_build_id(read_build_id(debian_tree.debian_xen_syms))
    wrong = build_handmade_payload(debian_tree, folder, "xsb_wrong_xen", "xsb-wrong",
                                   xen_build_id=wrong_id)
    ours = xsbuild_payload(debian_tree, folder / "xsbuild", *XSBUILD_MADE)
    paths = {p: f"/payload/{p.name}" for p in (handmade, wrong, ours)}
    script = lifecycle_script(HANDMADE[0], paths[handmade], reapply=True, tag="hm-")
    (script.step("upload-wrong-xen", f"xen-livepatch upload xsb_wrong_xen {paths[wrong]}")
           .step("list-final", "xen-livepatch list"))
    lifecycle_script(XSBUILD_MADE[0], paths[ours], reapply=False, tag="xv-", script=script)
    return logged_boot(folder / "boot", script, paths)


def test_handmade_payload(lifecycle_boot: BootResult) -> None:
    result = lifecycle_boot
    assert_lifecycle(result, *HANDMADE, reapply=True, tag="hm-", also_busy=(XSBUILD_MADE[0],))
    refused = result.step("upload-wrong-xen")
    assert refused.rc == 1 and f"Error {xen_abi.EINVAL}" in refused.output, refused.output
    assert any("build-id" in line for line in refused.xen_lines), refused.xen_lines
    assert "Nothing to list" in result.step("list-final").output


def test_extra_version(lifecycle_boot: BootResult) -> None:
    assert_lifecycle(lifecycle_boot, *XSBUILD_MADE, reapply=False, tag="xv-",
                     also_busy=(HANDMADE[0],))
