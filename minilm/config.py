"""Typed configuration: dataclasses that mirror params.yaml, and their validation.

Every section of params.yaml is read through :func:`build`, which refuses unknown keys (suggesting the
closest valid one), checks each value's type against the dataclass annotation, then runs the class's
``problems()`` for ranges and cross-field invariants. All problems are reported together in one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import ConfigError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
Precision = Literal["auto", "fp32", "bf16", "fp16"]   # training (autocast) and decoding (weights)


# generic machinery


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true/false"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value) where value is converted to ``tp`` when that is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return (value in get_args(tp)), value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            return False, value
        out = []
        for item in value:
            ok, v = _coerce(item, inner)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def build(cls: type[T], data: Any, section: str, *, source: str = "params.yaml",
          allow_derived: bool = False) -> T:
    """Build dataclass ``cls`` from a mapping, validating keys, types and values.

    Raises :class:`ConfigError` with every problem found, in one line.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values, got "
                          f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    derived: dict[str, str] = {} if allow_derived else getattr(cls, "_derived", {})
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key in derived:
            problems.append(f"{section}.{key} is not set here: it comes from {derived[key]}")
            continue
        if key not in fields:
            valid = [k for k in fields if k not in derived]
            problems.append(f"unknown key {section}.{key}{suggest(key, valid)}; valid keys: "
                            f"{', '.join(sorted(valid))}")
            continue
        ok, coerced = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{section}.{key} must be {_type_name(hints[key])}, got {value!r}")
            continue
        kwargs[key] = coerced
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    obj = cls(**kwargs)
    check = getattr(obj, "problems", None)
    if check is not None:
        problems = [f"{section}.{p}" for p in check()]
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict of its init fields (JSON- and YAML-friendly)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def from_dict(cls: type[T], data: dict[str, Any], section: str = "config",
              source: str = "checkpoint") -> T:
    """Rebuild a dataclass saved with :func:`to_dict` (validated the same way)."""
    return build(cls, data, section, source=source, allow_derived=True)


