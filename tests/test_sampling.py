"""Decoding: parity with a naive loop, each logits processor on its own and end to end, stop conditions,
seeding, and the ``minilm-sample`` command line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minilm.checkpoint import save_checkpoint
from minilm.cli import run_main, sample_main
from minilm.config import ModelConfig, SampleConfig
from minilm.errors import DataError, MinilmError
from minilm.model import GPT
from minilm.sampling import (apply_bans, generate, generate_ids, ngram_ban, recent_ban, repetition_penalty,
                             stop_window, top_k_filter, top_p_filter)


class ByteTokenizer:
    """Stand-in with minilm's tokenizer interface: one token per byte, then pad / bos / eos."""

    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("latin-1")) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("latin-1")


V = ByteTokenizer.vocab_size
EOS = ByteTokenizer.eos_id
PLAIN = SampleConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, ban_window=0,
                     no_repeat_ngram=0, min_new_tokens=0, max_new_tokens=12, stop=[], seed=0)


def sample_cfg(**kw) -> SampleConfig:
    return dataclasses.replace(PLAIN, **kw)


def tiny(seed: int = 0, **kw) -> GPT:
    base = dict(vocab_size=V, context_length=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                ffn_hidden=64, init_std=0.3)
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**base, **kw})).eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny()


def prompts_of(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def naive_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Argmax of a full forward over the whole sequence, one token at a time, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


# --------------------------------------------------------------------------------------------------
# parity


def test_greedy_equals_naive_full_forward_loop(model):
    for prompt in prompts_of([1, 5, 11]):
        out = generate_ids(model, [prompt], sample_cfg(max_new_tokens=15), eos_id=None)
        assert out == [naive_greedy(model, prompt, 15)]


def test_batched_different_lengths_equal_each_prompt_alone(model):
    prompts = prompts_of([3, 9, 1, 6], seed=1)
    cfg = sample_cfg(max_new_tokens=10)
    batched = generate_ids(model, prompts, cfg, eos_id=None)
    alone = [generate_ids(model, [p], cfg, eos_id=None)[0] for p in prompts]
    assert batched == alone
    assert generate_ids(model, prompts, cfg, eos_id=None, use_cache=False) == batched
    assert generate_ids(model, prompts, cfg, eos_id=None, pad_id=7) == batched   # padding is masked


@pytest.mark.parametrize("cfg", [sample_cfg(repetition_penalty=1.3, ban_window=3, no_repeat_ngram=2),
                                 sample_cfg(temperature=0.9, top_k=20, top_p=0.9, seed=3)],
                         ids=["greedy+processors", "sampled"])
def test_use_cache_false_gives_the_same_tokens(model, cfg):
    prompts = prompts_of([4, 8, 2], seed=2)
    cached = generate_ids(model, prompts, cfg, eos_id=None)
    assert generate_ids(model, prompts, cfg, eos_id=None, use_cache=False) == cached


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    prompts = prompts_of([5, 2], seed=4)
    greedy = generate_ids(model, prompts, PLAIN, eos_id=None)
    top_k_1 = sample_cfg(temperature=1.5, top_k=1, seed=1)
    tiny_top_p = sample_cfg(temperature=1.5, top_p=1e-6, seed=2)
    assert generate_ids(model, prompts, top_k_1, eos_id=None) == greedy
    assert generate_ids(model, prompts, tiny_top_p, eos_id=None) == greedy


def test_seed_reproducible_and_different_seeds_differ(model):
    prompts = prompts_of([3, 6], seed=5)
    cfg = sample_cfg(temperature=1.0, max_new_tokens=20, seed=11)
    a = generate_ids(model, prompts, cfg, eos_id=None)
    assert generate_ids(model, prompts, cfg, eos_id=None) == a
    assert generate_ids(model, prompts, dataclasses.replace(cfg, seed=12), eos_id=None) != a


def test_generation_leaves_training_mode_alone():
    m = tiny(dropout=0.5).train()
    cfg = sample_cfg(max_new_tokens=6)
    out = generate_ids(m, [[1, 2, 3]], cfg, eos_id=None)
    assert m.training
    assert generate_ids(m, [[1, 2, 3]], cfg, eos_id=None) == out     # dropout was off while decoding


# --------------------------------------------------------------------------------------------------
# processors on their own


def test_repetition_penalty_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    tokens = torch.tensor([[0, 1, 4, 4]])
    valid = torch.tensor([[True, True, False, True]])    # token 4 padding once, real once
    out = repetition_penalty(logits, tokens, valid, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0, 0.25]]))
    probs_before, probs_after = logits.softmax(-1), out.softmax(-1)
    assert (out[0, [0, 1, 4]] < logits[0, [0, 1, 4]]).all()
    assert probs_after[0, [0, 1, 4]].sum() < probs_before[0, [0, 1, 4]].sum()
    assert (probs_after[0, [2, 3]] > probs_before[0, [2, 3]]).all()
    assert repetition_penalty(logits, tokens, valid, 1.0) is logits


