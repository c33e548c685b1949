"""Which adapter the router serves offline: promotion, the kept adapters, rollback.

    router.json (workspace root)   {"offline_model": {...} | null, "history": [...]}

`promote` makes an evaluated adapter the router's offline_model only if its average row score
beats the base's by at least PROMOTE_MARGIN and no safety or format row got worse; otherwise
the base is kept and the adapter moved to <output_dir>/archive/. The last KEEP promoted
adapters stay in <output_dir>/ (older ones are archived), and `rollback` can make any of them
the offline_model again.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import orjson

from refinery.errors import RefineryError
from refinery.receipts import write_json
from refinery.training.config import DistillConfig
from refinery.transform import now_utc
from refinery.workspace import Workspace

ROUTER = "router.json"
PROMOTE_MARGIN = 0.05
KEEP = 3


class RegistryError(RefineryError):
    """An unknown, unevaluated or archived adapter; the message says what to do."""


#: What an adapter id may look like: a folder name, never a path (`ad-` + 12 hex digits when
#: refinery made it). An id comes from the command line and router.json, and names a folder
#: that eval writes into and promote moves: `../x` must not reach outside output_dir.
ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def adapter_dir(ws: Workspace, dcfg: DistillConfig, adapter_id: str) -> Path:
    """The folder of `adapter_id` under output_dir; RegistryError if the id is not a folder name."""
    if not ADAPTER_ID.fullmatch(adapter_id) or ".." in adapter_id:
        raise RegistryError(f"{adapter_id!r} is not an adapter id (a folder name such as ad-0123456789ab, "
                            "as `refinery train list` shows them)")
    return ws.root / dcfg.output_dir / adapter_id


def read_router(ws: Workspace) -> dict[str, Any]:
    p = ws.root / ROUTER
    return orjson.loads(p.read_bytes()) if p.is_file() else {"offline_model": None, "history": []}


def adapters(ws: Workspace, dcfg: DistillConfig) -> list[dict[str, Any]]:
    """Every adapter folder (kept or archived) with its receipt, evaluation and state."""
    router = read_router(ws)
    current = (router["offline_model"] or {}).get("adapter_id")
    promoted = [h["adapter_id"] for h in router["history"] if h["event"] in ("promoted", "rolled_back")]
    out = []
    root = ws.root / dcfg.output_dir
    for folder, archived in ((root, False), (root / "archive", True)):
        if not folder.is_dir():
            continue
        for d in sorted(folder.glob("ad-*")):
            if not (d / "receipt.json").is_file():
                continue
            receipt = orjson.loads((d / "receipt.json").read_bytes())
            comp = d / "eval" / "comparison.json"
            ev = orjson.loads(comp.read_bytes()) if comp.is_file() else None
            out.append({"adapter_id": d.name, "path": str(d.relative_to(ws.root)), "archived": archived,
                        "current": d.name == current, "promoted": d.name in promoted,
                        "created": (d / "receipt.json").stat().st_mtime, "steps": receipt["steps"],
                        "final_val_loss": receipt["final_val_loss"], "method": receipt.get("method", "sft"),
                        "reference": (receipt.get("reference") or {}).get("adapter_id"),
                        "average": ev["average"] if ev else None, "preference": ev.get("preference") if ev else None})
    return sorted(out, key=lambda a: a["created"])


def find_adapter(ws: Workspace, dcfg: DistillConfig, adapter_id: str) -> Path:
    """The folder of any adapter `adapters` lists: kept in <output_dir>/ or archived in
    <output_dir>/archive/ (promote archives one that did not beat the base)."""
    kept = adapter_dir(ws, dcfg, adapter_id)  # refuses an id that is a path
    for d in (kept, kept.parent / "archive" / adapter_id):
        if (d / "receipt.json").is_file():
            return d
    raise RegistryError(f"no adapter {adapter_id} in {dcfg.output_dir}/ or {dcfg.output_dir}/archive/ "
                        "(`refinery train list` shows them)")


def decide(comparison: dict[str, Any]) -> tuple[bool, str]:
    base, tuned = comparison["average"]["base"], comparison["average"]["adapter"]
    regs = comparison["safety_or_format_regressions"]
    if regs:
        r = regs[0]
        return False, (f"{len(regs)} safety or format row(s) got worse (first: row {r['row']} {r['metric']} "
                       f"{r['base']} → {r['adapter']})")
    if tuned < base + PROMOTE_MARGIN:
        return False, f"average {tuned:.3f} is not at least base {base:.3f} + {PROMOTE_MARGIN}"
    return True, f"average {tuned:.3f} beats base {base:.3f} by {tuned - base:+.3f}; no safety or format regression"


def promote(ws: Workspace, dcfg: DistillConfig, adapter_id: str) -> dict[str, Any]:
    """Promote or archive `adapter_id` by its evaluation; return {promoted, reason, router}."""
    d = adapter_dir(ws, dcfg, adapter_id)
    comp = d / "eval" / "comparison.json"
    if not (d / "receipt.json").is_file():
        raise RegistryError(f"no adapter {adapter_id} in {dcfg.output_dir}/ (`refinery train list` shows them)")
    if not comp.is_file():
        raise RegistryError(f"{adapter_id} has not been evaluated: run `refinery train eval --adapter {adapter_id}`")
    ok, reason = decide(orjson.loads(comp.read_bytes()))
    router = read_router(ws)
    if ok:
        receipt = orjson.loads((d / "receipt.json").read_bytes())
        router["offline_model"] = {"base_model": receipt["base_model"]["path"], "adapter_id": adapter_id,
                                   "adapter_path": f"{dcfg.output_dir}/{adapter_id}", "since": now_utc()}
        router["history"].append({"event": "promoted", "adapter_id": adapter_id, "at": now_utc(), "reason": reason})
        _prune(ws, dcfg, router)
    else:
        _archive(ws, dcfg, adapter_id)
        router["history"].append({"event": "kept_base", "adapter_id": adapter_id, "at": now_utc(), "reason": reason})
    write_json(ws.root / ROUTER, router)
    return {"promoted": ok, "reason": reason, "router": router}


def _archive(ws: Workspace, dcfg: DistillConfig, adapter_id: str) -> None:
    src = adapter_dir(ws, dcfg, adapter_id)
    dest = ws.root / dcfg.output_dir / "archive" / adapter_id
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    src.rename(dest)


def _prune(ws: Workspace, dcfg: DistillConfig, router: dict[str, Any]) -> None:
    """Keep the KEEP most recently promoted adapters in place; archive older promoted ones."""
    order: list[str] = []
    for h in router["history"]:
        if h["event"] in ("promoted", "rolled_back"):
            if h["adapter_id"] in order:
                order.remove(h["adapter_id"])
            order.append(h["adapter_id"])
    for old in order[:-KEEP]:
        if (ws.root / dcfg.output_dir / old).is_dir():
            _archive(ws, dcfg, old)
            router["history"].append({"event": "archived", "adapter_id": old, "at": now_utc(),
                                      "reason": f"only the last {KEEP} promoted adapters are kept"})


def rollback(ws: Workspace, dcfg: DistillConfig, adapter_id: str) -> dict[str, Any]:
    """Make a kept, previously promoted adapter the offline_model again."""
    adapter_dir(ws, dcfg, adapter_id)
    router = read_router(ws)
    kept = {a["adapter_id"]: a for a in adapters(ws, dcfg) if not a["archived"] and a["promoted"]}
    if adapter_id not in kept:
        raise RegistryError(f"{adapter_id} is not one of the kept promoted adapters ({', '.join(kept) or 'none'}); "
                            "`refinery train list` shows them")
    receipt = orjson.loads((ws.root / dcfg.output_dir / adapter_id / "receipt.json").read_bytes())
    router["offline_model"] = {"base_model": receipt["base_model"]["path"], "adapter_id": adapter_id,
                               "adapter_path": f"{dcfg.output_dir}/{adapter_id}", "since": now_utc()}
    router["history"].append({"event": "rolled_back", "adapter_id": adapter_id, "at": now_utc(),
                              "reason": "refinery train rollback"})
    write_json(ws.root / ROUTER, router)
    return router
