"""Golden files: tests/fixtures/<transform>/ holds an input stream and the expected output
(evidence rows in source order, then quarantine rows). Regenerate after an intended change
with REFINERY_UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

import os

import pytest

from conftest import FIXTURES, copy_fixture, evidence_rows, quarantine_rows
from refinery import materialize
from refinery.jsonl import dumps_line

NOT_TRANSFORMS = ("acceptance", "chat_templates", "exports", "retrieval", "real", "secrets")
GOLDEN = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and p.name not in NOT_TRANSFORMS)


def run_fixture(ws, name: str) -> bytes:
    result = materialize.run(ws, copy_fixture(ws, FIXTURES / name), validate=True)
    assert result.transform_errors == 0, [f.first_transform_error for f in result.files]
    ev = sorted(evidence_rows(ws), key=lambda r: (r["provenance"]["source_file"], r["provenance"]["line_offset"]))
    return b"".join(dumps_line(r) for r in [*ev, *quarantine_rows(ws)])


@pytest.mark.parametrize("name", GOLDEN)
def test_golden(ws, name):
    got = run_fixture(ws, name)
    expected = FIXTURES / name / "expected.jsonl"
    if os.environ.get("REFINERY_UPDATE_GOLDEN") == "1":
        expected.write_bytes(got)
    assert expected.exists(), f"no golden file {expected}: run with REFINERY_UPDATE_GOLDEN=1"
    assert got.decode() == expected.read_text(encoding="utf-8")


def test_every_builtin_transform_has_a_golden_fixture():
    from refinery.discovery import BUILTIN_DIR

    modules = {p.stem for p in BUILTIN_DIR.glob("*.py") if not p.name.startswith("_")}
    assert modules <= set(GOLDEN), f"transforms without tests/fixtures/<name>/: {modules - set(GOLDEN)}"
