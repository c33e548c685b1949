"""`refinery report`: one self-contained page of what a run did, to open from disk.

    reports/distillation/<run_id>/report.html

Built from what the run recorded — its receipts, summary and drift report, every earlier
run's receipts (the trend), the exports' stats files — and, for the run whose outputs are on
disk, the rules that fired (one read of the scored runs' `rules_fired`). It holds aggregates
only, never rows, so it stays small at any size. Charts are matplotlib SVG written into the
page (no script, no CDN, no server). Every number links to the command that proves it: a `jq`
over the file it was counted from, or `refinery receipts`; the commands are listed at the end.
"""

from __future__ import annotations

import html
import io
import shlex
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from refinery.errors import RefineryError
from refinery.jsonl import atomic_write, read_jsonl
from refinery.workspace import EXPORT_FILES, Workspace, quarantine_file

REPORT = "report.html"
#: Rules shown in the "fired most" chart and table.
TOP_RULES = 15
CATEGORIES = ("accepted", "partially_accepted", "rejected", "needs_human_review")
COLOURS = {"accepted": "#2e7d32", "partially_accepted": "#9ccc65", "rejected": "#c62828",
           "needs_human_review": "#f9a825", "out": "#2e7d32"}
#: The other segments' colours, in turn (no green: green is what went through).
PALETTE = ("#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#aec7e8", "#ffbb78", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")


class ReportError(RefineryError):
    """The report cannot be drawn (its plotting library is not installed)."""


class _Proofs:
    """The numbers' commands: each number is a link to its command in the list at the end."""

    def __init__(self) -> None:
        self.commands: dict[str, int] = {}

    def n(self, value: Any, command: str) -> str:
        i = self.commands.setdefault(command, len(self.commands) + 1)
        shown = f"{value:,}" if isinstance(value, int) else html.escape(str(value))
        return f'<a class="n" href="#p{i}" title="{html.escape(command)}">{shown}</a>'

    def section(self) -> str:
        items = "".join(f'<li id="p{i}"><code>{html.escape(c)}</code></li>' for c, i in self.commands.items())
        return ("<h2 id=proofs>How to check each number</h2><p>Each prints the number that links to it; run them "
                f"in the workspace folder.</p><ol class=proofs>{items}</ol>")


def _svg(fig: Any) -> str:
    """The figure as inline SVG, its bytes the same every time (fixed ids, no date)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ReportError(f"the report's charts need matplotlib ({e}): install the 'report' extra — `make install` "
                          "does — or `pip install 'refinery[report]'`") from None

    matplotlib.use("Agg")
    # names are text, never maths ("v$1_a_b$" would not parse); fixed ids: the same bytes every time
    matplotlib.rcParams.update({"svg.hashsalt": "refinery", "svg.fonttype": "none", "font.size": 9,
                                "text.parse_math": False})
    import matplotlib.pyplot as plt

    return plt


#: A chart shows at most this many bars and this many segments; the rest are summed into "others".
MAX_BARS, MAX_SEGMENTS = 25, 12


def _fold(rows: list[tuple[str, dict[str, int]]], keys: list[str]
          ) -> tuple[list[tuple[str, dict[str, int]]], list[str]]:
    """The largest MAX_BARS rows and MAX_SEGMENTS keys, the others summed into one of each (the
    tables beside the charts list them all)."""
    if len(keys) > MAX_SEGMENTS:
        total = Counter()
        for _, counts in rows:
            total.update({k: counts.get(k, 0) for k in keys})
        kept = [k for k in keys if k in {k for k, _ in total.most_common(MAX_SEGMENTS - 1)}]
        rows = [(label, {**{k: c.get(k, 0) for k in kept}, "others": sum(v for k, v in c.items() if k not in kept)})
                for label, c in rows]
        keys = [*kept, "others"]
    if len(rows) > MAX_BARS:
        ranked = sorted(rows, key=lambda r: -sum(r[1].get(k, 0) for k in keys))
        kept_rows = {label for label, _ in ranked[:MAX_BARS - 1]}
        rest: Counter[str] = Counter()
        for label, c in rows:
            if label not in kept_rows:
                rest.update({k: c.get(k, 0) for k in keys})
        rows = [r for r in rows if r[0] in kept_rows] + [(f"{len(rows) - len(kept_rows)} others", dict(rest))]
    return rows, keys


def _hbars(rows: list[tuple[str, dict[str, int]]], keys: Iterable[str], title: str) -> str:
    """Stacked horizontal bars: one per row label, a segment per key (see _fold)."""
    plt = _matplotlib()
    rows, keys = _fold(rows, list(keys))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    labels = [label for label, _ in rows][::-1]
    left = [0] * len(rows)
    others = iter(PALETTE * (1 + len(keys) // len(PALETTE)))
    for key in keys:
        values = [counts.get(key, 0) for _, counts in rows][::-1]
        ax.barh(labels, values, left=left, label=_label(key), color=COLOURS.get(key) or next(others))
        left = [a + b for a, b in zip(left, values)]
    ax.set_title(title)
    if len(keys) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def _lines(xs: list[str], series: dict[str, list[float | None]], title: str) -> str:
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(8, 3))
    styles = [(m, ls) for ls in ("-", "--", ":") for m in ("o", "s", "^", "D", "v")]
    for (name, ys), (marker, line) in zip(series.items(), styles * (1 + len(series) // len(styles))):
        # markers and lines differ: two series with the same values stay visible
        ax.plot(range(len(xs)), [float("nan") if y is None else y for y in ys], marker=marker, linestyle=line,
                label=_label(name), alpha=0.8)
    every = max(1, -(-len(xs) // 20))  # at most 20 labels
    ax.set_xticks(range(0, len(xs), every), xs[::every], rotation=30, ha="right", fontsize=6)
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def _label(name: str) -> str:
    """A legend label (matplotlib leaves out a label that starts with "_")."""
    return "\u200b" + name if name.startswith("_") else name


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _rules(ws: Workspace) -> Counter[str]:
    """How often each rule fired, over the scored runs on disk: as score counted them in the
    manifest, or (a manifest from before it did) by reading the scored runs."""
    manifest = ws.scored_runs / "manifest.json"
    if manifest.is_file() and isinstance(by_rule := orjson.loads(manifest.read_bytes()).get("by_rule"), dict):
        return Counter(by_rule)
    fired: Counter[str] = Counter()
    for path in sorted(ws.scored_runs.rglob("*.jsonl")):
        for line in read_jsonl(path):
            if line.obj is not None:
                fired.update(line.obj.get("rules_fired") or ())
    return fired


def build(ws: Workspace, run_id: str | None = None) -> Path:
    """Write the report of run `run_id` (default: the newest) and return its path."""
    from refinery.runs import list_runs, load_run, resolve_run

    rid = resolve_run(ws, run_id)
    summary, rs, drift = load_run(ws, rid)
    on_disk = _published_run(ws) == rid and _intact(ws, rs)
    p = _Proofs()
    rdir = f"{ws.rel(ws.reports)}/{rid}"
    receipt = lambda stage, k: _jq(f".counts.{k}", f"{rdir}/receipts/{stage}.json")  # noqa: E731
    esc = lambda v: html.escape(str(v))  # noqa: E731
    code = summary.get("exit_code")
    exit_code = "—" if code is None else p.n(code, _jq(".exit_code", f"{rdir}/summary.json"))
    parts = [f"<h1>refinery run {esc(rid)}</h1>",
             f"<p>status <b>{esc(summary.get('status'))}</b>, exit code "
             f"{exit_code}, overall "
             f"hash <code>{esc(summary.get('overall_hash'))[:16]}…</code> (<code>refinery receipts --run-id {esc(rid)}"
             "</code> re-checks it)"
             + ("" if on_disk else " — its outputs are not on disk as it wrote them (a later run or command "
                                   "replaced them): the counts and their commands are its receipts'") + "</p>"]

    # 1. rows through the stages, quarantine by reason
    flow_rows, table_rows = [], []
    for stage, r in rs.items():
        c = r["counts"]
        reasons = r.get("by_reason") or {}
        qfile = _quarantine_files(stage)
        flow_rows.append((stage, {"out": c.get("rows_out", 0), **reasons}))
        proof = (lambda k, stage=stage, qfile=qfile: _reason_command(stage, k, qfile)) if on_disk else \
            (lambda k, stage=stage: _jq(f".by_reason[{_lit(k)}]", f"{rdir}/receipts/{stage}.json"))
        why = ", ".join(f"{html.escape(k)} {p.n(v, proof(k))}" for k, v in reasons.items())
        table_rows.append([html.escape(stage), p.n(c.get("rows_in", 0), receipt(stage, "rows_in")),
                           p.n(c.get("rows_out", 0), receipt(stage, "rows_out")),
                           p.n(c.get("quarantined", 0), receipt(stage, "quarantined")),
                           why or "—", "reused" if r.get("reused_from") else "computed"])
    reason_keys = list(dict.fromkeys(k for _, counts in flow_rows for k in counts if k != "out"))
    parts += ["<h2>Rows through the stages</h2>",
              _hbars(flow_rows, ["out", *reason_keys], "rows out, and quarantined by reason, per stage"),
              _table(["stage", "rows in", "rows out", "quarantined", "quarantined by reason", ""], table_rows)]

    # 2. categories per source
    score = rs.get("score")
    if score:
        by_source = score.get("by_source") or {}
        scored = f"find {shlex.quote(ws.rel(ws.scored_runs))} -name '*.jsonl' -exec cat {{}} +"
        def count(src: str, cat: str) -> str:
            if not on_disk:
                return _jq(f".by_source[{_lit(src)}][{_lit(cat)}] // 0", f"{rdir}/receipts/score.json")
            return f"{scored} | {_jq(f'select(.source=={_lit(src)} and .category=={_lit(cat)}) | .id')} | wc -l"

        rows = [[html.escape(src)] + [p.n(counts.get(cat, 0), count(src, cat)) for cat in CATEGORIES]
                for src, counts in by_source.items()]
        parts += ["<h2>Categories per source</h2>",
                  _hbars(list(by_source.items()), CATEGORIES, "scored runs per source, by category"),
                  _table(["source", *CATEGORIES], rows)]
        # 3. rules that fired most
        if on_disk:
            fired = _rules(ws).most_common(TOP_RULES)
            if fired:
                parts += ["<h2>Rules that fired most</h2>",
                          _hbars([(rule, {"fired": n}) for rule, n in fired], ["fired"], "scored runs a rule fired on"),
                          _table(["rule", "scored runs"], [[html.escape(rule), p.n(
                              n, f"{scored} | {_jq(f'select(.rules_fired | index({_lit(rule)})) | .id')} | wc -l")]
                              for rule, n in fired])]

    # 4. drift against the previous run, and the trend over every complete run
    if drift:
        moved = [m for m in drift["metrics"] if m["severity"] != "ok"] or drift["metrics"][:10]
        cmd = lambda name, k: _jq(f".metrics[] | select(.name=={_lit(name)}) | .{k}", f"{rdir}/drift.json")  # noqa: E731
        parts += [f"<h2>Drift against {html.escape(str(drift.get('previous_run_id') or 'no earlier run'))}: "
                  f"{html.escape(drift['severity'])}</h2>",
                  _table(["metric", "value", "previous", "change %", "severity"],
                         [[html.escape(m["name"]), p.n(_num(m["value"]), cmd(m["name"], "value")),
                           "—" if m["previous"] is None else p.n(_num(m["previous"]), cmd(m["name"], "previous")),
                           "—" if m["change_pct"] is None else p.n(_num(m["change_pct"]), cmd(m["name"], "change_pct")),
                           html.escape(m["severity"])] for m in moved])]
    # the runs up to this one: a later run does not change its page
    trend = [r for r in list_runs(ws) if r.get("status") == "complete" and r["run_id"] <= rid][-20:]
    if len(trend) > 1:
        series: dict[str, list[float | None]] = {}
        for i, r in enumerate(trend):
            _, their, _ = load_run(ws, r["run_id"])
            for stage, rec in their.items():
                series.setdefault(f"{stage} out", [None] * len(trend))[i] = rec["counts"].get("rows_out")
        parts += ["<h2>Trend over the last complete runs</h2>",
                  _lines([r["run_id"] for r in trend], series, "rows out per stage, run by run")]

    # 5. the audit ledger: every passing audit's tracked metrics
    parts += _ledger(ws, p, rid)

    # 6. what each export is made of
    comp_rows, by_export = [], []
    for name, rel in EXPORT_FILES.items():
        stats_rel = rel.removesuffix(".jsonl") + ".stats.json"
        stats_path = ws.out / stats_rel
        if not on_disk or not stats_path.is_file():
            continue
        s = orjson.loads(stats_path.read_bytes())
        source_key = "by_source" if "by_source" in s else "by_chosen_source"  # pairs: by their chosen answer's
        by_export.append((name, s.get(source_key) or {}))
        field = lambda k, stats_rel=stats_rel: _jq(k, stats_rel)  # noqa: E731
        tools = "tool_using" if "tool_using" in s else "tool_using_chosen"
        comp_rows.append([html.escape(name), p.n(s.get("rows", 0), f"wc -l < {shlex.quote(rel)}"),
                          *(p.n(_num(s[k]), field(f".{k}")) if k in s else "—"
                            for k in (tools, "direct_answers", "mean_answer_chars")),
                          ", ".join(html.escape(k) + " " + p.n(v, field(f".{source_key}[{_lit(k)}]"))
                                    for k, v in (s.get(source_key) or {}).items())])
    if comp_rows:
        sources = list(dict.fromkeys(src for _, counts in by_export for src in counts))
        parts += ["<h2>What the exports are made of</h2>",
                  _hbars(by_export, sources, "rows of each export (pairs for preference), by source"),
                  _table(["export", "rows", "tool-using", "direct answers", "mean answer chars", "by source"],
                         comp_rows),
                  "<p>A preference row is a pair, counted by its chosen answer's source; the stage table's rows "
                  "out for export-preference are the scored runs in at least one pair.</p>"]

    # 7. the human review queue (`refinery review export`), when it was written from these scored runs
    if on_disk:
        parts += _review_queue(ws, p)

    # 8. training: the adapters kept, their loss curves and base-vs-adapter evaluation
    parts += _training(ws, p)

    parts.append(p.section())
    page = _PAGE.format(title=html.escape(f"refinery run {rid}"), body="\n".join(parts))
    out = ws.reports / rid / REPORT
    with atomic_write(out) as f:
        f.write(page.encode())
    return out


def _training(ws: Workspace, p: _Proofs) -> list[str]:
    """The adapters `refinery train` keeps (not the archived ones): each one's loss curves,
    its evaluation against the base model (when `train eval` ran), and which one the router
    serves. The workspace's, whichever run the page is of."""
    from refinery.training.config import DistillConfigError, load_distill_config
    from refinery.training.registry import adapters

    try:
        dcfg = load_distill_config(ws.root)
        kept = [a for a in adapters(ws, dcfg) if not a["archived"]]
    except (DistillConfigError, OSError, ValueError, KeyError):
        return []
    if not kept:
        return _replay_ab(ws, dcfg.output_dir, p)
    curves: dict[str, list[float | None]] = {}
    steps: list[int] = []
    metrics = {}
    for a in kept:
        path = ws.root / a["path"] / "metrics.json"
        if path.is_file():
            metrics[a["adapter_id"]] = m = orjson.loads(path.read_bytes())
            steps = sorted({*steps, *(s for s, _ in m.get("train_loss", [])), *(s for s, _ in m.get("val_loss", []))})
    for aid, m in metrics.items():
        for kind in ("train_loss", "val_loss"):
            at = dict((s, v) for s, v in m.get(kind, []))
            curves[f"{aid} {kind.removesuffix('_loss')}"] = [at.get(s) for s in steps]
    out = ["<h2>Training: the adapters kept</h2>"]
    if curves:
        out.append(_lines([str(s) for s in steps], curves, "loss by step (train, and validation where measured)"))
    rows = []
    for a in kept:
        rel = a["path"]
        comp = f"{rel}/eval/comparison.json"
        ev = a.get("average")
        state = "served (router.json)" if a["current"] else ("promoted before" if a["promoted"] else "kept")
        rows.append([html.escape(a["adapter_id"]), state, p.n(a["steps"], _jq(".steps", f"{rel}/receipt.json")),
                     p.n(a["final_val_loss"], _jq(".final_val_loss", f"{rel}/receipt.json")),
                     "not evaluated" if ev is None else p.n(ev["base"], _jq(".average.base", comp)),
                     "—" if ev is None else p.n(ev["adapter"], _jq(".average.adapter", comp)),
                     html.escape(a["method"].upper() + (f" on {a['reference']}" if a["reference"] else "")),
                     "—" if not a["preference"] else
                     f"{p.n(a['preference']['base'], _jq('.preference.base', comp))} → "
                     f"{p.n(a['preference']['adapter'], _jq('.preference.adapter', comp))}"])
    out.append(_table(["adapter", "", "steps", "final validation loss", "eval average: base", "adapter", "method",
                       "held-out preference accuracy: base → adapter"], rows))
    return out + _replay_ab(ws, dcfg.output_dir, p)


#: Rows of the review queue shown on the page (the files hold them all).
QUEUE_SHOWN = 20


def _review_queue(ws: Workspace, p: _Proofs) -> list[str]:
    """The review queue's size by source and its first rows, when `refinery review export` wrote
    it after the scored runs on disk (else it may be another run's: not shown)."""
    from refinery.review import QUEUE_DIR

    rel = f"{QUEUE_DIR}/queue.jsonl"
    path, manifest = ws.root / rel, ws.scored_runs / "manifest.json"
    if not path.is_file() or not manifest.is_file() or path.stat().st_mtime_ns < manifest.stat().st_mtime_ns:
        return []
    sources: Counter[str] = Counter()
    shown = []
    for line in read_jsonl(path):
        if isinstance(line.obj, dict):
            sources[str(line.obj.get("source"))] += 1
            if len(shown) < QUEUE_SHOWN:
                shown.append(line.obj)
    total = sum(sources.values())
    cut = lambda t: html.escape(str(t or "")[:200]) + ("…" if len(str(t or "")) > 200 else "")  # noqa: E731
    count = lambda src: _jq(f"select(.source=={_lit(src)}) | .review_id", rel) + " | wc -l"  # noqa: E731
    return [f"<h2>Review queue: {p.n(total, f'wc -l < {shlex.quote(rel)}')} scored runs for a person</h2>",
            "<p>" + ", ".join(f"{html.escape(src)} {p.n(n, count(src))}" for src, n in sources.most_common()) + "</p>",
            f"<p>The first {len(shown)}, in scored-run order (all of them: <code>{html.escape(rel)}</code>, and "
            f"<code>{html.escape(rel.replace('.jsonl', '.csv'))}</code> with columns to decide in). Decide in the "
            f"CSV, then <code>refinery review import {html.escape(rel.replace('.jsonl', '.csv'))}</code>; the "
            "next run-all applies the decisions.</p>",
            _table(["review id", "source", "prompt", "answer", "rules that fired"],
                   [[html.escape(r.get("review_id", "")), html.escape(str(r.get("source"))), cut(r.get("prompt")),
                     cut(r.get("response")), html.escape(", ".join(f["rule"] for f in r.get("rules_fired") or []))]
                    for r in shown])]


#: What replay-eval measures per mode, as its report names them.
REPLAY_METRICS = ("answer_match", "grounding", "format_valid", "failed_checks")


def _replay_ab(ws: Workspace, output_dir: str, p: _Proofs) -> list[str]:
    """`refinery replay-eval`'s A/B, when it ran: the offline model with retrieved playbooks and
    without, on the held-out tasks."""
    from refinery.replay.evaluate import OUT

    rel = f"{output_dir}/{OUT}/report.json"
    path = ws.root / rel
    if not path.is_file():
        return []
    doc = orjson.loads(path.read_bytes())
    modes = doc.get("modes") or {}
    if not isinstance(modes, dict) or not modes:
        return []
    rows = [[html.escape(m)] + [p.n(_num(modes[mode][m]), _jq(f".modes[{_lit(mode)}][{_lit(m)}]", rel))
                                if m in modes[mode] else "—" for mode in modes] for m in REPLAY_METRICS]
    rows.append(["latency mean, ms"] + [p.n(_num(modes[mode]["latency_ms"]["mean"]),
                                            _jq(f".modes[{_lit(mode)}].latency_ms.mean", rel))
                                        if "latency_ms" in modes[mode] else "—" for mode in modes])
    return [f"<h2>Replay A/B: {p.n(doc.get('tasks', 0), _jq('.tasks', rel))} held-out tasks, "
            f"{html.escape(str(doc.get('model')))}</h2>", _table(["", *modes], rows)]


#: The ledger's metrics drawn, of those every row tracks (the table lists the last row's all).
LEDGER_CHART = ("source_rows", "evidence_rows", "scored_rows", "quarantined_total")


def _ledger(ws: Workspace, p: _Proofs, rid: str) -> list[str]:
    """The audit ledger's rows (data/_kb/audit_baselines.jsonl, one per passing audit-full) of
    the runs up to `rid`: the trend of its tracked metrics, and the last row's values with the
    baseline before it."""
    from refinery.audit import ledger_path

    path = ledger_path(ws)
    rows = [line.obj for line in read_jsonl(path) if isinstance(line.obj, dict)] if path.is_file() else []
    rows = [r for r in rows if isinstance(r.get("metrics"), dict) and str(r.get("run_id")) <= rid]
    if not rows:
        return []
    rel = ws.rel(path)
    out = [f"<h2>Audit ledger: {len(rows):,} passing audit{'s' if len(rows) != 1 else ''}</h2>"]
    if len(rows) > 1:
        shown = rows[-20:]
        out.append(_lines([f"#{r.get('seq')} {str(r.get('run_id', ''))[:16]}" for r in shown],
                          {m: [r["metrics"].get(m) for r in shown] for m in LEDGER_CHART},
                          "tracked metrics at each passing audit"))
    last, before = rows[-1], (rows[-2] if len(rows) > 1 else None)
    cmd = lambda row, m: _jq(f"select(.seq=={_lit(row.get('seq'))}) | .metrics[{_lit(m)}]", rel)  # noqa: E731
    out.append(_table(["metric", f"row {last.get('seq')} (run {last.get('run_id')})",
                       "the row before"],
                      [[html.escape(m), p.n(_num(v), cmd(last, m)),
                        "—" if before is None or m not in before["metrics"] else p.n(_num(before["metrics"][m]),
                                                                                    cmd(before, m))]
                       for m, v in last["metrics"].items()]))
    return out


def _num(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _intact(ws: Workspace, rs: dict[str, dict[str, Any]]) -> bool:
    """Whether every output the run's receipts name is on disk as the run left it: its size and
    mtime as recorded (`fingerprints`; a stage command run since, or a later run, replaced
    them — a copy of the workspace keeps both). `refinery receipts` re-hashes them."""
    for r in rs.values():
        marks = r.get("fingerprints") or {}
        for o in r["outputs"]:
            path, mark = ws.out / o["path"], marks.get(o["path"])
            if mark is None or not path.is_file():
                return False
            st = path.stat()
            if [st.st_size, st.st_mtime_ns] != mark[:2]:
                return False
    return True


def _published_run(ws: Workspace) -> str | None:
    from refinery.runs import read_published

    doc = read_published(ws)
    return doc["run_id"] if doc else None


def _quarantine_files(stage: str) -> list[str]:
    if stage.startswith("export-"):
        return [quarantine_file("export"), quarantine_file(stage)]
    return [quarantine_file(stage)]


def _reason_command(stage: str, reason: str, files: list[str]) -> str:
    if stage.startswith("export-"):
        name = stage.removeprefix("export-")
        return f"{_jq(f'select(.reason=={_lit(reason)} and (.exports | index({_lit(name)})))', *files)} | wc -l"
    return f"{_jq(f'select(.reason=={_lit(reason)})', *files)} | wc -l"


def _lit(value: Any) -> str:
    """`value` as a jq literal (JSON): a name with quotes or backslashes stays a string."""
    return orjson.dumps(value).decode()


def _jq(program: str, *files: str) -> str:
    """A jq command, each part quoted for the shell: what the page shows can be pasted as is,
    whatever a source or rule is called."""
    return " ".join(["jq", "-c", shlex.quote(program), *map(shlex.quote, files)])


_PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: .8em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f5f5f5; }}
a.n {{ color: #0b57d0; text-decoration: none; border-bottom: 1px dotted #0b57d0; }}
ol.proofs code {{ font-size: 12px; }} svg {{ max-width: 100%; height: auto; }}
</style></head>
<body>
{body}
</body></html>
"""
