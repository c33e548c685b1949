"""Near-duplicate rows in the RAG and SFT exports: MinHash signatures, LSH bands, a check.

Exact dedup keeps one copy of each (task, normalised answer). A near-duplicate is another run of
the same template with one word changed, the same answer with another greeting, the same
question asked in other words and answered alike: not equal, but a second copy to train on.
Each candidate of an export gets a MinHash signature (rensa's RMinHash, NUM_PERM permutations,
a fixed seed) over the word 3-grams of its normalised prompt and of its normalised answer; the
estimated Jaccard similarity of two rows is the share of equal signature values.

The reading of each file writes, per candidate in line order, a record: the scored run's id
(its 16 hex digits as 64 bits: the export row's id is made from it) and the signature. After
every file is read (`find`), the records are joined into one file (read back a record at a
time), and:
1. LSH: the signature is cut into b bands of r values, r as long as still finds a pair exactly
   at the threshold with probability ≥ 0.95 (18 × 7 at 0.8; a pair at 0.9 is found 99.99 % of
   the time); rows whose hashes agree in some band are candidates. Rows that share no band
   hash with another (most, in varied data) are kept at once.
2. The others, in file order: a row is refused as `near_duplicate` when a row kept earlier in
   one of its band groups (each group remembers its first KEPT_PER_GROUP kept rows) is near
   it — estimated Jaccard at or over the threshold; LSH alone lets through pairs well under
   it —, naming the nearest such row and the similarity; otherwise it is kept. So every
   refused row names a kept row it is near (no chains: a row is never refused for resembling
   a row that was itself refused). Rows already refused as exact duplicates take no part.
   Near pairs can still both stay — one that no band catches (≤ 5 % at the threshold), or one
   whose kept row a full band group no longer remembers — : a detector, not a proof.

Same inputs → the same signatures, bands and choices: rensa's hashing is seeded, and rows are
decided in file order.
"""

from __future__ import annotations

import os
import shutil
from array import array
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np

from refinery.neardup_params import NUM_PERM, RECALL_AT_THRESHOLD, SEED, SHINGLE, version
from refinery.normalize import word_ngrams

__all__ = ["NUM_PERM", "RECALL_AT_THRESHOLD", "RECORD", "SEED", "SHINGLE", "Found", "Signer", "bands", "find",
           "shingles", "version"]

RECORD = np.dtype([("id", "<u8"), ("sig", "<u4", (NUM_PERM,))])
#: candidates a band's hashes or a check's signatures are computed for at once
CHUNK = 1 << 16


def shingles(prompt: str, answer: str) -> list[str]:
    """Word 3-grams of the normalised prompt and of the normalised answer (a text of fewer
    words: itself), the answer's marked so that they never equal the prompt's."""
    return word_ngrams(prompt, SHINGLE) + ["a\x1f" + g for g in word_ngrams(answer, SHINGLE)]


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
    """(b, r): the longest bands r (fewest candidates under the threshold) with b = NUM_PERM // r
    that still find a pair at the threshold with P = 1 − (1 − t^r)^b ≥ RECALL_AT_THRESHOLD."""
    for r in range(NUM_PERM, 0, -1):
        b = NUM_PERM // r
        if 1 - (1 - threshold ** r) ** b >= RECALL_AT_THRESHOLD:
            return b, r
    return NUM_PERM, 1


_POWERS = (np.uint64(0x9E3779B97F4A7C15) ** np.arange(1, NUM_PERM + 1, dtype=np.uint64)).astype(np.uint64)


def _band_hashes(sig: np.ndarray, b: int, r: int) -> np.ndarray:
    """[b, rows]: a 64-bit hash of each row's band k (signature values k·r … k·r + r − 1)."""
    with np.errstate(over="ignore"):
        x = sig[:, :b * r].astype(np.uint64).reshape(len(sig), b, r)
        h = (x * _POWERS[:r]).sum(axis=2, dtype=np.uint64).T
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return h


class Records:
    """Every file's records joined into one file (`path`), read a record at a time: one file
    descriptor, however many files, and no mapping that would count every page read as memory."""

    def __init__(self, paths: list[Path], path: Path):
        self.path = path
        self.total = sum(p.stat().st_size for p in paths) // RECORD.itemsize
        with open(path, "wb") as out:
            for src in paths:
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, CHUNK * RECORD.itemsize)
        self._fd = os.open(path, os.O_RDONLY)

    def band_hashes(self, places: np.ndarray, b: int, r: int) -> np.ndarray:
        """[b, len(places)]: the band hashes of the records at `places` (increasing), read in chunks,
        cut to 32 bits (4 bytes a row and band; a chance collision only costs a check)."""
        out = np.empty((b, len(places)), np.uint32)
        done = 0
        step = CHUNK // 8  # a chunk's bands as 64-bit values are 8 bytes a value: ~8 MiB at a time
        for start in range(0, self.total, step):
            recs = np.frombuffer(os.pread(self._fd, step * RECORD.itemsize, start * RECORD.itemsize), RECORD)
            lo, hi = np.searchsorted(places, [start, start + len(recs)])
            if hi > lo:
                out[:, done:done + hi - lo] = _band_hashes(recs["sig"][places[lo:hi] - start], b, r) >> np.uint64(32)
                done += hi - lo
        return out

    def one(self, i: int) -> np.ndarray:
        return np.frombuffer(os.pread(self._fd, RECORD.itemsize, i * RECORD.itemsize), RECORD)[0]

    def close(self) -> None:
        os.close(self._fd)
        self.path.unlink()


