"""Row 9: time to quality (the speedrun metric) and the levers that move it, three seeds each.

Row 5's run (nanoGPT's CPU shakespeare_char configuration trained with ``minilm.train``), timed from
building the model to the first evaluation (every 100 steps, the run's 20 fixed validation batches) whose
loss reaches nanoGPT's final validation loss, 1.886; the final loss after 2,000 steps is measured over 200
fixed batches as in row 5. Each lever changes one thing against the defaults:

- ``ema``: an exponential moving average of the weights (decay 0.995), evaluated instead of the weights;
- ``parallel``: the parallel residual block (attention and MLP side by side on one norm);
- ``wsd``: warmup, constant rate, linear decay over the last 20% of the steps;
- ``muon``: ``torch.optim.Muon`` for the blocks' weight matrices (``muon_lr`` 0.02), AdamW for the rest;
- ``compile``: ``torch.compile`` of the model with its loss (compile time included in the wall time).

Seeds 1337, 1338, 1339 set the initial weights and the batch order.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from minilm.config import ModelConfig, TrainConfig
from minilm.data import LMBatches
from minilm.model import GPT
from minilm.precision import resolve_precision
from minilm.train import evaluate_loss, train

from .harness import Context, line
from .quality import FINAL_EVAL_BATCHES, NANOGPT_VAL_LOSS, NANOGPT_WALL_S, split_tokens

TARGET_SHARE = 0.25                 # of nanoGPT's wall time
QUICK_TARGET = 4.0                  # --quick (30 steps): a loss just under uniform's ln 69, so the clock runs
SEEDS = (1337, 1338, 1339)
LEVERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {   # name -> (model changes, training changes)
    "defaults": ({}, {}),
    "ema": ({}, {"ema_decay": 0.995}),
    "parallel": ({"block": "parallel"}, {}),
    "wsd": ({}, {"schedule": "wsd", "decay_fraction": 0.2}),
    "muon": ({}, {"optimizer": "muon", "muon_lr": 0.02}),
    "compile": ({}, {"compile": True}),
}


class _Clock:
    """A logger that notes when an evaluation first reaches ``target``."""

    def __init__(self, t0: float, target: float) -> None:
        self.t0, self.target, self.reached, self.step = t0, target, None, None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.reached is None and metrics.get("val_loss", float("inf")) <= self.target:
            self.reached, self.step = time.perf_counter() - self.t0, step


def one_run(train_ids, val_ids, vocab: int, work: Path, seed: int, lever: str, steps: int,
            final_batches: int, target: float = NANOGPT_VAL_LOSS) -> dict[str, Any]:
    model_kw, train_kw = LEVERS[lever]
    mcfg = ModelConfig(vocab_size=vocab, context_length=64, n_layer=4, n_head=4, d_model=128, dropout=0.0,
                       **model_kw)
    tcfg = TrainConfig(max_steps=steps, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=min(100, steps // 3),
                       schedule="cosine", beta2=0.99, weight_decay=0.1, grad_clip=1.0, seed=seed)
    tcfg = dataclasses.replace(tcfg, **train_kw)
    data = LMBatches(train_ids, tcfg.batch_size, mcfg.context_length, seed=seed)
    val = LMBatches(val_ids, tcfg.batch_size, mcfg.context_length, seed=1337)   # the same batches for all
    torch._dynamo.reset()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    clock = _Clock(t0, target)
    model = GPT(mcfg)
    train(model, data, tcfg, out_dir=work / f"{lever}-{seed}", eval_batches=val.eval_batches(20),
          logger=clock, progress=False, resume=False)
    wall = time.perf_counter() - t0
    precision = resolve_precision(tcfg.precision, torch.device("cpu"))
    if tcfg.ema_decay > 0:                       # evaluate the final averaged weights
        model.load_state_dict(final_ema(work / f"{lever}-{seed}"), strict=False)
    final = evaluate_loss(model, val.eval_batches(final_batches, seed=1), device=torch.device("cpu"),
                          precision=precision)
    return {"lever": lever, "seed": seed, "time_to_target_s": clock.reached, "step_reached": clock.step,
            "final_val_loss": final, "wall_s": wall}


def final_ema(out: Path) -> dict[str, torch.Tensor]:
    from minilm.checkpoint import load_checkpoint

    return load_checkpoint(out / "last.safetensors").ema_state


def run(ctx: Context) -> dict[str, Any]:
    path = Path(ctx.shakespeare) if ctx.shakespeare is not None else None
    if path is None or not path.is_file():
        why = f"{path} not found" if path is not None else "no --shakespeare given"
        return {"skipped": f"{why}: row 9 needs tinyshakespeare.txt; pass --shakespeare PATH", "lines": [],
                "notes": []}
    steps, seeds = (30, SEEDS[:1]) if ctx.quick else (2000, SEEDS)
    goal = QUICK_TARGET if ctx.quick else NANOGPT_VAL_LOSS
    levers = ["defaults", "muon"] if ctx.quick else list(LEVERS)
    runs = []
    with tempfile.TemporaryDirectory(prefix="minilm-bench-speedrun-") as tmp:
        work = Path(tmp)
        train_ids, val_ids, vocab = split_tokens(path, work)
        for seed in seeds:                 # seeds outermost: a drift in the machine's speed hits every lever
            for lever in levers:
                runs.append(one_run(train_ids, val_ids, vocab, work, seed, lever, steps,
                                    8 if ctx.quick else FINAL_EVAL_BATCHES, goal))
                r = runs[-1]
                ctx.log(f"  row 9: {lever} seed {seed}: target at {r['time_to_target_s']} s "
                        f"(step {r['step_reached']}), final {r['final_val_loss']:.4f}, wall {r['wall_s']:.1f} s")
    target_s = TARGET_SHARE * NANOGPT_WALL_S
    lines = []
    for lever in levers:
        mine = [r for r in runs if r["lever"] == lever]
        reached = [r["time_to_target_s"] for r in mine if r["time_to_target_s"] is not None]
        t = statistics.mean(reached) if len(reached) == len(mine) else None
        final = statistics.mean(r["final_val_loss"] for r in mine)
        lines.append(line(
            f"{lever}: time to val loss {goal}", "s", t, baseline_name="nanoGPT's whole run (reference)",
            baseline=NANOGPT_WALL_S if not ctx.quick else None,
            ratio=NANOGPT_WALL_S / t if t and not ctx.quick else None,
            target=f"<= {target_s:.1f} s ({TARGET_SHARE:.0%})" if not ctx.quick else None,
            met=(t is not None and t <= target_s) if not ctx.quick else None,
            per_seed_s=[r["time_to_target_s"] for r in mine], steps_reached=[r["step_reached"] for r in mine],
            final_val_loss_mean=final, final_val_loss_per_seed=[r["final_val_loss"] for r in mine],
            final_val_loss_sd=statistics.pstdev(r["final_val_loss"] for r in mine),
            wall_s_mean=statistics.mean(r["wall_s"] for r in mine)))
    notes = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}) x {len(levers)} settings, {steps} steps each, "
             "run seed by seed; the time is the mean over the seeds (None if a seed never reached the loss); "
             "evaluations every 100 steps on 20 fixed batches, so the time is that of the first evaluation "
             "at or below the loss (evaluation included). Final loss: 200 fixed batches after the run "
             "(EMA: the averaged weights)."]
    return {"lines": lines, "notes": notes, "runs": runs}
