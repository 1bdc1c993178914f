"""``xsbuild prove``: the payload's code is the patched hypervisor's code, and nothing is missing.

Two linked-code comparisons, one normal form:

* **Equivalence.**  Every function the payload carries (each ``.livepatch.funcs`` replacement,
  every other function symbol it defines: new functions, ``.cold`` parts, hooks) is compared
  instruction by instruction with the function of the same Xen name (statics ``file#name``,
  spec §7) in the *patched* ``xen-syms``, the one the tree's own make builds from the patched
  source.
* **Completeness.**  The functions that differ between the original ``xen-syms`` and the
  patched one, compared the same way (init code excluded), must be exactly the functions the
  payload carries.

The normal form of an instruction is its bytes with every *address field* zeroed (branch
displacements, RIP-relative displacements, relocated fields; located with capstone's detail
mode: ``disp_offset``/``imm_offset``) plus what each field points at:

* payload side: the relocation's target: symbol + offset (section symbols mapped to the symbol
  covering the offset), string literals and ``.rodata.cst*`` constants by their bytes;
* linked side: the absolute target mapped to symbol + offset through the hypervisor's symbol
  table, unnamed data by its bytes.

Code no symbol covers but a branch reaches (``.fixup``, replacement code) is followed and
compared as numbered fragments.  Alternatives, exception-table entries and bug frames whose
patch site lies in a function are part of that function's normal form.

Completeness looks at the functions of the objects the patched build's make rewrote (no other
function can change), init code excluded, bug-frame line numbers aside (the differ does not
carry a function whose only change is the line its WARN/BUG reports).  A changed ``foo.cold``
needs ``foo`` replaced (only ``foo`` reaches it); a new copy of it serves.

A static local the patched build renumbers (``count.0`` -> ``count.1``) while the payload keeps
using the running hypervisor's (its state carries over) is matched by position
(:func:`static_aliases`).  Functions the author told the differ to ignore
(``.livepatch.ignore.*``) are reported missing, which they are.

Modules: :mod:`~xsbuild.prove.normal` (the normal form, decoding, comparison),
:mod:`~xsbuild.prove.linked` and :mod:`~xsbuild.prove.payload` (the two sides),
:mod:`~xsbuild.prove.compare` (equivalence, completeness), :mod:`~xsbuild.prove.report` (the
report and its renderings); the patched build itself is :mod:`xsbuild.patched`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xsbuild.prove.compare import changed_functions, prove_images, static_aliases
from xsbuild.prove.linked import LinkedImage, linked_unit
from xsbuild.prove.normal import Entry, NInsn, Unit, compare_units
from xsbuild.prove.payload import PayloadImage, payload_unit, xen_name
from xsbuild.prove.report import (
    PROOF_SCHEMA,
    Difference,
    DiffKind,
    FunctionProof,
    ProofReport,
    Verdict,
    report_html,
    report_text,
)
from xsbuild.xensyms import read_build_id

__all__ = ["PROOF_SCHEMA", "DiffKind", "Difference", "Entry", "FunctionProof", "LinkedImage",
           "NInsn", "PayloadImage", "ProofReport", "ProveOptions", "Unit", "Verdict",
           "changed_functions", "compare_units", "linked_unit", "payload_unit", "prove_images",
           "prove_payload", "report_html", "report_text", "static_aliases", "xen_name"]


# ------------------------------------------------------------------------------------------
# From a payload, a tree and patches


@dataclass(frozen=True, slots=True)
class ProveOptions:
    """What ``xsbuild prove`` was asked to do."""

    payload: Path
    srcdir: Path
    patches: tuple[Path, ...]
    xen_syms: Path | None = None  # the original hypervisor; default: the base tree's
    jobs: int = 2


def prove_payload(opts: ProveOptions, progress: Callable[[str], None] = lambda _: None
                  ) -> ProofReport:
    """Build the patched hypervisor (incrementally, in the private copy) and prove the payload
    against it.  Bad input raises :class:`UsageError`; a proof that cannot be made returns a
    report with verdict ``cannot-judge`` and the reason."""
    import tempfile
    import time

    from xsbuild.patched import CannotJudgeError, build_patched

    report = ProofReport(str(opts.payload))
    start = time.monotonic()
    payload = PayloadImage.load(opts.payload)
    base = _base_tree(opts.srcdir, opts.jobs, progress)
    orig = LinkedImage(opts.xen_syms or base / "xen" / "xen-syms")
    base_image = base / "xen" / "xen-syms"
    base_id = orig.build_id if opts.xen_syms is None else read_build_id(base_image)
    if base_id != orig.build_id:
        report.reason = (f"--xen-syms {opts.xen_syms} has build-id {orig.build_id.hex()} but "
                         f"the tree {base} built {base_id.hex()}")
        return report
    report.timings["read"] = round(time.monotonic() - start, 3)
    try:
        built = build_patched(base, opts.patches, jobs=opts.jobs, progress=progress)
    except CannotJudgeError as exc:
        report.reason = str(exc)
        return report
    report.timings.update(built.timings)
    report.notes.extend(built.notes)
    start = time.monotonic()
    with tempfile.NamedTemporaryFile(prefix="xsbuild-patched-xen-syms-") as f:
        f.write(built.xen_syms)
        f.flush()
        patched = LinkedImage(f.name)
    report.notes.append(f"make rebuilt {len(built.rebuilt_objects)} object(s): "
                        + ", ".join(str(o.relative_to(built.copy / 'xen'))
                                    for o in built.rebuilt_objects[:20]))
    prove_images(payload, patched, orig, built.functions, report)
    report.timings["compare"] = round(time.monotonic() - start, 3)
    return report


def _base_tree(srcdir: Path, jobs: int, progress: Callable[[str], None]) -> Path:
    from xsbuild.build import find_top

    top = find_top(srcdir)
    if (top / "xen" / "xen-syms").is_file() and (top / "xen" / ".config").is_file():
        return top
    from xsbuild.debian import cached_base_build

    return cached_base_build(top, jobs=jobs, progress=progress)


