"""Render ``inspect`` and ``explain`` reports as text, JSON or one self-contained HTML page.

* text: for a terminal and for pasting into a code review: aligned columns, addresses in hex,
  sizes in bytes, code as a unified listing (``-`` old, ``+`` new);
* JSON: the report's ``to_json()`` document, versioned (``xsbuild.inspect/1``,
  ``xsbuild.explain/1``) and described by the JSON Schemas in ``docs/json-schema/``;
* HTML: jinja2 templates of ``xsbuild/templates/`` (autoescaped), one file with inline CSS and
  no script or external resource: a summary first, then each function with its old and new code
  side by side.

Rendering returns a string; the CLI decides where it goes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from xsbuild import __version__
from xsbuild.disasm import Instruction, Row, align
from xsbuild.errors import UsageError
from xsbuild.explain import DataExplanation, ExplainReport, FunctionExplanation
from xsbuild.inspection import InspectReport, PayloadFunction

FORMATS = ("text", "json", "html")


def render(report: InspectReport | ExplainReport, fmt: str) -> str:
    """The report in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(report.to_json(), indent=2) + "\n"
    if fmt == "html":
        return render_html(report)
    if isinstance(report, InspectReport):
        return inspect_text(report)
    return explain_text(report)


# --------------------------------------------------------------------------------------------
# Text


