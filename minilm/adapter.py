"""LoRA adapter files in PEFT's layout: save, read back with checks, and load into a model.

An adapter directory holds ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``:
our module paths mirror transformers' ``LlamaForCausalLM``, so these are PEFT's own keys) and
``adapter_config.json`` (PEFT's ``LoraConfig`` fields). minilm's own record - base checkpoint SHA-256,
base model config, LoRA config - lives in the safetensors metadata under ``minilm``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig, from_dict, to_dict
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write, check_safetensors_file, safe_join, safetensors_bytes, short_error, write_json
from .lora import (PEFT_PREFIX, LoRAConfig, _adapter_pairs, _built_with, _check_pair, inject_lora,
                   lora_layers, lora_state)
from .model import unwrap_compiled

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "minilm-lora-adapter"
ADAPTER_VERSION = 1
_NOT_SHAPE = ("dropout", "init_std")   # model config fields an adapter does not depend on


@dataclass
class Adapter:
    """An adapter read from disk: weights under our names, its config and the base it was trained on."""

    state: dict[str, torch.Tensor]
    config: LoRAConfig
    base_sha256: str | None
    base_config: dict[str, Any]
    modules: list[str]
    path: Path


def peft_config(cfg: LoRAConfig, modules: list[str], base_name: str | None = None) -> dict[str, Any]:
    """``adapter_config.json``: only fields PEFT's ``LoraConfig`` defines."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "revision": None, "inference_mode": True,
        "r": cfg.rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False,
    }


def save_adapter(out_dir: str | os.PathLike, model: nn.Module, cfg: LoRAConfig, *, base_sha256: str | None,
                 base_config: ModelConfig | dict[str, Any], base_name: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``out_dir`` (each atomically;
    the config last). ``base_name`` becomes PEFT's ``base_model_name_or_path``."""

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    if not all(_built_with(layer, cfg) for layer in layers.values()):
        raise ValueError(f"the model's LoRA layers do not have the rank ({cfg.rank}) and scaling "
                         f"({cfg.scaling:g}) of the given config")
    modules = sorted(layers)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_state(model).items()}
    base_config = to_dict(base_config) if isinstance(base_config, ModelConfig) else dict(base_config)
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "base_sha256": base_sha256,
            "base_config": base_config, "lora_config": to_dict(cfg), "modules": modules}
    blob = safetensors_bytes(tensors, {"format": "pt", "minilm": json.dumps(meta)})
    out_dir = Path(out_dir)
    with atomic_write(safe_join(out_dir, ADAPTER_WEIGHTS), "wb") as fh:
        fh.write(blob)
    write_json(safe_join(out_dir, ADAPTER_CONFIG), peft_config(cfg, modules, base_name))
    return out_dir


