"""Finding the importer (transform) for each source file, and saying why.

Every `*.py` module in the transform folders (the built-in `transforms/`, the workspace's own
`transforms/`, and any `materialize.transforms_dirs`) is imported and must define `SPEC` and
`transform`; a module that fails to import or lacks them is an error that names it — never a
silent skip. `[mappings.<name>]` tables in refinery.toml add declarative transforms.

Which importer reads a file, first match wins:

1. `[sources.<name>] importer = "..."` in refinery.toml, for the files it matches;
2. a `[mappings.<name>]` whose `match` glob matches the file;
3. a module whose `SPEC.patterns` match the file's name (`.gz` looked through);
4. content detection: each module's `detect(probe)` looks at the file's first records (or the
   whole document, or an archive's members) and says whether — and why — it is its format.
   Two importers recognising the same file is an error naming both; the file is refused until
   `[sources]` chooses.

A file none of these claims has its records quarantined as unknown_source, by name.
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

from refinery.config import Config, SourceConfig, table_name
from refinery.containers import Limits, RecordPath, parse_paths, probe, stream_name
from refinery.errors import RefineryError
from refinery.mapping import mapping_paths, mapping_spec, mapping_transform
from refinery.transform import RowContext, TransformSpec

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "transforms"


class TransformLoadError(RefineryError):
    """A transform module or mapping is broken; the message names it and says what to fix."""


def _record_kind(fmt: str) -> str:
    return "csv" if fmt == "csv" else "json"


def name_matches(relpath: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """A glob on the path under data/_kb — also on the path without a trailing `.gz`."""
    bare = relpath[:-3] if relpath.lower().endswith(".gz") else relpath
    return any(fnmatchcase(relpath, p) or fnmatchcase(bare, p) for p in patterns)


@dataclass(frozen=True)
class Transform:
    spec: TransformSpec
    fn: Callable[[dict, RowContext], Any]
    origin: str
    detect: Callable[[Any], str | None] | None = None
    join_key: Callable[..., Any] | None = None
    assemble: Callable[..., Any] | None = None
    paths: dict[str, str] | None = None
    """a declarative mapping's paths (refinery.mapping.mapping_paths), so that one which matches
    no record of a file is said; None for an importer module"""

    @property
    def joins(self) -> bool:
        return self.join_key is not None and self.assemble is not None

    def reads(self, fmt: str | None) -> bool:
        """Whether it reads records of `fmt` ("csv" rows or "json" objects)."""
        return fmt is not None and _record_kind(self.spec.format) == fmt

    def claims(self, relpath: str, fmt: str | None) -> bool:
        """A claim by name: its patterns match the file, and it reads the file's records."""
        return self.reads(fmt) and name_matches(relpath, self.spec.patterns)


@dataclass(frozen=True)
class Claim:
    """Who reads a file, and why — or why nobody does."""

    transform: Transform | None
    why: str
    error: str | None = None
    """set when the claim is in conflict (two importers recognise the content)"""
    source_name: str | None = None
    """the [sources.<name>] table that matches the file, if any"""
    source_cfg: SourceConfig | None = None
    record_paths: tuple[RecordPath, ...] = ()
    strict_paths: bool = False
    """the record paths come from refinery.toml: a document they miss is an error"""

    @property
    def name(self) -> str | None:
        return self.transform.spec.name if self.transform else None


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
    sys.modules[name] = module  # registered first, as `import` does: dataclasses look themselves up there
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise TransformLoadError(
            f"transform module {path} failed to import: {type(e).__name__}: {e} "
            f"(at {where.filename}:{where.lineno}). Fix or remove the module.") from None
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
            if spec.format not in ("json", "jsonl", "csv"):
                raise TransformLoadError(f"transform module {path}: SPEC.format must be 'json' (or 'jsonl') "
                                         "or 'csv'")
            if spec.name in by_name:
                raise TransformLoadError(
                    f"transform name {spec.name!r} is defined twice: {by_name[spec.name]} and {path}")
            try:
                parse_paths([p for p in spec.record_paths if "/" not in p and "*" not in p])
            except ValueError as e:
                raise TransformLoadError(f"transform module {path}: SPEC.record_paths: {e}") from None
            join_key, assemble = getattr(module, "join_key", None), getattr(module, "assemble", None)
            if (join_key is None) != (assemble is None):
                raise TransformLoadError(f"transform module {path} defines only one of join_key and assemble: "
                                         "a join needs both")
            detect = getattr(module, "detect", None)
            by_name[spec.name] = str(path)
            found.append(Transform(spec, fn, str(path), detect if callable(detect) else None, join_key, assemble))
    return found


