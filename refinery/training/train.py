"""`refinery train run`: a LoRA (or QLoRA) adapter on the collected data, through mlx-lm's Python API.

    <output_dir>/data/ (from `train collect`) ──▶ <output_dir>/<adapter_id>/
        adapters.safetensors   the LoRA weights (mlx-lm layout)
        adapter_config.json    what mlx-lm needs to load them (fine_tune_type, num_layers, lora_parameters)
        metrics.json           train loss per step, validation loss every eval_steps, why it stopped
        loss.png               the loss curves
        receipt.json           the adapter tied to the data receipt, the config, the seed, the base model

The adapter id is a hash of what determines the adapter (data, base model, training settings,
seed, code version), so the same inputs give the same id — and, seeded, the same weights on
the same backend. Training stops at `train_steps` or at `time_cap_s`, whichever comes first.
The trainer and the model loader are parameters, so tests can swap them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

from refinery.canonical import file_sha256, sig_hash
from refinery.errors import RefineryError
from refinery.jsonl import publishing
from refinery.normalize import last_user_index
from refinery.receipts import Digests, write_json
from refinery.training import blas
from refinery.training.collect import PAIRS_DIR
from refinery.training.collect import RECEIPT as DATA_RECEIPT
from refinery.training.config import DistillConfig, base_model_dir
from refinery.training.from_gguf import GGUFError
from refinery.transform import now_utc
from refinery.workspace import Workspace

ADAPTER_FILE = "adapters.safetensors"
#: Training runs are logged as a runs*.csv stream, so the next run-all takes them as evidence.
RUNS_LOG = "runs_distill_train.csv"
RUNS_COLUMNS = ("run_id", "task_id", "task_name", "started_at", "finished_at", "model", "prompt", "output",
                "exit_status", "error", "tool_calls", "stop_reason")
#: The settings that change the adapter (output_dir and the collect settings do not, directly).
TRAINING_KEYS = ("adapter_type", "train_steps", "batch_size", "lr", "lora_rank", "lora_scale", "lora_dropout",
                 "num_layers", "eval_steps", "seed", "max_seq_length")


class TrainError(RefineryError):
    """Missing or stale data, a missing base model: the message says what to run."""


class _StopTraining(Exception):
    pass


def model_digest(path: Path) -> str:
    """One hash over a model folder's files (names and contents)."""
    if not path.is_dir():
        raise TrainError(f"no base model at {path}: set base_model in distill_config.json to a local model "
                         "folder, or build a tiny one with `refinery train tiny-model`")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return sig_hash([[p.relative_to(path).as_posix(), file_sha256(p)] for p in files])


def template_used(base: Path) -> dict[str, Any]:
    """Which chat template the base renders training and evaluation rows with: its sha256, and
    where it comes from (a GGUF's own, or the one refinery put in its place)."""
    cfg_file = base / "tokenizer_config.json"
    template = orjson.loads(cfg_file.read_bytes()).get("chat_template") if cfg_file.is_file() else None
    converted = base / "CONVERTED.json"
    source = orjson.loads(converted.read_bytes()).get("chat_template") if converted.is_file() else "the base's own"
    return {"source": source if template else "none",
            "sha256": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None}


def read_data_receipt(ws: Workspace, dcfg: DistillConfig) -> dict[str, Any]:
    """The collect receipt, with the data files checked against it."""
    path = ws.root / dcfg.output_dir / "data" / DATA_RECEIPT
    if not path.is_file():
        raise TrainError(f"no training data in {dcfg.output_dir}/data/: run `refinery train collect` first")
    receipt = orjson.loads(path.read_bytes())
    digests = Digests()
    for f in receipt["outputs"]:
        p = ws.root / f["path"]
        if not p.is_file() or digests.of(p, f["path"])["sha256"] != f["sha256"]:
            raise TrainError(f"{f['path']} changed since `train collect` wrote it: run `refinery train collect`")
    return receipt


