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
files a killed save left behind are removed. Checkpoints are copied and then written in a background
thread (:mod:`minilm.ckptwriter`); every way out of :func:`train` waits for them.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt_io
from .ckptwriter import CheckpointWriter
from .config import TrainConfig
from .distributed import SINGLE, Parallel
from .ema import EMA
from .errors import ConfigError, TrainingError
from .fileio import check_writable, remove_stale_temps
from .model import lm_loss
from .optim import build_optimizer, clip_gradients  # noqa: F401  (re-exported: benchmarks and tests use them)
from .precision import autocast, resolve_precision, set_matmul_precision
from .prefetch import StepBatches, to_device
from .schedule import decay_start, lr_at

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
    throughput: list[dict[str, float]] = field(default_factory=list)  # tokens/s per logged step
    resumed_from: int = 0           # step the run continued from (0 = fresh)
    skipped_steps: int = 0          # non-finite steps skipped (nonfinite: skip)
    interrupted: bool = False       # stopped early by SIGINT/SIGTERM (``last`` was saved)
    seconds: float = 0.0            # wall time of this invocation's training loop
    tf32: bool = False              # CUDA fp32 matmuls ran on TF32 tensor cores (precision fp32 on CUDA)

    @property
    def completed(self) -> bool:
        return not self.interrupted


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
                  precision: str = "fp32", loss_fn: LossFn = token_loss_sum,
                  count: Callable[[torch.Tensor], int] | None = None) -> float:
    """Mean loss per counted unit over a fixed set of batches: per target token by default (targets
    of -100 are ignored), per ``count(y)`` otherwise (an objective's units, e.g. DPO's pairs)."""
    was_training = model.training
    set_matmul_precision(device, precision)       # TF32 for fp32 on CUDA
    model.eval()
    count_fn = count or _target_tokens
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0   # summed on the device: one sync
    try:
        with torch.no_grad():
            for b in batches:
                count += count_fn(b[1])                   # on the batch as given (the CPU): no device sync
                x, y, kw = _unpack(b, device)
                with autocast(device, precision):
                    total += loss_fn(model, x, y, kw).double()
    finally:
        model.train(was_training)
    return total.item() / max(count, 1)


def accumulate_gradients(model: nn.Module, micro: Sequence[tuple[torch.Tensor, torch.Tensor, dict]], *,
                         device: torch.device, precision: str = "fp32",
                         scaler: torch.amp.GradScaler | None = None,
                         loss_fn: LossFn = token_loss_sum, n_targets: int | None = None,
                         no_sync: Callable[[], Any] | None = None) -> torch.Tensor:
    """Backward over the micro-batches of one optimizer step; returns the step's mean token loss.

    The loss is normalised by the number of target tokens in the *whole* accumulated batch, so the
    gradient equals that of one big batch even when micro-batches hold different numbers of targets.
    ``loss_fn`` is :func:`token_loss_sum` or a compiled version of it. Under data parallelism
    ``n_targets`` is the count over every rank's micro-batches (the returned loss is then this rank's
    share of the global mean) and ``no_sync`` (DDP's) skips the gradient sync before the last backward.
    """
    if n_targets is None:
        n_targets = count_targets(micro)
    loss_sum = torch.zeros((), device=device)
    for i, (x, y, kw) in enumerate(micro):
        last = i == len(micro) - 1
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            with autocast(device, precision):
                loss = loss_fn(model, x, y, kw) / max(n_targets, 1)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
    return loss_sum


def _target_tokens(y: torch.Tensor) -> int:
    return int((y != -100).sum())


def count_targets(micro: Sequence[tuple[torch.Tensor, torch.Tensor, dict]]) -> int:
    return sum(_target_tokens(y) for _, y, _ in micro)


