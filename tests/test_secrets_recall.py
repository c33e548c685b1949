"""Secret and personal-data recall, measured per kind on a held-back corpus.

tests/fixtures/secrets/corpus.jsonl holds random fakes of each credential and personal-data
kind, built from the kinds' public formats by make_corpus.py (not from refinery's rules).
Each item is tried in every encoding ("shape") a leak has taken: plain prose, base64, hex,
URL-encoding, zero-width characters inside the secret, fullwidth characters, JSON \\u escapes,
a JSON key of tool-call arguments, a task name, a tool-call id, an OpenAI content-part list.

The tables (kind × injected / detected / missed, false positives on the bundled sample, and the
end-to-end leaks) are attached with record_property and printed at the end of the pytest run
by conftest's pytest_terminal_summary, with or without xdist. A table never shows a secret:
a miss is named by kind, shape, item id and a 4-character prefix.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import importlib.util
import io
import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest

from conftest import FIXTURES, copy_sample, read_jsonl_file
from refinery.export import refusals as export_refusals
from refinery.workspace import Workspace

SECRETS_DIR = FIXTURES / "secrets"
ITEMS: list[dict[str, str]] = [json.loads(line) for line in
                               (SECRETS_DIR / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
#: The kinds the engine reports (refinery.sensitive.KINDS must hold each).
ENGINE_KINDS = ("api_key", "bearer_token", "private_key", "password", "email", "phone", "credit_card", "iban",
                "ssn", "private_note")
ZERO_WIDTH = "\u200b\u200c\u2060\ufeff"
PRIVACY_REASONS = {"secret_detected", "pii_detected"}


def engine() -> tuple[Callable, Callable]:
    from refinery.sensitive import first_finding, redact

    return first_finding, redact


def second_pass_or_none() -> Callable | None:
    """The independent checker, where this checkout has it (its column reads n/a otherwise)."""
    try:
        from refinery.sensitive.check import second_pass
    except ImportError:
        return None
    return second_pass


# --- shapes ---------------------------------------------------------------------------------


def zero_width(s: str) -> str:
    """`s` with an invisible character after every third character."""
    return "".join(c + (ZERO_WIDTH[k // 3 % len(ZERO_WIDTH)] if k % 3 == 2 and k < len(s) - 1 else "")
                   for k, c in enumerate(s))


def fullwidth(s: str) -> str:
    """`s` in the fullwidth forms NFKC folds back to ASCII."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


def json_escaped(item: dict) -> str:
    """A JSON text (a tool result) whose string holds the carrier, the secret's characters as \\uXXXX."""
    body = json.dumps(item["text"])
    plain = json.dumps(item["secret"])[1:-1]
    assert plain in body, item["id"]
    body = body.replace(plain, "".join(f"\\u{ord(c):04x}" for c in item["secret"]))
    return '{"tool": "read_config", "result": ' + body + "}"


#: shape → the text of an item in that encoding
TEXT_SHAPES: dict[str, Callable[[dict], str]] = {
    "plain": lambda it: it["text"],
    "base64": lambda it: "attachment (base64): " + base64.b64encode(it["text"].encode()).decode(),
    "hex": lambda it: "raw bytes: " + it["text"].encode().hex(),
    "url_encoded": lambda it: "https://app.example.net/callback?state=" + quote(it["text"], safe=""),
    "zero_width": lambda it: it["text"].replace(it["secret"], zero_width(it["secret"])),
    "fullwidth": lambda it: it["text"].replace(it["secret"], fullwidth(it["secret"])),
    "json_escaped": json_escaped,
}


def _tool_call(call_id: str, arguments: Any) -> list[dict]:
    return [{"id": call_id, "name": "update_settings", "arguments": arguments}]


def _in_response(make: Callable[[dict], str]) -> Callable[[dict], list[tuple[str, Any]]]:
    return lambda it: [("response", make(it))]


