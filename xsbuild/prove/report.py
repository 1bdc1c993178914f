"""The proof report: verdict, per-function proofs, differences; as text, JSON
(``xsbuild.prove/1``, ``docs/json-schema/``) and one self-contained HTML page."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

PROOF_SCHEMA = "xsbuild.prove/1"
_MAX_REPORTED = 200  # differences listed per proof (the count is always exact)


class Verdict(StrEnum):
    PROVEN = "proven"
    NOT_PROVEN = "not-proven"
    CANNOT_JUDGE = "cannot-judge"


class DiffKind(StrEnum):
    CODE = "code"  # an instruction differs
    FRAGMENT = "fragment"  # unnamed code reached from the function differs
    ALTERNATIVE = "alternative"
    EX_TABLE = "ex-table"
    BUG_FRAME = "bug-frame"
    ALT_CALL = "alt-call"  # 4.21+: an indirect call Xen converts (.alt_call_sites)
    DATA = "data"  # a carried table's bytes or pointers differ
    ABSENT = "absent"  # the payload's function does not exist in the patched hypervisor
    MISSING = "missing"  # changed in the patched hypervisor, not carried by the payload
    EXTRA = "extra"  # carried by the payload, unchanged in the patched hypervisor


@dataclass(frozen=True, slots=True)
class Difference:
    """One reason the payload is not the patched hypervisor's code."""

    kind: DiffKind
    function: str
    offset: int | None = None
    payload: str = ""  # the payload's instruction / entry at that place
    xen: str = ""  # the patched hypervisor's
    detail: str = ""

    def describe(self) -> str:
        where = self.function if self.offset is None else f"{self.function}+{self.offset:#x}"
        if self.kind is DiffKind.MISSING:
            return (f"missing: {self.function} differs between the original and the patched "
                    f"hypervisor but the payload does not carry it{self._why()}")
        if self.kind is DiffKind.EXTRA:
            return (f"extra: the payload carries {self.function}, which the patch does not "
                    f"change in the hypervisor{self._why()}")
        if self.kind is DiffKind.ABSENT:
            return f"absent: {self.function} is in the payload but not in the patched hypervisor"
        return (f"{self.kind}: {where}{self._why()}: payload `{self.payload or '(nothing)'}` "
                f"vs patched xen-syms `{self.xen or '(nothing)'}`")

    def _why(self) -> str:
        return f" ({self.detail})" if self.detail else ""

    def to_json(self) -> dict[str, object]:
        return {"kind": str(self.kind), "function": self.function, "offset": self.offset,
                "payload": self.payload, "xen": self.xen, "detail": self.detail,
                "message": self.describe()}


@dataclass(slots=True)
class FunctionProof:
    """The equivalence verdict of one function the payload carries."""

    name: str
    role: str  # "replaced", "new" or "table" (a changed const table the payload carries)
    instructions: int = 0
    fragments: int = 0
    alternatives: int = 0
    ex_table: int = 0
    bug_frames: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def proven(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "proven": self.proven,
                "instructions": self.instructions, "fragments": self.fragments,
                "alternatives": self.alternatives, "ex_table": self.ex_table,
                "bug_frames": self.bug_frames,
                "differences": [d.to_json() for d in self.differences]}


