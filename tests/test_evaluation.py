"""Exact bits per byte: each evaluated target token counts the UTF-8 bytes it stands for, so the figure
is the summed loss over the text's real size, and tokenizers of different granularity compare."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minilm.config import ModelConfig, TokenizerConfig, TrainConfig
from minilm.data import LMBatches
from minilm.evaluation import lm_metrics, target_counts
from minilm.model import GPT, lm_loss
from minilm.tokenizer import train_tokenizer
from minilm.train import evaluate_loss, train

# prose with multi-byte characters (2-, 3- and 4-byte UTF-8) that a small vocabulary covers only with
# byte-fallback pieces
EXTRA = "naïve café — “quoted” 日本 🙂 déjà vu\n"


@pytest.fixture(scope="module")
def text():
    from pydoc_data.topics import topics

    body = "\n".join(topics[k] for k in sorted(topics))[:120_000]
    return "".join(line + ("\n" + EXTRA if i % 40 == 0 else "\n") for i, line in enumerate(body.splitlines()))


@pytest.fixture(scope="module", params=["sentencepiece", "char"])
def tok(request, text, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    cfg = TokenizerConfig(kind=request.param, vocab_size=600, character_coverage=0.995,
                          special_tokens=["### Response:"])
    name = "tok.model" if request.param == "sentencepiece" else "tok.json"
    return train_tokenizer(root / "corpus.txt", root / name, cfg)


def test_each_window_counts_the_bytes_of_its_decoded_text(tok, text):
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size
    assert table[tok.bos_id] == table[tok.eos_id] == table[tok.pad_id] == 0
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    assert sum(table[i] for i in ids) == len(text.encode())
    rng = np.random.default_rng(0)
    checked = 0
    for start in rng.integers(0, len(ids) - 64, 200):
        window = ids[start:start + 64]
        decoded = tok.decode(window.tolist())
        if "\ufffd" in decoded:       # the window cuts a character's byte pieces: no whole text to compare
            continue
        assert sum(table[i] for i in window) == len(decoded.encode()), decoded
        checked += 1
    assert checked > 150
    special = tok.token_id("### Response:")
    assert table[special] == len(b"### Response:")


def test_target_counts_skip_ignored_targets_and_weigh_byte_pieces(tok):
    ids = tok.encode("é🙂 ab")
    y = torch.tensor([ids + [-100, -100]])
    tokens, n_bytes = target_counts([(y, y)], tok.token_bytes())
    assert (tokens, n_bytes) == (len(ids), len("é🙂 ab".encode()))


def test_bits_per_byte_is_the_summed_loss_over_the_evaluated_bytes(tok, text):
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layer=1, n_head=2, d_model=32))
    windows = LMBatches(ids, 4, 32, seed=0).eval_batches(3, seed=0)
    loss = evaluate_loss(model, windows, device=torch.device("cpu"))
    tokens, n_bytes = target_counts(windows, tok.token_bytes())
    by_hand_nats = by_hand_bytes = 0.0
    with torch.no_grad():
        for x, y in windows:
            per_token = lm_loss(model.eval()(x), y, reduction="none").flatten()
            for t, nats in zip(y.flatten().tolist(), per_token.tolist()):
                by_hand_nats += nats
                by_hand_bytes += len(tok.decode([t]).encode()) if tok.token_bytes()[t] else 0
    bpb = lm_metrics(loss, tokens=tokens, n_bytes=n_bytes)["bits_per_byte"]
    if "\ufffd" not in tok.decode(np.concatenate([y.flatten() for _, y in windows]).tolist()):
        assert bpb == pytest.approx(by_hand_nats / by_hand_bytes / math.log(2), rel=1e-5)
    assert bpb == pytest.approx(by_hand_nats / n_bytes / math.log(2), rel=1e-5)


@pytest.fixture(scope="module")
def trained_bpb(text, tmp_path_factory):
    """Validation bits per byte of a small model trained 150 steps on the same text, per tokenizer kind."""
    out = {}
    for kind, vocab in (("sentencepiece", 600), ("char", 0)):
        root = tmp_path_factory.mktemp("bpb-" + kind)
        (root / "corpus.txt").write_text(text, encoding="utf-8")
        tok = train_tokenizer(root / "corpus.txt", root / ("t.model" if vocab else "t.json"),
                              TokenizerConfig(kind=kind, vocab_size=vocab or 600))
        ids = np.asarray(tok.encode(text), dtype=np.uint16)
        cut = int(len(ids) * 0.9)
        ctx = 64 if vocab else 192        # the same ~text span per window for both
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=ctx, n_layer=2, n_head=2,
                                d_model=64))
        cfg = TrainConfig(max_steps=150, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=150,
                          eval_batches=4, log_every=50, precision="fp32", seed=0)
        windows = LMBatches(ids[cut:], 8, ctx, seed=0).eval_batches(4, seed=0)
        result = train(model, LMBatches(ids[:cut], 8, ctx, seed=0), cfg, out_dir=root / "run",
                       eval_batches=windows, progress=False)
        tokens, n_bytes = target_counts(windows, tok.token_bytes())
        out[kind] = lm_metrics(result.last_val_loss, tokens=tokens, n_bytes=n_bytes)
    return out


def test_char_and_bpe_tokenizers_give_comparable_bits_per_byte(trained_bpb):
    bpe, char = trained_bpb["sentencepiece"], trained_bpb["char"]
    # per token the two differ several-fold; per byte they measure the same thing
    assert bpe["loss"] > 1.5 * char["loss"]
    assert 0.6 < bpe["bits_per_byte"] / char["bits_per_byte"] < 1.6
    assert all(1.0 < m["bits_per_byte"] < 6.0 for m in (bpe, char))
