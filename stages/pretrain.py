"""pretrain: train the base language model on out/encoded per params `model` and `pretrain`.

Writes out/pretrain/{last,best}.safetensors, metrics.json, history.csv and loss.png. If `last` exists
and was written with the same params, training resumes from it (continuing the same MLflow run); a
changed param starts afresh. SIGINT/SIGTERM save `last` before exiting.
"""

from __future__ import annotations

import dataclasses
import math

from minilm.cli import run_main
from minilm.config import to_dict
from minilm.data import LMBatches, load_tokens, read_meta
from minilm.errors import TrainingError
from minilm.evaluation import lm_metrics, split_bytes_per_token
from minilm.fileio import write_json
from minilm.model import GPT
from minilm.precision import resolve_device
from minilm.tokenizer import load_tokenizer
from minilm.train import train

from .common import (ENCODED, PRETRAIN, code_fingerprint, resumable, setup, stage_run,
                     stop_if_interrupted, tokenizer_path, write_curves)


def main(argv: list[str] | None = None) -> None:
    params = setup("pretrain", __doc__, argv)
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
    run_config = {"model": to_dict(model_cfg), "pretrain": to_dict(cfg), "tokenizer_sha256": tok.hash,
                  "data_sha256": meta.get("source_sha256"), "code_sha256": code_fingerprint()}
    resume, resume_id = resumable(PRETRAIN, run_config, cfg.max_steps)

    device = resolve_device(params.project.device)
    import torch
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    n_params = model.num_parameters()
    with stage_run("pretrain", params, ["model", "pretrain", "project"], out_dir=PRETRAIN,
                   inputs={"encoded": ENCODED / "meta.json", "tokenizer": tokenizer_path()},
                   resume_run_id=resume_id, tags={"minilm.parameters": n_params}) as run:
        print(f"pretrain: {n_params / 1e6:.2f}M parameters, {cfg.max_steps} steps of "
              f"{cfg.batch_size * cfg.grad_accum}x{T} tokens on {device}"
              + (f" (resuming run {resume_id})" if resume_id else ""))
        result = train(model, data, cfg, out_dir=PRETRAIN, eval_batches=eval_batches, logger=run,
                       run_config=run_config, progress=params.project.progress, resume=resume,
                       checkpoint_extra={"mlflow_run_id": run.run_id, "tokenizer_sha256": tok.hash})
        stop_if_interrupted("pretrain", result)
        write_curves(result.history, PRETRAIN, "pretrain loss")
        tokens, n_bytes = split_bytes_per_token(meta)
        val = lm_metrics(result.best_val_loss, tokens=tokens, n_bytes=n_bytes)
        metrics = {"best_val_loss": val["loss"], "best_val_perplexity": val["perplexity"],
                   "best_val_bits_per_byte": val.get("bits_per_byte", math.nan),
                   "last_val_loss": result.last_val_loss, "steps": result.step,
                   "parameters": n_params, "train_seconds": result.seconds,
                   "resumed_from_step": result.resumed_from, "skipped_steps": result.skipped_steps}
        write_json(PRETRAIN / "metrics.json", metrics)
        run.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=result.step)
        for name in ("metrics.json", "history.csv", "loss.png"):
            run.log_artifact(PRETRAIN / name)
        if params.mlflow.log_checkpoints:
            run.log_checkpoint(PRETRAIN / "best.safetensors")
    print(f"pretrain: best val loss {val['loss']:.4f} (perplexity {val['perplexity']:.2f}, "
          f"{val.get('bits_per_byte', math.nan):.3f} bits/byte) in {result.seconds:.0f}s")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
