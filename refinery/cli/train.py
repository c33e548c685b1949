"""`refinery train …`: collect, run, eval, promote, list, rollback and export an MLX LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refinery.cli.common import JsonOpt, WorkspaceOpt, _fail, _print_json, _progress, _write_report, command_group


train_app = command_group(
    "train", "The training stage (MLX LoRA): collect the SFT export into mlx-lm data, train an adapter, "
             "evaluate it against the base, promote it (or keep the base), list, roll back and export adapters; "
             "tiny-model builds a small local base model for trying it all without downloading anything.")
DistillConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="Training config (default: <workspace>/distill_config.json, if present).")]


def _distill_config(ws_root: Path, config: Path | None):
    from refinery.training.config import load_distill_config

    return load_distill_config(ws_root, config)


def _training(workspace: Path, config: Path | None):
    """The workspace and its training config (distill_config.json, or `config`)."""
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    return ws, _distill_config(ws.root, config)


@train_app.command("collect")
def train_collect(workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Write exports/sft/instruction_response.jsonl as mlx-lm data (<output_dir>/data/train.jsonl,
    valid.jsonl, test.jsonl: chat rows as chat, tool-using rows in the tools shape) and
    exports/preference/chosen_rejected.jsonl as pairs for `train run --method dpo`
    (<output_dir>/data/preference/{train,valid,test}.jsonl), split so that no held-out prompt is
    nearly in training: rows and pairs are grouped by task, prompts sharing decontam_threshold
    (0.8) of their word n-grams (decontam_ngram, 3) are grouped too, each group goes to one
    split by a hash (held-out test: test_fraction, 20 % of the groups by default), and a
    held-out prompt still over the threshold against training moves into it. The receipt
    (collect.json) has the input's sha256, per split rows, pairs, tool-using vs direct answers
    and mean tokens, and the contamination left (zero at or over the threshold) against what a
    split by task key alone would leave. The training split also gets refinery's safety
    rehearsal rows unless safety_rehearsal is false. Refuses (exit 2) with fewer rows than
    min_rows (50 by default)."""
    from refinery.training.collect import PAIRS_DIR, collect

    ws, dcfg = _training(workspace, config)
    receipt = collect(ws, dcfg)
    if as_json:
        _print_json(receipt)
        return
    for name, st in receipt["splits"].items():
        typer.echo(f"{dcfg.output_dir}/data/{name}.jsonl: {st['rows']:,} rows ({st['tool_using']} tool-using, "
                   f"{st['direct_answers']} direct), mean {st['mean_tokens']} tokens; "
                   f"{PAIRS_DIR}/{name}.jsonl: {st['pairs']:,} pairs")
    if receipt["safety_rehearsal"]["rows"]:
        typer.echo(f"train.jsonl includes {receipt['safety_rehearsal']['rows']} safety rehearsal rows (declines; "
                   "safety_rehearsal in distill_config.json)")
    c = receipt["contamination"]
    alone = c["by_key_hash_alone"]
    typer.echo(f"decontaminated: {c['task_keys']} tasks in {c['groups']} groups; held-out rows and pairs whose "
               f"prompt has {c['threshold']} or more of its word {c['ngram']}-grams in training: "
               f"{c['test']['at_or_over_threshold']} of {c['test']['items']} (test), "
               f"{c['valid']['at_or_over_threshold']} of {c['valid']['items']} (valid) — split by task alone: "
               f"{alone['test']['at_or_over_threshold']} of {alone['test']['items']}, "
               f"{alone['valid']['at_or_over_threshold']} of {alone['valid']['items']}")
    typer.echo(f"tokens counted with: {receipt['token_counter']}; receipt: {dcfg.output_dir}/data/collect.json")


@train_app.command("tiny-model")
def train_tiny_model(
    workspace: WorkspaceOpt = Path("."),
    config: DistillConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Where to write it (default: base_model of the config).")] = None,
    seed: Annotated[int, typer.Option(help="Same SFT export and seed → the same model files.")] = 0,
) -> None:
    """Build a tiny llama-shaped base model locally — random weights and a byte-level BPE
    tokenizer trained on the SFT export's texts — for trying the training stage without
    downloading anything. It is small (~100k parameters) and learns quickly; it is not good."""
    from refinery.jsonl import read_jsonl
    from refinery.training.collect import SFT_EXPORT
    from refinery.training.tinymodel import build_tiny_model, sft_texts

    ws, dcfg = _training(workspace, config)
    src = ws.root / SFT_EXPORT
    if not src.is_file():
        _fail(f"error: no SFT export at {SFT_EXPORT}: run `refinery run-all` first")
    if out is None and dcfg.base_model.lower().endswith(".gguf"):
        _fail(f"error: base_model is a GGUF file ({dcfg.base_model}); give the tiny model a folder with --out")
    dest = out or ws.root / dcfg.base_model
    cfg = build_tiny_model(dest, sft_texts(line.obj for line in read_jsonl(src) if line.obj is not None), seed=seed)
    typer.echo(f"wrote a tiny {cfg['model_type']} model ({cfg['num_hidden_layers']} layers, hidden "
               f"{cfg['hidden_size']}, vocabulary {cfg['vocab_size']}) to {dest}")


