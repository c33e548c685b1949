"""Stage receipts: what each stage of a run read and wrote, with the hashes that prove it.

    reports/distillation/<run_id>/receipts/<stage>.json   (StageReceipt)

A receipt lists its stage's inputs and outputs (path, sha256, rows), its counts, the hash of
the settings it read, the code version and — for score — the policy hash. `receipt_hash`
covers all of that but the run id and the timings, so two runs over the same inputs with the
same config and code have the same receipt hashes, and a changed source row changes the
hashes of exactly the files (and receipts) downstream of it.

The chain: a stage's inputs must be exactly the outputs of the stages it reads from (minus
their quarantine files, which nothing reads), byte for byte — `check_chain` says where not.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import orjson

import refinery
from refinery.canonical import sig_hash
from refinery.config import Config
from refinery import stages
from refinery.errors import RefineryError
from refinery.workspace import QUARANTINE_DIR, Workspace, is_output_path

#: The stages, those that are exports, and what each reads from: as refinery.stages declares them.
STAGES, EXPORT_STAGES, READS_FROM = stages.STAGES, stages.EXPORT_STAGES, stages.READS_FROM
#: Fields a receipt's hash leaves out: they differ between runs that did the same work.
UNHASHED = ("run_id", "reused_from", "timings", "fingerprints", "receipt_hash")


def code_version(ws: Workspace, cfg: Config) -> str:
    """The package version plus a hash of its code and of every transform module it loads,
    so an edited transform or stage invalidates what was computed with the old one."""
    from refinery.discovery import transform_dirs

    h = hashlib.sha256()
    pkg = Path(refinery.__file__).resolve().parent
    files = [(f"refinery/{p.relative_to(pkg).as_posix()}", p) for p in pkg.rglob("*.py")]
    for d in transform_dirs(ws.root, cfg):
        files += [(f"transforms:{p.name}", p) for p in d.glob("*.py")]
    for name, p in sorted(files):
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return f"{refinery.__version__}+{h.hexdigest()[:12]}"


def stage_config_hash(stage: str, cfg: Config, include_partial: bool | None = None) -> str:
    """The hash of the settings `stage` reads (as refinery.stages declares them). Worker counts
    are left out: they never change an output; so are the transform folders' paths (their
    modules' content is in the code version)."""
    if stage not in stages.BY_NAME:
        raise ValueError(f"unknown stage {stage!r}")
    return stages.BY_NAME[stage].config_hash(cfg, include_partial)


class Digests:
    """sha256 and line counts of files, each file read once per run.

    Keyed by inode, size and mtime: within a run (which holds the workspace lock) a file that
    keeps all three has not changed — and a reused output hard-linked into the run's staging
    keeps its inode, so it is not read twice. Across runs, `known` holds what an earlier run
    recorded (path → fingerprint, sha256, rows; see `fingerprinted`): a file whose size, mtime
    and inode are still the recorded ones is taken to hold the recorded bytes and is not read
    (how make, rsync and git decide; audit-full re-hashes everything). `fingerprint()` is what
    this run saw of every file it hashed or trusted, for its receipts — except a file outside
    the output folders modified in the last RACY_NS: a rewrite of the same size in the same
    clock tick as the stat would keep its fingerprint (git's "racily clean" entries), so such a
    source is read again next time. Outputs are written under the workspace lock.
    """

    def __init__(self, known: dict[str, tuple[list[int], str, int]] | None = None) -> None:
        self._cache: dict[tuple[int, int, int, int], tuple[str, int]] = {}
        self._known = known or {}
        self._seen: dict[str, tuple[list[int], str]] = {}
        self.hashed = self.trusted = 0

    def of(self, path: Path, rel: str) -> dict[str, Any]:
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        fingerprint = [st.st_size, st.st_mtime_ns, st.st_ino]
        if key not in self._cache:
            known = self._known.get(rel)
            if known is not None and known[0] == fingerprint:
                self.trusted += 1
                self._seen[rel] = (fingerprint, known[1])
                return {"path": rel, "sha256": known[1], "rows": known[2]}
            self.hashed += 1
            h, lines, last = hashlib.sha256(), 0, b"\n"
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    lines += block.count(b"\n")
                    last = block[-1:]
            if last != b"\n":
                lines += 1
            self._cache[key] = (h.hexdigest(), lines)
        sha, lines = self._cache[key]
        if is_output_path(rel) or time.time_ns() - st.st_mtime_ns > RACY_NS:
            self._seen[rel] = (fingerprint, sha)
        return {"path": rel, "sha256": sha, "rows": 1 if path.suffix == ".json" else lines}

    def fingerprint(self, rel: str, sha256: str) -> list[int] | None:
        """(size, mtime_ns, inode) of `rel` when this run found it holding `sha256` (stat taken
        before the read), or None."""
        seen = self._seen.get(rel)
        return seen[0] if seen is not None and seen[1] == sha256 else None


