"""The one closed list of reasons a row can be refused, at any stage.

Every quarantined row carries exactly one of these codes, and every receipt counts rows
per code. Adding a reason means adding it here (and documenting it), never inventing a
string at the call site.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # --- reading a source line -------------------------------------------------------
    INVALID_UTF8 = "invalid_utf8"
    """The line is not valid UTF-8."""
    INVALID_JSON = "invalid_json"
    """The line is not parseable JSON (truncated, trailing garbage, ...)."""
    NOT_AN_OBJECT = "not_an_object"
    """The line parses, but to a JSON array/string/number instead of an object."""
    BLANK_LINE = "blank_line"
    """An empty or whitespace-only line inside the file."""
    LINE_TOO_LONG = "line_too_long"
    """The line is longer than `materialize.max_line_bytes`."""
    CSV_MALFORMED = "csv_malformed"
    """A CSV record whose column count does not match the header."""
    UNSUPPORTED_CONTAINER = "unsupported_container"
    """The file is not a container refinery reads (JSONL/NDJSON, CSV, JSON, an inspect .eval
    archive, or gzip of those): the whole file is refused by name."""
    DAMAGED_CONTAINER = "damaged_container"
    """A gzip stream that ends early or is corrupt, or an archive that cannot be opened; what was
    read before the damage is kept."""
    DOCUMENT_TOO_LARGE = "document_too_large"
    """A whole JSON document (or archive member) over `materialize.max_document_bytes`."""
    RECORD_PATH_MISSING = "record_path_missing"
    """The record path configured for a document matches nothing in it."""
    AMBIGUOUS_SOURCE = "ambiguous_source"
    """Two importers recognise the file's content; `[sources]` in refinery.toml must choose."""
    # --- transforming a row into evidence ------------------------------------------
    MISSING_FIELD = "missing_field"
    """A field the transform needs is absent or empty."""
    WRONG_TYPE = "wrong_type"
    """A field has the wrong JSON type (a string where a number is expected, ...)."""
    BAD_TIMESTAMP = "bad_timestamp"
    """The row's timestamp is missing or cannot be parsed, so it cannot be dated."""
    DUPLICATE_ROW = "duplicate_row"
    """An exact duplicate (same canonical JSON) of an earlier row in the same file."""
    UNKNOWN_SOURCE = "unknown_source"
    """No transform or declarative mapping claims the source file."""
    UNREADABLE_FILE = "unreadable_file"
    """The source file could not be opened or read (permissions, I/O error)."""
    TRANSFORM_ERROR = "transform_error"
    """The transform crashed on the row: a bug in the transform, reported and counted."""
    UNMATCHED_JOIN = "unmatched_join"
    """A record that belongs with another (a Batch request and its response, a score and its
    trace, ...) whose partner is in no source file, and that cannot stand on its own."""
    CONFLICTING_DECISIONS = "conflicting_decisions"
    """Two decisions in the human_reviews stream on the same row, as it read then, that differ
    (accept and reject, two corrections): neither is taken, and the row stays to review."""
    EDITED_DECISION = "edited_decision"
    """A human_reviews line whose copy of the reviewed text no longer hashes to its
    answer_sha256: it was edited after `review import`, so it would approve text nobody read."""
    NO_MODEL_CALL = "no_model_call"
    """A trace (or run tree) that holds no LLM call in any file — only HTTP, tool or chain steps:
    nothing to learn from, unless the file holding its LLM call is missing."""
    FILTERED_OUT = "filtered_out"
    """A declarative mapping's row filter leaves the record out (e.g. only GENERATION rows)."""
    # --- scoring ---------------------------------------------------------------------
    INVALID_EVIDENCE = "invalid_evidence"
    """An evidence line that does not parse or lacks a field the scorer needs (edited by hand?)."""
    # --- exports ---------------------------------------------------------------------
    CATEGORY_EXCLUDED = "category_excluded"
    """The row's category is not admitted by this export (e.g. rejected rows never reach SFT)."""
    MISSING_TEXT = "missing_text"
    """The row has no prompt, or no answer text or tool call, for this export to use."""
    SECRET_DETECTED = "secret_detected"
    """An API key, bearer token, private key block or password in the row's text."""
    PII_DETECTED = "pii_detected"
    """An email address, a phone number or a note marked private in the row's text."""
    DUPLICATE_ANSWER = "duplicate_answer"
    """The same answer (normalised) to the same task was already exported."""
    NEAR_DUPLICATE = "near_duplicate"
    """The prompt and answer are nearly those of a row kept in the export (estimated Jaccard similarity
    of their word 3-grams at or over export.near_duplicate_threshold); the detail names that row."""
    NO_PAIR = "no_pair"
    """No answer to the same task to pair with (a single answer, or only one side)."""
    PAIR_LIMIT = "pair_limit"
    """The task already has export.max_pairs_per_task pairs without this row."""
    SAME_TOOL_CALL = "same_tool_call"
    """A rejected answer that is only a tool call the chosen answer, which makes no call, writes
    out in its text: as a pair it would teach a model not to call the tool."""