def data_read(data_receipt: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """The collected files a method trains on: the rows (sft) or the pairs (dpo)."""
    return [f for f in data_receipt["outputs"]
            if f["path"].rpartition("/data/")[2].startswith(PAIRS_DIR + "/") == (method == "dpo")]


def adapter_id(data: list[dict[str, Any]], base_digest: str, dcfg: DistillConfig, code: str,
               reference: dict[str, Any] | None = None) -> str:
    settings = {k: getattr(dcfg, k) for k in TRAINING_KEYS}
    if dcfg.method == "dpo":
        settings.update(method="dpo", dpo_beta=dcfg.dpo_beta, reference=reference)
    return "ad-" + sig_hash({"data": [f["sha256"] for f in data], "base": base_digest,
                             "settings": settings, "code": code})[:12]


def dpo_reference(ws: Workspace, dcfg: DistillConfig, base_digest: str) -> tuple[dict[str, Any], Path | None]:
    """What DPO starts from and is measured against: ({"kind": "base"}, None), or the promoted
    adapter ({"kind": "adapter", "adapter_id", "adapter_sha256"}, its folder), checked to fit."""
    if dcfg.dpo_reference == "base":
        return {"kind": "base"}, None
    from refinery.training.registry import RegistryError, adapter_dir, read_router

    promoted = read_router(ws).get("offline_model")
    if not promoted:
        raise TrainError("dpo_reference is \"promoted\" but no adapter is promoted: train, evaluate and promote an "
                         "SFT adapter first (`refinery train run`, `train eval`, `train promote`), or set "
                         "\"dpo_reference\": \"base\" in distill_config.json (or pass --reference base)")
    try:
        d = adapter_dir(ws, dcfg, promoted["adapter_id"])
    except RegistryError as e:
        raise TrainError(f"the promoted adapter: {e}") from None
    receipt = orjson.loads((d / "receipt.json").read_bytes())
    cfg = orjson.loads((d / "adapter_config.json").read_bytes())
    want = {"rank": dcfg.lora_rank, "scale": dcfg.lora_scale, "dropout": dcfg.lora_dropout}
    if receipt["base_model"]["digest"] != base_digest or receipt["config"]["adapter_type"] != dcfg.adapter_type:
        raise TrainError(f"the promoted adapter {promoted['adapter_id']} was trained on another base model "
                         f"({receipt['base_model']['path']}, {receipt['config']['adapter_type']}): DPO continues it, "
                         "so base_model and adapter_type must be the same, or use --reference base")
    if {k: cfg["lora_parameters"][k] for k in want} != want or receipt["config"]["num_layers"] != dcfg.num_layers:
        lp = cfg["lora_parameters"]
        raise TrainError(f"the promoted adapter {promoted['adapter_id']} has LoRA rank {lp['rank']}, scale "
                         f"{lp['scale']}, dropout {lp['dropout']} on num_layers {receipt['config']['num_layers']}: "
                         "DPO continues it, so lora_rank, lora_scale, "
                         "lora_dropout and num_layers in distill_config.json must be the same")
    return {"kind": "adapter", "adapter_id": promoted["adapter_id"], "adapter_sha256": receipt["adapter_sha256"]}, d


def _quantized_base(ws: Workspace, dcfg: DistillConfig, base: Path) -> Path:
    """QLoRA trains on a 4-bit base: quantize the base once, next to the adapters."""
    config = orjson.loads((base / "config.json").read_bytes())
    if "quantization" in config:
        return base
    qpath = ws.root / dcfg.output_dir / f"{base.name}-q4"
    if not (qpath / "config.json").is_file():
        from mlx_lm import convert

        if qpath.exists():
            shutil.rmtree(qpath)
        hidden = config.get("hidden_size", 64)
        with contextlib.redirect_stdout(sys.stderr):  # convert reports on stdout; keep it for results
            convert(str(base), mlx_path=str(qpath), quantize=True, q_bits=4,
                    q_group_size=32 if hidden % 64 else 64)
    return qpath


def default_loader(path: str):
    from mlx_lm import load

    return load(path)


def default_trainer(**kwargs: Any) -> None:
    from mlx_lm.tuner import trainer

    trainer.train(**kwargs)


def train_run(ws: Workspace, dcfg: DistillConfig, *, loader: Callable[[str], Any] = default_loader,
              trainer: Callable[..., None] = default_trainer,
              on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train; write the adapter folder atomically; return its receipt. Raises TrainError."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner import datasets, utils
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs

    from refinery.config import load_config
    from refinery.console import plain_unless_terminal
    from refinery.receipts import code_version

    started_at = now_utc()
    data = read_data_receipt(ws, dcfg)
    try:
        base = base_model_dir(ws.root, dcfg).resolve()
    except GGUFError as e:
        raise TrainError(f"base_model {dcfg.base_model}: {e}") from None
    base_digest = model_digest(base)
    code = code_version(ws, load_config(ws.root))
    is_dpo = dcfg.method == "dpo"
    used = data_read(data, dcfg.method)
    reference, reference_dir = dpo_reference(ws, dcfg, base_digest) if is_dpo else (None, None)
    aid = adapter_id(used, base_digest, dcfg, code, reference)
    out = ws.root / dcfg.output_dir / aid
    train_base = _quantized_base(ws, dcfg, base) if dcfg.adapter_type == "qlora" else base

    mx.random.seed(dcfg.seed)  # the LoRA init
    np.random.seed(dcfg.seed)  # the batch order
    model, tokenizer = loader(str(train_base))
    model.freeze()
    layers = min(dcfg.num_layers, len(model.layers))
    lora = {"rank": dcfg.lora_rank, "scale": dcfg.lora_scale, "dropout": dcfg.lora_dropout}
    utils.linear_to_lora_layers(model, layers, lora)
    if reference_dir is not None:  # DPO continues the promoted adapter: its weights are the start
        start = mx.load(str(reference_dir / ADAPTER_FILE))
        names = {k for k, _ in tree_flatten(model.trainable_parameters())}
        if set(start) != names:
            raise TrainError(f"the promoted adapter {reference['adapter_id']}'s weights do not fit the LoRA layers "
                             f"made here ({len(set(start) ^ names)} names differ): train it again, or use "
                             "--reference base")
        model.load_weights(list(start.items()), strict=False)  # the LoRA weights only: checked above
    args = SimpleNamespace(data=str(ws.root / dcfg.output_dir / "data"), train=True, test=False, hf_dataset=None,
                           mask_prompt=False, prompt_feature="prompt", completion_feature="completion",
                           text_feature="text", chat_feature="messages")
    # mlx-lm prints its progress (in forced colour): to stderr, keeping stdout for results, and as
    # plain text unless stderr is a terminal
    progress_out = plain_unless_terminal(sys.stderr)
    gflops = blas.probe_gflops()
    print(blas.describe(gflops), file=progress_out)
    extra: dict[str, Any] = {}
    if is_dpo:
        from refinery.training import dpo

        train_set, valid_set = (dpo.PairDataset.load(Path(args.data) / PAIRS_DIR / f"{s}.jsonl", tokenizer,
                                                     dcfg.max_seq_length) for s in ("train", "valid"))
        if len(train_set) < dcfg.batch_size:
            left_out = (f" ({train_set.too_long} left out: the prompt alone fills max_seq_length = "
                        f"{dcfg.max_seq_length}, or both replies are the same within it)") if train_set.too_long else ""
            raise TrainError(f"{len(train_set)} training pairs in {dcfg.output_dir}/data/{PAIRS_DIR}/train.jsonl"
                             f"{left_out}, fewer than batch_size = {dcfg.batch_size}: DPO trains on the preference "
                             "export (exports/preference/chosen_rejected.jsonl); run `refinery run-all`, then "
                             "`train collect`" + (", or raise max_seq_length" if left_out else ""))
        if cut := train_set.cut + valid_set.cut:
            print(f"warning: {cut} pairs have a reply longer than max_seq_length = {dcfg.max_seq_length} tokens: "
                  "what is past it is not compared", file=progress_out)
        print(f"DPO reference ({'the base' if reference_dir is None else reference['adapter_id']}): "
              f"log-probabilities of {len(train_set) + len(valid_set)} pairs", file=progress_out)
        model.eval()
        for d in (train_set, valid_set):
            dpo.reference_logps(model, d, dcfg.batch_size)
        model.train()
        extra = {"loss": dpo.make_loss(dcfg.dpo_beta), "iterate_batches": dpo.iterate_batches}
        probes = {"train": train_set.head(REWARD_PAIRS), "valid": valid_set if len(valid_set) else None}
        rewards: list[dict[str, Any]] = []
    else:
        with contextlib.redirect_stdout(progress_out):
            train_set, valid_set = (load_split(Path(args.data) / f"{s}.jsonl", tokenizer, args)
                                    for s in ("train", "valid"))
        if dcfg.loss_on == "answer":
            train_set, valid_set = (answer_loss(d) for d in (train_set, valid_set))
        if len(train_set) < dcfg.batch_size:
            raise TrainError(f"{len(train_set)} training rows, fewer than batch_size = {dcfg.batch_size}")

    t0 = time.monotonic()
    train_losses: list[list[float]] = []
    val_losses: list[list[float]] = []
    stopped = {"by": "train_steps"}

    class Record(TrainingCallback):
        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            train_losses.append([info["iteration"], round(float(info["train_loss"]), 6)])
            if on_step:
                on_step(info["iteration"], float(info["train_loss"]))
            it, elapsed = info["iteration"], time.monotonic() - t0
            if is_dpo and (it % dcfg.eval_steps == 0 or it in (1, dcfg.train_steps) or elapsed > dcfg.time_cap_s):
                model.eval()
                rewards.append({"step": it, **{k: d and dpo.reward_stats(model, d, dcfg.dpo_beta, dcfg.batch_size)
                                               for k, d in probes.items()}})
                model.train()
            if it % ETA_EVERY == 0 and it < dcfg.train_steps:
                print(eta_line(it, dcfg.train_steps, elapsed, dcfg.time_cap_s), file=progress_out)
            if elapsed > dcfg.time_cap_s and info["iteration"] < dcfg.train_steps:
                stopped["by"] = "time_cap_s"
                raise _StopTraining

        def on_val_loss_report(self, info: dict[str, Any]) -> None:
            val_losses.append([info["iteration"], round(float(info["val_loss"]), 6)])

    with publishing(out) as staging:
        targs = TrainingArgs(batch_size=dcfg.batch_size, iters=dcfg.train_steps, steps_per_report=1,
                             steps_per_eval=dcfg.eval_steps, steps_per_save=dcfg.train_steps + 1,
                             val_batches=-1, max_seq_length=dcfg.max_seq_length,
                             adapter_file=str(staging / ADAPTER_FILE))
        wrap = (lambda d: d) if is_dpo else datasets.CacheDataset  # noqa: E731
        valid = wrap(valid_set) if len(valid_set) >= dcfg.batch_size else None
        with contextlib.redirect_stdout(progress_out), contextlib.suppress(_StopTraining):
            trainer(model=model, optimizer=optim.Adam(learning_rate=dcfg.lr),
                    train_dataset=wrap(train_set), val_dataset=valid, args=targs,
                    training_callback=Record(), **extra)
        seconds = round(time.monotonic() - t0, 3)
        mx.save_safetensors(str(staging / ADAPTER_FILE), dict(sorted(tree_flatten(model.trainable_parameters()))))
        (staging / "adapter_config.json").write_bytes(orjson.dumps({
            "fine_tune_type": "lora", "num_layers": layers, "lora_parameters": lora,
            "base_model": dcfg.base_model, "adapter_type": dcfg.adapter_type, "seed": dcfg.seed,
        }, option=orjson.OPT_INDENT_2) + b"\n")
        metrics = {"adapter_id": aid, "steps": train_losses[-1][0] if train_losses else 0,
                   "train_steps": dcfg.train_steps, "stopped_by": stopped["by"], "train_loss": train_losses,
                   "val_loss": val_losses, "train_rows": len(train_set), "valid_rows": len(valid_set),
                   "method": dcfg.method}
        if is_dpo:
            metrics["dpo"] = {"beta": dcfg.dpo_beta, "reference": reference, "rewards": rewards,
                              "reward_pairs": {k: len(d) if d else 0 for k, d in probes.items()},
                              "pairs_left_out": train_set.too_long + valid_set.too_long,
                              "pairs_cut": train_set.cut + valid_set.cut}
        write_json(staging / "metrics.json", metrics)
        from refinery.training.plots import loss_curve, reward_curve

        loss_curve(staging / "loss.png", train_losses, val_losses,
                   f"{aid} — {dcfg.adapter_type}" + (f", DPO β={dcfg.dpo_beta}" if is_dpo else ""))
        if is_dpo:
            reward_curve(staging / "rewards.png", rewards, f"{aid} — DPO reward margin and accuracy")
        receipt = {
            "schema_version": 1, "stage": "train-run", "adapter_id": aid, "code_version": code,
            "data_receipt_sha256": file_sha256(ws.root / dcfg.output_dir / "data" / DATA_RECEIPT),
            "method": dcfg.method, "reference": reference, "data": used,
            "base_model": {"path": dcfg.base_model, "digest": base_digest,
                           "trained_on": str(train_base.relative_to(ws.root))
                           if train_base.is_relative_to(ws.root) else str(train_base)},
            "config": dcfg.model_dump(mode="json"), "seed": dcfg.seed,
            "adapter_sha256": file_sha256(staging / ADAPTER_FILE), "steps": metrics["steps"],
            "stopped_by": stopped["by"], "seconds": seconds,
            "blas": {"library": os.environ.get(blas.LOADED, "bundled"), "gflops": round(gflops, 1)},
            "chat_template": template_used(base),
            "final_train_loss": train_losses[-1][1] if train_losses else None,
            "final_val_loss": val_losses[-1][1] if val_losses else None,
        }
        write_json(staging / "receipt.json", receipt)
    log_run(ws, receipt, started_at, dcfg)
    return receipt


def load_split(path: Path, tokenizer: Any, args: Any) -> Any:
    """One split as mlx-lm's dataset, or [] when it is empty (a split by task group can leave the
    validation split empty; mlx-lm's own loader fails on an empty file)."""
    from mlx_lm.tuner import datasets

    data = [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.is_file() else []
    return datasets.create_dataset(data, tokenizer, args) if data else []


#: DPO's reward margin and accuracy are measured, every eval_steps, on this many training pairs
#: (and on every validation pair)
REWARD_PAIRS = 32

#: training prints where it stands every this many steps
ETA_EVERY = 10


def eta_line(step: int, steps: int, elapsed: float, time_cap: float) -> str:
    """`step 20/100 · 1m52s so far · about 7m28s left` — the rate so far, to the end or the time cap."""
    to_end, to_cap = elapsed / step * (steps - step), max(time_cap - elapsed, 0.0)
    left, capped = (to_cap, " (time cap)") if to_cap < to_end else (to_end, "")
    return f"step {step}/{steps} · {_clock(elapsed)} so far · about {_clock(left)} left{capped}"


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def answer_loss(dataset: Any) -> Any:
    """mlx-lm's chat dataset with the loss on the answer only: each row's tokens from the first
    assistant turn after the last user message to the end (a tool call, its result, the final
    text) are learnt — mlx-lm masks one leading span, so a tool's result between the call and
    the answer is learnt too —; the system prompt, the tools offered and the question before it
    are context. With the loss on every token, SmolLM2 spent most of it re-learning the same system
    prompts and tool lists (they repeat on every row). Other dataset shapes pass unchanged."""
    from mlx_lm.tuner.datasets import ChatDataset

    if not isinstance(dataset, ChatDataset):
        return dataset

    class AnswerLoss(ChatDataset):
        def process(self, d: dict[str, Any]) -> tuple[list[int], int]:
            messages, tools = d[self.chat_key], d.get("tools")
            tokens = self.tokenizer.apply_chat_template(messages, tools=tools, return_dict=False)
            last_user = last_user_index(messages)
            if last_user is None:  # nothing asked: all of it is answer
                return tokens, 0
            prompt = self.tokenizer.apply_chat_template(messages[:last_user + 1], tools=tools,
                                                        add_generation_prompt=True, return_dict=False)
            return tokens, min(len(prompt), len(tokens) - 1)

    return AnswerLoss(dataset._data, dataset.tokenizer, chat_key=dataset.chat_key)


def log_run(ws: Workspace, receipt: dict[str, Any], started_at: str, dcfg: DistillConfig) -> None:
    """Append the run to data/_kb/runs_distill_train.csv (task_name = distill_train), rewriting the
    file through a temp file so a kill never leaves a torn row."""
    import csv
    import io

    from refinery.jsonl import atomic_write

    path = ws.kb / RUNS_LOG
    old = path.read_bytes() if path.exists() else b""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if not old:
        w.writerow(RUNS_COLUMNS)
    w.writerow([f"{receipt['adapter_id']}-{started_at}", "distill_train", "distill_train", started_at,
                now_utc(), dcfg.base_model,
                f"Train a {dcfg.adapter_type} adapter{' with DPO' if dcfg.method == 'dpo' else ''} on "
                f"{receipt['data'][0]['rows']} {'pairs' if dcfg.method == 'dpo' else 'rows'} for "
                f"{dcfg.train_steps} steps (seed {dcfg.seed}).",
                f"Adapter {receipt['adapter_id']}: {receipt['steps']} steps, stopped by {receipt['stopped_by']}, "
                f"final train loss {receipt['final_train_loss']}, validation loss {receipt['final_val_loss']}.",
                0, "", 0, "end_turn"])
    with atomic_write(path) as f:
        f.write(old + buf.getvalue().encode())

