"""Export to transformers: the exported LlamaForCausalLM computes what minilm computes.

This is the parity test against an independent implementation: same logits (fp32, tight tolerance) for
multi-head and grouped-query attention, tied and untied embeddings, with and without bias; the same
greedy tokens from both generate loops; and the refusals for what Llama cannot represent.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from minilm.config import ModelConfig, SampleConfig  # noqa: E402
from minilm.errors import ConfigError  # noqa: E402
from minilm.hf import to_transformers, to_transformers_config  # noqa: E402
from minilm.lora import LoRAConfig, inject_lora, merged_model  # noqa: E402
from minilm.model import GPT  # noqa: E402
from minilm.sampling import generate_ids  # noqa: E402

VOCAB = 97


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, context_length=64, n_layer=2, n_head=4, d_model=64, init_std=0.1)
    base.update(kw)
    return GPT(ModelConfig(**base)).eval()


@pytest.mark.parametrize("n_kv_head", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_match(n_kv_head, tie):
    model = tiny(n_kv_head=n_kv_head, tie_embeddings=tie, rope_base=500.0, norm_eps=1e-6)
    hf = to_transformers(model)
    assert hf.config.num_key_value_heads == model.config.kv_heads
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    x = torch.randint(0, VOCAB, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    assert ours.abs().max() > 0.5                    # far from trivially equal
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_logits_match_with_bias_and_explicit_ffn():
    model = tiny(bias=True, ffn_hidden=96)
    with torch.no_grad():
        for p in model.parameters():                 # non-zero biases, so dropping one would show
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf = to_transformers(model)
    assert hf.config.intermediate_size == 96 and hf.config.attention_bias and hf.config.mlp_bias
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), rtol=1e-5, atol=1e-5)


def test_export_is_a_copy_in_the_same_mode():
    model = tiny().train()
    hf = to_transformers(model)
    assert hf.training
    with torch.no_grad():
        hf.model.layers[0].self_attn.q_proj.weight.zero_()
    assert model.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0


@pytest.mark.parametrize("n_kv_head", [None, 2], ids=["mha", "gqa"])
def test_greedy_generation_matches(n_kv_head):
    model = tiny(n_kv_head=n_kv_head, init_std=0.3)   # larger weights: varied, well-separated logits
    hf = to_transformers(model)
    prompts = [[5, 17, 42, 8, 3, 61], [11, 12, 90, 4, 4, 7]]
    n = 30
    cfg = SampleConfig(temperature=0.0, top_p=1.0, repetition_penalty=1.0, ban_window=0,
                       min_new_tokens=n, max_new_tokens=n, seed=None)
    ours = generate_ids(model, prompts, cfg, eos_id=None)
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 6, dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                          pad_token_id=0)
    theirs = out[:, 6:].tolist()
    assert min(len(set(row)) for row in ours) > 10    # not one token repeated
    assert ours == theirs


def test_config_mapping():
    cfg = ModelConfig(vocab_size=300, context_length=128, n_layer=3, n_head=6, n_kv_head=3, d_model=96,
                      rope_base=1234.0, norm_eps=1e-6, tie_embeddings=False, bias=True)
    hc = to_transformers_config(cfg)
    assert hc["num_key_value_heads"] == 3 and hc["intermediate_size"] == cfg.hidden_dim
    assert hc["rope_theta"] == 1234.0 and hc["rms_norm_eps"] == 1e-6
    assert hc["tie_word_embeddings"] is False and hc["attention_bias"] and hc["mlp_bias"]
    assert hc["max_position_embeddings"] == 128 and hc["vocab_size"] == 300 and hc["head_dim"] == 16


def test_parallel_layout_is_refused():
    with pytest.raises(ConfigError, match="no parallel layout") as err:
        to_transformers(tiny(block="parallel"))
    assert "\n" not in str(err.value)


def test_layernorm_is_refused():
    with pytest.raises(ConfigError, match="RMSNorm"):
        to_transformers_config(ModelConfig(vocab_size=10, norm="layernorm"))


def test_lora_model_must_be_merged_first():
    model = tiny()
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=["all-linear"]))
    with pytest.raises(ConfigError, match="merged_model"):
        to_transformers(model)
    torch.manual_seed(1)
    for layer in model.modules():        # a trained adapter (B != 0): with B = 0 "merged" is the base
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    x = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        base = tiny()(x)
        with_adapter = model(x)
        assert (with_adapter - base).abs().max() > 0.1          # the adapter changes the logits...
        torch.testing.assert_close(to_transformers(merged_model(model))(input_ids=x).logits, with_adapter,
                                   rtol=1e-5, atol=1e-5)         # ...and the exported model has it