REASON_HELP: dict[Reason, str] = {
    Reason.INVALID_UTF8: "re-encode the file as UTF-8 or fix the producer",
    Reason.INVALID_JSON: "the line is not JSON; check the producer for truncated writes",
    Reason.NOT_AN_OBJECT: "each JSONL line must be one JSON object",
    Reason.BLANK_LINE: "remove blank lines from the file",
    Reason.LINE_TOO_LONG: "raise materialize.max_line_bytes in refinery.toml if the row is legitimate",
    Reason.CSV_MALFORMED: "the record has a different number of columns than the header",
    Reason.UNSUPPORTED_CONTAINER: "convert the file to JSONL/CSV/JSON, or list it in materialize.ignore",
    Reason.DAMAGED_CONTAINER: "re-export or re-download the file; the records before the damage were kept",
    Reason.DOCUMENT_TOO_LARGE: "convert the document to JSONL, or raise materialize.max_document_bytes",
    Reason.RECORD_PATH_MISSING: "check record_path in the file's [sources.<name>] table",
    Reason.AMBIGUOUS_SOURCE: "name the importer in refinery.toml: [sources.<name>] match = ..., importer = ...",
    Reason.MISSING_FIELD: "add the field, or map it in refinery.toml",
    Reason.WRONG_TYPE: "the field has the wrong JSON type",
    Reason.BAD_TIMESTAMP: "timestamps must be ISO 8601 or epoch seconds/milliseconds",
    Reason.DUPLICATE_ROW: "an identical row appears earlier in the same file",
    Reason.UNKNOWN_SOURCE: "add a transform module in transforms/ or a [mappings.<name>] table in refinery.toml",
    Reason.UNREADABLE_FILE: "check the file's permissions",
    Reason.TRANSFORM_ERROR: "a bug in the transform module named in the detail; fix it and re-run",
    Reason.UNMATCHED_JOIN: "add the file holding its partner to data/_kb/ (e.g. the Batch input next to the output)",
    Reason.CONFLICTING_DECISIONS: "keep one decision per row in data/_kb/human_reviews.jsonl (delete the other "
                                  "line), then run run-all again",
    Reason.EDITED_DECISION: "take the decision in again with `refinery review import`; never edit the reviewed "
                            "text in data/_kb/human_reviews.jsonl",
    Reason.NO_MODEL_CALL: "expected for traces of plain HTTP/tool spans; if their LLM calls were exported to "
                          "another file, add it to data/_kb/",
    Reason.FILTERED_OUT: "expected: the mapping's filter keeps only the rows it names",
    Reason.INVALID_EVIDENCE: "evidence is written by materialize only; re-run `refinery materialize`",
    Reason.CATEGORY_EXCLUDED: "expected: the export only takes the categories it is configured for",
    Reason.MISSING_TEXT: "the source row has no prompt or no answer; check the transform's mapping",
    Reason.SECRET_DETECTED: "remove the secret at the source, or set export.sensitive = \"redact\"",
    Reason.PII_DETECTED: "redact at the source, set export.sensitive = \"redact\", or allow the kind "
                         "in export.allow_sensitive",
    Reason.DUPLICATE_ANSWER: "expected: one copy of each answer per task is kept",
    Reason.NEAR_DUPLICATE: "expected: one of each group of near-identical rows is kept; raise "
                           "export.near_duplicate_threshold (or set export.near_duplicates = false) to keep more",
    Reason.NO_PAIR: "expected for tasks answered once, or only well / only badly",
    Reason.PAIR_LIMIT: "raise export.max_pairs_per_task to use more answers of the same task",
    Reason.SAME_TOOL_CALL: "expected: a run that stopped after a right tool call is not a worse answer than the "
                           "one that went on",
}
