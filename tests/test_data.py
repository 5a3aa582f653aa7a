"""Corpus encoding (streamed, split by bytes, atomic) and window sampling for training."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from minilm.config import TokenizerConfig
from minilm.data import LMBatches, encode_corpus, load_tokens, read_meta, token_dtype
from minilm.errors import DataError
from minilm.tokenizer import build_char_tokenizer, train_sentencepiece


@pytest.fixture
def char_tok(stdlib_text, tmp_path):
    return build_char_tokenizer(stdlib_text, tmp_path / "char.json", TokenizerConfig(kind="char"))


@pytest.fixture
def unigram_tok(stdlib_text, tmp_path):
    cfg = TokenizerConfig(model_type="unigram", vocab_size=600, special_tokens=["### Response:"])
    return train_sentencepiece(stdlib_text, tmp_path / "sp.model", cfg)


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_token_dtype_choice():
    assert token_dtype(256) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(200_000) == np.uint32


def test_encode_corpus_meta_split_and_tokens(stdlib_text, char_tok, tmp_path):
    out = tmp_path / "data"
    meta = encode_corpus(stdlib_text, char_tok, out, val_fraction=0.1, progress=False)
    raw = stdlib_text.read_bytes()
    assert read_meta(out) == meta
    assert meta["format"] == "minilm-tokens" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == char_tok.vocab_size and meta["val_fraction"] == 0.1
    assert meta["tokenizer_hash"] == char_tok.hash
    assert meta["source_sha256"] == hashlib.sha256(raw).hexdigest()

    # the split: train ends at the end of the line holding byte 90% - 1
    split = meta["bytes"]["train"]
    target = round(len(raw) * 0.9)
    assert meta["bytes"]["val"] == len(raw) - split
    assert raw[split - 1:split] == b"\n" and split >= target
    assert b"\n" not in raw[target - 1:split - 1]

    train_text, val_text = raw[:split].decode(), raw[split:].decode()
    train, val = load_tokens(out / "train.bin"), load_tokens(out / "val.bin")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and not train.flags.writeable
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    assert train.tolist() == char_tok.encode(train_text)
    assert val.tolist() == char_tok.encode(val_text)
    assert char_tok.decode(train.tolist()) + char_tok.decode(val.tolist()) == raw.decode()


@pytest.mark.parametrize("tok_name", ["char_tok", "unigram_tok"])
def test_chunk_size_does_not_change_tokens(tok_name, stdlib_text, tmp_path, request):
    tok = request.getfixturevalue(tok_name)
    small = encode_corpus(stdlib_text, tok, tmp_path / "small", val_fraction=0.2, chunk_bytes=97,
                          progress=False)
    big = encode_corpus(stdlib_text, tok, tmp_path / "big", val_fraction=0.2, progress=False)
    assert small == big
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes()
    # tokens are those of encoding each line of each part
    raw = stdlib_text.read_bytes()
    val_text = raw[big["bytes"]["train"]:].decode()
    expected = [i for ids in tok.encode_batch(_lines(val_text)) for i in ids]
    assert load_tokens(tmp_path / "big" / "val.bin").tolist() == expected


def test_long_lines_and_no_final_newline(char_tok, tmp_path):
    text = "x" * 5000 + "\n" + "short line\n" + "y" * 3000  # lines far longer than the chunk
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    meta = encode_corpus(path, char_tok, tmp_path / "d", val_fraction=0.5, chunk_bytes=64, progress=False)
    assert meta["bytes"] == {"train": 5001, "val": 11 + 3000}  # byte 4005 lies in the first line
    # byte 90% lies in the last line: the cut falls back to the line boundary before it
    meta = encode_corpus(path, char_tok, tmp_path / "d", val_fraction=0.1, chunk_bytes=64, progress=False)
    assert meta["bytes"] == {"train": 5001 + 11, "val": 3000}
    both = np.concatenate([load_tokens(tmp_path / "d" / f"{s}.bin") for s in ("train", "val")])
    assert char_tok.decode(both.tolist()) == text


def _bad_utf8_corpus(tmp_path, stdlib_text):
    lines = stdlib_text.read_bytes().splitlines(keepends=True)
    bad_line = len(lines) - 20  # inside the validation part
    lines[bad_line - 1] = b"bad \xff byte\n"
    raw = b"".join(lines)
    path = tmp_path / "bad.txt"
    path.write_bytes(raw)
    return path, raw, bad_line


def test_invalid_utf8_is_an_error_naming_offset_and_fix(stdlib_text, char_tok, tmp_path):
    path, raw, bad_line = _bad_utf8_corpus(tmp_path, stdlib_text)
    offset = raw.index(b"\xff")
    for chunk in (1 << 20, 333):
        with pytest.raises(DataError) as err:
            encode_corpus(path, char_tok, tmp_path / "out", val_fraction=0.1, chunk_bytes=chunk,
                          progress=False)
        msg = _one_line(err)
        assert f"byte {offset} " in msg and f"line {bad_line})" in msg
        assert "invalid_utf8: replace" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_invalid_utf8_replace_policy(stdlib_text, tmp_path):
    path, raw, _ = _bad_utf8_corpus(tmp_path, stdlib_text)
    tok = build_char_tokenizer(path, tmp_path / "c.json", TokenizerConfig(kind="char"))
    assert tok.token_id("\ufffd") is not None
    meta = encode_corpus(path, tok, tmp_path / "out", val_fraction=0.1, invalid_utf8="replace",
                         progress=False)
    val = load_tokens(tmp_path / "out" / "val.bin")
    assert tok.decode(val.tolist()) == raw[meta["bytes"]["train"]:].decode("utf-8", errors="replace")


def test_failed_encode_leaves_previous_outputs(stdlib_text, char_tok, tmp_path):
    out = tmp_path / "out"
    encode_corpus(stdlib_text, char_tok, out, val_fraction=0.1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    path, _, _ = _bad_utf8_corpus(tmp_path, stdlib_text)
    with pytest.raises(DataError):
        encode_corpus(path, char_tok, out, val_fraction=0.1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files either


def test_corpus_errors(char_tok, tmp_path):
    with pytest.raises(DataError) as err:
        encode_corpus(tmp_path / "missing.txt", char_tok, tmp_path / "o", val_fraction=0.1)
    assert "not found" in _one_line(err)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError) as err:
        encode_corpus(tmp_path / "empty.txt", char_tok, tmp_path / "o", val_fraction=0.1)
    assert "empty" in _one_line(err)
    (tmp_path / "one.txt").write_text("a single line without a break", encoding="utf-8")
    with pytest.raises(DataError) as err:
        encode_corpus(tmp_path / "one.txt", char_tok, tmp_path / "o", val_fraction=0.1)
    assert "validation split would be empty" in _one_line(err)


def test_load_tokens_errors(stdlib_text, char_tok, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        load_tokens(out / "train.bin")
    assert "meta.json not found" in _one_line(err)
    encode_corpus(stdlib_text, char_tok, out, val_fraction=0.1, progress=False)
    data = (out / "val.bin").read_bytes()
    (out / "val.bin").write_bytes(data[:-2])
    with pytest.raises(DataError) as err:
        load_tokens(out / "val.bin")
    assert "truncated" in _one_line(err)
    (out / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_meta(out)
    assert "corrupt" in _one_line(err)


# --------------------------------------------------------------------------------------------------
# batches


@pytest.fixture
def counting_tokens(tmp_path):
    """A memmap of 0..N-1, so each window's start is its first value."""
    path = tmp_path / "tokens.bin"
    np.arange(5000, dtype=np.uint32).tofile(path)
    return np.memmap(path, dtype=np.uint32, mode="r")


