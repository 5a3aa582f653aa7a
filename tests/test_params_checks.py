"""The params checks that need no stage run: the token lower bound behind the context checks is sound for
the tokenizers the pipeline trains, and check_hardware refuses what this machine cannot run."""

from __future__ import annotations

import dataclasses
import random

import pytest

from minilm.config import DEFAULT_TEMPLATE, TokenizerConfig
from minilm.errors import ConfigError
from stages.params import _min_tokens, _template_tokens, check_hardware, load_params

SPECIALS = ["### Instruction:", "### Response:"]


def samples(text: str) -> list[str]:
    rng = random.Random(0)
    out = [DEFAULT_TEMPLATE.format(instruction=i) for i in ("x", "What is a list?", "\n", " ", "é", "日本語")]
    out += ["### Instruction:### Response:", "\n\n\n", "a" * 40, "The function returns", ""]
    for _ in range(400):
        start = rng.randrange(len(text) - 300)
        out.append(text[start:start + rng.randrange(1, 300)])
    return out


@pytest.mark.parametrize("kind, model_type", [("sentencepiece", "bpe"), ("sentencepiece", "unigram"),
                                              ("char", "bpe")])
def test_min_tokens_never_exceeds_the_real_count(stdlib_text, tmp_path, kind, model_type):
    from minilm.tokenizer import build_char_tokenizer, train_sentencepiece

    cfg = TokenizerConfig(kind=kind, model_type=model_type, vocab_size=1500, special_tokens=SPECIALS)
    tok = (train_sentencepiece(stdlib_text, tmp_path / "t.model", cfg) if kind == "sentencepiece" else
           build_char_tokenizer(stdlib_text, tmp_path / "t.json", cfg))
    text = stdlib_text.read_text()
    over = [(s, _min_tokens(s, cfg), len(tok.encode(s, bos=False, eos=False))) for s in samples(text)]
    assert not [o for o in over if o[1] > o[2]]
    # and it is tight where it matters: the default template with a one-character instruction
    real = len(tok.encode(DEFAULT_TEMPLATE.format(instruction="x"), bos=False, eos=False))
    assert _template_tokens(DEFAULT_TEMPLATE, cfg) == real == 7


def test_template_bound_gives_up_where_a_special_token_could_straddle_the_instruction():
    cfg = TokenizerConfig(special_tokens=["Q: x"])
    assert _template_tokens("Q: {instruction}\nA:", cfg) is None
    assert _template_tokens("Q: {instruction}\nA:", TokenizerConfig()) == 3      # 'Q: x', '\n', 'A:'


def with_(params, **sections):
    return dataclasses.replace(params, **{k: dataclasses.replace(getattr(params, k), **v)
                                          for k, v in sections.items()})


@pytest.fixture
def params():
    from test_pipeline import ROOT

    return load_params(ROOT / "params.yaml")


def fake_cuda(monkeypatch, count: int, bf16: bool = True) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_serve_device_is_checked_too(monkeypatch, params):
    fake_cuda(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"serve.device 'cuda:3' asks for GPU 3 but this machine has 1"):
        check_hardware(with_(params, serve={"device": "cuda:3"}))
    fake_cuda(monkeypatch, 0)
    with pytest.raises(ConfigError, match=r"serve.precision fp16 needs a CUDA device \(serve.device is cpu\)"):
        check_hardware(with_(params, serve={"device": "cpu", "precision": "fp16"}))


@pytest.mark.parametrize("count, project, section, precision, needle", [
    (0, "cuda", None, None, "project.device 'cuda' asks for a GPU but CUDA is not available"),
    (0, "cuda:0", None, None, "project.device 'cuda:0' asks for a GPU but CUDA is not available"),
    (2, "cuda:2", None, None, "project.device 'cuda:2' asks for GPU 2 but this machine has 2 (cuda:0 to cuda:1)"),
    (0, "auto", "pretrain", "fp16", "pretrain.precision fp16 needs a CUDA device (CUDA is not available"),
    (2, "cpu", "sft", "fp16", "sft.precision fp16 needs a CUDA device (project.device is cpu)"),
    (0, "cpu", "generate", "fp16", "generate.precision fp16 needs a CUDA device (project.device is cpu)"),
    (1, "auto", "generate", "bf16", "generate.precision bf16 is not supported by this GPU"),
    (0, "cpu", "serve", "fp16", "serve.precision fp16 needs a CUDA device (CUDA is not available"),
])
def test_check_hardware_refuses_what_the_machine_cannot_run(monkeypatch, params, count, project, section,
                                                            precision, needle):
    fake_cuda(monkeypatch, count, bf16=False)
    edit = {"project": {"device": project}}
    if section:
        edit[section] = {"precision": precision}
    with pytest.raises(ConfigError) as err:
        check_hardware(with_(params, **edit))
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("count, project, precision", [(0, "auto", "auto"), (0, "cpu", "bf16"),
                                                       (1, "cuda:0", "fp16"), (2, "cuda:1", "bf16"),
                                                       (1, "auto", "fp16")])
def test_check_hardware_accepts_what_the_machine_can_run(monkeypatch, params, count, project, precision):
    fake_cuda(monkeypatch, count, bf16=True)
    check_hardware(with_(params, project={"device": project}, pretrain={"precision": precision},
                         sft={"precision": precision}, generate={"precision": precision}))
