"""Evaluation metrics: loss in nats per token, perplexity, and bits per byte.

Bits per byte (nanochat's headline number) divides the total information by the *text* size instead of
the token count, so models with different tokenizers can be compared: bpb = loss * tokens / bytes / ln 2.
"""

from __future__ import annotations

import math
from typing import Any


def lm_metrics(loss: float, *, tokens: int | None = None, n_bytes: int | None = None) -> dict[str, float]:
    """``loss`` (mean nats per token) as loss / perplexity / bits-per-byte (when the token and byte
    counts of the evaluated text are known)."""
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if tokens and n_bytes:
        out["bits_per_byte"] = loss * tokens / n_bytes / math.log(2)
    return out


def split_bytes_per_token(meta: dict[str, Any], split: str = "val") -> tuple[int, int]:
    """(tokens, bytes) of one split of an encoded corpus (``minilm.data`` meta.json)."""
    return int(meta["tokens"][split]), int(meta["bytes"][split])
