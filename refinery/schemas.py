"""JSON Schema files in schemas/, generated from the pydantic models.

One file per record type, named `<type>.v<schema_version>.json`. `refinery schemas --write`
regenerates them; `refinery schemas --check` (and a test) fail when they are stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from refinery.models import SCHEMA_MODELS

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def schema_version(model) -> int:
    return model.model_fields["schema_version"].default if "schema_version" in model.model_fields else 1


def render_schemas() -> dict[str, bytes]:
    """File name → exact bytes of every schema file."""
    out: dict[str, bytes] = {}
    for stem, model in SCHEMA_MODELS.items():
        schema: dict[str, Any] = model.model_json_schema()
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                  "$id": f"refinery/{stem}.v{schema_version(model)}.json", **schema}
        out[f"{stem}.v{schema_version(model)}.json"] = orjson.dumps(
            schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    return out


def stale_schemas(schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that are missing, different, or no longer generated."""
    want = render_schemas()
    stale = [name for name, data in want.items()
             if not (schema_dir / name).is_file() or (schema_dir / name).read_bytes() != data]
    extra = [p.name for p in schema_dir.glob("*.json") if p.name not in want] if schema_dir.is_dir() else []
    return sorted(stale + extra)


def write_schemas(schema_dir: Path = SCHEMA_DIR) -> list[str]:
    from refinery.jsonl import atomic_write

    schema_dir.mkdir(parents=True, exist_ok=True)
    want = render_schemas()
    for name, data in want.items():
        with atomic_write(schema_dir / name) as f:
            f.write(data)
    for p in schema_dir.glob("*.json"):
        if p.name not in want:
            p.unlink()
    return sorted(want)


def load_schema(stem: str, schema_dir: Path = SCHEMA_DIR) -> dict[str, Any]:
    model = SCHEMA_MODELS[stem]
    return orjson.loads((schema_dir / f"{stem}.v{schema_version(model)}.json").read_bytes())
