"""Tokenizers: lossless round trips, special tokens, save/load parity and one-line errors."""

from __future__ import annotations

import hashlib
import json

import pytest

from minilm.config import TokenizerConfig
from minilm.errors import CheckpointError, ConfigError, DataError
from minilm.tokenizer import (CharTokenizer, SentencePieceTokenizer, build_char_tokenizer, load_tokenizer,
                              train_sentencepiece, train_tokenizer)

SPECIALS = ["### Instruction:", "### Response:"]
UNICODE = [
    "naïve café — 日本語 ✓ emoji 🙂",
    "two  spaces,   three, trailing   ",
    "   leading spaces\n\n\nblank lines\n",
    "tabs\tand\r\nwindows line ends\t\n",
    "\n",
    "",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    text = text[: text.rfind("\n", 0, 200_000) + 1]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sp(request, corpus, tmp_path_factory):
    cfg = TokenizerConfig(model_type=request.param, vocab_size=800, special_tokens=SPECIALS)
    return train_sentencepiece(corpus[0], tmp_path_factory.mktemp("tok") / "sp.model", cfg)


@pytest.fixture(scope="module")
def char(corpus, tmp_path_factory):
    cfg = TokenizerConfig(kind="char", special_tokens=["##", *SPECIALS])
    return build_char_tokenizer(corpus[0], tmp_path_factory.mktemp("tok") / "char.json", cfg)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------------
# SentencePiece


def test_sp_ids_and_vocab(sp):
    assert isinstance(sp, SentencePieceTokenizer) and sp.kind == "sentencepiece"
    assert (sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id) == (0, 1, 2, 3)
    assert sp.vocab_size == 800


def test_sp_round_trips_the_corpus(sp, corpus):
    text = corpus[1]
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert len(ids) < len(text) / 2  # it learned real merges, not characters


@pytest.mark.parametrize("text", UNICODE)
def test_sp_round_trips_unicode_and_whitespace(sp, text):
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert sp.unk_id not in ids  # byte fallback covers unseen characters


def test_sp_special_tokens_are_single_ids(sp):
    for piece in [*SPECIALS, "\n"]:
        i = sp.token_id(piece)
        assert i is not None and i not in (sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id)
        assert sp.encode(piece) == [i]
    text = "### Instruction:\nSay hi.\n### Response:\nhi"
    ids = sp.encode(text)
    assert ids.count(sp.token_id("### Response:")) == 1
    assert sp.decode(ids) == text
    assert sp.token_id("certainly-not-a-piece") is None
    assert sp.token_id("<unk>") == sp.unk_id


def test_sp_bos_eos_framing_and_decode_skips_them(sp):
    text = "The assert statement."
    ids = sp.encode(text)
    assert sp.encode(text, bos=True, eos=True) == [sp.bos_id, *ids, sp.eos_id]
    assert sp.decode([sp.bos_id, *ids, sp.eos_id, sp.pad_id, sp.pad_id]) == text


def test_sp_encode_batch_matches_encode(sp, corpus):
    lines = corpus[1].splitlines(keepends=True)[:300]
    assert sp.encode_batch(lines) == [sp.encode(line) for line in lines]


def test_sp_save_load_parity(sp, corpus):
    loaded = load_tokenizer(sp.path)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.hash == sp.hash == hashlib.sha256(sp.path.read_bytes()).hexdigest()
    sample = corpus[1][:20_000] + UNICODE[0]
    assert loaded.encode(sample) == sp.encode(sample)


def test_sp_training_is_deterministic(corpus, tmp_path):
    cfg = TokenizerConfig(model_type="bpe", vocab_size=500)
    a = train_sentencepiece(corpus[0], tmp_path / "a.model", cfg)
    b = train_tokenizer(corpus[0], tmp_path / "b.model", cfg)
    assert a.hash == b.hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no temp files left


def test_sp_without_byte_fallback_still_keeps_newlines(corpus, tmp_path):
    cfg = TokenizerConfig(model_type="unigram", vocab_size=500, byte_fallback=False)
    tok = train_sentencepiece(corpus[0], tmp_path / "t.model", cfg)
    text = "The  assert\n\nstatement\n"
    assert tok.decode(tok.encode(text)) == text


def test_sp_vocab_too_high_is_one_line_data_error(corpus, tmp_path):
    out = tmp_path / "big.model"
    with pytest.raises(DataError) as err:
        train_sentencepiece(corpus[0], out, TokenizerConfig(vocab_size=200_000))
    msg = _one_line(err)
    assert "too high" in msg and "lower tokenizer.vocab_size to <=" in msg
    limit = int(msg.split("<= ")[1].split()[0])
    assert 1000 < limit < 200_000
    assert not out.exists()


def test_sp_vocab_too_small_is_one_line_data_error(corpus, tmp_path):
    with pytest.raises(DataError) as err:
        train_sentencepiece(corpus[0], tmp_path / "t.model", TokenizerConfig(vocab_size=100))
    assert "raise tokenizer.vocab_size" in _one_line(err)


@pytest.mark.parametrize("tokens, clash", [(["<s>"], "['<s>']"), (["### Response:", "</s>", "<pad>"], "['</s>', '<pad>']")])
def test_sp_reserved_special_token_is_config_error(corpus, tmp_path, tokens, clash):
    with pytest.raises(ConfigError) as err:
        train_sentencepiece(corpus[0], tmp_path / "t.model", TokenizerConfig(special_tokens=tokens))
    msg = _one_line(err)
    assert f"tokenizer.special_tokens {clash} clash with SentencePiece's own pieces" in msg
    assert "choose other strings" in msg and not (tmp_path / "t.model").exists()


@pytest.mark.parametrize("kind", ["sentencepiece", "char"])
def test_missing_or_empty_training_text(kind, tmp_path):
    cfg = TokenizerConfig(kind=kind)
    with pytest.raises(DataError) as err:
        train_tokenizer(tmp_path / "nope.txt", tmp_path / "tok", cfg)
    assert "not found" in _one_line(err)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError) as err:
        train_tokenizer(tmp_path / "empty.txt", tmp_path / "tok", cfg)
    assert "empty" in _one_line(err)


