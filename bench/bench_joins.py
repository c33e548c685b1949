"""Benchmark: a join's memory stays flat as the input grows (OpenAI Batch input ⋈ output by custom_id).

    python bench/bench_joins.py --records 100000 1000000 [--workers 1]

For each size, writes a Batch input file and its output file (responses in completion order,
a few requests without one) holding `records` lines together, then runs
`refinery materialize` on them in a fresh process and reads that process's peak RSS (its own
and its workers'), CPU seconds and wall time. The join spills keyed records to hash buckets of
at most 8 MiB on disk and groups one bucket at a time, so peak memory should not grow with the
input. Prints a table and writes bench/out/joins.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from refinery.sample_formats import write_batch  # noqa: E402

#: Runs the CLI in this interpreter and reports peak RSS and CPU of itself and its workers.
PROBE = """
import resource, sys, json
from refinery.cli import main
sys.argv = ["refinery", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code or 0
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"peak_rss_kib": max(me.ru_maxrss, kids.ru_maxrss), "code": code,
                  "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime}), file=sys.stderr)
"""


def workspace(records: int, seed: int) -> Path:
    gen = hashlib.sha256((HERE.parent / "refinery" / "sample_formats.py").read_bytes()).hexdigest()[:8]
    ws = HERE / "out" / f"joins-{records}-{seed}-{gen}"
    kb = ws / "data" / "_kb"
    if not (kb / ".complete").exists():
        print(f"writing {records:,} Batch records into {kb} ...", file=sys.stderr)
        t0 = time.perf_counter()
        write_batch(records // 2, seed, kb)
        (kb / ".complete").write_text("")
        print(f"  {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return ws


def measure(ws: Path, workers: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, "materialize", "--workspace", str(ws), "--json",
                           "--workers", str(workers)], capture_output=True, cwd=HERE.parent)
    wall = time.perf_counter() - t0
    usage = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    if usage["code"] != 0:
        sys.exit(f"materialize failed ({usage['code']}): {proc.stderr.decode()[-2000:]}")
    out = json.loads(proc.stdout)
    lines = sum(1 for p in (ws / "data" / "_kb").glob("*.jsonl") for _ in open(p, "rb"))
    return {"records": out["rows_in"], "lines": lines, "evidence": out["evidence"], "joined": out["joined"],
            "quarantined": out["quarantined"], "by_reason": out["by_reason"], "wall_s": round(wall, 2),
            "cpu_s": round(usage["cpu_s"], 2), "peak_rss_mib": round(usage["peak_rss_kib"] / 1024, 1),
            "input_mib": round(sum(p.stat().st_size for p in (ws / "data" / "_kb").glob("*.jsonl")) / 2**20, 1),
            "workers": workers, "cores": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=1, help="1 = in process, the memory of one worker")
    args = ap.parse_args()
    results = [measure(workspace(n, args.seed), args.workers) for n in args.records]
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "joins.json").write_text(json.dumps(results, indent=2) + "\n")
    cols = ["records", "evidence", "joined", "quarantined", "input_mib", "wall_s", "cpu_s", "peak_rss_mib"]
    print("  ".join(f"{c:>12}" for c in cols))
    for r in results:
        print("  ".join(f"{r[c]:>12,}" if isinstance(r[c], int) else f"{r[c]:>12}" for c in cols))


if __name__ == "__main__":
    main()