class Objective(Protocol):
    """Another loss for the one loop (e.g. :class:`minilm.dpo.DPOObjective`): called like
    :func:`token_loss_sum`, it returns the batch's summed loss, ``count(y)`` the units it summed over,
    and ``metrics(training, reduce)`` the figures it gathered since last asked (``reduce`` sums a list over
    data-parallel ranks), added to the logged train and validation rows. An objective that gathers figures
    across steps may add ``state_dict()``/``load_state_dict()``: ``last`` then carries them."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor: ...

    def count(self, y: torch.Tensor) -> int: ...

    def metrics(self, training: bool, reduce: Callable[[list[float]], list[float]]) -> dict[str, float]: ...


_unpack = to_device      # (x, y, kwargs) on the device


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


# --------------------------------------------------------------------------------------------------
# the state a run carries from step to step, and its checkpoints


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly where it stopped.

    ``history`` holds what a run computes (losses, lr, gradient norm): the same on every run of the same
    params. ``throughput`` holds what it measured (tokens/s): it stays out of ``best`` and of any file a
    pipeline caches.
    """

    step: int = 0
    best_val: float = math.inf
    last_val: float = math.nan
    skipped: int = 0
    window_loss: float = 0.0          # the partial train-loss average since the last logged row
    window_n: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    throughput: list[dict[str, float]] = field(default_factory=list)

    def to_meta(self) -> dict[str, Any]:
        return {"best_val": self.best_val, "last_val": self.last_val, "skipped": self.skipped,
                "window": [self.window_loss, self.window_n], "history": self.history,
                "throughput": self.throughput}

    @classmethod
    def from_meta(cls, step: int, meta: dict[str, Any]) -> "TrainState":
        window = meta.get("window", [0.0, 0])
        return cls(step=step, best_val=meta.get("best_val", math.inf), last_val=meta.get("last_val", math.nan),
                   skipped=meta.get("skipped", 0), window_loss=float(window[0]), window_n=int(window[1]),
                   history=meta.get("history", []), throughput=meta.get("throughput", []))


@dataclass
class _Checkpoints:
    """``last`` (everything needed to resume, plus ``last_extra``) and ``best`` (the weights and what
    describes them: no optimizer, no timings, no run ids - a pure function of params, data and seed)."""

    out_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    scaler: torch.amp.GradScaler | None
    run_config: dict[str, Any]
    save_state: Callable[[nn.Module], dict[str, torch.Tensor]]
    extra: dict[str, Any]
    last_extra: dict[str, Any]
    precision: str
    on_checkpoint: Callable[[str, Path], None] | None = None
    par: Parallel = field(default_factory=Parallel)   # data parallel: every rank gathers, rank 0 writes
    objective: Any = None                             # its figures since the last row travel in ``last``
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)   # writes in the background

    @property
    def last(self) -> Path:
        return self.out_dir / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.out_dir / "best.safetensors"

    @property
    def stable(self) -> Path:
        return self.out_dir / "stable.safetensors"

    def save_last(self, state: TrainState, cfg: TrainConfig, kind: str = "last") -> None:
        """``last`` (or, with ``kind="stable"``, WSD's branch point): the whole state of the run."""
        train_state = dict(state.to_meta(), ema_updates=self.ema.updates if self.ema else 0,
                           precision=self.precision, decay_start=decay_start(cfg),
                           max_steps=cfg.max_steps, world_size=self.par.world)
        if self.objective is not None and hasattr(self.objective, "state_dict"):
            train_state["objective"] = self.objective.state_dict()
        if self.scaler is not None:
            train_state["scaler"] = self.scaler.state_dict()
        extra = dict(self.extra, **self.last_extra, train_state=train_state, kind=kind)
        par = self.par
        weights, optim = par.full_state(self.save_state(self.model)), par.optimizer_state(self.optimizer)
        ema = par.full_state(self.ema.state_dict()) if self.ema else None
        if not par.is_main:
            return
        tensors, meta = ckpt_io.checkpoint_contents(self.model, step=state.step, config=self.run_config,
                                                    state=weights, optimizer=_StateOf(optim), rng=True,
                                                    ema_state=ema, extra=extra)
        # ``stable`` shares the buffers of ``last``: it is written once a run, and pinned memory is scarce
        self.writer.save("last", self.last if kind == "last" else self.stable, tensors, meta,
                         done=lambda: self._saved(kind))

    def save_best(self, state: TrainState, swap_ema: bool) -> None:
        extra = dict(self.extra, kind="best", val_loss=state.best_val)
        with (self.ema.swapped(self.model) if (swap_ema and self.ema) else contextlib.nullcontext()):
            weights = self.par.full_state(self.save_state(self.model))   # views: copied while swapped
            if self.par.is_main:
                tensors, meta = ckpt_io.checkpoint_contents(self.model, step=state.step, state=weights,
                                                            config=self.run_config, extra=extra)
                self.writer.save("best", self.best, tensors, meta, done=lambda: self._saved("best"))

    def _saved(self, kind: str) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(kind, getattr(self, kind))

    def restore(self, cfg: TrainConfig) -> TrainState | None:
        """Load the checkpoint :func:`resume_point` picks into the model, optimizer, EMA, scaler and RNG;
        None (and nothing loaded) when there is none."""
        par = self.par     # rank 0 reads (only its disk need hold the checkpoint) and sends it to all
        path = par.from_main(lambda: resume_point(self.out_dir, self.run_config, cfg))
        if path is None:
            if par.is_main and self.last.exists():
                print(f"minilm: {self.last} was written with other params or is finished; starting afresh")
            return None
        ckpt = par.from_main(lambda: ckpt_io.load_checkpoint(path))
        _load_weights(self.model, par.local_state(ckpt.model_state, self.model.state_dict()))
        par.load_optimizer_state(self.optimizer, ckpt.optimizer_state)
        meta = ckpt.meta["extra"].get("train_state", {})
        if par.is_main and meta.get("world_size", 1) != par.world:
            print(f"minilm: resuming step {ckpt.step} of a run on {meta.get('world_size', 1)} process(es) "
                  f"with {par.world}")
        if self.ema is not None and ckpt.ema_state is not None:
            self.ema.load_state_dict(par.local_state(ckpt.ema_state, self.ema.state_dict()),
                                     meta.get("ema_updates", 0))
        if self.scaler is not None and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        if self.objective is not None and "objective" in meta:
            self.objective.load_state_dict(meta["objective"])
        ckpt_io.restore_rng(ckpt.rng_state)
        return TrainState.from_meta(ckpt.step, meta)


