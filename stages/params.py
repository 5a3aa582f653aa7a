"""params.yaml as typed sections: every section and key is validated with a one-line message.

Each pipeline stage reads a few sections; :func:`load_params` validates the *whole* file, so a typo
anywhere is caught the first time any stage runs, with the closest valid name suggested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from minilm.config import (ALL_LINEAR, LORA_MODULES, DataConfig, DecodePrecision, ExportConfig, LoRAConfig,
                           ModelConfig, Precision, PretrainConfig, SampleConfig, SFTConfig, TokenizerConfig)
from minilm.config import DistributedConfig, DPOConfig
from minilm.errors import ConfigError
from minilm.schema import build, load_yaml, suggest

from minilm.serve import ServeConfig

from .tracking import TrackingConfig


@dataclass
class ProjectConfig:
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    progress: bool = True              # progress bars

    def problems(self) -> list[str]:
        if not _DEVICE.fullmatch(self.device):
            return [f"device must be auto, cpu, cuda or cuda:N (N = a GPU index), got {self.device!r}"]
        return []


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class EncodeConfig:
    val_fraction: float = 0.05         # last fraction of the corpus (by bytes) held out for validation
    invalid_utf8: Literal["error", "replace"] = "error"
    workers: int = 0                   # encoding processes: 0 = one per core, 1 = in the stage's process

    def problems(self) -> list[str]:
        p = []
        if not 0.0 < self.val_fraction < 0.5:
            p.append(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.workers < 0:
            p.append(f"workers must be >= 0 (0 = one per core), got {self.workers}")
        return p


@dataclass
class EvaluateConfig:
    batches: int = 40                  # fixed validation batches (seeded) for loss / perplexity
    batch_size: int = 16
    seed: int = 0
    sft_pairs: int = 0                 # held-out SFT pairs scored for response loss; 0 = all

    def problems(self) -> list[str]:
        p = [f"{k} must be > 0, got {getattr(self, k)}" for k in ("batches", "batch_size")
             if getattr(self, k) <= 0]
        if self.sft_pairs < 0:
            p.append(f"sft_pairs must be >= 0 (0 = all), got {self.sft_pairs}")
        return p


@dataclass
class GenerateConfig(SampleConfig):
    prompts: list[str] = field(default_factory=lambda: ["The"])
    sft_questions: int = 8             # held-out SFT instructions answered by the fine-tuned model
    precision: DecodePrecision = "auto"   # decoding weights: auto (bf16 where native) | fp32 | bf16 | fp16 | int8

    def problems(self) -> list[str]:
        p = super().problems()
        if not self.prompts:
            p.append("prompts must list at least one prompt")
        if self.sft_questions < 0:
            p.append(f"sft_questions must be >= 0, got {self.sft_questions}")
        return p


@dataclass
class PreferencesConfig:
    """Where DPO's preference pairs come from (the preferences stage)."""

    source: str = "self"               # self (SPIN: chosen = the SFT reference answer, rejected = the SFT
                                       # model's own sample) | a .jsonl/.json/.csv/.parquet of pairs
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    val_fraction: float = 0.1          # a file's pairs held out (self-play holds out data/sft_val.jsonl)
    bad_records: Literal["error", "skip"] = "error"
    invalid_utf8: Literal["error", "replace"] = "error"
    max_pairs: int = 0                 # self-play: SFT instructions used (0 = all)
    temperature: float = 1.0           # self-play sampling of the rejected answers
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 64               # prompts decoded together
    seed: int = 1337

    def problems(self) -> list[str]:
        p: list[str] = []
        if not self.source.strip():
            p.append("source must be 'self' or a path to a pairs file, got ''")
        if not 0.0 < self.val_fraction < 1.0:
            p.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("prompt_field", "chosen_field", "rejected_field"):
            if not getattr(self, name).strip():
                p.append(f"{name} must not be empty")
        if len({self.prompt_field, self.chosen_field, self.rejected_field}) < 3:
            p.append("prompt_field, chosen_field and rejected_field must be three different names")
        if self.max_pairs < 0:
            p.append(f"max_pairs must be >= 0 (0 = all), got {self.max_pairs}")
        if not self.temperature > 0:
            p.append(f"temperature must be > 0 (sampled answers; 0 would repeat the greedy one), got "
                     f"{self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            p.append(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                p.append(f"{name} must be > 0, got {getattr(self, name)}")
        return p


@dataclass
class SFTStageConfig(SFTConfig):
    """The sft section: the library's fine-tuning settings plus the checkpoint the pipeline tunes."""

    base: str = "out/pretrain/best.safetensors"   # the model to fine-tune: pretrain's best, or any minilm
                                                   # checkpoint (e.g. minilm-import's output)

    def problems(self) -> list[str]:
        p = super().problems()
        if not self.base.strip():
            p.append("base must name a checkpoint (default out/pretrain/best.safetensors), got ''")
        return p


def _sections() -> dict[str, type]:
    return {
        "project": ProjectConfig,
        "mlflow": TrackingConfig,
        "data": DataConfig,
        "tokenizer": TokenizerConfig,
        "encode": EncodeConfig,
        "model": ModelConfig,
        "pretrain": PretrainConfig,
        "lora": LoRAConfig,
        "sft": SFTStageConfig,
        "preferences": PreferencesConfig,
        "dpo": DPOConfig,
        "distributed": DistributedConfig,
        "evaluate": EvaluateConfig,
        "generate": GenerateConfig,
        "export": ExportConfig,
        "serve": ServeConfig,
    }


@dataclass
class Params:
    project: ProjectConfig
    mlflow: TrackingConfig
    data: DataConfig
    tokenizer: TokenizerConfig
    encode: EncodeConfig
    model: ModelConfig
    pretrain: PretrainConfig
    lora: LoRAConfig
    sft: SFTStageConfig
    preferences: PreferencesConfig
    dpo: DPOConfig
    evaluate: EvaluateConfig
    generate: GenerateConfig
    export: ExportConfig
    serve: ServeConfig
    distributed: DistributedConfig
    raw: dict[str, Any]
    path: Path

    def section(self, name: str) -> dict[str, Any]:
        """The section as written in the file (for logging the params a stage read)."""
        return dict(self.raw.get(name) or {})


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    raw = load_yaml(path)
    sections = _sections()
    problems: list[str] = []
    for name in raw:
        if name not in sections:
            problems.append(f"unknown section {name!r}{suggest(str(name), sections)}; valid sections: "
                            f"{', '.join(sections)}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        try:
            built[name] = build(cls, raw.get(name), name, source=str(path))
        except ConfigError as err:
            problems.append(str(err).split(": ", 1)[1])
    problems += cross_section_problems(built)       # those between the sections that did build
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return Params(**built, raw=raw, path=path)


# --------------------------------------------------------------------------------------------------
# relations between sections (pure: no torch, no tokenizer)


def cross_section_problems(built: dict[str, Any]) -> list[str]:
    """Values each valid on their own that together make a stage fail or its output useless (checked
    among the sections in ``built``: one that failed to build is reported on its own)."""
    if any(name not in built for name in ("model", "tokenizer")):
        return []
    model, tok = built["model"], built["tokenizer"]
    ctx = model.context_length
    problems: list[str] = []
    serve = built.get("serve")
    if serve is not None and not _DEVICE.fullmatch(serve.device):
        problems.append(f"serve.device must be auto, cpu, cuda or cuda:N (N = a GPU index), got "
                        f"{serve.device!r}")
    if "lora" in built:
        problems += _lora_target_problems(built["lora"], model)
    dist = built.get("distributed")
    if dist is not None and dist.strategy == "fsdp":
        for name in ("pretrain", "sft", "dpo"):
            if name in built and built[name].optimizer == "muon":
                problems.append(f"{name}.optimizer muon needs whole weight matrices, which distributed.strategy "
                                f"fsdp shards; use strategy ddp, or set {name}.optimizer: adamw")
    if "dpo" in built:
        dpo = built["dpo"]
        problems += [p.replace("lora.targets", "dpo.lora_targets", 1)
                     for p in _lora_target_problems(dpo.lora(), model)]
        if dpo.max_length > ctx:
            problems.append(f"dpo.max_length ({dpo.max_length}) is longer than the model supports "
                            f"(model.context_length = {ctx}); lower it or set 0 (= the context length)")
    if "sft" not in built:
        return problems
    sft = built["sft"]
    if sft.max_length > ctx:
        problems.append(f"sft.max_length ({sft.max_length}) is longer than the model supports "
                        f"(model.context_length = {ctx}); lower it or set 0 (= the context length)")
    # an SFT example is BOS + prompt + response + EOS, cut to max_length + 1 tokens; one whose BOS + prompt
    # fills max_length is dropped (nothing to learn), so BOS + the shortest prompt must leave a position
    template = _template_tokens(sft.template, tok)
    limit = sft.max_length or ctx
    if template is not None and 1 + template > limit:
        what = (f"sft.max_length is {sft.max_length}" if sft.max_length else
                f"model.context_length is {ctx}")
        fix = ("raise sft.max_length (or set 0 = the context length)" if sft.max_length and ctx > template
               else "raise model.context_length")
        problems.append(f"BOS + sft.template with even a one-token instruction take at least {1 + template} "
                        f"tokens but {what}, so no response token would fit and every SFT example would be "
                        f"dropped; {fix} to well above {1 + template} or shorten sft.template")
    if "generate" not in built:
        return problems
    gen = built["generate"]
    # the generate stage fits prompt + max_new_tokens in the context by cutting the prompt's start
    prompts = {f"prompt {p!r}": 1 + _min_tokens(p, tok) for p in gen.prompts}
    if gen.sft_questions and template is not None:
        prompts["SFT prompt (sft.template with an instruction)"] = 1 + template
    if prompts:
        name, longest = max(prompts.items(), key=lambda kv: kv[1])
        if longest + gen.max_new_tokens > ctx:
            room = (f"lower generate.max_new_tokens to at most {ctx - longest}" if ctx > longest else
                    "raise model.context_length")
            problems.append(f"generate.max_new_tokens ({gen.max_new_tokens}) + at least {longest} tokens "
                            f"(BOS included) of the {name} exceed model.context_length ({ctx}), so the "
                            f"prompt would be cut; {room} or shorten the prompt")
    return problems


def _lora_target_problems(lora: LoRAConfig, model: ModelConfig) -> list[str]:
    """Each target must match a linear layer of the blocks, as :func:`minilm.lora.inject_lora` matches."""
    if lora.targets == [ALL_LINEAR]:
        return []
    names = [f"model.layers.{i}.{part}.{m}" for i in range(model.n_layer)
             for part, mods in (("self_attn", LORA_MODULES[:4]), ("mlp", LORA_MODULES[4:])) for m in mods]
    bad = [t for t in lora.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not bad:
        return []
    return [(f"lora.targets {bad} match no linear layer in the model's blocks; valid names: "
             f"{' '.join(LORA_MODULES)}, a longer suffix such as 'mlp.up_proj' or "
             f"'layers.{model.n_layer - 1}.self_attn.q_proj', or ['{ALL_LINEAR}']")]


# The fewest tokens a text can take, without the tokenizer. Sound for the tokenizers the pipeline trains
# (minilm.tokenizer): SentencePiece with identity normalisation, no dummy prefix, '\n' and the special
# tokens as user-defined pieces (each one token, matched as whole strings) and learned pieces of at most
# 16 characters (SentencePiece's max_sentencepiece_length) that never hold a '\n' (it trains line by line);
# byte-fallback pieces are parts of one character. A char vocabulary: one token per character, special
# tokens matched whole. Any real tokenization is a cover of the text by such pieces, so the smallest cover
# is a lower bound: a check on it never refuses a setting that would have worked.
_SP_PIECE_CHARS = 16
_HOLE = "\uffff"                    # stands for the instruction inside a template (a non-character)


def _min_tokens(text: str, tok: TokenizerConfig) -> int:
    specials = [t for t in tok.special_tokens if t and _HOLE not in t]
    longest = _SP_PIECE_CHARS if tok.kind == "sentencepiece" else 1
    if tok.kind == "sentencepiece":
        specials.append("\n")
    n = len(text)
    best = [0] + [n + 1] * n                   # best[i]: fewest pieces covering text[:i]
    for i in range(n):
        if best[i] > n:
            continue
        for t in specials:
            if text.startswith(t, i):
                best[i + len(t)] = min(best[i + len(t)], best[i] + 1)
        for j in range(i + 1, min(n, i + longest) + 1):
            if tok.kind == "sentencepiece" and text[j - 1] == "\n":
                break
            best[j] = min(best[j], best[i] + 1)
    return best[n]


def _template_tokens(template: str, tok: TokenizerConfig) -> int | None:
    """Fewest tokens of ``template`` rendered with the shortest instruction (one token), or None when a
    special token could straddle the instruction's edges (then the pieces around it are not knowable)."""
    try:
        head, tail = template.format(instruction=_HOLE).split(_HOLE)
    except (ValueError, KeyError, IndexError):
        return None                            # reported by SFTConfig.problems
    for t in tok.special_tokens:
        if any(head.endswith(t[:k]) or tail.startswith(t[k:]) for k in range(1, len(t))):
            return None
    return _min_tokens(head + _HOLE + tail, tok)


# --------------------------------------------------------------------------------------------------
# the machine (imports torch: kept out of load_params so reading params stays cheap)


def check_hardware(params: Params) -> None:
    """Refuse, in one line listing every problem, a device this machine does not have (``project.device``,
    ``serve.device``) and a precision it cannot run on it (fp16 off CUDA, bf16 on a GPU without it):
    ``pretrain``/``sft``/``generate.precision`` on the project's device, ``serve.precision`` on the
    server's.

    Every stage calls it at start, so a setting that only one stage uses fails in all of them.
    """
    import torch

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    bf16 = cuda and torch.cuda.is_bf16_supported()
    groups = [("project.device", params.project.device,
               [("pretrain.precision", params.pretrain.precision), ("sft.precision", params.sft.precision),
                ("generate.precision", params.generate.precision)])]
    serve = getattr(params, "serve", None)
    if serve is not None:
        groups.append(("serve.device", serve.device, [("serve.precision", serve.precision)]))
    problems: list[str] = []
    for dev_key, device, precisions in groups:
        if device.startswith("cuda") and not cuda:
            problems.append(f"{dev_key} {device!r} asks for a GPU but CUDA is not available on this machine "
                            f"(torch {torch.__version__}); use cpu or auto")
            continue                           # the precisions depend on the device: fix that first
        if device.startswith("cuda:") and int(device[5:]) >= count:
            problems.append(f"{dev_key} {device!r} asks for GPU {device[5:]} but this machine has {count} "
                            f"(cuda:0 to cuda:{count - 1}); pick one of those, cuda or auto")
            continue
        on_cuda = cuda and device != "cpu"
        for key, precision in precisions:
            if precision == "fp16" and not on_cuda:
                where = f"{dev_key} is cpu" if device == "cpu" else "CUDA is not available on this machine"
                problems.append(f"{key} fp16 needs a CUDA device ({where}); use bf16, fp32 or auto")
            elif precision == "bf16" and on_cuda and not bf16:
                problems.append(f"{key} bf16 is not supported by this GPU; use fp16, fp32 or auto")
    if problems:
        raise ConfigError(f"{params.path}: " + "; ".join(problems))
