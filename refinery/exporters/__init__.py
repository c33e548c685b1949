"""The exports, one module each: every module here (but those starting with `_`) defines
`EXPORTER`, an `Exporter` (see `_base`) that declares its name, output path, record schema,
what it admits and how it merges. The export stage, receipts, audit, console and CLI take
the list from here; a new export is one new module.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from refinery.exporters._base import (
    Candidate, Composition, Exporter, ExportStats, LeakError, Refuse, Settings, plain_call, plain_message, reply,
)


def _discover() -> tuple[Exporter, ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            exporter = getattr(module, "EXPORTER", None)
            if not isinstance(exporter, Exporter):
                raise TypeError(f"{module.__file__}: an export module defines EXPORTER, an Exporter")
            found.append(exporter)
    found.sort(key=lambda x: (x.order, x.name))
    for x in found:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", x.name) or not re.fullmatch(r"[a-z][a-z0-9]*", x.id_prefix):
            raise TypeError(f"export {x.name!r}: a name is lower-case letters, digits and _, an id prefix letters "
                            f"and digits ({x.id_prefix!r})")
        if x.id_prefix in RESERVED_PREFIXES:
            raise TypeError(f"export {x.name!r}: id prefix {x.id_prefix!r} is refinery's own ({RESERVED_PREFIXES})")
        if x.name in RESERVED_NAMES:
            raise TypeError(f"export {x.name!r}: the name is taken (`refinery export-{x.name}` is another command)")
    for what in ("name", "id_prefix", "path"):
        values = [getattr(x, what) for x in found]
        if len(set(values)) != len(values):
            raise TypeError(f"two export modules declare the same {what}: {values}")
    return tuple(found)


#: Id prefixes of evidence and scored runs (ev-) and quarantine records (q-).
RESERVED_PREFIXES = ("ev", "q")
#: Names whose `export-<name>` command exists already.
RESERVED_NAMES = ("all",)


#: Every export, in order.
EXPORTERS: tuple[Exporter, ...] = _discover()
BY_NAME: dict[str, Exporter] = {x.name: x for x in EXPORTERS}
NAMES: tuple[str, ...] = tuple(BY_NAME)

__all__ = ["BY_NAME", "Candidate", "Composition", "EXPORTERS", "Exporter", "ExportStats", "LeakError", "NAMES",
           "Refuse", "Settings", "plain_call", "plain_message", "reply"]
