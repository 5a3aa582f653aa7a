"""Low-rank adapters (LoRA): inject, train only the adapter, merge, and save/load it in PEFT's format.

A :class:`LoRALinear` replaces an ``nn.Linear`` inside the model's blocks and keeps its parameter names
(``weight``, ``bias``), adding ``lora_A`` (in -> r) and ``lora_B`` (r -> out)::

    y = x W^T + b + scaling * B(A(dropout(x)))        scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

so a base checkpoint loads into a LoRA model unchanged and a merged model is a plain :class:`GPT`.
Merging adds ``scaling * B @ A`` to ``W`` in fp32 and casts back to the weight's dtype.

An adapter directory holds ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``:
our module paths mirror transformers' ``LlamaForCausalLM``, so these are PEFT's own keys) and
``adapter_config.json`` (PEFT's ``LoraConfig`` fields). minilm's own record - base checkpoint SHA-256,
base model config, LoRA config - lives in the safetensors metadata under ``minilm``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_model_state, model_state
from .config import ModelConfig, from_dict, to_dict
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write, safe_join, write_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "minilm-lora-adapter"
ADAPTER_VERSION = 1
PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

_MODULE = re.compile(r"model\.layers\.\d+(\.[A-Za-z_][A-Za-z0-9_]*)+")   # where LoRA may live
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")
_NOT_SHAPE = ("dropout", "init_std")   # model config fields an adapter does not depend on


@dataclass
class LoRAConfig:
    """Adapter shape. ``targets`` are module-name suffixes (``"q_proj"``, ``"mlp.up_proj"``) or the single
    entry ``"all-linear"`` (every linear layer in the blocks)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0              # PEFT's default; drawing masks on CPU is costly (benchmarks row 4)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False              # scaling alpha / sqrt(rank) instead of alpha / rank

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.rank <= 0:
            p.append(f"rank must be > 0, got {self.rank}")
        if self.alpha <= 0:
            p.append(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            p.append(f"targets must name at least one module (e.g. {list(DEFAULT_TARGETS)} or "
                     f"['{ALL_LINEAR}'])")
        if any(not t or t != t.strip() for t in self.targets):
            p.append("targets must not contain empty strings or surrounding spaces")
        if ALL_LINEAR in self.targets and len(self.targets) > 1:
            p.append(f"'{ALL_LINEAR}' must be the only entry of targets, got {self.targets}")
        if len(set(self.targets)) != len(self.targets):
            p.append(f"targets has duplicates: {self.targets}")
        return p

    def validate(self) -> "LoRAConfig":
        problems = self.problems()
        if problems:
            raise ConfigError("lora config: " + "; ".join(problems))
        return self


# --------------------------------------------------------------------------------------------------
# the layer


def _merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                   sign: float = 1.0) -> torch.Tensor:
    """``weight + sign * scaling * (b @ a)`` computed in fp32, returned in ``weight``'s dtype."""
    delta = (b.float() @ a.float()) * (sign * scaling)                  # (out, r) @ (r, in) -> (out, in)
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (same ``weight``/``bias`` parameters, shared with the layer it wraps) plus a
    low-rank update ``lora_B(lora_A(dropout(x))) * scaling``. ``A`` starts kaiming-uniform (as PEFT),
    ``B`` at zero, so a fresh adapter leaves the model's outputs unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        if base.bias is not None:
            self.bias = base.bias
        else:
            self.register_parameter("bias", None)
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lora_A.weight.requires_grad:
                raise RuntimeError("a merged LoRA layer cannot be trained (the adapter would get no "
                                   "gradient); call unmerge_lora(model) first")
            return out
        return out.add_(self.lora_B(self.lora_A(self.dropout(x))), alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shape (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (no-op when already merged)."""
        if not self.merged:
            self.weight.copy_(_merged_weight(self.weight, self.lora_A.weight, self.lora_B.weight,
                                             self.scaling))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of ``weight`` (no-op when not merged)."""
        if self.merged:
            self.weight.copy_(_merged_weight(self.weight, self.lora_A.weight, self.lora_B.weight,
                                             self.scaling, sign=-1.0))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, scaling={self.scaling:g}, "
                f"merged={self.merged}")


# --------------------------------------------------------------------------------------------------
# the model


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def is_lora_key(name: str) -> bool:
    return name.endswith((".lora_A.weight", ".lora_B.weight"))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module path (``model.layers.0.self_attn.q_proj``)."""
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, target: str) -> bool:
    return target == ALL_LINEAR or name == target or name.endswith("." + target)


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace the targeted ``nn.Linear`` layers of ``model.model.layers`` by :class:`LoRALinear`.

    The embedding and ``lm_head`` (which may be the embedding, tied) are never touched. Returns the
    wrapped module paths. A target entry that matches nothing is a :class:`ConfigError`.
    """
    cfg.validate()
    model = _unwrap(model)
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; inject once (or load_adapter into it)")
    linears = {f"model.layers.{n}": m for n, m in model.model.layers.named_modules()
               if type(m) is nn.Linear}
    unmatched = [t for t in cfg.targets if not any(_matches(n, t) for n in linears)]
    if unmatched:
        valid = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linears))
        raise ConfigError(f"lora.targets {unmatched} match no linear layer in the model's blocks; valid "
                          f"names: {' '.join(valid)} (or '{ALL_LINEAR}')")
    chosen = [n for n in linears if any(_matches(n, t) for t in cfg.targets)]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(linears[name], cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora))
    return chosen


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything but the ``lora_A``/``lora_B`` weights."""
    if not lora_layers(model):
        raise ValueError("the model has no LoRA layers; call inject_lora(model, cfg) first")
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_key(name))


def trainable_report(model: nn.Module) -> dict[str, Any]:
    """``{"trainable", "total", "share"}`` over distinct parameters (a tied embedding counts once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "share": trainable / max(total, 1)}


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, under our names (use as ``save_state=`` of :func:`minilm.train.train`)."""
    return {k.replace("_orig_mod.", ""): v for k, v in _unwrap(model).state_dict().items()
            if is_lora_key(k)}


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer in place (idempotent); returns how many layers there are."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    layers = lora_layers(model)
    for layer in layers.values():
        layer.unmerge()
    return len(layers)


def merged_model(model: nn.Module) -> nn.Module:
    """A new plain :class:`~minilm.model.GPT` whose weights are ``model``'s with the adapters folded in
    (``model`` itself is left as it is)."""
    from .model import GPT

    model = _unwrap(model)
    state = {k: v for k, v in model_state(model).items() if not is_lora_key(k)}
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            state[f"{name}.weight"] = _merged_weight(layer.weight.detach(), layer.lora_A.weight,
                                                     layer.lora_B.weight, layer.scaling)
    ref = model.model.embed_tokens.weight
    with torch.random.fork_rng(devices=[]):  # building a GPT draws its random init; keep the caller's RNG
        plain = GPT(model.config)
    plain.to(device=ref.device, dtype=ref.dtype)
    load_model_state(plain, state)
    return plain.train(model.training)


def _adapter_pairs(adapter_state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` from adapter keys (our names, or PEFT's with ``base_model.model.``)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter_state.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _LORA_KEY.fullmatch(name)
        if m is None or not _MODULE.fullmatch(m["module"]):
            raise CheckpointError(f"adapter tensor {key!r} is not a LoRA weight of a block layer "
                                  "(expected model.layers.N.<module>.lora_A/lora_B.weight); the adapter is "
                                  "corrupt or not minilm's - rerun the sft stage")
        found.setdefault(m["module"], {})[m["which"]] = tensor
    half = [mod for mod, ab in found.items() if len(ab) != 2]
    if half:
        raise CheckpointError(f"adapter has lora_A without lora_B (or the reverse) for {half[:3]}; the "
                              "adapter is corrupt - rerun the sft stage")
    return {mod: (ab["A"], ab["B"]) for mod, ab in found.items()}


def _built_with(layer: LoRALinear, cfg: LoRAConfig) -> bool:
    return layer.rank == cfg.rank and math.isclose(layer.scaling, cfg.scaling)


def _check_pair(module: str, a: torch.Tensor, b: torch.Tensor, weight_shape: torch.Size, rank: int) -> None:
    out_f, in_f = weight_shape
    if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
        raise CheckpointError(
            f"adapter weights for {module} have shapes A {tuple(a.shape)}, B {tuple(b.shape)} but the base "
            f"layer is ({out_f}, {in_f}) with rank {rank}; the adapter was made for another base model")


def merge_state_dict(base_state: dict[str, torch.Tensor], adapter_state: dict[str, torch.Tensor],
                     cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """A plain model state dict: ``base_state`` with ``cfg.scaling * B @ A`` added to each adapted
    weight (fp32 math, cast back to the base dtype). Pure: neither input is modified."""
    out = dict(base_state)
    for module, (a, b) in _adapter_pairs(adapter_state).items():
        key = f"{module}.weight"
        if key not in out:
            raise CheckpointError(f"the adapter adapts {module}, which the base model lacks; merge it into "
                                  "the base checkpoint it was trained on")
        _check_pair(module, a, b, out[key].shape, cfg.rank)
        out[key] = _merged_weight(out[key], a, b, cfg.scaling)
    return out


# --------------------------------------------------------------------------------------------------
# adapter files


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
    from safetensors.torch import save

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
    blob = save(tensors, metadata={"format": "pt", "minilm": json.dumps(meta)})
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
    _check_safetensors(path, fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("minilm")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors has its own error types for torn headers and data
        raise CheckpointError(f"{path} is corrupt or truncated ({_short(err)}); {fix}") from None
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
        raise CheckpointError(f"{path} has malformed minilm metadata ({_short(err)}); {fix}") from None
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
    base = _unwrap(model)
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


def _check_safetensors(path: Path, fix: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"adapter file {path} not found; {fix}")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
        return
    if head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{path} is a pickle/torch.save file; minilm loads only safetensors adapters "
                              "and never unpickles (it could run code)")
    raise CheckpointError(f"{path} is empty, truncated or not a safetensors file; {fix}")


def _check_peft_config(path: Path, cfg: LoRAConfig, fix: str) -> None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found (an adapter directory needs it); {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt ({_short(err)}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} is not a LoRA adapter config (peft_type must be 'LORA'); {fix}")
    found = (doc.get("r"), doc.get("lora_alpha"), doc.get("use_rslora", False))
    if found != (cfg.rank, cfg.alpha, cfg.rslora):
        raise CheckpointError(f"{path} (r={doc.get('r')}, lora_alpha={doc.get('lora_alpha')}) disagrees with "
                              f"the adapter weights (rank={cfg.rank}, alpha={cfg.alpha}); the adapter was "
                              f"written partially or edited - {fix}")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]


__all__ = ["LoRAConfig", "LoRALinear", "Adapter", "inject_lora", "mark_only_lora_trainable",
           "trainable_report", "lora_state", "lora_layers", "merge_lora", "unmerge_lora", "merged_model",
           "merge_state_dict", "save_adapter", "read_adapter", "load_adapter", "peft_config",
           "is_lora_key"]
