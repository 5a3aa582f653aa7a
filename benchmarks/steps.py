"""One full training step (forward, backward, clip, optimizer step) for each contender, as a closure.

minilm's step is exactly what ``minilm.train.train`` does per step (``accumulate_gradients`` then
``clip_grad_norm_`` then the fused AdamW of ``build_optimizer``). The transformers step is what a
transformers user writes: the model's forward with ``use_cache=False`` (no KV cache built while training),
the same loss function on the logits, the same clipping, and ``torch.optim.AdamW`` with its default
implementation, which is what transformers' ``Trainer`` uses (``optim="adamw_torch"``). Compiled, each side
compiles its model together with its loss (the fused fp32 cross-entropy helps both alike).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import nn

from minilm.config import TrainConfig
from minilm.model import lm_loss
from minilm.precision import autocast
from minilm.train import accumulate_gradients, build_optimizer, clip_gradients, token_loss_sum

CPU = torch.device("cpu")
Batch = tuple[torch.Tensor, torch.Tensor]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def minilm_step(model: nn.Module, batch: Batch, cfg: TrainConfig, precision: str,
                compile: bool = False, optimizer_range: Callable[[], Any] = contextlib.nullcontext
                ) -> Callable[[], float]:
    """A training step of a minilm model; ``compile`` as ``train`` does it (``compile: true``: the model
    and its loss in one compiled function). ``optimizer_range`` wraps the clip and optimizer step (a
    profiler range, for the breakdown of row 2)."""
    opt = build_optimizer(model, cfg, CPU)
    params = _trainable(model)
    loss_fn = torch.compile(token_loss_sum) if compile else token_loss_sum
    x, y = batch
    model.train()

    def step() -> float:
        loss = accumulate_gradients(model, [(x, y, {})], device=CPU, precision=precision, loss_fn=loss_fn)
        with optimizer_range():
            clip_gradients(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def hf_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` (default implementation) with the same decay groups and hyperparameters."""
    decay = [p for p in _trainable(model) if p.dim() >= 2]
    no_decay = [p for p in _trainable(model) if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def hf_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean token loss of a transformers causal LM, the loss in fp32 outside autocast (as minilm's)."""
    logits = model(input_ids=x, use_cache=False).logits
    with torch.autocast(logits.device.type, enabled=False):
        return lm_loss(logits, y)


def hf_step(model: nn.Module, batch: Batch, cfg: TrainConfig, precision: str,
            compile: bool = False) -> Callable[[], float]:
    """A training step of a transformers (or peft-wrapped) causal LM; ``compile`` compiles the model with
    its loss, as minilm's ``compile: true`` does (the same advantage on both sides)."""
    opt = hf_optimizer(model, cfg)
    params = _trainable(model)
    loss_fn = torch.compile(hf_loss) if compile else hf_loss
    x, y = batch
    model.train()

    def step() -> float:
        with autocast(CPU, precision):
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step
