"""Benchmark: materialize or run-all throughput and peak memory against a bare parse of the input.

    python bench/bench_pipeline.py --rows 100000 [--command materialize|run-all] [--workers 0]

Generates the sample streams at the given size (cached under bench/out/), times a bare
single-core parse of every line (orjson for JSONL, csv for CSV), then runs
`refinery <command>` in a subprocess and reads its peak RSS (the largest of the process and
its workers). Prints a table and writes bench/out/<command>-<rows>.json. Run each command in
its own invocation: the peak RSS is per benchmark process.
"""

from __future__ import annotations

import argparse
import hashlib
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from refinery.sample import generate  # noqa: E402


def bare_parse(kb: Path) -> tuple[int, float]:
    """Parse every record the cheapest way there is, single core: orjson on each JSONL line
    (gzip too), csv on each CSV row, orjson on each whole JSON document and archive member.
    Returns (units parsed, seconds): lines, rows, documents and members — not records."""
    import gzip
    import zipfile

    from refinery.containers import open_binary, sniff

    units = 0
    t0 = time.perf_counter()
    for p in sorted(q for q in kb.rglob("*") if q.is_file() and not q.name.startswith(".")):
        container, compressed = sniff(p)
        if container == "lines":
            with open_binary(p, compressed) as f:
                for line in f:
                    try:
                        orjson.loads(line)
                    except orjson.JSONDecodeError:
                        pass
                    units += 1
        elif container == "csv":
            with (gzip.open(p, "rt", encoding="utf-8", errors="surrogateescape", newline="") if compressed else
                  open(p, encoding="utf-8", errors="surrogateescape", newline="")) as f:
                units += sum(1 for _ in csv.reader(f)) - 1
        elif container == "json":
            with open_binary(p, compressed) as f:
                orjson.loads(f.read())
            units += 1
        elif container == "zip":
            with zipfile.ZipFile(p) as zf:
                for name in zf.namelist():
                    orjson.loads(zf.read(name))
                    units += 1
    return units, time.perf_counter() - t0


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sensitive_scan_cost(ws: Path) -> dict:
    """CPU of the sensitive-data scan alone over every evidence record's exported fields, in this
    process: once as run-all scans (each distinct string once), and per distinct record with
    nothing cached — the cost on traces that never repeat a string."""
    from refinery import sensitive
    from refinery.export import _texts

    records = [orjson.loads(line) for p in sorted((ws / "data" / "evidence").rglob("*.jsonl"))
               for line in p.read_bytes().splitlines()]
    sensitive._CACHE.clear()
    c0 = time.process_time()
    for ev in records:
        sensitive.scan(_texts(ev))
    cached = time.process_time() - c0
    distinct = list({orjson.dumps(_texts(ev)): ev for ev in records}.values())[:5000]
    c0 = time.process_time()
    for ev in distinct:
        sensitive._CACHE.clear()
        sensitive.scan(_texts(ev))
    uncached = (time.process_time() - c0) / max(len(distinct), 1)
    chars = sum(len(t) for ev in distinct for t, _, _ in sensitive._walk([v for _, v in _texts(ev)]))
    return {"scan_records": len(records), "scan_cpu_s": round(cached, 3),
            "scan_uncached_us_per_record": round(uncached * 1e6, 1),
            "scan_uncached_chars_per_record": round(chars / max(len(distinct), 1))}


def run(command: str, ws: Path, workers: int, extra: list[str]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "refinery", command, "--workspace", str(ws), "--json",
                           "--workers", str(workers), *extra], capture_output=True, cwd=HERE.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{command} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return orjson.loads(proc.stdout), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=0, help="0 = one per core")
    ap.add_argument("--command", choices=("materialize", "run-all"), default="materialize")
    args = ap.parse_args()

    # the cache is keyed by the generator's code too, so a changed generator regenerates
    gen = hashlib.sha256(b"".join((HERE.parent / "refinery" / f).read_bytes()
                                  for f in ("sample.py", "sample_formats.py"))).hexdigest()[:8]
    ws = HERE / "out" / f"ws-{args.rows}-{args.seed}-{gen}"
    kb = ws / "data" / "_kb"
    if not (kb / ".complete").exists():
        print(f"generating {args.rows:,} rows into {kb} ...", file=sys.stderr)
        t0 = time.perf_counter()
        generate(args.rows, args.seed, kb)
        (kb / ".complete").write_text("")
        print(f"  {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    size = sum(p.stat().st_size for p in kb.rglob("*") if p.is_file() and not p.name.startswith("."))

    parsed, parse_s = bare_parse(kb)
    # run-all --force: every stage computed, whatever an earlier bench run left in the workspace
    force = ["--force"] if args.command == "run-all" else []
    cpu0 = children_cpu()
    out, wall = run(args.command, ws, args.workers, force)
    cpu = children_cpu() - cpu0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if args.command == "run-all":
        r = out["receipts"]
        mc = r["materialize"]["counts"]
        m = {"rows_in": mc["rows_in"], "evidence": mc["rows_out"], "quarantined": mc["quarantined"],
             "seconds": r["materialize"]["timings"]["seconds"]}
    else:
        m = out
    result = {
        "command": args.command, "rows": m["rows_in"], "parsed_units": parsed, "bytes": size, "cores": os.cpu_count(),
        "workers": args.workers, "bare_parse_s": round(parse_s, 3), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
        "rows_per_s": round(m["rows_in"] / wall), "x_bare_parse": round(wall / parse_s, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1), "materialize_s": m["seconds"],
        "evidence": m["evidence"], "quarantined": m["quarantined"],
    }
    if args.command == "run-all":
        result.update({"score_s": r["score"]["timings"]["seconds"],
                       "export_s": r["export-rag"]["timings"]["seconds"],  # one pass writes all three
                       "rag": r["export-rag"]["counts"]["written"], "sft": r["export-sft"]["counts"]["written"],
                       "preference_pairs": r["export-preference"]["counts"]["written"]})
        scan = sensitive_scan_cost(ws)
        result.update(scan, scan_share_of_cpu=f"{scan['scan_cpu_s'] / cpu:.1%}")
        again, again_wall = run(args.command, ws, args.workers, [])  # unchanged inputs: every stage reused
        assert all(x["reused_from"] for x in again["receipts"].values()), "expected every stage to be reused"
        result["rerun_unchanged_s"] = round(again_wall, 3)
    (HERE / "out" / f"{args.command}-{args.rows}.json").write_text(json.dumps(result, indent=2) + "\n")
    w = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{w}}  {v:,}" if isinstance(v, int) else f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
