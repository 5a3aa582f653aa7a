"""sft: supervised fine-tuning of the pretrained base model on data/sft_train.jsonl.

`sft.method: lora` trains only LoRA weights (params `lora`) and writes them in a PEFT-readable layout
(out/sft/tuned/adapter_model.safetensors + adapter_config.json); `full` trains every weight and writes
out/sft/tuned/model.safetensors. The pairs are rendered through `sft.template`, and the loss covers only
the response tokens plus EOS (unless `sft.response_only: false`). Also writes `last`/`best` checkpoints
(resumed like pretrain), metrics.json, history.csv and loss.png. With `distributed.nproc_per_node` above 1
(or started by torchrun) the ranks share each step (under FSDP the frozen base is sharded too) and rank 0
alone writes and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch

from minilm.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from minilm.checkpoint import Checkpoint, check_compatible, load_checkpoint, load_model_state, save_checkpoint
from minilm.config import LoRAConfig, to_dict
from minilm.errors import run_main
from minilm.fileio import sha256_file, write_json
from minilm.pairs import read_pairs
from minilm.lora import inject_lora, lora_state, mark_only_lora_trainable, trainable_report
from minilm.model import GPT
from minilm.sft import SFTBatches, encode_pairs, eval_batches
from minilm.tokenizer import load_tokenizer
from minilm.train import train

from .common import FULL_WEIGHTS, SFT, SFT_TRAIN, SFT_VAL, TUNED, setup, stage_run, tokenizer_path
from .training import (global_config, rank_tags, resume_run_id, stage_fingerprint, start_ranks,
                       stop_if_interrupted, timings, write_curves)

PARAMS = ["model", "lora", "sft", "distributed", "project.device"]   # model: the base must match it


def main(argv: list[str] | None = None) -> None:
    params = setup("sft", __doc__, argv)
    par = start_ranks("sft", params, argv)
    if par is None:             # this process ran the stage as torchrun's ranks
        return
    cfg, lora_cfg = params.sft, params.lora
    tok = load_tokenizer(tokenizer_path())
    base_path = Path(cfg.base)          # pretrain's best, or any minilm checkpoint (e.g. an imported model)
    base = load_checkpoint(base_path)
    check_compatible(base, base_path, dataclasses.replace(params.model, vocab_size=tok.vocab_size),
                     tokenizer_hash=tok.hash)
    base_sha = sha256_file(base_path)
    ctx = base.model_config.context_length
    train_set = encode_pairs(read_pairs(SFT_TRAIN), tok, cfg, ctx)
    val_set = encode_pairs(read_pairs(SFT_VAL), tok, cfg, ctx)
    run_config = {"sft": to_dict(global_config(cfg, par)), "base_sha256": base_sha,
                  "tokenizer_sha256": tok.hash, "train_sha256": sha256_file(SFT_TRAIN), "code_sha256": stage_fingerprint("sft"),
                  **({"lora": to_dict(lora_cfg)} if cfg.method == "lora" else {})}
    resume_id = resume_run_id(SFT, run_config, cfg)

    torch.manual_seed(cfg.seed)
    model, what = tuned_model(base, cfg.method, lora_cfg)
    model.to(par.device)
    report = trainable_report(model)
    # the step's global batch is grad_accum x world micro-batches of one stream, rank r drawing its share
    data = SFTBatches(train_set, cfg.batch_size, cfg.seed, tok.pad_id, grad_accum=cfg.grad_accum * par.world)
    evals = eval_batches(val_set, cfg.batch_size, tok.pad_id)[: cfg.eval_batches]
    facts: dict = {}
    ctx = (stage_run("sft", params, ["model", "lora", "sft", "distributed", "project"], out_dir=SFT,
                     resume_run_id=resume_id, inputs={"base_model": base_path, "tokenizer": tokenizer_path(),
                                                      "sft_train": SFT_TRAIN, "sft_val": SFT_VAL},
                     facts=facts, tags={"minilm.sft_method": cfg.method, **rank_tags(par)},
                     parent_metrics=["train_loss", "val_loss", "final_best_val_response_loss"])
           if par.is_main else contextlib.nullcontext())     # rank 0 alone logs and writes
    with ctx as run:
        if par.is_main:
            print(f"sft: {what}: {report['trainable']:,} trainable of {report['total']:,} parameters "
                  f"({100 * report['share']:.2f}%); {len(train_set)} pairs ({train_set.truncated} truncated, "
                  f"{train_set.dropped} dropped)" + (f" x {par.world} processes" if par.active else ""))
        result = train(model, data, cfg, out_dir=SFT, eval_batches=evals, logger=run,
                       run_config=run_config, progress=params.project.progress, parallel=par,
                       save_state=lora_state if cfg.method == "lora" else None,
                       tokens_per_batch=data.tokens_per_batch,
                       checkpoint_extra={"base_sha256": base_sha, "tokenizer_sha256": tok.hash},
                       last_extra={"mlflow_run_id": run.run_id} if run else {})
        par.close()
        stop_if_interrupted("sft", result)
        if run is None:
            return
        if par.sharded:             # FSDP sharded the model in place: the best weights go into a plain one
            model, _ = tuned_model(base, cfg.method, lora_cfg)
        best = load_checkpoint(SFT / "best.safetensors")
        if cfg.method == "full":
            load_model_state(model, best.model_state)
        else:
            model.load_state_dict(best.model_state, strict=False)     # the adapter weights only
        write_tuned(model, cfg.method, lora_cfg, base, base_sha, tok.hash, base_path)
        write_curves(result.history, SFT, "SFT response loss")
        metrics = {"best_val_response_loss": result.best_val_loss,
                   "best_val_response_perplexity": math.exp(min(result.best_val_loss, 700)),
                   "steps": result.step, "trainable_parameters": report["trainable"],
                   "trainable_share": report["share"], "train_pairs": len(train_set),
                   "truncated": train_set.truncated, "dropped": train_set.dropped}
        write_json(SFT / "metrics.json", metrics)
        facts.update(timings(result))
        run.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=result.step)
        run.log_metrics({k: facts[k] for k in ("train_seconds", "resumed_from_step")}, step=result.step)
        for name in ("metrics.json", "history.csv", "loss.png"):
            run.log_artifact(SFT / name)
        if cfg.method == "lora" or params.mlflow.log_checkpoints:
            run.log_artifact(TUNED, "tuned")
    print(f"sft: best held-out response loss {result.best_val_loss:.4f} in {result.seconds:.0f}s "
          f"-> {TUNED}")


def tuned_model(base: Checkpoint, method: str, lora_cfg: LoRAConfig) -> tuple[GPT, str]:
    """The base model made ready to fine-tune: LoRA-wrapped with only the adapter trainable, or whole."""
    model = GPT(base.model_config)
    load_model_state(model, base.model_state)
    if method == "full":
        return model, "full fine-tuning"
    wrapped = inject_lora(model, lora_cfg)
    mark_only_lora_trainable(model)
    return model, f"LoRA r={lora_cfg.rank} on {len(wrapped)} layers"


def write_tuned(model: GPT, method: str, lora_cfg: LoRAConfig, base: Checkpoint, base_sha: str,
                tokenizer_hash: str, base_path: Path) -> None:
    """out/sft/tuned: the PEFT adapter files (lora) or the whole fine-tuned model (full); a file the other
    method left there is removed, so merge reads only what this run made."""
    TUNED.mkdir(parents=True, exist_ok=True)
    stale = [TUNED / FULL_WEIGHTS] if method == "lora" else [TUNED / ADAPTER_WEIGHTS, TUNED / ADAPTER_CONFIG]
    for path in stale:
        path.unlink(missing_ok=True)
    if method == "lora":
        save_adapter(TUNED, model, lora_cfg, base_sha256=base_sha, base_config=to_dict(base.model_config),
                     base_name=base_path.as_posix())
    else:
        save_checkpoint(TUNED / FULL_WEIGHTS, model, step=0,
                        extra={"tokenizer_sha256": tokenizer_hash, "base_sha256": base_sha,
                               "sft_method": "full"})


if __name__ == "__main__":
    raise SystemExit(run_main(main))
