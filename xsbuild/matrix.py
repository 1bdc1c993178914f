"""``xsbuild matrix``: the CI job matrix, advisory x target; the CI engine runs it.

Inputs: a folder of advisories (``NAME.patch``) and ``targets.toml``::

    [targets.debian-4-17]                      # one table per hypervisor build
    debian = "4.17.5+72-g01140da4e8-1"         # how its base is made (or srcdir = "PATH")
    base = "bases/debian-4-17.tar.gz"          # where the CI keeps the archive (default
                                               # bases/TARGET.tar.gz)
    prove = true                               # run --prove (default true)

    [advisories.xsa-999b]
    depends = "xsa-999a"                       # stacked on xsa-999a's payload

A stacked advisory can also say so in its patch header (before the first ``---``/``diff``
line): ``Livepatch-Depends: xsa-999a``.  A payload depends on one build-id (Xen's
``.livepatch.depends``: the hypervisor's, or the payload applied last), so an advisory stacks
on at most one other.  Its job runs in a later stage than its predecessor's, with ``--depends``
set to that payload's build-id, and its patches are the whole chain in order: xsbuild diffs the
unpatched base against the tree with every patch of the chain applied, so the stacked payload
carries the predecessors' changes too and is right even where both patches touch one function.

Each job is one ``xsbuild build --base ARCHIVE --patch ... -o payloads/TARGET/NAME.livepatch``
call, made by ``examples/ci/build-job.sh`` from the job's variables (``XSB_*``).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

from xsbuild.errors import UsageError

SCHEMA = "xsbuild.matrix/1"
GITHUB_STAGES = 3  # build jobs in examples/ci/github-workflow.yml (build-0 ... build-2)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HEADER_DEPENDS = re.compile(r"^Livepatch-Depends:\s*(\S+)\s*$", re.IGNORECASE)
_TARGET_KEYS = frozenset({"debian", "srcdir", "base", "prove"})


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    base: str
    prove: bool
    debian: str = ""
    srcdir: str = ""

    def to_json(self) -> dict[str, object]:
        return {"target": self.name, "base": self.base, "debian": self.debian,
                "srcdir": self.srcdir, "prove": self.prove}


@dataclass(frozen=True, slots=True)
class Advisory:
    name: str
    patch: str
    depends: str  # "" or the advisory it stacks on


@dataclass(frozen=True, slots=True)
class Job:
    target: Target
    advisory: str
    stage: int
    patches: tuple[str, ...]
    output: str
    depends_on: str  # the payload this one stacks on, "" for none
    needs: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.target.name}/{self.advisory}"

    def variables(self) -> dict[str, str]:
        """What build-job.sh reads: flat strings, as every CI engine passes them."""
        return {"XSB_TARGET": self.target.name, "XSB_ADVISORY": self.advisory,
                "XSB_BASE": self.target.base, "XSB_PATCHES": " ".join(self.patches),
                "XSB_OUTPUT": self.output, "XSB_DEPENDS_ON": self.depends_on,
                "XSB_PROVE": "true" if self.target.prove else "false"}

    def command(self) -> str:
        """The build this job runs (with --depends filled in at run time)."""
        argv = ["xsbuild", "build", "--base", self.target.base]
        for p in self.patches:
            argv += ["--patch", p]
        argv += ["-o", self.output, "--json"]
        if self.depends_on:
            argv += ["--depends", f"BUILD_ID_OF:{self.depends_on}"]
        if self.target.prove:
            argv.append("--prove")
        return shlex.join(argv)

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "target": self.target.name, "advisory": self.advisory,
                "stage": self.stage, "needs": list(self.needs), "command": self.command(),
                **self.variables()}


@dataclass(frozen=True, slots=True)
class Plan:
    targets: tuple[Target, ...]
    jobs: tuple[Job, ...]

    @property
    def stages(self) -> int:
        return 1 + max((j.stage for j in self.jobs), default=-1)

    def to_json(self) -> dict[str, object]:
        return {"schema": SCHEMA, "stages": self.stages,
                "targets": [t.to_json() for t in self.targets],
                "jobs": [j.to_json() for j in self.jobs]}


def load_plan(patch_dir: Path, targets_file: Path, payload_dir: str = "payloads") -> Plan:
    """Read the advisories and the targets; order stacked advisories into stages."""
    try:
        doc = tomllib.loads(targets_file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{targets_file}: not valid TOML ({exc})") from None
    targets = _targets(doc, targets_file)
    advisories = _advisories(patch_dir, doc, targets_file)
    depth = _stages(advisories, targets_file)
    jobs = []
    for name in sorted(advisories, key=lambda n: (depth[n], n)):
        chain = _chain(name, advisories)
        parent = advisories[name].depends
        for t in targets:
            jobs.append(Job(t, name, depth[name], tuple(advisories[a].patch for a in chain),
                            f"{payload_dir}/{t.name}/{name}.livepatch",
                            f"{payload_dir}/{t.name}/{parent}.livepatch" if parent else "",
                            (f"{t.name}/{parent}",) if parent else ()))
    return Plan(targets, tuple(jobs))


def _targets(doc: dict[str, object], where: Path) -> tuple[Target, ...]:
    table = doc.get("targets")
    if not isinstance(table, dict) or not table:
        raise UsageError(f"{where}: no [targets.NAME] table")
    out = []
    for name, t in sorted(table.items()):
        if not _NAME_RE.match(name) or not isinstance(t, dict):
            raise UsageError(f"{where}: bad target {name!r} (a name of letters, digits, '_', "
                             "'.', '-' with a table)")
        unknown = sorted(set(t) - _TARGET_KEYS)
        if unknown:
            raise UsageError(f"{where}: target {name}: unknown key {unknown[0]!r} (known: "
                             f"{', '.join(sorted(_TARGET_KEYS))})")
        if ("debian" in t) == ("srcdir" in t):
            raise UsageError(f"{where}: target {name}: give exactly one of debian and srcdir")
        prove = t.get("prove", True)
        if not isinstance(prove, bool):
            raise UsageError(f"{where}: target {name}: prove is true or false")
        out.append(Target(name, str(t.get("base", f"bases/{name}.tar.gz")), prove,
                          str(t.get("debian", "")), str(t.get("srcdir", ""))))
    return tuple(out)


def _advisories(patch_dir: Path, doc: dict[str, object], where: Path) -> dict[str, Advisory]:
    declared = doc.get("advisories", {})
    if not isinstance(declared, dict):
        raise UsageError(f"{where}: [advisories] must be a table")
    out: dict[str, Advisory] = {}
    for patch in sorted(patch_dir.glob("*.patch")):
        name = patch.name.removesuffix(".patch")
        if not _NAME_RE.match(name):
            raise UsageError(f"{patch}: an advisory's name is letters, digits, '_', '.', '-'")
        in_header = header_depends(patch)
        in_toml = declared.get(name, {}).get("depends", "") if isinstance(
            declared.get(name), dict) else ""
        if in_header and in_toml and in_header != in_toml:
            raise UsageError(f"{name}: its patch says Livepatch-Depends: {in_header} but "
                             f"{where} says depends = {in_toml!r}")
        out[name] = Advisory(name, patch.as_posix(), str(in_header or in_toml))
    if not out:
        raise UsageError(f"{patch_dir}: no *.patch files")
    for name in sorted(set(declared) - set(out)):
        raise UsageError(f"{where}: [advisories.{name}] has no {name}.patch in {patch_dir}")
    for a in out.values():
        if a.depends and a.depends not in out:
            raise UsageError(f"{a.name} depends on {a.depends}, which is not in {patch_dir}")
    return out


def header_depends(patch: Path) -> str:
    """``Livepatch-Depends: NAME`` in the patch's header (before the first diff)."""
    for line in patch.read_text(errors="replace").splitlines():
        if line.startswith(("--- ", "diff ", "Index: ")):
            break
        m = _HEADER_DEPENDS.match(line.strip())
        if m:
            return m.group(1)
    return ""


