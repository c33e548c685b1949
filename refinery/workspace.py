"""Where everything lives, relative to one workspace root (the repo, by default)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class WorkspaceBusy(Exception):
    """Another refinery process is writing to the same workspace."""


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

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the workspace's write lock; fail at once if another run holds it."""
        path = self.root / "data" / ".refinery.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkspaceBusy(
                    f"another refinery run is writing to {self.root} (lock {path}); "
                    "wait for it to finish") from None
            yield
        finally:
            os.close(fd)
