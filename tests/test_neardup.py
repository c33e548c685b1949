"""Near-duplicate detection in the RAG and SFT exports (refinery.neardup)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from refinery import neardup
from refinery.neardup import NUM_PERM, RECORD


def write(path, sigs: list[np.ndarray], first_id: int = 1) -> None:
    recs = np.zeros(len(sigs), RECORD)
    recs["id"] = np.arange(first_id, first_id + len(sigs), dtype=np.uint64)
    for i, s in enumerate(sigs):
        recs["sig"][i] = s
    path.write_bytes(recs.tobytes())


def changed(sig: np.ndarray, positions, rng) -> np.ndarray:
    out = sig.copy()
    out[list(positions)] = rng.integers(0, 2**32, len(positions), dtype=np.uint64).astype(np.uint32)
    return out


def test_bands_suit_the_threshold():
    for t in (0.5, 0.7, 0.8, 0.9):
        b, r = neardup.bands(t)
        found = lambda s: 1 - (1 - s ** r) ** b  # noqa: E731, B023
        assert b * r <= NUM_PERM and found(t) >= 0.95  # a pair at the threshold is nearly always a candidate
        assert found(t - 0.3) < 0.3  # one well under it seldom is: few checks
    assert neardup.bands(0.8) == (18, 7)


def test_a_row_is_refused_only_when_near_a_kept_earlier_row(tmp_path):
    """A; B = A with 15 % changed (0.85); C = B with another 15 % changed (0.85 to B, 0.70 to A);
    D unrelated; E = A again, in a later file; F = A, but excluded (an exact duplicate)."""
    b, r = neardup.bands(0.8)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32)
    bb = changed(a, range(r, r + 19), rng)  # band 0 kept whole: B meets A in it
    c = changed(bb, range(2 * r, 2 * r + 19), rng)  # band 1 kept whole: C meets B there, not A
    d = rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32)
    write(tmp_path / "0.bin", [a, bb, c, d])
    write(tmp_path / "1.bin", [a.copy(), a.copy()], first_id=100)
    found = neardup.find([tmp_path / "0.bin", tmp_path / "1.bin"], [5], 0.8)
    assert set(found) == {1, 4}  # B and E; C is near only B, which went: C stays; F was excluded
    assert found[1] == (1, pytest.approx(0.852, abs=0.01)) and found[4] == (1, 1.0)  # both name A (id 1)
    assert all(sim >= 0.8 for _, sim in found.values())
    assert neardup.find([tmp_path / "0.bin", tmp_path / "1.bin"], [], 1.0) == {4: (1, 1.0), 5: (1, 1.0)}


def test_kept_signatures_read_back_when_no_longer_held(tmp_path, monkeypatch):
    """The rows kept most recently are compared from memory, older ones read back from the
    joined file: the same choices whichever way."""
    rng = np.random.default_rng(3)
    heads = [rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32) for _ in range(6)]
    sigs = heads + [changed(heads[k % 6], range(100, 110), rng) for k in range(30)]
    write(tmp_path / "0.bin", sigs)
    held = neardup.find([tmp_path / "0.bin"], [], 0.8)
    monkeypatch.setattr(neardup, "KEPT_SIGNATURES", 1)
    assert neardup.find([tmp_path / "0.bin"], [], 0.8) == held
    assert set(held) == set(range(6, 36)) and {kept for kept, _ in held.values()} == set(range(1, 7))


def test_empty_and_single_files(tmp_path):
    (tmp_path / "e.bin").write_bytes(b"")
    write(tmp_path / "one.bin", [np.arange(NUM_PERM, dtype=np.uint32)])
    assert neardup.find([tmp_path / "e.bin"], [], 0.8) == {}
    assert neardup.find([tmp_path / "e.bin", tmp_path / "one.bin"], [], 0.8) == {}


def test_signatures_are_seeded_and_see_prompt_and_answer_apart():
    s = neardup.Signer()
    one = s.record("ev-00000000000000aa", "How many orders in August?", "1,312 orders: SELECT count(*) FROM orders")
    assert one == neardup.Signer().record("ev-00000000000000aa", "How many orders in August?",
                                          "1,312 orders: SELECT count(*) FROM orders")
    assert int.from_bytes(one[:8], "little") == 0xAA and len(one) == RECORD.itemsize
    # the same words moved from the answer to the prompt are other shingles
    assert neardup.shingles("a b c", "") != neardup.shingles("", "a b c")
    assert neardup.shingles("Hi", "OK!") == ["hi", "a\x1fok"]


def test_the_sample_drops_near_duplicates_naming_the_row_kept(tmp_path):
    from conftest import sample_workspace

    ws = sample_workspace(tmp_path / "w", "run-all")
    sft = {r["id"]: r for r in map(orjson.loads, (ws / "exports/sft/instruction_response.jsonl").read_bytes()
                                   .splitlines())}
    refused = [r for r in map(orjson.loads, (ws / "exports/quarantine/export-sft.jsonl").read_bytes().splitlines())
               if r["reason"] == "near_duplicate"]
    assert len(sft) == 80 and len(refused) == 72
    for r in refused:
        kept = r["detail"].split()[2].rstrip(",")
        assert kept in sft, r["detail"]
        assert float(r["detail"].split("similarity ")[1].split(";")[0]) >= 0.8
    # off: the exact dedup alone
    (ws / "refinery.toml").write_text("[export]\nnear_duplicates = false\n")
    from typer.testing import CliRunner

    from refinery.cli import app

    assert CliRunner().invoke(app, ["run-all", "--workspace", str(ws)]).exit_code == 0
    assert len((ws / "exports/sft/instruction_response.jsonl").read_bytes().splitlines()) == 152
    assert b"near_duplicate" not in (ws / "exports/quarantine/export-sft.jsonl").read_bytes()


def test_many_files_need_one_descriptor(tmp_path):
    """A workspace with a scored-run file per day and source holds thousands of record files:
    they are read one at a time (a mapping per file ran out of descriptors at 1,500)."""
    import resource

    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32)
    paths = []
    for i in range(600):
        paths.append(tmp_path / f"n-{i:06d}.bin")
        write(paths[-1], [base if i % 100 == 0 else rng.integers(0, 2**32, NUM_PERM).astype(np.uint32)], first_id=i + 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        found = neardup.find(paths, [], 0.8)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert found == {i: (1, 1.0) for i in range(100, 600, 100)}  # every copy names the first
    assert sorted(tmp_path.glob("n-*")) == sorted(paths)  # the joined file is gone


def test_the_config_hash_needs_no_numpy():
    """Every run computes the exports' config hash, which names the signatures' version: an
    unchanged re-run (a second or less) should not spend ~0.2 s importing numpy for it."""
    import subprocess
    import sys

    code = ("import sys; from refinery.config import Config; from refinery.stages import BY_NAME; "
            "h = [BY_NAME[s].config_hash(Config()) for s in BY_NAME]; "
            "assert 'rensa' in str(BY_NAME['export-rag'].settings(Config(), None)); "
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
