"""Secrets and personal data: each kind, the look-alikes that must pass, hiding places, redaction,
the rule sources, and the independent second pass."""

from __future__ import annotations

import base64
import json
import sys
import unicodedata
from urllib.parse import quote

import pytest

from refinery import sensitive
from refinery.sensitive import check, rules, text

EXAMPLES = {
    "api_key": ["use sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c now", "AKIAIOSFODNN7EXAMPLE",
                "token ghp_" + "a1B2" * 9, "xoxb-123456789012-abcdefghij", "AIza" + "x1" * 17 + "y",
                "api_key = 'abcdef1234567890'", "sk-ant-api03-abcdefghijklmnop1234",
                "glpat-" + "Zq3xW9kLp2Rt7Yb4Nm8V", "hf_" + "aB3dE5" * 6, "sk-proj-Qm4T_x9Lr2-Vb7Kw1Zp8Nc3Hd6Jf5Gs0Ya",
                "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "the secret key is wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
    "bearer_token": ["Authorization: Bearer abc.DEF-123_456789xyz",
                     "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJvcHMifQ.c2lnbmF0dXJl"],
    "private_key": ["-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
                    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk (cut off)",
                    "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----"],
    "password": ["DB password is hunter2-prod", "password: s3cret!", "pwd=letmein99",
                 "the password for the staging db is Tr0ub4dor&3", "postgres://app:s3cr3t@db:5432/orders",
                 "redis://:hunter2@redis-primary:6379/0"],
    "email": ["write to jane.doe@corvid-analytics.com", "x@y.io"],
    "phone": ["call +1 415 555 0142", "(415) 555-0142", "415-555-0142", "+44 20 7946 0958", "+49 30 901820",
              "+33 1 42 68 53 00", "+81 3-1234-5678", "+91 98765 43210", "0044 20 7946 0958"],
    "credit_card": ["card 4111 1111 1111 1111 on file", "5500-0000-0000-0004", "378282246310005"],
    "iban": ["IBAN DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432"],
    "ssn": ["SSN 123-45-6789", "social security number 123456789"],
    "private_note": ["[PRIVATE] she is on leave", "<private>salary 90k</private>", "Private note: VIP"],
}

LOOK_ALIKES = [
    "on 2026-12-10 at 07:40", "invoice INV-4471 for $49.00", "It returned 1,326 rows", "version 1.2.3.4",
    "kubectl rollout undo deploy/checkout-api -n prod", "the task-runner and ask-me skill",
    "WHERE created_at >= '2026-08-01' AND created_at < '2026-09-01'", "reset your password in settings",
    "Exit Code: 137", "EUR 2,900 and HX7Q2", "bearer of bad news", "the password is required",
    "ts 1793531536000", "trace 0af7651916cd43dd8448eb211c80319c", "call_Kud0j0DxWSmLzv9W5m6qVqXn",
    "sha256 7af1947accb64a719fe0ebb688fccf8158e2869125e6cc473938c1889d46ff75", "+05:30 offset",
    "uuid 550e8400-e29b-41d4-a716-446655440000", "key metrics for checkout-api-v2-deployment",
    "the sk-learn estimators", "sk-learn-compatible-estimators-for-pipelines",
    "order 1234567812345678 shipped", '{"pass":true,"score":1}', "pass: false",
    "data/_kb/anthropic_messages/ORIGIN.md is not a file refinery reads",
    # seen by a review: code, config and paths that only look like secrets
    "git clone git@github.com:acme/billing.git", "class A {\n private:\n  int x;\n};", "private: true",
    "#private-section { color: red }", "password = request.form['password']", "password: ${DB_PASSWORD}",
    "password: <your-password>", "password: ********", "pin = board.D4", "the password is correct",
    "S3 object key uploads/2024/05/report_q2.pdf", "model key: mistralai/Mistral-7B-Instruct-v0.3",
    "The monkey ate f81d4fae7dec11d0a76500a0c91e6bf6", "cache key: user_profile_v2_8a7b6c5d4e",
    "max_tokens=1024", '{"prompt_tokens": 59, "completion_tokens": 15}',
]


@pytest.mark.parametrize(("kind", "text_"), [(k, t) for k, ts in EXAMPLES.items() for t in ts])
def test_each_kind_is_found(kind, text_):
    assert {k for k, _, _ in sensitive.find(text_)} == {kind}


@pytest.mark.parametrize("text_", LOOK_ALIKES)
def test_look_alikes_are_not(text_):
    assert list(sensitive.find(text_)) == []


KEY = "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"


@pytest.mark.parametrize(("shape", "value"), [
    ("zero-width", "use " + "\u200b".join(KEY) + " now"),
    ("word joiner and BOM", "use sk-\u2060live-4f9a8b7c\ufeff6d5e4f3a2b1c0d9e8f7a6b5c"),
    ("full-width", unicodedata.normalize("NFKC", KEY).translate({c: c + 0xFEE0 for c in range(0x21, 0x7F)})),
    ("base64", "payload " + base64.b64encode(f"key={KEY}".encode()).decode()),
    ("url-safe base64", base64.urlsafe_b64encode(f"{KEY}??>>".encode()).decode().rstrip("=")),
    ("hex", "blob " + f"token {KEY}".encode().hex()),
    ("url-encoded", "https://x.test/cb?k=" + quote(f"key {KEY}", safe="")),
    ("json escapes", "".join(f"\\u{ord(c):04x}" for c in KEY)),
    ("base64 of hex", base64.b64encode(KEY.encode().hex().encode()).decode()),
    ("dict key", {"headers": {KEY: "x"}}),
    ("json text", json.dumps({"auth": {"k": KEY}})),
    ("json text with escapes", json.dumps({"k": KEY}).replace("s", "\\u0073")),
    ("content parts", [{"type": "text", "text": f"the key is {KEY}"}]),
])
def test_hidden_secrets_are_found(shape, value):
    assert sensitive.first_finding([("field", value)]) is not None, shape


@pytest.mark.parametrize(("shape", "value"), [
    ("card as a JSON number", {"card": 4111111111111111}),
    ("SSN as a JSON number", {"ssn": 123456789}),
    ("name/value pair", {"env": [{"name": "DB_PASSWORD", "value": "Xk29abQz7Lm"}]}),
    ("name/value pair as JSON text", json.dumps({"env": [{"name": "DB_PASSWORD", "value": "Xk29abQz7Lm"}]})),
    ("full-width key", {"\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44": "Tr0ub4dor&3"}),
    ("zero-width in the key", {"p\u200bassword": "Tr0ub4dor&3"}),
    ("a PIN", {"pin": "4821"}), ("pw", {"pw": "Hunter2!"}), ("short api key", {"api_key": "abcd1234efgh"}),
    ("a list under the key", {"password": ["Tr0ub4dor&3"]}),
    ("one level down", {"db_password": {"value": "Tr0ub4dor&3"}}),
    ("ANSI colours", "\x1b[32mpassword:\x1b[0m Tr0ub4dor&3"),
    ("NUL inside", "sk-\x00live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"),
    ("base64 glued to a word", "key" + base64.b64encode(f"token {KEY}".encode()).decode()),
    ("base64 of an SSN", "MTIzLTQ1LTY3ODk="),
    ("HTML entities", "Contact alice.smith&#64;example.com."),
    ("a labelled SSN never issued", {"customer_ssn": 219099999}),
    ("camelCase name", json.dumps({"rows": [1], "nextPageToken": "CiAKGjBpNDd2Nmp2Zml2cXRtcGIwOWZ0amJ2"})),
    ("a bare AWS secret key", "then wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY and retry"),
    ("base64 three deep", base64.b64encode(base64.b64encode(KEY.encode().hex().encode())).decode()),
])
def test_secrets_in_the_places_a_review_found(shape, value):
    assert sensitive.first_finding([("field", value)]) is not None, shape
    redacted, _ = sensitive.redact(value)
    assert sensitive.first_finding([("field", redacted)]) is None, shape


def test_a_value_under_a_secret_name_is_redacted_whole():
    assert sensitive.redact({"password": "purple monkey dishwasher 42"})[0] == {"password": "[REDACTED:password]"}
    assert sensitive.redact_text("password=Tr0ub,4dor&3x then") == "[REDACTED:password] then"
    assert sensitive.redact({"card": 4111111111111111, "n": 3})[0] == {"card": "[REDACTED:credit_card]", "n": 3}


def test_json_text_whose_finding_spans_two_fields_is_redacted_as_text():
    value = '{"trace_id":"tr-9","note":"api key","v":"Zx9Qw8Er7Ty6Ui5Op4As"}'
    assert sensitive.first_finding([("x", value)]) is not None
    out = sensitive.redact_text(value)
    assert "Zx9Qw8Er7Ty6Ui5Op4As" not in out and sensitive.first_finding([("x", out)]) is None


def test_first_finding_names_kind_and_field_not_the_value():
    fields = [("prompt", "hello"), ("tool_calls", [{"headers": {"auth": "Bearer abcdefghijklmnop12"}}])]
    assert sensitive.first_finding(fields) == ("bearer_token", "tool_calls")
    assert sensitive.first_finding([("tool_calls", {KEY: 1})]) == ("api_key", "tool_calls (a key)")
    assert all(KEY not in f.rule + f.where for f in sensitive.scan([("x", {KEY: KEY})]))


def test_allowed_kinds_are_left_alone():
    assert sensitive.first_finding([("response", "mail x@y.io")], allow=["email"]) is None
    assert sensitive.first_finding([("response", "mail x@y.io, pwd=letmein99")], allow=["email"]) == \
        ("password", "response")


def test_redact_replaces_every_match_in_nested_values():
    value = {"text": f"key {KEY} and x@y.io", "n": 3, "list": ["(415) 555-0142"]}
    redacted, kinds = sensitive.redact(value)
    assert redacted == {"text": "key [REDACTED:api_key] and [REDACTED:email]", "n": 3,
                        "list": ["[REDACTED:phone]"]}
    assert set(kinds) == {"api_key", "email", "phone"}


def test_redaction_covers_the_whole_token():
    # a rule that knows a key's prefix and minimum length must not leave the rest behind
    long_key = "sk-ant-api03-" + "Ab9_" * 20 + "tail-XYZ0123456789"
    out = sensitive.redact_text(f"use {long_key}, then retry")
    assert out == "use [REDACTED:api_key], then retry"
    assert "tail" not in out and "XYZ" not in out


@pytest.mark.parametrize("value", [
    "use " + "\u200b".join(KEY) + " now", {"args": {KEY: {"nested": KEY}}}, json.dumps({KEY: [KEY, "ok"]}),
    "a " + base64.b64encode(f"key={KEY}".encode()).decode() + " b", "DE89 3704 0044 0532 0130 00",
])
def test_redacted_values_hold_nothing_and_rescan_clean(value):
    redacted, kinds = sensitive.redact(value)
    assert kinds
    blob = json.dumps(redacted)
    assert KEY[8:24] not in blob and "0532 0130" not in blob
    assert sensitive.first_finding([("x", redacted)]) is None


def test_redacted_json_text_stays_json_and_keys_stay_apart():
    value = json.dumps({"sk-live-" + "a1" * 12: 1, "sk-live-" + "b2" * 12: 2, "city": "Tokyo"})
    out = json.loads(sensitive.redact_text(value))
    assert out == {"[REDACTED:api_key]": 1, "[REDACTED:api_key]#2": 2, "city": "Tokyo"}


def test_kind_families():
    assert {sensitive.reason_family(k) for k in sensitive.SECRET_KINDS} == {"secret"}
    assert {sensitive.reason_family(k) for k in sensitive.PII_KINDS} == {"pii"}
    assert set(EXAMPLES) == set(sensitive.KINDS)


def test_every_format_character_is_stripped():
    cf = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
    assert text.plain("a" + "".join(cf) + "b") == "ab"


def test_the_detect_secrets_rules_file_matches_the_installed_package():
    assert rules.main(["--check"]) == 0, "run `python -m refinery.sensitive.rules --write`"


def test_every_detect_secrets_plugin_is_mapped_to_a_kind_or_left_out_with_a_reason():
    data = rules.read_detect_secrets()
    regex_plugins = {p["plugin"] for p in data["plugins"] if p["patterns"]}
    assert regex_plugins <= set(rules.DETECT_SECRETS) | set(rules.DETECT_SECRETS_SKIPPED)
    assert {r.id.split("#")[0] for r in rules.all_rules() if r.id.startswith("detect-secrets:")} == \
        {f"detect-secrets:{p}" for p in regex_plugins - set(rules.DETECT_SECRETS_SKIPPED)}
    assert all(kind in rules.KINDS for kind, _ in rules.DETECT_SECRETS.values())


def _ungated(rule, p):
    """Whether `rule` finds something in `p` with its keywords and gate ignored."""
    for m in rule.regex.finditer(p):
        start, end = m.span(1) if rule.regex.groups and m.group(1) is not None else m.span()
        if rule.valid is not None and not rule.valid(p[start:end]):
            continue
        if rule.near is not None and rule.near.search(p, max(0, start - 64), start) is None:
            continue
        return True
    return False


def test_each_rule_keyword_gate_lets_its_own_examples_through():
    # the keyword and gate pre-filters must never hide a match: run every rule without them
    for kind, texts in EXAMPLES.items():
        for t in texts:
            p = text.plain(t)
            ungated = {r.id for r in rules.all_rules() if r.kind == kind and _ungated(r, p)}
            gated = {h.rule for h in sensitive._scan_text(p)}
            assert ungated <= gated, (kind, t)


def test_ruleset_names_sources_and_versions():
    rs = sensitive.ruleset()
    assert set(rs) == {"detect-secrets", "python-stdnum", "refinery"} and all(rs.values())


#: What the second pass, a coarser net with other rules, is known not to see.
SECOND_PASS_BLIND = {"the password for the staging db is Tr0ub4dor&3", "Private note: VIP"}


def test_second_pass_finds_what_the_engine_would_and_is_quiet_on_look_alikes():
    for kind, texts in EXAMPLES.items():
        for t in texts:
            assert bool(check.second_pass([("x", t)])) == (t not in SECOND_PASS_BLIND), (kind, t)
    for t in LOOK_ALIKES:
        assert check.second_pass([("x", t)]) == [], t


def test_second_pass_runs_the_keyword_detector_only_where_its_words_are(monkeypatch):
    """detect-secrets' keyword detector is the second pass's slowest plugin; it is skipped on a
    line holding none of its DENYLIST words ("monkey", "author" and "capital" are none)."""
    calls = []
    (det,) = [p for _, p in check._plugins() if type(p).__name__ == "KeywordDetector"]
    real = det.analyze_line
    monkeypatch.setattr(det, "analyze_line", lambda **kw: calls.append(kw["line"]) or real(**kw))
    check._SEEN.clear()
    assert check.second_pass([("x", "the monkey author raised capital for the api team")]) == []
    assert calls == []
    assert [f.kind for f in check.second_pass([("x", 'DB_PASS = "hunter2-prod-x9"')])] == ["password"]
    assert calls and all("DB_PASS" in c for c in calls)
    # the literal gates compare case foldings, as the detectors' (?i) expressions do
    assert [f.kind for f in check.second_pass([("x", "paſſword = 'hunter2x9zz'")])] == ["password"]
    assert [f.kind for f in check.second_pass([("x", "API_\u212aEY=abcdefghijklmnop1234")])] == ["api_key"]
    # the detector's own words, not a guess at them: "contraseña" was never looked at before
    assert [f.kind for f in check.second_pass([("x", "contraseña = 'abc12345'")])] == ["password"]


@pytest.mark.parametrize("text_", [
    "integrity sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg==",
    "org-AbC123dEf456GhI789jKlmN", "cus_NffrFeUfNV2Hib", "pi_3MtwBwLkdIwHu7ix28a3tqPa",
])
def test_second_pass_knows_documented_ids(text_):
    assert check.second_pass([("x", text_)]) == []


def test_second_pass_looks_inside_encodings():
    for value in ["\u200b".join(KEY), base64.b64encode(KEY.encode()).decode(), quote(f"k {KEY}", safe=""),
                  {"args": json.dumps({KEY: 1})}]:
        assert check.second_pass([("x", value)]), value
