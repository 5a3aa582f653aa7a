"""Row 1: training throughput (tokens/s of forward + backward + AdamW) of minilm vs transformers'
LlamaForCausalLM of the identical shape, same batch, same weights (exported with ``minilm.hf``).

Per shape, one alternation holds every contender - minilm and transformers, each eager and compiled, in
fp32 and under bf16 autocast; minilm in bf16 with its attention forced onto SDPA (what the explicit-matmul
kernel buys); and a large GEMM of each dtype for row 2 - so any two can be compared round by round.
"""

from __future__ import annotations

from typing import Any

import torch

from .harness import (NANOGPT, TEN_M, TINY_A, TINY_B, Context, Shape, alternate, build_model, line, median,
                      median_ratio, missing, random_batch, train_config, train_flops_per_token)
from .steps import hf_step, minilm_step

PRECISIONS = ("fp32", "bf16")
TARGET = 2.0


def shapes(ctx: Context) -> list[Shape]:
    return [TINY_A, TINY_B] if ctx.quick else [NANOGPT, TEN_M]


def gemm(n: int, dtype: torch.dtype):
    """An ``n x n @ n x n`` product into a preallocated output (2 n^3 FLOPs per call)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    return lambda: torch.mm(a, b, out=c)


def with_backend(name: str, step):
    """``step`` run with minilm's attention kernel forced to ``name``."""
    from minilm.model import attention_backend

    def run():
        with attention_backend(name):
            return step()
    return run


def contender(variant: str, precision: str) -> str:
    return f"{variant} {precision}"


def measure(ctx: Context, shape: Shape) -> dict[str, Any]:
    """Seconds per step of every contender at ``shape`` (memoised for the run: rows 1 and 2 share it)."""
    key = ("training", shape.name)
    if key in ctx.memo:
        return ctx.memo[key]
    torch._dynamo.reset()   # each shape compiles afresh: no pile-up of recompiles towards dynamo's limit
    batch, cfg = random_batch(shape), train_config()
    hf_missing = missing("transformers")
    fns = {}
    gemm_n = 256 if ctx.quick else 2048
    for precision in PRECISIONS:
        fns[contender("minilm", precision)] = minilm_step(build_model(shape), batch, cfg, precision)
        if ctx.compile:
            fns[contender("minilm+compile", precision)] = minilm_step(build_model(shape), batch, cfg, precision,
                                                                     compile=True)
        if precision == "bf16":
            fns[contender("minilm-sdpa", precision)] = with_backend(
                "sdpa", minilm_step(build_model(shape), batch, cfg, precision))
        if hf_missing is None:
            from minilm.hf import to_transformers
            fns[contender("transformers", precision)] = hf_step(to_transformers(build_model(shape)), batch,
                                                                cfg, precision)
            if ctx.compile:
                fns[contender("transformers+compile", precision)] = hf_step(
                    to_transformers(build_model(shape)), batch, cfg, precision, compile=True)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        fns[contender("gemm", precision)] = gemm(gemm_n, dtype)
    ctx.log(f"  training {shape.name}: {', '.join(fns)}")
    times = alternate(fns, ctx)
    result = {"shape": shape, "times": times, "tokens_per_step": shape.batch_size * shape.context_length,
              "flops_per_token": train_flops_per_token(build_model(shape)), "gemm_n": gemm_n,
              "gemm_flops": 2.0 * gemm_n ** 3, "transformers_missing": hf_missing}
    ctx.memo[key] = result
    return result


def tokens_per_s(m: dict[str, Any], name: str) -> list[float]:
    return [m["tokens_per_step"] / s for s in m["times"][name]["seconds"]]


def best(m: dict[str, Any], variant: str) -> str | None:
    """The fastest contender (by median) among ``variant``'s precisions, eager or compiled."""
    names = [n for n in m["times"] if n.split(" ")[0] in (variant, variant + "+compile")]
    return max(names, key=lambda n: median(tokens_per_s(m, n))) if names else None


def run(ctx: Context) -> dict[str, Any]:
    lines, notes = [], []
    for shape in shapes(ctx):
        m = measure(ctx, shape)
        tps = {n: tokens_per_s(m, n) for n in m["times"] if not n.startswith("gemm")}
        hf_ok = m["transformers_missing"] is None
        for name, values in tps.items():
            variant, precision = name.split(" ")
            if variant.startswith("transformers"):
                continue
            base = contender("transformers", precision)
            lines.append(line(
                f"{shape.name} {name}", "tokens/s", median(values),
                baseline_name=f"transformers {precision}" if hf_ok else None,
                baseline=median(tps[base]) if hf_ok else None,
                ratio=median_ratio(values, tps[base]) if hf_ok else None,
                step_ms=1000 * median(m["times"][name]["seconds"]), shape=shape.describe(),
                first_call_s=m["times"][name]["first_call_s"]))
        if "minilm-sdpa bf16" in tps:
            lines.append(line(f"{shape.name} bf16 attention: matmul kernel vs SDPA", "tokens/s",
                              median(tps["minilm bf16"]), baseline_name="minilm-sdpa bf16",
                              baseline=median(tps["minilm-sdpa bf16"]),
                              ratio=median_ratio(tps["minilm bf16"], tps["minilm-sdpa bf16"])))
        if hf_ok and ctx.compile:   # compiled against compiled, same dtype
            for precision in PRECISIONS:
                ours, theirs = contender("minilm+compile", precision), contender("transformers+compile", precision)
                lines.append(line(f"{shape.name} {ours} vs {theirs}", "tokens/s", median(tps[ours]),
                                  baseline_name=theirs, baseline=median(tps[theirs]),
                                  ratio=median_ratio(tps[ours], tps[theirs]),
                                  baseline_step_ms=1000 * median(m["times"][theirs]["seconds"]),
                                  baseline_first_call_s=m["times"][theirs]["first_call_s"]))
        if hf_ok:
            ours, theirs = best(m, "minilm"), best(m, "transformers")
            ratio = median_ratio(tps[ours], tps[theirs])
            lines.append(line(f"{shape.name} best vs best", "tokens/s", median(tps[ours]),
                              baseline_name=theirs, baseline=median(tps[theirs]), ratio=ratio,
                              target=f">= {TARGET:g}x", met=ratio >= TARGET, minilm_variant=ours))
        else:
            notes.append(f"transformers baseline skipped: {m['transformers_missing']}")
    if not ctx.compile:
        notes.append("torch.compile variants not run (--quick or --no-compile: compiling takes tens of "
                     "seconds)")
    notes.append("best vs best: the fastest of each side's variants (fp32 or bf16, eager or compiled), "
                 "picked by median. minilm-sdpa = minilm with its attention kernel forced to SDPA.")
    notes.append("same weights on both sides (minilm.hf.to_transformers); transformers runs with "
                 "use_cache=False and torch.optim.AdamW's default implementation (Trainer's adamw_torch); "
                 "minilm runs its own train-loop step (fused AdamW). first_call_s of a compiled variant "
                 "includes compilation (shorter when inductor's on-disk cache is warm from an earlier run).")
    return {"lines": lines, "notes": notes}