class _StateOf:
    """An optimizer's state already gathered (what :func:`minilm.checkpoint.save_checkpoint` reads)."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self.sd


def resume_point(out_dir: str | Path, run_config: dict[str, Any], cfg: TrainConfig) -> Path | None:
    """The checkpoint a run of ``cfg`` continues from, or None to start afresh.

    ``last`` when it was written with the same ``run_config`` up to ``max_steps`` and stopped before
    ``cfg.max_steps`` (an interrupted run, or a finished one given more steps). When ``last`` has
    already left the learning-rate curve the new run follows (it was in WSD's decay phase, or a cosine
    run of another length), the WSD branch point ``stable`` is taken instead if it lies on that curve: the
    continued run then computes exactly what a run of ``cfg.max_steps`` from scratch would.
    """
    out_dir = Path(out_dir)
    run_config = json.loads(json.dumps(run_config))
    last = _continuable(out_dir / "last.safetensors", run_config, cfg.max_steps)
    if last is None:
        return None
    path, step, (saved_max, saved_decay) = last
    if saved_max == cfg.max_steps or step <= min(saved_decay, decay_start(cfg)):
        return path
    stable = _continuable(out_dir / "stable.safetensors", run_config, cfg.max_steps)
    if stable is not None and stable[1] <= decay_start(cfg):
        return stable[0]
    return path


def _continuable(path: Path, run_config: dict[str, Any], max_steps: int
                 ) -> tuple[Path, int, tuple[int | None, int]] | None:
    """(path, step, (max_steps, decay start) it was trained towards) of a checkpoint this run may
    continue."""
    if not path.exists():
        return None
    meta = ckpt_io.read_meta(path)
    if not continues(meta.get("config"), run_config) or meta["step"] >= max_steps:
        return None
    saved = meta.get("extra", {}).get("train_state", {})
    return path, meta["step"], (saved.get("max_steps"), saved.get("decay_start", meta["step"]))


def _without_length(run_config: Any) -> Any:
    """``run_config`` with every ``max_steps`` removed: the keys that may change when a run continues."""
    if isinstance(run_config, dict):
        return {k: _without_length(v) for k, v in run_config.items() if k != "max_steps"}
    return run_config


def continues(saved: Any, run_config: dict[str, Any]) -> bool:
    """Whether a checkpoint written with ``saved`` can be continued by a run of ``run_config``."""
    return saved is not None and _without_length(saved) == _without_length(run_config)


# --------------------------------------------------------------------------------------------------
# reporting: the logger, and a progress bar on a terminal or a plain line every so often elsewhere


class _Progress:
    """tqdm on a terminal; off one (CI logs, ``dvc repro > log``) a plain line per ~5% of the run."""

    def __init__(self, enabled: bool, start: int, total: int, stream: Any = None) -> None:
        self.total, self.bar, self.last_line = total, None, start
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and start < total
        self.every = max(1, total // 20)
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            leave=False, file=self.stream)

    def update(self, step: int, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if "train_loss" in row:
                self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", lr=f"{row['lr']:.2e}")
            self.bar.update(1)
        elif step - self.last_line >= self.every or step == self.total:
            self.last_line = step
            parts = [f"{k} {row[k]:.4g}" for k in ("train_loss", "val_loss", "lr") if k in row]
            print(f"train: step {step}/{self.total}" + (": " + ", ".join(parts) if parts else ""),
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------
# the loop


def _nonfinite(cfg: TrainConfig, state: TrainState, what: str, last: Path) -> None:
    """The non-finite policy: stop with one line (``last`` kept), or count a skipped step."""
    if cfg.nonfinite == "stop":
        raise TrainingError(
            f"non-finite {what} at step {state.step + 1}; the last good checkpoint ({last.name}) was kept. "
            f"Usual causes: lr too high ({cfg.lr}), fp16 overflow (use bf16 or fp32), no grad_clip; or set "
            "nonfinite: skip")
    state.skipped += 1
    if state.skipped > cfg.max_skipped:
        raise TrainingError(f"{state.skipped} non-finite steps (more than max_skipped={cfg.max_skipped}) by "
                            f"step {state.step + 1}; lower lr or use fp32")


def _clip(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
          params: list[torch.Tensor], grad_clip: float) -> float:
    """Unscale (fp16) and clip the gradients; returns their norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = clip_gradients(params, grad_clip)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()   # FSDP2: a DTensor


