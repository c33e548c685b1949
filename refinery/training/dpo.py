"""DPO on mlx-lm's trainer: the preference pairs `train collect` wrote, a loss, a batch maker.

Direct Preference Optimization (Rafailov et al., 2023) raises the log-probability of the chosen
reply over the rejected one, relative to a frozen reference model:

    loss = −log σ(β · ((log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))))

where log π(reply) sums the log-probabilities of the reply's tokens given the prompt (the
prompt's tokens are context). β · (log π − log π_ref) is a side's implicit reward; the reward
margin is chosen's minus rejected's, and the reward accuracy the share of pairs where it is
positive.

The training loop is mlx-lm's (`tuner.trainer.train`, with this module's `loss` and
`iterate_batches`); nothing here steps an optimizer. The reference is the model as training
starts — the base (LoRA weights start at zero), or the promoted SFT adapter, whose weights the
LoRA layers start from — so its log-probabilities are computed once, before the first step,
with the same weights, and a pair's first loss is log 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

#: a batch is padded to a multiple of this (as mlx-lm's own batches are), so few shapes compile
PAD_TO = 32


class PairDataset:
    """The pairs of one split, tokenized through the chat template: per pair the chosen and the
    rejected conversation (prompt + reply) and where the reply starts. `ref` holds the reference
    log-probabilities once `reference_logps` has filled it."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Any, max_seq_length: int):
        self.pairs: list[tuple[list[int], int, list[int], int]] = []
        self.too_long = 0
        """pairs left out: the prompt alone fills max_seq_length, or both replies are the same
        tokens within it"""
        self.cut = 0
        """pairs kept with a reply cut at max_seq_length (its tokens past it are not compared)"""
        for row in rows:
            tools = row.get("tools")  # as SFT and eval render it: [] is not None to every template
            prompt = tokenizer.apply_chat_template(row["prompt"], tools=tools, add_generation_prompt=True,
                                                   return_dict=False)
            c, r = (tokenizer.apply_chat_template(row["prompt"] + row[s], tools=tools, return_dict=False)
                    for s in ("chosen", "rejected"))
            if len(prompt) >= max_seq_length or c[:max_seq_length] == r[:max_seq_length]:
                self.too_long += 1  # no reply token left to compare, or nothing that differs
                continue
            self.cut += max(len(c), len(r)) > max_seq_length
            self.pairs.append((c, min(len(prompt), len(c) - 1), r, min(len(prompt), len(r) - 1)))
        self.ref = np.zeros((len(self.pairs), 2), np.float32)
        self.max_seq_length = max_seq_length

    @classmethod
    def load(cls, path: Path, tokenizer: Any, max_seq_length: int) -> PairDataset:
        rows = [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.is_file() else []
        return cls(rows, tokenizer, max_seq_length)

    def __len__(self) -> int:
        return len(self.pairs)

    def head(self, n: int) -> PairDataset:
        """The first n pairs, with their reference log-probabilities."""
        part = object.__new__(PairDataset)
        part.pairs, part.ref, part.max_seq_length = self.pairs[:n], self.ref[:n], self.max_seq_length
        part.too_long = part.cut = 0
        return part

    def batch(self, idx: list[int]) -> tuple[Any, Any, Any]:
        """(tokens [2n, L]: the chosen conversations, then the rejected; (reply start, length) per
        row; the reference log-probabilities, in the same order)."""
        import mlx.core as mx

        seqs = [self.pairs[i][0] for i in idx] + [self.pairs[i][2] for i in idx]
        starts = [self.pairs[i][1] for i in idx] + [self.pairs[i][3] for i in idx]
        lengths = [min(len(s), self.max_seq_length) for s in seqs]
        width = min(1 + PAD_TO * ((max(lengths) + PAD_TO - 1) // PAD_TO), self.max_seq_length)
        arr = np.zeros((len(seqs), width), np.int32)
        for j, s in enumerate(seqs):
            arr[j, :lengths[j]] = s[:lengths[j]]
        ref = np.concatenate([self.ref[idx, 0], self.ref[idx, 1]])
        return mx.array(arr), mx.array(list(zip(starts, lengths, strict=True))), mx.array(ref)


def sequence_logps(model: Any, tokens: Any, lengths: Any) -> tuple[Any, Any]:
    """Per row, the summed log-probability of its reply tokens (from its start to its length);
    and how many tokens that is, in all."""
    import mlx.core as mx
    import mlx.nn as nn

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logp = -nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets)
    pos = mx.arange(1, targets.shape[1] + 1)  # the position, in the row, of each target token
    mask = mx.logical_and(pos >= lengths[:, 0:1], pos < lengths[:, 1:])
    return (logp * mask).sum(axis=1), mask.sum()


def make_loss(beta: float):
    """mlx-lm's loss signature, (model, *batch) → (loss, tokens), for DPO with this β."""
    import mlx.core as mx
    import mlx.nn as nn

    def dpo_loss(model: Any, tokens: Any, lengths: Any, ref: Any) -> tuple[Any, Any]:
        logps, ntoks = sequence_logps(model, tokens, lengths)
        n = logps.shape[0] // 2
        margin = (logps[:n] - ref[:n]) - (logps[n:] - ref[n:])
        return mx.mean(-nn.log_sigmoid(beta * margin)), ntoks

    return dpo_loss


def iterate_batches(dataset: PairDataset, batch_size: int, max_seq_length: int, loop: bool = False,
                    seed: int | None = None, comm_group: Any = None) -> Iterator[tuple[Any, Any, Any]]:
    """mlx-lm's batch maker for pairs: pairs sorted by length and cut into batches (so a batch's
    rows are alike in length), the batches in an order drawn from numpy's seeded generator."""
    if len(dataset) < batch_size:
        raise ValueError(f"{len(dataset)} pairs, fewer than batch_size = {batch_size}")
    order = sorted(range(len(dataset)), key=lambda i: (len(dataset.pairs[i][0]) + len(dataset.pairs[i][2]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if seed is not None:
        np.random.seed(seed)
    while True:
        for b in np.random.permutation(len(batches)):
            yield dataset.batch(batches[b])
        if not loop:
            return


def _in_batches(dataset: PairDataset, batch_size: int) -> Iterator[list[int]]:
    """Every pair once, in batches of pairs alike in length (a batch is padded to its longest)."""
    order = sorted(range(len(dataset)), key=lambda i: (max(len(dataset.pairs[i][0]), len(dataset.pairs[i][2])), i))
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def pair_logps(model: Any, dataset: PairDataset, batch_size: int) -> np.ndarray:
    """[pairs, 2]: each pair's chosen and rejected reply log-probability under `model`."""
    import mlx.core as mx

    out = np.zeros((len(dataset), 2), np.float32)
    for idx in _in_batches(dataset, batch_size):
        tokens, lengths, _ = dataset.batch(idx)
        logps, _ = sequence_logps(model, tokens, lengths)
        mx.eval(logps)
        got = np.array(logps)
        out[idx, 0], out[idx, 1] = got[:len(idx)], got[len(idx):]
    return out


def reference_logps(model: Any, dataset: PairDataset, batch_size: int) -> None:
    """Fill `dataset.ref` with the model as it is now: call before the first training step."""
    dataset.ref = pair_logps(model, dataset, batch_size)


def reward_stats(model: Any, dataset: PairDataset, beta: float, batch_size: int) -> dict[str, float]:
    """The implicit rewards of the model now against the reference: accuracy (share of pairs with
    a positive margin), mean margin, mean chosen and rejected reward."""
    logps = pair_logps(model, dataset, batch_size)
    rewards = beta * (logps - dataset.ref)
    margin = rewards[:, 0] - rewards[:, 1]
    return {"accuracy": round(float((margin > 0).mean()), 4), "margin": round(float(margin.mean()), 4),
            "chosen": round(float(rewards[:, 0].mean()), 4), "rejected": round(float(rewards[:, 1].mean()), 4)}


def preference_accuracy(logps: np.ndarray) -> float:
    """Share of pairs whose chosen reply the model gives a higher log-probability than the rejected."""
    return round(float((logps[:, 0] > logps[:, 1]).mean()), 4) if len(logps) else 0.0
