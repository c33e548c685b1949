"""The acceptance gate: the whole pipeline on a hand-made fixture, checked against numbered invariants.

    tests/fixtures/acceptance/kb/           the source streams (every family, every defect kind,
                                            every scorer rule)
    tests/fixtures/acceptance/refinery.toml its config (a mapping, a small max_line_bytes, ...)
    tests/fixtures/acceptance/transforms/   a workspace transform with a planted bug
    tests/fixtures/acceptance/expected.json the counts the run must give, pinned

The fixture is copied into two temporary workspaces and `run-all --force` runs in each, in
two processes with different hash seeds. The first workspace is then checked against every
on-disk invariant (refinery.invariants) and the gate's own: the two runs are identical
(hashes and bytes), the counts are the pinned ones, and the fixture still covers every
family, rule and defect kind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from refinery import invariants as inv
from refinery.config import load_config
from refinery.errors import RefineryError
from refinery.invariants import Check, Context
from refinery.reasons import Reason
from refinery.workspace import Workspace

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "acceptance"
EXPECTED = "expected.json"
#: Defects a fixture of source files cannot plant: an unreadable file (the gate may run as
#: root, for whom permissions do not apply) and evidence edited by hand (score's only reason).
NOT_PLANTABLE = {Reason.UNREADABLE_FILE, Reason.INVALID_EVIDENCE}
MATERIALIZE_REASONS = [
    Reason.INVALID_UTF8, Reason.INVALID_JSON, Reason.NOT_AN_OBJECT, Reason.BLANK_LINE, Reason.LINE_TOO_LONG,
    Reason.CSV_MALFORMED, Reason.MISSING_FIELD, Reason.WRONG_TYPE, Reason.BAD_TIMESTAMP, Reason.DUPLICATE_ROW,
    Reason.UNKNOWN_SOURCE, Reason.UNREADABLE_FILE, Reason.TRANSFORM_ERROR, Reason.UNMATCHED_JOIN,
    Reason.CONFLICTING_DECISIONS, Reason.EDITED_DECISION,
    Reason.UNSUPPORTED_CONTAINER, Reason.DAMAGED_CONTAINER, Reason.DOCUMENT_TOO_LARGE, Reason.RECORD_PATH_MISSING,
    Reason.AMBIGUOUS_SOURCE, Reason.NO_MODEL_CALL, Reason.FILTERED_OUT]
EXPORT_REASONS = [Reason.CATEGORY_EXCLUDED, Reason.MISSING_TEXT, Reason.SECRET_DETECTED, Reason.PII_DETECTED,
                  Reason.DUPLICATE_ANSWER, Reason.NEAR_DUPLICATE, Reason.NO_PAIR, Reason.PAIR_LIMIT,
                  Reason.SAME_TOOL_CALL]


class FixtureError(RefineryError):
    """The acceptance fixture is missing or incomplete."""


def prepare(fixture: Path, dest: Path) -> Workspace:
    """A fresh workspace at `dest` holding the fixture's sources, config and transforms."""
    if not (fixture / "kb").is_dir():
        raise FixtureError(f"{fixture}/kb/ does not exist: not an acceptance fixture")
    shutil.copytree(fixture / "kb", dest / "data" / "_kb")
    if (fixture / "refinery.toml").is_file():
        shutil.copy(fixture / "refinery.toml", dest / "refinery.toml")
    if (fixture / "transforms").is_dir():
        shutil.copytree(fixture / "transforms", dest / "transforms",
                        ignore=shutil.ignore_patterns("__pycache__"))
    return Workspace.at(dest)


class GateContext(Context):
    def __init__(self, ws: Workspace, twin: Workspace, expected: dict[str, Any]):
        super().__init__(ws, load_config(ws.root))
        self.twin, self.expected = twin, expected
        self.twin_ctx = Context(twin, load_config(twin.root))


