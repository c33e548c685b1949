"""Where everything lives, relative to one workspace root (the repo, by default).

A workspace may write its outputs under a separate root (`staged`): run-all builds a whole
run's outputs in `data/.run-<id>/` and publishes them together at the end, so a run that
is killed or fails leaves the previous complete run's outputs as they were. Paths written
into records (`rel`) are the same either way: relative to the output root for outputs,
relative to the workspace root for the sources.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: The workspace roots this process holds the lock of, with how deeply it is held.
_HELD: dict[Path, int] = {}


class WorkspaceBusy(Exception):
    """Another refinery process is writing to the same workspace."""


@dataclass(frozen=True)
class Workspace:
    root: Path
    out_root: Path | None = None
    """where outputs go; None = the workspace root"""

    @classmethod
    def at(cls, root: str | Path) -> Workspace:
        return cls(Path(root).resolve())

    def staged(self, out_root: Path) -> Workspace:
        """The same workspace, writing its outputs under `out_root` instead."""
        return Workspace(self.root, out_root.resolve())

    @property
    def out(self) -> Path:
        return self.out_root or self.root

    @property
    def kb(self) -> Path:
        """The source streams (and the audit's baseline ledger)."""
        return self.root / "data" / "_kb"

    @property
    def evidence(self) -> Path:
        return self.out / "data" / "evidence"

    @property
    def scored_runs(self) -> Path:
        return self.out / "data" / "scored-runs"

    @property
    def exports(self) -> Path:
        return self.out / "exports"

    @property
    def quarantine(self) -> Path:
        return self.exports / "quarantine"

    @property
    def reports(self) -> Path:
        return self.root / "reports" / "distillation"

    def rel(self, path: Path) -> str:
        """`path` relative to the (output) root, with forward slashes (as in provenance)."""
        path = path.resolve()
        if self.out_root is not None and path.is_relative_to(self.out_root):
            return path.relative_to(self.out_root).as_posix()
        return path.relative_to(self.root).as_posix()

    @property
    def lock_path(self) -> Path:
        return self.root / "data" / ".refinery.lock"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the workspace's write lock; fail at once if another process holds it.

        Re-entrant within a process, so run-all can hold it across the stages it calls.
        """
        if _HELD.get(self.root):
            _HELD[self.root] += 1
            try:
                yield
            finally:
                _HELD[self.root] -= 1
            return
        path = self.lock_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkspaceBusy(
                    f"another refinery run is writing to {self.root} (lock {path}); "
                    "wait for it to finish") from None
            _HELD[self.root] = 1
            try:
                from refinery.jsonl import finish_publishes

                finish_publishes(self.root / "data")  # a run killed while publishing: complete it
                yield
            finally:
                _HELD.pop(self.root, None)
        finally:
            os.close(fd)

    def busy(self) -> bool:
        """Whether some process holds the write lock right now (a run is in progress)."""
        if _HELD.get(self.root) or not self.lock_path.exists():
            return bool(_HELD.get(self.root))
        fd = os.open(self.lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