#: shape → the fields (name, value) of a record carrying the item that way
SHAPES: dict[str, Callable[[dict], list[tuple[str, Any]]]] = {
    **{name: _in_response(make) for name, make in TEXT_SHAPES.items()},
    "json_key": lambda it: [("tool_calls", _tool_call("call_7Qm2xv", {it["standalone"]: "ok"}))],
    "json_key_text": lambda it: [("tool_calls", _tool_call("call_7Qm2xv", json.dumps({it["standalone"]: "ok"})))],
    "task_name": lambda it: [("task_name", it["standalone"])],
    "tool_call_id": lambda it: [("tool_calls", _tool_call(it["standalone"], {"invoice_id": "INV-1042"}))],
    "content_parts": lambda it: [("messages", [{"role": "user", "content": [{"type": "text", "text": it["text"]}]}])],
}
REDACTION_SHAPES = ("plain", "zero_width", "json_key", "json_key_text", "json_escaped")


def label(item: dict) -> str:
    """How a table or a failure names an item: never the secret, only its first 4 characters."""
    return f"{item['id']} ({item['secret'][:4]}…)"


# --- the corpus itself ----------------------------------------------------------------------


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_corpus", SECRETS_DIR / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_corpus_is_what_its_generator_writes():
    assert (SECRETS_DIR / "corpus.jsonl").read_text(encoding="utf-8") == _load_generator().render(), \
        "tests/fixtures/secrets/corpus.jsonl is stale: run python tests/fixtures/secrets/make_corpus.py"


def test_the_corpus_items_are_well_formed_fakes():
    """Each item is of a documented engine kind, carries its secret, and where the format has
    check digits they hold (python-stdnum's validators): a detector that verifies them must
    still find every item."""
    from stdnum import iban, luhn
    from stdnum.us import ssn

    counts = Counter(it["kind"] for it in ITEMS)
    assert all(8 <= n <= 15 for n in counts.values()), counts
    assert len({it["id"] for it in ITEMS}) == len(ITEMS)
    for it in ITEMS:
        assert it["engine_kind"] in ENGINE_KINDS, it["id"]
        assert it["secret"] in it["standalone"] and it["standalone"] in it["text"], it["id"]
        if it["kind"] == "credit_card":
            assert luhn.is_valid(re.sub(r"[ -]", "", it["secret"])), it["id"]
        if it["kind"] == "iban":
            assert iban.is_valid(it["secret"]), it["id"]
        if it["kind"] == "ssn":
            assert ssn.is_valid(it["secret"]), it["id"]


def test_the_engine_reports_every_kind_of_the_corpus():
    from refinery.sensitive import KINDS

    assert set(ENGINE_KINDS) <= set(KINDS), sorted(set(ENGINE_KINDS) - set(KINDS))


# --- a. recall per kind ---------------------------------------------------------------------


def _table(header: tuple[str, ...], rows: list[tuple], title: str) -> str:
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if k == 0 else str(v).rjust(w)  # noqa: E731
                              for k, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([title, fmt(header), *(fmt(r) for r in rows)])


def test_recall_per_kind_and_shape_is_complete(record_property):
    """Every item in every shape is found by first_finding; the table counts, per kind and per
    shape, how many the engine and the second pass found."""
    first_finding, _ = engine()
    second_pass = second_pass_or_none()
    by_kind: dict[str, Counter] = defaultdict(Counter)
    by_shape: dict[str, Counter] = defaultdict(Counter)
    misses, wrong_kind = [], Counter()
    for it in ITEMS:
        for shape, make in SHAPES.items():
            fields = make(it)
            found = first_finding(fields)
            checked = bool(second_pass(fields)) if second_pass else None
            for c in (by_kind[it["kind"]], by_shape[shape]):
                c["injected"] += 1
                c["engine"] += bool(found)
                c["second_pass"] += bool(checked)
                c["either"] += bool(found or checked)
            if not found:
                misses.append(f"{it['kind']} / {shape} / {label(it)}")
            elif found[0] != it["engine_kind"] and shape == "plain":
                wrong_kind[it["kind"]] += 1
    sp = (lambda c: c["second_pass"]) if second_pass else (lambda c: "n/a")
    rows = [(k, c["injected"], c["engine"], sp(c), c["injected"] - c["either"], c["injected"] - c["engine"],
             wrong_kind[k]) for k, c in sorted(by_kind.items())]
    total = Counter()
    for c in by_kind.values():
        total.update(c)
    rows.append(("total", total["injected"], total["engine"], sp(total), total["injected"] - total["either"],
                 total["injected"] - total["engine"], sum(wrong_kind.values())))
    kinds = _table(("kind", "injected", "engine", "second_pass", "missed_by_both", "missed_by_engine",
                    "plain_other_kind"), rows,
                   f"secret recall per kind: {len(ITEMS)} corpus items x {len(SHAPES)} shapes "
                   "(plain_other_kind: found in plain prose but reported as another engine kind)")
    shapes = _table(("shape", "injected", "engine", "second_pass", "missed_by_engine"),
                    [(s, c["injected"], c["engine"], sp(c), c["injected"] - c["engine"]) for s, c in by_shape.items()],
                    "secret recall per shape")
    record_property("recall_table", f"{kinds}\n\n{shapes}")
    assert not misses, f"{len(misses)} of {total['injected']} missed by first_finding:\n" + "\n".join(misses)


