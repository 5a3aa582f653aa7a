"""export: the merged SFT model (out/merge/model.safetensors) with its tokenizer, as
- out/export/hf/: a Hugging Face directory (transformers' AutoModelForCausalLM / AutoTokenizer load it
  with no custom code; its chat template renders `sft.template`, generation_config.json carries the
  `generate` sampling defaults; PEFT loads out/sft/tuned onto it), and
- out/export/model.gguf: one GGUF file for llama.cpp, matrices in `export.gguf_type`.
Writes out/export/metrics.json (file sizes). Both outputs are byte-reproducible."""

from __future__ import annotations

from dataclasses import fields

from minilm.config import SampleConfig
from minilm.convert import load_for_export
from minilm.errors import CheckpointError, run_main
from minilm.export import export_hf
from minilm.fileio import write_json
from minilm.gguf import export_gguf, read_gguf_info

from .common import MERGED, OUT, setup, stage_run, tokenizer_path

PARAMS = ["export", "sft.template", *(f"generate.{k}" for k in (
    "temperature", "top_k", "top_p", "repetition_penalty", "ban_window", "no_repeat_ngram", "min_new_tokens",
    "max_new_tokens"))]                  # the chat template and sampling defaults are written into the files
EXPORT = OUT / "export"
HF_DIR = EXPORT / "hf"
GGUF = EXPORT / "model.gguf"


def main(argv: list[str] | None = None) -> None:
    params = setup("export", __doc__, argv)
    cfg = params.export
    sample = SampleConfig(**{f.name: getattr(params.generate, f.name) for f in fields(SampleConfig)})
    if not MERGED.is_file():
        raise CheckpointError(f"{MERGED} not found; run the merge stage first (`dvc repro merge`)")
    tok_path = tokenizer_path()
    with stage_run("export", params, ["export", "generate", "sft"], out_dir=EXPORT,
                   inputs={"model": MERGED, "tokenizer": tok_path}) as run:
        model, tokenizer = load_for_export(MERGED, tok_path)
        export_hf(model, tokenizer, HF_DIR, sample=sample, template=params.sft.template)
        export_gguf(model, tokenizer, GGUF, gguf_type=cfg.gguf_type, sample=sample,
                    template=params.sft.template, name=cfg.name)
        info = read_gguf_info(GGUF)
        metrics = {"gguf_bytes": GGUF.stat().st_size, "gguf_tensors": info["tensors"],
                   "hf_bytes": sum(p.stat().st_size for p in HF_DIR.iterdir()),
                   "parameters": model.num_parameters()}
        write_json(EXPORT / "metrics.json", metrics)
        run.log_metrics(metrics, step=0)
        run.log_artifact(EXPORT / "metrics.json")
    print(f"export: {HF_DIR}/ (transformers) and {GGUF} ({cfg.gguf_type}, {metrics['gguf_bytes']:,} bytes; "
          "llama.cpp)")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
