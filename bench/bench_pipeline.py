"""Benchmark: run-all, an unchanged re-run and audit-full side by side, against a bare parse.

    python bench/bench_pipeline.py --rows 100000 [--tasks N] [--command suite|run-all|materialize]

Generates the sample streams at the given size, drawn from rows / 4 distinct tasks by default
so that most export candidates are distinct (cached under bench/out/), times a bare
single-core parse of every line (orjson for JSONL, csv for CSV, each JSON document and archive
member), then runs each command in a subprocess and reads its wall time, CPU seconds and peak
RSS (its own and its workers'). Prints one table and writes bench/out/<command>-<rows>.json.
CPU × parse is the stable figure on a shared machine; wall time depends on what else runs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from refinery.sample import TASKS, generate  # noqa: E402


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


def sensitive_scan_cost(ws: Path) -> dict:
    """CPU of the sensitive-data scan alone over every evidence record's exported fields, in this
    process: once as run-all scans (each distinct string once), and per distinct record with
    nothing cached — the cost on traces that never repeat a string."""
    from refinery import sensitive
    from refinery.export import _texts

    def records():  # streamed: at 10^6 rows the evidence is GBs of objects
        for p in sorted((ws / "data" / "evidence").rglob("*.jsonl")):
            with open(p, "rb") as f:
                for line in f:
                    yield orjson.loads(line)

    sensitive._CACHE.clear()
    n = 0
    distinct: dict[bytes, dict] = {}
    c0 = time.process_time()
    for ev in records():
        n += 1
        texts = _texts(ev)
        sensitive.scan(texts)
        if len(distinct) < 5000:
            distinct.setdefault(orjson.dumps(texts), ev)
    cached = time.process_time() - c0
    distinct = list(distinct.values())
    c0 = time.process_time()
    for ev in distinct:
        sensitive._CACHE.clear()
        sensitive.scan(_texts(ev))
    uncached = (time.process_time() - c0) / max(len(distinct), 1)
    chars = sum(len(t) for ev in distinct for t, _, _ in sensitive._walk([v for _, v in _texts(ev)]))
    return {"scan_records": n, "scan_cpu_s": round(cached, 3),
            "scan_uncached_us_per_record": round(uncached * 1e6, 1),
            "scan_uncached_chars_per_record": round(chars / max(len(distinct), 1))}


def run(command: str, ws: Path, workers: int, extra: list[str]) -> dict:
    """`refinery <command>` in a subprocess: its JSON result, wall seconds, CPU seconds and peak
    RSS — the command's own (os.wait4 reports that child and the workers it waited for)."""
    args = [sys.executable, "-m", "refinery", command, "--workspace", str(ws), "--json", *extra]
    if command != "audit-full":
        args += ["--workers", str(workers)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=HERE.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            try:  # a command that printed its JSON result: what failed (audit-full's checks, say)
                failed = [f"{c['key']}: {'; '.join(c['problems'][:3])}"
                          for c in orjson.loads(out.read()).get("checks", []) if not c.get("ok", True)]
            except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
                failed = []
            sys.exit(f"{command} failed ({proc.returncode}): {err.read().decode()[-2000:]}"
                     + "".join(f"\n  {f[:1000]}" for f in failed))
        return {"result": orjson.loads(out.read()), "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                "peak_rss_mib": usage.ru_maxrss / 1024}


def workspace(rows: int, seed: int, tasks: int) -> Path:
    """The generated streams, cached under bench/out/ by size, seed, task count and the
    generator's code (a changed generator regenerates; older copies are removed)."""
    gen = hashlib.sha256(b"".join((HERE.parent / "refinery" / f).read_bytes()
                                  for f in ("sample.py", "sample_formats.py"))).hexdigest()[:8]
    ws = HERE / "out" / f"ws-{rows}-{seed}-t{tasks}-{gen}"
    for stale in (HERE / "out").glob(f"ws-{rows}-{seed}-*"):
        if stale != ws:
            shutil.rmtree(stale)
    kb = ws / "data" / "_kb"
    if not (kb / ".complete").exists():
        print(f"generating {rows:,} rows ({tasks:,} distinct tasks) into {kb} ...", file=sys.stderr)
        t0 = time.perf_counter()
        generate(rows, seed, kb, tasks=tasks)
        (kb / ".complete").write_text("")
        print(f"  {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return ws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--tasks", type=int, default=None,
                    help="distinct tasks the traces are drawn from (default: rows / 4, so most export "
                         "candidates are distinct; 0: the 54 built-in tasks, as the bundled sample)")
    ap.add_argument("--workers", type=int, default=0, help="0 = one per core")
    ap.add_argument("--command", choices=("suite", "materialize", "run-all"), default="suite",
                    help="suite (default): bare parse, run-all, an unchanged re-run and audit-full, side by side")
    ap.add_argument("--ray", choices=("auto", "yes", "no"), default="auto",
                    help="also run-all with --executor ray (a Ray instance started on this machine for it), next to "
                         "local: auto = when Ray is installed (refinery[ray])")
    args = ap.parse_args()
    tasks = args.rows // 4 if args.tasks is None else args.tasks
    ws = workspace(args.rows, args.seed, tasks)
    kb = ws / "data" / "_kb"
    size = sum(p.stat().st_size for p in kb.rglob("*") if p.is_file() and not p.name.startswith("."))

    # the best of three: the bare parse is the yardstick, so the page cache and a busy moment
    # must not move it (one try ranged 0.44-0.70 s at 10^5)
    tries = []
    for _ in range(3):
        cpu0 = time.process_time()
        parsed, wall = bare_parse(kb)
        tries.append((time.process_time() - cpu0, wall))
    parse_cpu, parse_s = min(tries)
    steps = {"bare parse": {"wall_s": parse_s, "cpu_s": parse_cpu, "peak_rss_mib": None}}
    if args.command == "materialize":
        steps["materialize"] = run("materialize", ws, args.workers, [])
    else:
        # --force: every stage computed, whatever an earlier bench run left in the workspace
        steps["run-all"] = run("run-all", ws, args.workers, ["--force"])
        if args.command == "suite":
            steps["re-run (unchanged)"] = run("run-all", ws, args.workers, [])
            receipts = steps["re-run (unchanged)"]["result"]["receipts"].values()
            assert all(x["reused_from"] for x in receipts), "expected every stage to be reused"
            steps["audit-full"] = run("audit-full", ws, args.workers, [])
        if args.ray == "yes" or (args.ray == "auto" and importlib.util.find_spec("ray") is not None):
            # Ray's workers are not this command's children: the CPU column counts only the
            # driver's; wall time is the figure (it includes starting the Ray instance)
            steps["run-all (ray)"] = run("run-all", ws, args.workers, ["--force", "--executor", "ray"])
            same = steps["run-all (ray)"]["result"]["summary"]["overall_hash"] == \
                steps["run-all"]["result"]["summary"]["overall_hash"]
            assert same, "run-all on Ray gave other receipts than the local run"

    distinct = -(-max(tasks, len(TASKS)) // len(TASKS)) * len(TASKS)  # whole sets of the built-in tasks' variants
    result = {"rows": None, "parsed_units": parsed, "bytes": size, "distinct_tasks": distinct, "cores": os.cpu_count(),
              "workers": args.workers, "steps": {}}
    for name, st in steps.items():
        result["steps"][name] = {k: round(v, 3) if isinstance(v, float) else v
                                 for k, v in st.items() if k != "result"}
        result["steps"][name].update(cpu_x_parse=round(st["cpu_s"] / parse_cpu, 2),
                                     wall_x_parse=round(st["wall_s"] / parse_s, 2))
    main_step = steps.get("run-all") or steps["materialize"]
    out = main_step["result"]
    if "receipts" in out:
        r = out["receipts"]
        result["rows"] = r["materialize"]["counts"]["rows_in"]
        result["stages_s"] = {k: v["timings"]["seconds"] for k, v in r.items()}
        result["evidence"] = r["materialize"]["counts"]["rows_out"]
        result["quarantined_materialize"] = r["materialize"]["counts"]["quarantined"]
        for e in ("rag", "sft", "preference"):
            c, why = r[f"export-{e}"]["counts"], r[f"export-{e}"]["by_reason"]
            admitted = c["written"] + why.get("duplicate_answer", 0) + why.get("near_duplicate", 0) + \
                why.get("pair_limit", 0)
            result[f"export_{e}"] = {"written": c["written"], "quarantined": c["quarantined"],
                                     "duplicate_answer": why.get("duplicate_answer", 0),
                                     "near_duplicate": why.get("near_duplicate", 0),
                                     "distinct_share": round(1 - why.get("duplicate_answer", 0) / max(admitted, 1), 3)}
        quarantine = ws / "exports" / "quarantine"
        result["quarantine_files_mib"] = round(sum(p.stat().st_size for p in quarantine.glob("*.jsonl")) / 2**20, 1)
        scan = sensitive_scan_cost(ws)
        result.update(scan, scan_share_of_cpu=f"{scan['scan_cpu_s'] / main_step['cpu_s']:.1%}")
    else:
        result["rows"] = out["rows_in"]
    (HERE / "out" / f"{args.command}-{args.rows}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    head = (f"{result['rows']:,} rows ({result['parsed_units']:,} lines/documents, {result['bytes'] / 2**20:,.0f} MiB, "
            f"{result['distinct_tasks']:,} distinct tasks) on {result['cores']} cores, workers={result['workers']}")
    lines = [head, "", f"{'':<20}{'wall s':>9}{'CPU s':>9}{'CPU ×parse':>12}{'wall ×parse':>13}{'peak MiB':>10}"]
    for name, st in result["steps"].items():
        peak = "" if st["peak_rss_mib"] is None else f"{st['peak_rss_mib']:.0f}"
        lines.append(f"{name:<20}{st['wall_s']:>9.2f}{st['cpu_s']:>9.2f}{st['cpu_x_parse']:>12.1f}"
                     f"{st['wall_x_parse']:>13.1f}{peak:>10}")
    lines.append("")
    for k, v in result.items():
        if k not in ("steps", "rows", "parsed_units", "bytes", "distinct_tasks", "cores", "workers"):
            lines.append(f"{k:<28}{json.dumps(v) if isinstance(v, dict) else v}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
