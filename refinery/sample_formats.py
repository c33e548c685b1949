"""The public formats in the bundled sample: files as operators' tools write them.

    batch_2026-11_input.jsonl / batch_2026-11_output.jsonl   OpenAI Batch API: requests, and
        their responses in completion order (a few requests expired without one, a few failed)
    evals/promptfoo-eval-<n>.json       promptfoo eval exports (v3): one per evaluation run
    inspect/<date>_<task>_<n>.eval      inspect_ai eval logs: zip archives of JSON samples
    langfuse_export.jsonl               a Langfuse export: traces, observations and scores
    otel/genai_spans.jsonl              OpenTelemetry GenAI spans, as the collector's file exporter
                                        writes them (one OTLP/JSON document per line)

Each writer streams: a document or archive holds at most a few hundred records, so the sample
at 10^6 rows is many files, never one huge document. Bytes are deterministic: archive members
carry a fixed date, gzip streams no time.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

from refinery.sample import SECRETS, Draw, _task_id, draws

DUMPS = orjson.dumps


def _answer(d: Draw, defect: str | None) -> str:
    return d.task.good + " " + SECRETS[d.i % len(SECRETS)] if defect == "secret" else d.answer


def _groups(name: str, defects: tuple[str, ...], rows: int, seed: int,
            size: int) -> Iterator[list[tuple[Draw, str | None]]]:
    """The draws of a stream whose files hold `size` records each (the last fewer), in groups of
    `size`; a repeated row is dropped (a document or archive holds no duplicate line)."""
    group: list[tuple[Draw, str | None]] = []
    for d, defect in draws(name, defects, rows, seed):
        if d is None:
            continue
        group.append((d, defect))
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _write_lines(path: Path, lines: Iterator[bytes]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "wb") as f:
        for line in lines:
            f.write(line)
            n += 1
    tmp.replace(path)
    return n


# --- OpenAI Batch ---------------------------------------------------------------------------

BATCH_DEFECTS = ("secret", "expired", "failed", "no_stop", "broken_json")
#: Responses come back in completion order, not request order: shuffled within a window.
BATCH_WINDOW = 16


def _batch_pair(d: Draw, defect: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    t = d.task
    cid = f"task-{d.i:07d}"
    request = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": d.model if d.provider == "openai" else "gpt-4o-mini",
                        "messages": [{"role": "system", "content": f"You are the {t.domain} assistant."},
                                     {"role": "user", "content": t.prompt}], "max_tokens": 600}}
    if defect == "expired":
        return request, None
    if defect == "failed":
        response = {"status_code": 500, "request_id": f"req_{d.i:07d}",
                    "body": {"error": {"message": "The server had an error processing your request.",
                                       "type": "server_error", "code": None}}}
    else:
        answer = _answer(d, defect)
        response = {"status_code": 200, "request_id": f"req_{d.i:07d}", "body": {
            "id": f"chatcmpl-b{d.i:07d}", "object": "chat.completion", "created": int(d.ts.timestamp()),
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer, "refusal": None},
                         "finish_reason": "length" if defect == "no_stop" else "stop"}],
            "usage": {"prompt_tokens": 24 + len(t.prompt) // 4, "completion_tokens": len(answer) // 4}}}
    return request, {"id": f"batch_req_{d.i:07d}", "custom_id": cid, "response": response, "error": None}


def write_batch(rows: int, seed: int, out: Path) -> dict[str, int]:
    """`rows` requests; their responses, where they came back, in a shuffled order."""
    inputs, outputs = out / "batch_2026-11_input.jsonl", out / "batch_2026-11_output.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    pending: list[bytes] = []
    import random

    rng = random.Random(f"{seed}:batch-order")

    def requests() -> Iterator[bytes]:
        for d, defect in draws("batch", BATCH_DEFECTS, rows, seed):
            if d is None:
                continue
            req, resp = _batch_pair(d, defect)
            line = DUMPS(req, option=orjson.OPT_APPEND_NEWLINE)
            if defect == "broken_json":
                line = line[: len(line) * 3 // 5] + b"\n"
            if resp is not None:
                pending.append(DUMPS(resp, option=orjson.OPT_APPEND_NEWLINE))
            yield line

    with open(outputs.with_name(f".{outputs.name}.tmp"), "wb") as f:
        n_out = 0

        def drain(keep: int) -> None:
            nonlocal n_out
            while len(pending) > keep:
                f.write(pending.pop(rng.randrange(len(pending))))
                n_out += 1

        def requests_draining() -> Iterator[bytes]:
            for line in requests():
                yield line
                drain(BATCH_WINDOW)

        n_in = _write_lines(inputs, requests_draining())
        drain(0)
    outputs.with_name(f".{outputs.name}.tmp").replace(outputs)
    return {inputs.name: n_in, outputs.name: n_out}


# --- promptfoo -------------------------------------------------------------------------------

PROMPTFOO_PER_FILE = 200
PROMPTFOO_DEFECTS = ("secret", "slow", "provider_error", "no_stop")


def _promptfoo_result(d: Draw, defect: str | None, idx: int) -> dict[str, Any]:
    t = d.task
    answer = _answer(d, defect)
    good = d.outcome in ("good",)
    latency = 4200 + d.i % 900 if defect == "slow" else 600 + (d.i * 37) % 1800
    components = [
        {"pass": good or d.outcome == "partial", "score": 1 if good else (0.5 if d.outcome == "partial" else 0),
         "reason": "Output covers the expected steps" if good else "Output misses required steps",
         "assertion": {"type": "llm-rubric", "value": f"Answers the {t.task_name.replace('_', ' ')} task correctly"}},
        {"pass": latency <= 3000, "score": 1 if latency <= 3000 else 0,
         "reason": "Assertion passed" if latency <= 3000 else f"Latency {latency}ms is greater than threshold 3000ms",
         "assertion": {"type": "latency", "threshold": 3000}},
    ]
    quality_pass = components[0]["pass"]
    result: dict[str, Any] = {
        "id": f"pf-{d.i:07d}", "testIdx": idx, "promptIdx": 0,
        "prompt": {"raw": t.prompt, "label": "{{question}}"},
        "provider": {"id": f"openai:chat:{d.model}" if d.provider == "openai" else f"{d.provider}:{d.model}",
                     "label": ""},
        "vars": {"question": t.prompt},
        "testCase": {"description": f"{t.task_name} #{_task_id(t)}", "vars": {"question": t.prompt},
                     "assert": [c["assertion"] for c in components]},
        "response": {"output": answer, "tokenUsage": {"total": 60 + len(answer) // 4, "prompt": 40 + len(t.prompt) // 4,
                                                      "completion": len(answer) // 4},
                     "cached": False, "finishReason": "length" if defect == "no_stop" else "stop"},
        "latencyMs": latency,
        "success": quality_pass and latency <= 3000,
        "score": round(sum(c["score"] for c in components) / 2, 2),
        "namedScores": {},
        "gradingResult": {"pass": quality_pass and latency <= 3000,
                          "score": round(sum(c["score"] for c in components) / 2, 2),
                          "reason": next((c["reason"] for c in components if not c["pass"]), "All assertions passed"),
                          "componentResults": components},
        "failureReason": 0 if quality_pass and latency <= 3000 else 1,
    }
    if not result["success"]:
        result["error"] = result["gradingResult"]["reason"]
    if defect == "provider_error":
        result.update({"response": {"error": "API error: 503 Service Unavailable"}, "success": False, "score": 0,
                       "gradingResult": None, "failureReason": 2, "error": "API error: 503 Service Unavailable"})
    return result


def write_promptfoo(rows: int, seed: int, out: Path) -> dict[str, int]:
    written: dict[str, int] = {}
    for n, group in enumerate(_groups("promptfoo", PROMPTFOO_DEFECTS, rows, seed, PROMPTFOO_PER_FILE), 1):
        batch = [_promptfoo_result(d, defect, i) for i, (d, defect) in enumerate(group)]
        name = f"evals/promptfoo-eval-{n:04d}.json"
        created = group[0][0].ts.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        doc = {"evalId": f"eval-{seed:x}-{n:04d}",
               "results": {"version": 3, "timestamp": created, "prompts": [{"raw": "{{question}}",
                                                                            "label": "{{question}}"}],
                           "results": batch,
                           "stats": {"successes": sum(1 for r in batch if r["success"]),
                                     "failures": sum(1 for r in batch if not r["success"])}},
               "config": {"description": "Operations assistant regression suite"},
               "shareableUrl": None,
               "metadata": {"promptfooVersion": "0.118.10", "evaluationCreatedAt": created,
                            "exportedAt": created}}
        _write_lines(out / name, iter([DUMPS(doc, option=orjson.OPT_INDENT_2) + b"\n"]))
        written[name] = len(batch)
    return written


# --- inspect_ai -------------------------------------------------------------------------------

INSPECT_PER_FILE = 150
INSPECT_DEFECTS = ("secret", "no_stop", "sample_error")
ZIP_DATE = (2026, 11, 1, 0, 0, 0)


def _inspect_sample(d: Draw, defect: str | None, n: int) -> dict[str, Any]:
    t = d.task
    answer = _answer(d, defect)
    correct = d.outcome == "good"
    call_id = f"call_{d.i:07d}"
    messages = [
        {"id": f"m{n}a", "role": "system", "content": f"You are the {t.domain} agent. Use tools before answering."},
        {"id": f"m{n}b", "role": "user", "content": t.prompt, "source": "input"},
        {"id": f"m{n}c", "role": "assistant", "content": "",
         "tool_calls": [{"id": call_id, "function": t.tool, "arguments": t.args, "type": "function"}],
         "model": d.model},
        {"id": f"m{n}d", "role": "tool", "content": t.tool_result, "tool_call_id": call_id, "function": t.tool},
        {"id": f"m{n}e", "role": "assistant", "content": answer, "model": d.model},
    ]
    sample: dict[str, Any] = {
        "id": n + 1, "epoch": 1, "input": t.prompt, "target": t.good, "messages": messages,
        "output": {"model": d.model, "choices": [{"message": messages[-1],
                                                   "stop_reason": "max_tokens" if defect == "no_stop" else "stop"}],
                   "usage": {"input_tokens": 180 + len(t.prompt) // 4, "output_tokens": len(answer) // 4}},
        "scores": {"model_graded_fact": {"value": "C" if correct else ("P" if d.outcome == "partial" else "I"),
                                         "answer": answer[:80], "explanation": "Graded against the target."}},
        "metadata": {"task_id": _task_id(t)},
        "total_time": round(1.5 + (d.i % 40) / 10, 1),
        "started_at": d.ts.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
    }
    if defect == "sample_error":
        sample["error"] = {"message": "TimeoutError: tool kubectl timed out after 30s", "traceback": ""}
        del sample["scores"]
    return sample


def write_inspect(rows: int, seed: int, out: Path) -> dict[str, int]:
    written: dict[str, int] = {}
    for n, group in enumerate(_groups("inspect", INSPECT_DEFECTS, rows, seed, INSPECT_PER_FILE), 1):
        samples = [_inspect_sample(d, defect, i) for i, (d, defect) in enumerate(group)]
        first = group[0][0].ts
        created = first.strftime("%Y-%m-%dT%H:%M:%S+00:00")
        name = f"inspect/{first.strftime('%Y-%m-%dT%H-%M-%S')}_ops-agent_{n:04d}.eval"
        header = {"version": 2, "status": "success",
                  "eval": {"run_id": f"run{seed:x}{n:04d}", "task": "ops_agent", "task_version": 0,
                           "created": created, "model": "openai/gpt-4o-mini", "dataset": {"name": "ops_tasks"}},
                  "plan": {"steps": [{"solver": "use_tools"}, {"solver": "generate"}]},
                  "results": {"total_samples": len(samples), "scores": [{"name": "model_graded_fact"}]},
                  "stats": {"started_at": created, "completed_at": created}}
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            def put(member: str, obj: Any) -> None:
                zf.writestr(zipfile.ZipInfo(member, ZIP_DATE), DUMPS(obj), compress_type=zipfile.ZIP_DEFLATED)

            put("_journal/start.json", {"version": 2, "eval": header["eval"], "plan": header["plan"]})
            for smp in samples:
                put(f"samples/{smp['id']}_epoch_{smp['epoch']}.json", smp)
            put("reductions.json", [])
            put("summaries.json", [{"id": smp["id"], "epoch": smp["epoch"]} for smp in samples])
            put("header.json", header)
        tmp.replace(path)
        written[name] = len(samples)
    return written


# --- Langfuse --------------------------------------------------------------------------------

LANGFUSE_DEFECTS = ("secret", "no_score", "orphan_score", "error")


def _ms(ts) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _langfuse_records(d: Draw, defect: str | None) -> tuple[dict, list[dict], list[dict]]:
    t = d.task
    answer = _answer(d, defect)
    tid, start = f"lf-trace-{d.i:07d}", d.ts
    msgs = [{"role": "system", "content": f"You are the {t.domain} assistant."}, {"role": "user", "content": t.prompt}]
    trace = {"id": tid, "timestamp": _ms(start), "name": t.task_name, "userId": f"user-{d.i % 17:02d}",
             "sessionId": f"sess-{d.i // 3:06d}", "input": t.prompt, "output": answer,
             "metadata": {"task_id": _task_id(t)}, "tags": [t.domain], "release": "2026.11", "public": False}
    tool = {"id": f"lf-obs-{d.i:07d}-t", "traceId": tid, "type": "SPAN", "name": t.tool,
            "startTime": _ms(start + timedelta(milliseconds=40)), "endTime": _ms(start + timedelta(milliseconds=310)),
            "input": t.args, "output": t.tool_result, "level": "DEFAULT", "statusMessage": None,
            "parentObservationId": None}
    failed = defect == "error"
    gen = {"id": f"lf-obs-{d.i:07d}-g", "traceId": tid, "type": "GENERATION", "name": "chat-completion",
           "startTime": _ms(start + timedelta(milliseconds=320)),
           "endTime": _ms(start + timedelta(milliseconds=320 + 700 + d.i % 900)),
           "completionStartTime": _ms(start + timedelta(milliseconds=520)), "model": d.model,
           "modelParameters": {"temperature": "0.2", "max_tokens": "600"},
           "input": [*msgs, {"role": "tool", "content": t.tool_result}],
           "output": None if failed else {"role": "assistant", "content": answer},
           "usageDetails": {"input": 120 + len(t.prompt) // 4, "output": len(answer) // 4},
           "level": "ERROR" if failed else "DEFAULT",
           "statusMessage": "upstream timeout after 30s" if failed else None, "parentObservationId": None}
    scores = []
    if defect != "no_score":
        quality = {"good": 0.92, "partial": 0.6, "bad": 0.1, "empty": 0.0, "conflict": 0.35}[d.outcome]
        scores.append({"id": f"lf-score-{d.i:07d}-c", "traceId": f"lf-trace-missing-{d.i:07d}"
                       if defect == "orphan_score" else tid, "observationId": gen["id"], "name": "correctness",
                       "value": quality, "dataType": "NUMERIC", "source": "EVAL",
                       "comment": "graded against the runbook", "timestamp": _ms(start + timedelta(seconds=5))})
        if d.approved or d.outcome == "bad":
            scores.append({"id": f"lf-score-{d.i:07d}-u", "traceId": tid, "observationId": None,
                           "name": "user-feedback", "value": 1 if d.approved else 0, "dataType": "BOOLEAN",
                           "source": "ANNOTATION", "comment": None, "timestamp": _ms(start + timedelta(minutes=2))})
    return trace, [tool, gen], scores


def write_langfuse(rows: int, seed: int, out: Path) -> dict[str, int]:
    """A Langfuse export as three tables: traces, observations and scores (joined by traceId)."""
    base = out / "langfuse"
    base.mkdir(parents=True, exist_ok=True)
    names = ("traces.jsonl", "observations.jsonl", "scores.jsonl")
    files = [open(base / f".{n}.tmp", "wb") for n in names]
    counts = [0, 0, 0]
    try:
        for d, defect in draws("langfuse", LANGFUSE_DEFECTS, rows, seed):
            if d is None:
                continue
            trace, observations, scores = _langfuse_records(d, defect)
            for k, recs in enumerate(([trace], observations, scores)):
                for r in recs:
                    files[k].write(DUMPS(r, option=orjson.OPT_APPEND_NEWLINE))
                    counts[k] += 1
    finally:
        for f in files:
            f.close()
    for n in names:
        (base / f".{n}.tmp").replace(base / n)
    return {f"langfuse/{n}": c for n, c in zip(names, counts)}


# --- OpenTelemetry GenAI --------------------------------------------------------------------

OTEL_DEFECTS = ("secret", "no_content", "error")


def _attr(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        v: dict[str, Any] = {"boolValue": value}
    elif isinstance(value, int):
        v = {"intValue": str(value)}
    elif isinstance(value, float):
        v = {"doubleValue": value}
    elif isinstance(value, list):
        v = {"arrayValue": {"values": [{"stringValue": x} for x in value]}}
    else:
        v = {"stringValue": value}
    return {"key": key, "value": v}


def _nanos(ts) -> str:
    return str(int(ts.timestamp()) * 1_000_000_000 + ts.microsecond * 1000)


def _otel_document(d: Draw, defect: str | None) -> dict[str, Any]:
    t = d.task
    answer = _answer(d, defect)
    trace_id = f"{d.i:016x}{(d.i * 2654435761) % (1 << 64):016x}"
    chat_id, tool_id = f"{(d.i << 1) + 1:016x}", f"{(d.i << 1) + 2:016x}"
    start = d.ts
    end = start + timedelta(milliseconds=600 + d.i % 1500)
    failed = defect == "error"
    attrs = [_attr("gen_ai.operation.name", "chat"), _attr("gen_ai.provider.name", "openai"),
             _attr("gen_ai.request.model", d.model), _attr("gen_ai.response.model", d.model),
             _attr("gen_ai.usage.input_tokens", 90 + len(t.prompt) // 4),
             _attr("gen_ai.usage.output_tokens", len(answer) // 4),
             _attr("gen_ai.response.finish_reasons", ["stop"]), _attr("gen_ai.conversation.id", f"conv-{d.i:07d}")]
    if defect != "no_content":
        attrs += [
            _attr("gen_ai.input.messages", DUMPS([
                {"role": "system", "parts": [{"type": "text", "content": f"You are the {t.domain} assistant."}]},
                {"role": "user", "parts": [{"type": "text", "content": t.prompt}]}]).decode()),
            _attr("gen_ai.output.messages", DUMPS([
                {"role": "assistant", "parts": [{"type": "text", "content": answer}],
                 "finish_reason": "stop"}]).decode())]
    if failed:
        attrs.append(_attr("error.type", "timeout"))
    quality = {"good": 0.9, "partial": 0.62, "bad": 0.15, "empty": 0.0, "conflict": 0.4}[d.outcome]
    chat = {"traceId": trace_id, "spanId": chat_id, "parentSpanId": "", "name": f"chat {d.model}", "kind": 3,
            "startTimeUnixNano": _nanos(start), "endTimeUnixNano": _nanos(end), "attributes": attrs,
            "events": [] if failed else [{"timeUnixNano": _nanos(end), "name": "gen_ai.evaluation.result",
                                          "attributes": [_attr("gen_ai.evaluation.name", "relevance"),
                                                         _attr("gen_ai.evaluation.score.value", quality)]}],
            "status": {"code": 2, "message": "upstream timeout"} if failed else {}}
    tool = {"traceId": trace_id, "spanId": tool_id, "parentSpanId": chat_id, "name": f"execute_tool {t.tool}",
            "kind": 1, "startTimeUnixNano": _nanos(start + timedelta(milliseconds=50)),
            "endTimeUnixNano": _nanos(start + timedelta(milliseconds=260)),
            "attributes": [_attr("gen_ai.operation.name", "execute_tool"), _attr("gen_ai.tool.name", t.tool),
                           _attr("gen_ai.tool.call.id", f"call_{d.i:07d}")], "status": {}}
    return {"resourceSpans": [{"resource": {"attributes": [_attr("service.name", f"{t.domain}-assistant")]},
                               "scopeSpans": [{"scope": {"name": "opentelemetry.instrumentation.openai_v2",
                                                         "version": "2.4b0"}, "spans": [chat, tool]}]}]}


def write_otel(rows: int, seed: int, out: Path) -> dict[str, int]:
    """OTLP/JSON as the collector's file exporter writes it: one export request per line."""
    def lines() -> Iterator[bytes]:
        for d, defect in draws("otel", OTEL_DEFECTS, rows, seed):
            if d is not None:
                yield DUMPS(_otel_document(d, defect), option=orjson.OPT_APPEND_NEWLINE)

    name = "otel/genai_spans.jsonl"
    return {name: _write_lines(out / name, lines())}
