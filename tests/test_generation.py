"""Batched greedy generation (train eval's) gives the answers one-at-a-time generation gives."""

from __future__ import annotations

import pytest

from refinery.generation import generate_chat, generate_chats
from refinery.training.tinymodel import build_tiny_model

TEXTS = ["How many orders in August?", "Run the SQL query for revenue by month.",
         "Delete the staging namespace after the backup.", "Which playbook covers a failed deploy?"] * 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mlx_lm import load

    folder = tmp_path_factory.mktemp("gen") / "tiny"
    build_tiny_model(folder, TEXTS, hidden=64, layers=2, heads=4)
    return load(str(folder))


@pytest.mark.slow
def test_batched_answers_equal_one_at_a_time_answers_in_order(model):
    m, tok = model
    # prompts of different lengths, so a batch is padded; 5 prompts in batches of 2 leaves one alone
    prompts = [([{"role": "user", "content": t}], None) for t in
               ["How many orders in August?", "hi", "Run the SQL query for revenue by month and by region, please.",
                "Delete", "Which playbook covers a failed deploy?"]]
    one = [generate_chat(m, tok, msgs, 12, tools) for msgs, tools in prompts]
    batched = list(generate_chats(m, tok, prompts, 12, batch_size=2))
    assert [g.text for g in batched] == [g.text for g in one]
    assert [g.tokens for g in batched] == [g.tokens for g in one]
    assert all(g.finish_reason in ("stop", "length") for g in batched)
    assert list(generate_chats(m, tok, prompts, 12, batch_size=2)) == batched  # deterministic
    assert list(generate_chats(m, tok, [], 12)) == []


@pytest.mark.slow
def test_a_prefix_every_prompt_shares_is_read_once_with_the_same_answers(model, monkeypatch):
    import refinery.generation as generation

    m, tok = model
    system = {"role": "system", "content": " ".join(TEXTS[:12])}  # well over SHARED_PREFIX_MIN tokens
    prompts = [([system, {"role": "user", "content": q}], None)
               for q in ("How many orders in August?", "hi", "Delete the staging namespace after the backup.")]
    read, real = [], generation._prefill
    monkeypatch.setattr(generation, "_prefill", lambda model, tokens: read.append(len(tokens)) or real(model, tokens))
    batched = [g.text for g in generate_chats(m, tok, prompts, 12, batch_size=3)]
    assert read and read[0] >= generation.SHARED_PREFIX_MIN  # the shared system prompt, once for the batch
    assert batched == [generate_chat(m, tok, msgs, 12).text for msgs, _ in prompts]
