"""params.yaml as typed sections: every section and key is validated with a one-line message.

Each pipeline stage reads a few sections; :func:`load_params` validates the *whole* file, so a typo
anywhere is caught the first time any stage runs, with the closest valid name suggested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from minilm.config import (DataConfig, LoRAConfig, ModelConfig, Precision, SampleConfig, SFTConfig,
                           TokenizerConfig, TrainConfig)
from minilm.errors import ConfigError
from minilm.schema import build, load_yaml, suggest

from .tracking import TrackingConfig


@dataclass
class ProjectConfig:
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    progress: bool = True              # progress bars

    def problems(self) -> list[str]:
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            return [f"device must be auto, cpu or cuda[:N], got {self.device!r}"]
        return []


@dataclass
class EncodeConfig:
    val_fraction: float = 0.05         # last fraction of the corpus (by bytes) held out for validation
    invalid_utf8: Literal["error", "replace"] = "error"

    def problems(self) -> list[str]:
        if not 0.0 < self.val_fraction < 0.5:
            return [f"val_fraction must be in (0, 0.5), got {self.val_fraction}"]
        return []


@dataclass
class EvaluateConfig:
    batches: int = 40                  # fixed validation batches (seeded) for loss / perplexity
    batch_size: int = 16
    seed: int = 0
    sft_pairs: int = 0                 # held-out SFT pairs scored for response loss; 0 = all

    def problems(self) -> list[str]:
        p = [f"{k} must be > 0, got {getattr(self, k)}" for k in ("batches", "batch_size")
             if getattr(self, k) <= 0]
        if self.sft_pairs < 0:
            p.append(f"sft_pairs must be >= 0 (0 = all), got {self.sft_pairs}")
        return p


@dataclass
class GenerateConfig(SampleConfig):
    prompts: list[str] = field(default_factory=lambda: ["The"])
    sft_questions: int = 8             # held-out SFT instructions answered by the fine-tuned model
    precision: Precision = "auto"      # weights while decoding: auto (bf16 where native) | fp32 | bf16 | fp16

    def problems(self) -> list[str]:
        p = super().problems()
        if not self.prompts:
            p.append("prompts must list at least one prompt")
        if self.sft_questions < 0:
            p.append(f"sft_questions must be >= 0, got {self.sft_questions}")
        return p


def _sections() -> dict[str, type]:
    return {
        "project": ProjectConfig,
        "mlflow": TrackingConfig,
        "data": DataConfig,
        "tokenizer": TokenizerConfig,
        "encode": EncodeConfig,
        "model": ModelConfig,
        "pretrain": TrainConfig,
        "lora": LoRAConfig,
        "sft": SFTConfig,
        "evaluate": EvaluateConfig,
        "generate": GenerateConfig,
    }


@dataclass
class Params:
    project: ProjectConfig
    mlflow: Any
    data: Any
    tokenizer: TokenizerConfig
    encode: EncodeConfig
    model: ModelConfig
    pretrain: TrainConfig
    lora: Any
    sft: Any
    evaluate: EvaluateConfig
    generate: GenerateConfig
    raw: dict[str, Any]
    path: Path

    def section(self, name: str) -> dict[str, Any]:
        """The section as written in the file (for logging the params a stage read)."""
        return dict(self.raw.get(name) or {})


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    raw = load_yaml(path)
    sections = _sections()
    problems: list[str] = []
    for name in raw:
        if name not in sections:
            problems.append(f"unknown section {name!r}{suggest(str(name), sections)}; valid sections: "
                            f"{', '.join(sections)}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        try:
            built[name] = build(cls, raw.get(name), name, source=str(path))
        except ConfigError as err:
            problems.append(str(err).split(": ", 1)[1])
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    ctx = built["model"].context_length
    if built["sft"].max_length > ctx:
        problems.append(f"sft.max_length ({built['sft'].max_length}) is longer than the model supports "
                        f"(model.context_length = {ctx}); lower it or set 0 (= the context length)")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return Params(**built, raw=raw, path=path)
