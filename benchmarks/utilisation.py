"""Row 2: hardware utilisation - minilm's achieved model FLOP/s as a share of the peak matmul FLOP/s
measured in the same alternation (row 1's) with one large square GEMM of the same dtype.

model FLOPs per token = 6 N + 12 L d T, with N the parameters that take part in a matmul (every linear
layer, the lm_head included even when tied), L layers, d = d_model, T = context length.
"""

from __future__ import annotations

from typing import Any

from . import harness, profile, training
from .harness import Context, line, median

TARGET = 0.5


def run(ctx: Context) -> dict[str, Any]:
    lines = []
    shapes = training.shapes(ctx)
    for shape in shapes:
        m = training.measure(ctx, shape)
        best = training.best(m, "minilm")
        for name in m["times"]:
            variant, precision = name.split(" ")
            if not variant.startswith("minilm"):
                continue
            steps = m["times"][name]["seconds"]
            gemm = m["times"][training.contender("gemm", precision)]["seconds"]
            model_flops = [m["tokens_per_step"] * m["flops_per_token"] / s for s in steps]   # per round
            peak = [m["gemm_flops"] / s for s in gemm]
            share = [a / b for a, b in zip(model_flops, peak)]
            is_target = shape is shapes[-1] and name == best
            lines.append(line(
                f"{shape.name} {name}", "share of peak matmul FLOP/s", median(share),
                baseline_name=f"GEMM {m['gemm_n']}^3 {precision}", baseline=None,
                target=f">= {TARGET:.0%}" if is_target else None,
                met=(median(share) >= TARGET) if is_target else None,
                model_gflops=median(model_flops) / 1e9, peak_gflops=median(peak) / 1e9,
                flops_per_token=m["flops_per_token"]))
    profiled = _profile(ctx, shapes[-1])
    notes = ["model FLOPs/token = 6 N + 12 L d T (N = parameters of every linear layer incl. the lm_head, "
             "L layers, d = d_model, T = context; not halved for the causal mask); peak = median FLOP/s of "
             "a square GEMM of the same dtype timed in the same rotated rounds as the model; the share is "
             "taken per round, median reported. The target applies to the fastest minilm variant at the "
             "larger size."]
    notes.append(profiled["note"])
    return {"lines": lines, "notes": notes, "profile": profiled}


def _profile(ctx: Context, shape: Any) -> dict[str, Any]:
    """Where the target variant's step time goes (torch.profiler, :mod:`benchmarks.profile`), against
    what the same step would take at the measured peak GEMM rate."""
    m = training.measure(ctx, shape)
    variant = training.contender("minilm+compile" if ctx.compile else "minilm", "bf16")
    ctx.log(f"  profiling {shape.name} {variant}")
    prof = profile.profile_step(shape, "bf16", compile=ctx.compile, steps=2 if ctx.quick else 4)
    peak = m["gemm_flops"] / median(m["times"][training.contender("gemm", "bf16")]["seconds"])   # FLOP/s
    tokens = m["tokens_per_step"]
    linear_flops = 6.0 * harness.matmul_params(harness.build_model(shape)) * tokens
    at_peak_ms = 1000 * tokens * m["flops_per_token"] / peak
    gemm_rate = linear_flops / max(prof["ms"]["GEMM"] / 1000, 1e-12)
    prof.update(at_peak_ms=at_peak_ms, gemm_kernels_share_of_peak=gemm_rate / peak,
                timed_step_ms=1000 * median(m["times"][variant]["seconds"]))
    parts = ", ".join(f"{k} {prof['ms'][k]:.0f} ms ({prof['share'][k]:.0%})" for k in profile.KINDS)
    prof["note"] = (f"profile of the {shape.name} {variant} step (torch.profiler, {prof['steps']} steps, "
                    f"self time per op): {prof['step_ms']:.0f} ms per profiled step = {parts}. At the "
                    f"measured peak GEMM rate the step's model FLOPs would take {at_peak_ms:.0f} ms (the step "
                    f"timed without the profiler: {prof['timed_step_ms']:.0f} ms); the GEMM kernels alone run "
                    f"at {prof['gemm_kernels_share_of_peak']:.0%} of that peak (the 6N linear-layer FLOPs over "
                    "their time: these products are smaller and skinnier than the square 2048^3 GEMM).")
    return prof
