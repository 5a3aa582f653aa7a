"""Evaluation metrics: loss in nats per token, perplexity, and bits per byte.

Bits per byte (nanochat's headline number) divides the total information by the *text* size instead of
the token count, so models with different tokenizers can be compared. It is exact: the summed loss over
the evaluated target tokens divided by the UTF-8 bytes those very tokens stand for
(``Tokenizer.token_bytes``: bos/eos/pad 0, a byte-fallback piece 1), times 1/ln 2. With the mean loss over
the same targets that is ``loss * tokens / bytes / ln 2``, where tokens and bytes are
:func:`target_counts` of the evaluated windows (not a whole-split ratio).
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def lm_metrics(loss: float, *, tokens: int | None = None, n_bytes: int | None = None) -> dict[str, float]:
    """``loss`` (mean nats per token) as loss / perplexity / bits-per-byte (when the token and byte
    counts of the evaluated text are known)."""
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if tokens and n_bytes:
        out["bits_per_byte"] = loss * tokens / n_bytes / math.log(2)
    return out


def target_counts(batches: Sequence[Sequence[Any]], token_bytes: Sequence[int]) -> tuple[int, int]:
    """(target tokens, the UTF-8 bytes they stand for) of evaluation batches ``(x, y[, kw])``; targets of
    -100 are ignored, as the loss ignores them."""
    import torch

    table = torch.as_tensor(list(token_bytes), dtype=torch.long)
    tokens = n_bytes = 0
    for b in batches:
        y = b[1][b[1] != -100].cpu()
        tokens += y.numel()
        n_bytes += int(table[y].sum())
    return tokens, n_bytes
