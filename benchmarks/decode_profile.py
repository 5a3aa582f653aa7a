"""Where a decoded token's time goes, and the floor it could reach (row 3).

``split``: a torch.profiler trace of greedy batch-1 decoding with the compiled static-cache step
(``SampleConfig.compile``), its op times grouped by kind, per token:

- weights: the matrix-vector products (``aten::mm``, ``aten::_weight_int8pack_mm``, ...): every weight
  read once;
- attention over the cache: inductor's fused kernels holding the softmax (scores over the S cache slots,
  softmax, weighted sum of the values; rotary embedding and the key/value split are fused into them);
- other kernels: the rest of the compiled graph (norms, SiLU, residual adds, embedding, final cast);
- sampling and loop: everything outside the compiled step (logits processors, argmax, the cache write,
  the bookkeeping of ``minilm.sampling``);
- framework overhead: the compiled step's time that is in none of its kernels (the Python wrapper,
  dynamo's guards, buffer allocation).

The profiled step is compiled with ``cpp.enable_kernel_profile`` (each inductor kernel recorded by name),
a second compilation of the same graph; the profiler's own cost is in the figures, so they are given as
shares of the profiled time, applied to the unprofiled ms/token.

``copy_bandwidth``: GB/s of a plain 200 MB tensor copy (bytes copied over time), measured in the same run;
the roofline is weight bytes over it (decoding at batch 1 reads every weight once a token).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch

WEIGHT_OPS = ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::linear", "aten::matmul",
              "mkldnn::_linear_pointwise", "aten::bmm")
CATEGORIES = ("weights", "attention over the cache", "other kernels", "sampling and loop",
              "framework overhead")


def copy_bandwidth(mb: int = 200, repeats: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` for ``mb`` MB (bytes copied / seconds), median of ``repeats``."""
    src = torch.ones(mb * 1_000_000 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    times.sort()
    return src.numel() * 4 / times[len(times) // 2] / 1e9


def _classify(events) -> tuple[dict[str, float], int]:
    """µs per category over the decoding part of a trace (from the first compiled step's start to the
    last one's end: the prefill before it is not decoding), and the number of steps."""
    steps = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.name.startswith("Torch-Compiled Region"))
    if not steps:
        return dict.fromkeys(CATEGORIES, 0.0), 0
    t0, t1 = steps[0][0], max(end for _, end in steps)
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if not t0 <= e.time_range.start < t1:
            continue
        if e.name in WEIGHT_OPS:
            out["weights"] += e.self_cpu_time_total
        elif e.name.startswith("graph_") and "cpp_fused" in e.name:
            out["attention over the cache" if "softmax" in e.name else "other kernels"] += e.self_cpu_time_total
    in_steps = sum(end - start for start, end in steps)
    kernels = out["weights"] + out["attention over the cache"] + out["other kernels"]
    out["framework overhead"] = max(in_steps - kernels, 0.0)
    out["sampling and loop"] = max((t1 - t0) - in_steps, 0.0)
    return out, len(steps)


def split(model, prompt: list[list[int]], new: int, cfg) -> dict[str, Any]:
    """ms/token of each category for greedy decoding of ``new`` tokens after ``prompt`` (batch 1) with the
    compiled step, and the ms/token of the same decoding unprofiled."""
    from minilm import decode
    from minilm.sampling import generate_ids

    profiled = torch.compile(decode.decode_step, fullgraph=True, dynamic=False,
                             options={"cpp.enable_kernel_profile": True})
    original = decode.compiled_step
    decode.compiled_step = lambda mode=None: profiled
    try:
        run = lambda n: generate_ids(model, prompt, replace(cfg, max_new_tokens=n), eos_id=None)
        run(new)                                # compiles the profiling variant
        plain = (_median(lambda: run(new)) - _median(lambda: run(1))) / (new - 1)   # after the first token
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(new)
    finally:
        decode.compiled_step = original
    cats, steps = _classify(prof.events())
    total = sum(cats[c] for c in CATEGORIES)
    profiled_ms = total / 1000 / max(steps, 1)
    ms_token = 1000 * plain if plain > 0 else profiled_ms   # (timer noise at toy sizes)
    return {"ms_per_token": ms_token, "profiled_ms_per_token": profiled_ms,
            "shares": {c: cats[c] / total if total else 0.0 for c in CATEGORIES},
            "ms": {c: ms_token * cats[c] / total if total else 0.0 for c in CATEGORIES}}


def _median(fn, repeats: int = 3) -> float:
    return sorted(_seconds(fn) for _ in range(repeats))[repeats // 2]


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
