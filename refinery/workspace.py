"""Where everything lives, relative to one workspace root (the repo, by default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Workspace:
        return cls(Path(root).resolve())

    @property
    def kb(self) -> Path:
        """The source streams (and the audit's baseline ledger)."""
        return self.root / "data" / "_kb"

    @property
    def evidence(self) -> Path:
        return self.root / "data" / "evidence"

    @property
    def scored_runs(self) -> Path:
        return self.root / "data" / "scored-runs"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def quarantine(self) -> Path:
        return self.exports / "quarantine"

    @property
    def reports(self) -> Path:
        return self.root / "reports" / "distillation"

    def rel(self, path: Path) -> str:
        """`path` relative to the workspace root, with forward slashes (as in provenance)."""
        return path.resolve().relative_to(self.root).as_posix()
