"""sft: LoRA supervised fine-tuning of the pretrained base model on data/sft_train.jsonl.

Only the LoRA weights train (params `lora`); the pairs are rendered through `sft.template`, and the loss
covers only the response tokens plus EOS (unless `sft.response_only: false`). Writes the adapter in a
PEFT-readable layout (out/sft/adapter/adapter_model.safetensors + adapter_config.json), `last`/`best`
adapter checkpoints (resumed like pretrain), metrics.json, history.csv and loss.png.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from minilm.checkpoint import check_compatible, load_checkpoint, load_model_state
from minilm.errors import run_main
from minilm.config import to_dict
from minilm.pairs import read_pairs
from minilm.fileio import sha256_file, write_json
from minilm.adapter import save_adapter
from minilm.lora import inject_lora, lora_state, mark_only_lora_trainable, trainable_report
from minilm.model import GPT
from minilm.precision import resolve_device
from minilm.sft import SFTBatches, encode_pairs, eval_batches
from minilm.tokenizer import load_tokenizer
from minilm.train import train

from .common import ADAPTER, PRETRAIN, SFT, SFT_TRAIN, SFT_VAL, setup, stage_run, tokenizer_path
from .training import resume_run_id, stage_fingerprint, stop_if_interrupted, timings, write_curves

PARAMS = ["model", "lora", "sft", "project.device"]   # model: the base must match it

BASE = PRETRAIN / "best.safetensors"


def main(argv: list[str] | None = None) -> None:
    params = setup("sft", __doc__, argv)
    cfg, lora_cfg = params.sft, params.lora
    tok = load_tokenizer(tokenizer_path())
    base = load_checkpoint(BASE)
    check_compatible(base, BASE, dataclasses.replace(params.model, vocab_size=tok.vocab_size),
                     tokenizer_hash=tok.hash)
    base_sha = sha256_file(BASE)
    ctx = base.model_config.context_length
    train_set = encode_pairs(read_pairs(SFT_TRAIN), tok, cfg, ctx)
    val_set = encode_pairs(read_pairs(SFT_VAL), tok, cfg, ctx)
    run_config = {"lora": to_dict(lora_cfg), "sft": to_dict(cfg), "base_sha256": base_sha,
                  "tokenizer_sha256": tok.hash, "train_sha256": sha256_file(SFT_TRAIN),
                  "code_sha256": stage_fingerprint("sft")}
    resume_id = resume_run_id(SFT, run_config, cfg)

    device = resolve_device(params.project.device)
    torch.manual_seed(cfg.seed)
    model = GPT(base.model_config)
    load_model_state(model, base.model_state)
    wrapped = inject_lora(model, lora_cfg)
    mark_only_lora_trainable(model)
    model.to(device)
    report = trainable_report(model)
    data = SFTBatches(train_set, cfg.batch_size, cfg.seed, tok.pad_id, grad_accum=cfg.grad_accum)
    evals = eval_batches(val_set, cfg.batch_size, tok.pad_id)[: cfg.eval_batches]
    facts: dict = {}
    with stage_run("sft", params, ["model", "lora", "sft", "project"], out_dir=SFT, resume_run_id=resume_id,
                   inputs={"base_model": BASE, "tokenizer": tokenizer_path(), "sft_train": SFT_TRAIN,
                           "sft_val": SFT_VAL}, facts=facts,
                   parent_metrics=["train_loss", "val_loss", "final_best_val_response_loss"]) as run:
        print(f"sft: LoRA r={lora_cfg.rank} on {len(wrapped)} layers: {report['trainable']:,} trainable of "
              f"{report['total']:,} parameters ({100 * report['share']:.2f}%); {len(train_set)} pairs "
              f"({train_set.truncated} truncated, {train_set.dropped} dropped)")
        result = train(model, data, cfg, out_dir=SFT, eval_batches=evals, logger=run,
                       run_config=run_config, progress=params.project.progress,
                       save_state=lora_state, tokens_per_batch=data.tokens_per_batch,
                       checkpoint_extra={"base_sha256": base_sha}, last_extra={"mlflow_run_id": run.run_id})
        stop_if_interrupted("sft", result)
        best = load_checkpoint(SFT / "best.safetensors")
        model.load_state_dict(best.model_state, strict=False)
        save_adapter(ADAPTER, model, lora_cfg, base_sha256=base_sha, base_config=to_dict(base.model_config),
                     base_name=str(BASE))
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
        run.log_artifact(ADAPTER, "adapter")
    print(f"sft: best held-out response loss {result.best_val_loss:.4f} in {result.seconds:.0f}s "
          f"-> {ADAPTER}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