def table(headers: Sequence[str], rows: Sequence[Sequence[object]],
          indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell; the last column is not padded.  No rows: no
    lines, so that an empty section is left out.  No headers: no header line."""
    if not rows:
        return []
    cells = [[("-" if c in ("", None) else str(c)) for c in row] for row in rows]
    if headers:
        cells.insert(0, list(headers))
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    out = []
    for r in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True))
        out.append(f"{indent}{line}  {r[-1]}".rstrip() if len(r) > 1 else f"{indent}{r[0]}")
    return out


def _section(title: str, body: list[str]) -> list[str]:
    return ["", title, *body] if body else []


def listing(rows: list[Row], indent: str = "    ") -> list[str]:
    """A unified listing: `` `` same, ``-`` old only, ``+`` new only (changed: both lines)."""
    out = []
    for row in rows:
        if row.kind == "same":
            out.append(f"{indent}  {_insn(row.new)}")
            continue
        if row.old is not None:
            out.append(f"{indent}- {_insn(row.old)}")
        if row.new is not None:
            out.append(f"{indent}+ {_insn(row.new)}")
    return out


def _insn(i: Instruction | None) -> str:
    return f"+{i.offset:#06x}  {i.raw.hex():<20}  {i.text}" if i else ""


def _plain_listing(code: list[Instruction], indent: str = "    ") -> list[str]:
    return [f"{indent}  {_insn(i)}" for i in code]


def inspect_text(r: InspectReport) -> str:
    lines = [f"Payload {r.name}: {r.payload} ({r.size} bytes)"]
    lines += table([], [
        ["xen-syms", r.xen_syms or "(not given: old code and addresses left to the loader)"],
        ["loader check", ("OK: Xen 4.17 would accept it" if r.xen_syms else
                          "OK as far as the payload alone tells (give --xen-syms)")
         if r.loader_ok else f"REJECTED: {len(r.problems)} problem(s)"],
        ["re-apply", "safe after a revert" if r.safe_to_reapply else
         "not after a revert: the payload has writable data (unload and load again)"],
    ])
    lines += [f"    {p}" for p in r.problems]
    lines += _section("Patched functions (.livepatch.funcs)", table(
        ["#", "FUNCTION", "OLD ADDRESS", "OLD SIZE", "NEW", "NEW SIZE", "SOURCE"],
        [[f.index, f.name or "(NULL)", _old_addr(f.old_addr, f.old_addr_source), f.old_size,
          "NOP" if f.is_nop else f"{f.new_section}+{f.new_offset:#x}", f.new_size,
          f.source_file] for f in r.funcs]))
    lines += _section("Functions the payload brings", table(
        ["ROLE", "NAME", "SECTION", "SIZE", "BINDING"],
        [[_role(f), f.name, f"{f.section}+{f.offset:#x}", f.size, f.binding]
         for f in r.functions]))
    lines += _section("Data the payload brings", table(
        ["KIND", "NAME", "SECTION", "SIZE", "BINDING"],
        [[d.kind, d.name, f"{d.section}+{d.offset:#x}", d.size, d.binding] for d in r.data]))
    lines += _section("Hooks", table(
        ["KIND", "#", "FUNCTION"],
        [[h.kind, h.index, h.function or "(NULL: disabled)"] for h in r.hooks]))
    lines += _section("Dependencies (build-id notes)", table(
        ["NOTE", "BUILD-ID", "BELONGS TO"],
        [[d.section, d.build_id.hex(), d.belongs_to] for d in r.dependencies]))
    lines += _section("Relocations by target", table(
        ["KIND", "TARGET", "COUNT", "TYPES", "FROM"],
        [[g.kind, g.target, g.count, ",".join(t.removeprefix("R_X86_64_") for t in g.types),
          ", ".join(g.sites)] for g in r.relocations]))
    lines += _section("Special sections", table(
        ["SECTION", "#", "FUNCTION", "ENTRY"],
        [[e.section, e.index, e.owner, e.summary] for e in r.special]))
    lines += _section("Notes", [f"  {n}" for n in r.notes])
    for fn in r.functions:
        lines += ["", _function_heading(fn)]
        if fn.old_code is not None:
            lines += ["    (- old code in xen-syms, + new code in the payload)"]
            lines += listing(align(fn.old_code, fn.code))
        else:
            if fn.old_code_note:
                lines += [f"    ({fn.old_code_note})"]
            lines += _plain_listing(fn.code)
    return "\n".join(lines) + "\n"


def _old_addr(addr: int, source: str) -> str:
    if not addr:
        return "at load (by name)" if source == "load" else "-"
    return f"{addr:#x}" + (" (xen-syms)" if source == "xen-syms" else "")


def _role(f: PayloadFunction) -> str:
    return f"replaces {f.replaces}" if f.role == "replacement" else f.role


def _function_heading(fn: PayloadFunction) -> str:
    where = f"{fn.section}+{fn.offset:#x}, {fn.size} bytes"
    if fn.role == "replacement":
        old = f" at {fn.old_addr:#x}" if fn.old_addr else ""
        return f"Code of {fn.name} ({where}): replaces {fn.replaces}{old}"
    return f"Code of {fn.name} ({where}): {fn.role} function"


def explain_text(r: ExplainReport) -> str:
    verdict = {"changed": "changes found", "no-change": "no functional change",
               "refused": "REFUSED: cannot be live-patched"}[r.status]
    lines = [f"Explain {r.unit or r.patched}: {verdict}"]
    lines += table([], [["original", r.orig], ["patched", r.patched],
                        ["functions", _counts(r)]])
    lines += _section("Refused", [f"  {m}" for m in r.refused])
    lines += _section("Functions", table(
        ["STATUS", "NAME", "SIZE", "WHY"],
        [[f.status, f.name, _sizes(f.old_size, f.new_size), f.reason] for f in r.functions]))
    for f in r.functions:
        if f.difference is not None and f.difference.kind != "other":
            lines += ["", f"First difference in {f.name}:", *_difference_lines(f)]
    lines += _section("Data", table(
        ["STATUS", "NAME", "SECTION", "SIZE", "WHY"],
        [[d.status, d.name, d.section, _sizes(d.old_size, d.new_size), _data_why(d)]
         for d in r.data]))
    lines += _section("The payload carries", table(
        ["NAME", "STATUS", "WHY"],
        [[i.xen_name, i.status, _why(i.why, i.by, i.at, i.via)] for i in r.included]))
    lines += _section("Hooks", [f"  {h}" for h in r.hooks])
    lines += _section("Notes", [f"  {n}" for n in r.notes])
    for f in r.functions:
        if f.status == "changed" and f.old_code is not None and f.new_code is not None:
            lines += ["", f"Code of {f.name} (- original, + patched)",
                      *listing(align(f.old_code, f.new_code))]
        elif f.status == "new" and f.new_code is not None:
            lines += ["", f"Code of {f.name} (new)", *_plain_listing(f.new_code)]
    return "\n".join(lines) + "\n"


def _data_why(d: DataExplanation) -> str:
    if d.offset is None:
        return d.reason
    return f"{d.reason}: {d.old_bytes.hex(' ')} -> {d.new_bytes.hex(' ')}"


def _counts(r: ExplainReport) -> str:
    return ", ".join(f"{r.count(s)} {s}" for s in ("changed", "new", "removed", "same"))


def _sizes(old: int | None, new: int | None) -> str:
    if old is None or new is None:
        return str(new if old is None else old)
    return str(new) if old == new else f"{old} -> {new}"


def _why(why: str, by: str, at: int | None, via: str) -> str:
    if why == "referenced":
        return f"referenced by {by}+{at or 0:#x}: {via}"
    if why == "hook":
        return f"hook ({by})"
    if why == "cold part":
        return f"cold part of {by}"
    return {"changed": "changed function", "new global": "new global symbol",
            "carried": "carried along"}.get(why, why)


def _difference_lines(f: FunctionExplanation) -> list[str]:
    d = f.difference
    assert d is not None
    lines = [f"  at +{d.offset or 0:#x}: {f.reason}",
             f"    - {_insn(d.old) if d.old else '(past the end of the original)'}",
             f"    + {_insn(d.new) if d.new else '(past the end of the patched function)'}"]
    if d.old_string is not None or d.new_string is not None:
        lines.append(f"    string: {json.dumps(d.old_string)} -> {json.dumps(d.new_string)}")
    return lines


# --------------------------------------------------------------------------------------------
# HTML


def render_html(report: InspectReport | ExplainReport) -> str:
    import jinja2  # imported here: ``xsbuild --help`` must not pay for it

    env = jinja2.Environment(loader=jinja2.PackageLoader("xsbuild", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["hex"] = lambda v: f"{v:#x}" if v else "-"
    env.filters["bytes_hex"] = lambda b: b.hex(" ")
    env.filters["basename"] = lambda path: os.path.basename(path)
    env.globals.update(align=align, version=__version__, why=_why, sizes=_sizes,
                       old_addr=_old_addr, data_why=_data_why)
    if isinstance(report, InspectReport):
        return env.get_template("inspect.html.j2").render(r=report)
    return env.get_template("explain.html.j2").render(r=report)

