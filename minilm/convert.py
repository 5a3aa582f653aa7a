"""Console scripts ``minilm-export`` (a checkpoint -> Hugging Face directory and/or GGUF file) and
``minilm-import`` (a local Hugging Face Llama checkpoint -> a minilm checkpoint + tokenizer).

    minilm-export --ckpt out/merge/model.safetensors --tokenizer out/tokenizer/tokenizer.model \\
        --hf exported/hf --gguf exported/model.gguf --gguf-type q8_0 --params params.yaml
    minilm-import path/to/hf-llama --out init/model.safetensors      # + init/tokenizer.model

Every expected mistake is one line (``error: ...``) and exit code 2, and nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, get_args

from .cli import run_main
from .config import DEFAULT_TEMPLATE, SampleConfig, build, load_yaml
from .errors import CheckpointError
from .export import GGUFType

_SAMPLE_KEYS = tuple(SampleConfig.__dataclass_fields__)


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minilm-export",
        description="Export a minilm checkpoint as a Hugging Face directory (transformers, PEFT) and/or "
                    "a GGUF file (llama.cpp). Only Llama-shaped models (block: sequential, norm: rmsnorm) "
                    "with a SentencePiece BPE tokenizer export.",
        epilog="Norms stay f32 in every GGUF type; q8_0 (the default) halves f16's bytes.")
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint file (*.safetensors); merge "
                   "LoRA adapters first (the merge stage's out/merge/model.safetensors)")
    p.add_argument("--tokenizer", metavar="PATH", help="the tokenizer file the model was trained with "
                   "(default: tokenizer.model beside the checkpoint)")
    p.add_argument("--hf", metavar="DIR", help="write a Hugging Face model directory here")
    p.add_argument("--gguf", metavar="PATH", help="write a GGUF file here")
    p.add_argument("--gguf-type", choices=get_args(GGUFType), default="q8_0",
                   help="weight type of the GGUF matrices (default: q8_0)")
    p.add_argument("--name", default="minilm", help="model name stored in the GGUF file (default: minilm)")
    p.add_argument("--params", metavar="PATH", help="params.yaml whose sft.template becomes the chat "
                   "template and whose generate section the sampling defaults (default: minilm's defaults)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights when the checkpoint has them")
    return p


def _from_params(path: str | None) -> tuple[SampleConfig, str]:
    """Sampling defaults (params ``generate``) and the SFT template (params ``sft.template``)."""
    if path is None:
        return SampleConfig(), DEFAULT_TEMPLATE
    raw = load_yaml(Path(path))
    generate = {k: v for k, v in (raw.get("generate") or {}).items() if k in _SAMPLE_KEYS}
    sample = build(SampleConfig, generate, "generate", source=path)
    template = (raw.get("sft") or {}).get("template", DEFAULT_TEMPLATE)
    return sample, str(template)


def load_for_export(ckpt_path: str | Path, tokenizer_path: str | Path | None, *, ema: bool = False):
    """The model of a checkpoint and the tokenizer it was trained with (checked by its sha256 when the
    checkpoint recorded one)."""
    from .checkpoint import check_compatible, load_model
    from .tokenizer import load_tokenizer

    ckpt_path = Path(ckpt_path)
    if tokenizer_path is None:
        beside = ckpt_path.parent / "tokenizer.model"
        if not beside.is_file():
            raise CheckpointError(f"no tokenizer for {ckpt_path} (none given, no tokenizer.model beside "
                                  "it); pass --tokenizer, the file the model was trained with")
        tokenizer_path = beside
    model, ckpt = load_model(ckpt_path, use_ema=ema)
    tokenizer = load_tokenizer(tokenizer_path)
    check_compatible(ckpt, ckpt_path, tokenizer_hash=tokenizer.hash)
    return model, tokenizer


def _export(argv: list[str] | None) -> int:
    args = export_parser().parse_args(argv)
    if not args.hf and not args.gguf:
        raise CheckpointError("nothing to export: pass --hf DIR and/or --gguf PATH")
    sample, template = _from_params(args.params)
    from .export import export_hf
    from .gguf import export_gguf

    model, tokenizer = load_for_export(args.ckpt, args.tokenizer, ema=args.ema)
    if args.hf:
        export_hf(model, tokenizer, args.hf, sample=sample, template=template)
        print(f"wrote {args.hf}/ (transformers: AutoModelForCausalLM.from_pretrained({args.hf!r}))")
    if args.gguf:
        export_gguf(model, tokenizer, args.gguf, gguf_type=args.gguf_type, sample=sample,
                    template=template, name=args.name)
        print(f"wrote {args.gguf} ({args.gguf_type}; llama.cpp: llama-cli -m {args.gguf})")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """Console script ``minilm-export``."""
    return run_main(_export, argv)


# --------------------------------------------------------------------------------------------------
# minilm-import


def import_transformers(model_dir: str | Path, out: str | Path, tokenizer_out: str | Path | None = None
                        ) -> dict[str, Any]:
    """Write a Hugging Face Llama checkpoint as a minilm checkpoint ``out`` and its SentencePiece model
    as ``tokenizer_out`` (default: ``tokenizer.model`` beside ``out``); returns what was written."""
    from .checkpoint import save_checkpoint
    from .fileio import atomic_write, check_writable
    from .hf import from_transformers

    out = Path(out)
    tokenizer_out = Path(tokenizer_out) if tokenizer_out else out.parent / "tokenizer.model"
    model, tokenizer = from_transformers(model_dir)
    check_writable(out.parent)
    check_writable(tokenizer_out.parent)
    with atomic_write(tokenizer_out, "wb") as fh:
        fh.write(tokenizer.path.read_bytes())
    save_checkpoint(out, model, extra={"tokenizer_sha256": tokenizer.hash,
                                       "imported_from": "transformers:" + Path(model_dir).name})
    return {"checkpoint": out, "tokenizer": tokenizer_out, "parameters": model.num_parameters(),
            "config": model.config}


def import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minilm-import",
        description="Import a local Hugging Face Llama checkpoint (config.json, model.safetensors, "
                    "tokenizer.model) as a minilm checkpoint, e.g. to continue pretraining it or to "
                    "LoRA-tune it. Nothing is downloaded.")
    p.add_argument("model_dir", metavar="DIR", help="the Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="PATH", help="minilm checkpoint to write (*.safetensors)")
    p.add_argument("--tokenizer-out", metavar="PATH",
                   help="where to copy tokenizer.model (default: beside --out)")
    return p


def _import(argv: list[str] | None) -> int:
    args = import_parser().parse_args(argv)
    done = import_transformers(args.model_dir, args.out, args.tokenizer_out)
    print(f"wrote {done['checkpoint']} ({done['parameters']:,} parameters) and {done['tokenizer']}")
    cfg = done["config"]
    keys = ("context_length", "n_layer", "n_head", "n_kv_head", "d_model", "ffn_hidden", "norm_eps", "rope_base",
            "tie_embeddings", "bias")
    print("its shape, for params.yaml's model section (to fine-tune it with sft.base):\n" +
          "\n".join(f"  {k}: {json.dumps(getattr(cfg, k))}" for k in keys))
    return 0


def import_main(argv: list[str] | None = None) -> int:
    """Console script ``minilm-import``."""
    return run_main(_import, argv)
