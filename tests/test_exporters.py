"""Exports are plugins: a new export is one new module in refinery/exporters/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter

import orjson

from conftest import REPO, copy_sample, read_jsonl_file
from refinery import exporters
from refinery.workspace import EXPORT_FILES, PUBLISHED

NEW_EXPORT = '''"""Accepted answers only, as retrieval playbooks of their own: a test's new export."""

from refinery.exporters.rag import Rag


class AcceptedRag(Rag):
    name = "rag_accepted"
    path = "exports/rag_accepted/playbooks.jsonl"
    order = 40
    id_prefix = "rga"
    summary = "Export accepted answers only as retrieval playbooks: exports/rag_accepted/playbooks.jsonl."

    def admits(self, category, s):
        return category == "accepted"

    def row(self, c):
        return {**super().row(c), "id": "rga-" + c.sr["id"][3:]}


EXPORTER = AcceptedRag()
'''


def test_the_registry_is_what_everything_else_reads():
    assert exporters.NAMES == ("rag", "sft", "preference")
    assert EXPORT_FILES == {x.name: x.path for x in exporters.EXPORTERS}
    assert {x.path.rsplit("/", 1)[0] for x in exporters.EXPORTERS} <= set(PUBLISHED)


def test_a_new_export_is_one_new_module(tmp_path):
    """Copy the package, add one module, and the whole pipeline takes the new export: run-all
    writes it with a receipt and accounting, its refusals are in the shared quarantine, it has
    a command, the audit checks it, and trace follows its rows."""
    pkg = tmp_path / "pkg"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "refinery", pkg / "refinery", ignore=ignore)
    for tree in ("schemas", "transforms"):  # what the package finds beside itself
        shutil.copytree(REPO / tree, pkg / tree, ignore=ignore)
    (pkg / "refinery" / "exporters" / "rag_accepted.py").write_text(NEW_EXPORT)
    ws = tmp_path / "ws"
    copy_sample(ws / "data" / "_kb")
    env = {**os.environ, "PYTHONPATH": str(pkg)}

    def refinery(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "refinery", *args], cwd=ws, env=env, capture_output=True,
                              text=True, timeout=300)

    assert "export-rag_accepted" in refinery("--help").stdout
    run = refinery("run-all", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    doc = orjson.loads(run.stdout)
    r = doc["receipts"]["export-rag_accepted"]
    c = r["counts"]
    assert c["rows_in"] == doc["receipts"]["score"]["counts"]["rows_out"] == c["rows_out"] + c["quarantined"]
    rows = read_jsonl_file(ws / "exports/rag_accepted/playbooks.jsonl")
    assert len(rows) == c["written"] > 0 and {row["category"] for row in rows} == {"accepted"}
    assert all(row["id"].startswith("rga-") for row in rows)
    # refused on reading: named in the shared file beside the built-in exports
    shared = read_jsonl_file(ws / "exports/quarantine/export.jsonl")
    named = Counter(q["reason"] for q in shared if "rag_accepted" in q["exports"])
    assert named["category_excluded"] == sum(1 for q in shared if q["reason"] == "category_excluded"
                                             and "sft" in q["exports"])  # SFT takes accepted only, too
    order = ["rag", "sft", "preference", "rag_accepted"]  # as the modules declare it
    assert all(q["exports"] == sorted(q["exports"], key=order.index) for q in shared)
    audit = refinery("audit-full", "--no-rerun")
    assert audit.returncode == 0, audit.stdout[-3000:]
    trace = refinery("trace", rows[0]["id"])
    assert trace.returncode == 0, trace.stdout