def test_batches_are_windows_shifted_by_one(counting_tokens):
    B, T = 8, 32
    x, y = LMBatches(counting_tokens, B, T, seed=1).batch(step=3)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    starts = x[:, :1]
    assert torch.equal(x, starts + torch.arange(T))  # contiguous runs of the source
    assert torch.equal(y, x + 1)
    assert starts.min() >= 0 and (starts + T).max() <= len(counting_tokens) - 1


def test_batches_depend_only_on_seed_step_micro(counting_tokens):
    a, b = LMBatches(counting_tokens, 4, 16, seed=7), LMBatches(counting_tokens, 4, 16, seed=7)
    for step, micro in [(0, 0), (5, 1), (123, 3)]:
        xa, ya = a.batch(step, micro)
        xb, yb = b.batch(step, micro)  # a fresh instance, as after a resume
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x0 = a.batch(5, 0)[0]
    assert not torch.equal(x0, a.batch(6, 0)[0])
    assert not torch.equal(x0, a.batch(5, 1)[0])
    assert not torch.equal(x0, LMBatches(counting_tokens, 4, 16, seed=8).batch(5, 0)[0])


def test_eval_batches_are_fixed(counting_tokens):
    data = LMBatches(counting_tokens, 4, 16, seed=7)
    first, again = data.eval_batches(3), LMBatches(counting_tokens, 4, 16, seed=99).eval_batches(3)
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][0], first[1][0])
    assert not torch.equal(first[0][0], data.eval_batches(3, seed=1)[0][0])


def test_batches_on_encoded_memmap(stdlib_text, char_tok, tmp_path):
    encode_corpus(stdlib_text, char_tok, tmp_path / "d", val_fraction=0.1, progress=False)
    tokens = load_tokens(tmp_path / "d" / "train.bin")
    x, y = LMBatches(tokens, 4, 64, seed=0).batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < char_tok.vocab_size


def test_too_few_tokens_for_a_window(counting_tokens):
    with pytest.raises(DataError) as err:
        LMBatches(counting_tokens[:100], 2, 100, seed=0)
    msg = _one_line(err)
    assert "100 tokens" in msg and "101" in msg and "model.context_length" in msg
    x, y = LMBatches(counting_tokens[:101], 2, 100, seed=0).batch(0)  # exactly one window fits
    assert torch.equal(x[0], torch.arange(100)) and torch.equal(x[0], x[1])


def test_off_a_terminal_encode_progress_is_a_plain_line_now_and_then(stdlib_text, char_tok, tmp_path, capfd):
    encode_corpus(stdlib_text, char_tok, tmp_path / "enc", val_fraction=0.1, chunk_bytes=1 << 14)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("encode: ")]
    assert "\r" not in err and 2 <= len(lines) <= 12, err
    total = stdlib_text.stat().st_size / 1e6
    assert lines[-1] == f"encode: {total:.1f} of {total:.1f} MB"
    encode_corpus(stdlib_text, char_tok, tmp_path / "quiet", val_fraction=0.1, progress=False)
    assert "encode" not in capfd.readouterr().err