def _stages(advisories: dict[str, Advisory], where: Path) -> dict[str, int]:
    depth: dict[str, int] = {}
    for name in advisories:
        seen = [name]
        cur = advisories[name].depends
        while cur:
            if cur in seen:
                raise UsageError(f"{where}: advisories depend on each other in a cycle: "
                                 f"{' -> '.join([*seen, cur])}")
            seen.append(cur)
            cur = advisories[cur].depends
        depth[name] = len(seen) - 1
    return depth


def _chain(name: str, advisories: dict[str, Advisory]) -> list[str]:
    chain = [name]
    while advisories[chain[-1]].depends:
        chain.append(advisories[chain[-1]].depends)
    return chain[::-1]


# ------------------------------------------------------------------------------------------
# Output formats


def format_github(plan: Plan) -> str:
    """``name=value`` lines for ``$GITHUB_OUTPUT``: the targets (for the base jobs) and one
    ``{"include": [...]}`` matrix per stage (for build-0 ... build-N)."""
    if plan.stages > GITHUB_STAGES:
        raise UsageError(f"the advisories stack {plan.stages} deep; the GitHub workflow has "
                         f"{GITHUB_STAGES} build stages (add build-{GITHUB_STAGES} to it and "
                         "raise xsbuild.matrix.GITHUB_STAGES)")
    lines = [f"stages={plan.stages}",
             "targets=" + _compact({"include": [t.to_json() for t in plan.targets]})]
    for stage in range(GITHUB_STAGES):
        jobs = [j.to_json() for j in plan.jobs if j.stage == stage]
        lines.append(f"stage{stage}=" + _compact({"include": jobs}))
        lines.append(f"stage{stage}-count={len(jobs)}")
    return "\n".join(lines) + "\n"


