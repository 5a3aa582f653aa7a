"""minilm: a compact GPT-style language-model toolkit."""

from .config import ModelConfig, SampleConfig, TokenizerConfig, TrainConfig
from .errors import MinilmError
from .model import GPT, KVCache

__version__ = "0.1.0"
__all__ = ["GPT", "KVCache", "ModelConfig", "TrainConfig", "SampleConfig", "TokenizerConfig", "MinilmError"]
