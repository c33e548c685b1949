from __future__ import annotations

import pytest

from refinery.config import Config, ConfigError, load_config


def test_defaults_without_a_file(ws):
    assert load_config(ws.root) == Config()


def test_unknown_key_is_named(ws):
    (ws.root / "refinery.toml").write_text("[materialize]\nmax_line_byte = 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'materialize.max_line_byte'"):
        load_config(ws.root)


def test_unknown_section_is_named(ws):
    (ws.root / "refinery.toml").write_text("[materialise]\nworkers = 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'materialise'"):
        load_config(ws.root)


def test_bad_value_names_key_and_file(ws):
    (ws.root / "refinery.toml").write_text("[materialize]\nmax_line_bytes = -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(ws.root)
    assert "refinery.toml" in str(e.value) and "materialize.max_line_bytes" in str(e.value)


def test_invalid_toml(ws):
    (ws.root / "refinery.toml").write_text("[materialize\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(ws.root)


def test_mapping_needs_prompt_or_messages(ws):
    (ws.root / "refinery.toml").write_text(
        '[mappings.x]\nmatch = "x.jsonl"\n[mappings.x.fields]\nrecorded_at = "ts"\nresponse = "out"\n')
    with pytest.raises(ConfigError, match="prompt"):
        load_config(ws.root)


def test_precedence_flag_over_file_over_default(ws):
    (ws.root / "refinery.toml").write_text("[materialize]\nworkers = 3\nmax_line_bytes = 500\n")
    cfg = load_config(ws.root, overrides={"materialize": {"workers": 1, "max_line_bytes": None}})
    assert cfg.materialize.workers == 1          # flag wins
    assert cfg.materialize.max_line_bytes == 500  # file beats default, unset flag does not override
    assert cfg.materialize.quarantine_preview_chars == Config().materialize.quarantine_preview_chars


def test_config_hash_changes_with_settings(ws):
    a = load_config(ws.root)
    b = load_config(ws.root, overrides={"materialize": {"max_line_bytes": 10}})
    assert a.config_hash() != b.config_hash() and a.config_hash() == Config().config_hash()


def test_explicit_missing_config_file_is_an_error(ws):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(ws.root, ws.root / "nope.toml")
