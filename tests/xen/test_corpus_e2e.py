"""A fixed sample of the public corpus of real changes, built and run on Debian's Xen.

``../shared/corpus-public/`` holds real stable-4.17 commits, each undone as a patch for Debian's
tree (``bench/corpus.py`` runs all of them and prints the table).  This suite takes a fixed
sample chosen to cover the outcomes (payloads, and each kind of refusal) while staying quick to
build, and checks that:

* every build ends in a payload ``xsbuild check`` accepts (and, for ``PROVEN_IN_CI``, that is
  proven, ``build --prove``: the payload is the code the tree's own make builds from the patch, and
  carries every function the patch changes), or a refusal with its reason (exit 1 or 3): never exit
  2 for a patch that applies and compiles, never 5 or 70, never a traceback;
* every payload uploads, applies, reverts and unloads on Debian's Xen under QEMU, all in one boot,
  with no hypervisor error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import BootFn
from .debian_tree import DebianTree
from .qemu import Script
from .test_build_e2e import lp

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO.parent / "shared" / "corpus-public"

# number -> the outcome it must have: "built", or the refusal's exit code and a word of its
# reason.  Chosen from bench/corpus.py's table, about 20 that are quick to build with every
# outcome represented: payloads (changed functions, static data, alternatives, unlikely-path
# tails, two objects), refusals of __init changes, of assembly changes and of changes with no
# functional effect.  (A struct-layout refusal costs ~300 compiles: e2e patch 15 covers it.)
SAMPLE: dict[str, tuple[int, str]] = {
    "001": (0, ""),
    "003": (1, "__init"),
    "004": (0, ""),
    "006": (3, "no functional change"),
    "010": (0, ""),
    "011": (3, "no functional change"),
    "014": (3, "no functional change"),
    "020": (0, ""),
    "023": (0, ""),
    "034": (0, ""),
    "036": (0, ""),
    "046": (0, ""),
    "047": (0, ""),
    "050": (1, "assembly"),
    "051": (0, ""),
    "057": (0, ""),
    "062": (0, ""),
    "072": (0, ""),
    "077": (1, "assembly"),
    "081": (1, "__init"),
    "087": (0, ""),
}

# Built with --prove in CI (each proof is an incremental make of the whole hypervisor, ~20 s):
# a changed function, an unlikely-path tail, a static string, a two-object change, alternatives.
# bench/corpus.py --prove proves every payload of the corpus.
PROVEN_IN_CI = ("001", "004", "010", "020", "023", "047")


@dataclass(frozen=True)
class Outcome:
    number: str
    exit_code: int
    stderr: str
    summary: dict[str, object]
    payload: Path
    name: str


def corpus_patch(number: str) -> Path:
    [path] = CORPUS.glob(f"{number}-*.patch")
    return path


@pytest.fixture(scope="module")
def outcomes(debian_tree: DebianTree, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Outcome]:
    if not CORPUS.is_dir():
        pytest.skip(f"{CORPUS} not found (shared/ beside the clone?)")
    out = tmp_path_factory.mktemp("corpus")
    found = {}
    for number in SAMPLE:
        payload = out / f"c{number}.livepatch"
        run = subprocess.run(
            [sys.executable, "-m", "xsbuild", "build", "--srcdir", str(debian_tree.source_top),
             "--patch", str(corpus_patch(number)), "--xen-syms", str(debian_tree.debian_xen_syms),
             "-o", str(payload), "--name", f"c{number}", "--json",
             *(["--prove"] if number in PROVEN_IN_CI else [])],
            capture_output=True, text=True, check=False)
        summary = json.loads(run.stdout) if run.stdout.startswith("{") else {}
        found[number] = Outcome(number, run.returncode, run.stderr, summary, payload,
                                f"c{number}")
    return found


@pytest.mark.slow
def test_sample_outcomes(outcomes: dict[str, Outcome], debian_tree: DebianTree) -> None:
    for number, (want, word) in SAMPLE.items():
        o = outcomes[number]
        assert "Traceback" not in o.stderr, o.stderr
        assert o.exit_code == want, f"{number}: exit {o.exit_code}\n{o.stderr}"
        assert word in o.stderr, f"{number}: {word!r} not in\n{o.stderr}"
        assert o.payload.is_file() == (want == 0), number
        if want == 0 and number in PROVEN_IN_CI:
            proof = o.summary["proof"]
            assert proof["verdict"] == "proven", (number, proof)  # type: ignore[index]
        if want == 0:
            check = subprocess.run(
                [sys.executable, "-m", "xsbuild", "check", str(o.payload), "--xen-syms",
                 str(debian_tree.debian_xen_syms), "--json"],
                capture_output=True, text=True, check=False)
            assert check.returncode == 0, f"{number}: check: {check.stdout}{check.stderr}"
            assert json.loads(check.stdout)["ok"] is True


@pytest.mark.xen
def test_sample_payloads_on_debian_xen(xen_boot: BootFn, outcomes: dict[str, Outcome]) -> None:
    built = [o for o in outcomes.values() if o.exit_code == 0]
    expected = sorted(n for n, (want, _word) in SAMPLE.items() if want == 0)
    assert sorted(o.number for o in built) == expected, [o.number for o in built]
    script = Script()
    for o in built:
        path = f"/payload/{o.payload.name}"
        (script.step(f"c{o.number}-up", lp(f"upload {o.name} {path}"))
               .step(f"c{o.number}-ap", lp(f"apply {o.name}"))
               .step(f"c{o.number}-rv", lp(f"revert {o.name}"))
               .step(f"c{o.number}-ul", lp(f"unload {o.name}")))
    script.step("list-end", "xen-livepatch list")
    result = xen_boot(script, {o.payload: f"/payload/{o.payload.name}" for o in built},
                      timeout=600)
    why = result.describe()
    for step in result.steps.values():
        assert step.rc == 0, f"step {step.name} failed (rc={step.rc}):\n{step.output}\n{why}"
    assert result.hypervisor_errors() == [], why
    assert "Nothing to list" in result.step("list-end").output, why
