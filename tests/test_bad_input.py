"""The bad-input table: each mistake, fed to the real stage command in a prepared repo, stops it with exit
code 2 and ONE stderr line that names the problem and the fix (no traceback), and leaves every output
already written (data/, out/) byte-for-byte as it was.

Params, data, checkpoints and adapters, training numerics; plus the policies that let a run go on
(invalid_utf8: replace, bad_records: skip, nonfinite: skip).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from test_faults import copy_repo, hashes, one_line_error, set_params, stage, write_corpus
from test_pipeline import TINY, make_repo, merge, sh

pytestmark = pytest.mark.slow

BAD = merge(TINY, {
    "data": {"corpus": "corpus_src.txt"},
    "pretrain": {"max_steps": 10, "eval_every": 5, "save_every": 0, "threads": 1},
    "sft": {"max_steps": 4, "eval_every": 2, "log_every": 2, "threads": 1},
})
BASE = "out/pretrain/best.safetensors"
ADAPTER = "out/sft/tuned/adapter_model.safetensors"


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A repo where prepare, tokenizer, encode, pretrain and sft have run (tiny)."""
    repo = make_repo(tmp_path_factory.mktemp("bad") / "done", BAD)
    write_corpus(repo / "corpus_src.txt")
    for name in ("prepare", "tokenizer", "encode", "pretrain", "sft"):
        stage(repo, name)
    return repo


@pytest.fixture
def repo(done, tmp_path) -> Path:
    return copy_repo(done, tmp_path / "repo")


# --------------------------------------------------------------------------------------------------
# how a case breaks the repo


def params(edit: dict) -> Callable[[Path], None]:
    return lambda repo: set_params(repo, edit)


def params_text(text: str) -> Callable[[Path], None]:
    return lambda repo: (repo / "params.yaml").write_text(text)


def file(rel: str, data: bytes | str, edit: dict | None = None) -> Callable[[Path], None]:
    def setup(repo: Path) -> None:
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        if edit:
            set_params(repo, edit)
    return setup


def truncate(rel: str, keep: float) -> Callable[[Path], None]:
    def setup(repo: Path) -> None:
        data = (repo / rel).read_bytes()
        (repo / rel).write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return setup


def flip(rel: str, offset: int) -> Callable[[Path], None]:
    """Damage bytes at ``offset`` (negative: from the end, i.e. inside the tensor data)."""
    def setup(repo: Path) -> None:
        data = bytearray((repo / rel).read_bytes())
        for i in range(offset, offset + 8):
            data[i] ^= 0x5A
        (repo / rel).write_bytes(bytes(data))
    return setup


def copy(src: str, dst: str) -> Callable[[Path], None]:
    return lambda repo: shutil.copy(repo / src, repo / dst)


def plain_safetensors(repo: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(4, 4)}, str(repo / BASE))


def edited_config(repo: Path) -> None:
    """A checkpoint whose stored model config no longer matches its weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(repo / BASE), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        meta = json.loads(f.metadata()["minilm"])
    meta["model_config"]["d_model"] = 128
    save_file(tensors, str(repo / BASE), metadata={"minilm": json.dumps(meta)})


def adapter_for_another_shape(repo: Path) -> None:
    """A valid adapter, recorded as made for this very base file, but for a model of another width."""
    from minilm.config import ModelConfig
    from minilm.fileio import sha256_file
    from minilm.adapter import save_adapter
    from minilm.lora import LoRAConfig, inject_lora
    from minilm.model import GPT

    model = GPT(ModelConfig(vocab_size=384, context_length=64, n_layer=2, n_head=2, d_model=32))
    cfg = LoRAConfig(rank=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    inject_lora(model, cfg)
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B.weight)
    save_adapter(repo / "out/sft/tuned", model, cfg, base_sha256=sha256_file(repo / BASE),
                 base_config=model.config)


def retrained_tokenizer(repo: Path) -> None:
    set_params(repo, {"tokenizer": {"vocab_size": 400}})
    stage(repo, "tokenizer")


def invalid_utf8_file(rel: str, at: int) -> bytes:
    text = ("All work and no play makes a dull model.\n" * 200).encode()
    return text[:at] + b"\xff\xfe" + text[at:]


def jsonl(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


GOOD = json.dumps({"instruction": "What is a list?", "response": "An ordered sequence."})
GOOD2 = json.dumps({"instruction": "What is a dict?", "response": "A mapping of keys to values."})
GOOD3 = json.dumps({"instruction": "What is a set?", "response": "An unordered collection."})


@dataclass
class Case:
    stage: str
    setup: Callable[[Path], None]
    needles: tuple[str, ...]                 # in the one error line: the problem and the fix
    args: tuple[str, ...] = ()
    may_change: tuple[str, ...] = ()         # outputs the failing run may legitimately rewrite
    marks: tuple = field(default_factory=tuple)
    check: Callable[[Path, str], None] | None = None     # more to assert, given the repo and the line


def kept_last_good(bad_steps: int) -> Callable[[Path, str], None]:
    """`last` is the run's last finite step: just before the ``bad_steps`` non-finite ones that ended it."""
    def check(repo: Path, line: str) -> None:
        from minilm.checkpoint import load_checkpoint

        stopped_at = int(re.search(r"step (\d+)", line).group(1))
        last = load_checkpoint(repo / "out/pretrain/last.safetensors")
        assert last.step == stopped_at - bad_steps >= 1, (last.step, line)
        assert all(torch.isfinite(v).all() for v in last.model_state.values())
    return check


