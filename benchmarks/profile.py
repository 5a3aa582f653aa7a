"""Where a training step's time goes: torch.profiler over a few steps of one minilm variant, each op's
self time put into one kind - GEMM, attention, optimizer, elementwise/other - and what no op accounts for
(Python, dispatch, autograd bookkeeping) as framework overhead. Used by row 2 to explain the share of
peak GEMM FLOP/s that a step reaches.

Kinds, by op: GEMM = the linear layers' matrix products (``mm``/``addmm``/oneDNN linear); attention = the
batched score and weighted-sum products, SDPA kernels and the softmax (forward and backward); optimizer =
everything inside the clip-and-step range (norms, clipping, fused AdamW, zero_grad); elementwise/other =
every other kernel (norms, RoPE, SwiGLU, casts to and from bf16, the loss, inductor's fused kernels, which
are profiled one by one with ``cpp.enable_kernel_profile``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .harness import Shape, build_model, random_batch, train_config
from .steps import minilm_step

KINDS = ("GEMM", "attention", "optimizer", "elementwise/other", "framework overhead")
OPTIMIZER_RANGE = "minilm.optimizer"


def kind_of(name: str) -> str:
    """The kind of a profiled op by its name (events inside the optimizer range are 'optimizer')."""
    n = name.lower()
    if n in ("aten::mm", "aten::addmm", "aten::_addmm_activation") or "mkldnn::_linear" in n \
            or "onednn::" in n and "linear" in n:
        return "GEMM"
    if "bmm" in n or "scaled_dot_product" in n or "flash_attention" in n or \
            ("softmax" in n and "log_softmax" not in n):
        return "attention"
    return "elementwise/other"


def _leaf_ops(events: Any) -> list[Any]:
    """Profiled events that are ops or kernels (not Python or profiler ranges)."""
    skip = ("##", "Optimizer.", "CompiledFunction", "TorchDynamo", "Torch-Compiled", "autograd::engine",
            "ProfilerStep", OPTIMIZER_RANGE)
    return [e for e in events if not e.name.startswith(skip)]


def breakdown(events: Any, steps: int, wall_s: float) -> dict[str, float]:
    """Milliseconds per step of each kind (self times), framework overhead being the rest of the wall."""
    ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == OPTIMIZER_RANGE]
    ms = dict.fromkeys(KINDS, 0.0)
    for e in _leaf_ops(events):
        inside = any(a <= e.time_range.start and e.time_range.end <= b for a, b in ranges)
        ms["optimizer" if inside else kind_of(e.name)] += e.self_cpu_time_total / 1000 / steps
    ms["framework overhead"] = max(0.0, 1000 * wall_s / steps - sum(ms.values()))
    return ms


def profile_step(shape: Shape, precision: str, *, compile: bool, steps: int = 3, warmup: int = 2
                 ) -> dict[str, Any]:
    """Profile ``steps`` training steps of minilm at ``shape`` (after ``warmup``); ms per step by kind."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch._dynamo.reset()     # dynamo caches the loss's graph on its code: recompile with kernels profiled
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        step = minilm_step(build_model(shape), random_batch(shape), train_config(), precision,
                           compile=compile, optimizer_range=lambda: record_function(OPTIMIZER_RANGE))
        for _ in range(warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            wall = time.perf_counter() - t0
    ms = breakdown(prof.events(), steps, wall)
    total = sum(ms.values())
    return {"variant": f"minilm{'+compile' if compile else ''} {precision}", "shape": shape.name,
            "steps": steps, "step_ms": total, "ms": ms, "share": {k: v / total for k, v in ms.items()}}
