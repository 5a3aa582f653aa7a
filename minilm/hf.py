"""Export to Hugging Face ``transformers``: a sequential-layout minilm model is a ``LlamaForCausalLM``.

minilm's module names, rotary layout (rotate-half) and SwiGLU are Llama's, so the export is a config
translation plus a copy of the state dict. ``transformers`` is an optional dependency (the ``bench``
extra): it is imported inside the functions, never when minilm is imported.

What has no Llama counterpart is refused with a one-line :class:`ConfigError`: the parallel block layout,
LayerNorm, and un-merged LoRA layers. Residual dropout is not represented (Llama has attention dropout
only); the exported model is meant for inference and comparison.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, with one line naming the setting, a model Llama (transformers, llama.cpp) cannot hold."""
    if cfg.block != "sequential":
        raise ConfigError(f"model.block is {cfg.block!r} but Llama (transformers, llama.cpp) has no parallel "
                          "layout; only block: sequential models can be exported")
    if cfg.norm != "rmsnorm":
        raise ConfigError(f"model.norm is {cfg.norm!r} but Llama (transformers, llama.cpp) uses RMSNorm; "
                          "only norm: rmsnorm models can be exported")


def to_transformers_config(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of ``transformers.LlamaConfig`` for a model of shape ``cfg``.

    Token ids (bos/eos/pad) are left unset: they belong to the tokenizer, not the model shape.
    """
    cfg.validate()
    check_exportable(cfg)
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def to_transformers(model: nn.Module):
    """A ``transformers.LlamaForCausalLM`` (SDPA attention) holding a copy of ``model``'s weights, in
    their dtype and on their device, in the same train/eval mode.

    Merge LoRA adapters first (:func:`minilm.lora.merged_model`).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    net = getattr(model, "_orig_mod", model)
    cfg: ModelConfig = net.config
    kwargs = to_transformers_config(cfg)
    state = {k.replace("_orig_mod.", ""): v for k, v in net.state_dict().items()}
    lora = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    if lora:
        raise ConfigError(f"the model has LoRA layers ({lora[0]}, ...); merge them first with "
                          "minilm.lora.merged_model(model) and export the merged model")
    ref = net.model.embed_tokens.weight
    hf_config = LlamaConfig(**kwargs)
    hf_config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):   # its random init is overwritten; keep the caller's RNG
        hf = LlamaForCausalLM(hf_config)
    hf.to(device=ref.device, dtype=ref.dtype)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)     # the same tensor as the embedding
        hf.tie_weights()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a bug, not a user error: the two layouts should match name for name
        raise RuntimeError(f"state dict mismatch exporting to LlamaForCausalLM: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return hf.train(net.training)
