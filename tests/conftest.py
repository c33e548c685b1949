"""Shared fixtures. Every test runs in its own temporary workspace (autouse), so no test can
touch the repository's data/, exports/ or reports/."""

from __future__ import annotations

import os

# Test workspaces are thrown away: no fsync before each rename (it is most of a small run's
# time on some file systems). Kill-safety does not rest on it — see refinery.jsonl.DURABLE.
os.environ.setdefault("REFINERY_FSYNC", "0")
# run-all and audit-full write the run's page at the end (~1.5 s, most of it loading matplotlib):
# not in every test that runs them; tests/test_report.py turns it on
os.environ.setdefault("REFINERY_REPORT", "0")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from openai_stub import endpoint  # noqa: F401 (a fixture for the escalation tests)
from refinery.config import Config, load_config
from refinery.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ws = tmp_path / "ws"
    (ws / "data" / "_kb").mkdir(parents=True)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("REFINERY_WORKSPACE", str(ws))
    return ws


@pytest.fixture
def ws(_isolated_workspace: Path) -> Workspace:
    return Workspace.at(_isolated_workspace)


@pytest.fixture
def cfg(ws: Workspace) -> Config:
    return load_config(ws.root)


#: Files in the repository's data/_kb/ that using it writes (git-ignored): not the bundled sample.
WRITTEN_BY_USE = ("audit_baselines.jsonl", "runs_distill_train.csv", "replays*.jsonl", "human_reviews*.jsonl")


def copy_sample(kb: Path) -> None:
    """Copy the bundled sample streams (only those: not what `make audit-full`, `make train` or
    `make replay` appended in this checkout) to `kb`."""
    import shutil

    shutil.copytree(REPO / "data" / "_kb", kb, ignore=shutil.ignore_patterns(*WRITTEN_BY_USE), dirs_exist_ok=True)


def sample_workspace(root: Path, *commands: str, files: dict[str, str] | None = None) -> Path:
    """A workspace at `root` holding the bundled sample and `files` (name → text), in which each
    of `commands` ("run-all", "train collect", ...) has run and succeeded."""
    from typer.testing import CliRunner

    from refinery.cli import app

    copy_sample(root / "data" / "_kb")
    for name, text in (files or {}).items():
        (root / name).write_text(text)
    for cmd in commands:
        result = CliRunner().invoke(app, [*cmd.split(), "--workspace", str(root)])
        assert result.exit_code == 0, (cmd, result.output)
    return root


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that `build(folder)` fills, built once per test session: with pytest-xdist, the
    first worker to ask builds it under the session's shared temporary folder while the others
    wait on a lock, then all read it (tests copy it before changing anything). A build that
    fails leaves nothing behind, so the next one to ask builds it again (and fails the same)."""
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session, and by no other session
    target = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            staging = root / f"{name}.building"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            build(staging)
            staging.rename(target)
    return target


#: Where the sample_run template keeps its first run's `run-all --json` output, beside the workspace.
_SAMPLE_RUN_DOC = "run-all.json"


@pytest.fixture(scope="session")
def _sample_run_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A workspace holding `generate(400, 7)` in which one `run-all --json` has run, built once
    per test session (built_once); its `--json` document as bytes (each test gets its own copy)."""

    def build(folder: Path) -> None:
        from typer.testing import CliRunner

        from refinery.cli import app
        from refinery.sample import generate

        root = folder / "ws"
        generate(400, 7, root / "data" / "_kb")
        result = CliRunner().invoke(app, ["run-all", "--json", "--workspace", str(root)])
        assert result.exit_code == 0, result.output
        (folder / _SAMPLE_RUN_DOC).write_bytes(result.stdout_bytes)

    folder = built_once(tmp_path_factory, "sample-run", build)
    return folder / "ws", (folder / _SAMPLE_RUN_DOC).read_bytes()


@pytest.fixture
def sample_run(_sample_run_template: tuple[Path, bytes], ws: Workspace) -> dict:
    """The test's workspace as `generate(400, 7, ws.kb)` then `refinery run-all --json` leave it,
    copied from a template built once per session (the run takes a second or more; the copy a
    few milliseconds). Everything a run writes is relative to the workspace, so the copy is that
    run, byte for byte: its receipts match the files and a second run-all reuses every stage.
    Returns the run's `--json` document (the same keys `run-all --json` prints)."""
    import shutil

    import orjson

    src, doc = _sample_run_template
    # not the lock file: a copy starts unlocked, as a fresh workspace does
    shutil.copytree(src, ws.root, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".refinery.lock"))
    return orjson.loads(doc)


@pytest.fixture(scope="session")
def gate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The acceptance gate run once per test session (built_once) on its fixture, every
    invariant passing, its two workspaces kept: run-a/ and run-b/. Shared: a test that changes
    them copies first."""

    def build(base: Path) -> None:
        from refinery.acceptance import FIXTURE, run_gate

        checks = run_gate(FIXTURE, keep=base)
        assert all(c.ok for c in checks), [(c.key, c.problems) for c in checks if not c.ok]

    return built_once(tmp_path_factory, "gate", build)


def passing_audit_baseline(ws: Workspace) -> dict:
    """The ledger row a passing audit-full of the workspace as it stands appends (its run, its
    metrics; the head recorded), written through the API without the checks and the re-run
    that would come first: for tests about what a later audit says against a baseline. That a
    passing audit appends it is test_an_audit_of_a_clean_workspace_passes_reports_and_appends's."""
    from refinery import audit
    from refinery.invariants import Context

    ctx = Context(ws, load_config(ws.root))
    return audit.append_ledger(ws, audit.read_ledger(ws), ctx.summary["run_id"], audit.tracked_metrics(ctx))


