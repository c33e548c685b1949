"""Typed configuration: command-line flag > refinery.toml > defaults.

Every table forbids unknown keys, so a typo in refinery.toml is an error that names the key
instead of a setting that silently does nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
    model_validator,
)

from refinery.canonical import sig_hash
from refinery.errors import RefineryError
from refinery.sensitive.rules import KINDS

CONFIG_FILE = "refinery.toml"


class ConfigError(RefineryError):
    """A user error in the configuration; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaterializeConfig(Section):
    max_line_bytes: int = Field(default=1 << 20, gt=0,
                                description="longer source lines are quarantined as line_too_long")
    workers: int = Field(default=0, ge=0, description="worker processes; 0 = one per core")
    parallel_min_bytes: int = Field(
        default=8 << 20, ge=0,
        description="inputs smaller than this are processed in-process (workers cost start-up time)")
    partition_bytes: int = Field(
        default=64 << 20, ge=0,
        description="a JSONL source larger than this is cut into line-aligned byte ranges of about this "
                    "size, worked on in parallel (0: never cut); the outputs are the same whatever it is")
    max_document_bytes: int = Field(
        default=256 << 20, gt=0,
        description="a whole JSON document (or archive member) larger than this is refused as "
                    "document_too_large: such files are best converted to JSONL")
    quarantine_preview_chars: int = Field(
        default=240, ge=0,
        description="characters of a refused row's redacted text that quarantine keeps as its preview (0: none)")
    ignore: list[str] = Field(
        default_factory=lambda: ["audit_baselines.jsonl"],
        description="globs (relative to data/_kb) of files that are not source streams")
    transforms_dirs: list[str] = Field(
        default_factory=list,
        description="extra folders of transform modules, relative to the workspace")


Conversion = Literal["json", "seconds_to_ms", "ns_to_ms", "us_to_ms", "otel_value", "string", "number", "first",
                     "lower"]


