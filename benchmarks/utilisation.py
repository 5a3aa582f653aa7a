"""Row 2: hardware utilisation - minilm's achieved model FLOP/s as a share of the peak matmul FLOP/s
measured in the same alternation (row 1's) with one large square GEMM of the same dtype.

model FLOPs per token = 6 N + 12 L d T, with N the parameters that take part in a matmul (every linear
layer, the lm_head included even when tied), L layers, d = d_model, T = context length.
"""

from __future__ import annotations

from typing import Any

from . import training
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
    notes = ["model FLOPs/token = 6 N + 12 L d T (N = parameters of every linear layer incl. the lm_head, "
             "L layers, d = d_model, T = context; not halved for the causal mask); peak = median FLOP/s of "
             "a square GEMM of the same dtype timed in the same rotated rounds as the model; the share is "
             "taken per round, median reported. The target applies to the fastest minilm variant at the "
             "larger size."]
    return {"lines": lines, "notes": notes}
