"""evaluate: validation loss, perplexity and bits per byte of the base model on held-out text
(a fixed, seeded set of windows from out/encoded/val.bin). Writes out/evaluate/metrics.json and a
table (results.csv) that is also logged to MLflow."""

from __future__ import annotations

import pandas as pd

from minilm.checkpoint import load_model
from minilm.cli import run_main
from minilm.data import LMBatches, load_tokens, read_meta
from minilm.evaluation import lm_metrics, split_bytes_per_token
from minilm.fileio import write_json, write_text
from minilm.precision import resolve_device
from minilm.train import evaluate_loss

from .common import ENCODED, EVALUATE, PRETRAIN, setup, stage_run


def main(argv: list[str] | None = None) -> None:
    params = setup("evaluate", __doc__, argv)
    cfg = params.evaluate
    ckpt_path = PRETRAIN / "best.safetensors"
    device = resolve_device(params.project.device)
    with stage_run("evaluate", params, ["evaluate", "project"], out_dir=EVALUATE,
                   inputs={"base_model": ckpt_path, "encoded": ENCODED / "meta.json"}) as run:
        model, ckpt = load_model(ckpt_path, device)
        meta = read_meta(ENCODED)
        T = ckpt.model_config.context_length
        batches = LMBatches(load_tokens(ENCODED / "val.bin"), cfg.batch_size, T, seed=cfg.seed
                            ).eval_batches(cfg.batches, seed=cfg.seed)
        tokens, n_bytes = split_bytes_per_token(meta)
        base = lm_metrics(evaluate_loss(model, batches, device=device), tokens=tokens, n_bytes=n_bytes)
        rows = [{"model": "base", "data": "val_text", **base, "step": ckpt.step}]
        table = pd.DataFrame(rows)
        write_text(EVALUATE / "results.csv", table.to_csv(index=False))
        metrics = {f"{r['model']}_{r['data']}_{k}": r[k] for r in rows
                   for k in ("loss", "perplexity", "bits_per_byte") if k in r}
        write_json(EVALUATE / "metrics.json", metrics)
        run.log_metrics(metrics, step=0)
        run.log_artifact(EVALUATE / "results.csv")
        run.log_artifact(EVALUATE / "metrics.json")
    print(table.to_string(index=False))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
