"""Where everything lives, relative to one workspace root (the repo, by default).

A workspace may write its outputs under a separate root (`staged`): run-all builds a whole
run's outputs in `data/.run-<id>/` and publishes them together at the end, so a run that
is killed or fails leaves the previous complete run's outputs as they were. Paths written
into records (`rel`) are the same either way: relative to the output root for outputs,
relative to the workspace root for the sources.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from refinery.errors import RefineryError
from refinery.exporters import EXPORTERS

#: The workspace roots this process holds the lock of, with how deeply it is held.
_HELD: dict[Path, int] = {}
_LOCK_FD: dict[Path, int] = {}


#: Each export's file, relative to the root, as its module in refinery/exporters/ declares it.
EXPORT_FILES = {x.name: x.path for x in EXPORTERS}
#: Refused rows: one file per stage (`quarantine_file(stage)`); the exports' per-row refusals,
#: decided once for every export a row is refused by, share EXPORT_QUARANTINE.
QUARANTINE_DIR = "exports/quarantine"
EXPORT_QUARANTINE = f"{QUARANTINE_DIR}/export.jsonl"


def quarantine_file(stage: str) -> str:
    """The quarantine file of `stage` (materialize, score, export-<name>, or export: the shared one)."""
    return f"{QUARANTINE_DIR}/{stage}.jsonl"


#: The output trees a run publishes together (everything its stages write), relative to the root.
PUBLISHED = ("data/evidence", "data/scored-runs", *(p.rsplit("/", 1)[0] for p in EXPORT_FILES.values()),
             QUARANTINE_DIR)
#: A run's summary (in reports/distillation/<run_id>/), and the pointer to the published run
#: (in reports/distillation/): the files a run's publish moves besides its trees.
SUMMARY, PUBLISHED_RUN = "summary.json", "published.json"


class WorkspaceBusy(RefineryError):
    """Another refinery process is writing to the same workspace."""


class UnsafePath(RefineryError):
    """Something refinery read (a journal, a receipt, a setting, an id) names a path outside
    the workspace, or outside the part of it that may be written: refused, nothing was moved."""


#: What run-all names a run: its start time to the millisecond and a random suffix (runs.new_run_id).
RUN_ID = re.compile(r"\d{8}T\d{9}Z-[0-9a-f]{4}")


def _first_link(path: Path) -> Path | None:
    """`path` itself, or the first thing under it, that is a symbolic link (None: none is)."""
    if path.is_symlink():
        return path
    for folder, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            if os.path.islink(os.path.join(folder, name)):
                return Path(folder) / name
    return None


def inside(rel: str) -> bool:
    """Whether `rel` is a relative path that stays inside the folder it is relative to (no
    absolute path, no `..` that climbs out, not empty) — decided by its text alone."""
    if not rel or "\0" in rel or os.path.isabs(rel):
        return False
    norm = os.path.normpath(rel)
    return norm != ".." and not norm.startswith("../") and norm != "."


#: The workspace's folders that refinery itself lays out: a setting may not hand one of them (or
#: the root) to a command that replaces or deletes what it points at.
RESERVED = ("data", "exports", "reports", "transforms", ".git")


def reserved(rel: str) -> bool:
    """Whether `rel` (inside the workspace) is its root, or one of RESERVED or a folder in one."""
    norm = os.path.normpath(rel)
    return norm == "." or norm.split("/")[0] in RESERVED


def setting_folder(v: str, *, allow_outside: bool, does: str, opt_in: str) -> str:
    """Check a folder a setting hands to a command that writes, replaces or deletes in it
    (`does`): never the workspace root or one of refinery's own folders, and outside the
    workspace only with the setting's opt-in (`opt_in`, as the user writes it). Raises
    ValueError with the fix, for pydantic to report under the setting's name."""
    if reserved(v):
        raise ValueError(f"{v!r} is the workspace itself or inside its own folders ({', '.join(RESERVED)}), "
                         "which refinery lays out and would see replaced; use a folder of its own, such as "
                         "distill_out/")
    if not allow_outside and not inside(v):
        raise ValueError(f"{v!r} is outside the workspace, and refinery {does} there; use a path inside the "
                         f"workspace, or set {opt_in} if you mean it")
    return v


