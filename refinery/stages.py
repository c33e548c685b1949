"""The stage contract: what each stage reads, writes and depends on, and what it reports.

Each stage declares its name, the stages whose outputs it reads (`reads_from`: the graph the
runner walks), the settings it depends on (`settings`: hashed into its receipt's config_hash,
so a change there recomputes it and nothing upstream) and the step that computes it. A step
reads its inputs (`inputs`: what reuse compares) and returns one `StageResult` per stage —
counts, by category, by reason, by source, outputs with their digests —, which is what the
receipts, reuse, drift and the invariants read. Several stages can share a step: the exports
are computed in one pass over the scored runs, one stage (and receipt) per export.

    materialize ──▶ score ──▶ export-<name>  (one per module in refinery/exporters/)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refinery.canonical import sig_hash
from refinery.config import Config
from refinery.exporters import EXPORTERS

if TYPE_CHECKING:
    from refinery.workspace import Workspace

#: advance(result, size): progress, a file at a time
Advance = Callable[[Any, int], None]


@dataclass
class StageResult:
    """What one stage did: its receipt without the run's id, timings and hashes."""

    stage: str
    outputs: list[dict[str, Any]]
    """{path, sha256, rows} of every file it wrote"""
    counts: dict[str, int]
    """rows_in, rows_out, quarantined, and what else the stage counts"""
    by_category: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    inputs: list[dict[str, Any]] | None = None
    """{path, sha256, rows} of what it read, when the stage digests its inputs as it reads them
    (materialize: each source's rows are what it read); else the runner's digests"""

    def receipt_fields(self) -> dict[str, Any]:
        return {"outputs": self.outputs, "counts": self.counts, "by_category": self.by_category,
                "by_reason": self.by_reason, "by_source": self.by_source}


def by_source(rows: Iterator[tuple[str, dict[str, int]]], *, sort_counts: bool = False) -> dict[str, dict[str, int]]:
    """Per-partition counts summed per source, sources in order (and their counts, with sort_counts)."""
    out: dict[str, Counter[str]] = {}
    for source, counts in rows:
        out.setdefault(source, Counter()).update(counts)
    return {s: dict(sorted(c.items())) if sort_counts else dict(c) for s, c in sorted(out.items())}


@dataclass(frozen=True)
class Stage:
    name: str
    reads_from: tuple[str, ...]
    step: str
    """the step that computes it (stages sharing one are computed in one pass)"""
    settings: Callable[[Config, bool | None], dict[str, Any]]
    """the settings it depends on (include_partial: run-all's override, or None)"""
    policy: Callable[[Config], str | None] = lambda cfg: None
    """the hash of a policy it applies, recorded apart from the settings (score's)"""

    def config_hash(self, cfg: Config, include_partial: bool | None = None) -> str:
        return sig_hash(self.settings(cfg, include_partial))


@dataclass(frozen=True)
class Step:
    name: str
    inputs: Callable[[Workspace, Config], list[tuple[Path, str]]]
    """(path, relative path) of every file it reads, for the reuse decision"""
    run: Callable[[Workspace, Config, bool | None, tuple[str, ...], Advance, dict[str, Any]],
                  tuple[list[StageResult], Any]]
    """run(ws, cfg, include_partial, the stages wanted, advance, carry) → (their results, what the
    command shows: the stage's own result object). `carry` is what one step hands the next in a
    run: the single pass's plan and the run's file digests (set by the runner), and what the pass
    prepared (set by materialize)."""
    sized: bool = True
    """its progress counts the bytes of its inputs (else it has no known total)"""


# --- the settings each stage depends on ---------------------------------------------------


def _materialize_settings(cfg: Config, include_partial: bool | None) -> dict[str, Any]:
    # worker counts and partition sizes never change an output; transforms_dirs only says where
    # modules are (what they are is in the code version)
    m = cfg.materialize.model_dump(mode="json", exclude={"workers", "parallel_min_bytes", "partition_bytes",
                                                         "transforms_dirs"})
    doc: dict[str, Any] = {"materialize": m, "mappings": {k: v.model_dump(mode="json")
                                                           for k, v in cfg.mappings.items()}}
    if cfg.sources or cfg.signals:  # absent when unused, so older receipts stay comparable
        doc["sources"] = {k: v.model_dump(mode="json") for k, v in cfg.sources.items()}
        doc["signals"] = {k: v.model_dump(mode="json") for k, v in cfg.signals.items()}
    return doc


def _score_settings(cfg: Config, include_partial: bool | None) -> dict[str, Any]:
    return {"score": cfg.score.model_dump(mode="json"),
            "quarantine_preview_chars": cfg.materialize.quarantine_preview_chars}


