"""Nothing refinery reads may make it write, rename or delete outside the workspace: a planted
publish journal, a receipt naming `../` outputs, output folders set outside in the config, or
adapter ids that are paths are refused by name (exit 2), and nothing outside is touched."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from conftest import write_kb
from refinery import receipts
from refinery.canonical import file_sha256
from refinery.cli import app
from refinery.config import ConfigError, load_config
from refinery.training.config import DistillConfigError, load_distill_config
from refinery.workspace import inside, is_output_path

runner = CliRunner()
ROW = '{"ts": 1762000000, "prompt": "q%d", "completion": "a%d"}\n'
RUN = "20261130T000000000Z-abcd"  # a run id as run-all makes them


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("rel,ok", [
    ("exports/rag/playbooks.jsonl", True), ("data/evidence/2026/01/01/x.jsonl", True),
    ("exports/rag/../../../x", False), ("../x", False), ("/etc/passwd", False), ("", False),
    ("exports/ragged/x", False), ("data/_kb/runs.csv", False),
])
def test_what_counts_as_an_output_path(rel, ok):
    assert is_output_path(rel) is ok
    assert inside("distill_out") and not inside("../distill_out") and not inside("/tmp/x")


def test_a_planted_publish_journal_is_refused_and_moves_nothing(ws, tmp_path):
    """`refinery runs` (and every command taking the lock) completes a killed run's publish
    from its journal; a journal that asks for anything but run-all's own moves once renamed and
    deleted whatever it named."""
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    planted = ws.root / "data" / f".run-{RUN}"
    (planted / "exports").mkdir(parents=True)
    (planted / "PUBLISH.json").write_bytes(orjson.dumps({"moves": [
        [f"data/.run-{RUN}/exports", "../outside"],  # would replace the folder outside
        ["../outside/precious.txt", "exports/rag/stolen.txt"],  # would move a file in from outside
    ]}))
    ws.lock_path.touch()  # a workspace refinery has written to
    before = files_under(tmp_path)
    for command in (["runs"], ["run-all"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert f"data/.run-{RUN}/PUBLISH.json: it asks to move 'data/.run-{RUN}/exports' to '../outside'" \
            in result.stderr
        assert "nothing was moved or deleted" in result.stderr and "Traceback" not in result.output
    assert files_under(tmp_path) == before  # the journal, the folder outside: all as they were


def test_a_journal_that_is_not_json_or_not_a_run_or_a_linked_staging_folder_is_refused(ws, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    ws.lock_path.parent.mkdir(parents=True, exist_ok=True)
    ws.lock_path.touch()
    for name, journal, said in [
        (f".run-{RUN}", "{", "it is not the JSON refinery writes"),
        (".run-..", '{"moves": []}', "'..' is not a run id"),
    ]:
        planted = ws.root / "data" / name
        planted.mkdir(exist_ok=True)
        (planted / "PUBLISH.json").write_text(journal)
        result = invoke("runs")
        assert result.exit_code == 2 and said in result.stderr, result.stderr
        (planted / "PUBLISH.json").unlink()
        planted.rmdir()
    (ws.root / "data" / f".run-{RUN}").symlink_to(elsewhere, target_is_directory=True)
    result = invoke("runs")
    assert result.exit_code == 2 and "its folder is a link" in result.stderr
    assert (elsewhere / "precious.txt").read_text() == "keep me"


def test_a_journal_moving_a_linked_tree_into_place_is_refused(ws, tmp_path):
    """The moves are exactly run-all's, but the staged exports/sft is a link to a folder
    outside: published, it would have every later SFT write land there."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    staging = ws.root / "data" / f".run-{RUN}"
    (staging / "exports").mkdir(parents=True)
    (staging / "exports" / "sft").symlink_to(victim, target_is_directory=True)
    (staging / "PUBLISH.json").write_bytes(orjson.dumps({"moves": [[f"data/.run-{RUN}/exports/sft", "exports/sft"]]}))
    ws.lock_path.touch()
    result = invoke("runs")
    assert result.exit_code == 2
    assert f"data/.run-{RUN}/exports/sft is a link (to {victim})" in result.stderr
    assert not (ws.root / "exports" / "sft").exists() and (victim / "precious.txt").read_text() == "keep me"


