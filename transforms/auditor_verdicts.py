"""Auditor verdicts (`auditor_verdicts*.jsonl`): an auditor's pass/fail/flag on one answer.

    {"audit_id", "audited_at", "auditor",
     "subject": {"task_id", "task_name", "prompt", "response", "model"},
     "verdict": "pass" | "fail" | "flag", "findings": [...], "safety_flags": [...]}
"""

from refinery.transform import (
    TransformSpec, new_evidence, new_signals, parse_timestamp, string_list, text, text_or_empty, wrong_type,
)

SPEC = TransformSpec(name="auditor_verdicts", patterns=("auditor_verdicts*.jsonl",), format="jsonl",
                     kind="audit_verdict", description="auditor verdicts with safety flags (JSONL)")

VERDICTS = {"pass", "fail", "flag"}


def transform(row, ctx):
    verdict = row.get("verdict")
    if verdict is not None and verdict not in VERDICTS:
        raise wrong_type("verdict", "one of pass, fail, flag", verdict)
    return new_evidence(
        SPEC.kind, recorded_at=parse_timestamp(row.get("audited_at"), "audited_at"),
        recorded_at_from="record:audited_at",
        task_id=text(row, "subject.task_id") or text(row, "audit_id"), task_name=text(row, "subject.task_name"),
        prompt=text(row, "subject.prompt", required=True), response=text_or_empty(row, "subject.response"),
        model=text(row, "subject.model"),
        signals=new_signals(verdict=verdict, approver=text(row, "auditor"),
                            safety_flags=string_list(row, "safety_flags")),
    )
