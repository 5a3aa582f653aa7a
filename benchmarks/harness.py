"""What every row shares: model shapes, timing by alternation, result lines, machine facts.

Timing method: every contender of a row runs in the same process, in rounds. Each round runs every
contender once (``calls`` back-to-back calls, fixed after warm-up so one measurement lasts long enough to
time), in an order rotated from round to round so neither side always runs first. A ratio is taken per
round and the row reports the median ratio: on a shared, noisy machine a slow spell hits both sides of
one round alike, where absolute numbers alone would drift.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from minilm.config import ModelConfig, TrainConfig
from minilm.model import GPT

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class Shape:
    """A model shape and the batch it is trained with."""

    name: str
    n_layer: int
    n_head: int
    d_model: int
    context_length: int
    batch_size: int
    vocab_size: int
    n_kv_head: int | None = None
    tie_embeddings: bool = True

    def config(self, **overrides: Any) -> ModelConfig:
        cfg = ModelConfig(vocab_size=self.vocab_size, context_length=self.context_length,
                          n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_kv_head,
                          d_model=self.d_model, tie_embeddings=self.tie_embeddings, dropout=0.0)
        return replace(cfg, **overrides).validate()

    def describe(self) -> dict[str, Any]:
        cfg = self.config()
        return {"n_layer": self.n_layer, "n_head": self.n_head, "n_kv_head": cfg.kv_heads,
                "d_model": self.d_model, "ffn_hidden": cfg.hidden_dim, "context_length": self.context_length,
                "batch_size": self.batch_size, "vocab_size": self.vocab_size,
                "tie_embeddings": self.tie_embeddings, "parameters": count_params(self)}


# nanoGPT's CPU shakespeare_char configuration, and a ~10M-parameter model with a realistic BPE vocabulary
NANOGPT = Shape("nanoGPT-CPU", n_layer=4, n_head=4, d_model=128, context_length=64, batch_size=12,
                vocab_size=65)
TEN_M = Shape("10M", n_layer=6, n_head=6, d_model=384, context_length=256, batch_size=8, vocab_size=4096)
# --quick stand-ins: the same code paths at toy sizes
TINY_A = Shape("tiny-A", n_layer=2, n_head=2, d_model=64, context_length=32, batch_size=4, vocab_size=65)
TINY_B = Shape("tiny-B", n_layer=2, n_head=4, n_kv_head=2, d_model=64, context_length=64, batch_size=2,
               vocab_size=256)


def count_params(shape: Shape) -> int:
    with torch.device("meta"):
        return GPT(shape.config()).num_parameters()


def build_model(shape: Shape, seed: int = 0, **overrides: Any) -> GPT:
    """A freshly initialised fp32 minilm model (seeded, so every row starts from the same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(shape.config(**overrides))


def random_batch(shape: Shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x, y`` (B, T) int64 token ids; ``y`` is ``x`` shifted by one, as in training."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.context_length + 1), generator=g)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in a matrix multiply: every ``nn.Linear`` weight and bias (the
    ``lm_head`` counts even when tied to the embedding; the embedding lookup and norms do not)."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            for p in (m.weight, m.bias):
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def train_flops_per_token(model: GPT) -> float:
    """6 N + 12 L d T: forward and backward of the matmul parameters N, plus the attention scores and
    weighted sum (PaLM appendix B / nanoGPT ``estimate_mfu``; not halved for the causal mask)."""
    cfg = model.config
    return 6.0 * matmul_params(model) + 12.0 * cfg.n_layer * cfg.d_model * cfg.context_length


# --------------------------------------------------------------------------------------------------
# run settings


@dataclass
class Context:
    """Settings for one benchmark run, and a memo shared by the rows of that run."""

    quick: bool = False
    repeats: int = 5
    warmup: int = 2
    min_seconds: float = 0.5          # one measurement lasts at least this long
    shakespeare: Path | None = None
    compile: bool = True              # also time minilm under torch.compile (rows 1-2)
    decode_compile: bool = True       # time the compiled static-cache decode step (rows 3, 8), quick too
    memo: dict[Any, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print

    @classmethod
    def make(cls, quick: bool, **kw: Any) -> "Context":
        if quick:
            return cls(quick=True, repeats=2, warmup=1, min_seconds=0.02, compile=False, **kw)
        return cls(quick=False, **kw)


def missing(module: str) -> str | None:
    """Why an optional baseline cannot run (``None`` when ``module`` is importable)."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install -e '.[bench]')"
    return None


# --------------------------------------------------------------------------------------------------
# timing


def _seconds(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def alternate(fns: dict[str, Callable[[], Any]], ctx: Context, *, repeats: int | None = None,
              warmup: int | None = None, min_seconds: float | None = None) -> dict[str, dict[str, Any]]:
    """Seconds per call of each function, measured in rotated rounds (see the module docstring).

    Returns ``{name: {"seconds": [per round], "calls": n, "first_call_s": s}}``; ``first_call_s`` is the
    first warm-up call (it includes compilation for a compiled model).
    """
    repeats = ctx.repeats if repeats is None else repeats
    warmup = ctx.warmup if warmup is None else warmup
    min_seconds = ctx.min_seconds if min_seconds is None else min_seconds
    out: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        first = probe = _seconds(fn, 1) if warmup > 0 else None
        for _ in range(max(0, warmup - 1)):
            probe = _seconds(fn, 1)
        calls = 1 if probe is None else max(1, round(min_seconds / max(probe, 1e-9)))
        out[name] = {"seconds": [], "calls": calls, "first_call_s": first}
    names = list(fns)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name]["seconds"].append(_seconds(fns[name], out[name]["calls"]))
    return out


def median(xs: list[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def median_ratio(num: list[float | None], den: list[float | None]) -> float | None:
    """Median over rounds of ``num[i] / den[i]`` (rounds where either is None are left out)."""
    return median([a / b for a, b in zip(num, den) if a is not None and b])


# --------------------------------------------------------------------------------------------------
# results


def line(case: str, metric: str, minilm: float | None, *, baseline_name: str | None = None,
         baseline: float | None = None, ratio: float | None = None, target: str | None = None,
         met: bool | None = None, **details: Any) -> dict[str, Any]:
    """One row of a results table: minilm's figure, the baseline's, their median ratio, the target.

    ``ratio`` is "how many times better minilm is" (higher is better, whatever the metric's direction).
    """
    return {"case": case, "metric": metric, "minilm": minilm, "baseline_name": baseline_name,
            "baseline": baseline, "ratio": ratio, "target": target, "met": met, **details}


def threads_info() -> dict[str, Any]:
    return {"torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "mkldnn": torch.backends.mkldnn.is_available()}


def machine_info() -> dict[str, Any]:
    """minilm's run record (CPU, cores, versions, git state) plus the threads torch uses."""
    from minilm.precision import resolve_precision
    from stages.runinfo import run_info

    info = run_info(repo_dir=ROOT)
    info.update(threads_info())
    for mod in ("transformers", "peft"):
        try:
            from importlib import metadata
            info[mod] = metadata.version(mod)
        except Exception:
            info[mod] = None
    info["minilm_auto_precision"] = resolve_precision("auto", torch.device("cpu"))
    info["load_average"] = load_average()
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: above the core count, other work shared the CPU."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def train_config(**kw: Any) -> TrainConfig:
    """The optimiser settings every training-speed row uses (nanoGPT's: lr 1e-3, beta2 0.99, wd 0.1,
    clip 1.0)."""
    base = dict(lr=1e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.1, grad_clip=1.0, warmup_steps=0)
    base.update(kw)
    return TrainConfig(**base)
