"""The compiled static-shape decode step (``SampleConfig.compile``, minilm.decode): the same tokens as the
eager KV-cache loop (greedy in fp32, bf16 and int8, seeded sampling with every control, left-padded
batches, eos and stop strings), and one compilation per shape, never one per token.

Compiling costs seconds on a CPU, so the module keeps to a few shapes (a tiny model, cache length 64) and
reuses each compiled graph across tests."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from minilm.config import ModelConfig, SampleConfig
from minilm.decode import StaticDecoder, cache_length, decode_step
from minilm.model import GPT, KVCache
from minilm.quant import quantize_int8
from minilm.sampling import generate_ids

V, EOS = 67, 66
GREEDY = SampleConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, ban_window=0,
                      no_repeat_ngram=0, min_new_tokens=0, max_new_tokens=20, stop=[], seed=0)
SAMPLED = SampleConfig(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, ban_window=3,
                       no_repeat_ngram=2, min_new_tokens=5, max_new_tokens=20, stop=[], seed=7)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = {"vocab_size": V, "context_length": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32,
           "ffn_hidden": 64, "init_std": 0.3}
    return GPT(ModelConfig(**{**cfg, **kw})).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, GPT]:
    fp32 = tiny()
    return {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16),
            "int8": quantize_int8(copy.deepcopy(fp32), torch.bfloat16)}


def prompts_of(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V - 1, (n,), generator=g).tolist() for n in lengths]


def both(model, prompts, cfg, **kw) -> tuple[list[list[int]], list[list[int]]]:
    eager = generate_ids(model, prompts, cfg, **kw)
    fast = generate_ids(model, prompts, dataclasses.replace(cfg, compile=True), **kw)
    return eager, fast


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_the_uncompiled_step_equals_the_model_forward():
    """decode_step itself (eager) over the static cache gives GPT.forward's logits, GQA and padding too."""
    model = tiny(block="parallel", n_kv_head=1)
    prompts = prompts_of([5, 9])
    P = 9
    tokens = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts]).bool()
    with torch.inference_mode():
        ref_cache, cache = KVCache(model.config, 2, 16), KVCache(model.config, 2, 16)
        model(tokens, cache=ref_cache, attention_mask=mask)
        model(tokens, cache=cache, attention_mask=mask)
        step = StaticDecoder(model, cache, compile=False)
        for t in range(7):
            nxt = torch.tensor([3 + t, 40 - t])
            ref = model(nxt[:, None], cache=ref_cache)[:, -1]
            torch.testing.assert_close(step(nxt), ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="full"):
            step(nxt)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_greedy_decoding_gives_the_eager_tokens(models, precision):
    eager, fast = both(models[precision], prompts_of([6]), GREEDY, eos_id=None)
    assert fast == eager and len(fast[0]) == GREEDY.max_new_tokens


def test_int8_compiled_logits_equal_the_eager_ones_up_to_bf16_rounding(models):
    """int8 weights with bf16 activations: inductor keeps fused intermediates in fp32 where eager rounds
    each op to bf16, so logits differ by bf16 rounding (as two eager bf16 kernels do) and a greedy run can
    part ways at a near tie. Teacher-forced on the same tokens, the two agree within that rounding."""
    model = models["int8"]
    tokens = prompts_of([30], seed=3)[0]
    with torch.inference_mode():
        ref_cache, cache = (KVCache(model.config, 1, 64, dtype=torch.bfloat16) for _ in range(2))
        model(torch.tensor([tokens[:4]]), cache=ref_cache)
        model(torch.tensor([tokens[:4]]), cache=cache)
        step, same = StaticDecoder(model, cache), 0
        for t in tokens[4:]:
            nxt = torch.tensor([t])
            ref, got = model(nxt[:, None], cache=ref_cache)[:, -1].float(), step(nxt)
            assert (got - ref).abs().max() < 0.05 * ref.abs().max()
            same += int(got.argmax() == ref.argmax())
    assert same >= 0.8 * (len(tokens) - 4)


def test_left_padded_batches_give_the_eager_tokens(models):
    eager, fast = both(models["fp32"], prompts_of([3, 11, 7]), GREEDY, eos_id=None)
    assert fast == eager


def test_seeded_sampling_with_every_control_gives_the_eager_tokens(models):
    eager, fast = both(models["fp32"], prompts_of([3, 11, 7]), SAMPLED, eos_id=EOS)
    assert fast == eager


def test_eos_and_stop_strings_end_rows_as_the_eager_loop_does(models):
    decode = lambda ids: "".join(chr(65 + i % 26) for i in ids)
    cfg = dataclasses.replace(SAMPLED, min_new_tokens=0, temperature=1.5, stop=["Q"])
    eager, fast = both(models["fp32"], prompts_of([3, 11, 7]), cfg, eos_id=EOS, decode=decode)
    assert fast == eager
    assert any(len(r) < cfg.max_new_tokens for r in fast)    # something did stop early


def test_one_compilation_per_shape_none_per_token(models):
    model, prompts = models["fp32"], prompts_of([6])
    generate_ids(model, prompts, dataclasses.replace(GREEDY, compile=True), eos_id=None)   # compiled (B=1, S=64)
    before = graphs()
    for n in (5, 20, 40):   # prompt + n rounds up to the same static cache length: no new graph
        assert cache_length(6 + n, 64) == 64
        generate_ids(model, prompts, dataclasses.replace(GREEDY, compile=True, max_new_tokens=n), eos_id=None)
    assert graphs() == before


def test_the_step_compiles_without_graph_breaks(models):
    """fullgraph=True would raise on a graph break; explain() counts them for the record."""
    model = models["fp32"]
    with torch.inference_mode():
        cache = KVCache(model.config, 1, 64)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        d = StaticDecoder(model, cache, compile=False)
        args = (model, d.kv, d.key_mask, torch.tensor([[4]]), d.slot, d.positions)
        report = torch._dynamo.explain(decode_step)(*args)
    assert report.graph_break_count == 0 and report.graph_count == 1


def test_minilm_sample_has_a_compile_flag():
    from minilm.cli import sample_config, sample_parser

    base = ["--ckpt", "c", "--tokenizer", "t"]
    assert sample_config(sample_parser().parse_args([*base, "--compile"]), 0).compile is True
    assert sample_config(sample_parser().parse_args(base), 0).compile is False
