"""dpo: preference tuning (DPO, or IPO) of the fine-tuned model (out/merge) with a fresh LoRA adapter.

The reference model is the same weights with the adapter switched off, so no second copy is held. Pairs
come from the preferences stage (out/preferences/{train,val}.jsonl), rendered through `sft.template`; a
sequence's log-probability sums its response tokens (+ EOS). The one training loop runs it (resume, EMA,
precision, the non-finite policy, interrupt safety, `distributed.nproc_per_node` ranks) and logs TRL's
figures: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected (val_-prefixed on the held-out pairs). Writes the adapter in PEFT's layout
(out/dpo/adapter), the merged model (out/dpo/model.safetensors), metrics.json, history.csv and loss.png.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from minilm.adapter import save_adapter
from minilm.checkpoint import check_compatible, load_checkpoint, load_model_state, save_checkpoint
from minilm.config import to_dict
from minilm.dpo import (DPOObjective, PreferenceBatches, encode_preferences, eval_pair_batches, pair_logps,
                        preference_accuracy)
from minilm.errors import run_main
from minilm.fileio import sha256_file, write_json
from minilm.lora import inject_lora, lora_state, mark_only_lora_trainable, merge_state_dict, trainable_report
from minilm.model import GPT
from minilm.pairs import read_preferences
from minilm.tokenizer import load_tokenizer
from minilm.train import train

from .common import DPO, DPO_ADAPTER, DPO_MODEL, MERGED, PREF_TRAIN, PREF_VAL, setup, stage_run, tokenizer_path
from .training import (global_config, rank_tags, resume_run_id, stage_fingerprint, start_ranks,
                       stop_if_interrupted, timings, write_curves)

PARAMS = ["dpo", "sft.template", "model", "distributed", "project.device"]   # model: the SFT model must match


def main(argv: list[str] | None = None) -> None:
    params = setup("dpo", __doc__, argv)
    par = start_ranks("dpo", params, argv)
    if par is None:             # this process ran the stage as torchrun's ranks
        return
    cfg, template = params.dpo, params.sft.template
    tok = load_tokenizer(tokenizer_path())
    base = load_checkpoint(MERGED)
    check_compatible(base, MERGED, dataclasses.replace(params.model, vocab_size=tok.vocab_size),
                     tokenizer_hash=tok.hash)
    base_sha, ctx = sha256_file(MERGED), base.model_config.context_length
    train_set = encode_preferences(read_preferences(PREF_TRAIN), tok, template, ctx, cfg.max_length)
    val_set = encode_preferences(read_preferences(PREF_VAL), tok, template, ctx, cfg.max_length)
    run_config = {"dpo": to_dict(global_config(cfg, par)), "base_sha256": base_sha, "template": template,
                  "tokenizer_sha256": tok.hash, "train_sha256": sha256_file(PREF_TRAIN),
                  "code_sha256": stage_fingerprint("dpo")}
    resume_id = resume_run_id(DPO, run_config, cfg)

    torch.manual_seed(cfg.seed)
    model = policy_model(base, cfg)
    model.to(par.device)
    report = trainable_report(model)
    data = PreferenceBatches(train_set, cfg.batch_size, cfg.seed, grad_accum=cfg.grad_accum * par.world)
    evals = eval_pair_batches(val_set, cfg.batch_size)[: cfg.eval_batches]
    objective, facts = DPOObjective(cfg), {}
    ctx_mgr = (stage_run("dpo", params, ["dpo", "model", "distributed", "project", "sft"], out_dir=DPO,
                         resume_run_id=resume_id, facts=facts, tags=rank_tags(par),
                         inputs={"sft_model": MERGED, "tokenizer": tokenizer_path(), "pref_train": PREF_TRAIN,
                                 "pref_val": PREF_VAL},
                         parent_metrics=["train_loss", "val_loss", "val_rewards/accuracies",
                                         "val_rewards/margins", "final_val_preference_accuracy"])
               if par.is_main else contextlib.nullcontext())
    with ctx_mgr as run:
        if par.is_main:
            print(f"dpo: LoRA r={cfg.lora_rank}: {report['trainable']:,} trainable of {report['total']:,} "
                  f"parameters; {len(train_set)} pairs ({train_set.truncated} truncated, {train_set.dropped} "
                  f"left out), {cfg.loss} loss, beta {cfg.beta}" + (f" x {par.world} processes" if par.active else ""))
        result = train(model, data, cfg, out_dir=DPO, eval_batches=evals, logger=run, run_config=run_config,
                       progress=params.project.progress, parallel=par, save_state=lora_state,
                       tokens_per_batch=data.tokens_per_batch, objective=objective,
                       checkpoint_extra={"base_sha256": base_sha, "tokenizer_sha256": tok.hash},
                       last_extra={"mlflow_run_id": run.run_id} if run else {})
        par.close()
        stop_if_interrupted("dpo", result)
        if run is None:
            return
        model = policy_model(base, cfg)           # a plain copy (FSDP may have sharded the trained one)
        model.load_state_dict(load_checkpoint(DPO / "best.safetensors").model_state, strict=False)
        save_adapter(DPO_ADAPTER, model, cfg.lora(), base_sha256=base_sha, base_config=to_dict(base.model_config),
                     base_name=str(MERGED))
        merged = GPT(base.model_config)
        load_model_state(merged, merge_state_dict(base.model_state, lora_state(model), cfg.lora()))
        save_checkpoint(DPO_MODEL, merged, step=base.step, extra={
            "tokenizer_sha256": tok.hash, "sft_template": template, "dpo": {"loss": cfg.loss, "beta": cfg.beta},
            "merged_from": {"base_sha256": base_sha, "adapter_sha256": sha256_file(DPO_ADAPTER / "adapter_model.safetensors")}})
        held_out = eval_pair_batches(val_set, cfg.batch_size)
        acc = preference_accuracy(pair_logps(model, held_out), pair_logps(model, held_out, reference=True),
                                  cfg.beta)
        write_curves(result.history, DPO, f"DPO {cfg.loss} loss")
        metrics = {"best_val_loss": result.best_val_loss, "steps": result.step,
                   "val_preference_accuracy": acc["accuracy"], "val_reward_margin": acc["margin"],
                   "val_pairs": acc["pairs"], "train_pairs": len(train_set),
                   "trainable_parameters": report["trainable"]}
        write_json(DPO / "metrics.json", metrics)
        facts.update(timings(result))
        run.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=result.step)
        run.log_metrics({k: facts[k] for k in ("train_seconds", "resumed_from_step")}, step=result.step)
        for name in ("metrics.json", "history.csv", "loss.png"):
            run.log_artifact(DPO / name)
        run.log_artifact(DPO_ADAPTER, "adapter")
    print(f"dpo: held-out preference accuracy {acc['accuracy']:.3f}, reward margin {acc['margin']:.3f} "
          f"({acc['pairs']} pairs) in {result.seconds:.0f}s -> {DPO_MODEL}")


def policy_model(base, cfg) -> GPT:
    """The SFT model with a fresh DPO adapter, only the adapter trainable."""
    model = GPT(base.model_config)
    load_model_state(model, base.model_state)
    inject_lora(model, cfg.lora())
    mark_only_lora_trainable(model)
    return model


if __name__ == "__main__":
    raise SystemExit(run_main(main))