def write_kb(ws: Workspace, files: dict[str, str | bytes]) -> None:
    """Write source files under data/_kb/ (str is written as UTF-8)."""
    for name, content in files.items():
        p = ws.kb / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


def write_transform(ws: Workspace, name: str, body: str, patterns: str = '("{name}.jsonl",)') -> None:
    """Drop a transform module `name` into the workspace's transforms/ folder."""
    d = ws.root / "transforms"
    d.mkdir(exist_ok=True)
    spec = (f'from refinery.transform import TransformSpec\n'
            f'SPEC = TransformSpec(name="{name}", patterns={patterns.format(name=name)}, format="jsonl", kind="x")\n')
    (d / f"{name}.py").write_text(spec + body)


def read_jsonl_file(path: Path) -> list[dict]:
    import orjson

    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _rows_under(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.rglob("*.jsonl")) for r in read_jsonl_file(p)]


def evidence_rows(ws: Workspace) -> list[dict]:
    return _rows_under(ws.evidence)


def scored_rows(ws: Workspace) -> list[dict]:
    return _rows_under(ws.scored_runs)


def scored_categories(ws: Workspace, cfg: Config) -> dict[str, tuple[str, list[str]]]:
    """Score the workspace; evidence id → (category, rules fired)."""
    from refinery import score

    score.run(ws, cfg)
    return {r["id"]: (r["category"], r["rules_fired"]) for r in scored_rows(ws)}


def quarantine_rows(ws: Workspace, stage: str = "materialize") -> list[dict]:
    p = ws.quarantine / f"{stage}.jsonl"
    return read_jsonl_file(p) if p.exists() else []


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


os.environ.setdefault("NO_COLOR", "1")


# --- helpers of the importer tests ---------------------------------------------------------

NOT_INPUTS = ("expected.jsonl", "refinery.toml", "ORIGIN.md", "README.md")


def fixture_inputs(folder: Path) -> list[Path]:
    """The data files of a fixture folder (not its expected output, config or notes)."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.name not in NOT_INPUTS
            and not p.name.endswith(".txt")]


def probe_file(path: Path):
    """What content detection sees of `path` (refinery.containers.Probe)."""
    from refinery.containers import probe, sniff

    container, compressed = sniff(path)
    return probe(path, container, compressed)


def source_record(ws: Workspace, ev: dict):
    """The source record an evidence row's provenance names (as trace and the audit read it)."""
    from refinery.sources import SourceRecords

    prov = ev["provenance"]
    return SourceRecords(ws.root).at(prov["source_file"], prov["line_offset"], prov.get("record")).obj


def builtin_importer(name: str):
    """The module of the built-in importer transforms/<name>.py, loaded as refinery loads it."""
    from refinery.discovery import BUILTIN_DIR, _load_module

    return _load_module(BUILTIN_DIR / f"{name}.py")


def materialize_files(ws: Workspace, cfg: Config, *paths: Path) -> dict:
    """Copy `paths` into data/_kb/, materialize (validating every record), and return the
    per-file results by name; a transform error fails the test."""
    import shutil

    from refinery import materialize

    for p in paths:
        shutil.copy(p, ws.kb / p.name)
    result = materialize.run(ws, cfg, validate=True)
    assert result.transform_errors == 0, [f.first_transform_error for f in result.files]
    return {f.source_file.removeprefix("data/_kb/"): f for f in result.files}


def foreign_inputs(*own: str) -> list[Path]:
    """Every data file under tests/fixtures/ (golden inputs, real files, the acceptance
    fixture's sources, subfolders included) but those with one of `own` among their path's
    parts: what an importer's detect() must not claim."""
    notes = (".md", ".txt", ".py", ".toml")
    return [p for p in sorted(FIXTURES.rglob("*")) if p.is_file() and not p.name.startswith("expected")
            and p.suffix not in notes and not set(own) & set(p.relative_to(FIXTURES).parts)]


def copy_fixture(ws: Workspace, folder: Path) -> Config:
    """A golden fixture into the workspace (its refinery.toml to the root, its inputs to
    data/_kb/); returns the workspace's config."""
    import shutil

    for p in folder.iterdir():
        if p.name == "refinery.toml":
            shutil.copy(p, ws.root / p.name)
        elif p.name != "expected.jsonl":
            shutil.copy(p, ws.kb / p.name)
    return load_config(ws.root)


# --- measured tables in the run's output ----------------------------------------------------


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the tables tests attach with `record_property("<name>_table", text)` (the secret
    recall per kind, its false positives, the end-to-end leaks) at the end of the run. The
    properties travel with each test's report, so this works under pytest-xdist too; a failed
    test's table is printed as well: it is the figure that says how far off the mark it is."""
    found = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name.endswith("_table"):
                    found.append((report.nodeid, outcome, name, str(value)))
    if not found:
        return
    terminalreporter.section("measured tables")
    for nodeid, outcome, name, value in sorted(found):
        terminalreporter.write_line(f"{name} — {nodeid} ({outcome})", bold=True)
        terminalreporter.write_line(value)
        terminalreporter.write_line("")
