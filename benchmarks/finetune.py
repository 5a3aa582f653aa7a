"""Row 4: LoRA fine-tuning - step time, peak memory and trainable parameters of minilm LoRA vs minilm full
fine-tuning of the same model, and vs peft LoRA on the transformers model of the same shape and weights
(same rank, alpha, dropout and targets q, k, v, o).

Step times: the three run alternated in this process. Peak memory: each configuration runs in a fresh
subprocess (``python -m benchmarks.finetune SPEC``) that builds the model and optimizer, notes its resident
set size (VmRSS), resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5), runs three steps and
reads the new high-water mark (VmHWM). The figure is peak minus before: what training adds on top of the
loaded model (gradients, optimizer state, activations, autocast copies), measured by the kernel, so it
sees every allocation torch makes (tracemalloc does not). Where the reset is not allowed, the delta of
``getrusage`` maxrss is used instead (an under-estimate when loading peaked higher) and the method says so.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import warnings
from typing import Any, Callable

import torch

from minilm.lora import LoRAConfig

from .harness import (ROOT, TEN_M, TINY_A, Context, Shape, alternate, build_model, line, median, median_ratio,
                      missing, random_batch, train_config)
from .steps import hf_step, minilm_step

FULL, LORA, PEFT = "minilm full FT", "minilm LoRA", "peft LoRA"
LORA_DROP = "minilm LoRA dropout 0.05"   # what LoRA dropout costs on CPU (not a default)
LORA_COMPILE = "minilm LoRA+compile"      # what sft.compile: true runs
PEFT_COMPILE = "peft LoRA+compile"
RANK, ALPHA, TARGETS = 8, 16.0, ["q_proj", "k_proj", "v_proj", "o_proj"]
DROPOUT = LoRAConfig().dropout          # minilm's default, given to peft as well
TARGET_PEFT = 1.5
MEMORY_STEPS = 3


def _trainable(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def build(config: str, shape: Shape, precision: str) -> tuple[Callable[[], float], int]:
    """(training step, trainable parameter count) of one configuration, from the same initial weights."""
    model, batch, cfg = build_model(shape), random_batch(shape), train_config()
    if config == FULL:
        return minilm_step(model, batch, cfg, precision), _trainable(model)
    if config in (LORA, LORA_DROP, LORA_COMPILE):
        from minilm.lora import inject_lora, mark_only_lora_trainable

        dropout = 0.05 if config == LORA_DROP else DROPOUT
        inject_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, dropout=dropout, targets=list(TARGETS)))
        mark_only_lora_trainable(model)
        return minilm_step(model, batch, cfg, precision, compile=config == LORA_COMPILE), _trainable(model)
    if config in (PEFT, PEFT_COMPILE):
        import transformers
        from peft import LoraConfig, get_peft_model

        from minilm.hf import to_transformers
        transformers.logging.set_verbosity_error()
        with warnings.catch_warnings():   # peft calls an API transformers 5 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(to_transformers(model), LoraConfig(
                r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(TARGETS), bias="none",
                task_type="CAUSAL_LM"))
        return (hf_step(peft_model, batch, cfg, precision, compile=config == PEFT_COMPILE),
                _trainable(peft_model))
    raise ValueError(f"unknown configuration {config!r}")


# --------------------------------------------------------------------------------------------------
# peak memory, one subprocess per configuration


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r   # bytes on macOS, KiB on Linux


def peak_memory(config: str, shape: Shape, precision: str) -> dict[str, Any]:
    """Run in the child: build, then measure what ``MEMORY_STEPS`` training steps add."""
    step, trainable = build(config, shape, precision)
    before = _status_kb("VmRSS") or _maxrss_kb()
    if _reset_peak() and _status_kb("VmHWM") is not None:
        method = "VmHWM after clear_refs reset - VmRSS before"
        for _ in range(MEMORY_STEPS):
            step()
        peak = _status_kb("VmHWM")
    else:
        method = "getrusage maxrss delta (no peak reset: may under-estimate)"
        before = _maxrss_kb()
        for _ in range(MEMORY_STEPS):
            step()
        peak = _maxrss_kb()
    return {"config": config, "trainable": trainable, "rss_before_mb": before / 1024,
            "peak_rss_mb": peak / 1024, "train_mb": (peak - before) / 1024, "method": method}


def measure_memory(config: str, shape: Shape, precision: str) -> dict[str, Any]:
    spec = json.dumps({"config": config, "shape": shape.__dict__, "precision": precision})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.finetune", spec], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {config} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# the row


def run(ctx: Context) -> dict[str, Any]:
    from minilm.precision import resolve_precision

    shape = TINY_A if ctx.quick else TEN_M
    precision = resolve_precision("auto", torch.device("cpu"))
    configs = [FULL, LORA]
    peft_missing = missing("peft") or missing("transformers")
    if peft_missing is None:
        configs.append(PEFT)
    torch._dynamo.reset()   # compile afresh, not on top of row 1's compiled graphs
    timed = configs + [LORA_DROP]
    if ctx.compile:
        timed += [LORA_COMPILE] + ([PEFT_COMPILE] if peft_missing is None else [])
    built = {c: build(c, shape, precision) for c in timed}
    ctx.log(f"  finetune {shape.name} {precision}: {', '.join(timed)}")
    times = alternate({c: built[c][0] for c in timed}, ctx)
    secs = {c: times[c]["seconds"] for c in timed}
    mem = {}
    for c in configs:
        ctx.log(f"  finetune memory: {c}")
        mem[c] = measure_memory(c, shape, precision)
    lines = []
    for c in configs:
        lines.append(line(f"{c} step", "ms/step", 1000 * median(secs[c]), trainable=built[c][1],
                          train_mb=mem[c]["train_mb"], peak_rss_mb=mem[c]["peak_rss_mb"]))
    for c in timed[len(configs):]:
        lines.append(line(f"{c} step", "ms/step", 1000 * median(secs[c]), trainable=built[c][1],
                          first_call_s=times[c].get("first_call_s")))
    r = median_ratio(secs[FULL], secs[LORA])
    lines.append(line("LoRA vs full FT: step rate", "steps/s", 1 / median(secs[LORA]),
                      baseline_name=FULL, baseline=1 / median(secs[FULL]), ratio=r, target="> 1x", met=r > 1))
    light = mem[FULL]["train_mb"] / max(mem[LORA]["train_mb"], 1e-9)
    lines.append(line("LoRA vs full FT: training memory", "MB over the loaded model", mem[LORA]["train_mb"],
                      baseline_name=FULL, baseline=mem[FULL]["train_mb"], ratio=light, target="> 1x",
                      met=light > 1))
    lines.append(line("LoRA vs full FT: trainable parameters", "parameters", built[LORA][1],
                      baseline_name=FULL, baseline=built[FULL][1], ratio=built[FULL][1] / built[LORA][1]))
    notes = [f"shape {shape.name} (batch {shape.batch_size}, context {shape.context_length}), precision "
             f"{precision} (minilm's 'auto'), LoRA rank {RANK}, alpha {ALPHA:g}, dropout {DROPOUT}, targets "
             f"{', '.join(TARGETS)}; memory: {mem[LORA]['method']}, over {MEMORY_STEPS} steps, one "
             "subprocess per configuration; ratio of memory = baseline / minilm (higher = lighter)."]
    if peft_missing is None:
        r = median_ratio(secs[PEFT], secs[LORA])
        lines.append(line("minilm LoRA vs peft LoRA: step rate (eager)", "steps/s", 1 / median(secs[LORA]),
                          baseline_name=PEFT, baseline=1 / median(secs[PEFT]), ratio=r,
                          target=f">= {TARGET_PEFT:g}x", met=r >= TARGET_PEFT))
        if ctx.compile:   # compiled against compiled
            r = median_ratio(secs[PEFT_COMPILE], secs[LORA_COMPILE])
            lines.append(line("minilm LoRA vs peft LoRA: step rate (both compiled)", "steps/s",
                              1 / median(secs[LORA_COMPILE]), baseline_name=PEFT_COMPILE,
                              baseline=1 / median(secs[PEFT_COMPILE]), ratio=r,
                              target=f">= {TARGET_PEFT:g}x", met=r >= TARGET_PEFT))
        light = mem[PEFT]["train_mb"] / max(mem[LORA]["train_mb"], 1e-9)
        lines.append(line("minilm LoRA vs peft LoRA: training memory", "MB over the loaded model",
                          mem[LORA]["train_mb"], baseline_name=PEFT, baseline=mem[PEFT]["train_mb"],
                          ratio=light))
        lines.append(line("minilm LoRA vs peft LoRA: trainable parameters", "parameters", built[LORA][1],
                          baseline_name=PEFT, baseline=built[PEFT][1], ratio=built[PEFT][1] / built[LORA][1]))
    else:
        notes.append(f"peft baseline skipped: {peft_missing}")
    return {"lines": lines, "notes": notes}


def _child(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    print(json.dumps(peak_memory(spec["config"], Shape(**spec["shape"]), spec["precision"])))


if __name__ == "__main__":
    _child(sys.argv[1:])
