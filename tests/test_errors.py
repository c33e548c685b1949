"""One error root (refinery.errors), mapped to exit codes once, in the CLI's command group."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from typer.testing import CliRunner

import refinery
from refinery.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, AccountingError, CheckFailed, RefineryError

#: Raised and caught inside a stage, never met by a user: a row refused (quarantined with its
#: reason), a record over the size limit, an archive that does not open (the file is refused),
#: training's early stop.
INTERNAL = {"RowError", "_RecordTooLong", "DamagedContainer", "_StopTraining"}


def refinery_exceptions() -> dict[str, type[BaseException]]:
    found = {}
    for mod in pkgutil.walk_packages(refinery.__path__, "refinery."):
        if mod.name.endswith("__main__"):
            continue
        module = importlib.import_module(mod.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.name:
                found[f"{mod.name}.{name}"] = obj
    return found


def test_every_error_a_user_can_meet_has_the_one_root():
    errors = refinery_exceptions()
    assert len(errors) > 20
    outside = sorted(k for k, cls in errors.items()
                     if not issubclass(cls, RefineryError) and k.rsplit(".", 1)[1] not in INTERNAL)
    assert outside == []
    # "a check failed" is a class of its own, not AssertionError (which `python -O` would not change,
    # but a bare assert in a library would be mistaken for)
    checks = sorted(k.rsplit(".", 1)[1] for k, cls in errors.items() if issubclass(cls, CheckFailed))
    assert checks == ["AccountingError", "ChainError", "CheckFailed", "LeakError", "LedgerTampered"]
    assert not any(issubclass(cls, AssertionError) for cls in errors.values())


@pytest.mark.parametrize(("error", "code", "line"), [
    (RefineryError("the file is gone"), EXIT_BAD_INPUT, "error: the file is gone"),
    (AccountingError("a.jsonl: 3 in, 2 out + 0 quarantined"), EXIT_CHECK_FAILED,
     "ACCOUNTING CHECK FAILED, nothing was published: a.jsonl: 3 in, 2 out + 0 quarantined"),
])
def test_the_command_group_maps_an_error_to_its_line_and_exit_code(monkeypatch, tmp_path, error, code, line):
    from refinery import cli

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr("refinery.runs.run_all", boom)
    (tmp_path / "data" / "_kb").mkdir(parents=True)
    (tmp_path / "data" / "_kb" / "eval.csv").write_text("task_id,prompt,response\n1,a,b\n")
    result = CliRunner().invoke(cli.app, ["run-all", "--workspace", str(tmp_path)])
    assert result.exit_code == code
    assert line in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
