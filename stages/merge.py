"""merge: fold the LoRA adapter (out/sft/tuned) into the base weights, or pass a full fine-tune
(out/sft/tuned/model.safetensors) through, and write a plain checkpoint (out/merge/model.safetensors) that
loads into an ordinary minilm GPT. Records, as a metric, the largest absolute difference between the
merged model's logits and the fine-tuned model's (base + adapter, unmerged) on a fixed batch."""

from __future__ import annotations

from pathlib import Path

import torch

from minilm.adapter import ADAPTER_WEIGHTS, load_adapter, read_adapter
from minilm.checkpoint import Checkpoint, check_compatible, load_checkpoint, load_model_state, save_checkpoint
from minilm.errors import CheckpointError, run_main
from minilm.fileio import sha256_file, write_json
from minilm.lora import merge_state_dict
from minilm.model import GPT
from minilm.pairs import read_pairs
from minilm.tokenizer import load_tokenizer

from .common import FULL_WEIGHTS, MERGE, MERGED, SFT_VAL, TUNED, setup, stage_run, tokenizer_path

PARAMS = ["sft.template", "sft.base"]   # template: recorded in the merged model, so chat and serving render
                                        # turns alike; base: the model the adapter was trained on


def main(argv: list[str] | None = None) -> None:
    params = setup("merge", __doc__, argv)
    full = (TUNED / FULL_WEIGHTS).exists()
    base_path = Path(params.sft.base)
    source = TUNED / (FULL_WEIGHTS if full else ADAPTER_WEIGHTS)
    with stage_run("merge", params, [], out_dir=MERGE,
                   inputs={"base_model": base_path, "tuned": source, "tokenizer": tokenizer_path()}) as run:
        base = load_checkpoint(base_path)
        base_sha = sha256_file(base_path)
        merged, reference, layers = (passed_through if full else merged_adapter)(base, base_sha, base_path)
        save_checkpoint(MERGED, merged, step=base.step, extra={
            "tokenizer_sha256": base.meta.get("extra", {}).get("tokenizer_sha256"),
            "sft_template": params.sft.template, "sft_method": "full" if full else "lora",
            "merged_from": {"base_sha256": base_sha, ("full_sha256" if full else "adapter_sha256"):
                            sha256_file(source)}})
        x = parity_batch(load_tokenizer(tokenizer_path()), base.model_config.context_length)
        merged.eval(), reference.eval()
        with torch.no_grad():
            diff = (merged(x) - reference(x)).abs().max().item()
        metrics = {"max_abs_logit_diff": diff, "merged_layers": layers}
        write_json(MERGE / "metrics.json", metrics)
        run.log_metrics(metrics, step=0)
        run.log_artifact(MERGE / "metrics.json")
        if params.mlflow.log_checkpoints:
            run.log_checkpoint(MERGED)
    what = "full fine-tune passed through" if full else f"{layers} layers merged"
    print(f"merge: {what} -> {MERGED}; max |logit diff| vs the fine-tuned model = {diff:.2e}")


def merged_adapter(base: Checkpoint, base_sha: str, base_path: Path) -> tuple[GPT, GPT, int]:
    """(base with the LoRA adapter folded in, base + the unmerged adapter, merged layers)."""
    adapter = read_adapter(TUNED)
    if adapter.base_sha256 and adapter.base_sha256 != base_sha:
        raise CheckpointError(f"{TUNED} was trained on another base model (sha256 "
                              f"{adapter.base_sha256[:12]}, {base_path} is {base_sha[:12]}); rerun sft")
    merged = GPT(base.model_config)
    load_model_state(merged, merge_state_dict(base.model_state, adapter.state, adapter.config))  # strict
    lora_model = GPT(base.model_config)
    load_model_state(lora_model, base.model_state)
    load_adapter(TUNED, lora_model, base_sha256=base_sha)
    return merged, lora_model, len(adapter.modules)


def passed_through(base: Checkpoint, base_sha: str, base_path: Path) -> tuple[GPT, GPT, int]:
    """A full fine-tune needs no merging: its weights, checked against the base they were tuned from."""
    tuned = load_checkpoint(TUNED / FULL_WEIGHTS)
    recorded = tuned.meta.get("extra", {}).get("base_sha256")
    if recorded and recorded != base_sha:
        raise CheckpointError(f"{TUNED / FULL_WEIGHTS} was fine-tuned from another base model (sha256 "
                              f"{recorded[:12]}, {base_path} is {base_sha[:12]}); rerun sft")
    check_compatible(tuned, TUNED / FULL_WEIGHTS, base.model_config)
    model = GPT(tuned.model_config)
    load_model_state(model, tuned.model_state)
    reference = GPT(tuned.model_config)
    load_model_state(reference, tuned.model_state)
    return model, reference, 0


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