def _paths(paths: tuple[str, ...] | list[str], container: str | None) -> tuple[RecordPath, ...]:
    if container == "zip":  # member globs
        return tuple(RecordPath(p, ()) for p in paths)
    return parse_paths([p for p in paths if "/" not in p and "*" not in p])


class Registry:
    """The transforms of a workspace, and which one claims a given source file."""

    def __init__(self, modules: list[Transform], mappings: list[Transform], cfg: Config | None = None):
        self.modules = modules
        self.mappings = mappings
        self.cfg = cfg or Config()
        self.by_name = {t.spec.name: t for t in [*mappings, *modules]}
        for name, sc in sorted(self.cfg.sources.items()):
            if sc.importer is not None and sc.importer not in self.by_name:
                raise TransformLoadError(
                    f"refinery.toml [sources.{name}] importer = {sc.importer!r}: no such importer; choose one of "
                    + ", ".join(sorted(self.by_name)))

    @classmethod
    def load(cls, workspace: Path, cfg: Config) -> Registry:
        modules = discover_modules(transform_dirs(workspace, cfg))
        mappings = [Transform(mapping_spec(name, m), mapping_transform(m, cfg.score_rules()),
                              f"refinery.toml [mappings.{name}]", paths=mapping_paths(m))
                    for name, m in sorted(cfg.mappings.items())]
        return cls(modules, mappings, cfg)

    def source_config(self, relpath: str, stream: str) -> tuple[str, SourceConfig] | tuple[None, None]:
        streams = {stream, stream_name(relpath)}  # runs.csv beside runs.jsonl: both are stream runs
        hits = [(n, sc) for n, sc in sorted(self.cfg.sources.items())
                if (name_matches(relpath, [sc.match]) if sc.match else n in streams)]
        if len(hits) > 1:
            raise TransformLoadError(
                f"data/_kb/{relpath} is matched by several [sources] tables in refinery.toml: "
                + ", ".join(f"[sources.{n}]" for n, _ in hits) + ". Narrow their `match` so exactly one does.")
        return hits[0] if hits else (None, None)

    def claim(self, src: Any, limits: Limits | None = None) -> Claim:
        """Who reads `src` (a refinery.sources.SourceFile), and why."""
        relpath, fmt = src.kb_rel, src.format
        sname, sc = self.source_config(relpath, src.source)
        base = {"source_name": sname, "source_cfg": sc}

        def done(t: Transform | None, why: str, error: str | None = None) -> Claim:
            paths = (sc.record_paths if sc and sc.record_paths else t.spec.record_paths) if t else ()
            return Claim(t, why, error, **base, record_paths=_paths(tuple(paths), src.container),
                         strict_paths=bool(sc and sc.record_paths))

        if getattr(src, "refused", None):
            return done(None, src.refused)
        if src.container is None:
            return done(None, "not a container refinery reads")
        if sc is not None and sc.importer is not None:
            t = self.by_name[sc.importer]
            if not t.reads(fmt):
                return done(None, f"[sources.{sname}] importer {t.spec.name!r} reads "
                                  f"{_record_kind(t.spec.format)} records, not {fmt}",
                            error=f"refinery.toml [sources.{sname}]: importer {t.spec.name!r} cannot read "
                                  f"data/_kb/{relpath} ({fmt} records)")
            return done(t, f"refinery.toml [sources.{sname}] importer = {sc.importer!r}")
        if (by_name := self._by_name(relpath, fmt)) is not None:
            t, what = by_name
            pats = [p for p in t.spec.patterns if name_matches(relpath, [p])]
            return done(t, f"file name matches {what} {pats[0]!r}")
        detectors = [t for t in self.modules if t.detect is not None and t.reads(fmt)]
        if not detectors:
            return done(None, "no importer's file-name pattern matches, and none reads its records")
        pr = probe(src.path, src.container, src.compressed, limits or Limits(
            self.cfg.materialize.max_line_bytes, self.cfg.materialize.max_document_bytes))
        unread = {"json": "its document could not be read (cut short? over max_document_bytes?)",
                  "lines": "no JSON record in its first lines", "zip": "an archive with no readable eval members",
                  "csv": "no CSV record could be read"}[src.container]
        if not (pr.records or pr.members or pr.document is not None):
            return done(None, unread)
        found, crashed = [], []
        for t in detectors:
            try:
                why = t.detect(pr)
            except Exception as e:  # odd data in the file, or a bug: either way not a claim; say so
                crashed.append(f"{t.spec.name}'s detect() raised {type(e).__name__}: {e}")
                continue
            if why:
                found.append((t, why))
        if len(found) > 1:
            names = " and ".join(f"{t.spec.name} ({why})" for t, why in found)
            return done(None, f"recognised by {names}",
                        error=f"recognised by {names}; say which one reads it in "
                              f"refinery.toml: {table_name('sources', src.source)} importer = "
                              f"\"{found[0][0].spec.name}\"")
        if found:
            return done(found[0][0], f"content: {found[0][1]}")
        return done(None, "no importer recognises its content" + (f" ({'; '.join(crashed)})" if crashed else ""))

    def _by_name(self, relpath: str, fmt: str | None) -> tuple[Transform, str] | None:
        """(the mapping or module whose name pattern claims `relpath`, which kind), or None.
        Two of one kind claiming it is a configuration error: raises TransformLoadError."""
        for group, what in ((self.mappings, "its match"), (self.modules, "its file-name pattern")):
            hits = [t for t in group if t.claims(relpath, fmt)]
            if len(hits) > 1:
                raise TransformLoadError(
                    f"data/_kb/{relpath} is claimed by several transforms: "
                    + ", ".join(f"{t.spec.name} ({t.origin})" for t in hits)
                    + ". Narrow their patterns so exactly one matches.")
            if hits:
                return hits[0], what
        return None

    def unused_tables(self, sources: list[Any]) -> list[str]:
        """Warnings for [sources] and [mappings] tables of refinery.toml that match no file: a
        misspelt name quietly not applying (a curated dataset scored as uncurated) is worse
        than a word about it."""
        out = []
        for name, sc in sorted(self.cfg.sources.items()):
            if not any((name_matches(s.kb_rel, [sc.match]) if sc.match else name in (s.source, stream_name(s.kb_rel)))
                       for s in sources):
                what = f"match = {sc.match!r}" if sc.match else f"the stream {name!r}"
                streams = ", ".join(sorted(s.source for s in sources)[:12])
                out.append(f"refinery.toml {table_name('sources', name)} matches no file under data/_kb/ "
                           f"({what}); the streams are: {streams}")
        for t in self.mappings:
            if not any(name_matches(s.kb_rel, t.spec.patterns) for s in sources):
                out.append(f"refinery.toml [mappings.{t.spec.name.removeprefix('mapping:')}] matches no file under "
                           f"data/_kb/ (match = {t.spec.patterns[0]!r})")
        return out

    def all(self) -> list[Transform]:
        return [*self.mappings, *self.modules]