def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Read and check an adapter directory written by :func:`save_adapter` (safetensors only, never
    pickle). Every way it can be wrong is a one-line :class:`CheckpointError`."""
    from safetensors import safe_open

    root = Path(adapter_dir)
    fix = "rerun the sft stage to rebuild it"
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "not found"
        raise CheckpointError(f"adapter directory {root} {what}; run the sft stage first (e.g. `dvc repro "
                              "sft`) or point to the directory holding adapter_model.safetensors")
    path = root / ADAPTER_WEIGHTS
    check_safetensors_file(path, "adapter", missing=fix, fix=fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("minilm")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors has its own error types for torn headers and data
        raise CheckpointError(f"{path} is corrupt or truncated ({short_error(err)}); {fix}") from None
    if raw is None:
        raise CheckpointError(f"{path} has no 'minilm' metadata, so its base model is unknown; use an "
                              "adapter saved by minilm")
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
            raise ValueError("not a minilm adapter")
        if meta.get("version") != ADAPTER_VERSION:
            raise ValueError(f"version {meta.get('version')!r}, this minilm reads {ADAPTER_VERSION}")
        cfg = from_dict(LoRAConfig, meta["lora_config"], "lora_config", source=str(path))
        from_dict(ModelConfig, meta["base_config"], "base_config", source=str(path))
        modules = list(meta["modules"])
    except (ValueError, KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{path} has malformed minilm metadata ({short_error(err)}); {fix}") from None
    pairs = _adapter_pairs(tensors)
    if sorted(pairs) != sorted(modules):
        raise CheckpointError(f"{path} holds weights for other modules than its metadata lists; {fix}")
    _check_peft_config(root / ADAPTER_CONFIG, cfg, fix)
    state = {}
    for module, (a, b) in pairs.items():
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a, b
    return Adapter(state=state, config=cfg, base_sha256=meta.get("base_sha256"),
                   base_config=meta["base_config"], modules=modules, path=root)


def load_adapter(adapter_dir: str | os.PathLike, model: nn.Module, *,
                 base_sha256: str | None = None) -> LoRAConfig:
    """Load an adapter into ``model`` (injecting LoRA layers if it has none) and return its config.

    ``model`` must hold the base weights the adapter was trained on: a different model config, or a
    different ``base_sha256`` when given, is a :class:`CheckpointError`.
    """
    adapter = read_adapter(adapter_dir)
    cfg, where = adapter.config, adapter.path
    if base_sha256 is not None and adapter.base_sha256 != base_sha256:
        trained_on = f"sha256 {adapter.base_sha256[:12]}..." if adapter.base_sha256 else "an unrecorded base"
        raise CheckpointError(
            f"adapter {where} was trained on base checkpoint {trained_on}, not on this one (sha256 "
            f"{base_sha256[:12]}...); load the base it was made for or retrain the adapter")
    base = unwrap_compiled(model)
    own = to_dict(base.config)
    diff = sorted(k for k in set(own) | set(adapter.base_config)
                  if k not in _NOT_SHAPE and own.get(k) != adapter.base_config.get(k))
    if diff:
        shown = ", ".join(f"{k}={adapter.base_config.get(k)!r} vs {own.get(k)!r}" for k in diff[:4])
        raise CheckpointError(f"adapter {where} was made for another model shape ({shown}; adapter vs "
                              "model); load it onto its own base checkpoint")
    layers = lora_layers(base)
    if not layers:
        try:
            inject_lora(base, cfg)
        except ConfigError as err:
            raise CheckpointError(f"adapter {where} cannot be applied to this model: {err}") from None
        layers = lora_layers(base)
    if sorted(layers) != sorted(adapter.modules):
        raise CheckpointError(f"adapter {where} adapts other layers than the model's LoRA layers; load it "
                              "onto a model without LoRA layers (they are injected from the adapter)")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's LoRA layers are merged; call unmerge_lora(model) before loading")
    if not all(_built_with(layer, cfg) for layer in layers.values()):
        raise CheckpointError(f"adapter {where} has rank {cfg.rank} / scaling {cfg.scaling:g}, unlike the "
                              "model's LoRA layers; load it onto a model without LoRA layers")
    pairs = {m: (adapter.state[f"{m}.lora_A.weight"], adapter.state[f"{m}.lora_B.weight"]) for m in layers}
    for module, (a, b) in pairs.items():  # check every pair before changing anything
        _check_pair(module, a, b, layers[module].weight.shape, cfg.rank)
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            layers[module].lora_A.weight.copy_(a)
            layers[module].lora_B.weight.copy_(b)
    return cfg


def _check_peft_config(path: Path, cfg: LoRAConfig, fix: str) -> None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found (an adapter directory needs it); {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt ({short_error(err)}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} is not a LoRA adapter config (peft_type must be 'LORA'); {fix}")
    found = (doc.get("r"), doc.get("lora_alpha"), doc.get("use_rslora", False))
    if found != (cfg.rank, cfg.alpha, cfg.rslora):
        raise CheckpointError(f"{path} (r={doc.get('r')}, lora_alpha={doc.get('lora_alpha')}) disagrees with "
                              f"the adapter weights (rank={cfg.rank}, alpha={cfg.alpha}); the adapter was "
                              f"written partially or edited - {fix}")


__all__ = ["Adapter", "save_adapter", "read_adapter", "load_adapter", "peft_config", "ADAPTER_WEIGHTS",
           "ADAPTER_CONFIG"]