CASES = {
    # ---- params.yaml
    "unknown-section": Case("pretrain", params({"modle": {"n_layer": 2}}),
                            ("unknown section 'modle' (did you mean 'model'?)", "valid sections:")),
    "unknown-key": Case("sft", params({"lora": {"ranl": 8}}),
                        ("unknown key lora.ranl (did you mean 'rank'?)", "valid keys:")),
    "wrong-type": Case("pretrain", params({"pretrain": {"lr": "fast"}}),
                       ("pretrain.lr must be a number, got 'fast'",)),
    "wrong-type-bool": Case("pretrain", params({"project": {"progress": "yes"}}),
                            ("project.progress must be true/false, got 'yes'",)),
    "not-a-choice": Case("generate", params({"generate": {"precision": "int4"}}),
                         ("generate.precision must be 'auto' | 'fp32' | 'bf16' | 'fp16' | 'int8', got 'int4'",)),
    "out-of-range": Case("sft", params({"lora": {"dropout": 1.5}}),
                         ("lora.dropout must be in [0, 1), got 1.5",)),
    "out-of-range-steps": Case("pretrain", params({"pretrain": {"max_steps": 0}}),
                               ("pretrain.max_steps must be > 0, got 0",)),
    "d_model-vs-n_head": Case("pretrain", params({"model": {"d_model": 100, "n_head": 3}}),
                              ("d_model (100) must be divisible by n_head (3)",)),
    "n_head-vs-n_kv_head": Case("pretrain", params({"model": {"n_head": 4, "n_kv_head": 3}}),
                                ("n_kv_head (3) must divide n_head (4)",)),
    "odd-head-dim": Case("pretrain", params({"model": {"d_model": 66, "n_head": 2}}),
                         ("head_dim = d_model / n_head = 33 must be even", "change d_model or n_head")),
    "context-longer-than-params-model": Case(
        "sft", params({"sft": {"max_length": 128}}),
        ("sft.max_length (128) is longer than the model supports", "lower it or set 0")),
    "context-longer-than-base-checkpoint": Case(
        "sft", params({"model": {"context_length": 128}, "sft": {"max_length": 128}}),
        (f"{BASE} was trained with model.context_length=64 (params say 128)",
         "rerun the stage that trains it (e.g. `dvc repro pretrain`) or restore the params")),
    "encode-binary-corpus-with-replace": Case(
        "encode", file("data/corpus.txt", bytes(range(256)) * 400, {"encode": {"invalid_utf8": "replace"}}),
        ("data/corpus.txt is not UTF-8 text", "it looks like a binary file")),
    "init-from-missing": Case("pretrain", params({"pretrain": {"init_from": "nope.safetensors"}}),
                              ("pretrain.init_from: nope.safetensors is not a file",
                               "point it to a minilm checkpoint")),
    "init-from-another-shape": Case(
        "pretrain", lambda repo: (copy(BASE, "init.safetensors")(repo),
                                  set_params(repo, {"pretrain": {"init_from": "init.safetensors"},
                                                    "model": {"n_layer": 3}})),
        ("pretrain.init_from: init.safetensors holds another model: model.n_layer=2 (this run: 3)",
         "set these model params to the checkpoint's values")),
    "init-from-not-a-checkpoint": Case(
        "pretrain", file("init.safetensors", "not a checkpoint\n", {"pretrain": {"init_from": "init.safetensors"}}),
        ("init.safetensors is not a safetensors checkpoint", "point to a file written by minilm")),
    "lora-targets-match-nothing": Case("sft", params({"lora": {"targets": ["qkv_proj"]}}),
                                       ("lora.targets ['qkv_proj'] match no linear layer",
                                        "valid names: q_proj")),
    "empty-params-file": Case("pretrain", params_text(""), ("params.yaml is empty",)),
    "yaml-syntax-error": Case("pretrain", params_text("model:\n  n_layer: [2\n  d_model: 64\n"),
                              ("YAML syntax error at line", "fix the file")),
    "params-not-a-mapping": Case("pretrain", params_text("- model\n- pretrain\n"),
                                 ("must be a mapping of sections",)),
    "params-file-missing": Case("pretrain", lambda repo: None, ("params file nope.yaml not found",
                                                                 "pass --params PATH"),
                                args=("--params", "nope.yaml")),
    # ---- data
    "missing-corpus": Case("prepare", params({"data": {"corpus": "nope.txt"}}),
                           ("corpus nope.txt not found", "set data.corpus to an existing")),
    "package-not-installed": Case("prepare", params({"data": {"packages": ["yaml", "no_such_pkg_xyz"]}}),
                                  ("data.packages: 'no_such_pkg_xyz' is not an installed Python package",
                                   "pip install it or remove it from data.packages")),
    "package-not-a-name": Case("prepare", params({"data": {"packages": ["numpy>=2"]}}),
                               ("data.packages must be top-level import names", "got 'numpy>=2'")),
    "empty-corpus": Case("prepare", file("empty.txt", "\n \n\n", {"data": {"corpus": "empty.txt"}}),
                         ("corpus empty.txt holds no text", "point data.corpus at non-empty text")),
    "corpus-too-small-for-context": Case(
        "pretrain", params({"model": {"context_length": 8192}}),
        ("out/encoded/val.bin has", "tokens but one training window needs context_length + 1 = 8193",
         "add more text or lower model.context_length")),
    "corpus-too-small-for-val-split": Case(
        "encode", file("data/corpus.txt", "one line of text without a line break"),
        ("too small for val_fraction=0.05", "add more lines of text or raise val_fraction")),
    "invalid-utf8-corpus": Case(
        "prepare", file("bad.txt", invalid_utf8_file("bad.txt", 1234), {"data": {"corpus": "bad.txt"}}),
        ("bad.txt is not valid UTF-8 at byte 1234", "data.invalid_utf8: replace")),
    "invalid-utf8-encode": Case(
        "encode", file("data/corpus.txt", invalid_utf8_file("corpus", 4321)),
        ("data/corpus.txt is not valid UTF-8 at byte 4321 (line 106)", "encode.invalid_utf8: replace")),
    "sft-line-not-json": Case(
        "prepare", file("pairs.jsonl", jsonl(GOOD, GOOD2, "{oops", GOOD3), {"data": {"sft": "pairs.jsonl"}}),
        ("line 3 is not valid JSON", "set data.bad_records: skip")),
    "sft-line-lacks-field": Case(
        "prepare", file("pairs.jsonl", jsonl(GOOD, json.dumps({"instruction": "hi"}), GOOD2),
                        {"data": {"sft": "pairs.jsonl"}}),
        ("line 2 has no 'response' field", "data.instruction_field / data.response_field")),
    "sft-file-missing": Case("prepare", params({"data": {"sft": "nope.jsonl"}}),
                             ("SFT data nope.jsonl not found", "set data.sft to an existing")),
    "vocab-too-big-for-corpus": Case("tokenizer", params({"tokenizer": {"vocab_size": 60000}}),
                                     ("tokenizer.vocab_size 60000 is too high for this corpus",
                                      "lower tokenizer.vocab_size")),
    "vocab-too-small": Case("tokenizer", params({"tokenizer": {"vocab_size": 100}}),
                            ("tokenizer.vocab_size 100 is too small", "raise tokenizer.vocab_size")),
    # ---- checkpoints and adapters
    "truncated-checkpoint": Case("sft", truncate(BASE, 0.5),
                                 (f"{BASE} is corrupt or truncated", "rerun the stage that makes it")),
    "checkpoint-cut-to-nothing": Case("sft", truncate(BASE, 5), (f"{BASE} is empty or truncated",
                                                                 "rerun the stage that makes it")),
    "corrupt-checkpoint-header": Case("sft", flip(BASE, 12),
                                      (f"{BASE} is corrupt", "rerun the stage that makes it")),
    "corrupt-checkpoint-data": Case("evaluate", flip(BASE, -4000),
                                    (f"{BASE} is corrupt", "checksum", "rerun the stage that makes it")),
    "checkpoint-of-another-format": Case("sft", copy("out/pretrain/loss.png", BASE),
                                         ("not a safetensors checkpoint (unknown format)",
                                          "point to a file written by minilm")),
    "safetensors-but-not-minilm": Case("generate", plain_safetensors,
                                       ("not a minilm checkpoint (no 'minilm' metadata)",
                                        "point to a checkpoint written by minilm")),
    "adapter-given-as-checkpoint": Case("sft", copy(ADAPTER, BASE),
                                        ("'minilm-lora-adapter' file, not a minilm model checkpoint",
                                         "point to a checkpoint written by minilm")),
    "checkpoint-config-edited": Case("evaluate", edited_config,
                                     ("checkpoint weights do not fit the model", "size mismatch",
                                      "another model config")),
    "truncated-adapter": Case("merge", truncate(ADAPTER, 0.6),
                              ("adapter_model.safetensors is corrupt or truncated", "rerun the sft stage")),
    "adapter-for-another-base": Case("merge", copy("out/pretrain/last.safetensors", BASE),
                                     ("was trained on another base model", "rerun sft")),
    "adapter-for-another-shape": Case("merge", adapter_for_another_shape,
                                      ("the adapter was made for another base model",)),
    "checkpoint-config-vs-params": Case(
        "sft", params({"model": {"d_model": 32}}),
        (f"{BASE} was trained with model.d_model=64", "params")),
    "evaluate-checkpoint-of-another-size": Case(
        "evaluate", params({"model": {"d_model": 32}}),
        (f"{BASE} was trained with model.d_model=64 (params say 32)", "rerun the stage that trains it")),
    "generate-checkpoint-of-another-depth": Case(
        "generate", params({"model": {"n_layer": 3}}),
        (f"{BASE} was trained with model.n_layer=2 (params say 3)", "rerun the stage that trains it")),
    "dpo-beta-not-positive": Case("dpo", params({"dpo": {"beta": 0}}), ("dpo.beta must be > 0, got 0.0",)),
    "dpo-ipo-with-label-smoothing": Case(
        "preferences", params({"dpo": {"loss": "ipo", "label_smoothing": 0.1}}),
        ("dpo.label_smoothing applies to loss 'sigmoid' only, got loss 'ipo'",)),
    "dpo-lora-targets-match-nothing": Case(
        "evaluate", params({"dpo": {"lora_targets": ["qkv_proj"]}}),
        ("dpo.lora_targets ['qkv_proj'] match no linear layer in the model's blocks",)),
    "dpo-compile": Case("generate", params({"dpo": {"compile": True}}),
                        ("dpo.compile is not supported for DPO",)),
    "preferences-file-missing": Case(
        "preferences", params({"preferences": {"source": "prefs.jsonl"}}),
        ("preference data prefs.jsonl not found; set preferences.source to an existing",)),
    "preferences-chosen-equals-rejected": Case(
        "preferences", file("prefs.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                            '{"prompt": "r", "chosen": "same", "rejected": "same"}\n',
                            {"preferences": {"source": "prefs.jsonl"}}),
        ("prefs.jsonl: line 2 has the same text as chosen and as rejected (nothing to prefer)",
         "preferences.bad_records: skip")),
    "preferences-missing-field": Case(
        "preferences", file("prefs.csv", "question,good\nq,a\n",
                            {"preferences": {"source": "prefs.csv", "prompt_field": "question"}}),
        ("prefs.csv has no column 'chosen' (columns: question, good); set preferences.prompt_field",)),
    "preferences-binary-file": Case(
        "preferences", file("prefs.jsonl", bytes(range(256)) * 40, {"preferences": {"source": "prefs.jsonl"}}),
        ("prefs.jsonl", "preferences.source")),
    "muon-under-fsdp": Case("encode", params({"distributed": {"strategy": "fsdp"}}),
                            ("pretrain.optimizer muon needs whole weight matrices, which distributed.strategy "
                             "fsdp shards; use strategy ddp, or set pretrain.optimizer: adamw",)),
    "tokenizer-path-missing": Case("tokenizer", params({"tokenizer": {"path": "init/tokenizer.model"}}),
                                   ("tokenizer.path init/tokenizer.model is not a file; point it at a "
                                    "SentencePiece tokenizer.model",)),
    "tokenizer-path-not-sentencepiece": Case(
        "tokenizer", params({"tokenizer": {"path": "data/corpus.txt"}}),
        ("tokenizer.path data/corpus.txt is not a SentencePiece model (it could not be parsed)",)),
    "tokenizer-path-with-kind-char": Case("tokenizer", params({"tokenizer": {"path": "t.model", "kind": "char"}}),
                                          ("tokenizer.path (an existing SentencePiece model) needs kind: "
                                           "sentencepiece, got kind 'char'",)),
    "sft-base-missing": Case("sft", params({"sft": {"base": "init/model.safetensors"}}),
                             ("checkpoint init/model.safetensors not found",)),
    "checkpoint-vs-retrained-tokenizer": Case(
        "sft", retrained_tokenizer, (f"{BASE} was trained with another tokenizer (sha256 ",
                                     "rerun the stage that trains it (e.g. `dvc repro pretrain`)")),
    # ---- training numerics (lr 1000 blows the weights up within a few steps)
    "non-finite-loss": Case(
        "pretrain", params({"pretrain": {"lr": 1000.0, "warmup_steps": 0, "save_every": 1,   # AdamW on every
                                         "eval_every": 100, "optimizer": "adamw"}}),   # weight: it diverges
        ("non-finite", "at step", "last good checkpoint (last.safetensors) was kept", "lr too high (1000.0)",
         "fp16 overflow", "nonfinite: skip"),
        may_change=("out/pretrain/last.safetensors",), check=kept_last_good(1)),
    "non-finite-skip-limit": Case(
        "pretrain", params({"pretrain": {"lr": 1000.0, "warmup_steps": 0, "save_every": 1, "eval_every": 100,
                                         "nonfinite": "skip", "max_skipped": 2, "optimizer": "adamw"}}),
        ("3 non-finite steps (more than max_skipped=2)", "lower lr"),
        may_change=("out/pretrain/last.safetensors",), check=kept_last_good(3)),
}


