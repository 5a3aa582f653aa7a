"""Export to Hugging Face ``transformers``: a sequential-layout minilm model is a ``LlamaForCausalLM``.

minilm's module names, rotary layout (rotate-half) and SwiGLU are Llama's, so the export is a config
translation plus a copy of the state dict. ``transformers`` is an optional dependency (the ``bench``
extra): it is imported inside the functions, never when minilm is imported.

:func:`from_transformers` goes the other way: a local Hugging Face Llama checkpoint (config.json,
safetensors, SentencePiece tokenizer.model) becomes a minilm model and tokenizer.

What has no Llama counterpart is refused with a one-line :class:`ConfigError`: the parallel block layout,
LayerNorm, and un-merged LoRA layers. Residual dropout is not represented (Llama has attention dropout
only); the exported model is meant for inference and comparison.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .model import unwrap_compiled


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


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights under transformers' names (= ours), without a tied ``lm_head`` (the embedding is the
    same tensor); a model with un-merged LoRA layers is refused with one line."""
    net = unwrap_compiled(model)
    state = dict(net.state_dict())
    lora = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    if lora:
        raise ConfigError(f"the model has LoRA layers ({lora[0]}, ...); merge them first with "
                          "minilm.lora.merged_model(model) and export the merged model")
    if net.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def to_transformers(model: nn.Module):
    """A ``transformers.LlamaForCausalLM`` (SDPA attention) holding a copy of ``model``'s weights, in
    their dtype and on their device, in the same train/eval mode.

    Merge LoRA adapters first (:func:`minilm.lora.merged_model`).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    net = unwrap_compiled(model)
    cfg: ModelConfig = net.config
    kwargs = to_transformers_config(cfg)
    state = plain_state(net)
    ref = net.model.embed_tokens.weight
    hf_config = LlamaConfig(**kwargs)
    hf_config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):   # its random init is overwritten; keep the caller's RNG
        hf = LlamaForCausalLM(hf_config)
    hf.to(device=ref.device, dtype=ref.dtype)
    if cfg.tie_embeddings:
        hf.tie_weights()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a bug, not a user error: the two layouts should match name for name
        raise RuntimeError(f"state dict mismatch exporting to LlamaForCausalLM: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return hf.train(net.training)


# --------------------------------------------------------------------------------------------------
# import: a local Hugging Face Llama checkpoint -> minilm


def _fail(root: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{root}: {what}")


def read_hf_config(root: Path) -> dict[str, Any]:
    """config.json of a Hugging Face checkpoint directory, checked to be a Llama minilm can hold."""
    import json

    if not root.is_dir():
        raise CheckpointError(f"Hugging Face model directory {root} "
                              f"{'is a file' if root.exists() else 'not found'}; point to the directory "
                              "holding config.json and model.safetensors")
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(root, "no config.json; this is not a Hugging Face model directory") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _fail(root, f"config.json is unreadable ({str(err)[:120]}); download it again") from None
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or "LlamaForCausalLM" not in archs:
        raise _fail(root, f"a {config.get('model_type')!r} checkpoint ({', '.join(archs) or 'no architecture'}); "
                          "minilm imports Llama (LlamaForCausalLM) checkpoints only")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise _fail(root, f"hidden_act is {act!r}; minilm's MLP is SwiGLU (silu) only")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    if scaling or rope.get("rope_type", "default") != "default":
        kind = (scaling or rope).get("rope_type") or (scaling or rope).get("type")
        raise _fail(root, f"rope scaling {kind!r} is set; minilm has plain rotary embeddings only")
    if bool(config.get("attention_bias", False)) != bool(config.get("mlp_bias", False)):
        raise _fail(root, "attention_bias and mlp_bias differ; minilm's bias setting covers both")
    return config


def model_config_from_hf(config: dict[str, Any], root: Path) -> ModelConfig:
    heads = int(config["num_attention_heads"])
    d_model = int(config["hidden_size"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = config.get("head_dim") or d_model // heads
    if head_dim * heads != d_model:
        raise _fail(root, f"head_dim {head_dim} x {heads} heads != hidden_size {d_model}; minilm's heads "
                          "split the model width exactly")
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    cfg = ModelConfig(vocab_size=int(config["vocab_size"]), context_length=int(config["max_position_embeddings"]),
                      n_layer=int(config["num_hidden_layers"]), n_head=heads, n_kv_head=None if kv == heads else kv,
                      d_model=d_model, norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_base=float(theta),
                      tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                      bias=bool(config.get("attention_bias", False)),
                      dropout=float(config.get("attention_dropout", 0.0)),
                      init_std=float(config.get("initializer_range", 0.02)))
    from dataclasses import replace
    if cfg.hidden_dim != int(config["intermediate_size"]):   # keep ffn_hidden derived when it matches
        cfg = replace(cfg, ffn_hidden=int(config["intermediate_size"]))
    try:
        return cfg.validate()
    except ConfigError as err:
        raise _fail(root, f"its shape does not fit minilm ({err})") from None


def read_hf_weights(root: Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of a checkpoint directory (one file or shards), never a pickle."""
    import json

    from safetensors.torch import load_file

    from .fileio import check_safetensors_file

    if (root / "model.safetensors.index.json").exists():
        index = json.loads((root / "model.safetensors.index.json").read_text(encoding="utf-8"))
        files = sorted(set(index.get("weight_map", {}).values()))
    elif (root / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif any((root / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise _fail(root, "only pytorch_model.bin (a pickle) is there; minilm never unpickles (it could "
                          "run code) - convert it to model.safetensors first")
    else:
        raise _fail(root, "no model.safetensors; download the checkpoint's safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = check_safetensors_file(root / name, "weights file", missing="download it again",
                                      fix="download it again")
        try:
            state.update(load_file(str(path)))
        except Exception as err:   # safetensors' own error types
            raise _fail(root, f"{name} is corrupt or truncated ({str(err)[:120]}); download it again") from None
    return state


def from_transformers(model_dir: str | os.PathLike):
    """``(GPT, tokenizer)`` from a local Hugging Face Llama checkpoint: ``config.json``, safetensors
    weights (one file or shards) and a SentencePiece ``tokenizer.model``. What minilm cannot represent
    (another architecture or activation, rope scaling, a pickle-only checkpoint, no SentencePiece
    tokenizer) is refused with a one-line :class:`CheckpointError`. The model is fp32, in eval mode."""
    from .checkpoint import load_model_state
    from .model import GPT
    from .tokenizer import SentencePieceTokenizer

    root = Path(model_dir)
    cfg = model_config_from_hf(read_hf_config(root), root)
    if not (root / "tokenizer.model").is_file():
        raise _fail(root, "no tokenizer.model; minilm imports checkpoints with a SentencePiece tokenizer "
                          "(tokenizer.json alone is not enough)")
    tokenizer = SentencePieceTokenizer(root / "tokenizer.model")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise _fail(root, f"config.json says vocab_size {cfg.vocab_size} but tokenizer.model has "
                          f"{tokenizer.vocab_size} pieces; minilm needs them equal")
    state = {k: v.float() for k, v in read_hf_weights(root).items() if not k.endswith("rotary_emb.inv_freq")}
    model = GPT(cfg)
    try:
        load_model_state(model, state)
    except CheckpointError as err:
        raise _fail(root, f"the weights do not match config.json ({err})") from None
    return model.eval(), tokenizer
