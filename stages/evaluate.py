"""evaluate: how good are the models on held-out data?

- validation text (a fixed, seeded set of windows from out/encoded/val.bin): loss, perplexity and exact bits
  per byte of the base model and of the SFT (merged) model;
- held-out SFT pairs (data/sft_val.jsonl, rendered with `sft.template`): loss and perplexity on the
  response tokens (+EOS) only, for the base model zero-shot, the SFT model and the DPO model;
- held-out preference pairs (out/preferences/val.jsonl): the DPO model's preference accuracy (the share of
  pairs whose chosen answer gets the higher implicit reward, beta x log-prob gain over the SFT model) and
  mean reward margin. Validation text and response loss show what preference tuning costs the LM.

Writes out/evaluate/metrics.json (DVC metrics) and results.csv (the same table, logged to MLflow).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from minilm.checkpoint import check_compatible, load_model
from minilm.dpo import encode_preferences, eval_pair_batches, pair_logps, preference_accuracy
from minilm.errors import run_main
from minilm.pairs import read_pairs, read_preferences
from minilm.data import LMBatches, load_tokens
from minilm.evaluation import lm_metrics, target_counts
from minilm.fileio import check_writable, write_json, write_text
from minilm.precision import resolve_device, set_matmul_precision
from minilm.sft import encode_pairs, response_loss
from minilm.tokenizer import load_tokenizer
from minilm.train import evaluate_loss

from .common import DPO_MODEL, ENCODED, EVALUATE, MERGED, PREF_VAL, SFT_VAL, setup, stage_run, tokenizer_path

PARAMS = ["evaluate", "model", "sft", "dpo.beta", "dpo.max_length", "project.device"]   # model: checkpoints match it
MODELS = ("base", "sft", "dpo")


def main(argv: list[str] | None = None) -> None:
    params = setup("evaluate", __doc__, argv)
    cfg = params.evaluate
    device = resolve_device(params.project.device)
    set_matmul_precision(device, "fp32")       # the evaluation runs in fp32: TF32 matmuls on CUDA
    base_path = Path(params.sft.base)         # the model SFT started from (default: pretrain's best)
    check_writable(EVALUATE)
    tok = load_tokenizer(tokenizer_path())
    model_cfg = dataclasses.replace(params.model, vocab_size=tok.vocab_size)
    with stage_run("evaluate", params, ["evaluate", "model", "project", "sft", "dpo"], out_dir=EVALUATE,
                   inputs={"base_model": base_path, "sft_model": MERGED, "dpo_model": DPO_MODEL,
                           "encoded": ENCODED / "meta.json", "sft_val": SFT_VAL, "pref_val": PREF_VAL,
                           "tokenizer": tokenizer_path()},
                   parent_metrics=[f"{m}.{d}.{k}" for m in MODELS for d, k in
                                   (("val_text", "loss"), ("val_text", "bits_per_byte"),
                                    ("sft_val_responses", "loss"))] + ["dpo.preferences_val.accuracy",
                                                                       "dpo.preferences_val.margin"]) as run:
        pairs, token_bytes = read_pairs(SFT_VAL), tok.token_bytes()
        if cfg.sft_pairs:
            pairs = pairs.iloc[: cfg.sft_pairs]
        rows, models = [], {}
        for name, path in zip(MODELS, (base_path, MERGED, DPO_MODEL)):
            models[name] = model, ckpt = load_model(path, device)
            check_compatible(ckpt, path, model_cfg, tokenizer_hash=tok.hash)
            T = ckpt.model_config.context_length
            windows = LMBatches(load_tokens(ENCODED / "val.bin"), cfg.batch_size, T, seed=cfg.seed
                                ).eval_batches(cfg.batches, seed=cfg.seed)
            tokens, n_bytes = target_counts(windows, token_bytes)
            text = lm_metrics(evaluate_loss(model, windows, device=device), tokens=tokens, n_bytes=n_bytes)
            rows.append({"model": name, "data": "val_text", **text})
            examples = encode_pairs(pairs, tok, params.sft, T)
            resp = lm_metrics(response_loss(model, examples, batch_size=cfg.batch_size, device=device))
            rows.append({"model": name, "data": "sft_val_responses", **resp, "pairs": len(examples)})
        rows.append({"model": "dpo", "data": "preferences_val", **preference_rows(params, tok, models)})
        table = pd.DataFrame(rows)
        write_text(EVALUATE / "results.csv", table.to_csv(index=False))
        metrics: dict = {}
        for r in rows:
            metrics.setdefault(r["model"], {})[r["data"]] = {
                k: r[k] for k in FIGURES if k in r}
        write_json(EVALUATE / "metrics.json", metrics)
        run.log_metrics({f"{r['model']}.{r['data']}.{k}": r[k] for r in rows for k in FIGURES if k in r}, step=0)
        run.log_artifact(EVALUATE / "results.csv")
        run.log_artifact(EVALUATE / "metrics.json")
    print(table.to_string(index=False))


FIGURES = ("loss", "perplexity", "bits_per_byte", "accuracy", "margin")


def preference_rows(params, tok, models) -> dict:
    """The DPO model's held-out preference accuracy and reward margin, its reference being the SFT model."""
    pairs = encode_preferences(read_preferences(PREF_VAL), tok, params.sft.template,
                               models["sft"][1].model_config.context_length, params.dpo.max_length)
    batches = eval_pair_batches(pairs, params.evaluate.batch_size)
    acc = preference_accuracy(pair_logps(models["dpo"][0], batches), pair_logps(models["sft"][0], batches),
                              params.dpo.beta)
    return {"accuracy": acc["accuracy"], "margin": acc["margin"], "pairs": acc["pairs"]}


if __name__ == "__main__":
    raise SystemExit(run_main(main))