def test_a_tree_moved_aside_is_put_back_only_if_it_is_a_real_folder(ws, tmp_path):
    """recover_dir puts back the tree a killed publish moved aside (.sft.old-<pid>) — never a
    link planted under that name."""
    from refinery.jsonl import recover_dir

    victim = tmp_path / "victim"
    victim.mkdir()
    exports = ws.root / "exports"
    exports.mkdir()
    (exports / ".sft.old-1").symlink_to(victim, target_is_directory=True)
    recover_dir(exports / "sft")
    assert not (exports / "sft").exists() and not (exports / ".sft.old-1").is_symlink() and victim.is_dir()
    (exports / ".sft.old-2").mkdir()
    recover_dir(exports / "sft")
    assert (exports / "sft").is_dir() and not (exports / "sft").is_symlink()


def test_a_receipt_naming_an_output_outside_is_not_reused(ws, tmp_path):
    """Reuse hard-links a previous run's outputs into the new run by the paths its receipts
    name; a receipt (its hash recomputed to match) naming `../../../x` once linked a file from
    outside the workspace to outside the workspace."""
    write_kb(ws, {"gateway_receipts.jsonl": "".join(ROW % (i, i) for i in range(3))})
    first = orjson.loads(invoke("run-all", "--json").stdout)
    path = ws.reports / first["run_id"] / "receipts" / "materialize.json"
    r = orjson.loads(path.read_bytes())
    escape = "../../../escaped.txt"
    outside = (ws.root / escape).resolve()  # the file it would be read from (the workspace root + ../..)
    outside.write_text("not refinery's")
    r["outputs"].append({"path": escape, "sha256": file_sha256(outside), "rows": 1})
    r["receipt_hash"] = receipts.receipt_hash(r)
    receipts.write_json(path, r)
    before = files_under(tmp_path)
    result = invoke("run-all", "--json")
    assert result.exit_code == 0, result.output
    assert f"materialize: recomputing — its receipt in run {first['run_id']} names an output outside the " \
           f"published folders ('{escape}')" in result.stderr
    doc = orjson.loads(result.stdout)
    assert doc["receipts"]["materialize"]["reused_from"] is None
    after = files_under(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("ws/")} == \
           {k: v for k, v in before.items() if not k.startswith("ws/")}


def test_output_folders_outside_the_workspace_need_an_explicit_opt_in(ws):
    (ws.root / "distill_config.json").write_text('{"output_dir": "../elsewhere"}')
    with pytest.raises(DistillConfigError, match="'output_dir': '../elsewhere' is outside the workspace"):
        load_distill_config(ws.root)
    result = invoke("train", "collect")
    assert result.exit_code == 2 and "allow_outside_workspace" in result.stderr
    (ws.root / "distill_config.json").write_text('{"output_dir": "/tmp/x", "allow_outside_workspace": true}')
    assert load_distill_config(ws.root).output_dir == "/tmp/x"

    (ws.root / "refinery.toml").write_text('[replay]\nindex_dir = "/var/tmp/index"\n')
    with pytest.raises(ConfigError, match="'replay.index_dir': '/var/tmp/index' is outside the workspace"):
        load_config(ws.root)
    (ws.root / "refinery.toml").write_text('[replay]\nindex_dir = "/var/tmp/index"\nallow_outside_workspace = true\n')
    assert load_config(ws.root).replay.index_dir == "/var/tmp/index"


