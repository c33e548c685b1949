"""Finding the transform for each source file.

Every `*.py` module in the transform folders (the built-in `transforms/`, the workspace's own
`transforms/`, and any `materialize.transforms_dirs`) is imported and must define `SPEC` and
`transform`; a module that fails to import or lacks them is an error that names it — never a
silent skip. `[mappings.<name>]` tables in refinery.toml add declarative transforms, which win
over modules for the files they match (the operator said so explicitly).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from refinery.config import Config
from refinery.mapping import mapping_spec, mapping_transform
from refinery.transform import RowContext, TransformSpec

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "transforms"


class TransformLoadError(Exception):
    """A transform module or mapping is broken; the message names it and says what to fix."""


@dataclass(frozen=True)
class Transform:
    spec: TransformSpec
    fn: Callable[[dict, RowContext], Any]
    origin: str

    def claims(self, relpath: str) -> bool:
        ext = relpath.rsplit(".", 1)[-1].lower()
        return ext == self.spec.format and any(fnmatchcase(relpath, p) for p in self.spec.patterns)


def transform_dirs(workspace: Path, cfg: Config) -> list[Path]:
    dirs = [BUILTIN_DIR, workspace / "transforms", *(workspace / d for d in cfg.materialize.transforms_dirs)]
    seen: set[Path] = set()
    out = []
    for d in dirs:
        r = d.resolve()
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(r)
    return out


def _load_module(path: Path):
    folder = hashlib.sha256(str(path.parent).encode()).hexdigest()[:8]
    name = f"refinery_transforms_{folder}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TransformLoadError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise TransformLoadError(
            f"transform module {path} failed to import: {type(e).__name__}: {e} "
            f"(at {where.filename}:{where.lineno}). Fix or remove the module.") from None
    sys.modules[name] = module
    return module


def discover_modules(dirs: list[Path]) -> list[Transform]:
    found: list[Transform] = []
    by_name: dict[str, str] = {}
    for d in dirs:
        for path in sorted(d.glob("*.py")):
            if path.name.startswith("_"):
                continue
            module = _load_module(path)
            spec, fn = getattr(module, "SPEC", None), getattr(module, "transform", None)
            if not isinstance(spec, TransformSpec):
                raise TransformLoadError(
                    f"transform module {path} defines no SPEC = TransformSpec(...); every module in a "
                    "transforms folder must (name it with a leading '_' if it is a helper)")
            if not callable(fn):
                raise TransformLoadError(f"transform module {path} defines no transform(row, ctx) function")
            if spec.format not in ("jsonl", "csv"):
                raise TransformLoadError(f"transform module {path}: SPEC.format must be 'jsonl' or 'csv'")
            if spec.name in by_name:
                raise TransformLoadError(
                    f"transform name {spec.name!r} is defined twice: {by_name[spec.name]} and {path}")
            by_name[spec.name] = str(path)
            found.append(Transform(spec, fn, str(path)))
    return found


class Registry:
    """The transforms of a workspace, and which one claims a given source file."""

    def __init__(self, modules: list[Transform], mappings: list[Transform]):
        self.modules = modules
        self.mappings = mappings

    @classmethod
    def load(cls, workspace: Path, cfg: Config) -> Registry:
        modules = discover_modules(transform_dirs(workspace, cfg))
        mappings = [Transform(mapping_spec(name, m), mapping_transform(m), f"refinery.toml [mappings.{name}]")
                    for name, m in sorted(cfg.mappings.items())]
        return cls(modules, mappings)

    def resolve(self, relpath: str) -> Transform | None:
        for group in (self.mappings, self.modules):
            hits = [t for t in group if t.claims(relpath)]
            if len(hits) > 1:
                raise TransformLoadError(
                    f"data/_kb/{relpath} is claimed by several transforms: "
                    + ", ".join(f"{t.spec.name} ({t.origin})" for t in hits)
                    + ". Narrow their patterns so exactly one matches.")
            if hits:
                return hits[0]
        return None

    def all(self) -> list[Transform]:
        return [*self.mappings, *self.modules]
