from __future__ import annotations

import jsonschema
import pytest

from conftest import evidence_rows, quarantine_rows, write_kb
from refinery import materialize
from refinery.models import SCHEMA_MODELS
from refinery.schemas import SCHEMA_DIR, load_schema, render_schemas, stale_schemas


def test_schemas_dir_is_up_to_date():
    assert stale_schemas() == [], "schemas/ is stale: run `make schemas` and commit the result"


def test_stale_detection_catches_an_edit(tmp_path):
    d = tmp_path / "schemas"
    d.mkdir()
    for name, data in render_schemas().items():
        (d / name).write_bytes(data)
    assert stale_schemas(d) == []
    victim = sorted(d.iterdir())[0]
    victim.write_bytes(victim.read_bytes().replace(b'"title"', b'"titel"', 1))
    (d / "old_record.v0.json").write_text("{}")
    assert stale_schemas(d) == sorted([victim.name, "old_record.v0.json"])


@pytest.mark.parametrize("stem", sorted(SCHEMA_MODELS))
def test_every_schema_is_valid_and_versioned(stem):
    schema = load_schema(stem)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "schema_version" in schema["properties"] or stem == "provenance"
    assert schema.get("additionalProperties") is False


def test_materialized_rows_validate_against_the_json_schemas(ws, cfg):
    from test_materialize import load_all_fixtures

    load_all_fixtures(ws)
    write_kb(ws, {"mystery.jsonl": '{"a": 1}\n'})
    materialize.run(ws, cfg)
    ev = jsonschema.Draft202012Validator(load_schema("evidence_record"))
    q = jsonschema.Draft202012Validator(load_schema("quarantine_record"))
    rows = evidence_rows(ws)
    assert rows
    for row in rows:
        ev.validate(row)
    for row in quarantine_rows(ws):
        q.validate(row)


def test_the_schema_rejects_a_forbidden_sft_category():
    v = jsonschema.Draft202012Validator(load_schema("sft_sample"))
    row = {"id": "x", "instruction": "i", "response": "r", "quality_score": "rejected", "score": 0.1,
           "source": "s", "provenance": {"source_file": "f", "line_offset": 0, "sig_hash": "0" * 64,
                                         "recorded_at": None}}
    assert any("quality_score" in str(e.path) for e in v.iter_errors(row))
    row["quality_score"] = "accepted"
    v.validate(row)


def test_schema_dir_is_in_the_repo():
    assert SCHEMA_DIR.is_dir() and len(list(SCHEMA_DIR.glob("*.json"))) == len(SCHEMA_MODELS)