def _step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None:        # the scaler skips a non-finite step itself and lowers its scale
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train(model: nn.Module, data: BatchSource, cfg: TrainConfig, *, out_dir: str | Path,
          eval_batches: Sequence[Batch] = (), logger: MetricsLogger | None = None,
          run_config: dict[str, Any] | None = None, resume: bool = True, progress: bool = True,
          tokens_per_batch: Callable[[Batch], int] | None = None,
          save_state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
          checkpoint_extra: dict[str, Any] | None = None, last_extra: dict[str, Any] | None = None,
          on_checkpoint: Callable[[str, Path], None] | None = None,
          parallel: Parallel | None = None, objective: Objective | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps, writing ``last.safetensors`` and
    ``best.safetensors`` into ``out_dir``.

    ``run_config`` (JSON-able) is stored in every checkpoint; ``last`` is resumed only if it was written
    with an equal ``run_config`` up to ``max_steps`` (so a finished run given more steps continues).
    ``save_state`` picks the weights a checkpoint holds (default: the whole model; LoRA saves only the
    adapter). ``checkpoint_extra`` goes into both checkpoints, ``last_extra`` (e.g. a tracking run id)
    into ``last`` only. ``parallel`` (from :func:`minilm.distributed.init`) shares each step among
    torchrun's ranks: ``data.batch(step, m)`` must serve ``m < grad_accum * world``; rank 0 alone writes
    checkpoints and logs (pass ``logger`` on rank 0 only). ``objective`` (:class:`Objective`) replaces the
    token cross-entropy, e.g. with DPO's loss; ``val_loss`` is then its held-out mean.
    """
    par = parallel or SINGLE
    out_dir = check_writable(out_dir) if par.is_main else Path(out_dir)   # fails now, not at a checkpoint
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    tf32 = set_matmul_precision(device, precision)      # TF32 matmuls for fp32 on CUDA; CPU untouched
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model.train()
    if cfg.optimizer == "muon" and par.sharded:
        raise ConfigError("optimizer muon needs whole weight matrices, which FSDP shards; use distributed."
                          "strategy: ddp with it, or optimizer: adamw")
    net = par.wrap(model)         # forward/backward go through it; FSDP2 shards ``model`` in place
    optimizer = build_optimizer(model, cfg, device)
    ckpts = _Checkpoints(out_dir, model, optimizer, EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
                         torch.amp.GradScaler("cuda") if precision == "fp16" else None,
                         json.loads(json.dumps(run_config or {})), save_state or ckpt_io.model_state,
                         dict(checkpoint_extra or {}), dict(last_extra or {}), precision, on_checkpoint, par,
                         objective, CheckpointWriter(pin=device.type == "cuda"))
    for path in (ckpts.last, ckpts.best, ckpts.stable) if par.is_main else ():   # left by a killed save
        remove_stale_temps(path)
    torch.manual_seed(cfg.seed)
    state = (ckpts.restore(cfg) if resume else None) or TrainState()
    resumed_from, meter = state.step, _Meter(state, logger, tokens_per_batch, par, objective)
    loss_fn = objective or (torch.compile(token_loss_sum) if cfg.compile else token_loss_sum)
    count = objective.count if objective is not None else _target_tokens     # what a step's loss divides by
    params = [p for p in model.parameters() if p.requires_grad]
    swap_ema = ckpts.ema is not None and cfg.ema_for_eval
    bar, t_start, interrupted = (_Progress(progress and par.is_main, state.step, cfg.max_steps),
                                 time.perf_counter(), False)
    batches = StepBatches(data, par.micro_indices(cfg.grad_accum), device, count, cfg.max_steps)
    # every exit waits for the checkpoint writes and the batch thread
    with _StopFlag() as stop, par.guard(lambda: state.step), ckpts.writer, batches:
        while state.step < cfg.max_steps:
            lr = lr_at(state.step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)          # Muon's groups run at muon_lr / lr of it
            # a pure source's step k + 1 is drawn while step k runs; units counted on the host copy (no sync)
            micro, n_local = batches.get(state.step)
            loss, stopping = _gradients(net, micro, par, device=device, precision=precision, n_local=n_local,
                                        scaler=ckpts.scaler, loss_fn=loss_fn, stop=stop.signum is not None)
            norm = _clip(optimizer, ckpts.scaler, params, cfg.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(norm)) and ckpts.scaler is None:
                optimizer.zero_grad(set_to_none=True)
                _nonfinite(cfg, state, "loss" if not math.isfinite(loss) else "gradient norm", ckpts.last)
                state.step += 1
                continue
            _step(optimizer, ckpts.scaler)
            if ckpts.ema is not None:
                ckpts.ema.update(model)
            state.step += 1
            meter.add(loss, micro)
            step, final = state.step, state.step == cfg.max_steps
            row = meter.train_row(lr, norm) if step % cfg.log_every == 0 or final else {}
            if step % cfg.eval_every == 0 or final:
                row["val_loss"] = state.last_val = _run_eval(model, eval_batches, device, precision, loss_fn,
                                                             ckpts.ema if swap_ema else None, par, count)
                row.update(objective.metrics(False, par.sum) if objective is not None else {})
                improved = math.isfinite(state.last_val) and state.last_val < state.best_val
                if improved or not eval_batches:
                    state.best_val = state.last_val if improved else state.best_val
                    ckpts.save_best(state, swap_ema)
            meter.record(row)
            if step == decay_start(cfg) and not final:   # WSD's branch point for a longer run
                ckpts.save_last(state, cfg, kind="stable")
            save_due = (step % cfg.save_every == 0) if cfg.save_every else ("val_loss" in row)
            if save_due or final or stopping:
                ckpts.save_last(state, cfg)
            bar.update(step, row)
            if stopping:
                interrupted = True
                break
        bar.close()
        ckpts.writer.wait()
        if par.from_main(lambda: not ckpts.best.exists() and ckpts.last.exists()) and not interrupted:
            ckpts.save_best(state, swap_ema)
    return TrainResult(step=state.step, best_val_loss=state.best_val, last_val_loss=state.last_val,
                       history=state.history, throughput=state.throughput, resumed_from=resumed_from,
                       skipped_steps=state.skipped, interrupted=interrupted,
                       seconds=time.perf_counter() - t_start, tf32=tf32)


def _gradients(net: nn.Module, micro: list, par: Parallel, *, stop: bool, n_local: int,
               **kw: Any) -> tuple[float, bool]:
    """One step's backward over this rank's micro-batches: the global batch's mean token loss, and
    whether any rank was asked to stop (SIGINT/SIGTERM), decided by all ranks together."""
    n_targets = int(par.sum([n_local])[0])
    loss = accumulate_gradients(net, micro, n_targets=n_targets, no_sync=par.no_sync(net), **kw).item()
    loss, stops = par.sum([loss, float(stop)])
    return loss, stops > 0


class _Meter:
    """The train-loss average and the throughput between logged rows, and where rows go: the state's
    history (computed figures), its throughput (measured ones) and the logger (both).

    On creation the rows a resumed state already holds are replayed to the logger: a killed process
    loses its metric buffer, and a resumable logger skips the steps it already has."""

    def __init__(self, state: TrainState, logger: MetricsLogger | None,
                 tokens_per_batch: Callable[[Batch], int] | None, par: Parallel = SINGLE,
                 objective: Objective | None = None) -> None:
        self.state, self.logger, self.count, self.par = state, logger, tokens_per_batch, par
        self.objective = objective
        self.tokens, self.t0 = 0, time.perf_counter()
        if logger is not None:
            for row in _merged_rows(state.history, state.throughput):
                logger.log_metrics({k: v for k, v in row.items() if k != "step"}, int(row["step"]))

    def add(self, loss: float, micro: Sequence[Batch]) -> None:
        self.state.window_loss += loss
        self.state.window_n += 1
        self.tokens += sum(self.count(b) for b in micro) if self.count else sum(x.numel() for x, _, _ in micro)

    def train_row(self, lr: float, grad_norm: float) -> dict[str, float]:
        s, dt = self.state, time.perf_counter() - self.t0
        row = {"train_loss": s.window_loss / s.window_n, "lr": lr, "grad_norm": grad_norm}
        if self.objective is not None:
            row.update(self.objective.metrics(True, self.par.sum))
        tokens, dt = self.par.sum([self.tokens, dt])      # every rank's tokens; the mean rank's time
        s.throughput.append({"step": s.step, "tokens_per_sec": tokens / max(dt / self.par.world, 1e-9)})
        s.window_loss, s.window_n, self.tokens, self.t0 = 0.0, 0, 0, time.perf_counter()
        return row

    def record(self, row: dict[str, float]) -> None:
        if not row:
            return
        self.state.history.append({"step": self.state.step, **row})
        if self.logger is not None:
            speed = self.state.throughput[-1] if "train_loss" in row else {}
            self.logger.log_metrics({**row, **{k: v for k, v in speed.items() if k != "step"}}, self.state.step)


def _run_eval(model: nn.Module, batches: Sequence[Batch], device: torch.device, precision: str,
              loss_fn: LossFn, ema: EMA | None, par: Parallel = SINGLE,
              count: Callable[[torch.Tensor], int] | None = None) -> float:
    if not batches:
        return math.nan
    with (ema.swapped(model) if ema is not None else contextlib.nullcontext()):
        loss = evaluate_loss(model, batches, device=device, precision=precision, loss_fn=loss_fn, count=count)
        par.reshard(model)            # before the EMA swap is undone
        return loss


def _merged_rows(history: list[dict[str, float]], throughput: list[dict[str, float]]) -> list[dict[str, float]]:
    """History rows with the throughput measured at the same step (what a logger is sent)."""
    speed = {int(r["step"]): r for r in throughput}
    return [{**row, **{k: v for k, v in speed.get(int(row["step"]), {}).items() if k != "step"}}
            for row in history]


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
