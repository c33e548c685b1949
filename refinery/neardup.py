"""Near-duplicate rows in the RAG and SFT exports: MinHash signatures, LSH bands, a check.

Exact dedup keeps one copy of each (task, normalised answer). A near-duplicate is another run of
the same template with one word changed, the same answer with another greeting, the same
question asked in other words and answered alike: not equal, but a second copy to train on.
Each candidate of an export gets a MinHash signature (rensa's RMinHash, NUM_PERM permutations,
a fixed seed) over the word 3-grams of its normalised prompt and of its normalised answer; the
estimated Jaccard similarity of two rows is the share of equal signature values.

The reading of each file writes, per candidate in line order, a record: the scored run's id
(its 16 hex digits as 64 bits: the export row's id is made from it) and the signature. After
every file is read (`find`):
1. LSH: the signature is cut into `b` bands of `r` values (chosen for the threshold as
   datasketch does: least false positives plus false negatives); rows whose band hashes
   agree in any band are candidates. Band hashes are made one band at a time, with numpy.
   Rows that share no band hash with another (most, in varied data) are kept at once.
2. The others, in file order: a row is refused as `near_duplicate` when the earliest row kept
   so far in one of its band groups is near it — estimated Jaccard at or over the threshold
   (LSH alone lets through pairs well under it) —, naming that row and the similarity;
   otherwise it is kept. So every refused row names a kept row it is near (no chains: a row
   is never refused for resembling a row that was itself refused). Rows already refused as
   exact duplicates take no part.

Same inputs → the same signatures, bands and choices: rensa's hashing is seeded, and rows are
decided in file order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

from refinery.normalize import normalize_text

NUM_PERM = 128
SEED = 0x5EED
SHINGLE = 3
RECORD = np.dtype([("id", "<u8"), ("sig", "<u4", (NUM_PERM,))])
#: candidates a band's hashes or a check's signatures are computed for at once
CHUNK = 1 << 16
_WORDS = re.compile(r"\w+")


def version() -> str:
    """What the signatures depend on besides the text (in the export's config hash)."""
    import rensa

    return f"rensa {getattr(rensa, '__version__', '?')}/{rensa.RMinHash.ALGORITHM_VERSION} perm {NUM_PERM} " \
           f"seed {SEED} word {SHINGLE}-grams"


def shingles(prompt: str, answer: str) -> list[str]:
    """Word 3-grams of the normalised prompt and of the normalised answer (a text of fewer
    words: itself), the answer's marked so that they never equal the prompt's."""
    out = []
    for mark, text in (("", prompt), ("a\x1f", answer)):
        words = _WORDS.findall(normalize_text(text))
        out += [mark + " ".join(words[i:i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))] \
            if words else []
    return out


class Signer:
    """Signatures of rows, as records (`RECORD`) ready to write."""

    def __init__(self) -> None:
        from rensa import RMinHash

        self._new = RMinHash

    def record(self, row_id: str, prompt: str, answer: str) -> bytes:
        m = self._new(num_perm=NUM_PERM, seed=SEED)
        m.update(shingles(prompt, answer))
        return int(row_id[3:], 16).to_bytes(8, "little") + np.asarray(m.digest(), "<u4").tobytes()


@lru_cache(maxsize=32)
def bands(threshold: float) -> tuple[int, int]:
    """(b, r) with b·r ≤ NUM_PERM minimising the false-positive area under the threshold plus
    the false-negative area over it of P(candidate | s) = 1 − (1 − s^r)^b."""
    s_lo, s_hi = np.linspace(0, threshold, 200), np.linspace(threshold, 1, 200)
    best = (math.inf, 1, 1)
    for b in range(1, NUM_PERM + 1):
        for r in range(1, NUM_PERM // b + 1):
            fp = np.trapezoid(1 - (1 - s_lo ** r) ** b, s_lo)
            fn = np.trapezoid((1 - s_hi ** r) ** b, s_hi)
            if fp + fn < best[0]:
                best = (fp + fn, b, r)
    return best[1], best[2]


def _records(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=RECORD, mode="r") if path.stat().st_size else np.zeros(0, RECORD)


_POWERS = (np.uint64(0x9E3779B97F4A7C15) ** np.arange(1, NUM_PERM + 1, dtype=np.uint64)).astype(np.uint64)


def _band_hashes(sig: np.ndarray, k: int, r: int) -> np.ndarray:
    """One 64-bit hash per row of band k (signature values k·r … k·r + r − 1)."""
    with np.errstate(over="ignore"):
        h = (sig[:, k * r:(k + 1) * r].astype(np.uint64) * _POWERS[:r]).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return h


class Signatures:
    """Every file's records, addressed by the candidate's place in file order."""

    def __init__(self, paths: Iterable[Path]):
        self.files = [_records(p) for p in paths]
        self.starts = np.cumsum([0] + [len(f) for f in self.files])
        self.total = int(self.starts[-1])

    def band(self, k: int, r: int) -> np.ndarray:
        out = np.empty(self.total, np.uint64)
        for f, start in zip(self.files, self.starts, strict=False):
            for i in range(0, len(f), CHUNK):
                part = f["sig"][i:i + CHUNK]
                out[start + i:start + i + len(part)] = _band_hashes(part, k, r)
        return out

    def take(self, index: np.ndarray, field: str) -> np.ndarray:
        """The records' `field` at the given places (any order)."""
        which = np.searchsorted(self.starts, index, side="right") - 1
        shape = (len(index), NUM_PERM) if field == "sig" else (len(index),)
        out = np.empty(shape, np.uint32 if field == "sig" else np.uint64)
        for fi in np.unique(which):
            mask = which == fi
            out[mask] = self.files[fi][field][index[mask] - self.starts[fi]]
        return out

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Estimated Jaccard of each pair (a[i], b[i])."""
        out = np.empty(len(a), np.float64)
        for i in range(0, len(a), CHUNK):
            out[i:i + CHUNK] = (self.take(a[i:i + CHUNK], "sig") == self.take(b[i:i + CHUNK], "sig")).mean(axis=1)
        return out


def find(paths: list[Path], excluded: Iterable[int], threshold: float) -> dict[int, tuple[int, float]]:
    """The near-duplicates among the candidates the records in `paths` describe (in file order;
    `excluded`: places already refused): place → (the kept row's id as 64 bits, estimated
    Jaccard to it)."""
    sigs = Signatures(paths)
    if sigs.total < 2:
        return {}
    live = np.ones(sigs.total, bool)
    live[np.fromiter(excluded, np.int64)] = False
    places = np.flatnonzero(live)
    b, r = bands(threshold)
    # each band's hashes, and which rows share one with an earlier row in some band (vectorised)
    hashes = np.empty((b, len(places)), np.uint64)
    shared = np.zeros(len(places), bool)
    for k in range(b):
        h = hashes[k] = sigs.band(k, r)[places]
        order = np.argsort(h, kind="stable")
        hs = h[order]
        repeat = np.r_[False, hs[1:] == hs[:-1]]
        shared[order[repeat | np.r_[repeat[1:], False]]] = True  # every member of a group of two or more
    if not shared.any():
        return {}
    # in file order, over the rows that share a band hash: a row near (checked) the earliest kept
    # row of one of its band groups is refused; else it is kept, and the earliest kept of its groups
    first_kept: list[dict[int, int]] = [{} for _ in range(b)]
    out: dict[int, tuple[int, float]] = {}
    rows = np.flatnonzero(shared)
    sig_of = dict(zip(rows.tolist(), sigs.take(places[rows], "sig"), strict=True)) if len(rows) <= CHUNK * 4 else None
    for i in rows.tolist():
        keys = hashes[:, i].tolist()
        near = None
        for k, key in enumerate(keys):
            j = first_kept[k].get(key)
            if j is None or (near is not None and j >= near[0]):
                continue
            sim = _similarity(sigs, sig_of, i, j, places)
            if sim >= threshold:
                near = (j, sim)
        if near is None:
            for k, key in enumerate(keys):
                first_kept[k].setdefault(key, i)
        else:
            out[int(places[i])] = (near[0], round(near[1], 3))
    kept = np.array([j for j, _ in out.values()], np.int64)
    ids = sigs.take(places[kept], "id") if len(kept) else []
    return {place: (int(kid), sim) for (place, (_, sim)), kid in zip(out.items(), ids, strict=True)}


def _similarity(sigs: Signatures, sig_of: dict[int, np.ndarray] | None, i: int, j: int, places: np.ndarray) -> float:
    if sig_of is not None:
        return float((sig_of[i] == sig_of[j]).mean())
    return float(sigs.similarity(places[[i]], places[[j]])[0])
