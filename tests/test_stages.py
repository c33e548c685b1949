"""The stage contract: the runner walks the graph the stages declare."""

from __future__ import annotations

import pytest

from refinery import receipts, stages
from refinery.config import Config
from refinery.exporters import NAMES


def test_the_declared_graph():
    assert stages.STAGES == ("materialize", "score", *(f"export-{n}" for n in NAMES)) == receipts.STAGES
    assert stages.READS_FROM["score"] == ("materialize",)
    assert all(stages.READS_FROM[s] == ("materialize", "score") for s in stages.EXPORT_STAGES)
    walked = [(step.name, tuple(s.name for s in group)) for step, group in stages.walk()]
    assert walked == [("materialize", ("materialize",)), ("score", ("score",)), ("export", stages.EXPORT_STAGES)]


def test_walk_follows_reads_from_not_the_declared_order(monkeypatch):
    monkeypatch.setattr(stages, "STAGE_LIST", tuple(reversed(stages.STAGE_LIST)))
    walked = [step.name for step, _ in stages.walk()]
    assert walked == ["materialize", "score", "export"]


def test_walk_refuses_a_cycle(monkeypatch):
    m, s, *_ = stages.STAGE_LIST
    looped = stages.Stage("materialize", ("score",), "materialize", m.settings)
    monkeypatch.setattr(stages, "STAGE_LIST", (looped, s))
    with pytest.raises(ValueError, match="cycle"):
        stages.walk()


def test_each_stage_hashes_only_the_settings_it_declares():
    base, other = Config(), Config.model_validate({"export": {"max_pairs_per_task": 3}})
    same = {s.name: s.config_hash(base) == s.config_hash(other) for s in stages.STAGE_LIST}
    assert same == {"materialize": True, "score": True, **{e: False for e in stages.EXPORT_STAGES}}
    assert receipts.stage_config_hash("score", base) == stages.BY_NAME["score"].config_hash(base)
    with pytest.raises(ValueError, match="unknown stage"):
        receipts.stage_config_hash("nope", base)
    # run-all's --include-partial is a setting of the exports alone
    assert stages.BY_NAME["score"].config_hash(base, True) == stages.BY_NAME["score"].config_hash(base)
    assert all(stages.BY_NAME[e].config_hash(base, True) != stages.BY_NAME[e].config_hash(base)
               for e in stages.EXPORT_STAGES)
