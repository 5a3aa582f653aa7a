"""Optimizers: AdamW with weight-decay groups, or Muon for the blocks' weight matrices with AdamW for the rest.

``optimizer: muon`` follows the speedrun records: the hidden matrices (every 2-D weight inside
``model.layers``: attention and MLP projections, LoRA's A and B) take ``torch.optim.Muon`` steps
(momentum, then Newton-Schulz orthogonalisation), at ``muon_lr`` scaled per step like ``lr``; embeddings,
the head, norms and biases keep AdamW at ``lr``. :class:`MuonAdamW` holds both as one optimizer (one
``param_groups`` list, one ``state``, one ``state_dict``), so the training loop, its schedule and exact
resume treat it as any other.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .errors import ConfigError


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names over the trainable parameters; matrices (dim >= 2) decay,
    norms and biases do not. Each group's ``lr_scale`` is its rate over ``cfg.lr`` (the schedule sets
    ``lr = schedule(step) * lr_scale``)."""
    fused = device.type in ("cuda", "cpu")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "muon":
        hidden = {n: p for n, p in named if p.dim() == 2 and ".layers." in f".{n}"}
        if hidden:
            rest = [(n, p) for n, p in named if n not in hidden]
            return MuonAdamW(list(hidden.values()), _adamw_groups(rest, cfg), cfg, fused=fused)
    return torch.optim.AdamW(_adamw_groups(named, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused)


def clip_gradients(params: list[torch.Tensor], grad_clip: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(params, grad_clip or inf)``, bit for bit, returning the norm before
    clipping; on CPU it skips the multiply by a clamped coefficient of exactly 1.0 (the norm within
    ``grad_clip``: an identity pass over every gradient that torch makes only to avoid a device sync)."""
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or grads[0].device.type != "cpu" or any(hasattr(g, "full_tensor") for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)     # CUDA (no sync), FSDP's DTensors
    norm = torch.nn.utils.get_total_norm(grads)
    if not bool(max_norm / (norm + 1e-6) >= 1.0):                  # NaN, too: torch multiplies then
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _adamw_groups(named: list[tuple[str, torch.Tensor]], cfg: TrainConfig) -> list[dict[str, Any]]:
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` over ``hidden`` and ``torch.optim.AdamW`` over ``adamw_groups``, as one
    optimizer: the inner two share this object's ``param_groups`` dicts and ``state``."""

    def __init__(self, hidden: list[torch.Tensor], adamw_groups: list[dict[str, Any]], cfg: TrainConfig, *,
                 fused: bool = False) -> None:
        if any(p.dim() != 2 for p in hidden):
            raise ConfigError("Muon takes 2-D weight matrices only")
        self._adamw = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                        fused=fused)
        self._muon = torch.optim.Muon([{"params": hidden, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr,
                                      weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
        self._n_adamw = len(self._adamw.param_groups)
        super().__init__([*self._adamw.param_groups, *self._muon.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (after construction and loading)."""
        self._adamw.param_groups = self.param_groups[: self._n_adamw]
        self._muon.param_groups = self.param_groups[self._n_adamw:]
        self._adamw.state = self._muon.state = self.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_n_adamw") and len(self.param_groups) >= self._n_adamw + 1:
            raise ValueError("MuonAdamW's groups are fixed at construction")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        self._adamw.step()
        self._muon.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()
