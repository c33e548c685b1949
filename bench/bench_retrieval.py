"""Benchmark: replay's BM25 index over a RAG export of N playbooks — build, reuse, query.

    python bench/bench_retrieval.py --playbooks 100000 [--queries 200]

Writes a synthetic RAG export (the bundled sample's playbook shapes, varied: other customers,
invoices, months and amounts, so the vocabulary grows with N) under bench/out/, then times,
in this process: building the index (tokenize + bm25s + publish), opening it again (the
sha256 of the export + loading), and top-3 searches for held-out-like tasks. Prints a table
and writes bench/out/retrieval-<N>.json. Peak RSS is this process's.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from refinery.replay.retrieval import RAG_EXPORT, RagIndex  # noqa: E402
from refinery.workspace import Workspace  # noqa: E402

CUSTOMERS = ["Elm Street Books", "Corvid Analytics", "Northwind", "Blue Heron Cafe", "Acme Robotics", "Kestrel Air"]
TEMPLATES = [
    ("refund_duplicate_charge", "{c} says invoice INV-{n} was charged twice (${a}.00 each). What should support do?",
     "Confirm the duplicate capture of INV-{n} in the ledger, refund the second ${a}.00 charge to the original card "
     "and reply to {c} with the refund reference."),
    ("count_tickets_by_month", "How many rows in tickets were created in {m} 2026? Give the SQL you used.",
     "SELECT count(*) FROM tickets WHERE opened_at >= '2026-{mm}-01' AND opened_at < '2026-{mn}-01'; it returned "
     "{n} rows."),
    ("triage_crashloop", "Pod {s}-api is crashlooping in namespace {s}, why?",
     "It is OOMKilled: the container exceeds its {a}Mi memory limit. Raise it to {a2}Mi and watch the restarts."),
    ("rebook_flight", "Passenger on flight KA{n} missed the connection to {c2}; rebook?",
     "Rebook on the next KA flight to {c2} with seats, waive the change fee, and send the new itinerary."),
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SERVICES = ["checkout", "billing", "search", "payments", "auth", "ledger", "inventory", "notify"]


def synth_export(path: Path, n: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for i in range(n):
            name, prompt, answer = TEMPLATES[i % len(TEMPLATES)]
            m = rng.randrange(12)
            v = {"c": rng.choice(CUSTOMERS), "c2": rng.choice(CUSTOMERS), "n": rng.randrange(1000, 99999),
                 "a": rng.randrange(10, 900), "a2": rng.randrange(900, 2000), "m": MONTHS[m], "mm": f"{m + 1:02d}",
                 "mn": f"{m + 2:02d}", "s": rng.choice(SERVICES) + str(rng.randrange(50))}
            row = {"schema_version": 1, "id": f"rag-{i:016x}", "task_key": f"tk-{i:016x}", "task_name": name,
                   "prompt": prompt.format(**v), "response": answer.format(**v), "tool_calls": [],
                   "category": "accepted", "score": 0.9, "source": "bench",
                   "provenance": {"source_file": "data/scored-runs/bench.jsonl", "line_offset": i,
                                  "sig_hash": f"{i:064x}", "recorded_at": "2026-11-01T00:00:00Z"}}
            f.write(orjson.dumps(row) + b"\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--playbooks", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    root = HERE / "out" / f"retrieval-{args.playbooks}"
    ws = Workspace.at(root)
    export = root / RAG_EXPORT
    if not export.is_file():
        synth_export(export, args.playbooks)
    shutil.rmtree(root / "index", ignore_errors=True)

    t0 = time.perf_counter()
    built = RagIndex.open(ws, "index")
    build_s = time.perf_counter() - t0
    assert built.built
    t0 = time.perf_counter()
    reopened = RagIndex.open(ws, "index")
    reopen_s = time.perf_counter() - t0
    assert not reopened.built

    rng = random.Random(11)
    tasks = [TEMPLATES[i % len(TEMPLATES)][1].format(
        c=rng.choice(CUSTOMERS), c2=rng.choice(CUSTOMERS), n=rng.randrange(1000, 99999), a=rng.randrange(10, 900),
        m=rng.choice(MONTHS), s=rng.choice(SERVICES)) for i in range(args.queries)]
    times = []
    for t in tasks:
        q0 = time.perf_counter()
        hits = reopened.search(t, 3)
        times.append((time.perf_counter() - q0) * 1000)
        assert hits
    times.sort()
    result = {
        "playbooks": args.playbooks, "export_mb": round(export.stat().st_size / 1e6, 1),
        "index_mb": round(sum(p.stat().st_size for p in (root / "index").iterdir()) / 1e6, 1),
        "build_s": round(build_s, 2), "reopen_s": round(reopen_s, 3), "queries": len(times),
        "query_ms_p50": round(statistics.median(times), 2), "query_ms_p95": round(times[int(0.95 * len(times)) - 1], 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    for k, v in result.items():
        print(f"{k:>14}  {v}")
    (HERE / "out" / f"retrieval-{args.playbooks}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