class Found(Mapping[int, tuple[int, float]]):
    """What `find` found: place → (the kept row's id as 64 bits, estimated Jaccard to it), held
    as three arrays in place order (24 bytes a refusal: at 10^6 rows a dict of tuples held
    hundreds of thousands of them at ~200 bytes each)."""

    def __init__(self, places: Iterable[int] = (), kept: Iterable[int] = (), sims: Iterable[float] = ()):
        self.places = np.asarray(array("q", places), np.int64)
        self.kept = np.asarray(array("Q", kept), np.uint64)
        self.sims = np.asarray(array("d", sims), np.float64)

    def __len__(self) -> int:
        return len(self.places)

    def __iter__(self) -> Iterator[int]:
        return iter(self.places.tolist())

    def __getitem__(self, place: int) -> tuple[int, float]:
        at = int(np.searchsorted(self.places, place))
        if at == len(self.places) or self.places[at] != place:
            raise KeyError(place)
        return int(self.kept[at]), float(self.sims[at])


def find(paths: list[Path], excluded: Iterable[int], threshold: float) -> Found:
    """The near-duplicates among the candidates the records in `paths` describe (in file order;
    `excluded`: places already refused): place → (the kept row's id as 64 bits, estimated
    Jaccard to it). Works in the folder of the first path."""
    if not paths:
        return Found()
    recs = Records(paths, paths[0].with_name(paths[0].name + ".all"))
    try:
        return _find(recs, excluded, threshold)
    finally:
        recs.close()


#: kept rows a band group remembers: a row is checked against each (the first is not always the near one)
KEPT_PER_GROUP = 4
#: signatures of the rows kept most recently held in memory (~0.6 KiB each); older ones are read back
KEPT_SIGNATURES = 1 << 14


def _find(recs: Records, excluded: Iterable[int], threshold: float) -> Found:
    if recs.total < 2:
        return Found()
    live = np.ones(recs.total, bool)
    live[np.fromiter(excluded, np.int64)] = False
    places = np.flatnonzero(live)
    b, r = bands(threshold)
    hashes = recs.band_hashes(places, b, r)
    # per band, each row's group among the rows sharing its hash (−1: it shares it with none);
    # numpy arrays, not dicts: 4 bytes a row and band, and 16 a shared group
    group = np.full(hashes.shape, -1, np.int32)
    kept = []  # per band: [shared groups, KEPT_PER_GROUP] rows kept in each, −1 for a free slot
    for k, h in enumerate(hashes):
        order = np.argsort(h, kind="stable")
        hs = h[order]
        opens = np.r_[True, hs[1:] != hs[:-1]]
        sizes = np.diff(np.r_[np.flatnonzero(opens), len(hs)])
        shared_groups = sizes >= 2
        compact = np.cumsum(shared_groups) - 1  # a shared group's number among the shared ones
        g = np.repeat(np.where(shared_groups, compact, -1), sizes)
        group[k, order] = g
        kept.append(np.full((int(shared_groups.sum()), KEPT_PER_GROUP), -1, np.int32))
    del hashes
    rows = np.flatnonzero((group >= 0).any(axis=0))
    # in file order: a row near (checked) a row kept earlier in one of its groups is refused,
    # naming the nearest such row; else it is kept, and remembered in its groups
    out_places, out_kept, out_sims = array("q"), array("Q"), array("d")
    signatures: dict[int, np.ndarray] = {}  # the rows kept most recently: checked against without a read

    def signature(j: int) -> np.ndarray:
        got = signatures.get(j)
        return got if got is not None else recs.one(int(places[j]))["sig"]

    for i in rows.tolist():
        mine = recs.one(int(places[i]))["sig"]
        mine_groups = [(k, g) for k, g in enumerate(group[:, i].tolist()) if g >= 0]
        best: tuple[float, int] | None = None
        seen: set[int] = set()
        for k, g in mine_groups:
            for j in kept[k][g].tolist():
                if j >= 0 and j not in seen:
                    seen.add(j)
                    sim = np.count_nonzero(mine == signature(j)) / NUM_PERM
                    if sim >= threshold and (best is None or (sim, -j) > (best[0], -best[1])):
                        best = (sim, j)
        if best is None:
            for k, g in mine_groups:
                slots = kept[k][g]
                free = slots.tolist()
                if -1 in free:
                    slots[free.index(-1)] = i
            signatures[i] = mine
            if len(signatures) > KEPT_SIGNATURES:
                del signatures[next(iter(signatures))]
        else:
            out_places.append(int(places[i]))
            out_kept.append(int(recs.one(int(places[best[1]]))["id"]))
            out_sims.append(round(best[0], 3))
    return Found(out_places, out_kept, out_sims)
