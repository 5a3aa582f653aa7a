"""Row 7: decoding against llama.cpp - minilm's KV-cache loop vs llama.cpp (through llama-cpp-python) on
the same model, exported by ``minilm.gguf``: batch 1, greedy, no EOS, exactly ``new`` tokens after a
``prompt_len``-token prompt, both on the same number of threads (torch's).

llama.cpp runs the GGUF file in f16 and q8_0 (the export stage's choices; KV cache f16, its default);
minilm runs fp32 and the generate stage's ``auto`` dtype. Random weights (init_std 0.02) and a
SentencePiece tokenizer trained on pydoc text, so the GGUF file carries a real vocabulary.
decode tokens/s = (new - 1) / (generate time - time to first token), per round, median over rounds.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .generation import _first_call, _int8, _minilm, _same, decode_rates
from .harness import TEN_M, TINY_B, Context, alternate, build_model, line, median, median_ratio, missing

GGUF_TYPES = ("f16", "q8_0")


def _tokenizer(root: Path, vocab_size: int):
    from pydoc_data.topics import topics

    from minilm.config import TokenizerConfig
    from minilm.tokenizer import train_sentencepiece

    text = root / "corpus.txt"
    text.write_text("\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    cfg = TokenizerConfig(vocab_size=vocab_size, special_tokens=["### Instruction:", "### Response:"])
    return train_sentencepiece(text, root / "tokenizer.model", cfg)


def _llama_fn(llm, prompt: list[int], new: int):
    def run() -> list[int]:
        llm.reset()        # no reuse of the previous call's prompt cache: every call prefills
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                  reset=True):
            out.append(token)
            if len(out) == new:
                return out
        return out
    return run


def _flat(out: list) -> list[int]:
    """minilm returns one list per batch row, llama-cpp-python a flat list."""
    return out[0] if out and isinstance(out[0], list) else out


def _contenders(ctx: Context, model, tok, root: Path, prompt: list[int], new: int, threads: int):
    """{name: (decode fn, one-token fn)} for minilm's dtypes and llama.cpp's GGUF types."""
    import llama_cpp

    from minilm.gguf import export_gguf
    from minilm.precision import DTYPES, inference_dtype

    auto = inference_dtype("auto", torch.device("cpu"))
    names = {dt: n for n, dt in DTYPES.items()}
    fns, sizes, compile_s = {}, {}, {}
    for dt in dict.fromkeys([torch.float32, auto]):
        m = model if dt == torch.float32 else copy.deepcopy(model).to(dt)
        fns[f"minilm {names[dt]}"] = (_minilm(m, [prompt], new), _minilm(m, [prompt], 1))
    if ctx.decode_compile:   # the compiled static-cache step (SampleConfig.compile), bf16 and int8 weights
        for name, m in ((f"minilm {names[auto]}", copy.deepcopy(model).to(auto)),
                        ("minilm int8", _int8(model, auto))):
            fns[f"{name} compiled"] = (_minilm(m, [prompt], new, compile=True), _minilm(m, [prompt], 1))
            compile_s[f"{name} compiled"] = _first_call(fns[f"{name} compiled"][0])
    for kind in GGUF_TYPES:
        path = export_gguf(model, tok, root / f"model-{kind}.gguf", gguf_type=kind)
        sizes[kind] = path.stat().st_size
        llm = llama_cpp.Llama(str(path), n_ctx=model.config.context_length, n_batch=64, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        fns[f"llama.cpp {kind}"] = (_llama_fn(llm, prompt, new), _llama_fn(llm, prompt, 1))
    return fns, sizes, names[auto], compile_s


def run(ctx: Context) -> dict[str, Any]:
    why = missing("llama_cpp") or missing("gguf")
    if why:
        return {"skipped": why, "lines": [], "notes": [why]}
    new, prompt_len = (32, 8) if ctx.quick else (256, 16)
    shape = replace(TINY_B, vocab_size=512) if ctx.quick else replace(TEN_M, context_length=512)
    threads = torch.get_num_threads()
    model = build_model(shape).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(Path(tmp), shape.vocab_size)
        prompt = tok.encode("The function returns a list of the lines in the file", bos=True)[:prompt_len]
        fns, sizes, auto, compile_s = _contenders(ctx, model, tok, Path(tmp), prompt, new, threads)
        ctx.log(f"  llama.cpp row: {', '.join(fns)} on {threads} threads")
        first = alternate({n: f[1] for n, f in fns.items()}, ctx, min_seconds=0.1 if ctx.quick else 0.5)
        for decode, _ in fns.values():          # one full run of each before the timed rounds
            decode()
        full = alternate({n: f[0] for n, f in fns.items()}, ctx, repeats=ctx.repeats if ctx.quick else 3,
                         warmup=0, min_seconds=0.0)
        outputs = {n: _flat(f[0]()) for n, f in fns.items()}
    t_first = {n: median(t["seconds"]) for n, t in first.items()}
    decode = {n: decode_rates(t["seconds"], t_first[n], 1, new) for n, t in full.items()}
    extra = {"batch": 1, "new_tokens": new, "prompt_tokens": len(prompt), "threads": threads,
             "parameters": model.num_parameters(), "vocab_size": shape.vocab_size}
    lines = []
    for mine in [n for n in fns if n.startswith("minilm")]:
        for kind in GGUF_TYPES:
            other = f"llama.cpp {kind}"
            lines.append(line(f"{mine} vs {other}", "decode tokens/s", median(decode[mine]),
                              baseline_name=other, baseline=median(decode[other]),
                              ratio=median_ratio(decode[mine], decode[other]),
                              same_tokens=_same([outputs[mine]], [outputs[other]]),
                              gguf_bytes=sizes[kind], total_s=median(full[mine]["seconds"]),
                              baseline_total_s=median(full[other]["seconds"]),
                              **({"compile_s": compile_s[mine]} if mine in compile_s else {}), **extra))
        if mine in compile_s:    # its prefill is the eager one of the same dtype
            continue
        lines.append(line(f"{mine} time to first token", "ms", 1000 * t_first[mine],
                          baseline_name="llama.cpp f16", baseline=1000 * t_first["llama.cpp f16"],
                          ratio=median_ratio(first["llama.cpp f16"]["seconds"], first[mine]["seconds"]),
                          **extra))
    notes = [(f"greedy, random weights, no eos: every contender generates exactly {new} tokens on {threads} "
              f"threads. minilm's generate stage decodes in {auto} (precision auto). ratio = minilm tokens/s "
              "over llama.cpp tokens/s (> 1: minilm faster). same_tokens = share of positions where the two "
              "greedy outputs agree (f16/q8_0 rounding moves near-ties of random weights)."),
             ("llama.cpp is driven through llama-cpp-python's generate loop, one Python call per token, as a "
              "Python user runs it; every call prefills the prompt afresh (no prompt-cache reuse)."),
             ("minilm ... compiled = `SampleConfig.compile` (`minilm-sample --compile`): the decode step compiled "
              "by torch.compile over a static-shape cache (minilm.decode); compile_s = its first call over its "
              "second. int8 = weight-only int8 (`precision: int8`), activations in bf16, the closest minilm "
              "counterpart of q8_0.")]
    return {"lines": lines, "notes": notes}