def _positive(problems: list[str], obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None:
            continue
        if (v < 0) if allow_zero else (v <= 0):
            problems.append(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


# --------------------------------------------------------------------------------------------------
# model


@dataclass
class ModelConfig:
    """Shape of the decoder-only Transformer (Llama layout by default)."""

    vocab_size: int = 0               # from the tokenizer
    context_length: int = 256         # longest sequence the model is trained and run on
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None      # None = n_head (MHA); 1 = multi-query; divides n_head (GQA)
    d_model: int = 256
    ffn_hidden: int | None = None     # None = derived: ffn_multiplier * d_model rounded up
    ffn_multiplier: float = 8 / 3
    ffn_multiple_of: int = 64
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    block: Literal["sequential", "parallel"] = "sequential"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = False
    dropout: float = 0.0
    init_std: float = 0.02

    _derived: typing.ClassVar[dict[str, str]] = {"vocab_size": "the tokenizer (tokenizer.vocab_size)"}

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        m = self.ffn_multiple_of
        return m * math.ceil(int(self.ffn_multiplier * self.d_model) / m)

    def problems(self) -> list[str]:
        p: list[str] = []
        _positive(p, self, "context_length", "n_layer", "n_head", "d_model", "ffn_multiple_of",
                  "norm_eps", "rope_base", "init_std", "ffn_multiplier")
        _positive(p, self, "n_kv_head", "ffn_hidden")
        _positive(p, self, "vocab_size", allow_zero=True)
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_head > 0 and self.d_model > 0:
            if self.d_model % self.n_head:
                p.append(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
            elif self.head_dim % 2:
                p.append(f"head_dim = d_model / n_head = {self.head_dim} must be even for rotary "
                         "embeddings; change d_model or n_head")
            if self.n_kv_head is not None and self.n_kv_head > 0 and self.n_head % self.n_kv_head:
                p.append(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        return p

    def validate(self) -> "ModelConfig":
        problems = self.problems()
        if self.vocab_size <= 0:
            problems.append("vocab_size must be set (> 0) before building a model")
        if problems:
            raise ConfigError("model config: " + "; ".join(problems))
        return self


# --------------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class TokenizerConfig:
    kind: Literal["sentencepiece", "char"] = "sentencepiece"
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 4096
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    special_tokens: list[str] = field(default_factory=list)
    max_sentences: int = 2_000_000    # SentencePiece input_sentence_size (sampled above this)

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.vocab_size < 8:
            p.append(f"vocab_size must be >= 8, got {self.vocab_size}")
        if not 0.9 <= self.character_coverage <= 1.0:
            p.append(f"character_coverage must be in [0.9, 1.0], got {self.character_coverage}")
        _positive(p, self, "max_sentences")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            p.append("special_tokens has duplicates")
        if any(not t for t in self.special_tokens):
            p.append("special_tokens must not contain empty strings")
        return p


# --------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    """One training run (pretraining or SFT): optimisation, schedule, precision, evaluation."""

    max_steps: int = 1000
    batch_size: int = 16              # sequences per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-4              # floor of the cosine decay
    warmup_steps: int = 100
    schedule: Literal["cosine", "cosine_restarts", "constant"] = "cosine"
    restart_period: int = 500         # first cycle length (steps after warmup), cosine_restarts
    restart_mult: float = 1.0         # each cycle is this many times longer than the last
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0            # 0 = off
    precision: Precision = "auto"
    ema_decay: float = 0.0            # 0 = no EMA
    ema_for_eval: bool = True         # evaluate (and pick `best`) with the EMA weights when EMA is on
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 0               # 0 = save `last` at every evaluation
    log_every: int = 10
    compile: bool = False
    seed: int = 1337
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped: int = 10             # with nonfinite=skip: stop after this many skipped steps
    threads: int = 0                  # torch CPU threads; 0 = torch's default

    def problems(self) -> list[str]:
        p: list[str] = []
        _positive(p, self, "max_steps", "batch_size", "grad_accum", "lr", "eval_every", "eval_batches",
                  "log_every", "restart_period", "eps")
        _positive(p, self, "min_lr", "warmup_steps", "weight_decay", "grad_clip", "save_every",
                  "max_skipped", "threads", allow_zero=True)
        if self.min_lr > self.lr:
            p.append(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.restart_mult < 1.0:
            p.append(f"restart_mult must be >= 1, got {self.restart_mult}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                p.append(f"{name} must be in [0, 1), got {v}")
        if not 0.0 <= self.ema_decay < 1.0:
            p.append(f"ema_decay must be in [0, 1) (0 turns EMA off), got {self.ema_decay}")
        if self.warmup_steps >= self.max_steps and self.max_steps > 0:
            p.append(f"warmup_steps ({self.warmup_steps}) must be less than max_steps "
                     f"({self.max_steps})")
        return p


# --------------------------------------------------------------------------------------------------
# sampling


@dataclass
class SampleConfig:
    """Decoding controls. temperature 0 means greedy."""

    temperature: float = 0.6
    top_k: int = 0                    # 0 = off
    top_p: float = 0.92               # 1.0 = off
    repetition_penalty: float = 1.2   # 1.0 = off
    ban_window: int = 5               # never repeat any of the last N tokens; 0 = off
    no_repeat_ngram: int = 0          # 0 = off
    min_new_tokens: int = 40
    max_new_tokens: int = 120
    stop: list[str] = field(default_factory=list)
    seed: int | None = 1337

    def problems(self) -> list[str]:
        p: list[str] = []
        _positive(p, self, "temperature", "top_k", "ban_window", "no_repeat_ngram", "min_new_tokens",
                  allow_zero=True)
        _positive(p, self, "max_new_tokens", "repetition_penalty")
        if not 0.0 < self.top_p <= 1.0:
            p.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_new_tokens > self.max_new_tokens:
            p.append(f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens "
                     f"({self.max_new_tokens})")
        if any(not s for s in self.stop):
            p.append("stop must not contain empty strings")
        return p


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a params file: a mapping of sections, with one-line errors for every way it can be wrong."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} not found; pass --params PATH or create it (see README)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not valid UTF-8 (byte {err.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}; fix the file") from None
    if data is None:
        raise ConfigError(f"{path} is empty; it must hold the params sections (see README)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of sections (e.g. 'model:'), got "
                          f"{type(data).__name__}")
    return data