@pytest.mark.parametrize("command", [
    ["train", "export", "../victim"], ["train", "eval", "--adapter", "../victim"],
    ["train", "promote", "--adapter", "../victim"], ["train", "rollback", "../victim"],
])
def test_an_adapter_id_that_is_a_path_is_refused(ws, command):
    """An adapter id names a folder under output_dir that eval writes into and promote moves
    to archive/: `../victim` once reached a folder outside it (here laid out as an adapter,
    evaluated and worse than base, so promote would have moved it)."""
    victim = ws.root / "victim"
    (victim / "eval").mkdir(parents=True)
    (victim / "receipt.json").write_text('{"steps": 1, "final_val_loss": 1.0, "base_model": {"path": "b"}}')
    (victim / "eval" / "comparison.json").write_bytes(orjson.dumps(
        {"average": {"base": 0.5, "adapter": 0.1}, "safety_or_format_regressions": []}))
    (ws.root / "distill_out").mkdir()
    before = files_under(ws.root)
    result = invoke(*command)
    assert result.exit_code == 2, result.output
    assert "'../victim' is not an adapter id" in result.stderr
    assert files_under(ws.root) == before


@pytest.mark.parametrize("folder", [".", "data", "data/_kb/index", "exports", "reports/x", "./transforms"])
def test_output_folders_may_not_be_the_workspace_or_its_own_folders(ws, folder):
    """The index rebuild replaces its folder whole, and train writes, archives and deletes under
    output_dir: `index_dir = "data"` once replaced data/ — the sources and the ledger with it."""
    (ws.root / "refinery.toml").write_text(f'[replay]\nindex_dir = "{folder}"\nallow_outside_workspace = true\n')
    with pytest.raises(ConfigError, match="is the workspace itself or inside its own folders"):
        load_config(ws.root)
    (ws.root / "distill_config.json").write_text(orjson.dumps({"output_dir": folder}).decode())
    with pytest.raises(DistillConfigError, match="is the workspace itself or inside its own folders"):
        load_distill_config(ws.root)


def test_the_index_never_replaces_a_folder_that_is_not_an_index(ws):
    from refinery.replay.retrieval import RagIndex, RetrievalError

    write_kb(ws, {"gateway_receipts.jsonl": "".join(ROW % (i, i) for i in range(3))})
    assert invoke("run-all").exit_code == 0
    (ws.root / "distill_out" / "ad-0123456789ab").mkdir(parents=True)  # an adapter
    with pytest.raises(RetrievalError, match="holds files that are not a RAG index"):
        RagIndex.open(ws, "distill_out")
    assert (ws.root / "distill_out" / "ad-0123456789ab").is_dir()


def test_rels_of_many_files_are_what_rel_says_of_each(tmp_path):
    """`Workspace.rels` resolves each folder once; links — a linked folder, a linked file — come
    out as `rel` makes them."""
    from refinery.workspace import Workspace

    root = tmp_path / "ws"
    (root / "data" / "evidence" / "2026").mkdir(parents=True)
    elsewhere = tmp_path / "big" / "scored"
    elsewhere.mkdir(parents=True)
    (root / "data" / "scored-runs").symlink_to(elsewhere)
    for name in ("a.jsonl", "b.jsonl"):
        (root / "data" / "evidence" / "2026" / name).write_text("{}\n")
        (elsewhere / name).write_text("{}\n")
    (root / "data" / "evidence" / "2026" / "c.jsonl").symlink_to(root / "data" / "evidence" / "2026" / "a.jsonl")
    ws = Workspace(root.resolve(), tmp_path.resolve())
    files = sorted(p for p in (root / "data" / "evidence").rglob("*") if p.is_file())
    files += sorted(p for p in (root / "data" / "scored-runs").rglob("*") if p.is_file())  # through the link
    assert len(files) == 5
    assert ws.rels(files) == [(p, ws.rel(p)) for p in files]
    assert ws.rels(files)[-1][1] == "big/scored/b.jsonl" and ws.rels(files)[2][1] == "ws/data/evidence/2026/a.jsonl"