def is_output_path(rel: str) -> bool:
    """Whether `rel` names a file inside one of the published output trees."""
    if not inside(rel):
        return False
    norm = os.path.normpath(rel)
    return any(norm.startswith(tree + "/") for tree in PUBLISHED)


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
        return self.out / QUARANTINE_DIR

    @property
    def reports(self) -> Path:
        return self.root / "reports" / "distillation"

    def rels(self, paths: Iterable[Path]) -> list[tuple[Path, str]]:
        """(path, `rel(path)`) for many files: each folder is resolved once, not once per file in
        it (an unchanged re-run lists thousands of output files); a file that is itself a link
        is resolved whole, as `rel` does."""
        folders: dict[Path, Path] = {}
        out = []
        for p in paths:
            if p.is_symlink():
                out.append((p, self.rel(p)))
                continue
            if (real := folders.get(p.parent)) is None:
                real = folders[p.parent] = p.parent.resolve()
            out.append((p, self._rel_resolved(real / p.name)))
        return out

    def rel(self, path: Path) -> str:
        """`path` relative to the (output) root, with forward slashes (as in provenance)."""
        return self._rel_resolved(path.resolve())

    def _rel_resolved(self, path: Path) -> str:
        if self.out_root is not None and path.is_relative_to(self.out_root):
            return path.relative_to(self.out_root).as_posix()
        return path.relative_to(self.root).as_posix()

    @property
    def lock_path(self) -> Path:
        return self.root / "data" / ".refinery.lock"

    @contextlib.contextmanager
    def lock(self, *, wait_s: float = 2.0) -> Iterator[None]:
        """Hold the workspace's write lock; fail (after `wait_s`) if another process holds it.

        A POSIX record lock (`lockf`), not `flock`: worker processes forked while it is held
        do not inherit it, so a killed run's orphaned workers cannot keep the workspace
        locked. Re-entrant within a process, so run-all can hold it across the stages it
        calls. The holder's pid (and a note: run-all's run id) is written into the lock file
        for `holder()`; the first acquisition cleans up after a killed run (`recover`).
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
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        raise WorkspaceBusy(
                            f"another refinery run is writing to {self.root} (lock {path}); "
                            "wait for it to finish") from None
                    time.sleep(0.05)
            _HELD[self.root] = 1
            _LOCK_FD[self.root] = fd
            try:
                self.note_lock("")
                self.recover()
                yield
            finally:
                os.ftruncate(fd, 0)  # nobody holds it any more
                _HELD.pop(self.root, None)
                _LOCK_FD.pop(self.root, None)
        finally:
            os.close(fd)  # releases the lock

    def note_lock(self, note: str) -> None:
        """Record who holds the lock (this process) and what it is doing, for `holder()`."""
        fd = _LOCK_FD[self.root]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {note}".encode(), 0)

    def holder(self) -> tuple[int, str] | None:
        """(pid, note) of the live process holding the write lock, or None. Reads the lock
        file only: asking never gets in the way of a run that is about to start.

        A process that holds the lock reads it through the descriptor it locked with: opening
        and closing another descriptor of a file releases every POSIX lock the process has on it
        (lockf's rule), which let a second run in while the first was still writing."""
        try:
            held = _LOCK_FD.get(self.root)
            if held is not None:
                text = os.pread(held, 4096, 0).decode(errors="replace")
            else:
                text = self.lock_path.read_text()
            pid_s, _, note = text.partition(" ")
            pid = int(pid_s)
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # killed while holding it: the lock died with it
        except PermissionError:
            pass  # alive, someone else's
        return pid, note.strip()

    def recover(self) -> list[str]:
        """Clean up after a killed run (call only while holding the lock): complete a publish
        it journaled, drop its staging and its stages' temporary folders."""
        from refinery.jsonl import finish_publishes

        return finish_publishes(self.root / "data", self.check_journal)

    def check_journal(self, staging: Path, moves: list[tuple[str, str]] | None) -> None:
        """Raise UnsafePath unless `moves` are exactly what run-all journals for `staging`
        (data/.run-<id>): its trees onto the published ones, its summary into
        reports/distillation/<id>/, and the pointer to it — each a real folder or file of the
        staging, with no link anywhere in it. A journal is replayed with renames and deletions,
        so one that asks for anything else was not written by refinery and is not obeyed: a
        linked tree moved into exports/ would have later writes land wherever it points."""
        run_id = staging.name.removeprefix(".run-")
        rel = f"data/{staging.name}"
        reports = self.rel(self.reports)
        allowed = {(f"{rel}/{tree}", tree) for tree in PUBLISHED}
        allowed.add((f"{rel}/{PUBLISHED_RUN}", f"{reports}/{PUBLISHED_RUN}"))
        allowed.add((f"{rel}/{SUMMARY}", f"{reports}/{run_id}/{SUMMARY}"))
        problem = None
        if staging.is_symlink():
            problem = "its folder is a link"
        elif not RUN_ID.fullmatch(run_id):
            problem = f"{run_id!r} is not a run id"
        elif moves is None:
            problem = "it is not the JSON refinery writes"
        elif odd := [m for m in moves if tuple(m) not in allowed]:
            problem = f"it asks to move {odd[0][0]!r} to {odd[0][1]!r}"
        else:
            for src, _ in moves:
                if link := _first_link(self.root / src):
                    problem = f"{link.relative_to(self.root).as_posix()} is a link (to {os.readlink(link)})"
                    break
        if problem:
            raise UnsafePath(
                f"{rel}/PUBLISH.json: {problem} — not a publish refinery journals (only its own "
                f"folders onto {', '.join(PUBLISHED)}, its summary and the pointer to it), so nothing was "
                f"moved or deleted. Look at {rel}/, then delete it.")

    def try_recover(self) -> None:
        """`recover` if the lock is free right now; otherwise leave it to its holder."""
        if not self.lock_path.exists():
            return  # nothing ever wrote here
        with contextlib.suppress(WorkspaceBusy), self.lock(wait_s=0):
            pass
