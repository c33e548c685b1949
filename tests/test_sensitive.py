"""Secrets and personal data: one test per kind, the look-alikes that must pass, redaction."""

from __future__ import annotations

import pytest

from refinery import sensitive

EXAMPLES = {
    "api_key": ["use sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c now", "AKIAIOSFODNN7EXAMPLE",
                "token ghp_" + "a1B2" * 9, "xoxb-123456789012-abcdefghij", "AIza" + "x" * 35,
                "api_key = 'abcdef1234567890'", "sk-ant-api03-abcdefghijklmnop1234"],
    "bearer_token": ["Authorization: Bearer abc.DEF-123_456789xyz",
                     "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJvcHMifQ.c2lnbmF0dXJl"],
    "private_key": ["-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
                    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk (cut off)",
                    "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----"],
    "password": ["DB password is hunter2-prod", "password: s3cret!", "pwd=letmein99"],
    "email": ["write to jane.doe@corvid-analytics.com", "x@y.io"],
    "phone": ["call +1 415 555 0142", "(415) 555-0142", "415-555-0142", "+44 20 7946 0958"],
    "private_note": ["[PRIVATE] she is on leave", "<private>salary 90k</private>", "Private note: VIP"],
}

LOOK_ALIKES = [
    "on 2026-12-10 at 07:40", "invoice INV-4471 for $49.00", "It returned 1,326 rows", "version 1.2.3.4",
    "kubectl rollout undo deploy/checkout-api -n prod", "the task-runner and ask-me skill",
    "WHERE created_at >= '2026-08-01' AND created_at < '2026-09-01'", "reset your password in settings",
    "Exit Code: 137", "EUR 2,900 and HX7Q2", "bearer of bad news",
]


@pytest.mark.parametrize(("kind", "text"), [(k, t) for k, ts in EXAMPLES.items() for t in ts])
def test_each_kind_is_found(kind, text):
    assert [k for k, _, _ in sensitive.find(text)] == [kind]


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_are_not(text):
    assert list(sensitive.find(text)) == []


def test_first_finding_names_kind_and_field_not_the_value():
    fields = [("prompt", "hello"), ("tool_calls", [{"headers": {"auth": "Bearer abcdefghijklmnop"}}])]
    assert sensitive.first_finding(fields) == ("bearer_token", "tool_calls")


def test_allowed_kinds_are_left_alone():
    assert sensitive.first_finding([("response", "mail x@y.io")], allow=["email"]) is None
    assert sensitive.first_finding([("response", "mail x@y.io, pwd=letmein99")], allow=["email"]) == \
        ("password", "response")


def test_redact_replaces_every_match_in_nested_values():
    value = {"text": "key sk-live-4f9a8b7c6d5e4f3a2b1c0d9e and x@y.io", "n": 3, "list": ["(415) 555-0142"]}
    redacted, kinds = sensitive.redact(value)
    assert redacted == {"text": "key [REDACTED:api_key] and [REDACTED:email]", "n": 3,
                        "list": ["[REDACTED:phone]"]}
    assert kinds == ["api_key", "email", "phone"]


def test_kind_families():
    assert {sensitive.reason_family(k) for k in sensitive.SECRET_KINDS} == {"secret"}
    assert {sensitive.reason_family(k) for k in sensitive.PII_KINDS} == {"pii"}
    assert set(EXAMPLES) == set(sensitive.KINDS)
