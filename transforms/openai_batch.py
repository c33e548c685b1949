"""OpenAI Batch API files: the input file's requests joined with the output file's responses.

    input   {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"model", "messages", ...}}
    output  {"id", "custom_id", "response": {"status_code", "request_id", "body": <chat.completion>}, "error"}

Recognised by content (records with custom_id and a request body, or custom_id and a
response/error). The prompt lives only in the input file and the answer only in the output
file: both files are read, and each request is joined with its response by `custom_id` (in
bounded memory, through the materializer's spill). The evidence is the output record's, with
the input record joined into it. A response whose request is in no input file, or a request
with no response (the batch may still be running), is quarantined as unmatched_join.
Responses-API batches (`/v1/responses`: `instructions` + `input`) are read too. Times: the
response's `created`.
"""

from refinery import chat_formats as cf
from refinery.reasons import Reason
from refinery.transform import Emit, Keyed, Refuse, RowError, TransformSpec, dated

SPEC = TransformSpec(name="openai_batch", patterns=(), format="json", kind="chat_completion",
                     description="OpenAI Batch input and output files, joined by custom_id")

CHAT_URLS = ("/v1/chat/completions", "/v1/responses", "/v1/completions")


def _role(rec):
    if not isinstance(rec, dict) or not isinstance(rec.get("custom_id"), str):
        return None
    if isinstance(rec.get("body"), dict) and ("url" in rec or "method" in rec):
        return "input"
    if "response" in rec or "error" in rec:
        return "output"
    return None


def detect(probe):
    roles = {_role(r) for r in probe.records} - {None}
    if probe.mostly(_role):
        return "records carry custom_id with " + (
            "a request body (Batch input)" if roles == {"input"} else
            "a response (Batch output)" if roles == {"output"} else "requests and responses (Batch)")
    return None


def join_key(row, ctx):
    role = _role(row)
    if role is None:
        raise RowError(Reason.MISSING_FIELD, "not a Batch line: needs custom_id and a request body or a response")
    return Keyed(f"custom_id:{row['custom_id']}", role)


def transform(row, ctx):  # every Batch line is joined; this runs only for lines join_key declines
    raise RowError(Reason.MISSING_FIELD, "not a Batch line: needs custom_id and a request body or a response")


def assemble(group, ctx):
    inputs = [m for m in group if m.role == "input"]
    outputs = [m for m in group if m.role == "output"]
    out = []
    for req, resp in _pairs(inputs, outputs):
        try:
            out.append(Emit(_evidence(req, resp, ctx), resp, (req,)))
        except RowError as e:
            out += [Refuse(resp, e.reason, e.detail), Refuse(req, e.reason, f"its response was refused: {e.detail}")]
    paired = {id(m) for pair in _pairs(inputs, outputs) for m in pair}
    for req in (m for m in inputs if id(m) not in paired):
        out.append(Refuse(req, Reason.UNMATCHED_JOIN, f"request {req.row['custom_id']!r} has no response in any "
                                                      "Batch output file (is the batch still running?)"))
    for resp in (m for m in outputs if id(m) not in paired):
        out.append(Refuse(resp, Reason.UNMATCHED_JOIN, f"response {resp.row['custom_id']!r} has no request in any "
                                                       "Batch input file: add the input file to data/_kb/"))
    return out


def _model(m):
    if m.role == "input":
        model = m.row["body"].get("model")
    else:
        response = m.row.get("response")
        body = response.get("body") if isinstance(response, dict) else None
        model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


def _pairs(inputs, outputs):
    """Requests with their responses. A custom_id is unique within one batch; with several
    batches' files side by side, a response goes with the request of its model (the response
    names the dated snapshot of the model asked for), else with the next one in reading order."""
    if len(inputs) == 1 and len(outputs) == 1:
        return [(inputs[0], outputs[0])]
    free = list(inputs)
    pairs = []
    for resp in outputs:
        served = _model(resp)
        match = next((r for r in free if served and _model(r) and served.startswith(_model(r))), None)
        match = match or (free[0] if free else None)
        if match is not None:
            free.remove(match)
            pairs.append((match, resp))
    return pairs


def _evidence(req, resp, ctx):
    url = req.row.get("url")
    if isinstance(url, str) and url not in CHAT_URLS:
        raise RowError(Reason.WRONG_TYPE, f"a {url} request: not a chat call, nothing to learn from")
    body = req.row["body"]
    prompt = cf.request_messages(body, "body")
    if prompt is None:
        raise RowError(Reason.MISSING_FIELD, "field 'body.messages' is missing: the request holds no conversation")
    response = resp.row.get("response") if isinstance(resp.row.get("response"), dict) else {}
    status = response.get("status_code") if isinstance(response.get("status_code"), int) else None
    rbody = response.get("body")
    error = cf.error_text(rbody, status)
    if error is None and resp.row.get("error"):
        error = cf.error_text({"error": resp.row["error"]}, None)
    answers = [] if error is not None or not isinstance(rbody, dict) else cf.openai_answers(rbody, "response.body")
    if not answers and error is None:
        error = "no response body"
    rctx = ctx.row_context(resp)
    recorded_at, when = dated(rctx, ("record:response.body.created", answers[0].created if answers else None))
    model = (answers[0].model if answers else None) or (body.get("model") if isinstance(body.get("model"), str)
                                                         else None)
    return cf.call_evidence(SPEC.kind, prompt, answers[0] if answers else None, recorded_at=recorded_at,
                            recorded_at_from=when, provider="openai", model=model, error=error,
                            task_id=resp.row["custom_id"])