def _export_settings(stage: str) -> Callable[[Config, bool | None], dict[str, Any]]:
    def settings(cfg: Config, include_partial: bool | None) -> dict[str, Any]:
        e = cfg.export.model_dump(mode="json")
        if include_partial is not None:
            e["include_partial"] = include_partial
        # the sensitive-data rules' sources and versions: a new rule set re-scans every row
        from refinery.sensitive import ruleset

        out = {"export": e, "stage": stage, "sensitive_rules": ruleset()}
        # the signatures' hashing: a new rensa may group rows otherwise
        if cfg.export.dedup and cfg.export.near_duplicates:
            from refinery.neardup_params import version

            out["near_duplicates"] = version()
        return out
    return settings


def _policy_hash(cfg: Config) -> str | None:
    from refinery.policy import policy_hash

    return policy_hash(cfg.score)


# --- the steps ----------------------------------------------------------------------------


def _sources(ws: Workspace, cfg: Config) -> list[tuple[Path, str]]:
    from refinery.sources import list_sources

    return [(s.path, s.ws_rel) for s in list_sources(ws, cfg.materialize.ignore)[0]]


def _run_materialize(ws: Workspace, cfg: Config, include_partial: bool | None, stages: tuple[str, ...],
                     advance: Advance, carry: dict[str, Any]) -> tuple[list[StageResult], Any]:
    from refinery import materialize

    result = materialize.run(ws, cfg, on_file_done=advance, plan=carry.get("plan"))
    carry["prepared"] = result.prepared
    return [result.stage_result()], result


def _evidence(ws: Workspace, cfg: Config) -> list[tuple[Path, str]]:
    from refinery.score import evidence_files

    return sorted(ws.rels(evidence_files(ws)), key=lambda f: f[1])


def _score_inputs(ws: Workspace, cfg: Config) -> list[tuple[Path, str]]:
    """The evidence, and the decisions people made on the review queue (refinery.decisions)."""
    from refinery.decisions import decision_files

    return sorted([*_evidence(ws, cfg), *decision_files(ws, cfg)], key=lambda f: f[1])


def _run_score(ws: Workspace, cfg: Config, include_partial: bool | None, stages: tuple[str, ...],
               advance: Advance, carry: dict[str, Any]) -> tuple[list[StageResult], Any]:
    from refinery import score

    result = score.run(ws, cfg, on_file_done=advance, prepared=carry.get("prepared"))
    return [result.stage_result()], result


def _scored(ws: Workspace, cfg: Config) -> list[tuple[Path, str]]:
    """What the exports read: the evidence, the scored runs and the scored runs' manifest."""
    scored = ws.rels(p for p in ws.scored_runs.rglob("*") if p.is_file())
    return sorted([*_evidence(ws, cfg), *scored], key=lambda f: f[1])


def _run_exports(ws: Workspace, cfg: Config, include_partial: bool | None, stages: tuple[str, ...],
                 advance: Advance, carry: dict[str, Any]) -> tuple[list[StageResult], Any]:
    from refinery import export

    names = tuple(s.removeprefix("export-") for s in stages)
    result = export.run(ws, cfg, exports=names, include_partial=include_partial, on_file_done=advance,
                        prepared=carry.get("prepared"), digest=carry.get("digest"))
    return result.stage_results(), result


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("materialize", _sources, _run_materialize),
    Step("score", _score_inputs, _run_score),
    Step("export", _scored, _run_exports, sized=False),  # it advances by evidence file, not by what it reads
)}

#: Every stage, in the order the runner walks them (each after the stages it reads from).
STAGE_LIST: tuple[Stage, ...] = (
    Stage("materialize", (), "materialize", _materialize_settings),
    Stage("score", ("materialize",), "score", _score_settings, _policy_hash),
    *(Stage(f"export-{x.name}", ("materialize", "score"), "export", _export_settings(f"export-{x.name}"))
      for x in EXPORTERS),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGE_LIST}
STAGES: tuple[str, ...] = tuple(BY_NAME)
EXPORT_STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_LIST if s.step == "export")
#: The stages whose outputs each stage reads.
READS_FROM: dict[str, tuple[str, ...]] = {s.name: s.reads_from for s in STAGE_LIST}


def walk() -> list[tuple[Step, tuple[Stage, ...]]]:
    """The steps in an order where every stage comes after those it reads from (Kahn's
    algorithm over READS_FROM; ties in declared order), each with its stages."""
    done: set[str] = set()
    order: list[tuple[Step, tuple[Stage, ...]]] = []
    left = list(STAGE_LIST)
    while left:
        ready = [s for s in left if set(s.reads_from) <= done]
        if not ready:
            raise ValueError(f"the stages' reads_from has a cycle or an unknown stage: {[s.name for s in left]}")
        step = ready[0].step
        group = tuple(s for s in ready if s.step == step)
        order.append((STEPS[step], group))
        done.update(s.name for s in group)
        left = [s for s in left if s not in group]
    return order