def test_padding_does_not_count_as_seen():
    logits = torch.ones(1, 4)
    out = repetition_penalty(logits, torch.tensor([[3, 3, 1]]), torch.tensor([[False, False, True]]), 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.5, 1.0, 1.0]]))


def test_recent_ban_covers_last_window_only():
    tokens = torch.tensor([[5, 1, 2, 3], [0, 0, 4, 2]])
    valid = torch.tensor([[True] * 4, [False, False, True, True]])
    ban = recent_ban(tokens, valid, 3, 6)
    assert ban[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert ban[1].nonzero().flatten().tolist() == [2, 4]          # padding token 0 not banned


def test_ngram_ban():
    #          a  b  c  a  b   -> "a b" was followed by c: ban c; (n=2) "b" was followed by c: ban c
    tokens = torch.tensor([[1, 2, 3, 1, 2]])
    valid = torch.ones_like(tokens, dtype=torch.bool)
    assert ngram_ban(tokens, valid, 3, 5)[0].nonzero().flatten().tolist() == [3]
    assert ngram_ban(tokens, valid, 2, 5)[0].nonzero().flatten().tolist() == [3]
    assert ngram_ban(tokens, valid, 1, 5)[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert not ngram_ban(tokens, valid, 6, 5).any()
    # an n-gram reaching into padding does not count
    padded = torch.tensor([[2, 3, 7, 2]])
    assert not ngram_ban(padded, torch.tensor([[False, True, True, True]]), 2, 8).any()


def test_apply_bans_never_bans_a_whole_row():
    logits = torch.zeros(2, 3)
    ban = torch.tensor([[True, False, True], [True, True, True]])
    out = apply_bans(logits, ban)
    assert torch.isinf(out[0, [0, 2]]).all() and out[0, 1] == 0
    assert torch.equal(out[1], logits[1])


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(top_k_filter(logits, 2)).flatten().tolist() == [True, True, False, False, False]
    assert top_k_filter(logits, 0) is logits
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).sum().item()  # noqa: E731
    assert kept(0.5) == 1          # the top token alone reaches 0.5
    assert kept(0.6) == 2
    assert kept(0.84) == 3
    assert kept(0.9) == 4
    assert kept(1e-9) == 1
    assert top_p_filter(logits, 1.0) is logits


# --------------------------------------------------------------------------------------------------
# controls end to end


def test_ban_window_really_bans(model):
    prompt = prompts_of([6], seed=6)[0]
    for cfg in (sample_cfg(ban_window=4, max_new_tokens=30),
                sample_cfg(ban_window=4, max_new_tokens=30, temperature=1.0, seed=5)):
        row = prompt + generate_ids(model, [prompt], cfg, eos_id=None)[0]
        for i in range(len(prompt), len(row)):
            assert row[i] not in row[max(0, i - 4):i]


def test_unbanned_greedy_model_does_repeat(model):
    # the bans above are not vacuous: the same model repeats itself without them
    row = generate_ids(model, [[1, 2, 3]], sample_cfg(max_new_tokens=30), eos_id=None)[0]
    assert len(set(row)) < len(row)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(model, n):
    prompt = [10, 20, 30, 40]
    row = prompt + generate_ids(model, [prompt], sample_cfg(no_repeat_ngram=n, max_new_tokens=40),
                                eos_id=None)[0]
    assert len(row) == 44
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    assert len(grams) == len(set(grams))


def eos_model() -> GPT:
    """A model whose eos logit wins at every position: the final norm outputs a constant vector and
    only the eos row of the (untied) head points along it."""
    m = tiny(norm="layernorm", bias=True, tie_embeddings=False)
    with torch.no_grad():
        m.model.norm.weight.zero_()
        m.model.norm.bias.fill_(1.0)
        m.lm_head.weight.zero_()
        m.lm_head.weight[EOS] = 1.0
        m.lm_head.weight[65] = 0.5          # runner-up: 'A'
    return m


def test_eos_stops_and_is_not_returned():
    m = eos_model()
    out = generate_ids(m, [[1, 2], [3]], sample_cfg(), eos_id=EOS)
    assert out == [[], []]


def test_min_new_tokens_bans_eos_until_reached():
    m = eos_model()
    assert generate_ids(m, [[1, 2], [3]], sample_cfg(min_new_tokens=5), eos_id=EOS) == [[65] * 5] * 2
    cfg = sample_cfg(min_new_tokens=3, temperature=1.0, seed=0, max_new_tokens=20)
    for row in generate_ids(m, [[1]] * 4, cfg, eos_id=EOS):
        assert len(row) == 3 and EOS not in row


def test_eos_of_one_row_freezes_only_that_row(model):
    prompts = prompts_of([4, 7], seed=8)
    free = generate_ids(model, prompts, sample_cfg(max_new_tokens=10), eos_id=None)
    eos = free[0][3]                       # pretend row 0's fourth token is eos
    out = generate_ids(model, prompts, sample_cfg(max_new_tokens=10), eos_id=eos)
    assert out[0] == free[0][:free[0].index(eos)]
    row1 = free[1][:free[1].index(eos)] if eos in free[1] else free[1]
    assert out[1] == row1


def test_max_new_tokens_respected(model):
    for n in (1, 7):
        out = generate_ids(model, prompts_of([2, 5]), sample_cfg(max_new_tokens=n, temperature=1.0),
                           eos_id=None)
        assert [len(r) for r in out] == [n, n]


def test_long_prompt_keeps_its_last_tokens(model):
    long = prompts_of([100], seed=9)[0]                  # context_length is 64
    cfg = sample_cfg(max_new_tokens=20)
    with pytest.warns(UserWarning, match="last 44 tokens"):
        out = generate_ids(model, [long], cfg, eos_id=None)
    assert out == generate_ids(model, [long[-44:]], cfg, eos_id=None)
    assert len(out[0]) == 20


def test_empty_prompt_is_an_error(model):
    with pytest.raises(DataError, match="no tokens"):
        generate_ids(model, [[1], []], PLAIN, eos_id=None)


def test_stop_strings_cut_the_text(model):
    tok = ByteTokenizer()
    free = generate(model, tok, ["hello", "hi"], sample_cfg(max_new_tokens=16))
    stop = free[0][5:7]
    text = generate(model, tok, ["hello", "hi"], sample_cfg(max_new_tokens=16, stop=[stop]))
    assert text[0] == free[0][:free[0].find(stop)]
    assert text[1] == (free[1][:free[1].find(stop)] if stop in free[1] else free[1])
    ids = generate_ids(model, [tok.encode("hello", bos=True)], sample_cfg(max_new_tokens=16, stop=[stop]),
                       eos_id=None, decode=tok.decode)
    assert tok.decode(ids[0]) == text[0]


def test_stop_string_inside_a_token_cuts_ids_before_that_token(model):
    prompt = [1, 2, 3]
    free = generate_ids(model, [prompt], sample_cfg(max_new_tokens=12), eos_id=None)[0]
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731  (one token = several characters)
    stop = f"{free[4]}><{free[5]}"                          # starts inside token 4, ends inside token 5
    cfg = sample_cfg(max_new_tokens=12, stop=[stop])
    assert generate_ids(model, [prompt], cfg, eos_id=None, decode=decode) == [free[:4]]


def test_stop_string_late_in_a_long_answer_is_found_reading_only_the_new_tokens(model):
    """Each step decodes only the last stop_window tokens, yet a stop string completed 40+ tokens into
    the answer ends the row exactly where a search of the whole text would."""
    tok = ByteTokenizer()
    prompt = tok.encode("hello", bos=True)
    free = generate_ids(model, [prompt], sample_cfg(max_new_tokens=56), eos_id=None)[0]
    text = tok.decode(free)
    stop = next(text[i:i + 2] for i in range(40, 52) if text.find(text[i:i + 2]) == i)  # first seen late
    seen: list[int] = []

    def decode(ids: list[int]) -> str:
        seen.append(len(ids))
        return tok.decode(ids)

    ids = generate_ids(model, [prompt], sample_cfg(max_new_tokens=56, stop=[stop]), eos_id=None, decode=decode)
    assert tok.decode(ids[0]) == text[:text.find(stop)]
    steps = text.find(stop) + len(stop)            # one byte a token: the step that completed the stop
    assert seen[:steps] == [min(n, stop_window([stop])) for n in range(1, steps + 1)]
    assert stop_window([stop]) == len(stop.encode()) + 8


def test_stop_strings_need_decode(model):
    with pytest.raises(ValueError, match="decode"):
        generate_ids(model, [[1]], sample_cfg(stop=["x"]), eos_id=None)


def test_generate_with_bos_and_without(model):
    tok = ByteTokenizer()
    cfg = sample_cfg(max_new_tokens=8)
    with_bos = generate(model, tok, ["abc"], cfg)[0]
    assert with_bos == tok.decode(generate_ids(model, [tok.encode("abc", bos=True)], cfg, eos_id=EOS)[0])
    no_bos = generate(model, tok, ["abc"], cfg, bos=False)[0]
    assert no_bos == tok.decode(generate_ids(model, [tok.encode("abc")], cfg, eos_id=EOS)[0])


# --------------------------------------------------------------------------------------------------
# command line


def test_run_main_exit_codes(capsys):
    def fails(argv):
        raise DataError("data.csv is empty; add rows")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_main(fails, []) == 2
    assert capsys.readouterr().err == "error: data.csv is empty; add rows\n"
    assert run_main(interrupted, []) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert run_main(lambda argv: None, []) == 0
    assert run_main(lambda argv: 3, []) == 3
    assert MinilmError.exit_code == 2


def test_out_of_memory_is_one_line_that_says_what_to_lower(capsys):
    def cuda_oom(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)\n"
                                     "more detail")

    def host_oom(argv):
        torch.empty(1 << 62, dtype=torch.uint8)       # the CPU allocator refuses 4 EiB

    for main in (cuda_oom, host_oom):
        assert run_main(main, []) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: out of memory (")
        assert "lower batch_size and raise grad_accum" in err
    with pytest.raises(RuntimeError, match="something else"):     # other errors are not swallowed
        run_main(lambda argv: (_ for _ in ()).throw(RuntimeError("something else")), [])


def test_sample_help_exits_zero(capsys):
    assert sample_main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--ckpt", "--tokenizer", "--prompt-file", "--temperature", "--top-k", "--top-p",
                 "--repetition-penalty", "--ban-window", "--no-repeat-ngram", "--min-new-tokens",
                 "--max-new-tokens", "--stop", "--seed", "--device", "--ema", "--no-bos"):
        assert flag in out


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    rc = sample_main(["--ckpt", str(tmp_path / "none.safetensors"), "--tokenizer", str(tmp_path / "t"),
                      "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "not found" in err


@pytest.mark.parametrize("extra, words", [([], "no prompt given"),
                                          (["--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
                                          (["--prompt", "x", "--min-new-tokens", "9", "--max-new-tokens",
                                            "3"], "min_new_tokens (9) must not exceed"),
                                          (["--prompt-file", "nope.txt"], "prompt file")])
def test_bad_command_lines_are_one_line_errors(tmp_path, capsys, extra, words):
    rc = sample_main(["--ckpt", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "t"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and words in err


def _char_checkpoint(tmp_path):
    """A char tokenizer on a few lines of text and a tiny model saved for it: (tokenizer path, tokenizer,
    model, checkpoint path)."""
    import minilm.tokenizer as tokmod     # minilm's own module: an import failure is a failure, not a skip
    from minilm.config import TokenizerConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\nthe quick brown fox\njumps over the lazy dog\n", encoding="utf-8")
    tok_path = tmp_path / "tokenizer.json"
    tokmod.build_char_tokenizer(corpus, tok_path, TokenizerConfig(kind="char"))
    tok = tokmod.load_tokenizer(tok_path)
    model = tiny(vocab_size=tok.vocab_size)
    return tok_path, tok, model, save_checkpoint(tmp_path / "model.safetensors", model)


def naive_greedy_text(model, tok, prompt: str, max_new: int, min_new: int = 0) -> str:
    """:func:`naive_greedy` for text, with EOS: an independent decoder (no cache, a full forward over the
    whole sequence for every token, argmax), EOS not allowed before ``min_new`` tokens and the end after."""
    ids = tok.encode(prompt, bos=True, eos=False)
    new: list[int] = []
    with torch.no_grad():
        for i in range(max_new):
            logits = model(torch.tensor([ids + new]))[0, -1].float()
            if i < min_new:
                logits[tok.eos_id] = float("-inf")
            nxt = int(logits.argmax())
            if nxt == tok.eos_id:
                break
            new.append(nxt)
    return tok.decode(new)


CLI_PLAIN = ["--temperature", "0", "--repetition-penalty", "1", "--ban-window", "0", "--device", "cpu"]


def test_sample_main_end_to_end(tmp_path, capsys):
    tok_path, tok, model, ckpt = _char_checkpoint(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the fox\n\nhello\n", encoding="utf-8")
    argv = ["--ckpt", str(ckpt), "--tokenizer", str(tok_path), "--prompt", "dog", "--prompt-file",
            str(prompts), "--max-new-tokens", "6", "--min-new-tokens", "2", *CLI_PLAIN,
            "--precision", "fp32"]
    assert sample_main(argv) == 0
    out = capsys.readouterr().out
    blocks = out[:-1].split("\n\n---\n\n")        # each completion, then a blank line, ---, a blank line
    assert len(blocks) == 3
    for block, prompt in zip(blocks, ["dog", "the fox", "hello"]):   # batched, left-padded, cached decoding
        assert block == prompt + naive_greedy_text(model, tok, prompt, 6, min_new=2), (block, prompt)

    other = tiny(vocab_size=tok.vocab_size + 3)
    save_checkpoint(tmp_path / "other.safetensors", other)
    assert sample_main(["--ckpt", str(tmp_path / "other.safetensors"), "--tokenizer", str(tok_path),
                        "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokens but the model" in err


def test_sample_main_bf16_decodes_with_bf16_weights(tmp_path, capsys):
    tok_path, tok, model, ckpt = _char_checkpoint(tmp_path)
    argv = ["--ckpt", str(ckpt), "--tokenizer", str(tok_path), "--prompt", "the", "--max-new-tokens", "8",
            "--min-new-tokens", "8", *CLI_PLAIN, "--precision", "bf16"]
    assert sample_main(argv) == 0
    out = capsys.readouterr().out
    bf16 = naive_greedy_text(model.to(torch.bfloat16), tok, "the", 8, min_new=8)
    assert out == "the" + bf16 + "\n"


def test_inference_dtype():
    from minilm.errors import ConfigError
    from minilm.precision import cpu_supports_bf16, inference_dtype

    cpu = torch.device("cpu")
    assert inference_dtype("fp32", cpu) == torch.float32
    assert inference_dtype("bf16", cpu) == torch.bfloat16
    assert inference_dtype("auto", cpu) == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        inference_dtype("fp16", cpu)
    with pytest.raises(ConfigError, match="unknown precision"):
        inference_dtype("int4", cpu)
