"""pretrain: train the base language model on out/encoded per params `model` and `pretrain`.

Writes out/pretrain/{last,best}.safetensors, metrics.json, history.csv, loss.png; wall time and
throughput go to the run record out/runs/pretrain.json and MLflow. If `last` was written with the same params
and code, training resumes from it (continuing the same MLflow run); raising only `max_steps` continues a
finished run (with `schedule: wsd`, from its stable-phase checkpoint, exactly as a longer run would); any
other change starts afresh. SIGINT/SIGTERM save `last` before exiting. With `distributed.nproc_per_node`
above 1 (or started by torchrun) the ranks share each step and rank 0 alone writes and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

from minilm.checkpoint import init_weights_from
from minilm.config import to_dict
from minilm.data import LMBatches, load_tokens, read_meta
from minilm.errors import CheckpointError, TrainingError, run_main
from minilm.evaluation import lm_metrics, target_counts
from minilm.fileio import write_json
from minilm.model import GPT
from minilm.tokenizer import load_tokenizer
from minilm.train import train

from .common import ENCODED, PRETRAIN, setup, stage_run, tokenizer_path
from .training import (global_config, rank_tags, resume_run_id, stage_fingerprint, start_ranks,
                       stop_if_interrupted, timings, write_curves)

PARAMS = ["model", "pretrain", "distributed", "project.device"]   # dvc.yaml's (progress, mlflow: display)


def main(argv: list[str] | None = None) -> None:
    params = setup("pretrain", __doc__, argv)
    par = start_ranks("pretrain", params, argv)
    if par is None:             # this process ran the stage as torchrun's ranks
        return
    tok = load_tokenizer(tokenizer_path())
    meta = read_meta(ENCODED)
    if meta["vocab_size"] != tok.vocab_size or meta["tokenizer_hash"] != tok.hash:
        raise TrainingError(f"{ENCODED} was encoded with another tokenizer; run `dvc repro encode`")
    model_cfg = dataclasses.replace(params.model, vocab_size=tok.vocab_size).validate()
    cfg = params.pretrain
    T = model_cfg.context_length
    data = LMBatches(load_tokens(ENCODED / "train.bin"), cfg.batch_size, T, seed=cfg.seed)
    evals = LMBatches(load_tokens(ENCODED / "val.bin"), cfg.batch_size, T, seed=cfg.seed)
    eval_batches = evals.eval_batches(cfg.eval_batches, seed=cfg.seed)
    device = par.device
    import torch
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    init_sha = initial_weights(model, cfg.init_from, tok.hash)
    model.to(device)
    run_config = {"model": to_dict(model_cfg), "pretrain": to_dict(global_config(cfg, par)),
                  "tokenizer_sha256": tok.hash, "data_sha256": meta.get("source_sha256"),
                  "init_sha256": init_sha, "code_sha256": stage_fingerprint("pretrain")}
    resume_id = resume_run_id(PRETRAIN, run_config, cfg)
    n_params = model.num_parameters()
    facts: dict = {}
    ctx = (stage_run("pretrain", params, ["model", "pretrain", "distributed", "project"], out_dir=PRETRAIN,
                     inputs={"encoded": ENCODED / "meta.json", "tokenizer": tokenizer_path()},
                     resume_run_id=resume_id, tags={"minilm.parameters": n_params, **rank_tags(par)},
                     facts=facts, parent_metrics=["train_loss", "val_loss", "final_best_val_loss",
                                                  "final_best_val_bits_per_byte"])
           if par.is_main else contextlib.nullcontext())     # rank 0 alone logs and writes
    with ctx as run:
        if par.is_main:
            print(f"pretrain: {n_params / 1e6:.2f}M parameters"
                  + (f" from {cfg.init_from}" if cfg.init_from else "")
                  + f", {cfg.max_steps} steps of {cfg.batch_size * cfg.grad_accum * par.world}x{T} tokens "
                  f"on {device}" + (f" x {par.world} processes" if par.active else "")
                  + (f" (resuming run {resume_id})" if resume_id else ""))
        result = train(model, data, cfg, out_dir=PRETRAIN, eval_batches=eval_batches, logger=run,
                       run_config=run_config, progress=params.project.progress, parallel=par,
                       checkpoint_extra={"tokenizer_sha256": tok.hash,
                                         **({"init_sha256": init_sha} if init_sha else {})},
                       last_extra={"mlflow_run_id": run.run_id} if run else {})
        par.close()
        stop_if_interrupted("pretrain", result)
        if run is None:
            return
        write_curves(result.history, PRETRAIN, "pretrain loss")
        tokens, n_bytes = target_counts(eval_batches, tok.token_bytes())
        val = lm_metrics(result.best_val_loss, tokens=tokens, n_bytes=n_bytes)
        metrics = {"best_val_loss": val["loss"], "best_val_perplexity": val["perplexity"],
                   "best_val_bits_per_byte": val.get("bits_per_byte", math.nan),
                   "last_val_loss": result.last_val_loss, "steps": result.step,
                   "parameters": n_params, "skipped_steps": result.skipped_steps}
        write_json(PRETRAIN / "metrics.json", metrics)
        facts.update(timings(result))
        run.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=result.step)
        run.log_metrics({k: facts[k] for k in ("train_seconds", "resumed_from_step")}, step=result.step)
        for name in ("metrics.json", "history.csv", "loss.png"):
            run.log_artifact(PRETRAIN / name)
        if params.mlflow.log_checkpoints:
            run.log_checkpoint(PRETRAIN / "best.safetensors")
    print(f"pretrain: best val loss {val['loss']:.4f} (perplexity {val['perplexity']:.2f}, "
          f"{val.get('bits_per_byte', math.nan):.3f} bits/byte) in {result.seconds:.0f}s")


def initial_weights(model: GPT, init_from: str, tokenizer_hash: str) -> str | None:
    """Load `pretrain.init_from` (weights only) into ``model``; its SHA-256 (None: random init)."""
    if not init_from:
        return None
    path = Path(init_from)
    if not path.is_file():
        raise CheckpointError(f"pretrain.init_from: {init_from} is not a file; point it to a minilm checkpoint "
                              "(e.g. an earlier out/pretrain/best.safetensors, or what minilm-import wrote)")
    return init_weights_from(model, path, tokenizer_hash=tokenizer_hash, what="pretrain.init_from:")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
