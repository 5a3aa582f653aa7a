"""Row 3: generation - decode tokens/s of minilm's KV-cache loop vs transformers ``generate`` on the same
weights (exported with ``minilm.hf``), greedy so both do the same work, at batch 1 and 8; minilm without
its cache at batch 1; and time to first token.

Each dtype (fp32, and the generate stage's default bf16 where native) runs against transformers in the
same dtype; no eos, exactly ``new`` tokens per row.
decode tokens/s = B (new - 1) / (generate time - time to first token); time to first token is a
generate call for one new token (prefill of the prompt plus choosing the token).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

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


def _minilm(model, prompts: list[list[int]], new: int, use_cache: bool = True, compile: bool = False):
    cfg = replace(greedy(new), compile=compile)
    return lambda: generate_ids(model, prompts, cfg, eos_id=None, use_cache=use_cache)


def _int8(model, dtype: torch.dtype):
    import copy

    from minilm.quant import quantize_int8
    return quantize_int8(copy.deepcopy(model), dtype)


def _hf(hf, prompts: list[list[int]], new: int):
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    return lambda: hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                               min_new_tokens=new, use_cache=True, pad_token_id=0)


def _same(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / max(sum(len(r) for r in a), 1)


def _first_call(fn) -> float:
    """Seconds the first call takes over the second (for a compiled path: its compilation)."""
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    fn()
    return max((t1 - t0) - (time.perf_counter() - t1), 0.0)


def _static_lines(fns, decode, full, compiled: dict[str, float], hf_name: str | None, prompt_len: int,
                  extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Batch 1: int8 weights (eager) and the compiled static-cache step (``SampleConfig.compile``, bf16 and
    int8) against transformers in the generate stage's dtype."""
    lines = []
    hf_ids = fns[hf_name]()[:, prompt_len:].tolist() if hf_name else None
    for name in ["minilm int8", *compiled]:
        ids = fns[name]()
        details: dict[str, Any] = {"total_s": median(full[name]["seconds"]), **extra}
        if name in compiled:
            details.update(compile_s=compiled[name],
                           same_tokens_as_eager=_same(ids, fns[name.removesuffix(" compiled")]()))
        if hf_name:
            details.update(baseline_name=f"{hf_name} generate", baseline=median(decode[hf_name]),
                           ratio=median_ratio(decode[name], decode[hf_name]), same_tokens=_same(ids, hf_ids))
        case = f"batch 1 {name} static cache" if name in compiled else f"batch 1 {name} KV cache"
        lines.append(line(case, "decode tokens/s", median(decode[name]), **details))
    return lines


