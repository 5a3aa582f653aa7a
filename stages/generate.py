"""generate: sample completions for the prompts in params `generate` from the base model.
Writes out/generate/samples.md (readable) and samples.jsonl, both logged to MLflow."""

from __future__ import annotations

import json

from minilm.checkpoint import load_model
from minilm.cli import run_main
from minilm.config import SampleConfig, to_dict
from minilm.fileio import write_text
from minilm.precision import resolve_device
from minilm.sampling import generate
from minilm.tokenizer import load_tokenizer

from .common import GENERATE, PRETRAIN, setup, stage_run, tokenizer_path


def main(argv: list[str] | None = None) -> None:
    params = setup("generate", __doc__, argv)
    cfg = params.generate
    sample_cfg = SampleConfig(**{k: v for k, v in to_dict(cfg).items() if k in SampleConfig.__annotations__})
    ckpt_path = PRETRAIN / "best.safetensors"
    device = resolve_device(params.project.device)
    with stage_run("generate", params, ["generate", "project"], out_dir=GENERATE,
                   inputs={"base_model": ckpt_path, "tokenizer": tokenizer_path()}) as run:
        model, _ = load_model(ckpt_path, device)
        tok = load_tokenizer(tokenizer_path())
        outs = generate(model, tok, cfg.prompts, sample_cfg, device=device)
        records = [{"model": "base", "prompt": p, "completion": c} for p, c in zip(cfg.prompts, outs)]
        md = ["# Samples\n"] + [f"## {r['model']}: {r['prompt']!r}\n\n{r['prompt']}{r['completion']}\n"
                                for r in records]
        write_text(GENERATE / "samples.md", "\n".join(md))
        write_text(GENERATE / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        run.log_artifact(GENERATE / "samples.md")
        run.log_artifact(GENERATE / "samples.jsonl")
        run.log_metrics({"samples": len(records),
                         "mean_completion_chars": sum(len(c) for c in outs) / max(len(outs), 1)}, 0)
    print("\n".join(md))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