# --------------------------------------------------------------------------------------------------
# characters


def test_char_vocab_layout(char, corpus):
    assert isinstance(char, CharTokenizer) and char.kind == "char"
    assert (char.pad_id, char.unk_id, char.bos_id, char.eos_id) == (0, 1, 2, 3)
    assert char.vocab_size == 4 + 3 + len(set(corpus[1]))
    doc = json.loads(char.path.read_text(encoding="utf-8"))
    assert doc["format"] == "minilm-char-tokenizer" and doc["version"] == 1
    assert doc["pieces"][4:7] == ["##", *SPECIALS]


def test_char_round_trip_and_specials(char, corpus):
    text = corpus[1]
    assert char.decode(char.encode(text)) == text
    assert char.encode("ab") == [char.token_id("a"), char.token_id("b")]
    # specials are whole strings, longest first: "### Response:" is one id, not "##" + ...
    text = "### Response:\nok ## x"
    ids = char.encode(text)
    assert ids[0] == char.token_id("### Response:")
    assert ids.count(char.token_id("##")) == 1
    assert char.decode(ids) == text
    assert char.decode([char.bos_id, *ids, char.eos_id, char.pad_id]) == text
    assert char.encode(text, bos=True, eos=True) == [char.bos_id, *ids, char.eos_id]
    assert char.encode_batch(["ab", text]) == [char.encode("ab"), ids]


def test_char_unicode_and_unseen_characters(tmp_path):
    text = "".join(UNICODE)
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    tok = build_char_tokenizer(tmp_path / "u.txt", tmp_path / "u.json", TokenizerConfig(kind="char"))
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("日Ω") == [tok.token_id("日"), tok.unk_id]
    assert tok.decode(tok.encode("日Ω")) == "日\ufffd"


def test_char_streams_large_files_like_small(tmp_path):
    # multi-byte characters straddle the 1 MiB read blocks
    text = ("é日🙂x\n" * 120_000)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    tok = build_char_tokenizer(tmp_path / "t.txt", tmp_path / "t.json", TokenizerConfig(kind="char"))
    assert tok.vocab_size == 4 + 5
    assert tok.unk_id not in tok.encode(text)


def test_char_save_load_parity(char, corpus):
    loaded = load_tokenizer(char.path)
    assert isinstance(loaded, CharTokenizer)
    assert loaded.hash == char.hash == hashlib.sha256(char.path.read_bytes()).hexdigest()
    sample = corpus[1][:5000] + "### Response:"
    assert loaded.encode(sample) == char.encode(sample)


# --------------------------------------------------------------------------------------------------
# loading errors


@pytest.mark.parametrize("content", [
    b"",
    b"\x00\x01garbage that is not a model",
    b'{"format": "something-else"}',
    b'{"format": "minilm-char-tokenizer", "version": 1, "pieces": ["a"]',
    b'{"format": "minilm-char-tokenizer", "version": 1, "pieces": ["x", "y"], "special_tokens": []}',
    b'{"format": "minilm-char-tokenizer", "version": 99, "pieces": [], "special_tokens": []}',
])
def test_corrupt_tokenizer_file_is_checkpoint_error(content, tmp_path):
    path = tmp_path / "tok"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(path)
    assert str(path) in _one_line(err)


def test_truncated_or_missing_sentencepiece_model(sp, tmp_path):
    path = tmp_path / "half.model"
    path.write_bytes(sp.path.read_bytes()[: sp.path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(path)
    assert _one_line(err) == (f"{path} is not a valid SentencePiece model (could not parse it); rerun the "
                              "tokenizer stage to rebuild it")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path / "missing.model")
    assert _one_line(err).startswith(f"tokenizer file {tmp_path / 'missing.model'} not found; run the "
                                     "tokenizer stage first")
