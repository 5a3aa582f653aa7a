"""SFT data: response masking, truncation, deterministic padded batches, loss normalisation, resume."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from minilm.checkpoint import load_checkpoint, model_state
from minilm.config import ModelConfig, TokenizerConfig, build
from minilm.errors import ConfigError, DataError
from minilm.lora import LoRAConfig, inject_lora, lora_layers, lora_state, mark_only_lora_trainable
from minilm.model import GPT
from minilm.sft import (DEFAULT_TEMPLATE, IGNORE, SFTBatches, SFTConfig, collate, encode_pairs,
                        eval_batches, response_loss)
from minilm.tokenizer import build_char_tokenizer, train_sentencepiece
from minilm.train import accumulate_gradients, train

PAIRS = [
    {"instruction": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"instruction": "Name a primary colour.", "response": "Red is a primary colour."},
    {"instruction": "How many days are in a week?", "response": "A week has seven days."},
    {"instruction": "Say hello.", "response": "Hello! How can I help you today?"},
    {"instruction": "What do bees make?", "response": "Bees make honey and wax."},
    {"instruction": "Give me a synonym for happy.", "response": "Joyful."},
    {"instruction": "What is two plus three?", "response": "Two plus three is five."},
    {"instruction": "Which planet is known as the red planet?",
     "response": "Mars is known as the red planet because of the iron oxide on its surface."},
    {"instruction": "Translate 'thank you' into French.", "response": "Merci."},
    {"instruction": "What is water made of?", "response": "Water is made of hydrogen and oxygen."},
    {"instruction": "Describe the sky on a clear day.", "response": "It is blue and bright."},
    {"instruction": "Who wrote Hamlet?", "response": "William Shakespeare wrote Hamlet."},
]
CTX = 160


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("chartok")
    text = DEFAULT_TEMPLATE + "\n".join(p["instruction"] + "\n" + p["response"] for p in PAIRS)
    (d / "text.txt").write_text(text, encoding="utf-8")
    return build_char_tokenizer(d / "text.txt", d / "char.json", TokenizerConfig(kind="char"))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("sptok")
    text = "\n".join(topics[k] for k in sorted(topics))[:60_000]
    (d / "text.txt").write_text(text, encoding="utf-8")
    cfg = TokenizerConfig(vocab_size=400, special_tokens=["### Instruction:", "### Response:"])
    return train_sentencepiece(d / "text.txt", d / "sp.model", cfg)


def tiny_model(vocab: int, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, context_length=CTX, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg))


def lora_model(vocab: int, base_state=None, *, dropout: float = 0.0, seed: int = 0) -> GPT:
    model = tiny_model(vocab, seed=0)
    if base_state is not None:
        model.load_state_dict(base_state, strict=False)
    torch.manual_seed(seed)
    inject_lora(model, LoRAConfig(rank=4, alpha=8, dropout=dropout))
    mark_only_lora_trainable(model)
    return model


# ---------------------------------------------------------------------------------------------- config


def test_sft_config_defaults_validate_and_inherit_the_training_loop_keys():
    cfg = build(SFTConfig, {"grad_accum": 2, "ema_decay": 0.9, "max_length": 64}, "sft")
    assert cfg.grad_accum == 2 and cfg.ema_decay == 0.9 and cfg.template == DEFAULT_TEMPLATE
    assert build(SFTConfig, {}, "sft").problems() == []


@pytest.mark.parametrize("data, expect", [
    ({"template": "Answer this: "}, "{instruction}"),
    ({"template": "{instruction} {context} ### Response:"}, "no other field"),
    ({"template": "### Instruction:\n{instruction}"}, "response marker"),
    ({"template": "{instruction} {"}, "literal braces"),
    ({"overlong": "cut"}, "sft.overlong"),
    ({"max_length": -1}, "max_length must be >= 0"),
    ({"max_lenght": 64}, "did you mean 'max_length'"),
])
def test_sft_config_problems_are_one_line_config_errors(data, expect):
    with pytest.raises(ConfigError) as err:
        build(SFTConfig, data, "sft")
    assert expect in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("which", ["char", "sp"])
def test_targets_are_exactly_the_response_and_eos(which, request):
    tok = request.getfixturevalue(f"{which}_tok")
    cfg = SFTConfig()
    ex = encode_pairs(PAIRS, tok, cfg, 512)
    assert len(ex) == len(PAIRS) and ex.truncated == ex.dropped == 0
    for pair, ids, labels, n_prompt in zip(PAIRS, ex.input_ids, ex.labels, ex.prompt_lengths):
        assert ids.dtype == labels.dtype == np.int64 and ids.shape == labels.shape
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[:n_prompt]) == cfg.prompt(pair["instruction"])
        targets = ids[labels != IGNORE]
        assert np.array_equal(labels[labels != IGNORE], targets)
        assert (labels[:n_prompt] == IGNORE).all() and (labels[n_prompt:] != IGNORE).all()
        assert targets[-1] == tok.eos_id and tok.decode(targets) == pair["response"]
        assert len(targets) == len(tok.encode(pair["response"])) + 1


def test_whole_sequence_training_targets_every_token_after_bos(char_tok):
    ex = encode_pairs(PAIRS, char_tok, SFTConfig(response_only=False), CTX)
    for ids, labels in zip(ex.input_ids, ex.labels):
        assert labels[0] == IGNORE and np.array_equal(labels[1:], ids[1:])
    masked = ex.response_only()
    full = encode_pairs(PAIRS, char_tok, SFTConfig(), CTX)
    assert all(np.array_equal(a, b) for a, b in zip(masked.labels, full.labels))


def test_dataframe_and_records_encode_alike_and_bad_rows_are_data_errors(char_tok):
    a = encode_pairs(pd.DataFrame(PAIRS), char_tok, SFTConfig(), CTX)
    b = encode_pairs(PAIRS, char_tok, SFTConfig(), CTX)
    assert all(np.array_equal(x, y) for x, y in zip(a.input_ids, b.input_ids))
    bad = [
        (pd.DataFrame({"prompt": ["hi"], "response": ["hello"]}),
         "the pairs table lacks column(s) ['instruction'] (it has ['prompt', 'response'])"),
        (pd.DataFrame({"instruction": ["hi", None], "response": ["hello", "x"]}),
         "pair 1: instruction must be text, got float (nan); fix or remove that pair"),   # pandas: None -> NaN
        ([{"instruction": "hi"}], "pair 0 is not a mapping with 'instruction' and 'response' keys"),
        ([{"instruction": "hi", "response": 3}], "pair 0: response must be text, got int (3)"),
        ([], "no instruction/response pairs to fine-tune on; add pairs to the SFT data"),
    ]
    for data, needle in bad:
        with pytest.raises(DataError) as err:
            encode_pairs(data, char_tok, SFTConfig(), CTX)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_overlong_examples_are_truncated_or_dropped_and_counted(char_tok):
    full = encode_pairs(PAIRS, char_tok, SFTConfig(), 512)
    lengths, prompts = full.lengths, np.array(full.prompt_lengths)
    limit = int(np.median(lengths)) - 1             # about half the examples are too long
    too_long = lengths > limit + 1
    no_room = prompts >= limit + 1                  # prompt alone fills the limit: nothing to learn
    assert too_long.any() and (too_long & ~no_room).any()

    cut = encode_pairs(PAIRS, char_tok, SFTConfig(max_length=limit), CTX)
    assert cut.total == len(PAIRS)
    assert cut.truncated == int((too_long & ~no_room).sum()) and cut.dropped == int(no_room.sum())
    assert cut.counts()["examples"] == len(PAIRS) - cut.dropped
    assert max(cut.lengths) <= limit + 1
    kept = [i for i in range(len(PAIRS)) if not no_room[i]]
    for j, i in enumerate(kept):                     # a truncated example is a prefix of the full one
        n = len(cut.input_ids[j])
        assert np.array_equal(cut.input_ids[j], full.input_ids[i][:n])
        assert np.array_equal(cut.labels[j], full.labels[i][:n])
        assert (cut.labels[j] != IGNORE).any()

    drop = encode_pairs(PAIRS, char_tok, SFTConfig(max_length=limit, overlong="drop"), CTX)
    assert drop.dropped == int(too_long.sum()) and drop.truncated == 0
    assert len(drop) == len(PAIRS) - drop.dropped

    with pytest.raises(DataError, match="dropped"):
        encode_pairs(PAIRS, char_tok, SFTConfig(max_length=4, overlong="drop"), CTX)
    with pytest.raises(ConfigError, match="context_length"):
        encode_pairs(PAIRS, char_tok, SFTConfig(max_length=CTX + 1), CTX)


# ---------------------------------------------------------------------------------------------- batching


def test_batches_are_deterministic_right_padded_and_cover_each_epoch(char_tok):
    ex = encode_pairs(PAIRS, char_tok, SFTConfig(), CTX)
    a = SFTBatches(ex, 3, seed=5, grad_accum=2)
    b = SFTBatches(ex, 3, seed=5, grad_accum=2)
    for step, micro in [(0, 0), (3, 1), (11, 0), (3, 1)]:
        xa, ya = a.batch(step, micro)
        xb, yb = b.batch(step, micro)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.dtype == ya.dtype == torch.int64
    assert not np.array_equal(a.indices(3, 0), a.indices(3, 1))
    assert not all(np.array_equal(a.indices(s, 0), SFTBatches(ex, 3, seed=6, grad_accum=2).indices(s, 0))
                   for s in range(4))
    with pytest.raises(ValueError, match=r"^micro must be in \[0, 2\), got 2$"):
        a.batch(0, 2)
    with pytest.raises(ValueError, match=r"^micro must be in \[0, 2\), got -1$"):
        a.batch(0, -1)

    per_epoch = a.batches_per_epoch
    assert per_epoch == math.ceil(len(ex) / 3)
    for epoch in range(3):
        seen = np.concatenate([a.indices(*divmod(g, 2)) for g in range(epoch * per_epoch,
                                                                      (epoch + 1) * per_epoch)])
        assert sorted(seen.tolist()) == list(range(len(ex)))

    for step in range(6):
        idx = a.indices(step, 1)
        x, y = a.batch(step, 1)
        assert x.shape == y.shape == (len(idx), max(len(ex.input_ids[i]) for i in idx) - 1)
        for row, i in enumerate(idx):
            n = len(ex.input_ids[i]) - 1
            assert torch.equal(x[row, :n], torch.from_numpy(ex.input_ids[i][:-1]))
            assert torch.equal(y[row, :n], torch.from_numpy(ex.labels[i][1:]))
            assert (x[row, n:] == char_tok.pad_id).all() and (y[row, n:] == IGNORE).all()
        assert a.tokens_per_batch((x, y)) == sum(len(ex.input_ids[i]) - 1 for i in idx)


def test_length_grouping_wastes_less_padding(char_tok):
    ex = encode_pairs(PAIRS, char_tok, SFTConfig(), CTX)

    def pad_share(batches: SFTBatches) -> float:
        xs = [batches.batch(s) for s in range(4 * batches.batches_per_epoch)]
        return sum(int((x == char_tok.pad_id).sum()) for x, _ in xs) / sum(x.numel() for x, _ in xs)

    assert pad_share(SFTBatches(ex, 4, seed=1)) < pad_share(SFTBatches(ex, 4, seed=1, group_batches=1))


# ---------------------------------------------------------------------------------------------- losses


def test_right_padding_does_not_change_the_response_loss(char_tok):
    ex = encode_pairs(PAIRS, char_tok, SFTConfig(response_only=False), CTX)
    model = tiny_model(char_tok.vocab_size)
    one = response_loss(model, ex, batch_size=1)
    padded = response_loss(model, ex, batch_size=5)
    assert one == pytest.approx(padded, rel=1e-5)
    # response_loss scores only response + EOS tokens, whatever the examples' own labels
    by_hand = response_loss(model, encode_pairs(PAIRS, char_tok, SFTConfig(), CTX), batch_size=len(PAIRS))
    assert one == pytest.approx(by_hand, rel=1e-5)
    assert len(eval_batches(ex, 5)) == math.ceil(len(ex) / 5)


def test_accumulation_normalises_over_all_response_tokens(char_tok):
    ex = encode_pairs(PAIRS, char_tok, SFTConfig(), CTX)
    targets = [int((lab != IGNORE).sum()) for lab in ex.labels]
    first, second = [1, 2], [7]                      # 2 + 1 examples with different target counts
    assert sum(targets[i] for i in first) != sum(targets[i] for i in second)
    model = lora_model(char_tok.vocab_size)
    for layer in lora_layers(model).values():        # a non-zero B so every adapter weight gets gradient
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    device = torch.device("cpu")

    def grads(micro):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, [(x, y, {}) for x, y in micro], device=device)
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    loss_acc, g_acc = grads([collate(ex, first), collate(ex, second)])
    loss_one, g_one = grads([collate(ex, first + second)])
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    for k in g_one:
        torch.testing.assert_close(g_acc[k], g_one[k], atol=1e-6, rtol=1e-4)


def test_lora_training_moves_only_the_adapter(char_tok, tmp_path):
    ex = encode_pairs(PAIRS, char_tok, SFTConfig(), CTX)
    model = lora_model(char_tok.vocab_size, dropout=0.05)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapter = {k: v.clone() for k, v in lora_state(model).items()}
    before = response_loss(model, ex)
    cfg = SFTConfig(max_steps=12, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.1,
                    eval_every=6, log_every=3, precision="fp32", seed=1)
    data = SFTBatches(ex, cfg.batch_size, cfg.seed)
    train(model, data, cfg, out_dir=tmp_path, eval_batches=eval_batches(ex, 6), save_state=lora_state,
          progress=False)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())            # bit-identical base
    assert all(not torch.equal(v, after[k]) for k, v in adapter.items())       # every A and B moved
    assert response_loss(model, ex) < before
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [(*data.batch(0), {})], device=torch.device("cpu"))
    grads = {k for k, p in model.named_parameters() if p.grad is not None}
    assert grads == set(adapter)
    ckpt = load_checkpoint(tmp_path / "best.safetensors")
    assert set(ckpt.model_state) == set(adapter)                               # the adapter only


class _Crash:
    """A batch source that fails at one step (a crashed run)."""

    def __init__(self, inner, at: int):
        self.inner, self.at = inner, at

    def batch(self, step, micro=0):
        if step == self.at:
            raise RuntimeError("simulated crash")
        return self.inner.batch(step, micro)


def test_sft_run_resumes_exactly_from_its_adapter_checkpoint(char_tok, tmp_path):
    ex = encode_pairs(PAIRS, char_tok, SFTConfig(), CTX)
    cfg = SFTConfig(max_steps=8, batch_size=3, grad_accum=2, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                    eval_every=3, log_every=2, precision="fp32", seed=3, weight_decay=0.01)
    base_state = model_state(tiny_model(char_tok.vocab_size))
    ev = eval_batches(ex, 6)

    def run(out, crash_at=None):
        model = lora_model(char_tok.vocab_size, base_state, dropout=0.1, seed=11)
        data = SFTBatches(ex, cfg.batch_size, cfg.seed, grad_accum=cfg.grad_accum)
        source = _Crash(data, crash_at) if crash_at is not None else data
        result = train(model, source, cfg, out_dir=out, eval_batches=ev, save_state=lora_state,
                       run_config={"sft": "test"}, progress=False, tokens_per_batch=data.tokens_per_batch)
        return model, result

    straight, _ = run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", crash_at=5)
    ckpt = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert ckpt.step == 3 and set(ckpt.model_state) == set(lora_state(straight))
    resumed, result = run(tmp_path / "b")
    assert result.resumed_from == 3 and result.step == 8
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in straight.state_dict().items())
    assert [r["step"] for r in result.throughput] == [r["step"] for r in result.history if "train_loss" in r]
    assert all(r["tokens_per_sec"] > 0 for r in result.throughput)