# --- b. redaction ---------------------------------------------------------------------------


def normalise(s: str) -> str:
    return unicodedata.normalize("NFKC", s.translate({ord(c): None for c in ZERO_WIDTH}))


def strings_in(value: Any) -> Iterator[str]:
    """Every string in a value: dict keys and values, list items, and what a string holding a
    JSON object or array parses to."""
    if isinstance(value, str):
        yield value
        if value.lstrip()[:1] in ("{", "["):
            try:
                parsed = json.loads(value)
            except ValueError:
                return
            yield from strings_in(parsed)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from strings_in(v)


def windows(secret: str, n: int) -> set[str]:
    """The `n`-character substrings of a secret (the secret itself when shorter)."""
    s = normalise(secret)
    return {s[k:k + n] for k in range(len(s) - n + 1)} if len(s) > n else {s}


#: Seeds the rules were never tuned on: the committed corpus (seed 20261101) was used to find and
#: fix misses, so its 100 % says less than new values drawn from the same formats.
UNSEEN_SEEDS = (101, 202, 303, 404, 505)


def test_recall_on_values_the_rules_were_not_tuned_on(record_property):
    """The same formats and carrier texts, new random values: as text, alone, and as a JSON key."""
    gen = _load_generator()
    first_finding, _ = engine()
    by_kind: dict[str, Counter] = defaultdict(Counter)
    misses = []
    for seed in UNSEEN_SEEDS:
        for item in gen.items(seed):
            for shape, value in (("text", item["text"]), ("alone", item["standalone"]),
                                 ("json_key", {item["standalone"]: "ok"})):
                found = first_finding([("field", value)]) is not None
                by_kind[item["kind"]]["injected"] += 1
                by_kind[item["kind"]]["engine"] += found
                if not found:
                    misses.append(f"seed {seed} {item['id']} / {shape} ({item['secret'][:4]}…)")
    rows = [(k, c["injected"], c["engine"]) for k, c in sorted(by_kind.items())]
    total = (sum(r[1] for r in rows), sum(r[2] for r in rows))
    record_property("unseen_recall_table", _table(
        ("kind", "injected", "engine"), [*rows, ("total", *total)],
        f"recall on new values (seeds {', '.join(map(str, UNSEEN_SEEDS))}; the formats and carrier texts are the "
        "corpus's)"))
    assert not misses, f"{len(misses)} missed:\n" + "\n".join(misses)


def test_redaction_leaves_nothing_of_the_secret(record_property):
    """redact() takes out the whole secret (no 8-character piece of it survives, invisible
    characters and fullwidth forms folded first), and what it leaves is clean."""
    first_finding, redact = engine()
    failures, by_kind = [], defaultdict(Counter)
    for it in ITEMS:
        pieces = windows(it["secret"], 8)
        for shape in REDACTION_SHAPES:
            (field, value), = SHAPES[shape](it)
            redacted, _ = redact(value)
            text = "\n".join(normalise(s) for s in strings_in(redacted))
            left = any(p in text for p in pieces)
            still = first_finding([(field, redacted)])
            by_kind[it["kind"]]["tried"] += 1
            by_kind[it["kind"]]["left"] += left
            by_kind[it["kind"]]["still_found"] += bool(still)
            if left or still:
                failures.append(f"{it['kind']} / {shape} / {label(it)}: "
                                + ("part of the secret survives" if left else f"still found as {still[0]}"))
    record_property("redaction_table", _table(
        ("kind", "redacted", "secret_left", "still_found"),
        [(k, c["tried"], c["left"], c["still_found"]) for k, c in sorted(by_kind.items())],
        f"redaction per kind ({', '.join(REDACTION_SHAPES)})"))
    assert not failures, f"{len(failures)} redactions failed:\n" + "\n".join(failures)


