"""The training loop, shared by pretraining and SFT.

``train()`` takes objects - a model, a batch source, a config, an output directory, a logger - and
returns what happened. It owns: AdamW with weight-decay groups, gradient accumulation normalised over
every target token of the accumulated batch, clipping, the LR schedule, mixed precision, EMA, periodic
evaluation, ``last``/``best`` checkpoints and exact resume from ``last``.

Exact resume works because every input of a step is a function of the step number: batches come from
``data.batch(step, micro)`` (seeded by step), and the checkpoint holds the model, optimizer, EMA, gradient
scaler, torch RNG state, history and best-so-far. A run continued from ``last`` produces the same weights
as one that was never interrupted (bit-identical on CPU). On resume the history held by ``last`` is
replayed to the logger (a resumed MLflow run skips the steps it already has), so metrics a killed process
never sent are not lost. The output directory is checked writable before the first step, and temporary
files a killed save left behind are removed.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt_io
from .config import TrainConfig, to_dict
from .ema import EMA
from .errors import TrainingError
from .fileio import check_writable, remove_stale_temps
from .model import lm_loss
from .precision import autocast, resolve_precision
from .schedule import lr_at

Batch = Sequence[Any]  # (x, y) or (x, y, forward_kwargs)


class BatchSource(Protocol):
    def batch(self, step: int, micro: int = 0) -> Batch: ...


class MetricsLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class TrainResult:
    step: int                       # optimizer steps completed
    best_val_loss: float
    last_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)   # one row per log/eval step
    resumed_from: int = 0           # step the run continued from (0 = fresh)
    skipped_steps: int = 0          # non-finite steps skipped (nonfinite: skip)
    interrupted: bool = False       # stopped early by SIGINT/SIGTERM (``last`` was saved)
    seconds: float = 0.0            # wall time of this invocation's training loop

    @property
    def completed(self) -> bool:
        return not self.interrupted


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices (dim >= 2) decay, norms and biases do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type in ("cuda", "cpu"))


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def token_loss_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``model(x, **kw)`` against ``y`` (-100 ignored), the loss outside
    autocast. One function so that ``torch.compile(token_loss_sum)`` (``compile: true``) puts the loss in
    the model's graph, where its fp32 cast, log-softmax and their backward fuse: 1.09-1.17x a compiled
    training step at our sizes (against compiling the model alone)."""
    logits = model(x, **kw)
    with torch.autocast(logits.device.type, enabled=False):
        return lm_loss(logits, y, reduction="sum")


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def evaluate_loss(model: nn.Module, batches: Sequence[Batch], *, device: torch.device,
                  precision: str = "fp32", loss_fn: LossFn = token_loss_sum) -> float:
    """Mean per-token loss over a fixed set of batches (targets of -100 are ignored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for b in batches:
                x, y, kw = _unpack(b, device)
                with autocast(device, precision):
                    total += loss_fn(model, x, y, kw).item()
                count += int((y != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def accumulate_gradients(model: nn.Module, micro: Sequence[tuple[torch.Tensor, torch.Tensor, dict]], *,
                         device: torch.device, precision: str = "fp32",
                         scaler: torch.amp.GradScaler | None = None,
                         loss_fn: LossFn = token_loss_sum) -> torch.Tensor:
    """Backward over the micro-batches of one optimizer step; returns the step's mean token loss.

    The loss is normalised by the number of target tokens in the *whole* accumulated batch, so the
    gradient equals that of one big batch even when micro-batches hold different numbers of targets.
    ``loss_fn`` is :func:`token_loss_sum` or a compiled version of it.
    """
    n_targets = sum(int((y != -100).sum()) for _, y, _ in micro)
    loss_sum = torch.zeros((), device=device)
    for x, y, kw in micro:
        with autocast(device, precision):
            loss = loss_fn(model, x, y, kw) / max(n_targets, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
    return loss_sum


def _unpack(b: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    x, y = b[0].to(device, non_blocking=True), b[1].to(device, non_blocking=True)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in (b[2] if len(b) > 2 else {}).items()}
    return x, y, kw


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (so ``last`` can be saved cleanly)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(model: nn.Module, data: BatchSource, cfg: TrainConfig, *, out_dir: str | Path,
          eval_batches: Sequence[Batch] = (), logger: MetricsLogger | None = None,
          run_config: dict[str, Any] | None = None, resume: bool = True, progress: bool = True,
          tokens_per_batch: Callable[[Batch], int] | None = None,
          save_state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
          checkpoint_extra: dict[str, Any] | None = None,
          on_checkpoint: Callable[[str, Path], None] | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps, writing ``last.safetensors`` and
    ``best.safetensors`` into ``out_dir``.

    ``run_config`` (JSON-able) is stored in every checkpoint; a ``last`` checkpoint is resumed only if it
    was written with an equal ``run_config`` (a changed param starts afresh). ``save_state`` picks the
    weights a checkpoint holds (default: the whole model; LoRA saves only the adapter) - they are loaded
    back with ``load_state_dict(strict=False)`` semantics restricted to those keys.
    """
    out_dir = check_writable(out_dir)   # a read-only directory fails now, not at the first checkpoint
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_config = json.loads(json.dumps(run_config or {}))  # normalise (tuples -> lists)
    save_state = save_state or ckpt_io.model_state
    last_path, best_path = out_dir / "last.safetensors", out_dir / "best.safetensors"
    for path in (last_path, best_path):     # what a run killed while saving left beside them
        remove_stale_temps(path)

    model.train()
    optimizer = build_optimizer(model, cfg, device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    step, best_val, last_val, skipped = 0, math.inf, math.nan, 0
    resumed_window: list = [0.0, 0]   # the partial train-loss average a checkpoint interrupted
    history: list[dict[str, float]] = []
    torch.manual_seed(cfg.seed)

    if resume and last_path.exists():
        ckpt = ckpt_io.load_checkpoint(last_path)
        if ckpt.meta.get("config") == run_config:
            _load_weights(model, ckpt.model_state)
            optimizer.load_state_dict(ckpt.optimizer_state)
            train_state = ckpt.meta["extra"].get("train_state", {})
            if ema is not None and ckpt.ema_state is not None:
                ema.load_state_dict(ckpt.ema_state, train_state.get("ema_updates", 0))
            if scaler is not None and "scaler" in train_state:
                scaler.load_state_dict(train_state["scaler"])
            ckpt_io.restore_rng(ckpt.rng_state)
            step, skipped = ckpt.step, train_state.get("skipped", 0)
            best_val = train_state.get("best_val", math.inf)
            last_val = train_state.get("last_val", math.nan)
            history = train_state.get("history", [])
            resumed_window = train_state.get("window", [0.0, 0])
        else:
            print(f"minilm: {last_path} was written with other params; starting afresh")
    resumed_from = step
    if logger is not None:
        # rows logged before the interruption but maybe never sent (a killed process loses its metric
        # buffer); a resumable logger skips the steps it already holds
        for row in history:
            logger.log_metrics({k: v for k, v in row.items() if k != "step"}, int(row["step"]))

    loss_fn = torch.compile(token_loss_sum) if cfg.compile else token_loss_sum
    params = [p for p in model.parameters() if p.requires_grad]

    def checkpoint(path: Path, kind: str, weights: dict[str, torch.Tensor] | None = None) -> None:
        train_state = {"best_val": best_val, "last_val": last_val, "skipped": skipped,
                       "window": [window_loss, window_n],
                       "history": history, "ema_updates": ema.updates if ema else 0,
                       "precision": precision}
        if scaler is not None:
            train_state["scaler"] = scaler.state_dict()
        extra = dict(checkpoint_extra or {}, train_state=train_state, kind=kind)
        full = kind == "last"
        ckpt_io.save_checkpoint(
            path, model, step=step, config=run_config, state=weights if weights is not None else save_state(model),
            optimizer=optimizer if full else None, rng=full,
            ema_state=ema.state_dict() if (ema is not None and full) else None, extra=extra)
        if on_checkpoint is not None:
            on_checkpoint(kind, path)

    def run_eval() -> float:
        if not eval_batches:
            return math.nan
        if ema is not None and cfg.ema_for_eval:
            with ema.swapped(model):
                return evaluate_loss(model, eval_batches, device=device, precision=precision, loss_fn=loss_fn)
        return evaluate_loss(model, eval_batches, device=device, precision=precision, loss_fn=loss_fn)

    def save_best() -> None:
        if ema is not None and cfg.ema_for_eval:
            with ema.swapped(model):
                checkpoint(best_path, "best")
        else:
            checkpoint(best_path, "best")

    bar = None
    if progress and step < cfg.max_steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   leave=False)
    window_loss, window_n = float(resumed_window[0]), int(resumed_window[1])
    window_tokens, t_window = 0, time.perf_counter()
    interrupted = False
    t_start = time.perf_counter()
    with _StopFlag() as stop:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro = [_unpack(data.batch(step, m), device) for m in range(cfg.grad_accum)]
            loss_sum = accumulate_gradients(model, micro, device=device, precision=precision, scaler=scaler,
                                            loss_fn=loss_fn)
            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            loss_val, norm_val = loss_sum.item(), grad_norm.item()
            if not (math.isfinite(loss_val) and math.isfinite(norm_val)) and scaler is None:
                optimizer.zero_grad(set_to_none=True)
                what = "loss" if not math.isfinite(loss_val) else "gradient norm"
                if cfg.nonfinite == "stop":
                    if bar is not None:
                        bar.close()
                    raise TrainingError(
                        f"non-finite {what} at step {step + 1}; the last good checkpoint "
                        f"({last_path.name}) was kept. Usual causes: lr too high ({cfg.lr}), fp16 "
                        "overflow (use bf16 or fp32), no grad_clip; or set nonfinite: skip")
                skipped += 1
                if skipped > cfg.max_skipped:
                    raise TrainingError(f"{skipped} non-finite steps (more than max_skipped="
                                        f"{cfg.max_skipped}) by step {step + 1}; lower lr or use fp32")
                step += 1
                continue
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            step += 1
            window_loss += loss_val
            window_n += 1
            window_tokens += (sum(tokens_per_batch(b) for b in micro) if tokens_per_batch
                              else sum(x.numel() for x, _, _ in micro))

            row: dict[str, float] = {}
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                dt = time.perf_counter() - t_window
                row.update(train_loss=window_loss / window_n, lr=lr, grad_norm=norm_val,
                           tokens_per_sec=window_tokens / max(dt, 1e-9))
                window_loss, window_n, window_tokens, t_window = 0.0, 0, 0, time.perf_counter()
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                last_val = run_eval()
                row["val_loss"] = last_val
                improved = math.isfinite(last_val) and last_val < best_val
                if improved or not eval_batches:
                    best_val = last_val if improved else best_val
                    save_best()
            save_due = (step % cfg.save_every == 0) if cfg.save_every else ("val_loss" in row)
            if row:
                row = {"step": step, **row}
                history.append(row)
                if logger is not None:
                    logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step)
                if bar is not None and "train_loss" in row:
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", lr=f"{lr:.2e}",
                                    tok_s=f"{row['tokens_per_sec']:.0f}")
            if save_due or step == cfg.max_steps or stop.signum is not None:
                checkpoint(last_path, "last")
            if bar is not None:
                bar.update(1)
            if stop.signum is not None:
                interrupted = True
                break
    if bar is not None:
        bar.close()
    if not best_path.exists() and last_path.exists() and not interrupted:
        save_best()
    return TrainResult(step=step, best_val_loss=best_val, last_val_loss=last_val, history=history,
                       resumed_from=resumed_from, skipped_steps=skipped, interrupted=interrupted,
                       seconds=time.perf_counter() - t_start)


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the weights a checkpoint holds (a full model or, for adapters, a subset)."""
    own = dict(model.state_dict())
    missing_full = [k for k in own if k not in state and k != "lm_head.weight"]
    if not missing_full:
        ckpt_io.load_model_state(model, state)
        return
    unknown = [k for k in state if k not in own]
    if unknown:
        from .errors import CheckpointError
        raise CheckpointError(f"checkpoint holds weights the model lacks ({unknown[:3]}); it was made "
                              "for another model")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def train_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return to_dict(cfg)
