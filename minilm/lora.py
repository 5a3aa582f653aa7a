"""Low-rank adapters (LoRA): the layer, injecting it into a model, training only it, and merging it.

A :class:`LoRALinear` replaces an ``nn.Linear`` inside the model's blocks and keeps its parameter names
(``weight``, ``bias``), adding ``lora_A`` (in -> r) and ``lora_B`` (r -> out)::

    y = x W^T + b + scaling * B(A(dropout(x)))        scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

so a base checkpoint loads into a LoRA model unchanged and a merged model is a plain :class:`GPT`.
Merging adds ``scaling * B @ A`` to ``W`` in fp32 and casts back to the weight's dtype.

Adapter files (PEFT's layout) are :mod:`minilm.adapter`.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_model_state, model_state
from .config import ALL_LINEAR, DEFAULT_TARGETS, LoRAConfig
from .errors import CheckpointError, ConfigError
from .model import count_parameters, unwrap_compiled

PEFT_PREFIX = "base_model.model."      # PEFT's key prefix; what follows is our (= transformers') path
_MODULE = re.compile(r"model\.layers\.\d+(\.[A-Za-z_][A-Za-z0-9_]*)+")   # where LoRA may live
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")


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
        self.disabled = False         # adapters_disabled(): the base layer alone (DPO's reference model)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
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


def is_lora_key(name: str) -> bool:
    return name.endswith((".lora_A.weight", ".lora_B.weight"))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module path (``model.layers.0.self_attn.q_proj``)."""
    return {n: m for n, m in unwrap_compiled(model).named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, target: str) -> bool:
    return target == ALL_LINEAR or name == target or name.endswith("." + target)


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace the targeted ``nn.Linear`` layers of ``model.model.layers`` by :class:`LoRALinear`.

    The embedding and ``lm_head`` (which may be the embedding, tied) are never touched. Returns the
    wrapped module paths. A target entry that matches nothing is a :class:`ConfigError`.
    """
    cfg.validate()
    model = unwrap_compiled(model)
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
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    return {"trainable": trainable, "total": total, "share": trainable / max(total, 1)}


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, under our names (use as ``save_state=`` of :func:`minilm.train.train`)."""
    return {k.replace("_orig_mod.", ""): v for k, v in unwrap_compiled(model).state_dict().items()
            if is_lora_key(k)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base, every adapter switched off (the weights stay where they are): DPO's
    reference model without a second copy in memory. Merged adapters are folded into the weights and
    cannot be switched off."""
    layers = list(lora_layers(getattr(model, "module", model)).values())    # under DDP: the wrapped model
    if any(layer.merged for layer in layers):
        raise ValueError("a merged LoRA layer cannot be disabled; call unmerge_lora(model) first")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


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

    model = unwrap_compiled(model)
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


__all__ = ["LoRAConfig", "LoRALinear", "inject_lora", "mark_only_lora_trainable", "trainable_report",
           "lora_state", "lora_layers", "merge_lora", "unmerge_lora", "merged_model", "merge_state_dict",
           "is_lora_key", "ALL_LINEAR", "DEFAULT_TARGETS"]