@dataclass(slots=True)
class ProofReport:
    """Everything ``xsbuild prove`` found; :meth:`to_json` is schema ``xsbuild.prove/1``."""

    payload: str
    payload_build_id: str = ""
    base_build_id: str = ""
    patched_build_id: str = ""
    verdict: Verdict = Verdict.CANNOT_JUDGE
    reason: str = ""  # why it cannot be judged
    functions: list[FunctionProof] = field(default_factory=list)
    changed_in_xen: list[str] = field(default_factory=list)
    missing: list[Difference] = field(default_factory=list)
    extra: list[Difference] = field(default_factory=list)
    # unchanged functions replaced to read a changed table the payload carries -> the tables
    promoted: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def differences(self) -> list[Difference]:
        out = [d for f in self.functions for d in f.differences]
        return out + self.missing + self.extra

    def decide(self) -> None:
        if self.verdict is not Verdict.CANNOT_JUDGE or not self.reason:
            self.verdict = Verdict.NOT_PROVEN if self.differences() else Verdict.PROVEN

    def to_json(self) -> dict[str, object]:
        diffs = self.differences()
        return {
            "schema": PROOF_SCHEMA,
            "verdict": str(self.verdict),
            "reason": self.reason or None,
            "payload": self.payload,
            "build_ids": {"payload": self.payload_build_id, "base": self.base_build_id,
                          "patched": self.patched_build_id},
            "functions": [f.to_json() for f in self.functions],
            "changed_in_xen": self.changed_in_xen,
            "missing": [d.function for d in self.missing],
            "extra": [d.function for d in self.extra],
            "promoted": self.promoted,
            "differences": [d.to_json() for d in diffs[:_MAX_REPORTED]],
            "difference_count": len(diffs),
            "notes": self.notes,
            "timings": self.timings,
        }



# ------------------------------------------------------------------------------------------
# Text


def report_text(report: ProofReport) -> str:
    lines = [f"{report.payload}: {report.verdict}"]
    if report.verdict is Verdict.CANNOT_JUDGE:
        lines.append(f"  cannot judge: {report.reason}")
        return "\n".join(lines) + "\n"
    lines.append(f"  base {report.base_build_id}, patched build {report.patched_build_id}")
    for f in report.functions:
        what = (f"{f.instructions} instructions, {f.fragments} unnamed fragment(s), "
                f"{f.alternatives} alternative(s), {f.ex_table} ex_table, "
                f"{f.bug_frames} bug frame(s)")
        lines.append(f"  {'same' if f.proven else 'DIFFERS'}  {f.role:8} {f.name} ({what})")
    changed = ", ".join(report.changed_in_xen) or "none"
    lines.append(f"  functions the patch changes in the hypervisor: {changed}")
    for d in report.differences():
        lines.append(f"  - {d.describe()}")
    lines.extend(f"  note: {n}" for n in report.notes)
    return "\n".join(lines) + "\n"


def report_html(report: ProofReport) -> str:
    """One self-contained page: the verdict, every function with its status, every
    difference with both instructions."""
    from html import escape

    rows = []
    for f in report.functions:
        diffs = "".join(f"<div class=d><code>{escape(d.describe())}</code></div>"
                        for d in f.differences)
        rows.append(f"<tr class={'ok' if f.proven else 'bad'}><td>{escape(f.name)}</td>"
                    f"<td>{f.role}</td><td>{'same' if f.proven else 'differs'}</td>"
                    f"<td>{f.instructions}</td><td>{f.fragments}/{f.alternatives}/"
                    f"{f.ex_table}/{f.bug_frames}</td><td>{diffs}</td></tr>")
    other = "".join(f"<li><code>{escape(d.describe())}</code></li>"
                    for d in report.missing + report.extra)
    reason = f"<p>cannot judge: {escape(report.reason)}</p>" if report.reason else ""
    return f"""<!doctype html>
<html><head><meta charset=utf-8><title>proof of {escape(report.payload)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 8px;text-align:left;
vertical-align:top}} tr.ok td:nth-child(3){{color:#070}} tr.bad td:nth-child(3){{color:#b00}}
.verdict{{font-size:1.4em}} code{{white-space:pre-wrap}}</style></head><body>
<h1>Proof of {escape(report.payload)}</h1>
<p class=verdict>verdict: <b>{report.verdict}</b></p>{reason}
<p>base {report.base_build_id}, patched build {report.patched_build_id}, payload
{report.payload_build_id}</p>
<table><tr><th>function</th><th>role</th><th>status</th><th>instructions</th>
<th>fragments/alternatives/ex_table/bug frames</th><th>differences</th></tr>
{''.join(rows)}</table>
<h2>Completeness</h2><p>functions the patch changes in the hypervisor:
{escape(', '.join(report.changed_in_xen) or 'none')}</p><ul>{other}</ul>
</body></html>
"""