def _trees(ws: Workspace) -> dict[str, bytes]:
    out = {}
    for tree in inv.RECORDED_TREES:
        root = ws.root / tree
        if root.is_dir():
            out.update({ws.rel(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
    return out


def determinism(ctx: GateContext) -> list[str]:
    """Two runs on the same fixture, in two workspaces: the same receipt hashes, the same overall
    hash, byte-identical outputs."""
    a, b = ctx.receipts, ctx.twin_ctx.receipts
    problems = [f"{s}: receipt_hash {a[s]['receipt_hash'][:12]}… != {b.get(s, {}).get('receipt_hash', '-')[:12]}…"
                for s in a if a[s]["receipt_hash"] != b.get(s, {}).get("receipt_hash")]
    if (ctx.summary or {}).get("overall_hash") != (ctx.twin_ctx.summary or {}).get("overall_hash"):
        problems.append("the overall hashes differ")
    ta, tb = _trees(ctx.ws), _trees(ctx.twin)
    problems += [f"{p}: differs between the two runs" for p in sorted(ta.keys() | tb.keys()) if ta.get(p) != tb.get(p)]
    return problems


def _diff(what: str, got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    return [f"{what} {k}: {got.get(k, 0)}, expected {want.get(k, 0)}"
            for k in sorted(got.keys() | want.keys()) if got.get(k, 0) != want.get(k, 0)]


def expected_materialize(ctx: GateContext) -> list[str]:
    m, want = ctx.receipts.get("materialize", {}), ctx.expected["materialize"]
    return (_diff("materialize", m.get("counts", {}), want["counts"])
            + _diff("materialize quarantined as", m.get("by_reason", {}), want["by_reason"]))


def expected_categories(ctx: GateContext) -> list[str]:
    s, want = ctx.receipts.get("score", {}), ctx.expected["score"]
    return (_diff("score", s.get("counts", {}), want["counts"])
            + _diff("scored", s.get("by_category", {}), want["by_category"]))


def expected_exports(ctx: GateContext) -> list[str]:
    problems = []
    for stage, want in ctx.expected["exports"].items():
        r = ctx.receipts.get(stage, {})
        problems += _diff(stage, r.get("counts", {}), want["counts"])
        problems += _diff(f"{stage} quarantined as", r.get("by_reason", {}), want["by_reason"])
    return problems


def covers_every_family(ctx: GateContext) -> list[str]:
    from refinery.discovery import Registry
    from refinery.sources import list_sources

    registry = Registry.load(ctx.ws.root, ctx.cfg)
    files, _ = list_sources(ctx.ws, ctx.cfg.materialize.ignore)
    claimed = {c.name for s in files if (c := registry.claim(s)).transform is not None}
    return [f"no fixture file for the {t.spec.name} transform ({t.origin})"
            for t in registry.all() if t.spec.name not in claimed]


def covers_every_rule(ctx: GateContext) -> list[str]:
    from refinery.policy import RULES

    fired: Counter[str] = Counter()
    for rel in ctx.files("data/scored-runs"):
        for line in ctx.rows(rel):
            fired.update((line.obj or {}).get("rules_fired", []))
    return [f"no fixture row fires the scorer rule {rule}" for rule in RULES if not fired[rule]]


def covers_every_defect(ctx: GateContext) -> list[str]:
    seen = set(ctx.receipts.get("materialize", {}).get("by_reason", {}))
    for stage in inv.EXPORT_FILES:
        seen |= set(ctx.receipts.get(stage, {}).get("by_reason", {}))
    return [f"no fixture row is quarantined as {r.value}" for r in [*MATERIALIZE_REASONS, *EXPORT_REASONS]
            if r not in NOT_PLANTABLE and r.value not in seen]


GATE_ONLY = [
    ("determinism", "two runs on the fixture: identical receipt hashes, overall hash and bytes", determinism),
    ("expected_materialize", "materialize counts and quarantine reasons are the pinned ones", expected_materialize),
    ("expected_categories", "the count per category is the pinned one", expected_categories),
    ("expected_exports", "rows written and quarantine reasons per export are the pinned ones", expected_exports),
    ("covers_every_family", "the fixture feeds every transform (every stream family)", covers_every_family),
    ("covers_every_rule", "the fixture fires every scorer rule", covers_every_rule),
    ("covers_every_defect", "the fixture plants every defect kind (but an unreadable file)", covers_every_defect),
]


def expected_from(receipts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The expected.json content a run's receipts give (to pin a deliberately changed fixture)."""
    pick = {"materialize": ("counts", "by_reason"), "score": ("counts", "by_category")}
    out: dict[str, Any] = {s: {k: receipts[s][k] for k in keys} for s, keys in pick.items()}
    out["exports"] = {s: {"counts": receipts[s]["counts"], "by_reason": receipts[s]["by_reason"]}
                      for s in inv.EXPORT_FILES}
    return out


def check_workspaces(ws: Workspace, twin: Workspace, expected: dict[str, Any]) -> list[Check]:
    """Every invariant on `ws` (run twice, the other run in `twin`), numbered from 1."""
    ctx = GateContext(ws, twin, expected)
    checks = inv.run_checks(ctx, inv.INVARIANTS)
    return checks + inv.run_checks(ctx, GATE_ONLY, first_number=len(checks) + 1)


def run_gate(fixture: Path = FIXTURE, *, keep: Path | None = None, write_expected: bool = False) -> list[Check]:
    """Run the pipeline twice on `fixture` in temporary workspaces and check every invariant.
    `keep`: run there instead of a temporary folder (and leave the workspaces for a look).

    Each run is a separate `refinery run-all` process with its own hash seed, so output that
    depends on `hash()`, on set order or on process state shows up as a determinism failure."""
    from refinery.runs import run_all_in_subprocess

    expected_path = fixture / EXPECTED
    if not write_expected and not expected_path.is_file():
        raise FixtureError(f"{expected_path} is missing: the gate needs the pinned counts "
                           "(`refinery acceptance --write-expected` pins what the fixture gives now)")
    if keep is not None and keep.exists() and any(keep.iterdir()):
        raise FixtureError(f"--keep {keep}: the folder is not empty; give an empty or new one")
    base = Path(tempfile.mkdtemp(prefix="refinery-acceptance-")) if keep is None else keep
    try:
        wss = [prepare(fixture, base / name) for name in ("run-a", "run-b")]
        for seed, w in enumerate(wss, 1):
            run_all_in_subprocess(w.root, hash_seed=seed)
        if write_expected:
            from refinery.receipts import write_json

            write_json(expected_path, expected_from(Context(wss[0], load_config(wss[0].root)).receipts))
        expected = orjson.loads(expected_path.read_bytes())
        return check_workspaces(wss[0], wss[1], expected)
    finally:
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)
