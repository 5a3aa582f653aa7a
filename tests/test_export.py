"""Hugging Face export and import, proven by transformers and PEFT themselves.

The exported directory is opened with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` (no
custom code, no network): same logits as minilm (fp32, 1e-4) for MHA, GQA and MQA, tied and untied;
the same greedy tokens; the same token ids on awkward text; ``apply_chat_template`` gives the SFT ids;
a PEFT adapter merged by PEFT equals minilm's merge; minilm -> HF -> minilm is exact; the bytes are
reproducible; and what cannot be exported or imported is refused with one line.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[bench]')")

from minilm.config import SampleConfig, SFTConfig  # noqa: E402
from minilm.convert import export_main, import_main  # noqa: E402
from minilm.errors import CheckpointError, ConfigError  # noqa: E402
from minilm.export import chat_template, export_hf  # noqa: E402
from minilm.hf import from_transformers  # noqa: E402
from minilm.sampling import generate_ids  # noqa: E402
from tests.exporting import SHAPES, TEXTS, char_tokenizer, sp_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return sp_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """A GQA model exported once; (model, directory)."""
    model = tiny_model(tok.vocab_size, n_kv_head=2, init_std=0.3)
    out = export_hf(model, tok, tmp_path_factory.mktemp("hf") / "hf",
                    sample=SampleConfig(temperature=0.7, top_k=20, stop=["###"]))
    return model, out


def _auto(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_equal_minilm(tok, tmp_path, shape):
    model = tiny_model(tok.vocab_size, **SHAPES[shape])
    hf, _ = _auto(export_hf(model, tok, tmp_path / "hf"))
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == model.config.kv_heads
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == \
        model.config.tie_embeddings
    x = torch.randint(0, tok.vocab_size, (3, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    assert ours.abs().max() > 0.5                       # far from trivially equal
    assert (theirs - ours).abs().max().item() < 1e-4


def test_greedy_generate_gives_the_same_tokens(exported, tok):
    model, path = exported
    hf, hf_tok = _auto(path)
    prompts = ["The function returns", "A list is", "### Instruction:\nWhat is a list?\n\n### Response:\n"]
    n = 30
    cfg = SampleConfig(temperature=0.0, top_p=1.0, repetition_penalty=1.0, ban_window=0, min_new_tokens=n,
                       max_new_tokens=n, seed=None)
    for prompt in prompts:
        ids = tok.encode(prompt, bos=True)
        ours = generate_ids(model, [ids], cfg, eos_id=tok.eos_id)[0]   # EOS banned below n, as in HF
        enc = hf_tok(prompt, return_tensors="pt")
        assert enc.input_ids[0].tolist() == ids
        with torch.no_grad():
            out = hf.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              repetition_penalty=1.0, no_repeat_ngram_size=0)
        assert out[0, len(ids):].tolist() == ours
        assert len(set(ours)) > 5


def test_tokenizer_gives_minilm_ids(exported, tok):
    _, path = exported
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(path)
    byte_ids = {tok.token_id(f"<0x{b:02X}>") for b in range(256)}
    seen_bytes = False
    for text in TEXTS:
        ours = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False).input_ids == ours, text
        assert hf_tok(text).input_ids == [tok.bos_id] + ours              # BOS, as minilm's prompts
        assert hf_tok.decode(ours) == tok.decode(ours) == text
        seen_bytes |= bool(byte_ids & set(ours))
    assert seen_bytes                                                     # byte fallback was exercised
    for marker in ("### Instruction:", "### Response:", "\n"):
        assert hf_tok(marker, add_special_tokens=False).input_ids == [tok.token_id(marker)]
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id,
                                                                                tok.pad_id)


@pytest.mark.parametrize("template", [SFTConfig().template, "Q: {instruction} {{braces}}\nA:\n"],
                         ids=["default", "custom"])
def test_chat_template_gives_sft_ids(tok, tmp_path, template):
    from transformers import AutoTokenizer

    from minilm.sft import encode_pairs

    pairs = [{"instruction": "What is a list?", "response": "A sequence  of items."},
             {"instruction": "Naïve question 🙂\nwith two lines", "response": "Yes.\n\nNo."}]
    cfg = SFTConfig(template=template)
    examples = encode_pairs(pairs, tok, cfg, context_length=128)
    hf_tok = AutoTokenizer.from_pretrained(export_hf(tiny_model(tok.vocab_size), tok, tmp_path / "hf",
                                                     template=template))
    for pair, ids, n_prompt in zip(pairs, examples.input_ids, examples.prompt_lengths):
        user = [{"role": "user", "content": pair["instruction"]}]
        full = user + [{"role": "assistant", "content": pair["response"]}]
        prompt = hf_tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)
        whole = hf_tok.apply_chat_template(full, tokenize=True, return_dict=True)
        assert prompt["input_ids"] == ids[:n_prompt].tolist()
        assert whole["input_ids"] == ids.tolist()
        assert hf_tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == \
            "<s>" + cfg.prompt(pair["instruction"])
    with pytest.raises(Exception, match="user and assistant"):
        hf_tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_chat_template_renders_the_sft_prompt():
    from jinja2 import Template

    text = Template(chat_template(SFTConfig().template)).render(
        messages=[{"role": "user", "content": "Hi {there}"}], add_generation_prompt=True,
        bos_token="<s>", eos_token="</s>")
    assert text == "<s>" + SFTConfig().prompt("Hi {there}")


def test_generation_config_carries_the_sampling_defaults(exported):
    from transformers import GenerationConfig

    gc = GenerationConfig.from_pretrained(exported[1])
    assert gc.do_sample and gc.temperature == 0.7 and gc.top_k == 20 and gc.top_p == 0.92
    assert gc.repetition_penalty == 1.2 and gc.max_new_tokens == 120 and gc.min_new_tokens == 40
    assert gc.stop_strings is None and gc.eos_token_id == 2
    greedy = json.loads((export_hf(tiny_model(1000), _tok_of(exported), exported[1].parent / "g",
                                   sample=SampleConfig(temperature=0.0)) / "generation_config.json").read_text())
    assert greedy["do_sample"] is False and "temperature" not in greedy


def _tok_of(exported):
    from minilm.tokenizer import load_tokenizer

    return load_tokenizer(exported[1] / "tokenizer.model")


@pytest.mark.parametrize("shape", ["mha-tied", "mqa-untied-bias"])
def test_round_trip_is_exact(tok, tmp_path, shape):
    model = tiny_model(tok.vocab_size, **SHAPES[shape])
    back, back_tok = from_transformers(export_hf(model, tok, tmp_path / "hf"))
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert back_tok.hash == tok.hash and back_tok.encode(TEXTS[4]) == tok.encode(TEXTS[4])


def test_import_reads_what_transformers_itself_saves(tok, tmp_path):
    import shutil

    from minilm.hf import to_transformers

    model = tiny_model(tok.vocab_size, n_kv_head=2, tie_embeddings=False, rope_base=500.0)
    to_transformers(model).save_pretrained(tmp_path / "saved")          # transformers' own writer
    shutil.copy(tok.path, tmp_path / "saved" / "tokenizer.model")
    back, _ = from_transformers(tmp_path / "saved")
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_export_is_byte_reproducible(tok, tmp_path):
    a = export_hf(tiny_model(tok.vocab_size), tok, tmp_path / "a")
    b = export_hf(tiny_model(tok.vocab_size), tok, tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert str(tmp_path) not in "".join((a / n).read_text(errors="ignore") for n in names)


def test_peft_merge_equals_minilm_merge(tok, tmp_path):
    pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[bench]')")
    from peft import PeftModel

    from minilm.adapter import save_adapter
    from minilm.lora import LoRAConfig, inject_lora, lora_layers, merged_model

    base = tiny_model(tok.vocab_size, n_kv_head=2)
    hf_dir = export_hf(base, tok, tmp_path / "hf")
    model = tiny_model(tok.vocab_size, n_kv_head=2)
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=["all-linear"])
    inject_lora(model, cfg)
    with torch.no_grad():                              # a trained-looking adapter: B != 0
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    save_adapter(tmp_path / "adapter", model, cfg, base_sha256=None, base_config=base.config)
    hf, _ = _auto(hf_dir)
    peft_merged = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).merge_and_unload().eval()
    ours = merged_model(model).eval()
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x) - base(x)).abs().max() > 1e-2           # the adapter changes the model
        assert (peft_merged(input_ids=x).logits - ours(x)).abs().max().item() < 1e-4
    theirs = peft_merged.state_dict()
    for key, value in ours.state_dict().items():
        if key in theirs:
            torch.testing.assert_close(theirs[key], value, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# what is refused, with one line


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_unexportable_models_and_tokenizers_are_refused(tok, tmp_path):
    cases = [(tiny_model(tok.vocab_size, block="parallel"), tok, "model.block"),
             (tiny_model(tok.vocab_size, norm="layernorm"), tok, "model.norm"),
             (tiny_model(tok.vocab_size + 1), tok, "vocab_size")]
    char = char_tokenizer(tmp_path)
    cases.append((tiny_model(char.vocab_size), char, "tokenizer.kind"))
    uni = sp_tokenizer(tmp_path, model_type="unigram")
    cases.append((tiny_model(uni.vocab_size), uni, "tokenizer.model_type"))
    for model, tokenizer, setting in cases:
        with pytest.raises(ConfigError) as err:
            export_hf(model, tokenizer, tmp_path / "out")
        assert setting in _one_line(err)
    assert not (tmp_path / "out").exists()


def _hf_dir(tok, tmp_path, **config_changes):
    path = export_hf(tiny_model(tok.vocab_size), tok, tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    config.update(config_changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("change, message", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "LlamaForCausalLM"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope scaling"),
], ids=["architecture", "activation", "rope-scaling", "rope-parameters"])
def test_import_refuses_what_minilm_cannot_hold(tok, tmp_path, change, message):
    with pytest.raises(CheckpointError) as err:
        from_transformers(_hf_dir(tok, tmp_path, **change))
    assert message in _one_line(err)


def test_import_refuses_pickles_and_missing_tokenizers(tok, tmp_path):
    path = _hf_dir(tok, tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError) as err:
        from_transformers(path)
    assert "pickle" in _one_line(err)
    path = _hf_dir(tok, tmp_path / "b")
    (path / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError) as err:
        from_transformers(path)
    assert "tokenizer.model" in _one_line(err)
    with pytest.raises(CheckpointError) as err:
        from_transformers(tmp_path / "nowhere")
    assert "not found" in _one_line(err)


def test_failed_write_leaves_the_old_directory(tok, tmp_path, monkeypatch):
    import errno
    import os

    path = export_hf(tiny_model(tok.vocab_size), tok, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    calls = []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(Exception) as err:
        export_hf(tiny_model(tok.vocab_size, seed=5), tok, path)
    assert "no space left" in _one_line(err)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]        # no temporary left behind


# --------------------------------------------------------------------------------------------------
# the console scripts


def _checkpoint(tok, tmp_path, **kw):
    from minilm.checkpoint import save_checkpoint

    model = tiny_model(tok.vocab_size, **kw)
    return model, save_checkpoint(tmp_path / "model.safetensors", model, extra={"tokenizer_sha256": tok.hash})


def test_minilm_export_and_import_commands(tok, tmp_path, capsys):
    from minilm.checkpoint import load_model

    model, ckpt = _checkpoint(tok, tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text('sft:\n  template: "Q: {instruction}\\nA:\\n"\ngenerate:\n  temperature: 0.9\n'
                      "  prompts: [x]\n")
    assert export_main(["--ckpt", str(ckpt), "--tokenizer", str(tok.path), "--hf", str(tmp_path / "hf"),
                        "--params", str(params)]) == 0
    assert "Q: " in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["temperature"] == 0.9
    assert import_main([str(tmp_path / "hf"), "--out", str(tmp_path / "back" / "m.safetensors")]) == 0
    back, _ = load_model(tmp_path / "back" / "m.safetensors")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == tok.path.read_bytes()


def test_minilm_export_errors_are_one_line(tok, tmp_path, capsys):
    assert export_main(["--help"]) == 0 and "--gguf-type" in capsys.readouterr().out
    assert import_main(["--help"]) == 0 and "Hugging Face" in capsys.readouterr().out
    _, ckpt = _checkpoint(tok, tmp_path)
    (tmp_path / "other").mkdir()
    other = sp_tokenizer(tmp_path / "other", vocab_size=900)
    cases = [
        (["--ckpt", str(ckpt), "--hf", str(tmp_path / "hf")], "no tokenizer"),        # none beside it
        (["--ckpt", str(ckpt), "--tokenizer", str(tmp_path / "missing.model"), "--hf", str(tmp_path / "hf")],
         "not found"),
        (["--ckpt", str(ckpt), "--tokenizer", str(other.path), "--hf", str(tmp_path / "hf")],
         "another tokenizer"),
        (["--ckpt", str(ckpt), "--tokenizer", str(tok.path)], "nothing to export"),
        (["--ckpt", str(ckpt), "--tokenizer", str(tok.path), "--hf", str(ckpt / "sub")], "cannot write"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert export_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "hf").exists()
