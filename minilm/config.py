"""Typed configuration: dataclasses that mirror params.yaml sections the library uses.

Each is built and validated by :func:`minilm.schema.build` (unknown keys, types, then the class's
``problems()``). Nothing here imports torch, so reading params is cheap.
"""

from __future__ import annotations

import math
import re
import string
import typing
from dataclasses import dataclass, field
from typing import Literal

from .errors import ConfigError
from .schema import build, from_dict, load_yaml, positive as _positive, suggest, to_dict

__all__ = ["ModelConfig", "TokenizerConfig", "TrainConfig", "SampleConfig", "LoRAConfig", "SFTConfig", "DPOConfig",
           "DataConfig", "ExportConfig", "GGUFType", "Precision", "build", "from_dict", "to_dict", "load_yaml", "suggest"]

Precision = Literal["auto", "fp32", "bf16", "fp16"]   # training (autocast) and decoding (weights)
DecodePrecision = Literal["auto", "fp32", "bf16", "fp16", "int8"]   # decoding: + int8 weight-only

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
    path: str = ""                    # "" = train one; else an existing SentencePiece .model to use as it is
                                      # (e.g. minilm-import's tokenizer.model; the keys above are then unused)

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.path and self.kind != "sentencepiece":
            p.append(f"path (an existing SentencePiece model) needs kind: sentencepiece, got kind {self.kind!r}")
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
    schedule: Literal["cosine", "cosine_restarts", "constant", "wsd"] = "cosine"
    restart_period: int = 500         # first cycle length (steps after warmup), cosine_restarts
    restart_mult: float = 1.0         # each cycle is this many times longer than the last
    decay_fraction: float = 0.2       # wsd: the last fraction of max_steps decays linearly to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    optimizer: Literal["adamw", "muon"] = "adamw"   # muon: Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02             # Muon's peak rate (scaled over the schedule as lr is)
    muon_momentum: float = 0.95
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
                  "log_every", "restart_period", "eps", "muon_lr")
        if not 0.0 <= self.muon_momentum < 1.0:
            p.append(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        _positive(p, self, "min_lr", "warmup_steps", "weight_decay", "grad_clip", "save_every",
                  "max_skipped", "threads", allow_zero=True)
        if self.min_lr > self.lr:
            p.append(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.restart_mult < 1.0:
            p.append(f"restart_mult must be >= 1, got {self.restart_mult}")
        if not 0.0 < self.decay_fraction <= 1.0:
            p.append(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
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
    compile: bool = False             # decode with the torch.compile'd static-cache step (minilm.decode)

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


# --------------------------------------------------------------------------------------------------
# LoRA

ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """Adapter shape. ``targets`` are module-name suffixes (``"q_proj"``, ``"mlp.up_proj"``) or the single
    entry ``"all-linear"`` (every linear layer in the blocks)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0              # PEFT's default; drawing masks on CPU is costly (benchmarks row 4)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False              # scaling alpha / sqrt(rank) instead of alpha / rank

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.rank <= 0:
            p.append(f"rank must be > 0, got {self.rank}")
        if self.alpha <= 0:
            p.append(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            p.append(f"targets must name at least one module (e.g. {list(DEFAULT_TARGETS)} or "
                     f"['{ALL_LINEAR}'])")
        if any(not t or t != t.strip() for t in self.targets):
            p.append("targets must not contain empty strings or surrounding spaces")
        if ALL_LINEAR in self.targets and len(self.targets) > 1:
            p.append(f"'{ALL_LINEAR}' must be the only entry of targets, got {self.targets}")
        if len(set(self.targets)) != len(self.targets):
            p.append(f"targets has duplicates: {self.targets}")
        return p

    def validate(self) -> "LoRAConfig":
        problems = self.problems()
        if problems:
            raise ConfigError("lora config: " + "; ".join(problems))
        return self


# --------------------------------------------------------------------------------------------------
# supervised fine-tuning

DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining: the training loop's settings plus where the weights start."""

    init_from: str = ""               # "" = random init; a minilm checkpoint: its weights only (fresh
                                      # optimizer, schedule and step)


@dataclass
class SFTConfig(TrainConfig):
    """A fine-tuning run: the training loop's settings (with fine-tuning defaults) plus how pairs become
    sequences."""

    method: Literal["lora", "full"] = "lora"   # train a LoRA adapter, or every weight of the model
    max_steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3                  # LoRA trains few, zero-started weights: a higher lr than full FT
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0         # decay would pull the adapter towards "no change"
    eval_every: int = 50
    eval_batches: int = 10
    template: str = DEFAULT_TEMPLATE  # the prompt; the response follows it directly
    response_only: bool = True        # loss on response + EOS only (False: on every token after BOS)
    max_length: int = 0               # positions the model reads per example; 0 = its context_length
    overlong: Literal["truncate", "drop"] = "truncate"

    def problems(self) -> list[str]:
        p = super().problems()
        if self.max_length < 0:
            p.append(f"max_length must be >= 0 (0 = the model's context_length), got {self.max_length}")
        p.extend(template_problems(self.template))
        return p

    def prompt(self, instruction: str) -> str:
        return self.template.format(instruction=instruction)


@dataclass
class DPOConfig(TrainConfig):
    """Preference tuning (DPO) of a fine-tuned model with a fresh LoRA adapter: the training loop's
    settings plus the preference loss and the adapter's shape (``lora_*``, as the ``lora`` section)."""

    beta: float = 0.1                 # strength of the pull towards the reference model (higher = closer)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"   # DPO's -log sigmoid, or IPO's squared loss
    label_smoothing: float = 0.0      # sigmoid: the share of pairs assumed mislabelled (cDPO); 0 = plain DPO
    max_length: int = 0               # positions per sequence; 0 = the model's context_length
    max_steps: int = 150
    batch_size: int = 8               # pairs per micro-batch (2x sequences: chosen and rejected)
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 25
    eval_batches: int = 10
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_MODULES))
    lora_rslora: bool = False

    def lora(self) -> "LoRAConfig":
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=list(self.lora_targets), rslora=self.lora_rslora)

    def problems(self) -> list[str]:
        p = super().problems()
        if not self.beta > 0:
            p.append(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            p.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            p.append(f"label_smoothing applies to loss 'sigmoid' only, got loss {self.loss!r}")
        if self.max_length < 0:
            p.append(f"max_length must be >= 0 (0 = the model's context_length), got {self.max_length}")
        if self.compile:
            p.append("compile is not supported for DPO (two forward passes a step, one without the "
                     "adapter); set it to false")
        p += [f"lora_{q}" for q in self.lora().problems()]
        return p


def template_problems(template: str) -> list[str]:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        return [f"template is not a valid format string ({err}); write literal braces as {{{{ and }}}}"]
    fields = [name for _, name, _, _ in parts if name is not None]
    if fields != ["instruction"]:
        return [f"template must contain the field {{instruction}} exactly once and no other field, got "
                f"{fields}; write literal braces as {{{{ and }}}}"]
    # parse() yields (text before a field, field, ...): the prompt's tail is the text after the field
    k = next(i for i, part in enumerate(parts) if part[1] is not None)
    tail = "".join(text for text, _, _, _ in parts[k + 1:])
    if not tail.strip():
        return ["template must end with a response marker after {instruction} (e.g. "
                "'\\n\\n### Response:\\n') so the model can tell where the answer starts"]
    return []


# --------------------------------------------------------------------------------------------------
# data


_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class DataConfig:
    """Where the pretraining corpus and the SFT pairs come from (params.yaml ``data:``)."""

    corpus: str = "stdlib"                 # "stdlib" or a UTF-8 text file / directory of them
    corpus_max_mb: float = 0               # 0 = all; else cap, cut at a document boundary
    packages: list[str] = field(default_factory=list)   # installed packages whose docstrings join training
    sft: str = "chatterbot"                # "chatterbot" or a .jsonl/.json/.csv/.parquet/.txt file
    instruction_field: str = "instruction"
    response_field: str = "response"
    sft_val_fraction: float = 0.1
    invalid_utf8: Literal["error", "replace"] = "error"
    bad_records: Literal["error", "skip"] = "error"
    seed: int = 1337

    def problems(self) -> list[str]:
        p: list[str] = []
        if not self.corpus.strip():
            p.append("corpus must be 'stdlib' or a path, got an empty string")
        if not self.sft.strip():
            p.append("sft must be 'chatterbot' or a path, got an empty string")
        if self.corpus_max_mb < 0:
            p.append(f"corpus_max_mb must be >= 0 (0 = no cap), got {self.corpus_max_mb}")
        bad = [name for name in self.packages if not isinstance(name, str) or not _MODULE.fullmatch(name)]
        if bad:
            p.append(f"packages must be top-level import names (e.g. numpy, pandas), got {bad[0]!r}")
        elif len(set(self.packages)) != len(self.packages):
            p.append(f"packages lists a package twice: {self.packages}")
        if not 0.0 < self.sft_val_fraction < 1.0:
            p.append(f"sft_val_fraction must be in (0, 1), got {self.sft_val_fraction}")
        if not self.instruction_field or not self.response_field:
            p.append("instruction_field and response_field must not be empty")
        elif self.instruction_field == self.response_field:
            p.append(f"instruction_field and response_field must differ, both are "
                     f"{self.instruction_field!r}")
        return p


# --------------------------------------------------------------------------------------------------
# export

GGUFType = Literal["f32", "f16", "bf16", "q8_0"]


@dataclass
class ExportConfig:
    """params.yaml ``export:``. ``gguf_type`` is the weight type of the GGUF file's matrices (norms stay
    f32). q8_0, what llama.cpp users pick for small models (4-bit types cost a tiny model far more
    quality, and k-quants need rows of 256): half of f16's bytes, the fastest llama.cpp decoding in
    benchmarks row 8 (1.5x f16 on 2 threads), and >= 95% of the greedy choices kept (tested;
    measured 99.7-100%)."""

    gguf_type: GGUFType = "q8_0"
    name: str = "minilm"              # the model's name inside the GGUF file (general.name)

    def problems(self) -> list[str]:
        if not self.name.strip():
            return ["name must not be empty"]
        return []


# --------------------------------------------------------------------------------------------------
# distributed training (torchrun)


@dataclass
class DistributedConfig:
    """params.yaml ``distributed:``: how pretrain and sft spread over processes. ``nproc_per_node`` 1 runs
    one process; above 1 a stage relaunches itself under torchrun on this machine (several machines: start
    torchrun yourself, see README "Scaling out"). Each process draws ``batch_size x grad_accum`` sequences
    a step, so the global batch is ``batch_size x grad_accum x world size``."""

    nproc_per_node: int = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"     # fsdp: fully_shard per block, then the root (FSDP2)
    backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl on CUDA, gloo on CPU
    timeout_s: float = 300.0          # a collective waiting longer than this fails (a rank died or hangs)

    def problems(self) -> list[str]:
        p: list[str] = []
        _positive(p, self, "nproc_per_node", "timeout_s")
        return p
