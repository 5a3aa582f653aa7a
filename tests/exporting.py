"""Shared by the export tests: a small SentencePiece tokenizer like the pipeline's, tiny models, and
the test strings every tokenizer must split like minilm's."""

from __future__ import annotations

from pathlib import Path

import torch

from minilm.config import ModelConfig, TokenizerConfig
from minilm.model import GPT
from minilm.tokenizer import build_char_tokenizer, train_sentencepiece

SPECIALS = ["### Instruction:", "### Response:"]
TEXTS = [
    "The function returns a list.",
    "doubled  spaces,   three   and a trailing space ",
    " leading space and\ttabs\r\nwindows newline",
    "### Instruction:\nWhat is a list?\n\n### Response:\nA sequence.",
    "naïve café, Straße, ünïcödé — “quotes” ½ ×",
    "byte fallback: 日本語 🙂 ∮ ⊕ \u0007 \U0001f680",
    "def f(a, b):\n    return {'k': a ** b}  # ###Instruction: not a marker\n\n\n",
    "x" * 40,
    "",
]


def corpus(path: Path) -> Path:
    """~200 KB of English: Python's pydoc help topics."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    path.write_text(text[: text.rfind("\n", 0, 200_000) + 1], encoding="utf-8")
    return path


def sp_tokenizer(root: Path, *, model_type: str = "bpe", vocab_size: int = 1000):
    cfg = TokenizerConfig(model_type=model_type, vocab_size=vocab_size, special_tokens=SPECIALS)
    return train_sentencepiece(corpus(root / "corpus.txt"), root / f"{model_type}.model", cfg)


def char_tokenizer(root: Path):
    return build_char_tokenizer(corpus(root / "corpus.txt"), root / "char.json",
                                TokenizerConfig(kind="char", special_tokens=SPECIALS))


def tiny_model(vocab_size: int, seed: int = 0, **kw) -> GPT:
    """A small model with large enough weights that its logits are varied and well separated."""
    torch.manual_seed(seed)
    base = dict(vocab_size=vocab_size, context_length=128, n_layer=2, n_head=4, d_model=64, init_std=0.1)
    base.update(kw)
    model = GPT(ModelConfig(**base)).eval()
    if base.get("bias"):
        with torch.no_grad():                       # non-zero biases, so a dropped one would show
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


SHAPES = {   # name -> model keyword arguments: every attention layout, tied and untied, biases
    "mha-tied": dict(),
    "gqa-untied": dict(n_kv_head=2, tie_embeddings=False, rope_base=500.0, norm_eps=1e-6),
    "mqa-tied": dict(n_kv_head=1),
    "mqa-untied-bias": dict(n_kv_head=1, tie_embeddings=False, bias=True, ffn_hidden=96),
}


def trained_model(tokenizer, corpus_path: Path, steps: int = 40, **kw) -> GPT:
    """A tiny model trained briefly on ``corpus_path``: confident, text-like predictions (a random model's
    near-ties say little about how a quantized copy keeps its choices)."""
    ids = torch.tensor(tokenizer.encode(corpus_path.read_text(encoding="utf-8")[:150_000]))
    model = tiny_model(tokenizer.vocab_size, init_std=0.02, **kw).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    T = 48
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (8,), generator=g)
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