class FieldExpr(Section):
    """A field computed from the row: a path with conversions, several paths joined, or the time
    between two timestamps (in milliseconds)."""

    path: str | list[str] | None = Field(default=None, description="a path, or paths of which the first present wins")
    join: list[str] | None = Field(default=None, description="paths whose text values are joined with `sep`")
    sep: str = "\n\n"
    start: str | None = Field(default=None, description="with `end`: the milliseconds from start to end")
    end: str | None = None
    convert: Annotated[list[Conversion], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = Field(
        default_factory=list, description="applied in order: json (parse embedded JSON text), seconds_to_ms, "
                                          "ns_to_ms, us_to_ms, otel_value (unwrap an OTLP value), string, number, "
                                          "first (of a list), lower")

    @model_validator(mode="after")
    def _one(self) -> FieldExpr:
        kinds = [self.path is not None, self.join is not None, self.start is not None or self.end is not None]
        if sum(kinds) != 1:
            raise ValueError("give exactly one of `path`, `join`, or `start` + `end`")
        if kinds[2] and not (self.start and self.end):
            raise ValueError("`start` and `end` go together (the field is end − start in milliseconds)")
        for p in self.paths():
            _check_path(p)
        return self

    def paths(self) -> list[str]:
        if self.path is not None:
            return [self.path] if isinstance(self.path, str) else list(self.path)
        return list(self.join or []) + [p for p in (self.start, self.end) if p]

    def conversions(self) -> list[str]:
        return list(self.convert)


def _as_expr(value: Any) -> Any:
    return {"path": value} if isinstance(value, (str, list)) else value


#: A field: "a.b", ["a", "b"] (the first present) or a {path | join | start + end, convert} table.
FieldSpec = Annotated[FieldExpr, BeforeValidator(_as_expr)]


def _check_path(path: str) -> None:
    from refinery.mapping import parse_path

    parse_path(path)


class FieldMap(Section):
    """Where each evidence field lives in a row: a column name, a dotted JSON path (with
    lookups by key inside lists: `attributes[key=gen_ai.request.model].value`), a list of paths
    (the first present wins), or a table {path | join | start + end, convert}."""

    recorded_at: FieldSpec | None = Field(default=None, description="the row's time; rows without one are refused "
                                                                    "unless [sources.<name>] recorded_at is set")
    prompt: FieldSpec | None = None
    system: FieldSpec | None = Field(default=None, description="a system prompt, put before the messages")
    messages: FieldSpec | None = Field(default=None, description="the conversation sent (a list of messages)")
    response: FieldSpec | None = None
    response_messages: FieldSpec | None = Field(default=None, description="the answer as messages (a list, or one)")
    tool_calls: FieldSpec | None = Field(default=None, description="the answer's tool calls (a list)")
    id: FieldSpec | None = None
    task_id: FieldSpec | None = None
    task_name: FieldSpec | None = None
    score: FieldSpec | None = None
    expected: FieldSpec | None = None
    approved: FieldSpec | None = None
    approver: FieldSpec | None = None
    rating: FieldSpec | None = None
    model: FieldSpec | None = None
    provider: FieldSpec | None = None
    latency_ms: FieldSpec | None = None
    prompt_tokens: FieldSpec | None = None
    completion_tokens: FieldSpec | None = None
    error: FieldSpec | None = None
    stop_reason: FieldSpec | None = None

    @model_validator(mode="after")
    def _needs_text(self) -> FieldMap:
        if not (self.prompt or self.messages):
            raise ValueError("a mapping needs `prompt` or `messages` in its fields")
        return self


class ScoreField(Section):
    """`[mappings.<name>.scores.<score name>]`: a named quality score in the row."""

    field: FieldSpec = Field(description="where the score is")
    scale: tuple[float, float] | None = Field(default=None, description="[min, max] of the raw value (default 0..1)")
    higher_is_better: bool | None = Field(default=None, description="false for toxicity-like scores")
    by: Literal["human", "automated"] | None = Field(default=None, description="who gives it")


class Mapping(Section):
    """A declarative transform for a stream that has no transform module."""

    match: str = Field(description="glob of file paths relative to data/_kb, e.g. 'support_bot*.jsonl'")
    kind: str = "mapped"
    format: Literal["json", "jsonl", "csv"] | None = Field(
        default=None, description="the records: csv rows or json objects (default: from the file extension)")
    record_paths: list[str] = Field(
        default_factory=list, description="where records sit in a JSON document, e.g. ['data.items[]']")
    filter: dict[str, str | int | float | bool | list[str | int | float | bool]] = Field(
        default_factory=dict, description="keep only rows whose path has this value (or one of these values), "
                                          "e.g. {type = 'GENERATION'}; the others are quarantined as filtered_out")
    roles: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(
        default_factory=dict, description="rename message roles, e.g. {human = 'user', bot = 'assistant'}")
    message_keys: dict[Literal["role", "content"], str] = Field(
        default_factory=dict, description="the keys messages use for role and content, e.g. {role = 'from', "
                                          "content = 'value'}")
    fields: FieldMap
    scores: dict[str, ScoreField] = Field(default_factory=dict, description="named quality scores")
    score_scale: float = Field(default=1.0, gt=0, description="divide the score by this to get 0..1")
    rating_scale: float = Field(default=1.0, gt=0, description="divide the rating by this to get 0..1")
    approved_values: list[str] = Field(
        default_factory=lambda: ["true", "yes", "y", "1", "approved", "pass"],
        description="values of the approved field that mean approved (case-insensitive)")

    @model_validator(mode="after")
    def _paths(self) -> Mapping:
        from refinery.containers import RecordPath

        for p in self.record_paths:
            if "/" not in p and "*" not in p:
                RecordPath.parse(p)
        for p in self.filter:
            try:
                _check_path(p)
            except ValueError as e:
                raise ValueError(f"filter: {e}") from None
        return self


class SourceConfig(Section):
    """`[sources.<name>]`: settings for the files of one source — which importer reads them
    (instead of content detection), whether they are curated, the time of records that carry none."""

    match: str | None = Field(
        default=None, description="glob of file paths relative to data/_kb (default: the files of stream <name>, "
                                  "e.g. '<name>.jsonl', '<name>.json.gz')")
    importer: str | None = Field(default=None, description="the importer (transform) to read them with, by name "
                                                           "(`refinery sources` lists them); overrides detection")
    trust: Literal["curated"] | None = Field(
        default=None, description="'curated': a reviewed dataset (fine-tuning, preference data): its rows are "
                                  "scored as approved by policy (rule curated_source)")
    recorded_at: Annotated[str | None, BeforeValidator(lambda v: v.isoformat() if hasattr(v, "isoformat") else v)] \
        = Field(default=None, description="the time of records that carry none (ISO 8601, a TOML date, or epoch): "
                                          "datasets have no timestamps, and refinery never uses 'now'")
    record_paths: list[str] = Field(
        default_factory=list, description="where records sit in a JSON document ('data.items[]'), instead of "
                                          "the importer's own; for an archive, member globs")

    @field_validator("recorded_at")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from refinery.transform import RowError, parse_timestamp

        try:
            return parse_timestamp(value, "recorded_at")
        except RowError as e:
            raise ValueError(e.detail.removeprefix("field 'recorded_at': ") + " (use ISO 8601, e.g. 2026-11-03 "
                             "or 2026-11-03T09:00:00Z)") from None

    @field_validator("record_paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        from refinery.containers import RecordPath

        for p in value:
            if "/" not in p and "*" not in p:
                RecordPath.parse(p)
        return value


class SignalConfig(Section):
    """`[signals.<score name>]`: how to read a named score the sources carry."""

    higher_is_better: bool | None = Field(
        default=None, description="false for scores where lower is better (toxicity, hallucination, ... are "
                                  "known; say so for your own)")
    scale: tuple[float, float] | None = Field(default=None, description="[min, max] of the raw value, e.g. [1, 5]")
    by: Literal["human", "automated"] | None = Field(
        default=None, description="who gives it: human scores become human_rating, automated ones eval_score")
    use: bool | None = Field(default=None, description="false: keep it in the evidence, but do not score by it; "
                                                       "true: score by it even where the importer would not")

    @model_validator(mode="after")
    def _scale(self) -> SignalConfig:
        if self.scale is not None and not self.scale[1] > self.scale[0]:
            raise ValueError("scale must be [min, max] with max > min")
        return self

    def rule(self):
        from refinery.transform import ScoreRule

        return ScoreRule(self.higher_is_better, self.scale, self.by, self.use)


class ScoreCaps(Section):
    """Upper bounds on the numeric score per category, so a better category always scores higher."""

    partially_accepted: float = Field(default=0.69, ge=0, le=1)
    needs_human_review: float = Field(default=0.5, ge=0, le=1)
    rejected: float = Field(default=0.3, ge=0, le=1)


class ScoreConfig(Section):
    """Thresholds of the scoring policy (see refinery/policy.py); their hash is the policy hash."""

    accept_min_score: float = Field(default=0.7, ge=0, le=1,
                                    description="accepted needs a quality score at least this")
    partial_min_score: float = Field(default=0.5, ge=0, le=1,
                                     description="below this the row is rejected (low_eval_score)")
    require_approval: bool = Field(default=True, description="accepted also needs an approval")
    human_reject_max: float = Field(default=0.25, ge=0, le=1,
                                    description="a human rating at or below this is a rejection")
    max_tool_calls: int = Field(default=20, ge=1, description="more tool calls is a runaway loop")
    stop_required_kinds: list[str] = Field(
        default_factory=lambda: ["run", "transcript", "gateway_call", "chat_completion"],
        description="kinds whose sources record a stop reason; a missing one caps at partially_accepted")
    caps: ScoreCaps = Field(default_factory=ScoreCaps)

    @model_validator(mode="after")
    def _ordered(self) -> ScoreConfig:
        if self.partial_min_score > self.accept_min_score:
            raise ValueError("partial_min_score must not exceed accept_min_score")
        return self


SensitiveKind = Literal[KINDS]  # the kinds of refinery.sensitive, in one place


class ExportConfig(Section):
    include_partial: bool = Field(default=False,
                                  description="SFT also takes partially_accepted rows (never rejected or review)")
    rag_categories: list[Literal["accepted", "partially_accepted"]] = Field(
        default_factory=lambda: ["accepted", "partially_accepted"])
    sensitive: Literal["quarantine", "redact"] = Field(
        default="quarantine", description="what to do with a row carrying a secret or personal data")
    allow_sensitive: list[SensitiveKind] = Field(
        default_factory=list, description="kinds explicitly allowed into exports (e.g. ['email'])")
    dedup: bool = Field(default=True, description="drop repeated (task, answer) rows from RAG and SFT")
    near_duplicates: bool = Field(
        default=True, description="with dedup on, also drop near-duplicate rows from RAG and SFT: MinHash/LSH over "
                                  "the word 3-grams of the normalised prompt and answer; each is quarantined as "
                                  "near_duplicate, naming the row kept")
    near_duplicate_threshold: float = Field(
        default=0.8, gt=0, le=1, description="estimated Jaccard similarity at or over which two rows are "
                                             "near-duplicates (the first in file order stays)")
    max_pairs_per_task: int = Field(default=8, ge=1, description="preference pairs per task at most")


class DriftConfig(Section):
    """When a run's metric moves against the previous complete run by this much, say so."""

    warn_pct: float = Field(default=10.0, ge=0, description="a change of at least this many % is a warning")
    alert_pct: float = Field(default=25.0, ge=0, description="a change of at least this many % is an alert")

    @model_validator(mode="after")
    def _ordered(self) -> DriftConfig:
        if self.warn_pct > self.alert_pct:
            raise ValueError("warn_pct must not exceed alert_pct")
        return self


class EscalationConfig(Section):
    """An OpenAI-compatible chat-completions endpoint that takes the tasks the local model fails."""

    base_url: str = Field(description="e.g. https://api.openai.com/v1 (POST <base_url>/chat/completions)")
    model: str = Field(min_length=1, description="the model name the endpoint expects")
    api_key_env: str | None = Field(
        default=None, description="name of the environment variable holding the API key (the key itself "
                                  "is never stored); leave out for an endpoint without authentication")
    timeout_s: float = Field(default=30.0, gt=0, description="give up on the endpoint after this many seconds")
    max_tokens: int = Field(default=512, gt=0)

    @model_validator(mode="after")
    def _http(self) -> EscalationConfig:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        if "@" in self.base_url.split("/")[2]:
            raise ValueError("base_url must not hold credentials: put the key in the environment variable "
                             "named by api_key_env")
        return self


class ReplayConfig(Section):
    """`refinery replay`: retrieval over the RAG export, the local model, and escalation."""

    top_k: int = Field(default=3, ge=1, description="playbooks retrieved per task")
    max_playbook_chars: int = Field(default=1200, gt=0,
                                    description="each quoted playbook is cut to this many characters")
    max_tokens: int = Field(default=256, gt=0, description="tokens the local model may generate")
    max_answer_chars: int = Field(default=4000, gt=0,
                                  description="a longer local answer fails its check (over the length cap)")
    allow_outside_workspace: bool = Field(
        default=False, description="let index_dir lie outside the workspace (an absolute path, or one with ..)")
    index_dir: str = Field(default="distill_out/rag-index",
                           description="where the BM25 index of the RAG export is kept, relative to the workspace")
    escalation: EscalationConfig | None = Field(
        default=None, description="[replay.escalation]: needed by --allow-escalation")

    @field_validator("index_dir")
    @classmethod
    def _index_inside(cls, v: str, info: ValidationInfo) -> str:
        from refinery.workspace import setting_folder

        return setting_folder(v, allow_outside=bool(info.data.get("allow_outside_workspace")),
                              does="writes and replaces that folder",
                              opt_in="allow_outside_workspace = true in [replay]")


class ExecutorConfig(Section):
    kind: Literal["local", "ray"] = Field(
        default="local", description="where the per-partition work runs: this machine's process pool, or Ray "
                                     "(refinery.executors); the outputs are the same")
    ray_address: str | None = Field(
        default=None, description="a running Ray cluster's address (ray://host:10001, or host:6379 on a node "
                                  "of it); none: a Ray instance started on this machine for the run")


class Config(Section):
    materialize: MaterializeConfig = Field(default_factory=MaterializeConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    mappings: dict[str, Mapping] = Field(default_factory=dict)
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    signals: dict[str, SignalConfig] = Field(default_factory=dict)

    def score_rules(self) -> dict[str, Any]:
        return {name: s.rule() for name, s in self.signals.items()}

    def config_hash(self) -> str:
        return sig_hash(self.model_dump(mode="json"))


def toml_lines(prefix: str, values: dict[str, Any]) -> list[str]:
    """Settings as refinery.toml writes them, one `dotted.key = value` line each (nested
    tables flattened): `true`, `0.7`, `"text"`, `["a", "b"]` — not Python's `True` or `['a']`."""
    import json

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        return str(v)

    lines = []
    for k, v in values.items():
        if isinstance(v, dict):
            lines += toml_lines(f"{prefix}.{k}", v)
        else:
            lines.append(f"{prefix}.{k} = {value(v)}")
    return lines


def table_name(section: str, name: str) -> str:
    """How to write the table `[section.name]` in TOML: a name with dots or spaces is quoted."""
    import re

    return f"[{section}.{name}]" if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'[{section}."{name}"]'


def flag_name(key: str) -> str:
    """The command-line flag that overrides a setting: `max_line_bytes` → `--max-line-bytes`."""
    return "--" + key.replace("_", "-")


def format_errors(origin: str, err: ValidationError, flags: dict[tuple[str, str], str] | None = None) -> str:
    """One line per problem, naming the file and the key (an unknown key says so) — or, for a
    value given on the command line (`flags`: (section, key) → flag), the flag and the value."""
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if flags and loc[:2] in flags:
            lines.append(f"{flags[loc[:2]]}: {msg} (got {e['input']!r})")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key '{key}' — remove it or check its spelling")
        else:
            lines.append(f"{origin}: '{key}': {msg}")
    return "\n".join(lines)


def load_config(workspace: Path, path: Path | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read `refinery.toml` (or `path`), apply command-line `overrides` on top, validate.

    `overrides` ({section: {key: value}}, None = not given) come from the command line, each
    from the flag `flag_name(key)`: a bad value is blamed on that flag, not on a file that may
    not even exist."""
    cfg_path = path or workspace / CONFIG_FILE
    data: dict[str, Any] = {}
    origin = str(cfg_path)
    if path is not None and not cfg_path.is_file():
        raise ConfigError(f"{origin}: no such config file")
    if cfg_path.is_file():
        try:
            data = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{origin}: invalid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{origin}: not valid UTF-8") from None
    else:
        origin = "the defaults"  # only a check across keys can fail here: it names the flags
    flags: dict[tuple[str, str], str] = {}
    for section, values in (overrides or {}).items():
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"{origin}: '{section}' must be a table")
            data[section] = {**data[section], **values}
            flags.update({(section, k): flag_name(k) for k in values})
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        if flags:
            origin += f" with {', '.join(sorted(flags.values()))}"
        raise ConfigError(format_errors(origin, e, flags)) from None
