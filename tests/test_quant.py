"""Weight-only int8 decoding: the quantised layer computes x @ dequantised(w).T, a quantised trained model
keeps its greedy choices and its loss, and every decoding entry point (minilm-sample, the generate stage's
params, serving's params) accepts it."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from minilm.config import ModelConfig, SampleConfig, TokenizerConfig, TrainConfig
from minilm.data import LMBatches
from minilm.model import GPT, KVCache
from minilm.precision import cpu_supports_bf16, for_decoding
from minilm.quant import Int8Linear, quantize_int8, quantize_rows, weight_bytes
from minilm.sampling import generate_ids
from minilm.tokenizer import train_tokenizer
from minilm.train import evaluate_loss, train


def test_rows_quantise_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]     # rows of very different scales
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (48,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(1) == 127).all()          # each row uses its full range


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_computes_the_product_with_the_dequantised_weight(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias)
    layer = Int8Linear(linear, torch.float32)
    x = torch.randn(3, 5, 64)
    want = nn.functional.linear(x, layer.dequantized(), None if linear.bias is None else linear.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert not list(layer.parameters())             # frozen: nothing to train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained briefly on Python's own docs, so that its greedy choices mean something."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))[:150_000]
    root = tmp_path_factory.mktemp("quant")
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer(root / "corpus.txt", root / "tok.model", TokenizerConfig(vocab_size=512))
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    cut = int(0.9 * len(ids))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=64, n_layer=2, n_head=4, n_kv_head=2,
                            d_model=96))
    cfg = TrainConfig(max_steps=150, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=150,
                      eval_batches=2, log_every=100, precision="fp32", seed=0)
    train(model, LMBatches(ids[:cut], 16, 64, seed=0), cfg, out_dir=root / "run", progress=False)
    return model.eval(), tok, LMBatches(ids[cut:], 16, 64, seed=1).eval_batches(8, seed=1)


def test_a_quantised_model_keeps_its_loss_and_its_greedy_choices(trained):
    model, tok, val = trained
    q = quantize_int8(copy.deepcopy(model), torch.float32)
    assert all(isinstance(m, Int8Linear) for m in (q.lm_head, q.model.layers[0].self_attn.q_proj))
    cpu = torch.device("cpu")
    ref_loss, q_loss = evaluate_loss(model, val, device=cpu), evaluate_loss(q, val, device=cpu)
    assert ref_loss < math.log(tok.vocab_size) - 1.5             # the model did learn something
    assert abs(q_loss - ref_loss) < 0.01 * ref_loss, (q_loss, ref_loss)
    x = torch.cat([b[0] for b in val])
    with torch.no_grad():
        agree = (model(x).argmax(-1) == q(x).argmax(-1)).float().mean().item()
    assert agree > 0.95, agree


def test_int8_decoding_with_the_kv_cache_equals_its_own_full_forward(trained):
    model, tok, _ = trained
    q = quantize_int8(copy.deepcopy(model), torch.float32)
    prompt = tok.encode("The for statement")
    cfg = SampleConfig(temperature=0.0, min_new_tokens=12, max_new_tokens=12, repetition_penalty=1.0,
                       ban_window=0)
    got = generate_ids(q, [prompt], cfg, eos_id=None, device=torch.device("cpu"))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(q(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]
    cache = KVCache(q.config, 1, 64, dtype=torch.float32)
    with torch.no_grad():
        step = q(torch.tensor([seq[:5]]), cache=cache)
    assert step.dtype == torch.float32 and cache.pos == 5


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_int8_weights_decode_in_bf16_where_the_cpu_has_it(trained):
    model, _, val = trained
    q = for_decoding(copy.deepcopy(model), "int8", torch.device("cpu"))
    assert q.model.embed_tokens.weight.dtype == torch.bfloat16 and q.lm_head.scale.dtype == torch.bfloat16
    loss = evaluate_loss(q, val, device=torch.device("cpu"))
    assert abs(loss - evaluate_loss(model, val, device=torch.device("cpu"))) < 0.03


def test_int8_weights_are_about_a_quarter_of_fp32s_bytes():
    model = GPT(ModelConfig(vocab_size=256, context_length=32, n_layer=4, n_head=4, d_model=256))
    fp32 = weight_bytes(model)
    q = quantize_int8(copy.deepcopy(model), torch.float32)
    # the linear layers shrink 4x; the embedding table and norms stay fp32
    embedding = 256 * 256 * 4
    assert weight_bytes(q) - embedding < 0.27 * (fp32 - embedding)


def test_every_decoding_entry_point_accepts_int8(tmp_path, trained, capsys):
    from minilm.checkpoint import save_checkpoint
    from minilm.cli import sample_main
    from minilm.serve import ServeConfig
    from minilm.schema import build
    from stages.params import GenerateConfig

    model, tok, _ = trained
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, extra={"tokenizer_sha256": tok.hash})
    assert sample_main(["--ckpt", str(ckpt), "--tokenizer", str(tok.path), "--prompt", "The for",
                        "--precision", "int8", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    assert "The for" in capsys.readouterr().out
    assert build(GenerateConfig, {"precision": "int8"}, "generate").precision == "int8"
    assert build(ServeConfig, {"precision": "int8"}, "serve").precision == "int8"
