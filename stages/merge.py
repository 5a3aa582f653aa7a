"""merge: fold the LoRA adapter (out/sft/adapter) into the base weights and write a plain checkpoint
(out/merge/model.safetensors) that loads into an ordinary minilm GPT. Records, as a metric, the largest
absolute difference between the merged model's logits and base+adapter's logits on a fixed batch."""

from __future__ import annotations

import torch

from minilm.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from minilm.errors import run_main
from minilm.pairs import read_pairs
from minilm.errors import CheckpointError
from minilm.fileio import sha256_file, write_json
from minilm.adapter import load_adapter, read_adapter
from minilm.lora import merge_state_dict
from minilm.model import GPT
from minilm.tokenizer import load_tokenizer

from .common import ADAPTER, MERGE, MERGED, PRETRAIN, SFT_VAL, setup, stage_run, tokenizer_path

PARAMS = ["sft.template"]             # recorded in the merged model, so chat and serving render turns alike

BASE = PRETRAIN / "best.safetensors"


def main(argv: list[str] | None = None) -> None:
    params = setup("merge", __doc__, argv)
    with stage_run("merge", params, [], out_dir=MERGE,
                   inputs={"base_model": BASE, "adapter": ADAPTER / "adapter_model.safetensors",
                           "tokenizer": tokenizer_path()}) as run:
        base = load_checkpoint(BASE)
        base_sha = sha256_file(BASE)
        adapter = read_adapter(ADAPTER)
        if adapter.base_sha256 and adapter.base_sha256 != base_sha:
            raise CheckpointError(f"{ADAPTER} was trained on another base model (sha256 "
                                  f"{adapter.base_sha256[:12]}, {BASE} is {base_sha[:12]}); rerun sft")
        merged_state = merge_state_dict(base.model_state, adapter.state, adapter.config)
        merged = GPT(base.model_config)
        load_model_state(merged, merged_state)            # strict: a plain model, no LoRA keys
        save_checkpoint(MERGED, merged, step=base.step, extra={
            "tokenizer_sha256": base.meta.get("extra", {}).get("tokenizer_sha256"),
            "sft_template": params.sft.template,
            "merged_from": {"base_sha256": base_sha, "adapter_sha256":
                            sha256_file(ADAPTER / "adapter_model.safetensors")}})

        # parity on a fixed batch: merged vs base + adapter (unmerged LoRA)
        lora_model = GPT(base.model_config)
        load_model_state(lora_model, base.model_state)
        load_adapter(ADAPTER, lora_model, base_sha256=base_sha)
        x = parity_batch(load_tokenizer(tokenizer_path()), base.model_config.context_length)
        merged.eval(), lora_model.eval()
        with torch.no_grad():
            diff = (merged(x) - lora_model(x)).abs().max().item()
        metrics = {"max_abs_logit_diff": diff, "merged_layers": len(adapter.modules)}
        write_json(MERGE / "metrics.json", metrics)
        run.log_metrics(metrics, step=0)
        run.log_artifact(MERGE / "metrics.json")
        if params.mlflow.log_checkpoints:
            run.log_checkpoint(MERGED)
    print(f"merge: {len(adapter.modules)} layers merged -> {MERGED}; max |logit diff| vs base+adapter "
          f"= {diff:.2e}")


def parity_batch(tok, context_length: int, rows: int = 8) -> torch.Tensor:
    """A fixed batch of real text: the held-out SFT pairs, encoded and cut into equal windows."""
    df = read_pairs(SFT_VAL)
    ids = tok.encode("\n\n".join(df["instruction"] + "\n" + df["response"]))
    T = min(64, context_length)
    n = max(1, min(rows, len(ids) // T))
    ids = (ids * (n * T // max(len(ids), 1) + 1))[: n * T]
    return torch.tensor(ids, dtype=torch.long).view(n, T)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
