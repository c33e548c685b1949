"""`python -m refinery`: the command line. Run with a Python that lacks refinery's dependencies
(the system python3 from a fresh clone), it says how to get one, instead of a traceback."""

import sys

try:
    from refinery.cli import main
except ModuleNotFoundError as e:
    if (e.name or "").partition(".")[0] == "refinery":
        raise  # a module of refinery itself is missing: a broken checkout, not a missing dependency
    sys.stderr.write(
        f"error: this Python ({sys.executable}) does not have refinery's dependencies ({e.name} is not "
        "installed).\nRun `make install` once (it creates .venv/ from uv.lock), then `.venv/bin/refinery ...` "
        "(or `source .venv/bin/activate` to put `refinery` on PATH, or `uv run --frozen refinery ...`); "
        "`make run-all`, `make test`, ... do that for you.\n")
    sys.exit(2)

main()
