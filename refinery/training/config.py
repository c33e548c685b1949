"""`distill_config.json`: everything a training run depends on, typed; an unknown key is an error."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from refinery.config import format_errors
from refinery.errors import RefineryError

CONFIG_FILE = "distill_config.json"


class DistillConfigError(RefineryError):
    """A user error in distill_config.json; the message names the file and the key."""


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(default="distill_out/tiny-base",
                            description="local path of the base model: an mlx-lm / HF folder, or a llama GGUF file "
                                        "(converted once into <output_dir>/models/); nothing is downloaded")
    adapter_type: Literal["lora", "qlora"] = Field(default="lora", description="qlora: LoRA on a quantized base")
    train_steps: int = Field(default=200, gt=0)
    batch_size: int = Field(default=4, gt=0)
    lr: float = Field(default=1e-4, gt=0, description="learning rate")
    lora_rank: int = Field(default=8, gt=0)
    lora_scale: float = Field(default=20.0, gt=0, description="mlx-lm's scale (PEFT lora_alpha = scale × rank)")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    num_layers: int = Field(default=16, gt=0, description="adapt the last N transformer layers")
    eval_steps: int = Field(default=50, gt=0, description="validation loss every N steps")
    seed: int = 0
    max_seq_length: int = Field(default=2048, gt=0)
    time_cap_s: float = Field(default=3600.0, gt=0, description="stop training after this many seconds")
    allow_outside_workspace: bool = Field(
        default=False, description="let output_dir lie outside the workspace (an absolute path, or one with ..)")
    output_dir: str = Field(default="distill_out", description="adapters, data and reports go here")
    min_rows: int = Field(default=50, ge=1, description="collect refuses with fewer SFT rows than this")
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="held-out test share, by a hash of the task key")
    valid_fraction: float = Field(default=0.1, gt=0, lt=1, description="validation share, by a hash of the task key")
    decontam_ngram: int = Field(default=3, gt=0, description="decontamination compares prompts by their word n-grams")
    decontam_threshold: float = Field(
        default=0.8, gt=0, le=1, description="a held-out prompt with this share of its word n-grams in a training "
                                             "prompt moves (with its task) into training; the collect receipt "
                                             "reports the overlap left")
    loss_on: Literal["answer", "all"] = Field(
        default="answer", description="answer: the loss counts only the answer — from the first assistant turn "
                                      "after the last user message to the end (a tool call, its result, the final "
                                      "text); the system prompt, the tools offered and the question are context. "
                                      "all: every token")
    method: Literal["sft", "dpo"] = Field(
        default="sft", description="sft: learn the SFT export's answers; dpo: learn to prefer the chosen side of "
                                   "the preference export's pairs over the rejected (Direct Preference "
                                   "Optimization); `train run --method` overrides it")
    dpo_beta: float = Field(default=0.1, gt=0, description="DPO's β: how far the adapter may move from the reference")
    dpo_reference: Literal["promoted", "base"] = Field(
        default="promoted", description="the reference DPO starts from and is measured against: the promoted "
                                        "(SFT) adapter, continued, or the base model")
    safety_rehearsal: bool = Field(
        default=True, description="add refinery's safety rehearsal rows (declines of requests for credentials, "
                                  "destructive actions, personal data) to the training split: traces rarely hold "
                                  "refusals, and a LoRA without any unlearns the base's "
                                  "(refinery/training/rehearsal.py)")

    @model_validator(mode="after")
    def _fractions(self) -> DistillConfig:
        if self.test_fraction + self.valid_fraction >= 1:
            raise ValueError("test_fraction + valid_fraction must leave rows to train on")
        return self

    @field_validator("output_dir")
    @classmethod
    def _inside(cls, v: str, info: ValidationInfo) -> str:
        from refinery.workspace import setting_folder

        return setting_folder(v, allow_outside=bool(info.data.get("allow_outside_workspace")),
                              does="writes, archives and deletes adapters",
                              opt_in='"allow_outside_workspace": true')


def load_distill_config(workspace: Path, path: Path | None = None) -> DistillConfig:
    """`distill_config.json` of the workspace (or `path`); defaults when there is none."""
    cfg_path = path or workspace / CONFIG_FILE
    if path is not None and not cfg_path.is_file():
        raise DistillConfigError(f"{cfg_path}: no such config file")
    if not cfg_path.is_file():
        return DistillConfig()
    try:
        data = orjson.loads(cfg_path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise DistillConfigError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DistillConfigError(f"{cfg_path}: must be a JSON object")
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as e:
        raise DistillConfigError(format_errors(str(cfg_path), e)) from None


def base_model_dir(root: Path, dcfg: DistillConfig) -> Path:
    """The mlx-lm folder of the base model: `base_model` itself, or — for a `.gguf` file — its
    conversion under `<output_dir>/models/` (made on first use, reused while the file is the
    same). Raises GGUFError when the file cannot be converted."""
    path = root / dcfg.base_model
    if path.suffix.lower() != ".gguf":
        return path
    from refinery.training.from_gguf import convert

    return convert(path, root / dcfg.output_dir / "models")
