"""Row 3: generation - decode tokens/s of minilm's KV-cache loop vs transformers ``generate`` on the same
weights (exported with ``minilm.hf``), greedy so both do the same work, at batch 1 and 8; minilm without
its cache at batch 1; and time to first token.

Both sides run fp32 (what minilm's generate stage uses), no eos, exactly ``new`` tokens per row.
decode tokens/s = B (new - 1) / (generate time - time to first token); time to first token is a
generate call for one new token (prefill of the prompt plus choosing the token).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from minilm.config import SampleConfig
from minilm.sampling import generate_ids

from .harness import TEN_M, TINY_B, Context, alternate, build_model, line, median, median_ratio, missing

TARGET_HF, TARGET_CACHE = 3.0, 5.0
WARM = 8   # new tokens of the warm-up runs


def greedy(new: int) -> SampleConfig:
    return SampleConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, ban_window=0,
                        no_repeat_ngram=0, min_new_tokens=new, max_new_tokens=new, stop=[], seed=None)


def decode_rates(seconds: list[float], first: float, batch: int, new: int) -> list[float | None]:
    """Decode tokens/s of each round: the tokens after the first over the time after the first token.
    A round no longer than the time to first token (timer noise on toy sizes) gives None."""
    return [batch * (new - 1) / (s - first) if s > first else None for s in seconds]


def _minilm(model, prompts: list[list[int]], new: int, use_cache: bool = True):
    cfg = greedy(new)
    return lambda: generate_ids(model, prompts, cfg, eos_id=None, use_cache=use_cache)


def _hf(hf, prompts: list[list[int]], new: int):
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    return lambda: hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                               min_new_tokens=new, use_cache=True, pad_token_id=0)


def run(ctx: Context) -> dict[str, Any]:
    new, prompt_len = (32, 8) if ctx.quick else (256, 16)
    shape = replace(TINY_B, context_length=64) if ctx.quick else replace(TEN_M, name="10M",
                                                                         context_length=512)
    batches = (1, 2) if ctx.quick else (1, 8)
    model = build_model(shape).eval()
    hf_missing = missing("transformers")
    hf = None
    if hf_missing is None:
        import transformers

        from minilm.hf import to_transformers
        transformers.logging.set_verbosity_error()
        hf = to_transformers(model).eval()
    repeats = ctx.repeats if ctx.quick else 3
    lines, notes = [], []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, shape.vocab_size, (B, prompt_len), generator=g).tolist()
        fns = {"minilm": _minilm(model, prompts, new)}
        ttft = {"minilm": _minilm(model, prompts, 1)}
        if hf is not None:
            fns["transformers"] = _hf(hf, prompts, new)
            ttft["transformers"] = _hf(hf, prompts, 1)
        warm = [_minilm(model, prompts, WARM), _minilm(model, prompts, WARM, use_cache=False)]
        if hf is not None:
            warm.append(_hf(hf, prompts, WARM))
        if B == 1:
            fns["minilm no cache"] = _minilm(model, prompts, new, use_cache=False)
        ctx.log(f"  generation batch {B}: {', '.join(fns)}")
        first = alternate(ttft, ctx, min_seconds=0.1 if ctx.quick else 0.5)
        for fn in warm:   # a short run of every decode path, so the timed rounds need no long warm-up
            fn()
        full = alternate(fns, ctx, repeats=repeats, warmup=0, min_seconds=0.0)
        t_first = {n: median(t["seconds"]) for n, t in first.items()}
        first_of = {"minilm no cache": "minilm"}   # the prefill is the same forward with or without cache
        decode = {n: decode_rates(t["seconds"], t_first[first_of.get(n, n)], B, new) for n, t in full.items()}
        extra = {"batch": B, "new_tokens": new, "prompt_tokens": prompt_len, "context": shape.context_length,
                 "parameters": model.num_parameters()}
        if hf is not None:
            ours = _minilm(model, prompts, new)()
            theirs = fns["transformers"]()[:, prompt_len:].tolist()
            same = sum(a == b for row_a, row_b in zip(ours, theirs) for a, b in zip(row_a, row_b)) / (B * new)
            r = median_ratio(decode["minilm"], decode["transformers"])
            lines.append(line(f"batch {B} KV cache", "decode tokens/s", median(decode["minilm"]),
                              baseline_name="transformers generate", baseline=median(decode["transformers"]),
                              ratio=r, target=f">= {TARGET_HF:g}x" if B == 1 else None,
                              met=(r >= TARGET_HF) if B == 1 and r is not None else None, same_tokens=same,
                              total_s=median(full["minilm"]["seconds"]),
                              baseline_total_s=median(full["transformers"]["seconds"]), **extra))
            lines.append(line(f"batch {B} time to first token", "ms", 1000 * t_first["minilm"],
                              baseline_name="transformers generate", baseline=1000 * t_first["transformers"],
                              ratio=median_ratio(first["transformers"]["seconds"],
                                                 first["minilm"]["seconds"]),
                              **extra))
        else:
            lines.append(line(f"batch {B} KV cache", "decode tokens/s", median(decode["minilm"]),
                              total_s=median(full["minilm"]["seconds"]), **extra))
            lines.append(line(f"batch {B} time to first token", "ms", 1000 * t_first["minilm"], **extra))
        if B == 1:
            r = median_ratio(decode["minilm"], decode["minilm no cache"])
            lines.append(line(f"batch {B} KV cache vs no cache", "decode tokens/s", median(decode["minilm"]),
                              baseline_name="minilm use_cache=False",
                              baseline=median(decode["minilm no cache"]),
                              ratio=r, target=f">= {TARGET_CACHE:g}x",
                              met=None if r is None else r >= TARGET_CACHE, **extra))
    if hf_missing:
        notes.append(f"transformers baseline skipped: {hf_missing}")
    notes.append("fp32, greedy, random weights (init_std 0.02), no eos: every row generates exactly "
                 f"{new} tokens. same_tokens = share of positions where both greedy outputs agree. minilm "
                 "without cache is timed at batch 1 only (it recomputes the whole sequence every step).")
    return {"lines": lines, "notes": notes}