# --- c. false positives on the bundled sample -------------------------------------------------

SCANNED_FIELDS = ("task_name", "prompt", "response", "tool_calls", "messages")


def test_no_false_positives_on_the_bundled_samples_clean_rows(ws, cfg, record_property):
    """The bundled sample (data/_kb) materialized: a record flagged by first_finding or the
    second pass that holds none of the sample's planted secrets is a false positive."""
    from refinery import materialize
    from refinery.sample import SECRETS

    first_finding, _ = engine()
    second_pass = second_pass_or_none()
    copy_sample(ws.kb)
    materialize.run(ws, cfg)
    rows = [r for p in sorted(ws.evidence.rglob("*.jsonl")) for r in read_jsonl_file(p)]
    fp_engine, fp_second, planted, planted_found = Counter(), Counter(), 0, 0
    examples = []
    for r in rows:
        fields = [(f, r[f]) for f in SCANNED_FIELDS if r.get(f)]
        found = first_finding(fields)
        checked = second_pass(fields) if second_pass else []
        if any(s in t for t in strings_in([v for _, v in fields]) for s in SECRETS):
            planted += 1
            planted_found += bool(found)
            continue
        if found:
            fp_engine[found[0]] += 1
            examples.append(f"{r['id']} ({r['source']}): {found[0]} in {found[1]}")
        for kind in sorted({f.kind for f in checked}):
            fp_second[kind] += 1
            examples.append(f"{r['id']} ({r['source']}): {kind} (second pass)")
    kinds = sorted(set(fp_engine) | set(fp_second) | set(ENGINE_KINDS))
    table = _table(("kind", "engine_fp", "second_pass_fp"),
                   [(k, fp_engine[k], fp_second[k] if second_pass else "n/a") for k in kinds],
                   f"false positives on the bundled sample: {len(rows) - planted} clean records "
                   f"(and {planted} with a planted secret, {planted_found} of them flagged)")
    record_property("false_positive_table", table)
    assert not examples, f"{len(examples)} false positives:\n" + "\n".join(examples)


# --- d. end to end --------------------------------------------------------------------------
# Copies of exported rows of every line-based source, each with one corpus secret injected in one
# place (a site), go through run-all (quarantine, then redact) and every convert format; no file
# under exports/ may hold any piece of a secret, and no copy may vanish.

SITES = ("response", "prompt", "task_name", "tool_args_key", "tool_args_value", "tool_call_id")
#: the encodings an injected text takes, in turn (plain most often)
E2E_SHAPES = ("plain", "zero_width", "plain", "base64", "plain", "fullwidth", "plain", "url_encoded", "hex")
#: where an id lives in the sources: a copy gets new ones, so it is a distinct row
ID_KEYS = {"id", "run_id", "eval_id", "trace_id", "request_id", "audit_id", "feedback_id", "custom_id", "traceId",
           "spanId", "parentSpanId", "observationId", "tool_call_id"}
CONVERT_FORMATS = ("mlx-chat", "mlx-tools", "mlx-completions", "alpaca", "openai", "trl")


def _parse_json_text(s: str) -> Any:
    if s.lstrip()[:1] not in ("{", "["):
        return None
    try:
        return json.loads(s)
    except ValueError:
        return None


