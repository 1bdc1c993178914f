"""``xsbuild index``: ``payloads/index.json``, what the rollout side reads (schema xsbuild.index/1).

One entry per payload file ``payloads/TARGET/NAME.livepatch``: the payload name a host loads it
under (``xsbuild load`` names it after the file), the hypervisor build-id it is for, its own
build-id and ``.livepatch.depends``, the payload of the same target it stacks on, its SHA-256,
and the proof status the build job recorded in ``NAME.livepatch.build.json`` (or
``NAME.livepatch.proof.json``).  Entries are in apply order per target (a payload after the one
it stacks on); the index holds no times, so the same payloads give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from xsbuild.check import check_payload
from xsbuild.elf import write_atomic
from xsbuild.errors import UsageError

SCHEMA = "xsbuild.index/1"
PROOF_STATES = ("proven", "not-proven", "cannot-judge", "not-run")


def build_index(payload_dir: Path) -> dict[str, object]:
    files = sorted(payload_dir.glob("*/*.livepatch"))
    if not files:
        raise UsageError(f"{payload_dir}: no TARGET/NAME.livepatch files")
    entries = [_entry(payload_dir, f) for f in files]
    by_id = {(e["target"], e["build_id"]): e["name"] for e in entries}
    for e in entries:
        e["depends_on"] = by_id.get((e["target"], e["depends"]))
        if e["depends"] != e["xen_build_id"] and e["depends_on"] is None:
            raise UsageError(f"{payload_dir / str(e['file'])}: depends on build-id "
                             f"{e['depends']}, which is neither its hypervisor's nor that of "
                             f"another payload of {e['target']}")
    ordered = sorted(entries, key=lambda e: (e["target"], _depth(e, entries), e["name"]))
    return {"schema": SCHEMA, "payloads": ordered}


def _depth(entry: dict[str, object], entries: list[dict[str, object]]) -> int:
    by_name = {(e["target"], e["name"]): e for e in entries}
    depth, cur = 0, entry
    while cur["depends_on"] is not None and depth <= len(entries):
        cur = by_name[(cur["target"], cur["depends_on"])]
        depth += 1
    return depth


def _entry(payload_dir: Path, path: Path) -> dict[str, object]:
    data = path.read_bytes()
    report = check_payload(data)
    if report.info is None or not report.ok or not report.info.build_id:
        why = str(report.problems[0]) if report.problems else "no build-id"
        raise UsageError(f"{path}: not a payload Xen would accept ({why})")
    info = report.info
    return {"name": path.name.removesuffix(".livepatch"), "target": path.parent.name,
            "file": path.relative_to(payload_dir).as_posix(),
            "xen_build_id": info.xen_depends.hex(), "build_id": info.build_id.hex(),
            "depends": info.depends.hex(), "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data), "proof": proof_status(path)}


def proof_status(payload: Path) -> str:
    """What the build job's ``--prove`` found, from the files it left next to the payload."""
    for suffix, key in ((".build.json", "proof"), (".proof.json", None)):
        side = payload.with_name(payload.name + suffix)
        if not side.is_file():
            continue
        try:
            doc = json.loads(side.read_text())
        except (ValueError, UnicodeDecodeError):
            raise UsageError(f"{side}: not JSON") from None
        proof = doc.get(key) if key else doc
        if isinstance(proof, dict):
            proof = proof.get("verdict")
        if proof in PROOF_STATES:
            return str(proof)
    return "not-run"


def write_index(index: dict[str, object], output: Path) -> None:
    write_atomic(output, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
