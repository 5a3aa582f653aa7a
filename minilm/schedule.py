"""Learning-rate schedules: linear warmup, then cosine decay to a floor, cosine with warm restarts
(SGDR: period and multiplier), constant, or warmup-stable-decay (WSD: constant at ``lr`` until the last
``decay_fraction`` of the steps, then linear to ``min_lr``).

WSD makes continuing natural: up to :func:`decay_start` the learning rate does not depend on
``max_steps``, so a run given more steps can branch from its last stable-phase checkpoint and compute
exactly what a longer run from scratch would."""

from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        start = decay_start(cfg)
        if step < start:
            return cfg.lr
        progress = (step - start + 1) / max(1, cfg.max_steps - start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, progress)
    t = step - cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, t / span)
    else:  # cosine_restarts
        period, mult = cfg.restart_period, cfg.restart_mult
        if mult == 1.0:
            progress = (t % period) / period
        else:
            cycle = int(math.log(1 + t * (mult - 1) / period, mult))
            start = period * (mult ** cycle - 1) / (mult - 1)
            length = period * mult ** cycle
            if t < start:  # float rounding at a cycle boundary
                cycle -= 1
                start = period * (mult ** cycle - 1) / (mult - 1)
                length = period * mult ** cycle
            elif t >= start + length:
                start, length = start + length, length * mult
            progress = (t - start) / length
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def decay_start(cfg: TrainConfig) -> int:
    """First step of WSD's decay phase (``max_steps`` for the other schedules: they have no stable
    phase to branch from)."""
    if cfg.schedule != "wsd":
        return cfg.max_steps
    return max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps))