def read_bytes(model: nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads: every linear layer's weight (int8 and its scales, or
    float) and bias, and the norms; of the embedding table only one row (so it counts only when tied to
    the LM head, as that head's weight)."""
    from minilm.quant import Int8Linear

    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            tensors = [m.weight_int8, m.scale, m.bias]
        elif isinstance(m, nn.Linear):
            tensors = [m.weight, m.bias]
        elif not list(m.children()) and not isinstance(m, nn.Embedding):
            tensors = list(m.parameters(recurse=False))
        else:
            continue
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _profile_lines(models: dict[str, nn.Module], rates: dict[str, float | None], new: int, prompt_len: int,
                   vocab: int) -> list[dict[str, Any]]:
    """The compiled step's time split by kind, and its rate against the roofline (weight bytes over the
    copy bandwidth measured now)."""
    from .decode_profile import CATEGORIES, copy_bandwidth, split

    bandwidth = copy_bandwidth()
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    lines = []
    for name, m in models.items():
        parts = split(m, prompt, new, replace(greedy(new), compile=True))
        for kind in CATEGORIES:
            lines.append(line(f"batch 1 {name} compiled: {kind}", "ms/token", parts["ms"][kind],
                              share_pct=100 * parts["shares"][kind]))
        weights = read_bytes(m)
        roof = bandwidth * 1e9 / weights
        rate = rates.get(f"{name} compiled") or 1000 / parts["ms_per_token"]
        lines.append(line(f"batch 1 {name} compiled vs roofline", "decode tokens/s", rate,
                          baseline_name=f"roofline: {weights / 1e6:.1f} MB of weights at {bandwidth:.1f} GB/s",
                          baseline=roof, ratio=rate / roof, weight_mb=weights / 1e6, copy_gb_s=bandwidth,
                          ms_per_token=1000 / rate, roofline_ms_per_token=1000 / roof))
    return lines


_PROFILE_NOTE = ("static cache = `SampleConfig.compile` (`minilm-sample --compile`): the decode step compiled "
                 "once by torch.compile over a fixed-shape cache (minilm.decode); compile_s = its first call "
                 "over its second (less when inductor's on-disk cache is warm from an earlier run); "
                 "same_tokens_as_eager = share of positions equal to the eager loop's in the same dtype (bf16 "
                 "rounding differs between fused and eager kernels, so near-ties of random weights can part). "
                 "The split: a torch.profiler trace of the compiled bf16 / int8 decoding (benchmarks/"
                 "decode_profile.py: weights = the matrix-vector products; attention = the fused softmax "
                 "kernels over the cache; sampling and loop = everything outside the step; framework "
                 "overhead = the step's time in none of its kernels), as shares of the profiled time applied "
                 "to the unprofiled ms/token. Roofline = bytes of weights a token reads / the bandwidth of a "
                 "200 MB copy measured in the same run; the 10M model's weights fit in the CPU's caches, so "
                 "it is a reference point rather than a hard floor.")


def run(ctx: Context) -> dict[str, Any]:
    import copy

    from minilm.precision import DTYPES, inference_dtype

    new, prompt_len = (32, 8) if ctx.quick else (256, 16)
    shape = replace(TINY_B, context_length=64) if ctx.quick else replace(TEN_M, name="10M",
                                                                         context_length=512)
    batches = (1, 2) if ctx.quick else (1, 8)
    auto = inference_dtype("auto", torch.device("cpu"))     # what the generate stage decodes in
    dtypes = [torch.float32] + ([auto] if auto != torch.float32 else [])
    dname = {dt: name for name, dt in DTYPES.items()}
    model = build_model(shape).eval()
    ours = {dt: model if dt == torch.float32 else copy.deepcopy(model).to(dt) for dt in dtypes}
    hf_missing = missing("transformers")
    theirs = {}
    if hf_missing is None:
        import transformers

        from minilm.hf import to_transformers
        transformers.logging.set_verbosity_error()
        theirs = {dt: to_transformers(model).eval().to(dt) for dt in dtypes}
    repeats = ctx.repeats if ctx.quick else 3
    int8 = _int8(model, auto)      # weight-only int8 (precision: int8), activations in `auto`
    lines, notes, rates1 = [], [], {}
    for B in batches:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, shape.vocab_size, (B, prompt_len), generator=g).tolist()
        fns, ttft, warm = {}, {}, []
        for dt in dtypes:
            fns[f"minilm {dname[dt]}"] = _minilm(ours[dt], prompts, new)
            ttft[f"minilm {dname[dt]}"] = _minilm(ours[dt], prompts, 1)
            warm.append(_minilm(ours[dt], prompts, WARM))
            if dt in theirs:
                fns[f"transformers {dname[dt]}"] = _hf(theirs[dt], prompts, new)
                ttft[f"transformers {dname[dt]}"] = _hf(theirs[dt], prompts, 1)
                warm.append(_hf(theirs[dt], prompts, WARM))
        compiled: dict[str, float] = {}
        if B == 1:
            fns["minilm fp32 no cache"] = _minilm(model, prompts, new, use_cache=False)
            warm.append(_minilm(model, prompts, WARM, use_cache=False))
            fns["minilm int8"], ttft["minilm int8"] = _minilm(int8, prompts, new), _minilm(int8, prompts, 1)
            warm.append(_minilm(int8, prompts, WARM))
            if ctx.decode_compile:
                for name, m in ((f"minilm {dname[auto]}", ours[auto]), ("minilm int8", int8)):
                    fns[f"{name} compiled"] = _minilm(m, prompts, new, compile=True)
                    compiled[f"{name} compiled"] = _first_call(fns[f"{name} compiled"])   # compiles
        ctx.log(f"  generation batch {B}: {', '.join(fns)}")
        first = alternate(ttft, ctx, min_seconds=0.1 if ctx.quick else 0.5)
        for fn in warm:   # a short run of every decode path, so the timed rounds need no long warm-up
            fn()
        full = alternate(fns, ctx, repeats=repeats, warmup=0, min_seconds=0.0)
        t_first = {n: median(t["seconds"]) for n, t in first.items()}
        # the prefill is the same eager forward either way
        first_of = {"minilm fp32 no cache": "minilm fp32", **{n: n.removesuffix(" compiled") for n in compiled}}
        decode = {n: decode_rates(t["seconds"], t_first[first_of.get(n, n)], B, new) for n, t in full.items()}
        if B == 1:
            rates1 = {n: median(r) for n, r in decode.items()}
        extra = {"batch": B, "new_tokens": new, "prompt_tokens": prompt_len, "context": shape.context_length,
                 "parameters": model.num_parameters()}
        for dt in dtypes:
            mine = f"minilm {dname[dt]}"
            if dt not in theirs:
                lines.append(line(f"batch {B} {mine} KV cache", "decode tokens/s", median(decode[mine]),
                                  total_s=median(full[mine]["seconds"]), dtype=dname[dt], **extra))
                lines.append(line(f"batch {B} {mine} time to first token", "ms", 1000 * t_first[mine],
                                  **extra))
                continue
            other = f"transformers {dname[dt]}"
            mine_ids = fns[mine]()
            same = _same(mine_ids, fns[other]()[:, prompt_len:].tolist())
            extra_dt = {}
            if dt != torch.float32:   # what decoding in a lower precision changes in minilm's own output
                extra_dt["same_tokens_as_minilm_fp32"] = _same(mine_ids, fns["minilm fp32"]())
            lines.append(line(f"batch {B} {mine} KV cache", "decode tokens/s", median(decode[mine]),
                              baseline_name=f"{other} generate", baseline=median(decode[other]),
                              ratio=median_ratio(decode[mine], decode[other]), same_tokens=same,
                              dtype=dname[dt], total_s=median(full[mine]["seconds"]),
                              baseline_total_s=median(full[other]["seconds"]), **extra_dt, **extra))
            lines.append(line(f"batch {B} {mine} time to first token", "ms", 1000 * t_first[mine],
                              baseline_name=f"{other} generate", baseline=1000 * t_first[other],
                              ratio=median_ratio(first[other]["seconds"], first[mine]["seconds"]), **extra))
        if B == 1:
            lines += _static_lines(fns, decode, full, compiled, f"transformers {dname[auto]}" if theirs else None,
                                   prompt_len, extra)
        if theirs:   # best vs best: minilm's fastest decoding (any precision, eager or compiled) against
            # transformers' faster dtype
            mine = max((n for n in decode if n.startswith("minilm") and "no cache" not in n),
                       key=lambda n: median(decode[n]) or 0)
            other = max((f"transformers {dname[dt]}" for dt in dtypes), key=lambda n: median(decode[n]) or 0)
            r = median_ratio(decode[mine], decode[other])
            lines.append(line(f"batch {B} best vs best ({mine} vs {other})", "decode tokens/s",
                              median(decode[mine]), baseline_name=f"{other} generate",
                              baseline=median(decode[other]), ratio=r,
                              target=f">= {TARGET_HF:g}x" if B == 1 else None,
                              met=(r >= TARGET_HF) if B == 1 and r is not None else None, **extra))
        if B == 1:
            r = median_ratio(decode["minilm fp32"], decode["minilm fp32 no cache"])
            lines.append(line(f"batch {B} KV cache vs no cache", "decode tokens/s", median(decode["minilm fp32"]),
                              baseline_name="minilm fp32 use_cache=False",
                              baseline=median(decode["minilm fp32 no cache"]),
                              ratio=r, target=f">= {TARGET_CACHE:g}x",
                              met=None if r is None else r >= TARGET_CACHE, **extra))
    if hf_missing:
        notes.append(f"transformers baseline skipped: {hf_missing}")
    notes.append(f"greedy, random weights (init_std 0.02), no eos: every row generates exactly {new} tokens. "
                 f"Each dtype is compared with transformers in the same dtype (weights cast, as "
                 f"`model.to(dtype)`); minilm's generate stage decodes in {dname[auto]} (precision auto). "
                 "same_tokens = share of positions where both greedy outputs agree. The cache-vs-no-cache "
                 "ratio is fp32 at batch 1 (without the cache the whole sequence is recomputed every step).")
    notes.append("at batch 1 a decode step reads every weight once (GEMV): the floor is weight bytes over "
                 "memory bandwidth, the same for both implementations; only the per-token overhead differs.")
    if ctx.decode_compile:
        lines += _profile_lines({f"minilm {dname[auto]}": ours[auto], "minilm int8": int8}, rates1, new,
                                prompt_len, shape.vocab_size)
        notes.append(_PROFILE_NOTE)
    return {"lines": lines, "notes": notes}
