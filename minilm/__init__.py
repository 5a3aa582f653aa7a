"""minilm: a compact GPT-style language-model toolkit."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig, SampleConfig, TokenizerConfig, TrainConfig
from .errors import MinilmError

__version__ = "0.1.0"
__all__ = ["GPT", "KVCache", "ModelConfig", "TrainConfig", "SampleConfig", "TokenizerConfig", "MinilmError"]


def __getattr__(name: str) -> Any:
    """``minilm.GPT`` / ``minilm.KVCache`` load torch on first use, so configs import without it."""
    if name in ("GPT", "KVCache"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'minilm' has no attribute {name!r}")
