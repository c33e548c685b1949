"""The model replay answers with: the router's offline_model (the base it was trained on plus
the promoted adapter), or the base model of distill_config.json alone when none is promoted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from refinery.canonical import file_sha256
from refinery.errors import RefineryError
from refinery.generation import Generation, generate_chat
from refinery.training.config import DistillConfig, base_model_dir
from refinery.training.from_gguf import GGUFError
from refinery.training.registry import ROUTER, read_router
from refinery.training.train import ADAPTER_FILE
from refinery.workspace import Workspace


class ModelUnavailable(RefineryError):
    """No usable local model; the message says what to run or set."""


@dataclass(frozen=True)
class OfflineModel:
    base: str
    """the model folder mlx-lm loads, as written in the receipt or config (relative to the workspace)"""
    adapter_id: str | None = None
    adapter_path: str | None = None

    @property
    def label(self) -> str:
        return self.base + (f" + {self.adapter_id}" if self.adapter_id else "")


def offline_model(ws: Workspace, dcfg: DistillConfig) -> OfflineModel:
    """What router.json says to serve, checked: the adapter is on disk with the weights it was
    trained with (sha256 against its receipt), and the base model folder exists."""
    current = read_router(ws).get("offline_model")
    if current:
        aid, folder = current["adapter_id"], ws.root / current["adapter_path"]
        try:
            receipt = orjson.loads((folder / "receipt.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            raise ModelUnavailable(f"{ROUTER} serves adapter {aid} from {current['adapter_path']}, but its receipt "
                                   "is missing or unreadable: `refinery train list` shows the adapters, `refinery "
                                   "train rollback <id>` picks another") from None
        weights = folder / ADAPTER_FILE
        if not weights.is_file() or file_sha256(weights) != receipt["adapter_sha256"]:
            raise ModelUnavailable(f"{current['adapter_path']}/{ADAPTER_FILE} is missing or not the adapter that was "
                                   f"trained and promoted (sha256 differs from its receipt): `refinery train rollback "
                                   "<id>` to serve another, or retrain")
        om = OfflineModel(receipt["base_model"]["trained_on"], aid, current["adapter_path"])
    else:
        try:
            base = base_model_dir(ws.root, dcfg)
        except GGUFError as e:
            raise ModelUnavailable(f"base_model {dcfg.base_model}: {e}") from None
        om = OfflineModel(str(base.relative_to(ws.root)) if base.is_relative_to(ws.root) else str(base))
    if not (_path(ws, om.base) / "config.json").is_file():
        raise ModelUnavailable(f"no local model at {om.base}: set base_model in distill_config.json to a local "
                               "mlx-lm model folder, or build a tiny one with `refinery train tiny-model`")
    return om


def _path(ws: Workspace, p: str) -> Path:
    return ws.root / p  # an absolute p stays absolute


class LocalGenerator:
    """Greedy generation with the offline model, loaded on the first call."""

    def __init__(self, ws: Workspace, model: OfflineModel):
        self.ws, self.model = ws, model
        self._loaded: tuple[Any, Any] | None = None

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer), loaded once. Call it before timing answers: loading is not latency.
        Raises ModelUnavailable when mlx-lm is missing or the folder does not load."""
        if self._loaded is None:
            try:
                from mlx_lm import load
            except ImportError as e:
                raise ModelUnavailable(f"replay needs mlx-lm ({e}): install the 'train' extra — `make install` "
                                       "does — or `uv sync --all-extras`") from None
            adapter = str(_path(self.ws, self.model.adapter_path)) if self.model.adapter_path else None
            try:
                self._loaded = load(str(_path(self.ws, self.model.base)), adapter_path=adapter)
            except (OSError, ValueError, KeyError) as e:
                raise ModelUnavailable(f"cannot load {self.model.label} with mlx-lm: {e}") from None
        return self._loaded

    def __call__(self, messages: list[dict[str, Any]], max_tokens: int) -> Generation:
        model, tokenizer = self.load()
        # offered no tools, as the direct rows it was trained on were ("tools": [], not None:
        # Llama-3.1's and Mistral's templates render the two differently)
        return generate_chat(model, tokenizer, messages, max_tokens, [])
