"""GGUF export, proven by llama.cpp itself (through llama-cpp-python).

llama.cpp loads the file; its tokenizer gives minilm's ids; its logits agree with minilm's (f32 within
1e-3 - with an f32 KV cache - and f16 within F16_TOL); its greedy continuation of several prompts is
minilm's for f32 and f16; q8_0 keeps >= 95% of the greedy (argmax) choices. Plus: reproducible bytes,
and failed or refused exports that leave nothing half-written.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

from minilm.config import SampleConfig
from minilm.errors import ConfigError, MinilmError
from minilm.gguf import export_gguf, read_gguf_info, rotary_permute
from minilm.sampling import generate_ids
from tests.exporting import SHAPES, TEXTS, char_tokenizer, sp_tokenizer, tiny_model

try:
    import llama_cpp
except ImportError as err:       # CI installs it (pip install -e ".[test]"); say why when it is absent
    llama_cpp = None
    LLAMA_MISSING = f"llama-cpp-python is not importable ({err}); pip install llama-cpp-python"
needs_llama = pytest.mark.skipif(llama_cpp is None, reason=LLAMA_MISSING if llama_cpp is None else "")
pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

F16_TOL = 1e-2     # |logit difference| with f16 weights and KV cache (measured 3.5e-3 to 4.2e-3 on logits of
                   # std 0.8, max 4; 0.8e-3 to 0.9e-3 on a briefly trained model)
PROMPTS = ["The function returns", "A list is", "### Instruction:\nWhat is a list?\n\n### Response:\n",
           "naïve 🙂 text"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return sp_tokenizer(tmp_path_factory.mktemp("tok"))


def _llama(path, gguf_type: str, n_ctx: int = 128):
    """llama.cpp on ``path``: all logits kept, KV cache in f32 for an f32 model (its default is f16)."""
    f32 = 0   # GGML_TYPE_F32
    kv = {"type_k": f32, "type_v": f32} if gguf_type == "f32" else {}
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, n_batch=n_ctx, logits_all=True,
                           verbose=False, **kv)


def _logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def _greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            break
    return out


def _greedy_minilm(model, ids: list[int], n: int) -> list[int]:
    cfg = SampleConfig(temperature=0.0, top_p=1.0, repetition_penalty=1.0, ban_window=0, min_new_tokens=0,
                       max_new_tokens=n, seed=None)
    return generate_ids(model, [ids], cfg, eos_id=None)[0]


def test_rotary_permute_turns_halves_into_pairs():
    hd, heads = 8, 2
    w = torch.arange(heads * hd).float()           # row index as value
    out = rotary_permute(w, heads).view(heads, hd // 2, 2)
    for h in range(heads):
        for j in range(hd // 2):
            assert out[h, j].tolist() == [h * hd + j, h * hd + j + hd // 2]


@needs_llama
def test_llama_cpp_tokenizer_gives_minilm_ids(tok, tmp_path):
    path = export_gguf(tiny_model(tok.vocab_size), tok, tmp_path / "m.gguf", gguf_type="f32")
    llm = _llama(path, "f32")
    for text in TEXTS + PROMPTS:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [tok.bos_id] + ids
        assert llm.detokenize(ids).decode() == text
    for marker in ("### Instruction:", "### Response:", "\n"):
        assert llm.tokenize(marker.encode(), add_bos=False, special=False) == [tok.token_id(marker)]


@needs_llama
@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_and_greedy_continuations_equal_minilm(tok, tmp_path, shape, gguf_type):
    model = tiny_model(tok.vocab_size, **SHAPES[shape])
    llm = _llama(export_gguf(model, tok, tmp_path / "m.gguf", gguf_type=gguf_type), gguf_type)
    ids = torch.randint(0, tok.vocab_size, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    diff = np.abs(_logits(llm, ids) - ours).max()
    assert np.abs(ours).max() > 1.0
    assert diff < (1e-3 if gguf_type == "f32" else F16_TOL), diff
    seen = set()
    for prompt in PROMPTS:
        start = tok.encode(prompt, bos=True)
        mine = _greedy_minilm(model, start, 24)
        assert _greedy_llama(llm, start, 24) == mine, prompt
        seen.update(mine)
    assert len(seen) > 8                             # not one token repeated everywhere


@needs_llama
def test_q8_0_keeps_the_greedy_choices(tok, tmp_path):
    """On a briefly trained model (a random one's near-ties say little) and held-out text."""
    from tests.exporting import corpus, trained_model

    text = corpus(tmp_path / "corpus.txt")
    model = trained_model(tok, text, **SHAPES["gqa-untied"])
    path = export_gguf(model, tok, tmp_path / "m.gguf", gguf_type="q8_0")
    assert "Q8_0" in read_gguf_info(path)["types"]
    llm = _llama(path, "q8_0")
    held = tok.encode(text.read_text(encoding="utf-8")[160_000:175_000])
    agree = total = 0
    for k in range(4):
        ids = [tok.bos_id] + held[k * 100:(k + 1) * 100]
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy().argmax(-1)
        agree += int((_logits(llm, ids).argmax(-1) == ours).sum())
        total += len(ids)
    assert agree / total >= 0.95, agree / total          # measured 0.997-1.0
    for prompt in PROMPTS[:2]:
        start = tok.encode(prompt, bos=True)
        mine, theirs = _greedy_minilm(model, start, 16), _greedy_llama(llm, start, 16)
        assert sum(a == b for a, b in zip(mine, theirs)) >= 8     # the continuation starts the same


@needs_llama
def test_bf16_loads_and_agrees(tok, tmp_path):
    model = tiny_model(tok.vocab_size, n_kv_head=2)
    path = export_gguf(model, tok, tmp_path / "m.gguf", gguf_type="bf16")
    assert "BF16" in read_gguf_info(path)["types"]
    ids = tok.encode(TEXTS[0] + TEXTS[3], bos=True)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(_logits(_llama(path, "bf16"), ids) - ours).max() < 0.1


@needs_llama
def test_chat_template_and_sft_prompt_reach_llama_cpp(tok, tmp_path):
    from minilm.config import SFTConfig

    path = export_gguf(tiny_model(tok.vocab_size), tok, tmp_path / "m.gguf", gguf_type="f16")
    llm = _llama(path, "f16")
    assert "### Response:" in llm.metadata["tokenizer.chat_template"]
    assert llm.metadata["tokenizer.ggml.add_space_prefix"] == "false"
    prompt = SFTConfig().prompt("What is a list?")
    assert llm.tokenize(prompt.encode(), add_bos=True) == tok.encode(prompt, bos=True)


def test_gguf_is_byte_reproducible(tok, tmp_path):
    for kind in ("f16", "q8_0"):
        a = export_gguf(tiny_model(tok.vocab_size), tok, tmp_path / f"a-{kind}.gguf", gguf_type=kind)
        b = export_gguf(tiny_model(tok.vocab_size), tok, tmp_path / f"b-{kind}.gguf", gguf_type=kind)
        assert a.read_bytes() == b.read_bytes()
        assert str(tmp_path).encode() not in a.read_bytes()


# --------------------------------------------------------------------------------------------------
# refusals and failed writes: one line, nothing half-written


def test_unexportable_inputs_are_refused(tok, tmp_path):
    char = char_tokenizer(tmp_path)
    uni = sp_tokenizer(tmp_path, model_type="unigram")
    cases = [(tiny_model(tok.vocab_size, block="parallel"), tok, "gguf", "model.block"),
             (tiny_model(tok.vocab_size, norm="layernorm"), tok, "gguf", "model.norm"),
             (tiny_model(char.vocab_size), char, "gguf", "tokenizer.kind"),
             (tiny_model(uni.vocab_size), uni, "gguf", "tokenizer.model_type"),
             (tiny_model(tok.vocab_size), tok, "q4_k", "export.gguf_type")]
    for model, tokenizer, kind, setting in cases:
        with pytest.raises(ConfigError) as err:
            export_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type="f16" if kind == "gguf" else kind)
        assert setting in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "m.gguf").exists()