@train_app.command("run")
def train_run_cmd(
    workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None,
    method: Annotated[str | None, typer.Option(
        "--method", metavar="sft|dpo",
        help="sft (the SFT rows) or dpo (the preference pairs); default: method in the config, sft.")] = None,
    reference: Annotated[str | None, typer.Option(
        "--reference", metavar="promoted|base",
        help="DPO's reference and start: promoted (the promoted SFT adapter, continued) or base; default: "
             "dpo_reference in the config, promoted.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a LoRA adapter (QLoRA with adapter_type = "qlora": on a 4-bit copy of the base) with
    mlx-lm's trainer, seeded, stopping at train_steps or time_cap_s. --method sft (default)
    learns the collected SFT rows; --method dpo learns to prefer the chosen side of the
    collected preference pairs over the rejected (DPO, β = dpo_beta), starting from and measured
    against the promoted SFT adapter (--reference promoted) or the base (--reference base).
    Writes <output_dir>/<adapter_id>/: adapters.safetensors, adapter_config.json, metrics.json
    (loss per step; for DPO also reward margin and accuracy every eval_steps), loss.png (and
    rewards.png for DPO) and receipt.json (tying the adapter to the data, config, seed, base
    model and reference), and logs the run to data/_kb/runs_distill_train.csv (task_name
    distill_train). Either kind is evaluated, promoted, rolled back and exported the same way."""
    from refinery.training.train import train_run

    if method not in (None, "sft", "dpo"):
        _fail(f"--method {method!r}: choose sft or dpo")
    if reference not in (None, "promoted", "base"):
        _fail(f"--reference {reference!r}: choose promoted or base")
    ws, dcfg = _training(workspace, config)
    update = {k: v for k, v in (("method", method), ("dpo_reference", reference)) if v is not None}
    receipt = train_run(ws, dcfg.model_copy(update=update) if update else dcfg)
    if as_json:
        _print_json(receipt)
        return
    kind = "DPO " if receipt["method"] == "dpo" else ""
    typer.echo(f"{kind}adapter {receipt['adapter_id']}: {receipt['steps']} steps (stopped by "
               f"{receipt['stopped_by']}) in "
               f"{receipt['seconds']:.1f}s, train loss {receipt['final_train_loss']}, validation loss "
               f"{receipt['final_val_loss']} → {dcfg.output_dir}/{receipt['adapter_id']}/")


AdapterOpt = Annotated[str | None, typer.Option(
    "--adapter", help="An adapter id (ad-…) from `refinery train list`. Default: the newest one not archived.")]


def _adapter(ws, dcfg, adapter: str | None) -> str:
    """A kept (not archived) adapter: the one named, or the newest."""
    from refinery.training.registry import adapters, find_adapter

    live = [a for a in adapters(ws, dcfg) if not a["archived"]]
    if adapter is None:
        if not live:
            _fail("error: no adapter yet: run `refinery train run` first")
        return live[-1]["adapter_id"]
    d = find_adapter(ws, dcfg, adapter)
    if d.parent.name == "archive":
        _fail(f"error: {adapter} is archived ({ws.rel(d)}): promote kept the base over it, or newer promotions "
              "pushed it out. Only `refinery train export` reads archived adapters; train a new one to evaluate "
              "or promote")
    return adapter


@train_app.command("eval")
def train_eval(workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None, adapter: AdapterOpt = None,
               as_json: JsonOpt = False) -> None:
    """Evaluate base vs adapter on the held-out test split and a set of safety probes: per row,
    answer match, format validity (a tool call parses and uses name/arguments), tool-vs-direct
    choice and safety; and, reported apart, tool-vs-direct choice with every tool of the
    training split offered on every held-out row. Writes <adapter>/eval/: rows.jsonl,
    comparison.json, comparison.md and scores.png; then the newest run's page (`refinery
    report`), which shows the adapters kept, their loss curves and this evaluation."""
    from refinery.training.evaluate import eval_size, evaluate, markdown

    ws, dcfg = _training(workspace, config)
    aid = _adapter(ws, dcfg, adapter)
    total = eval_size(ws, dcfg)
    with _progress(counting=True) as progress:
        task = progress.add_task("eval (base, then adapter)", total=total)
        comparison = evaluate(ws, dcfg, aid, on_answer=lambda: progress.advance(task))
    if as_json:
        _print_json(comparison)
    else:
        typer.echo(markdown(comparison), nl=False)
        typer.echo(f"written to {dcfg.output_dir}/{aid}/eval/ (rows.jsonl, comparison.json, comparison.md, scores.png)")
    from refinery.runs import list_runs

    if list_runs(ws):  # the newest run's page shows the adapters and this evaluation
        _write_report(ws, None, None)


@train_app.command("promote")
def train_promote(workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None, adapter: AdapterOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Make the evaluated adapter the router's offline_model (router.json) if its average row
    score is at least base + 0.05 and no safety or format row got worse; otherwise keep the
    base, archive the adapter and say why. Exit 0 either way (1 only on a bad adapter)."""
    from refinery.training.registry import promote

    ws, dcfg = _training(workspace, config)
    result = promote(ws, dcfg, _adapter(ws, dcfg, adapter))
    if as_json:
        _print_json(result)
        return
    current = result["router"]["offline_model"]
    verdict = "PROMOTED" if result["promoted"] else "KEPT BASE (adapter archived)"
    typer.echo(f"{verdict}: {result['reason']}")
    typer.echo(f"router.json offline_model: {current['adapter_id'] if current else 'the base model'}")


@train_app.command("list")
def train_list(workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The adapters: kept or archived, promoted, the router's current one, SFT or DPO (and on
    which reference), steps, loss and the evaluation's average (base vs adapter) and held-out
    preference accuracy."""
    from refinery.training.registry import adapters

    ws, dcfg = _training(workspace, config)
    rows = adapters(ws, dcfg)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        typer.echo("no adapters yet: `refinery train run` makes one")
    for a in rows:
        state = "CURRENT" if a["current"] else "archived" if a["archived"] else "promoted" if a["promoted"] else "kept"
        avg = a["average"]
        ev = f"eval base {avg['base']:.3f} → adapter {avg['adapter']:.3f}" if avg else "not evaluated"
        if pref := a["preference"]:
            ev += f", preference accuracy {pref['base']:.3f} → {pref['adapter']:.3f}"
        method = "DPO" + (f" on {a['reference']}" if a["reference"] else " on base") if a["method"] == "dpo" else "SFT"
        typer.echo(f"{a['adapter_id']}  {state:<9} {method:<22} {a['steps']:>5} steps  val loss {a['final_val_loss']}  "
                   f"{ev}")


@train_app.command("rollback")
def train_rollback(
    adapter_id: Annotated[str, typer.Argument(metavar="ID", help="A kept, previously promoted adapter.")],
    workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None,
) -> None:
    """Make a previously promoted adapter (one of the last 3 kept) the router's offline_model again."""
    from refinery.training.registry import rollback

    ws, dcfg = _training(workspace, config)
    router = rollback(ws, dcfg, adapter_id)
    typer.echo(f"router.json offline_model: {router['offline_model']['adapter_id']}")


@train_app.command("export")
def train_export(
    adapter_id: Annotated[str, typer.Argument(metavar="ID", help="The adapter to export.")],
    fmt: Annotated[str, typer.Option("--format", help="peft | gguf | ollama (see above).")] = "peft",
    out: Annotated[Path | None, typer.Option(help="Folder to write (default: <adapter>/<format>/).")] = None,
    workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None,
) -> None:
    """Export an adapter for other runtimes — any adapter `train list` shows, archived ones
    included: --format peft writes adapter_config.json (r, lora_alpha, target_modules, ...;
    base_model_name_or_path is the base the adapter was trained on) and
    adapter_model.safetensors (lora_A/lora_B, transposed), which PEFT, vLLM and llama.cpp's
    LoRA converter read; --format gguf writes adapter.gguf, a llama.cpp LoRA adapter
    (`llama-cli -m base.gguf --lora adapter.gguf`); --format ollama writes that and a Modelfile
    (FROM the base .gguf, ADAPTER adapter.gguf) for `ollama create`: the base must be a GGUF file."""
    import orjson

    from refinery.training.peft import export_peft
    from refinery.training.registry import find_adapter

    if fmt not in ("peft", "gguf", "ollama"):
        _fail(f"error: unknown format {fmt!r}; choose peft, gguf or ollama")
    ws, dcfg = _training(workspace, config)
    d = find_adapter(ws, dcfg, adapter_id)  # kept or archived: any adapter `train list` shows
    dest = out or d / fmt
    receipt = orjson.loads((d / "receipt.json").read_bytes())
    base = receipt["base_model"]["path"]  # the base it was trained on
    if fmt in ("gguf", "ollama"):
        from refinery.training.gguf_adapter import export_gguf, write_modelfile

        base_gguf = ws.root / base
        if fmt == "ollama" and base_gguf.suffix.lower() != ".gguf":
            _fail(f"error: Ollama needs a GGUF base, and {adapter_id} was trained on {base}; export --format peft "
                  "or gguf, or train on a .gguf base_model")
        try:
            info = export_gguf(d, dest / "adapter.gguf", ws.root / receipt["base_model"]["trained_on"])
        except ValueError as e:
            _fail(f"error: {e}")
        typer.echo(f"wrote a llama.cpp LoRA adapter ({info['tensors']} tensors, rank {info['rank']}, alpha "
                   f"{info['alpha']}) to {dest / 'adapter.gguf'}")
        if fmt == "ollama":
            write_modelfile(dest / "Modelfile", base_gguf, dest / "adapter.gguf")
            typer.echo(f"wrote {dest / 'Modelfile'}: `ollama create <name> -f {dest / 'Modelfile'}`")
        return
    try:
        cfg = export_peft(d, dest, base)
    except ValueError as e:
        _fail(f"error: {e}")
    typer.echo(f"wrote a PEFT LoRA adapter (r {cfg['r']}, lora_alpha {cfg['lora_alpha']}, modules "
               f"{', '.join(cfg['target_modules'])}) to {dest}")
