"""preferences: the prompt/chosen/rejected pairs the dpo stage learns from.

`preferences.source: self` (the default) builds them with no data beyond what the pipeline has (the
self-play recipe of SPIN): for each SFT instruction, `chosen` is its reference answer and `rejected` the
fine-tuned model's (out/merge) own sampled answer, decoded in fp32 with a fixed seed, so the same params
give the same pairs. Training pairs come from data/sft_train.jsonl, held-out ones from data/sft_val.jsonl.
A pair whose sample equals the reference is left out. A path reads the user's pairs (.jsonl/.json/.csv/
.parquet, TRL's layout, field names configurable) and holds out `preferences.val_fraction` by prompt.
Writes out/preferences/train.jsonl and val.jsonl, and stats.json.
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from minilm.checkpoint import check_compatible, load_model
from minilm.config import SampleConfig
from minilm.errors import DataError, run_main
from minilm.fileio import check_writable, write_json
from minilm.pairs import read_pairs, read_preferences, split_preferences, write_preferences
from minilm.precision import resolve_device
from minilm.sampling import generate
from minilm.tokenizer import load_tokenizer

from .common import (MERGED, PREF_TRAIN, PREF_VAL, PREFERENCES, SFT_TRAIN, SFT_VAL, setup, stage_run,
                     tokenizer_path)

PARAMS = ["preferences", "sft.template", "model", "project.device"]   # model: the SFT model must match it


def main(argv: list[str] | None = None) -> None:
    params = setup("preferences", __doc__, argv)
    cfg = params.preferences
    check_writable(PREFERENCES)
    self_play = cfg.source == "self"
    inputs = {"sft_model": MERGED, "sft_train": SFT_TRAIN, "sft_val": SFT_VAL} if self_play else {}
    with stage_run("preferences", params, ["preferences"], out_dir=PREFERENCES, inputs=inputs) as run:
        if self_play:
            train_df, val_df = self_play_pairs(params)
        else:
            df = read_preferences(cfg.source, cfg.prompt_field, cfg.chosen_field, cfg.rejected_field,
                                  cfg.bad_records, invalid_utf8=cfg.invalid_utf8).drop_duplicates(ignore_index=True)
            if len(df) < 2:
                raise DataError(f"preference data {cfg.source} has {len(df)} distinct pair(s); at least 2 "
                                "are needed (one for training, one held out)")
            train_df, val_df = split_preferences(df, cfg.val_fraction, cfg.seed)
        write_preferences(PREF_TRAIN, train_df)
        write_preferences(PREF_VAL, val_df)
        stats = {"source": cfg.source, "train_pairs": len(train_df), "val_pairs": len(val_df)}
        write_json(PREFERENCES / "stats.json", stats)
        run.log_metrics({k: v for k, v in stats.items() if k != "source"}, step=0)
        run.log_artifact(PREFERENCES / "stats.json")
    print(f"preferences: {len(train_df)} training and {len(val_df)} held-out pairs ({cfg.source}) -> "
          f"{PREFERENCES}")


def self_play_pairs(params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val) pairs: the SFT reference answers against the SFT model's own samples."""
    cfg = params.preferences
    device = resolve_device(params.project.device)
    tok = load_tokenizer(tokenizer_path())
    model, ckpt = load_model(MERGED, device)
    check_compatible(ckpt, MERGED, dataclasses.replace(params.model, vocab_size=tok.vocab_size),
                     tokenizer_hash=tok.hash)
    marker = params.sft.template.split("{instruction}")[0].strip() or "###"
    sampling = SampleConfig(temperature=cfg.temperature, top_k=0, top_p=cfg.top_p, repetition_penalty=1.0,
                            ban_window=0, min_new_tokens=0, max_new_tokens=cfg.max_new_tokens, stop=[marker],
                            seed=cfg.seed)
    out = []
    for path in (SFT_TRAIN, SFT_VAL):
        pairs = read_pairs(path)
        if cfg.max_pairs and path == SFT_TRAIN:
            pairs = pairs.iloc[: cfg.max_pairs]
        prompts = [params.sft.prompt(q) for q in pairs["instruction"]]
        samples = []
        for i in range(0, len(prompts), cfg.batch_size):      # each batch seeded alike: batches are reproducible
            samples += generate(model, tok, prompts[i:i + cfg.batch_size], sampling, device=device)
        df = pd.DataFrame({"prompt": pairs["instruction"], "chosen": pairs["response"],
                           "rejected": [s.strip() for s in samples]})
        keep = (df["rejected"] != "") & (df["rejected"] != df["chosen"].str.strip())
        out.append(df[keep].reset_index(drop=True))
    if out[0].empty or out[1].empty:
        raise DataError("the SFT model's samples equal the reference answers (or are empty) for every "
                        f"{'training' if out[0].empty else 'held-out'} instruction, so there is nothing to "
                        "prefer; raise preferences.temperature or give a pairs file as preferences.source")
    return out[0], out[1]


if __name__ == "__main__":
    raise SystemExit(run_main(main))