def test_bad_targets_are_one_line_and_leave_nothing(tok, tmp_path):
    model = tiny_model(tok.vocab_size)
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "file").write_text("x")
    for target, message in [(tmp_path / "dir.gguf", "is a directory"),
                            (tmp_path / "file" / "m.gguf", "cannot write")]:
        with pytest.raises(MinilmError) as err:
            export_gguf(model, tok, target, gguf_type="f16")
        assert message in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".json") == ["dir.gguf", "file"]


def test_full_disk_keeps_the_old_file_and_no_temporary(tok, tmp_path, monkeypatch):
    import gguf

    target = export_gguf(tiny_model(tok.vocab_size), tok, tmp_path / "m.gguf", gguf_type="f16")
    before = target.read_bytes()

    def full_disk(self, *args, **kwargs):        # part of the data is written, then the disk is full
        self.fout[0].write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(MinilmError) as err:
        export_gguf(tiny_model(tok.vocab_size, seed=3), tok, target, gguf_type="f16")
    assert "no space left" in str(err.value)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_truncated_gguf_is_reported_in_one_line(tok, tmp_path):
    target = export_gguf(tiny_model(tok.vocab_size), tok, tmp_path / "m.gguf", gguf_type="f16")
    info = read_gguf_info(target)
    assert info["architecture"] == "llama" and info["tensors"] == 2 * 9 + 2
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(MinilmError) as err:
        read_gguf_info(cut)
    assert "not a readable GGUF" in str(err.value) and "\n" not in str(err.value)