RACY_NS = 2_000_000_000


def fingerprinted(receipts: dict[str, dict[str, Any]]) -> dict[str, tuple[list[int], str, int]]:
    """What a run's receipts recorded of each file they name: path → (fingerprint, sha256, rows)."""
    out = {}
    for r in receipts.values():
        prints = r.get("fingerprints") or {}
        for f in (*r["inputs"], *r["outputs"]):
            if (fp := prints.get(f["path"])) is not None:
                out[f["path"]] = (list(fp), f["sha256"], f["rows"])
    return out


def receipt_hash(receipt: dict[str, Any]) -> str:
    return sig_hash({k: v for k, v in receipt.items() if k not in UNHASHED})


def make_receipt(**fields: Any) -> dict[str, Any]:
    """A StageReceipt (validated) as a dict in field order, with its receipt_hash."""
    from refinery.models import StageReceipt

    fields.setdefault("receipt_hash", "0" * 64)
    doc = StageReceipt.model_validate(fields).model_dump(mode="json")
    doc["receipt_hash"] = receipt_hash(doc)
    return doc


# --- checks -------------------------------------------------------------------------------


def check_chain(receipts: dict[str, dict[str, Any]]) -> list[str]:
    """Problems with the chain: each stage's inputs must be exactly the (non-quarantine)
    outputs of the stages it reads from, with the same sha256 and rows — and any source file
    it reads besides (score: the human_reviews decisions), the same bytes materialize read."""
    problems = []
    sources = {i["path"]: i for s, r in receipts.items() if not READS_FROM.get(s) for i in r["inputs"]}
    for stage, r in receipts.items():
        upstream = READS_FROM.get(stage, ())
        if not upstream:
            continue
        missing = [u for u in upstream if u not in receipts]
        if missing:
            problems.append(f"{stage}: no receipt for {', '.join(missing)}, which it reads from")
            continue
        produced = {o["path"]: o for u in upstream for o in receipts[u]["outputs"]
                    if not o["path"].startswith(QUARANTINE_DIR + "/")}
        read = {i["path"]: i for i in r["inputs"]}
        for path in sorted(produced.keys() | read.keys()):
            p, i = produced.get(path), read.get(path)
            if i is None:
                problems.append(f"{stage}: did not read {path}, which {_who(receipts, upstream, path)} wrote")
            elif p is None and path in sources:
                if sources[path]["sha256"] != i["sha256"]:
                    problems.append(f"{stage}: read the source {path} with sha256 {i['sha256'][:12]}…, but "
                                    f"materialize read sha256 {sources[path]['sha256'][:12]}…")
            elif p is None:
                problems.append(f"{stage}: read {path}, which no stage before it wrote")
            elif (p["sha256"], p["rows"]) != (i["sha256"], i["rows"]):
                problems.append(f"{stage}: read {path} with sha256 {i['sha256'][:12]}… ({i['rows']} rows), but "
                                f"{_who(receipts, upstream, path)} wrote sha256 {p['sha256'][:12]}… ({p['rows']} rows)")
    return problems


def _who(receipts: dict[str, dict[str, Any]], upstream: tuple[str, ...], path: str) -> str:
    return next((u for u in upstream if any(o["path"] == path for o in receipts[u]["outputs"])), "?")


def check_hashes(receipts: dict[str, dict[str, Any]]) -> list[str]:
    """Receipts whose receipt_hash does not match their content (edited after the run)."""
    return [f"{stage}: receipt_hash {r['receipt_hash'][:12]}… does not match its content "
            f"({receipt_hash(r)[:12]}…)" for stage, r in receipts.items() if receipt_hash(r) != r["receipt_hash"]]


