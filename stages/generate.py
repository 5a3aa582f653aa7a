"""generate: samples for the prompts in params `generate` from the base model, and answers of the SFT
(merged) model and of the DPO model, side by side, to the first `generate.sft_questions` held-out
instructions (rendered with `sft.template`). Weights are cast to `generate.precision` (auto = bf16 where the hardware has it). Writes out/generate/samples.md (readable) and samples.jsonl, both logged to MLflow."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from minilm.checkpoint import check_compatible, load_model
from minilm.errors import run_main
from minilm.config import SampleConfig
from minilm.pairs import read_pairs
from minilm.fileio import check_writable, write_text
from minilm.precision import check_decode_precision, for_decoding, resolve_device
from minilm.sampling import generate
from minilm.tokenizer import load_tokenizer

from .common import DPO_MODEL, GENERATE, MERGED, SFT_VAL, setup, stage_run, tokenizer_path

PARAMS = ["generate", "model", "sft", "project.device"]   # model: the checkpoints must match it


def main(argv: list[str] | None = None) -> None:
    params = setup("generate", __doc__, argv)
    cfg = params.generate
    sampling = SampleConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SampleConfig)})
    device = resolve_device(params.project.device)
    check_decode_precision(cfg.precision, device)
    base_path = Path(params.sft.base)         # the model SFT started from (default: pretrain's best)
    check_writable(GENERATE)            # a read-only out/ fails now, not after all the decoding
    tok = load_tokenizer(tokenizer_path())
    model_cfg = dataclasses.replace(params.model, vocab_size=tok.vocab_size)
    with stage_run("generate", params, ["generate", "model", "project", "sft"], out_dir=GENERATE,
                   inputs={"base_model": base_path, "sft_model": MERGED, "dpo_model": DPO_MODEL,
                           "tokenizer": tokenizer_path(), "sft_val": SFT_VAL}) as run:
        base, base_ckpt = load_model(base_path, device)
        check_compatible(base_ckpt, base_path, model_cfg, tokenizer_hash=tok.hash)
        for_decoding(base, cfg.precision, device)
        dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
        run.set_tags({"generate.dtype": dtype + (" with int8 weights" if cfg.precision == "int8" else "")})
        records = [{"model": "base", "prompt": p, "completion": c}
                   for p, c in zip(cfg.prompts, generate(base, tok, cfg.prompts, sampling, device=device))]
        if cfg.sft_questions:
            pairs = read_pairs(SFT_VAL).iloc[: cfg.sft_questions]
            prompts = [params.sft.prompt(q) for q in pairs["instruction"]]
            # an answer ends at EOS (no minimum length); a model that starts another turn is cut there
            marker = params.sft.template.split("{instruction}")[0].strip() or "###"
            answer_cfg = dataclasses.replace(sampling, stop=[*sampling.stop, marker], min_new_tokens=0)
            answers = {}
            for name, path in (("sft", MERGED), ("dpo", DPO_MODEL)):
                tuned, tuned_ckpt = load_model(path, device)
                check_compatible(tuned_ckpt, path, model_cfg, tokenizer_hash=tok.hash)
                for_decoding(tuned, cfg.precision, device)
                answers[name] = generate(tuned, tok, prompts, answer_cfg, device=device)
            records += [{"model": name, "prompt": p, "completion": answers[name][i].strip(), "reference": ref}
                        for i, (p, ref) in enumerate(zip(prompts, pairs["response"])) for name in answers]
        md = ["# Samples\n"]
        for r in records:
            md.append(f"## {r['model']}\n\n```\n{r['prompt']}{r['completion']}\n```\n")
            if "reference" in r:
                md.append(f"reference answer: {r['reference']}\n")
        write_text(GENERATE / "samples.md", "\n".join(md))
        write_text(GENERATE / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        run.log_artifact(GENERATE / "samples.md")
        run.log_artifact(GENERATE / "samples.jsonl")
        run.log_metrics({"samples": len(records), "mean_completion_chars":
                         sum(len(r["completion"]) for r in records) / max(len(records), 1)}, step=0)
    print("\n".join(md))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
