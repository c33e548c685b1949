"""The record contracts: one pydantic model per record type, each with a `schema_version`.

These models are the source of truth for `schemas/*.json` (see `refinery.schemas`). The hot
paths build plain dicts in the same field order and validate at the boundaries (tests,
acceptance, audit), so that a million rows do not pay a pydantic round-trip each.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from refinery.reasons import Reason

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Timestamp = Annotated[
    str,
    Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$",
          description="UTC, ISO 8601, always ending in Z; refinery writes six fractional digits "
                      "(fixed width: sorts as text, and datasets/pyarrow read it back as a string)"),
]
Category = Literal["accepted", "partially_accepted", "rejected", "needs_human_review"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordRef(Strict):
    """Another source record merged into an evidence record (a join)."""

    source_file: str
    line_offset: int = Field(ge=0)
    record: str | None = None
    sig_hash: Sha256


class Provenance(Strict):
    """Where a row came from: one record of one file, and the hash that pins its content.

    `record`, `part` and `joined` are written only when they apply (absent reads as null / [])."""

    source_file: str = Field(description="path relative to the workspace root")
    line_offset: int | None = Field(
        ge=0, description="0-based line in source_file — for a record inside a JSON document or archive, "
                          "its 0-based index in reading order (`record` pins it); null only for a whole-file "
                          "refusal")
    record: str | None = Field(
        default=None, description="where the record sits when it is not a whole line: '$.samples[3]' in a "
                                  "document, 'line 4 $.resourceSpans[0]...' in a JSONL line, "
                                  "'samples/3_epoch_1.json' in an archive")
    part: str | None = Field(
        default=None, description="which answer of a record that made several evidence records "
                                  "(e.g. 'chosen' / 'rejected' of a preference row)")
    sig_hash: Sha256 | None = Field(
        description="sha256 of the canonical JSON of the record (of the raw bytes when the line "
                    "does not parse); null only for a whole-file refusal")
    recorded_at: Timestamp | None = Field(description="when the row was recorded, if known")
    joined: list[RecordRef] = Field(
        default_factory=list, description="other source records merged into this one (a Batch request, a "
                                          "trace and its scores, a run's update, ...)")


# --- evidence -----------------------------------------------------------------------------

ToolCallProblem = Literal[
    "tool_key_instead_of_name", "missing_name", "arguments_not_json", "arguments_not_object",
    "not_an_object",
]


class ToolCall(Strict):
    id: str | None = None
    name: str | None = Field(description="the function called; null when the call is malformed")
    arguments: Any = Field(default=None, description="an object when well-formed")
    problem: ToolCallProblem | None = Field(
        default=None, description="why the call is malformed, as seen in the source row")


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class NamedScore(Strict):
    """One quality signal as the source named it, with how it was read."""

    name: str
    value: float | str | bool | None = Field(description="as the source gave it")
    scale: list[float] | None = Field(description="[min, max] the value was read on; null: 0..1, a grade or a bool")
    higher_is_better: bool = Field(description="false for scores such as toxicity")
    normalized: float | None = Field(description="0..1, 1 = best; null when the value could not be read")
    by: Literal["human", "automated"] | None = Field(description="who gave it, when the source says")
    used: bool = Field(description="counted into eval_score / human_rating ([signals.<name>] use = false: not)")


class Signals(Strict):
    """Outcome signals a scorer can use. Null means "the source said nothing"."""

    eval_score: float | None = Field(default=None, description="0..1")
    expected: str | None = None
    approved: bool | None = None
    approver: str | None = None
    human_rating: float | None = Field(default=None, description="normalised to 0..1")
    verdict: Literal["pass", "fail", "flag"] | None = None
    error: str | None = None
    exit_status: int | None = None
    tool_call_count: int | None = None
    stop_reason: str | None = None
    safety_flags: list[str] = Field(default_factory=list)
    scores: list[NamedScore] = Field(default_factory=list, description="every named score the source carried")
    preference: Literal["chosen", "rejected"] | None = Field(
        default=None, description="a preference dataset's verdict on this answer against its pair")
    trust: Literal["curated"] | None = Field(
        default=None, description="the source is declared curated in refinery.toml ([sources.<name>] trust)")


class EvidenceRecord(Strict):
    """One usable source record, in one shape whatever stream it came from."""

    schema_version: Literal[2] = 2
    id: str = Field(description="ev-<16 hex>: stable for the same source stream and row content")
    source: str = Field(description="the source stream: the file's path under data/_kb without extension")
    kind: str = Field(description="what the row is: run, eval, transcript, gateway_call, ...")
    task_id: str | None = None
    task_name: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    response: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    model: str | None = None
    provider: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    signals: Signals
    recorded_at: Timestamp
    recorded_at_from: str = Field(
        description="where recorded_at came from: 'record' or 'record:<field>', 'document:<field>', "
                    "'parent:<field>', 'partner:<field>', or the configured fallback")
    provenance: Provenance


# --- scoring and exports ------------------------------------------------------------------


class ScoredRun(Strict):
    schema_version: Literal[1] = 1
    id: str = Field(description="the evidence id it scores")
    source: str
    kind: str
    task_key: str = Field(description="tk-<16 hex> of the normalised prompt: groups answers to the same task")
    task_id: str | None = None
    task_name: str | None = None
    category: Category
    score: float
    rules_fired: list[str]
    policy_version: str
    policy_hash: Sha256
    recorded_at: Timestamp
    provenance: Provenance = Field(description="the evidence line this run scores")


class RagSample(Strict):
    schema_version: Literal[1] = 1
    id: str
    task_key: str
    task_name: str | None = None
    prompt: str
    response: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    category: Category
    score: float
    source: str
    provenance: Provenance = Field(description="the scored-run line this row comes from")


class SftSample(Strict):
    schema_version: Literal[1] = 1
    id: str
    instruction: str
    input: str = ""
    messages: list[Message] | None = None
    response: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    quality_score: Literal["accepted", "partially_accepted"] = Field(
        description="rejected and needs_human_review are not representable here, by design")
    score: float
    source: str
    provenance: Provenance


class PreferencePair(Strict):
    schema_version: Literal[2] = 2
    id: str
    task_key: str
    prompt: str
    system: str | None = Field(description="the chosen answer's system message, when its conversation had one")
    chosen: str = Field(description="the chosen answer as one text: its tool calls as JSON lines, then its text")
    rejected: str
    chosen_reply: list[Message] = Field(
        description="the chosen answer as the conversation after the prompt: its tool calls, their results and "
                    "its text (one assistant message when the source had no conversation); for the "
                    "conversational formats")
    rejected_reply: list[Message]
    chosen_id: str
    rejected_id: str
    chosen_score: float
    rejected_score: float
    provenance: Provenance = Field(description="the chosen answer's scored-run line")
    rejected_provenance: Provenance


class QuarantineRecord(Strict):
    """A refused row: why, at which stage, and exactly where it came from."""

    schema_version: Literal[3] = 3
    id: str = Field(description="q-<16 hex>: stable for the same stage, file and line (and reason, for the "
                                "exports' shared records)")
    stage: str = Field(description="materialize, score, export-<name> (refused while merging that export), or "
                                   "export (refused while reading the row, for every export in `exports`)")
    exports: list[str] | None = Field(
        description="the exports that refused the row for this reason; null for materialize and score")
    source: str
    reason: Reason
    detail: str
    raw_length: int | None = Field(
        ge=0, description="bytes in the row as the reader held them (a line without its terminator; a line over "
                          "the size limit: only its first bytes; a CSV record: re-joined as one line; a record "
                          "inside a document: its compact JSON); null when the record keeps nothing of the row (a "
                          "whole file, an export's refusal)")
    raw_sha256: Sha256 | None = Field(
        description="SHA-256 of those bytes (for a line that does not parse, equal to provenance.sig_hash)")
    preview: str | None = Field(
        description="the row's start as text (invalid bytes backslash-escaped), every secret and personal datum "
                    "replaced by [REDACTED:<kind>], at most materialize.quarantine_preview_chars characters, a "
                    "token cut by the end dropped and '…' appended when cut. Never the raw row: the source "
                    "file holds that")
    provenance: Provenance


# --- receipts, runs, drift, baselines -----------------------------------------------------


class FileDigest(Strict):
    path: str = Field(description="relative to the workspace root")
    sha256: Sha256
    rows: int = Field(ge=0, description="JSONL lines (a source file: the rows materialize read; a JSON file: 1)")


class StageTimings(Strict):
    started_at: Timestamp
    finished_at: Timestamp
    seconds: float = Field(ge=0)


class StageReceipt(Strict):
    """What one stage of one run read, wrote and counted. `receipt_hash` covers everything
    but `run_id`, `reused_from` and `timings`, so the same inputs, config and code give the
    same hash in every run. Schema 2 adds `fingerprints` (not hashed either)."""

    schema_version: Literal[1, 2] = 2
    run_id: str
    stage: str
    code_version: str
    config_hash: Sha256 = Field(description="sha256 of the settings this stage reads (worker counts excluded)")
    policy_hash: Sha256 | None = None
    inputs: list[FileDigest]
    outputs: list[FileDigest]
    counts: dict[str, int] = Field(description="rows_in, rows_out, quarantined, ...")
    by_category: dict[str, int] = Field(default_factory=dict)
    by_reason: dict[str, int] = Field(default_factory=dict)
    by_source: dict[str, dict[str, int]] = Field(default_factory=dict, description="the counts per source stream")
    reused_from: str | None = Field(default=None, description="the run whose outputs this stage reused, if any")
    timings: StageTimings
    fingerprints: dict[str, Annotated[list[int], Field(min_length=3, max_length=3)]] = Field(
        default_factory=dict,
        description="(size, mtime_ns, inode) of each input and output when this run hashed it: the next run "
                    "trusts the recorded sha256 of a file that still has all three, and reads the rest "
                    "(audit-full re-hashes everything)")
    receipt_hash: Sha256 = Field(description="sha256 of the canonical receipt without timings, run_id, "
                                             "reused_from and fingerprints")


class StageRef(Strict):
    stage: str
    receipt_hash: Sha256
    reused: bool = False


class RunSummary(Strict):
    """One run-all: its status, its stages' receipt hashes and its totals. `summary_hash` covers
    everything but the timings (`started_at`, `finished_at`), and `drift_hash` binds the run's
    drift.json to it, so an edited summary or drift report is caught (`audit-full`, `receipts`)."""

    schema_version: Literal[2] = 2
    run_id: str
    status: Literal["complete", "incomplete", "failed"] = Field(
        description="complete: every stage ran and the outputs were published; incomplete: running, or "
                    "killed; failed: stopped by an error, nothing published")
    exit_code: int | None = Field(description="the exit code run-all gave; null while incomplete")
    error: str | None = None
    code_version: str
    config_hash: Sha256
    include_partial: bool | None = Field(default=None, description="run-all's --include-partial flag, if given")
    stages: list[StageRef]
    totals: dict[str, int]
    overall_hash: Sha256 | None = Field(description="sha256 over the stages' receipt hashes; null unless complete")
    drift_hash: Sha256 | None = Field(description="the drift_hash of this run's drift.json; null unless complete")
    started_at: Timestamp
    finished_at: Timestamp | None = None
    summary_hash: Sha256 = Field(description="sha256 of the canonical summary without started_at, finished_at "
                                             "and summary_hash")


class DriftMetric(Strict):
    name: str
    value: float
    previous: float | None
    change_pct: float | None
    severity: Literal["ok", "warn", "alert"]


class DriftReport(Strict):
    schema_version: Literal[2] = 2
    run_id: str
    previous_run_id: str | None
    severity: Literal["ok", "warn", "alert"]
    metrics: list[DriftMetric]
    note: str | None = None
    warn_pct: float | None = Field(default=None, description="drift.warn_pct the severities were judged by")
    alert_pct: float | None = Field(default=None, description="drift.alert_pct the severities were judged by")
    drift_hash: Sha256 = Field(description="sha256 of the canonical report without drift_hash")


class BaselineRow(Strict):
    """One passing audit in data/_kb/audit_baselines.jsonl. Rows are hashed as written, so rows
    of schema version 1 (without `reanchored`) keep their hashes."""

    schema_version: Literal[1, 2] = 2
    seq: int = Field(ge=0)
    recorded_at: Timestamp
    run_id: str | None = None
    metrics: dict[str, float]
    reanchored: str | None = Field(
        default=None, description="set on the row of an `audit-full --reanchor`: why the ledger had to be "
                                  "re-anchored (its head was missing or damaged) — the rows before it were "
                                  "accepted as they stood")
    prev_hash: Sha256 | None = Field(description="row_hash of the previous row; null for the first")
    row_hash: Sha256 = Field(description="sha256 of this row's canonical JSON without row_hash")


class LedgerHead(Strict):
    """reports/distillation/audit-ledger-head.json: the ledger's last row as the last audit left
    it, kept outside the ledger so rows cut off its end are caught."""

    schema_version: Literal[1] = 1
    seq: int = Field(ge=0)
    row_hash: Sha256


class PublishedRun(Strict):
    """reports/distillation/published.json: the run whose outputs are in data/evidence,
    data/scored-runs and exports/ — moved into place by the same publish as those outputs."""

    schema_version: Literal[1] = 1
    run_id: str
    summary_hash: Sha256 = Field(description="that run's summary_hash")


class RetrievedPlaybook(Strict):
    id: str = Field(description="the RAG export row given to the model")
    score: float = Field(description="its BM25 score for the task")


class Escalation(Strict):
    endpoint: str = Field(description="base_url of the OpenAI-compatible endpoint")
    model: str
    ok: bool
    error: str | None = Field(description="why the endpoint gave no usable answer (HTTP status, timeout, ...)")
    latency_ms: float | None


class ReplayTrace(Strict):
    """One `refinery replay`, appended to data/_kb/replays.jsonl (a source stream: the `replays`
    transform makes it evidence for the next run)."""

    schema_version: Literal[1] = 1
    replay_id: str
    ts: str = Field(description="when the replay started, UTC ISO 8601")
    task: str
    mode: Literal["retrieval", "no_retrieval"]
    rag_export_sha256: Sha256 | None = Field(description="the RAG export retrieved from; null without retrieval")
    retrieved: list[RetrievedPlaybook]
    model: str = Field(description="the base model folder the local answer came from")
    adapter_id: str | None = Field(description="the promoted adapter on top of it; null for the base alone")
    local_answer: str
    local_check: Literal["empty", "malformed_tool_call", "refusal", "over_length_cap"] | None = Field(
        description="why the local answer failed its check; null when it passed")
    local_finish_reason: str | None
    local_latency_ms: float
    escalated: bool = Field(description="the answer served is the endpoint's")
    escalation: Escalation | None = Field(description="null when escalation was not tried")
    answer: str = Field(description="the answer served")
    tool_calls: list[dict[str, Any]] = Field(description='the tool calls in the answer, as {"name", "arguments"}')
    check: Literal["empty", "malformed_tool_call", "refusal", "over_length_cap"] | None
    latency_ms: float = Field(description="local generation plus escalation")


#: Every record type with a JSON Schema file in schemas/, by file stem.
SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "provenance": Provenance,
    "evidence_record": EvidenceRecord,
    "scored_run": ScoredRun,
    "rag_sample": RagSample,
    "sft_sample": SftSample,
    "preference_pair": PreferencePair,
    "quarantine_record": QuarantineRecord,
    "stage_receipt": StageReceipt,
    "run_summary": RunSummary,
    "drift_report": DriftReport,
    "baseline_row": BaselineRow,
    "ledger_head": LedgerHead,
    "published_run": PublishedRun,
    "replay_trace": ReplayTrace,
}