def _compact(doc: object) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def format_gitlab(plan: Plan) -> str:
    """A child pipeline (``trigger: include: artifact:``): a base job per target, a build job
    per advisory and target with ``needs`` on its base and its predecessor, an index job."""
    stages = ["base", *(f"build-{s}" for s in range(plan.stages)), "index"]
    doc: dict[str, object] = {
        "stages": stages,
        "default": {"image": "debian:bookworm",
                    "before_script": [". examples/ci/setup.sh"]},
    }
    for t in plan.targets:
        doc[f"base:{t.name}"] = {
            "stage": "base",
            "variables": {"XSB_TARGET": t.name, "XSB_BASE": t.base,
                          "XSB_DEBIAN": t.debian, "XSB_SRCDIR": t.srcdir},
            "cache": {"key": f"xsbuild-base-{t.name}-{t.debian or 'srcdir'}",
                      "paths": [t.base]},
            "script": ["sh examples/ci/base-job.sh"],
            "artifacts": {"paths": [t.base], "expire_in": "1 day"},
        }
    for j in plan.jobs:
        needs = [f"base:{j.target.name}", *(f"build:{n.replace('/', ':')}" for n in j.needs)]
        doc[f"build:{j.target.name}:{j.advisory}"] = {
            "stage": f"build-{j.stage}",
            "needs": needs,
            "variables": j.variables(),
            "script": ["sh examples/ci/build-job.sh"],
            "artifacts": {"paths": [j.output, f"{j.output}.build.json", f"{j.output}.log"],
                          "when": "always"},
        }
    doc["index"] = {
        "stage": "index",
        "needs": [f"build:{j.target.name}:{j.advisory}" for j in plan.jobs],
        "script": ["xsbuild index --payloads payloads"],
        "artifacts": {"paths": ["payloads/"]},
    }
    # JSON is YAML: no YAML library in the product, and GitLab reads it as it is.
    return json.dumps(doc, indent=2) + "\n"