def verify_files(ws: Workspace, files: list[dict[str, Any]], digests: Digests) -> str | None:
    """None when every file is on disk with the recorded sha256; else what differs first."""
    for f in files:
        if found := _file_problem(ws, f, digests):
            kind, detail = found
            return {"missing": f"{f['path']} was deleted", "sha256": f"{f['path']} changed"}.get(kind, detail)
    return None


def check_files(ws: Workspace, receipts: dict[str, dict[str, Any]]) -> list[str]:
    """Every output the receipts record is on disk with that sha256 and row count (each file
    re-hashed): an edited byte anywhere in evidence, scored runs, exports or quarantine is
    caught, and the file named. Meaningful for the run whose outputs are published."""
    problems = []
    digests = Digests()
    for f, writers in recorded_outputs(receipts):
        if not (found := _file_problem(ws, f, digests)):
            continue
        kind, detail = found
        by = ", ".join(writers)
        problems.append({"missing": f"{f['path']} (written by {by}) is missing",
                         "sha256": f"{f['path']} changed since {by} wrote it: {detail}"}.get(kind, detail))
    return problems


def recorded_outputs(receipts: dict[str, dict[str, Any]]) -> list[tuple[dict[str, Any], list[str]]]:
    """Each output the receipts record, once — (the record, the stages that list it: the exports'
    shared quarantine file is an output of every export stage) —, in receipt order. Records
    that differ in anything (a damaged receipt's) stay apart."""
    out: dict[bytes, tuple[dict[str, Any], list[str]]] = {}
    for stage, r in receipts.items():
        for f in r["outputs"]:
            key = orjson.dumps([f.get("path"), f.get("sha256"), f.get("rows")], option=orjson.OPT_SORT_KEYS)
            out.setdefault(key, (f, []))[1].append(stage)
    return list(out.values())


def _file_problem(ws: Workspace, f: dict[str, Any], digests: Digests) -> tuple[str, str] | None:
    """What is wrong with one recorded output on disk, as (kind, detail): "outside" (a path
    outside the published trees: a rewritten receipt must not make refinery read, or reuse
    link, anything else), "missing", "sha256" or "rows"; None when nothing is."""
    from refinery.workspace import is_output_path

    if not is_output_path(f["path"]):
        return "outside", f"{f['path']!r} is not a path in the published output folders"
    p = ws.out / f["path"]
    if not p.is_file():
        return "missing", ""
    d = digests.of(p, f["path"])
    if d["sha256"] != f["sha256"]:
        return "sha256", f"sha256 {d['sha256'][:12]}… != recorded {f['sha256'][:12]}…"
    if d["rows"] != f["rows"]:
        return "rows", f"{f['path']}: {d['rows']} rows, the receipt says {f['rows']}"
    return None


# --- files --------------------------------------------------------------------------------


def receipt_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "receipts" / f"{stage}.json"


def write_json(path: Path, doc: Any) -> None:
    from refinery.jsonl import atomic_write

    with atomic_write(path) as f:
        f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


def read_receipts(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The receipts of a run, in stage order (stages that did not finish are absent)."""
    out = {}
    for stage in STAGES:
        p = receipt_path(run_dir, stage)
        if p.is_file():
            out[stage] = read_json(p)
    return out


class ReportUnreadable(RefineryError, ValueError):
    """A receipt, summary or drift report that is not valid JSON any more."""


def read_record(path: Path, model: Any) -> dict[str, Any] | None:
    """A small JSON record file as its pydantic `model` reads it (strictly), or None when there is
    none. Raises ReportUnreadable with what is wrong (the first two errors, or the OS's word);
    the caller says which file it is and how to mend it."""
    from pydantic import ValidationError

    if not path.exists():
        return None
    try:
        return model.model_validate_json(path.read_bytes(), strict=True).model_dump(mode="json")
    except ValidationError as e:
        raise ReportUnreadable("; ".join(f"{'.'.join(map(str, err['loc'])) + ': ' if err['loc'] else ''}"
                                         f"{err['msg']}" for err in e.errors()[:2])) from None
    except OSError as e:
        raise ReportUnreadable(e.strerror or str(e)) from None


def read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ReportUnreadable(f"{path}: not valid JSON ({e}); this report was damaged") from None


def link_or_copy(src: Path, dest: Path) -> None:
    """Put `src` at `dest` without copying bytes when the file system allows (outputs are
    only ever replaced by rename, never edited in place, so sharing the inode is safe). A file
    already there (an output several stages share) is left as it is."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and os.path.samefile(src, dest):
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
