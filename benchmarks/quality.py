"""Row 5: quality at equal compute - nanoGPT's CPU shakespeare_char run, trained with ``minilm.train``.

nanoGPT's configuration: char tokenizer; 4 layers, 4 heads, d_model 128, context 64, batch 12, 2000 steps,
lr 1e-3 cosine to 1e-4 after 100 warm-up steps, beta2 0.99, weight decay 0.1, clip 1.0, dropout 0; the
first 90% of the characters train, the last 10% validate. Everything else is minilm's default (model:
SwiGLU, RMSNorm, RoPE, tied embeddings; training: precision ``auto``, evaluation every 100 steps over 20
batches, checkpoints as ``train()`` writes them, no compile). The final validation loss is measured after
training over 200 fixed batches of 12 (nanoGPT's eval_iters). The nanoGPT figures are the project's
reference measurement on this machine type (ANCHORS), not run here.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minilm.config import ModelConfig, TokenizerConfig, TrainConfig
from minilm.data import LMBatches
from minilm.model import GPT
from minilm.precision import resolve_precision
from minilm.tokenizer import build_char_tokenizer
from minilm.train import evaluate_loss, train

from .harness import Context, line

NANOGPT_VAL_LOSS, NANOGPT_MS_PER_STEP, NANOGPT_WALL_S = 1.886, 49.0, 94.0
TARGET_LOSS, TARGET_WALL_S = 1.70, 100.0
FINAL_EVAL_BATCHES = 200


def split_tokens(path: Path, work: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(train, val, vocab size): the file's characters as ids, cut at 90% exactly as nanoGPT does."""
    tok = build_char_tokenizer(path, work / "chars.json", TokenizerConfig(kind="char"))
    ids = np.array(tok.encode(path.read_text(encoding="utf-8")), dtype=np.uint16)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], tok.vocab_size


def run(ctx: Context) -> dict[str, Any]:
    path = Path(ctx.shakespeare) if ctx.shakespeare is not None else None
    if path is None or not path.is_file():
        why = f"{path} not found" if path is not None else "no --shakespeare given"
        return {"skipped": f"{why}: row 5 needs tinyshakespeare.txt (char-rnn's 1.1 MB input.txt, which "
                           "minilm does not ship); pass --shakespeare PATH", "lines": [], "notes": []}
    steps = 30 if ctx.quick else 2000
    with tempfile.TemporaryDirectory(prefix="minilm-bench-quality-") as tmp:
        work = Path(tmp)
        train_ids, val_ids, vocab = split_tokens(path, work)
        mcfg = ModelConfig(vocab_size=vocab, context_length=64, n_layer=4, n_head=4, d_model=128, dropout=0.0)
        tcfg = TrainConfig(max_steps=steps, batch_size=12, lr=1e-3, min_lr=1e-4,
                           warmup_steps=min(100, steps // 3), schedule="cosine", beta2=0.99, weight_decay=0.1,
                           grad_clip=1.0)
        data = LMBatches(train_ids, tcfg.batch_size, mcfg.context_length, seed=tcfg.seed)
        val = LMBatches(val_ids, tcfg.batch_size, mcfg.context_length, seed=tcfg.seed)
        torch.manual_seed(tcfg.seed)
        t0 = time.perf_counter()
        model = GPT(mcfg)
        result = train(model, data, tcfg, out_dir=work / "run",
                       eval_batches=val.eval_batches(tcfg.eval_batches), progress=False)
        wall = time.perf_counter() - t0
        precision = resolve_precision(tcfg.precision, torch.device("cpu"))
        final = evaluate_loss(model, val.eval_batches(8 if ctx.quick else FINAL_EVAL_BATCHES, seed=1),
                              device=torch.device("cpu"), precision=precision)
    ms = 1000 * result.seconds / max(result.step, 1)
    lines = [
        line("val loss after the run", "val loss", final, baseline_name="nanoGPT (reference, not run here)",
             baseline=NANOGPT_VAL_LOSS, ratio=NANOGPT_VAL_LOSS / final if final > 0 else None,
             target=f"<= {TARGET_LOSS}" if not ctx.quick else None,
             met=(final <= TARGET_LOSS) if not ctx.quick else None, steps=result.step,
             best_val_loss_during_run=result.best_val_loss, precision=precision,
             parameters=model.num_parameters(), vocab_size=vocab),
        line("wall time of the run", "s", wall, baseline_name="nanoGPT (reference, not run here)",
             baseline=NANOGPT_WALL_S if not ctx.quick else None,
             ratio=NANOGPT_WALL_S / wall if not ctx.quick else None,
             target=f"<= {TARGET_WALL_S:g} s" if not ctx.quick else None,
             met=(wall <= TARGET_WALL_S) if not ctx.quick else None, train_loop_s=result.seconds),
        line("time per step (incl. eval and checkpoints)", "ms/step", ms,
             baseline_name="nanoGPT (reference, not run here)", baseline=NANOGPT_MS_PER_STEP,
             ratio=NANOGPT_MS_PER_STEP / ms if ms > 0 else None),
    ]
    notes = [f"{path.name}: {len(train_ids) + len(val_ids):,} characters, vocab {vocab} (65 characters + "
             f"minilm's 4 reserved ids); {steps} steps; precision 'auto' resolved to {precision}; final val "
             f"loss over {8 if ctx.quick else FINAL_EVAL_BATCHES} fixed batches of 12. Wall time covers "
             "building the model and train() (periodic evaluation and checkpoint writes included)."]
    if ctx.quick:
        notes.append("--quick: a few steps only, so the loss is far from converged and no target applies")
    if not math.isfinite(final):
        notes.append("the final loss is not finite")
    return {"lines": lines, "notes": notes}
