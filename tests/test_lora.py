"""LoRA: injection, merging, adapter files (PEFT layout), and their one-line errors."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

from minilm.checkpoint import load_model_state, model_state
from minilm.config import ModelConfig, build
from minilm.errors import CheckpointError, ConfigError
from minilm.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_adapter, save_adapter
from minilm.lora import (LoRAConfig, LoRALinear, inject_lora, lora_layers, lora_state, mark_only_lora_trainable,
                         merge_lora, merge_state_dict, merged_model, trainable_report, unmerge_lora)
from minilm.model import GPT

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHA = "ab" * 32


def tiny_config(**kw) -> ModelConfig:
    cfg = dict(vocab_size=64, context_length=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    cfg.update(kw)
    return ModelConfig(**cfg)


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**kw)).eval()


def tokens(seed: int = 1, shape=(3, 20)) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def with_lora(base: GPT, cfg: LoRAConfig, *, seed: int = 2, b_std: float = 0.05) -> GPT:
    """A copy of ``base`` with LoRA injected and a non-zero B (so merges have something to merge)."""
    model = GPT(base.config)
    load_model_state(model, model_state(base))
    torch.manual_seed(seed)
    inject_lora(model, cfg)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=b_std)
    return model.eval()


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------- config


def test_lora_config_is_validated_with_one_line_errors():
    assert build(LoRAConfig, {}, "lora").targets == ATTN
    cases = [({"ranl": 8}, "did you mean 'rank'"), ({"rank": 0}, "rank must be > 0"),
             ({"alpha": -1}, "alpha must be > 0"), ({"dropout": 1.0}, "dropout must be in [0, 1)"),
             ({"targets": []}, "at least one"), ({"targets": ["all-linear", "q_proj"]}, "only entry"),
             ({"targets": ["q_proj", "q_proj"]}, "duplicates"), ({"rslora": "yes"}, "true/false")]
    for data, expect in cases:
        with pytest.raises(ConfigError) as err:
            build(LoRAConfig, data, "lora")
        assert expect in one_line(err)


# ---------------------------------------------------------------------------------------------- injection


def test_a_fresh_adapter_leaves_outputs_unchanged():
    base, x = tiny(), tokens()
    ref = base(x)
    torch.manual_seed(5)
    inject_lora(base, LoRAConfig(targets=["all-linear"], dropout=0.1))
    layer = next(iter(lora_layers(base).values()))
    assert (layer.lora_B.weight == 0).all() and layer.lora_A.weight.abs().sum() > 0
    assert torch.equal(base(x), ref)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("targets, per_layer", [(ATTN, 4), (["all-linear"], 7), (["mlp.up_proj"], 1)])
def test_injection_wraps_only_block_linears_and_keeps_parameter_names(tie, targets, per_layer):
    model = tiny(tie_embeddings=tie)
    plain_keys = set(model.state_dict())
    names = inject_lora(model, LoRAConfig(targets=targets))
    assert len(names) == per_layer * model.config.n_layer
    assert all(n.startswith("model.layers.") for n in names) and sorted(names) == sorted(lora_layers(model))
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    keys = set(model.state_dict())
    assert plain_keys <= keys                                       # the base names are unchanged
    assert {k.rsplit(".", 2)[-2] for k in keys - plain_keys} == {"lora_A", "lora_B"}
    # so a base state dict loads into the LoRA model as it is
    result = model.load_state_dict(model_state(tiny(seed=3, tie_embeddings=tie)), strict=False)
    assert not result.unexpected_keys
    assert {k for k in result.missing_keys if k != "lm_head.weight"} == keys - plain_keys


def test_targets_that_match_nothing_are_config_errors_listing_the_valid_names():
    for targets, bad in [(["qkv"], "qkv"), (["q_proj", "typo_proj"], "typo_proj"), (["lm_head"], "lm_head"),
                         (["embed_tokens"], "embed_tokens")]:
        with pytest.raises(ConfigError) as err:
            inject_lora(tiny(), LoRAConfig(targets=targets))
        msg = one_line(err)
        assert bad in msg and " ".join(ALL) in msg


def test_trainable_report_counts_exactly_the_adapter():
    model = tiny()
    n_base = model.num_parameters()
    inject_lora(model, LoRAConfig(rank=4, targets=["all-linear"]))
    mark_only_lora_trainable(model)
    expected = sum(4 * (layer.in_features + layer.out_features) for layer in lora_layers(model).values())
    report = trainable_report(model)
    assert report == {"trainable": expected, "total": n_base + expected,
                      "share": pytest.approx(expected / (n_base + expected))}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state(model))


def test_rslora_scales_by_alpha_over_sqrt_rank():
    base = tiny()
    for rslora, scaling in [(False, 8 / 4), (True, 8 / math.sqrt(4))]:
        cfg = LoRAConfig(rank=4, alpha=8, rslora=rslora)
        model = with_lora(base, cfg)
        layer = model.model.layers[0].self_attn.q_proj
        assert cfg.scaling == layer.scaling == pytest.approx(scaling)
        merged = merge_state_dict(model_state(base), lora_state(model), cfg)
        q = "model.layers.0.self_attn.q_proj.weight"
        delta = merged[q] - model_state(base)[q]
        torch.testing.assert_close(delta, scaling * layer.lora_B.weight @ layer.lora_A.weight,
                                   atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("targets, kw", [(ATTN, {}), (["all-linear"], {}),
                                         (["all-linear"], {"bias": True, "norm": "layernorm"}),
                                         (ATTN, {"block": "parallel", "tie_embeddings": False})])
def test_merge_matches_unmerged_outputs_is_idempotent_and_unmerge_restores(targets, kw):
    base, x = tiny(**kw), tokens()
    base_weights = clone(model_state(base))
    model = with_lora(base, LoRAConfig(rank=4, alpha=8, targets=targets, rslora=True))
    unmerged = model(x)
    assert not torch.allclose(unmerged, base(x), atol=1e-3)          # B != 0: the adapter matters

    assert merge_lora(model) == len(targets if targets != ["all-linear"] else ALL) * 2
    merged_once = clone(model_state(model))
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    merge_lora(model)                                                # twice changes nothing
    assert all(torch.equal(v, model_state(model)[k]) for k, v in merged_once.items())

    unmerge_lora(model)
    unmerge_lora(model)
    now = model_state(model)
    for k, v in base_weights.items():
        torch.testing.assert_close(now[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_a_merged_layer_refuses_to_train():
    model = with_lora(tiny(), LoRAConfig())
    mark_only_lora_trainable(model)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        model.train()(tokens())


def test_merged_state_dict_loads_strictly_into_a_plain_gpt_with_the_same_logits():
    base, x = tiny(), tokens()
    base_state = clone(model_state(base))
    cfg = LoRAConfig(rank=4, alpha=16, targets=["all-linear"])
    model = with_lora(base, cfg)
    expected = model(x)

    adapter = lora_state(model)
    merged = merge_state_dict(base_state, adapter, cfg)
    assert all(torch.equal(v, base_state[k]) for k, v in model_state(base).items())   # inputs untouched
    assert set(merged) == set(base_state)
    plain = GPT(base.config).eval()
    load_model_state(plain, merged, strict=True)
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)

    rng = torch.get_rng_state()
    out = merged_model(model).eval()
    assert torch.equal(torch.get_rng_state(), rng)
    assert type(out) is GPT and not lora_layers(out) and lora_layers(model)
    torch.testing.assert_close(out(x), expected, atol=1e-5, rtol=1e-5)
    merge_lora(model)                                                # from an already merged model
    torch.testing.assert_close(merged_model(model).eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_merge_state_dict_rejects_adapters_that_do_not_fit():
    base = tiny()
    cfg = LoRAConfig(rank=4)
    adapter = lora_state(with_lora(base, cfg))
    with pytest.raises(CheckpointError) as err:
        merge_state_dict(model_state(tiny(d_model=64)), adapter, cfg)
    assert "another base model" in one_line(err)
    with pytest.raises(CheckpointError):
        merge_state_dict(model_state(base), adapter, LoRAConfig(rank=8))
    half = {k: v for k, v in adapter.items() if "lora_B" not in k}
    with pytest.raises(CheckpointError, match="without lora_B"):
        merge_state_dict(model_state(base), half, cfg)


# ---------------------------------------------------------------------------------------------- adapter files


def saved(tmp_path, cfg: LoRAConfig | None = None, **kw):
    base = tiny(**kw)
    cfg = cfg or LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=["all-linear"])
    model = with_lora(base, cfg)
    out = save_adapter(tmp_path / "adapter", model, cfg, base_sha256=SHA, base_config=base.config,
                       base_name="runs/pretrain/best.safetensors")
    return base, model, cfg, out


def test_adapter_round_trip_gives_identical_outputs(tmp_path):
    base, model, cfg, out = saved(tmp_path)
    x = tokens()
    fresh = GPT(base.config)
    load_model_state(fresh, model_state(base))
    assert load_adapter(out, fresh, base_sha256=SHA) == cfg
    assert torch.equal(fresh.eval()(x), model(x))
    # loading again into the now-injected model works too
    assert load_adapter(out, fresh) == cfg and torch.equal(fresh(x), model(x))
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_saving_the_same_adapter_again_writes_the_same_bytes(tmp_path):
    # safetensors writes its metadata from a hash map: with two keys the order changed between saves
    _, model, cfg, out = saved(tmp_path)
    first = (out / ADAPTER_WEIGHTS).read_bytes()
    for _ in range(12):
        save_adapter(out, model, cfg, base_sha256=SHA, base_config=model.config,
                     base_name="runs/pretrain/best.safetensors")
        assert (out / ADAPTER_WEIGHTS).read_bytes() == first
    assert load_adapter(out, GPT(model.config)) == cfg


def test_adapter_files_follow_peft_naming(tmp_path):
    from safetensors import safe_open

    _, model, cfg, out = saved(tmp_path)
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    pattern = re.compile(r"base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.[a-z]+_proj"
                         r"\.lora_[AB]\.weight")
    assert keys and all(pattern.fullmatch(k) for k in keys)
    assert sorted(keys) == sorted("base_model.model." + k for k in lora_state(model))
    assert meta["format"] == "pt"
    minilm = json.loads(meta["minilm"])
    assert minilm["base_sha256"] == SHA and minilm["lora_config"]["rank"] == 4
    assert minilm["base_config"]["d_model"] == 32

    doc = json.loads((out / ADAPTER_CONFIG).read_text())
    assert doc["peft_type"] == "LORA" and doc["task_type"] == "CAUSAL_LM" and doc["r"] == 4
    assert doc["lora_alpha"] == 8 and doc["lora_dropout"] == 0.1 and doc["use_rslora"] is False
    assert sorted(doc["target_modules"]) == sorted(ALL) and doc["bias"] == "none"
    assert doc["base_model_name_or_path"] == "runs/pretrain/best.safetensors"
    peft = pytest.importorskip("peft")
    import dataclasses

    assert set(doc) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
    parsed = peft.LoraConfig.from_pretrained(str(out))
    assert parsed.r == 4 and set(parsed.target_modules) == set(ALL)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_applies_our_adapter_to_a_transformers_llama_with_the_same_logits(tmp_path):
    """Parity with an independent implementation: transformers' Llama + PEFT, given our files."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    cfg = LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    base, model, _, out = saved(tmp_path, cfg)
    c = base.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
        max_position_embeddings=c.context_length, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    llama = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing = llama.load_state_dict(model_state(base), strict=False).missing_keys
    assert set(missing) <= {"lm_head.weight"}
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(llama(x).logits, base(x), atol=1e-4, rtol=1e-4)
        peft_model = PeftModel.from_pretrained(llama, str(out)).eval()
        torch.testing.assert_close(peft_model(x).logits, model(x), atol=1e-4, rtol=1e-4)


