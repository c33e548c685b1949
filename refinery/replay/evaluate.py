"""`refinery replay-eval`: the held-out tasks replayed with and without retrieval (the A/B).

    <output_dir>/data/test.jsonl (from `train collect`) ──▶ <output_dir>/replay-eval/
        rows.jsonl    per task and mode: the answer, its scores, the playbooks, the latency
        report.json   per mode: answer match, grounding, format validity, latency
        report.md     the same as a table

Per task the playbooks are retrieved once and used by both modes: given to the model with
retrieval, only measured against without. A held-out task's own row is in the RAG export too
(accepted rows feed both exports), and so are other runs of the very same task; neither is ever
retrieved for it — the playbook from the same scored-run line, and every playbook with the
same task key (the same normalised prompt) — or retrieval would hand the model the reference
answer. What is measured is whether playbooks of *similar* tasks help.

Metrics, each 0..1 per task: answer_match and format_valid as in `train eval`; grounding = the
answer cites a retrieved playbook's id, or overlaps one of them (word F1 ≥ GROUNDING_F1 with its
answer or tool call). Replay-eval rows are an evaluation, not traces: they are not appended to
data/_kb/replays.jsonl.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import orjson

from refinery.answers import parse_tool_calls, word_f1
from refinery.config import Config
from refinery.jsonl import publishing, write_jsonl_atomic
from refinery.normalize import task_key
from refinery.receipts import write_json
from refinery.replay.prompt import build_messages
from refinery.replay.retrieval import Hit, RagIndex
from refinery.replay.session import Generator, answer_locally
from refinery.training.config import DistillConfig
from refinery.training.evaluate import EvalError, reference, score
from refinery.workspace import Workspace

MODES = ("retrieval", "no_retrieval")
GROUNDING_F1 = 0.5
OUT = "replay-eval"


def eval_tasks(ws: Workspace, dcfg: DistillConfig, limit: int | None) -> list[dict[str, Any]]:
    """The held-out rows as replay tasks: {row, task, ref_text, ref_calls, source, provenance}."""
    test = ws.root / dcfg.output_dir / "data" / "test.jsonl"
    if not test.is_file():
        raise EvalError(f"no held-out split at {dcfg.output_dir}/data/test.jsonl: run `refinery train collect` "
                        "first")
    meta_path = test.with_name("test_meta.jsonl")
    meta = [orjson.loads(x) for x in meta_path.read_bytes().splitlines()] if meta_path.is_file() else []
    tasks = []
    for i, raw in enumerate(test.read_bytes().splitlines()):
        if limit is not None and i >= limit:
            break
        prompt, ref_text, ref_calls = reference(orjson.loads(raw))
        m = meta[i] if i < len(meta) else {}
        task = prompt[-1]["content"] or ""
        tasks.append({"row": i, "task": task, "task_key": task_key({"prompt": task, "id": str(i)}),
                      "ref_text": ref_text, "ref_calls": ref_calls, "source": m.get("source"),
                      "provenance": m.get("provenance")})
    if not tasks:
        raise EvalError(f"{dcfg.output_dir}/data/test.jsonl holds no held-out task: collect more SFT rows "
                        "(`refinery train collect`)")
    return tasks


def excluded_lines(index: RagIndex, tasks: list[dict[str, Any]]) -> dict[int, set[int]]:
    """task row → the export lines never to retrieve for it: its own row (same scored-run line)
    and every playbook of the same task (same task key)."""
    by_line: dict[tuple[str, int], list[int]] = {}
    by_key: dict[str, list[int]] = {}
    for t in tasks:
        by_key.setdefault(t["task_key"], []).append(t["row"])
        if t["provenance"]:
            by_line.setdefault((t["provenance"]["source_file"], t["provenance"]["line_offset"]), []).append(t["row"])
    out: dict[int, set[int]] = {}
    with open(index.export, "rb") as f:
        for n, raw in enumerate(f):
            row = orjson.loads(raw)
            p = row["provenance"]
            for t in by_key.get(row["task_key"], []) + by_line.get((p["source_file"], p["line_offset"]), []):
                out.setdefault(t, set()).add(n)
    return out


def grounded(answer: str, hits: list[Hit]) -> bool:
    calls = parse_tool_calls(answer) or []
    got = " ".join(orjson.dumps(c).decode() for c in calls)
    for h in hits:
        if h.id in answer:
            return True
        if h.row.get("response") and word_f1(answer, h.row["response"]) >= GROUNDING_F1:
            return True
        ref = [{"name": c["name"], "arguments": c["arguments"]} for c in h.row.get("tool_calls") or []]
        if ref and calls and (calls == ref or word_f1(got, " ".join(orjson.dumps(c).decode() for c in ref))
                              >= GROUNDING_F1):
            return True
    return False


def replay_eval(ws: Workspace, cfg: Config, dcfg: DistillConfig, *, generate: Generator, index: RagIndex,
                model_label: str, limit: int | None = None, tasks: list[dict[str, Any]] | None = None,
                on_answer: Callable[[], None] | None = None) -> dict[str, Any]:
    """Replay every held-out task (`tasks`, or the first `limit` of eval_tasks) in both modes;
    write the replay-eval folder; return the report."""
    tasks = tasks if tasks is not None else eval_tasks(ws, dcfg, limit)
    excluded = excluded_lines(index, tasks)
    hits = {t["row"]: index.search(t["task"], cfg.replay.top_k, exclude=excluded.get(t["row"], ())) for t in tasks}
    rows = []
    for mode in MODES:
        for t in tasks:
            given = hits[t["row"]] if mode == "retrieval" else []
            messages = build_messages(t["task"], [h.row for h in given], max_chars=cfg.replay.max_playbook_chars)
            ans = answer_locally(generate, messages, cfg)
            s = score(ans.text, t["ref_text"], t["ref_calls"])
            rows.append({"row": t["row"], "mode": mode, "task": t["task"], "source": t["source"],
                         "playbooks": [{"id": h.id, "score": h.score} for h in hits[t["row"]]],
                         "answer": ans.text, "check": ans.check, "latency_ms": ans.latency_ms,
                         "scores": {"answer_match": s["answer_match"], "format_valid": s["format_valid"],
                                    "grounding": float(grounded(ans.text, hits[t["row"]]))}})
            if on_answer:
                on_answer()
    report = summarize(rows, tasks=len(tasks), model=model_label, index=index, top_k=cfg.replay.top_k)
    out = ws.root / dcfg.output_dir / OUT
    with publishing(out) as staging:
        write_jsonl_atomic(staging / "rows.jsonl", rows)
        write_json(staging / "report.json", report)
        (staging / "report.md").write_text(markdown(report))
    return report


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)]


def summarize(rows: list[dict[str, Any]], *, tasks: int, model: str, index: RagIndex, top_k: int) -> dict[str, Any]:
    modes = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        lat = [r["latency_ms"] for r in mine]
        modes[mode] = {
            "rows": len(mine),
            **{m: round(statistics.fmean(r["scores"][m] for r in mine), 4) if mine else None
               for m in ("answer_match", "grounding", "format_valid")},
            "failed_checks": sum(r["check"] is not None for r in mine),
            "latency_ms": {"mean": round(statistics.fmean(lat), 1) if lat else None,
                           "p50": _percentile(lat, 50), "p95": _percentile(lat, 95)},
        }
    return {"schema_version": 1, "tasks": tasks, "model": model, "top_k": top_k,
            "rag_export": index.manifest["export"], "modes": modes}


def markdown(r: dict[str, Any]) -> str:
    def f(v: float | None, fmt: str = ".3f") -> str:
        return "·" if v is None else format(v, fmt)

    lines = [f"# Replay evaluation — {r['model']}", "",
             f"{r['tasks']} held-out tasks, top {r['top_k']} playbooks from {r['rag_export']['path']} "
             f"({r['rag_export']['rows']} rows, sha256 {r['rag_export']['sha256'][:12]}…).", "",
             "| mode | tasks | answer match | grounding | format valid | failed checks | latency mean ms "
             "| p50 ms | p95 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, m in r["modes"].items():
        lat = m["latency_ms"]
        lines.append(f"| {mode} | {m['rows']} | {f(m['answer_match'])} | {f(m['grounding'])} | "
                     f"{f(m['format_valid'])} | {m['failed_checks']} | {f(lat['mean'], '.1f')} | "
                     f"{f(lat['p50'], '.1f')} | {f(lat['p95'], '.1f')} |")
    return "\n".join(lines) + "\n"
