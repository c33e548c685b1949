"""Which split each training item goes to, so that no held-out prompt is (nearly) in training.

Splitting by a hash of each row's id lets the same task sit in train and in test: on the
bundled sample every one of the 41 test prompts that split gave had all its word 3-grams in
training prompts (the sample, like real traces, answers each task several times). Here:

1. Overlap: the share of a prompt's word n-grams (lower-cased words, n = decontam_ngram) that
   another prompt — or the training split as a whole — also has.
2. Items (SFT rows and preference pairs) are grouped: by task key (sha256 of the normalised
   prompt: every answer to a prompt, every pair over it), and two prompts whose overlap
   either way is at or over decontam_threshold join their groups — another phrasing, or the
   same template with one word changed, stays on one side. Candidates are found exactly with
   a prefix filter (a prompt over the threshold shares at least one of another's rarest
   ⌊(1 − threshold)·n⌋ + 1 n-grams), so the pass is not quadratic in the prompts.
3. A group's split is a hash of its smallest task key (test_fraction, valid_fraction), so it
   does not depend on row order.
4. A held-out prompt can still reach the threshold against training as a whole (its n-grams
   spread over several training prompts): its group moves into training, and again until none
   does. Moving only adds to training, so the result does not depend on the order of the moves.
5. The report counts, per held-out split, the overlap left (none at or over the threshold, by
   construction), what a split by task key alone would have left, the eval-sheet rows held
   out and the safety probes (fixed: reported, never moved).

Exact, and in memory: a set of 64-bit n-gram hashes per distinct prompt, and one for training.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from refinery.normalize import word_ngrams

HELD_OUT = ("test", "valid")


def split_of(key: str, test_fraction: float, valid_fraction: float) -> str:
    """A key's split by its sha256: a number in [0, 1) below test_fraction is test, below
    test_fraction + valid_fraction valid, else train."""
    x = int(hashlib.sha256(key.encode()).hexdigest()[:13], 16) / 16**13
    return "test" if x < test_fraction else "valid" if x < test_fraction + valid_fraction else "train"


def grams(text: str, n: int) -> frozenset[int]:
    """The word n-grams of a text, each as 64 bits of its blake2b; a text shorter than n words is one gram."""
    return frozenset(int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                     for s in word_ngrams(text, n))


def overlap(g: frozenset[int], train: set[int]) -> float:
    """Share of `g` also in `train` (0 for a prompt without words)."""
    return len(g & train) / len(g) if g else 0.0


@dataclass
class Item:
    key: str
    """the task key: the unit that goes to one split"""
    prompt: str
    eval_sheet: bool = False
    """a row from an eval sheet (a source named eval…): reported apart"""
    split: str = ""
    grams: frozenset[int] = field(default=frozenset())


def assign(items: list[Item], *, test_fraction: float, valid_fraction: float, ngram: int, threshold: float,
           fixed_train: Iterable[str] = (), probes: Iterable[str] = ()) -> dict[str, Any]:
    """Set each item's split; return the contamination report. `fixed_train`: prompts always in
    training (the safety rehearsal); `probes`: prompts evaluated apart (the safety probes)."""
    cache: dict[str, frozenset[int]] = {}

    def of(text: str) -> frozenset[int]:
        if text not in cache:
            cache[text] = grams(text, ngram)
        return cache[text]

    for it in items:
        it.grams = of(it.prompt)
    root = _cluster(items, threshold)
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(root[it.key], []).append(it)
    for it in items:  # first what a split by task key alone gives, for the report
        it.split = split_of(it.key, test_fraction, valid_fraction)
    fixed = [of(p) for p in fixed_train]
    by_hash = _measure(items, _training(items, fixed), threshold)  # what the split by key alone leaves
    for k, g in groups.items():
        for it in g:
            it.split = split_of(k, test_fraction, valid_fraction)

    train = _training(items, fixed)
    moved_groups = moved_items = 0
    held = sorted(k for k, g in groups.items() if g[0].split != "train")
    changed = True
    while changed:
        changed = False
        for k in held:
            g = groups[k]
            if g[0].split != "train" and any(overlap(it.grams, train) >= threshold for it in g):
                for it in g:
                    it.split = "train"
                    train |= it.grams
                moved_groups += 1
                moved_items += len(g)
                changed = True
    after = _measure(items, train, threshold)
    probe_overlaps = [overlap(of(p), train) for p in probes]
    eval_test = [overlap(it.grams, train) for it in items if it.eval_sheet and it.split == "test"]
    return {
        "measure": f"share of a held-out prompt's word {ngram}-grams found in the training split's prompts",
        "ngram": ngram, "threshold": threshold,
        "task_keys": len(root), "groups": len(groups),
        "moved_to_train": {"groups": moved_groups, "items": moved_items},
        **after,
        "by_key_hash_alone": by_hash,
        "eval_sheet_test_rows": _summary(eval_test, threshold),
        "safety_probes": _summary(probe_overlaps, threshold),
    }


def _cluster(items: list[Item], threshold: float) -> dict[str, str]:
    """task key → its group's smallest task key: the keys of one prompt's items are one group,
    and two prompts whose overlap either way is at or over the threshold join theirs."""
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    prompts: dict[frozenset[int], str] = {}  # distinct n-gram sets → a task key having it
    for it in items:
        parent.setdefault(it.key, it.key)
        if it.grams:
            union(prompts.setdefault(it.grams, it.key), it.key)
    freq: Counter[int] = Counter(g for gs in prompts for g in gs)
    postings: dict[int, list[frozenset[int]]] = {}
    for gs in prompts:
        for g in gs:
            postings.setdefault(g, []).append(gs)
    for gs, key in prompts.items():
        # a prompt sharing ≥ threshold·|gs| of gs's n-grams shares one of its rarest |gs| − that + 1
        need = math.ceil(threshold * len(gs) - 1e-9)
        prefix = sorted(gs, key=lambda g: (freq[g], g))[:len(gs) - need + 1]
        for other in {id(o): o for g in prefix for o in postings[g]}.values():
            if other is not gs and len(gs & other) >= need:
                union(key, prompts[other])
    return {k: find(k) for k in parent}


def _training(items: list[Item], fixed: list[frozenset[int]]) -> set[int]:
    """The n-grams of every prompt in the training split now, and of the fixed ones."""
    train: set[int] = set().union(*fixed)
    for it in items:
        if it.split == "train":
            train |= it.grams
    return train


def _measure(items: list[Item], train: set[int], threshold: float) -> dict[str, Any]:
    return {s: _summary([overlap(it.grams, train) for it in items if it.split == s], threshold) for s in HELD_OUT}


def _summary(overlaps: list[float], threshold: float) -> dict[str, Any]:
    return {"items": len(overlaps), "at_or_over_threshold": sum(o >= threshold for o in overlaps),
            "max_overlap": round(max(overlaps), 4) if overlaps else None,
            "mean_overlap": round(sum(overlaps) / len(overlaps), 4) if overlaps else None}
