"""Drift: how a run's metrics moved against the most recent prior complete run.

    reports/distillation/<run_id>/drift.json   (DriftReport)

Each metric gets its value, the previous value, the change in % and a severity: `alert` at
a change of at least `drift.alert_pct`, `warn` at `drift.warn_pct`, else `ok` (refinery.toml
[drift]; 10 % and 25 % by default, recorded in the report). A metric that was 0 and is not any
more has no % change and is an alert; a metric the previous run did not have counts as 0 there.
`drift_hash` covers the whole report but itself, and the run's summary records it, so an edited
drift.json is caught.

`audit-full` tracks drift differently, on purpose: against the last passing audit (the baseline
ledger, possibly many runs back), with one fixed threshold (refinery.audit.DRIFT_WARN_PCT, 20 %)
and a `warn` flag only — see `thresholds_note`.
"""

from __future__ import annotations

from typing import Any

from refinery.canonical import sig_hash
from refinery.config import DriftConfig
from refinery.receipts import EXPORT_STAGES

SEVERITY_ORDER = {"ok": 0, "warn": 1, "alert": 2}


def metrics(receipts: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The tracked metrics of a run, from its receipts: record counts per stage, the category
    mix, export sizes, and quarantine totals by stage and reason."""
    out: dict[str, float] = {}
    if m := receipts.get("materialize"):
        c = m["counts"]
        out.update({"source_rows": c["rows_in"], "evidence_rows": c["rows_out"],
                    "quarantined.materialize": c["quarantined"]})
    if s := receipts.get("score"):
        out["scored_rows"] = s["counts"]["rows_out"]
        out["quarantined.score"] = s["counts"]["quarantined"]
        total = s["counts"]["rows_out"]
        for cat, n in s["by_category"].items():
            out[f"category.{cat}"] = n
            out[f"category_share_pct.{cat}"] = round(100 * n / total, 2) if total else 0.0
    for stage in EXPORT_STAGES:
        if e := receipts.get(stage):
            out[f"{stage}.written"] = e["counts"]["written"]
            out[f"quarantined.{stage}"] = e["counts"]["quarantined"]
    for stage, r in receipts.items():
        for reason, n in r["by_reason"].items():
            out[f"reason.{stage}.{reason}"] = n
    return out


def thresholds_note(cfg: DriftConfig) -> str:
    """How run drift and audit drift differ, in one sentence for the outputs of both."""
    from refinery.audit import DRIFT_WARN_PCT

    return (f"audit-full compares with the last passing audit and flags a move over {DRIFT_WARN_PCT:g} %; "
            f"run-all's drift compares each run with the previous one, warning at {cfg.warn_pct:g} % and alerting "
            f"at {cfg.alert_pct:g} % (drift.warn_pct, drift.alert_pct)")


def severity(change_pct: float | None, value: float, previous: float | None, cfg: DriftConfig) -> str:
    if previous is None:
        return "ok"
    if change_pct is None:  # from 0 to something
        return "alert" if value else "ok"
    size = abs(change_pct)
    return "alert" if size >= cfg.alert_pct else "warn" if size >= cfg.warn_pct else "ok"


def compare(run_id: str, current: dict[str, float], previous_run_id: str | None,
            previous: dict[str, float] | None, cfg: DriftConfig) -> dict[str, Any]:
    """A DriftReport (as a dict) of `current` against `previous` (None: this is the first run)."""
    from refinery.models import DriftReport

    rows = []
    names = sorted(current.keys() | (previous or {}).keys())
    for name in names:
        value = current.get(name, 0)
        prev = None if previous is None else previous.get(name, 0)
        if prev is None:
            change = None
        elif prev == 0:
            change = 0.0 if value == 0 else None
        else:
            change = round(100 * (value - prev) / abs(prev), 2)
        rows.append({"name": name, "value": value, "previous": prev, "change_pct": change,
                     "severity": severity(change, value, prev, cfg)})
    worst = max((r["severity"] for r in rows), key=SEVERITY_ORDER.__getitem__, default="ok")
    note = None if previous is not None else "first run: no prior complete run to compare with"
    doc = {"run_id": run_id, "previous_run_id": previous_run_id, "severity": worst, "metrics": rows, "note": note,
           "warn_pct": cfg.warn_pct, "alert_pct": cfg.alert_pct, "drift_hash": "0" * 64}
    doc = DriftReport.model_validate(doc).model_dump(mode="json")
    doc["drift_hash"] = drift_hash(doc)
    return doc


def drift_hash(report: dict[str, Any]) -> str:
    return sig_hash({k: v for k, v in report.items() if k != "drift_hash"})