# ---- round two: each class with several values (issue 17)

STAGES = ("prepare", "tokenizer", "encode", "pretrain", "sft", "merge", "evaluate", "generate")


def append_text(text: str) -> Callable[[Path], None]:
    def setup(repo: Path) -> None:
        with open(repo / "params.yaml", "a") as fh:
            fh.write(text)
    return setup


def duplicate_lines(key: str) -> Callable[[Path, str], None]:
    """The error names the two lines where ``key:`` is written (the first and the last)."""
    def check(repo: Path, line: str) -> None:
        where = [i for i, text in enumerate((repo / "params.yaml").read_text().splitlines(), 1)
                 if text.lstrip().startswith(f"{key}:")]
        assert f"duplicate key {key!r} at lines {where[0]} and {where[-1]}" in line, (where, line)
    return check


def never_advise_replace(repo: Path, line: str) -> None:
    assert "invalid_utf8: replace" not in line and "bad_records: skip" not in line, line


def binary(n: int = 20000, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


TEXT = "All work and no play makes a dull model.\n\nIt reads the same line again and again.\n\n" * 100


def corpus_dir_with_one_binary(repo: Path) -> None:
    (repo / "texts").mkdir()
    (repo / "texts/a.txt").write_text(TEXT)
    (repo / "texts/b.txt").write_bytes(binary())
    (repo / "texts/c.md").write_text(TEXT)
    set_params(repo, {"data": {"corpus": "texts"}})


def fifo_params(repo: Path) -> None:
    import os

    os.mkfifo(repo / "fifo.yaml")


NAN, INF = float("nan"), float("inf")
for stage_name, section, key, value in [
        ("pretrain", "pretrain", "lr", NAN), ("pretrain", "pretrain", "lr", INF),
        ("sft", "sft", "min_lr", -INF), ("generate", "generate", "temperature", NAN),
        ("generate", "generate", "top_p", INF), ("prepare", "model", "rope_base", INF),
        ("merge", "lora", "alpha", NAN), ("prepare", "data", "corpus_max_mb", INF),
        ("evaluate", "model", "norm_eps", NAN), ("tokenizer", "tokenizer", "character_coverage", NAN)]:
    CASES[f"non-finite-{section}.{key}={value}"] = Case(
        stage_name, params({section: {key: value}}), (f"{section}.{key} must be a finite number, got {value}",))

CASES.update({
    # ---- a key written twice: an error naming the key and both places, never the last one silently
    "duplicate-key-flow-mapping": Case("pretrain", params_text("pretrain: {lr: 0.002, lr: 50}\n"),
                                       ("duplicate key 'lr' at line 1, columns 12 and 23", "keep one")),
    "duplicate-key-in-section": Case("sft", params_text("sft:\n  lr: 0.002\n  max_steps: 4\n  lr: 50\n"),
                                     ("duplicate key 'lr' at lines 2 and 4", "keep one")),
    "duplicate-section": Case("generate", params_text("model:\n  n_layer: 2\npretrain:\n  lr: 0.002\n"
                                                      "model:\n  n_layer: 4\n"),
                              ("duplicate key 'model' at lines 1 and 5", "keep one")),
    "duplicate-section-appended": Case("evaluate", append_text("pretrain:\n  lr: 50\n"),
                                       ("keep one (YAML would silently use the last)",),
                                       check=duplicate_lines("pretrain")),
    "duplicate-key-in-list-item": Case("prepare", params_text("generate:\n  prompts:\n  - {text: a, text: b}\n"),
                                       ("duplicate key 'text' at line 3, columns 6 and 15",)),
    # ---- --params that is not a readable YAML file
    "params-is-a-directory": Case("pretrain", lambda repo: None,
                                  ("params file out is a directory", "pass --params PATH of a YAML file"),
                                  args=("--params", "out")),
    "params-is-the-cwd": Case("generate", lambda repo: None, ("params file . is a directory",),
                              args=("--params", ".")),
    "params-is-a-device": Case("prepare", lambda repo: None,
                               ("params file /dev/null is not a regular file", "pass --params PATH"),
                               args=("--params", "/dev/null")),
    "params-is-a-fifo": Case("sft", fifo_params, ("params file fifo.yaml is not a regular file",),
                             args=("--params", "fifo.yaml")),
    "params-not-utf8": Case("evaluate", file("params.yaml", b"model:\n  n_layer: \xff\xfe\n"),
                            ("params.yaml is not valid UTF-8 (byte 18)", "save it as UTF-8")),
    # ---- sections that are valid alone but useless together: refused at load, naming what to change
    "context-too-short-for-template": Case(
        "pretrain", params({"model": {"context_length": 1}}),
        ("BOS + sft.template with even a one-token instruction take at least 8 tokens",
         "but model.context_length is 1", "raise model.context_length")),
    "context-too-short-for-template-4": Case(
        "prepare", params({"model": {"context_length": 4}}), ("take at least 8 tokens but model.context_length is 4",)),
    "max-length-too-short-for-template": Case(
        "sft", params({"sft": {"max_length": 6}}),
        ("take at least 8 tokens but sft.max_length is 6", "raise sft.max_length (or set 0")),
    "template-longer-than-context": Case(
        "evaluate", params({"sft": {"template": "Answer the question below. " * 40 + "\n{instruction}\n### Response:\n"}}),
        ("tokens but model.context_length is 64", "raise model.context_length", "or shorten sft.template")),
    "max-new-tokens-huge": Case(
        "generate", params({"generate": {"max_new_tokens": 1_000_000_000}}),
        ("generate.max_new_tokens (1000000000) + at least 8 tokens (BOS included) of the SFT prompt",
         "(sft.template with an instruction) exceed model.context_length (64), so the prompt would be cut",
         "lower generate.max_new_tokens to at most 56")),
    "max-new-tokens-equal-to-context": Case(
        "pretrain", params({"generate": {"max_new_tokens": 64}}),
        ("generate.max_new_tokens (64) +", "lower generate.max_new_tokens to at most 56")),
    "max-new-tokens-vs-long-prompt": Case(
        "sft", params({"generate": {"sft_questions": 0, "max_new_tokens": 56,
                                    "prompts": ["The function", "The quick brown fox jumps over the dog. " * 4]}}),
        ("generate.max_new_tokens (56) + at least 11 tokens (BOS included) of the prompt 'The quick brown fox",
         "exceed model.context_length (64)",
         "lower generate.max_new_tokens to at most 53 or shorten the prompt")),
    # ---- lora.targets checked against the blocks' linear layers when any stage starts
    "lora-target-unknown": Case("pretrain", params({"lora": {"targets": ["foo"]}}),
                                ("lora.targets ['foo'] match no linear layer",
                                 "valid names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj")),
    "lora-target-typo-among-good": Case("prepare", params({"lora": {"targets": ["q_proj", "qv_proj"]}}),
                                        ("lora.targets ['qv_proj'] match no linear layer",)),
    "lora-target-wrong-parent": Case("merge", params({"lora": {"targets": ["mlp.q_proj", "self_attn.v_proj"]}}),
                                     ("lora.targets ['mlp.q_proj'] match no linear layer",)),
    "lora-target-layer-beyond-n_layer": Case("evaluate",
                                             params({"lora": {"targets": ["layers.2.self_attn.q_proj"]}}),
                                             ("lora.targets ['layers.2.self_attn.q_proj'] match no linear",
                                              "'layers.1.self_attn.q_proj'")),
    "lora-target-lm-head": Case("generate", params({"lora": {"targets": ["lm_head", "embed_tokens"]}}),
                                ("lora.targets ['lm_head', 'embed_tokens'] match no linear layer",
                                 "or ['all-linear']")),
    # ---- every stage validates the whole file, all problems in one line
    **{f"whole-file-checked-by-{stage_name}": Case(
        stage_name, params({"lora": {"targets": ["foo"]}, "project": {"device": "cudax"},
                            "generate": {"max_new_tokens": 100}}),
        ("project.device must be auto, cpu, cuda or cuda:N", "; lora.targets ['foo'] match no linear layer",
         "; generate.max_new_tokens (100) + at least 8 tokens")) for stage_name in STAGES},
    # ---- project.device spelled wrong
    **{f"device-{dev}": Case(stage_name, params({"project": {"device": dev}}),
                             (f"project.device must be auto, cpu, cuda or cuda:N (N = a GPU index), got {dev!r}",))
       for stage_name, dev in [("pretrain", "cudax"), ("prepare", "gpu"), ("sft", "cuda:-1"),
                               ("generate", "CUDA"), ("encode", "mps"), ("evaluate", "cuda:0:1")]},
    "serve-device-cudax": Case("prepare", params({"serve": {"device": "cudax"}}),
                               ("serve.device must be auto, cpu, cuda or cuda:N (N = a GPU index), got 'cudax'",)),
    # ---- input that is not text: refused whatever invalid_utf8 / bad_records say, advice that works
    "binary-corpus-replace": Case(
        "prepare", file("blob.txt", binary(), {"data": {"corpus": "blob.txt", "invalid_utf8": "replace"}}),
        ("blob.txt is not UTF-8 text (", "whatever data.invalid_utf8 says",
         "it looks like a binary file: point data.corpus at UTF-8 text instead"), check=never_advise_replace),
    "binary-corpus-error": Case(
        "prepare", file("blob.txt", binary(seed=1), {"data": {"corpus": "blob.txt"}}),
        ("blob.txt is not UTF-8 text (", "it looks like a binary file"), check=never_advise_replace),
    "image-as-corpus": Case(
        "prepare", lambda repo: (copy("out/pretrain/loss.png", "loss.txt")(repo),
                                 set_params(repo, {"data": {"corpus": "loss.txt", "invalid_utf8": "replace"}})),
        ("loss.txt is not UTF-8 text (", "it looks like a binary file"), check=never_advise_replace),
    "utf16-corpus": Case(
        "prepare", file("u16.txt", TEXT.encode("utf-16"), {"data": {"corpus": "u16.txt"}}),
        ("u16.txt is not UTF-8 text (", "it looks like UTF-16 text", "iconv -f utf-16 -t utf-8 u16.txt"),
        check=never_advise_replace),
    "utf16-corpus-no-bom-replace": Case(
        "prepare", file("u16.txt", TEXT.encode("utf-16-le"),
                        {"data": {"corpus": "u16.txt", "invalid_utf8": "replace"}}),
        ("u16.txt is not UTF-8 text (", "% of its first ", "it looks like UTF-16 text"), check=never_advise_replace),
    "legacy-encoding-corpus-replace": Case(
        "prepare", file("el.txt", ("Καλημέρα κόσμε, αυτό είναι ένα κείμενο.\n\n" * 300).encode("iso-8859-7"),
                        {"data": {"corpus": "el.txt", "invalid_utf8": "replace"}}),
        ("el.txt is not UTF-8 text (", "looks like text in another encoding", "iconv -f ENCODING -t utf-8"),
        check=never_advise_replace),
    "binary-file-in-corpus-directory": Case(
        "prepare", corpus_dir_with_one_binary, ("texts/b.txt is not UTF-8 text (", "a binary file"),
        check=never_advise_replace),
    "binary-sft-jsonl-replace-skip": Case(
        "prepare", file("pairs.jsonl", binary(4000), {"data": {"sft": "pairs.jsonl", "invalid_utf8": "replace",
                                                               "bad_records": "skip"}}),
        ("SFT data pairs.jsonl is not UTF-8 text (", "point data.sft at UTF-8 text"), check=never_advise_replace),
    "binary-sft-jsonl-error": Case(
        "prepare", file("pairs.jsonl", binary(4000, seed=2), {"data": {"sft": "pairs.jsonl"}}),
        ("SFT data pairs.jsonl is not UTF-8 text (", "a binary file"), check=never_advise_replace),
    "utf16-sft-csv": Case(
        "prepare", file("pairs.csv", ("instruction,response\n" + "What is it?,A thing.\n" * 30).encode("utf-16"),
                        {"data": {"sft": "pairs.csv", "invalid_utf8": "replace"}}),
        ("SFT data pairs.csv is not UTF-8 text (", "it looks like UTF-16 text", "iconv -f utf-16"),
        check=never_advise_replace),
})

# device and precision against this machine: check_hardware(params), called by every stage at start
# (stages.common.setup); "cpu" + fp16 is refused on any machine, and no machine has 100 GPUs
CASES.update({
    "device-gpu-index-beyond-count": Case("prepare", params({"project": {"device": "cuda:99"}}),
                                          ("project.device 'cuda:99' asks for",)),
    **{f"fp16-on-cpu-{key}-in-{stage_name}": Case(
        stage_name, params({"project": {"device": "cpu"}, key.split(".")[0]: {"precision": "fp16"}}),
        (f"{key} fp16 needs a CUDA device (project.device is cpu); use bf16, fp32 or auto",))
       for stage_name, key in [("prepare", "pretrain.precision"), ("encode", "sft.precision"),
                               ("tokenizer", "generate.precision"), ("merge", "sft.precision")]},
})


@pytest.mark.parametrize("name", [pytest.param(k, marks=c.marks) for k, c in CASES.items()])
def test_bad_input_is_one_line_and_damages_nothing(name, repo):
    case = CASES[name]
    case.setup(repo)
    before = hashes(repo, "data", "out")
    proc = sh(repo, sys.executable, "-m", f"stages.{case.stage}", *case.args, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    print(one_line_error(proc, *case.needles))
    after = hashes(repo, "data", "out")
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= set(case.may_change), sorted(changed)
    if case.check is not None:
        case.check(repo, proc.stderr.strip())


# --------------------------------------------------------------------------------------------------
# the policies that let a run go on


def test_invalid_utf8_replace_policy_in_prepare_and_encode(repo):
    set_params(repo, {"data": {"corpus": "bad.txt", "invalid_utf8": "replace"},
                      "encode": {"invalid_utf8": "replace"}})
    (repo / "bad.txt").write_bytes(invalid_utf8_file("bad.txt", 1234))
    stage(repo, "prepare")
    assert "\ufffd" in (repo / "data/corpus.txt").read_text(encoding="utf-8")
    (repo / "data/corpus.txt").write_bytes(invalid_utf8_file("corpus", 4321))
    stage(repo, "encode")
    assert json.loads((repo / "out/encoded/meta.json").read_text())["tokens"]["val"] > 0


def test_nul_bytes_in_text_are_stripped_and_counted(repo):
    (repo / "nul.txt").write_bytes(TEXT[:3000].encode() + b"\0\0" + TEXT[3000:].encode() + b"\0")
    lines = [json.dumps({"instruction": f"Question\u0000 {i}?", "response": f"Answer {i}."}) for i in range(20)]
    (repo / "pairs.jsonl").write_text(jsonl(*lines))
    set_params(repo, {"data": {"corpus": "nul.txt", "sft": "pairs.jsonl"}})
    stage(repo, "prepare")
    stats = json.loads((repo / "out/prepare/stats.json").read_text())
    assert stats["corpus"]["nul_stripped"] == 3 and stats["sft"]["nul_stripped"] == 20, stats
    assert b"\0" not in (repo / "data/corpus.txt").read_bytes()
    assert b"\\u0000" not in (repo / "data/sft_train.jsonl").read_bytes()
    assert "Question 1?" in (repo / "data/sft_train.jsonl").read_text() + (repo / "data/sft_val.jsonl").read_text()


def test_bad_records_skip_policy_counts_what_it_skipped(repo):
    lines = [json.dumps({"instruction": f"Question {i}?", "response": f"Answer {i}."}) for i in range(20)]
    lines[3] = "{oops"
    lines[7] = json.dumps({"instruction": "no response"})
    (repo / "pairs.jsonl").write_text(jsonl(*lines))
    set_params(repo, {"data": {"sft": "pairs.jsonl", "bad_records": "skip"}})
    stage(repo, "prepare")
    stats = json.loads((repo / "out/prepare/stats.json").read_text())["sft"]
    assert stats["skipped"] == 2 and stats["pairs"] == 18 and stats["train"] + stats["val"] == 18


def test_nonfinite_skip_policy_counts_skipped_steps(repo):
    set_params(repo, {"pretrain": {"lr": 1000.0, "warmup_steps": 0, "eval_every": 100, "max_steps": 8,
                                   "nonfinite": "skip", "max_skipped": 100, "optimizer": "adamw"}})
    proc = stage(repo, "pretrain")
    metrics = json.loads((repo / "out/pretrain/metrics.json").read_text())
    assert metrics["steps"] == 8 and 0 < metrics["skipped_steps"] < 8, metrics
    assert "Traceback" not in proc.stderr


def test_init_from_starts_a_fresh_run_from_the_checkpoints_weights(repo):
    from minilm.checkpoint import load_checkpoint
    from minilm.fileio import sha256_file

    shutil.copy(repo / BASE, repo / "init.safetensors")
    base = json.loads((repo / "out/pretrain/metrics.json").read_text())
    set_params(repo, {"pretrain": {"init_from": "init.safetensors", "max_steps": 2, "eval_every": 2,
                                   "warmup_steps": 1, "seed": 7}})
    proc = stage(repo, "pretrain")
    assert "from init.safetensors, 2 steps" in proc.stdout
    last = load_checkpoint(repo / "out/pretrain/last.safetensors")
    assert last.step == 2 and last.meta["extra"]["init_sha256"] == sha256_file(repo / "init.safetensors")
    history = (repo / "out/pretrain/history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["2"]   # a fresh schedule, not the base run's
    # two steps from random init would sit near ln(384) = 5.95; from the base it stays near the base's loss
    again = json.loads((repo / "out/pretrain/metrics.json").read_text())
    assert again["best_val_loss"] < min(base["best_val_loss"] + 0.3, 5.4)


# --------------------------------------------------------------------------------------------------
# the compatibility check the sft, evaluate and generate stages run


def test_check_compatible_names_what_differs(done):
    import dataclasses

    from minilm.checkpoint import check_compatible, load_checkpoint
    from minilm.errors import CheckpointError
    from stages.params import load_params
    from minilm.tokenizer import load_tokenizer

    ckpt = load_checkpoint(done / BASE)
    tok = load_tokenizer(done / "out/tokenizer/tokenizer.model")
    model = dataclasses.replace(load_params(done / "params.yaml").model, vocab_size=tok.vocab_size)
    check_compatible(ckpt, BASE, model, tokenizer_hash=tok.hash)          # the pipeline's own: fine
    with pytest.raises(CheckpointError, match=r"trained with model.d_model=64 \(params say 32\).*dvc repro"):
        check_compatible(ckpt, BASE, dataclasses.replace(model, d_model=32))
    with pytest.raises(CheckpointError, match="another tokenizer") as err:
        check_compatible(ckpt, BASE, model, tokenizer_hash="0" * 64)
    assert "\n" not in str(err.value)
