"""`refinery replay` and `replay-eval`: the promoted local model, grounded in the RAG export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refinery.cli.common import ConfigOpt, JsonOpt, WorkspaceOpt, _err, _fail, _load, _print_json, _progress, app
from refinery.cli.train import _distill_config
from refinery.errors import EXIT_CHECK_FAILED, EXIT_OK


DistillConfigFileOpt = Annotated[Path | None, typer.Option(
    "--distill-config", help="Training config naming the base model when no adapter is promoted "
                             "(default: <workspace>/distill_config.json, if present).")]
TopKOpt = Annotated[int | None, typer.Option(
    "--top-k", min=1, help="Playbooks to retrieve (default: replay.top_k, 3).")]


def _replay_setup(workspace: Path, config: Path | None, distill_config: Path | None, top_k: int | None,
                  retrieval: bool = True, escalation: bool = False):
    """(ws, cfg, dcfg, loaded local generator, index or None) for replay and replay-eval; usage
    errors (escalation asked for but not set up included) exit 2 before any model is loaded."""
    from refinery.replay.escalation import api_key
    from refinery.replay.model import LocalGenerator, offline_model
    from refinery.replay.retrieval import RagIndex

    ws, cfg = _load(workspace, config, {"replay": {"top_k": top_k}})
    if escalation:
        api_key(cfg.replay.escalation)
    dcfg = _distill_config(ws.root, distill_config)
    generator = LocalGenerator(ws, offline_model(ws, dcfg))
    index = RagIndex.open(ws, cfg.replay.index_dir) if retrieval else None
    if index is not None and index.built:
        typer.echo(f"built the BM25 index of {index.manifest['export']['path']} ({index.rows:,} playbooks) in "
                   f"{cfg.replay.index_dir}/; it is reused until the export changes", err=True)
    generator.load()
    return ws, cfg, dcfg, generator, index


@app.command("replay")
def replay_cmd(
    task: Annotated[str, typer.Option("--task", "-t", help="The task, as the system would receive it.")],
    no_retrieval: Annotated[bool, typer.Option(
        "--no-retrieval", help="Answer without playbooks: the A/B baseline.")] = False,
    allow_escalation: Annotated[bool, typer.Option(
        "--allow-escalation", help="Send a failed local answer to the endpoint in [replay.escalation] of "
                                   "refinery.toml (base_url, model, api_key_env).")] = False,
    top_k: TopKOpt = None,
    workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None, distill_config: DistillConfigFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a task with the local model, grounded in the RAG export's playbooks.

    Retrieves the top-k rows of exports/rag/playbooks.jsonl (BM25; the index is built once per
    export and reused while its sha256 is unchanged), quotes them in the prompt labelled by id,
    and generates greedily with the router's offline_model (router.json: base + promoted
    adapter; the base of distill_config.json when none is promoted). The answer is checked:
    empty, malformed tool call, refusal, or over the length cap (replay.max_answer_chars, or cut
    off at replay.max_tokens) fails. With --allow-escalation a failed answer goes to the
    configured OpenAI-compatible endpoint; its errors and timeouts are reported, not raised.

    Every replay appends one row to data/_kb/replays.jsonl (task, playbook ids, model, adapter,
    answer, latency, escalated or not), which the next run-all reads as evidence.

    Exit 0 when the answer served passes its check, 1 when it fails, 2 on bad usage or setup."""
    from refinery.replay.session import REPLAY_LOG, append_trace, replay
    from refinery.workspace import WorkspaceBusy

    if not task.strip():
        _fail('error: the task is empty: give it with --task "…"')
    ws, cfg, _, generator, index = _replay_setup(workspace, config, distill_config, top_k,
                                                 retrieval=not no_retrieval, escalation=allow_escalation)
    model = generator.model
    row = replay(ws, cfg, task, model=model, generate=generator, index=index,
                 allow_escalation=allow_escalation, log=False)
    code = EXIT_OK if row["check"] is None else EXIT_CHECK_FAILED
    try:
        append_trace(ws, row)
        logged = None
    except WorkspaceBusy as e:  # the answer is still shown; the failure to log it is the exit code
        logged, code = f"the replay was NOT logged to data/_kb/{REPLAY_LOG}: {e}", EXIT_CHECK_FAILED
    if as_json:
        _print_json(row)
        if logged:
            _err(f"error: {logged}")
        raise typer.Exit(code)
    given = ", ".join(f"{r['id']} ({r['score']:g})" for r in row["retrieved"])
    typer.echo(f"playbooks: {given or ('none (--no-retrieval)' if no_retrieval else 'none matched the task')}")
    check = "passed" if row["local_check"] is None else f"FAILED ({row['local_check']})"
    typer.echo(f"local model: {model.label} — {row['local_latency_ms']:.0f} ms, check {check}")
    esc = row["escalation"]
    if esc and esc["ok"]:
        verdict = "passed" if row["check"] is None else f"FAILED ({row['check']})"
        typer.echo(f"escalated to {esc['model']} at {esc['endpoint']} — {esc['latency_ms']:.0f} ms, check {verdict}")
    elif esc:
        typer.secho(f"escalation failed: {esc['error']}", fg=typer.colors.RED)
    elif row["local_check"] is not None and not allow_escalation:
        typer.echo("not escalated (--allow-escalation sends failed answers to [replay.escalation])")
    if logged:
        _err(f"error: {logged}")
    else:
        typer.echo(f"logged: data/_kb/{REPLAY_LOG} ({row['replay_id']})")
    typer.echo("")
    typer.echo(row["answer"])
    raise typer.Exit(code)


@app.command("replay-eval")
def replay_eval_cmd(
    limit: Annotated[int | None, typer.Option(
        "--limit", "-n", min=1, help="Replay only the first N held-out tasks.")] = None,
    top_k: TopKOpt = None,
    workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None, distill_config: DistillConfigFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay the held-out tasks (the test split of `refinery train collect`) with and without
    retrieval, with the router's offline model, and report per mode: answer match, grounding
    (the answer cites or follows a retrieved playbook), format validity and latency (mean, p50,
    p95). A task's own row is never retrieved for it. Writes <output_dir>/replay-eval/
    (rows.jsonl, report.json, report.md); these are evaluations, not appended to replays.jsonl."""
    from refinery.replay.evaluate import MODES, eval_tasks, markdown, replay_eval

    ws, cfg, dcfg, generator, index = _replay_setup(workspace, config, distill_config, top_k)
    tasks = eval_tasks(ws, dcfg, limit)
    with _progress(counting=True) as progress:
        bar = progress.add_task("replay-eval", total=len(MODES) * len(tasks))
        report = replay_eval(ws, cfg, dcfg, generate=generator, index=index, model_label=generator.model.label,
                             tasks=tasks, on_answer=lambda: progress.advance(bar))
    if as_json:
        _print_json(report)
        return
    typer.echo(markdown(report), nl=False)
    typer.echo(f"written to {dcfg.output_dir}/replay-eval/ (rows.jsonl, report.json, report.md)")
