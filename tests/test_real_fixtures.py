"""The public projects' own files (tests/fixtures/real/, origins in each ORIGIN.md), dropped
unchanged into one workspace with no configuration: every format is recognised by its content,
comes out as evidence with prompt and response, and what carries quality signals reaches the
exports. The counts are pinned per format: records in → evidence / joined / quarantined."""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict

import orjson
import pytest

from conftest import FIXTURES
from refinery.config import load_config
from refinery.runs import run_all
from refinery.workspace import Workspace

REAL = FIXTURES / "real"
NOT_DATA = (".md", ".py.txt")

#: format folder → the importer that must claim its files (None: not a format refinery reads)
IMPORTERS = {
    "anthropic_messages": {"anthropic_messages"}, "inspect_ai": {"inspect_ai"}, "langfuse": {"langfuse"},
    "langsmith": {"langsmith"}, "openai_batch": {"openai_batch"}, "openai_chat_log": {"openai_chat", None},
    "openai_finetune": {"openai_finetune"}, "otel_genai": {"otel_genai"}, "promptfoo": {"promptfoo"},
    "hf_datasets": {"alpaca", "sharegpt", "openai_finetune", "trl_pairs"},
}
#: format → (records in, evidence, joined, quarantined by reason), with no configuration
COUNTS = {
    "anthropic_messages": (9, 9, 0, {}),
    "hf_datasets": (109, 119, 0, {}),  # 10 preference rows make two evidence records each
    "inspect_ai": (5, 5, 0, {}),
    "langfuse": (10, 3, 7, {}),
    "langsmith": (10, 3, 7, {}),
    "openai_batch": (17, 2, 2, {"blank_line": 1, "unmatched_join": 12}),  # most inputs have no output file
    "openai_chat_log": (7, 5, 0, {"unsupported_container": 3}),  # the YAML cassettes; their JSONL log reads
    "openai_finetune": (15, 14, 0, {"missing_field": 1}),  # the cookbook's toy file has a row without a user turn
    "otel_genai": (5, 3, 1, {"no_model_call": 1}),  # the spec's example trace holds no model call
    "promptfoo": (4, 4, 0, {}),
}


def _workspace(root, toml: str = "") -> Workspace:
    for d in sorted(p for p in REAL.iterdir() if p.is_dir()):
        for p in sorted(d.iterdir()):
            if not p.name.endswith(NOT_DATA):
                (root / "data" / "_kb" / d.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(p, root / "data" / "_kb" / d.name / p.name)
    if toml:
        (root / "refinery.toml").write_text(toml)
    return Workspace.at(root)


def _fmt(path: str) -> str:
    return path.removeprefix("data/_kb/").split("/", 1)[0]


def _rows(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def unconfigured(tmp_path_factory):
    ws = _workspace(tmp_path_factory.mktemp("real"))
    outcome = run_all(ws, load_config(ws.root))
    return ws, outcome


def test_every_format_is_claimed_by_its_importer_from_content(unconfigured):
    _, outcome = unconfigured
    claimed = defaultdict(set)
    for f in outcome.materialize.files:
        claimed[_fmt(f.source_file)].add(f.transform)
        assert f.file_error is None and f.transform_errors == 0, f.source_file
    assert dict(claimed) == IMPORTERS


def test_records_in_evidence_joined_and_quarantined_per_format(unconfigured):
    _, outcome = unconfigured
    got: dict[str, list] = defaultdict(lambda: [0, 0, 0, Counter()])
    for f in outcome.materialize.files:
        g = got[_fmt(f.source_file)]
        g[0] += f.rows_in
        g[1] += f.evidence
        g[2] += f.joined
        g[3].update(f.by_reason)
    assert {k: (a, b, c, dict(d)) for k, (a, b, c, d) in got.items()} == COUNTS


def test_evidence_has_prompt_and_answer_and_traces_back(unconfigured):
    from refinery.trace import trace

    ws, _ = unconfigured
    evidence = [r for p in sorted(ws.evidence.rglob("*.jsonl")) for r in _rows(p)]
    by_format = defaultdict(list)
    for r in evidence:
        by_format[_fmt(r["provenance"]["source_file"])].append(r)
    for fmt, rows in by_format.items():
        answered = [r for r in rows if r["prompt"] and (r["response"] or r["tool_calls"])]
        assert answered, fmt  # every format gives evidence with a prompt and an answer
        assert trace(ws, answered[0]["id"]).ok, fmt
    with_answer = [r for r in evidence if r["prompt"] and (r["response"] or r["tool_calls"])]
    # the rest are failed calls: HTTP errors (no answer), a tool call with no arguments
    assert len(with_answer) >= len(evidence) - 8


def test_formats_with_quality_signals_reach_the_exports(unconfigured):
    ws, _ = unconfigured
    exported = Counter(_fmt_of_source(r["source"]) for r in _rows(ws.exports / "sft" / "instruction_response.jsonl"))
    rag = Counter(_fmt_of_source(r["source"]) for r in _rows(ws.exports / "rag" / "playbooks.jsonl"))
    assert exported == {"promptfoo": 4, "inspect_ai": 2}  # graded and passed (two inspect samples are one answer)
    assert rag == {"promptfoo": 4, "inspect_ai": 2, "langfuse": 1}  # the agent run scored by two judges


def _fmt_of_source(source: str) -> str:
    return source.split(".", 1)[0]


def test_curated_datasets_reach_sft_and_preference(tmp_path):
    """Fine-tuning and preference datasets carry no scores: declared curated, they are approved
    by policy and reach the SFT and preference exports."""
    ws = _workspace(tmp_path, '''
[sources.datasets]
match = "hf_datasets/*"
trust = "curated"
recorded_at = "2025-06-01"
[sources.finetune]
match = "openai_finetune/*"
trust = "curated"
recorded_at = "2025-06-01"
''')
    run_all(ws, load_config(ws.root))
    sft = Counter(_fmt_of_source(r["source"]) for r in _rows(ws.exports / "sft" / "instruction_response.jsonl"))
    pairs = _rows(ws.exports / "preference" / "chosen_rejected.jsonl")
    assert sft["hf_datasets"] > 50 and sft["openai_finetune"] >= 10
    assert len([p for p in pairs if "hf_datasets" in p["provenance"]["source_file"]]) >= 1
    scored = [r for p in sorted(ws.scored_runs.rglob("hf_datasets*.jsonl")) for r in _rows(p)]
    assert all("curated_source" in r["rules_fired"] for r in scored)