def _dump_json_text(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def rewrite(value: Any, fn: Callable[[Any], Any | None]) -> tuple[Any, int]:
    """`value` with each node for which fn returns a replacement replaced (outermost first),
    looking inside strings that hold JSON text too (changed, they are written back as JSON
    text); and the number of replacements."""
    if isinstance(value, str) and (parsed := _parse_json_text(value)) is not None:
        out, hits = rewrite(parsed, fn)
        if hits:
            return _dump_json_text(out), hits
    new = fn(value)
    if new is not None:
        return new, 1
    if isinstance(value, dict):
        hits, out = 0, {}
        for k, v in value.items():
            out[k], h = rewrite(v, fn)
            hits += h
        return out, hits
    if isinstance(value, list):
        pairs = [rewrite(v, fn) for v in value]
        return [v for v, _ in pairs], sum(h for _, h in pairs)
    return value, 0


def replace_in_text(old: str, new: str) -> Callable[[Any], str | None]:
    return lambda v: v.replace(old, new) if isinstance(v, str) and old and old in v else None


def replace_equal(old: Any, new: Any) -> Callable[[Any], Any | None]:
    return lambda v: new if v == old and type(v) is type(old) else None


def _csv_records(data: bytes) -> dict[int, list[str]]:
    """A CSV file's records by the 0-based line each starts on (a quoted field can span lines)."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", "replace")))
    out, start = {}, 0
    for record in reader:
        out[start] = record
        start = reader.line_num
    return out


class Group:
    """The source lines one evidence record was built from (its own line and the lines joined to
    it), parsed, so a copy of them can be changed and appended."""

    def __init__(self, root: Path, ev: dict, cache: dict[str, Any]):
        prov = ev["provenance"]
        refs = [prov, *prov.get("joined", [])]
        seen, self.parts = set(), []  # [(file, header or None, obj)]
        for ref in refs:
            record = ref.get("record") or ""
            line = int(record.split()[1]) if record.startswith("line ") else ref["line_offset"]
            if (ref["source_file"], line) in seen:
                continue
            seen.add((ref["source_file"], line))
            file = ref["source_file"]
            if file not in cache:  # the file as it was before any copy was appended
                data = (root / file).read_bytes()
                cache[file] = _csv_records(data) if file.endswith(".csv") else data.splitlines()
            if file.endswith(".csv"):
                header = cache[file][0]
                self.parts.append((file, header, dict(zip(header, cache[file][line]))))
            else:
                self.parts.append((file, None, json.loads(cache[file][line])))

    def ids(self) -> set[str]:
        found: set[str] = set()

        def visit(v: Any) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    if k in ID_KEYS and isinstance(x, str) and x:
                        found.add(x)
                    visit(x)
            elif isinstance(v, list):
                for x in v:
                    visit(x)
            elif isinstance(v, str) and (parsed := _parse_json_text(v)) is not None:
                visit(parsed)
        for _, _, obj in self.parts:
            visit(obj)
        return found

    def apply(self, fn: Callable[[Any], Any | None]) -> int:
        hits = 0
        for k, (file, header, obj) in enumerate(self.parts):
            obj, h = rewrite(obj, fn)
            self.parts[k] = (file, header, obj)
            hits += h
        return hits

    def append_to(self, root: Path) -> None:
        for file, header, obj in self.parts:
            path = root / file
            data = path.read_bytes()
            with open(path, "ab") as f:
                if data and not data.endswith(b"\n"):
                    f.write(b"\n")
                if header is not None:
                    buf = io.StringIO()
                    csv.writer(buf, lineterminator="\n").writerow([obj[h] for h in header])
                    f.write(buf.getvalue().encode())
                else:
                    f.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")


def new_id(old: str, n: int) -> str:
    if len(old) >= 8 and all(c in "0123456789abcdef" for c in old):  # OTel trace and span ids stay hex
        return hashlib.sha256(f"{old}:{n}".encode()).hexdigest()[:len(old)]
    return f"{old}-s{n:03d}"


def marker(n: int) -> str:
    """A unique, innocuous tag for copy n (letters only: nothing a detector could mistake)."""
    letters = "".join("abcdefghijklmnopqrstuvwxyz"[n // 26 ** k % 26] for k in range(3))
    return f"[copy {letters}]"


def inject(group: Group, ev: dict, item: dict, site: str, shape: str, n: int) -> bool:
    """Change `group` into copy n carrying `item` at `site`; False when the site is not there."""
    old_ids = group.ids()
    response = ev.get("response") or ""
    text = TEXT_SHAPES[shape](item)
    call = (ev.get("tool_calls") or [None])[0]
    if site == "response":
        hit = group.apply(replace_in_text(response, f"{response} {text}"))
    elif site == "prompt":
        hit = group.apply(replace_in_text(ev.get("prompt") or "", f"{ev.get('prompt')} {text}"))
    elif site == "task_name":
        hit = bool(ev.get("task_name")) and group.apply(replace_equal(ev["task_name"], item["standalone"]))
    elif site in ("tool_args_key", "tool_args_value"):
        args = call and call.get("arguments")
        if not isinstance(args, dict) or not args:
            return False
        if site == "tool_args_key":
            new = {**args, item["standalone"]: "true"}
        else:
            key = next((k for k, v in args.items() if isinstance(v, str)), "note")
            new = {**args, key: f"{args.get(key, '')} {item['text']}".strip()}
        hit = group.apply(replace_equal(args, new))
    else:  # tool_call_id
        hit = bool(call and call.get("id")) and group.apply(replace_equal(call["id"], item["standalone"]))
    if not hit or not response or not group.apply(replace_in_text(response, f"{response} {marker(n)}")):
        return False
    group.apply(lambda v: new_id(v, n) if isinstance(v, str) and v in old_ids else None)
    return True


B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{24,}={0,2}")
HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")


def _decoded_runs(raw: str) -> Iterator[str]:
    """The text of every base64 (standard or URL-safe) and hex run in `raw`, decoded from each
    possible alignment (a run cut short at its start decodes from a later offset)."""
    for m in B64_RUN.finditer(raw):
        run = m.group().rstrip("=").replace("-", "+").replace("_", "/")
        for k in range(4):
            part = run[k:]
            try:
                yield base64.b64decode(part + "=" * (-len(part) % 4)).decode("utf-8", "ignore")
            except (binascii.Error, ValueError):
                pass
    for m in HEX_RUN.finditer(raw):
        for k in range(2):
            part = m.group()[k:]
            yield bytes.fromhex(part[:len(part) // 2 * 2]).decode("utf-8", "ignore")


def haystacks(data: bytes) -> list[str]:
    """A file's text in every form a secret could hide in: as written; invisible characters
    dropped and NFKC-folded; every string of its JSON lines (escapes and nested JSON text
    decoded); URL-decoded; and its base64 and hex runs decoded."""
    raw = data.decode("utf-8", "replace")
    strings = []
    for line in raw.splitlines():
        try:
            strings.extend(strings_in(json.loads(line)))
        except ValueError:
            strings.append(line)
    decoded = "\n".join(_decoded_runs(raw))
    return [raw, normalise(raw), normalise("\n".join(strings)), normalise(unquote(raw)), normalise(decoded)]


def _evidence(root: Path) -> list[dict]:
    return [r for p in sorted((root / "data" / "evidence").rglob("*.jsonl")) for r in read_jsonl_file(p)]


def _scored_ids(root: Path) -> dict[tuple[str, int], str]:
    """(scored-run file, line) → evidence id: what an export row's provenance points at."""
    out = {}
    for p in sorted((root / "data" / "scored-runs").rglob("*.jsonl")):
        rel = p.relative_to(root).as_posix()
        for k, r in enumerate(read_jsonl_file(p)):
            out[(rel, k)] = r["id"]
    return out


def _export_outcomes(root: Path, stage: str, export: str) -> dict[str, str]:
    """Evidence id → 'exported' or the quarantine reason, in one export."""
    scored = _scored_ids(root)
    key = lambda prov: scored.get((prov["source_file"], prov["line_offset"]))  # noqa: E731
    out = {}
    for r in export_refusals(Workspace.at(root), stage):
        out[key(r["provenance"])] = r["reason"]
    path = root / "exports" / export
    for r in read_jsonl_file(path) if path.exists() else []:
        out[key(r["provenance"])] = "exported"
    return out


def _plan(root: Path, cases: list[tuple[dict, bool]]) -> list[dict]:
    """Inject the corpus: item k at SITES[k % 6] (else the next site the row has), in the k-th
    text shape, into a copy of an exported row of the next line-based source that has that site;
    and every 10th item also into a row of a source nothing is exported from (its rows are all
    refused: quarantine files must not leak either) — an "extra" copy, whose secret is its main
    copy's, so a leak is told per item. Returns one record per copy."""
    by_source: dict[str, list[tuple[dict, bool]]] = defaultdict(list)
    for ev, exported in cases:
        by_source[ev["source"]].append((ev, exported))
    exported_sources = sorted(s for s, rows in by_source.items() if any(e for _, e in rows))
    other_sources = sorted(s for s in by_source if s not in exported_sources)
    plans, n, cache = [], 0, {}

    def place(item: dict, sources: list[str], k: int, sites: tuple[str, ...], extra: bool) -> None:
        nonlocal n
        for site_k in range(len(sites)):
            site = sites[(k + site_k) % len(sites)]
            shape = E2E_SHAPES[k // len(SITES) % len(E2E_SHAPES)] if site in ("response", "prompt") else "plain"
            for s_k in range(len(sources)):
                source = sources[(k + s_k) % len(sources)]
                rows = [r for r in by_source[source] if r[1]] or by_source[source]
                for r_k in range(len(rows)):
                    ev, exported = rows[(k // len(sources) + r_k) % len(rows)]
                    group = Group(root, ev, cache)
                    if inject(group, ev, item, site, shape, n):
                        group.append_to(root)
                        plans.append({"n": n, "item": item, "site": site, "shape": shape, "source": source,
                                      "base_exported": exported, "marker": marker(n), "extra": extra})
                        n += 1
                        return
        raise AssertionError(f"no row takes {item['id']} at any site")

    for k, item in enumerate(ITEMS):
        place(item, exported_sources, k, SITES, extra=False)
        if k % 10 == 0 and other_sources:
            place(item, other_sources, k // 10, ("response", "prompt"), extra=True)
    return plans


def _leaks(root: Path, items: list[dict]) -> dict[str, list[str]]:
    """Item id → the files under exports/ holding its secret or any 16-character piece of it (24
    for a private note).
    Any such piece holds an 8-character piece that starts at a multiple of 8 in the file's
    text, so the texts are scanned at that stride against an index of the secrets' pieces."""
    grams: dict[str, set[str]] = defaultdict(set)
    pieces, short = {}, {}
    for item in items:
        secret = normalise(item["secret"])
        if len(secret) < 16:
            short[item["id"]] = secret
        # a private note is prose: 16 characters of it (" asked us not to ") can be another
        # item's prose, so a note leaks when 24 of its characters do
        pieces[item["id"]] = windows(secret, 24 if item["kind"] == "private_note" else 16)
        for k in range(len(secret) - 7):
            grams[secret[k:k + 8]].add(item["id"])
    out: dict[str, list[str]] = defaultdict(list)
    for path in sorted((root / "exports").rglob("*")):
        if not path.is_file():
            continue
        name, hit = path.relative_to(root).as_posix(), set()
        for hay in haystacks(path.read_bytes()):
            hit.update(i for i, secret in short.items() if secret in hay)
            for pos in range(0, len(hay) - 7, 8):
                for i in grams.get(hay[pos:pos + 8], ()):
                    region = hay[max(0, pos - 23):pos + 31]
                    if i not in hit and any(p in region for p in pieces[i]):
                        hit.add(i)
        for i in sorted(hit):
            out[i].append(name)
    return dict(out)


@pytest.mark.slow
def test_no_injected_secret_reaches_any_export_end_to_end(sample_run, ws, record_property):
    """Every corpus item, injected into a copy of an exported row (in its answer, prompt, task
    name, tool-call arguments as key or value, or tool-call id; plain or encoded), is in no file
    under exports/ after run-all with sensitive = "quarantine" and with "redact", nor after any
    convert format; and each copy of an exported row is still accounted for in the RAG export:
    exported (redacted) or quarantined as secret_detected / pii_detected."""
    from typer.testing import CliRunner

    from refinery.cli import app

    root = ws.root
    rag = _export_outcomes(root, "rag", "rag/playbooks.jsonl")
    cases = [(ev, rag.get(ev["id"]) == "exported") for ev in _evidence(root)
             if Path(ev["provenance"]["source_file"]).suffix in (".jsonl", ".csv")]
    plans = _plan(root, cases)
    runner = CliRunner()
    results: dict[str, dict] = {}
    problems: list[str] = []
    for mode in ("quarantine", "redact"):
        # the injected rows are copies of the sample's with a secret put in: near-duplicates of
        # them, which the exports would drop for that (the scan is what is tested here)
        (root / "refinery.toml").write_text(f'[export]\nsensitive = "{mode}"\nnear_duplicates = false\n')
        run = runner.invoke(app, ["run-all", "--workspace", str(root)])
        if run.exit_code != 0:
            problems.append(f"{mode}: run-all exited {run.exit_code} ({run.exception!r}): {run.output[-2000:]}")
        for fmt in CONVERT_FORMATS:
            conv = runner.invoke(app, ["convert", "--to", fmt, "--workspace", str(root)])
            if conv.exit_code != 0:
                problems.append(f"{mode}: convert --to {fmt} exited {conv.exit_code}: {conv.output[-500:]}")
        evidence = {}
        for ev in _evidence(root):
            for plan in plans:
                if plan["marker"] in (ev.get("response") or ""):
                    evidence[plan["n"]] = ev["id"]
        outcomes = _export_outcomes(root, "rag", "rag/playbooks.jsonl")
        lost = {}
        for plan in plans:
            ev_id = evidence.get(plan["n"])
            outcome = outcomes.get(ev_id) if ev_id else "no evidence"
            if ev_id is None or (plan["base_exported"] and outcome not in PRIVACY_REASONS | {"exported"}):
                lost[plan["n"]] = outcome
        results[mode] = {"leaks": _leaks(root, ITEMS), "lost": lost}

    main = [p for p in plans if not p["extra"]]
    by_kind: dict[str, Counter] = defaultdict(Counter)
    by_site: dict[str, Counter] = defaultdict(Counter)
    for plan in main:
        for c in (by_kind[plan["item"]["kind"]], by_site[f"{plan['site']}/{plan['shape']}"]):
            c["injected"] += 1
            for mode in results:
                c[f"leaked_{mode}"] += plan["item"]["id"] in results[mode]["leaks"]
    for plan in plans:  # an extra copy lost counts under its item's kind
        for mode in results:
            by_kind[plan["item"]["kind"]][f"lost_{mode}"] += plan["n"] in results[mode]["lost"]
    cols = ("injected", "leaked_quarantine", "leaked_redact", "lost_quarantine", "lost_redact")
    total = Counter()
    for c in by_kind.values():
        total.update(c)
    sources = Counter(p["source"] + (" (extra)" if p["extra"] else "") for p in plans)
    record_property("e2e_leak_table", "\n\n".join([
        _table(("kind", *cols), [(k, *(c[x] for x in cols)) for k, c in sorted(by_kind.items())]
               + [("total", *(total[x] for x in cols))],
               f"end to end: {len(main)} corpus items, each injected into a copy of an exported row (and "
               f"{len(plans) - len(main)} also into a row of a source nothing is exported from); leaked = any "
               "16-character piece of the secret in any file under exports/ (run-all, every convert format, "
               "quarantine); lost = a copy neither exported nor quarantined as secret/pii"),
        _table(("site/shape", *cols[:3]), [(k, *(c[x] for x in cols[:3])) for k, c in sorted(by_site.items())],
               "end to end per site and shape (where the item's main copy carried it)"),
        "copies per source: " + ", ".join(f"{s} {c}" for s, c in sorted(sources.items())),
    ]))
    for mode, res in results.items():
        for plan in main:
            if files := res["leaks"].get(plan["item"]["id"]):
                problems.append(f"{mode}: leaked {plan['item']['kind']} {label(plan['item'])} at {plan['site']}/"
                                f"{plan['shape']} from {plan['source']} into {', '.join(files)}")
        for n, outcome in sorted(res["lost"].items()):
            plan = plans[n]
            problems.append(f"{mode}: lost {plan['item']['kind']} {label(plan['item'])} at {plan['site']} from "
                            f"{plan['source']}: {outcome}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