def test_loading_onto_another_base_is_a_checkpoint_error(tmp_path):
    _, _, _, out = saved(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_adapter(out, tiny(), base_sha256="cd" * 32)
    assert "sha256" in one_line(err)
    for other in [tiny(d_model=64), tiny(n_layer=3), tiny(vocab_size=80), tiny(rope_base=500.0)]:
        with pytest.raises(CheckpointError) as err:
            load_adapter(out, other)
        assert "another model shape" in one_line(err)
        assert not lora_layers(other)                                # nothing half-done
    load_adapter(out, tiny(dropout=0.1))                             # dropout is not part of the shape


def test_loading_into_different_lora_layers_is_a_checkpoint_error(tmp_path):
    _, _, _, out = saved(tmp_path)
    model = tiny()
    inject_lora(model, LoRAConfig(rank=4, alpha=8, targets=ATTN))
    with pytest.raises(CheckpointError) as err:
        load_adapter(out, model)
    assert "other layers" in one_line(err)


def test_missing_corrupt_or_foreign_adapter_files_are_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    _, model, cfg, out = saved(tmp_path)
    weights, config = out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG
    good_weights, good_config = weights.read_bytes(), config.read_text()

    def expect(fragment: str) -> None:
        with pytest.raises(CheckpointError) as err:
            load_adapter(out, tiny())
        assert fragment in one_line(err)
        weights.write_bytes(good_weights)
        config.write_text(good_config)

    with pytest.raises(CheckpointError, match="not found"):
        load_adapter(tmp_path / "nope", tiny())
    with pytest.raises(CheckpointError, match="not a directory"):
        load_adapter(weights, tiny())
    weights.unlink()
    expect("not found")
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    expect("corrupt or truncated")
    torch.save(lora_state(model), weights)
    expect("never unpickles")
    weights.write_bytes(b"")
    expect("empty or truncated")
    save_file({k: v.contiguous() for k, v in lora_state(model).items()}, str(weights))
    expect("no 'minilm' metadata")
    config.unlink()
    expect("not found")
    config.write_text("{not json")
    expect("corrupt")
    config.write_text(good_config.replace('"r": 4', '"r": 16'))
    expect("disagrees")
    assert read_adapter(out).config == cfg                           # restored: reads again


def test_adapter_keys_outside_the_blocks_are_refused(tmp_path):
    from safetensors.torch import save

    _, model, _, out = saved(tmp_path)
    meta = json.loads(read_adapter_meta(out))
    for key in ["base_model.model.lm_head.lora_A.weight",
                "base_model.model.model.layers.0/../../x.lora_A.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.weight"]:
        tensors = {key: torch.zeros(4, 32), key.replace("lora_A", "lora_B"): torch.zeros(32, 4)}
        blob = save(tensors, metadata={"format": "pt", "minilm": json.dumps(meta)})
        (out / ADAPTER_WEIGHTS).write_bytes(blob)
        with pytest.raises(CheckpointError) as err:
            load_adapter(out, tiny())
        assert "not a LoRA weight of a block layer" in one_line(err)


def read_adapter_meta(out) -> str:
    from safetensors import safe_open

    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        return f.metadata()["minilm"]


def test_lora_linear_matches_its_definition():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=6, dropout=0.0)
    assert layer.weight is base.weight and layer.bias is base.bias
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, 6)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    bound = 1 / math.sqrt(6)                                         # kaiming-uniform(a=sqrt(5)) on fan_in 6
    assert layer.lora_A.weight.abs().max() <= bound
