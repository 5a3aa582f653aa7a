"""Encoding in worker processes (``encode.workers``): the token files are byte-identical to the serial
encoder's for any worker count and tokenizer kind, errors read the same, memory is bounded by chunks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

from minilm.config import TokenizerConfig
from minilm.data import encode_corpus
from minilm.encoding import OK, WorkerPool, encode_lines, resolve_workers, split_lines
from minilm.errors import CheckpointError, ConfigError, DataError
from minilm.tokenizer import Tokenizer, build_char_tokenizer, train_sentencepiece

FILES = ("train.bin", "val.bin", "meta.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~200 KB of real text plus lines the encoder must keep apart: blank, \\r, U+2028, a special token,
    a line longer than a chunk, and no final newline."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    text = text[: text.rfind("\n", 0, 200_000) + 1]
    extra = "\n\nline\rwith\x0cbreaks\u2028inside\n### Response: yes\n" + "long " * 3000 + "\nno newline"
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text + extra, encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["bpe", "unigram", "char"])
def tok(request, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tok-{request.param}")
    if request.param == "char":
        cfg = TokenizerConfig(kind="char", special_tokens=["### Response:"])
        return build_char_tokenizer(corpus, out / "char.json", cfg)
    cfg = TokenizerConfig(model_type=request.param, vocab_size=500, special_tokens=["### Response:"])
    return train_sentencepiece(corpus, out / "sp.model", cfg)


def _digests(directory) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


def test_output_is_byte_identical_for_any_worker_count(corpus, tok, tmp_path):
    serial = encode_corpus(corpus, tok, tmp_path / "w1", val_fraction=0.1, chunk_bytes=8192,
                           progress=False, workers=1)
    expected = _digests(tmp_path / "w1")
    for workers, chunk in ((2, 8192), (3, 5000), (2, 1 << 20), (0, 4096)):
        out = tmp_path / f"w{workers}-{chunk}"
        meta = encode_corpus(corpus, tok, out, val_fraction=0.1, chunk_bytes=chunk, progress=False,
                             workers=workers)
        assert meta == serial and _digests(out) == expected, (workers, chunk)


def test_chunks_are_encoded_line_by_line():
    # the pool and the serial path share split_lines: only "\n" ends a line
    assert split_lines("a\rb\u2028c\nd\n\ne") == ["a\rb\u2028c\n", "d\n", "\n", "e"]
    assert split_lines("x\n") == ["x\n"]


def _bad_corpus(corpus, tmp_path):
    raw = corpus.read_bytes().splitlines(keepends=True)
    bad_line = len(raw) - 30                   # in the validation split
    raw[bad_line - 1] = b"bad \xff byte\n"
    path = tmp_path / "bad.txt"
    path.write_bytes(b"".join(raw))
    return path, b"".join(raw).index(b"\xff"), bad_line


def test_invalid_utf8_reads_the_same_with_workers(corpus, tmp_path):
    path, offset, bad_line = _bad_corpus(corpus, tmp_path)
    tok = build_char_tokenizer(path, tmp_path / "c.json", TokenizerConfig(kind="char"))
    messages = set()
    for workers, chunk in ((1, 4096), (2, 4096), (3, 777)):
        with pytest.raises(DataError) as err:
            encode_corpus(path, tok, tmp_path / "out", val_fraction=0.1, chunk_bytes=chunk, progress=False,
                          workers=workers)
        messages.add(str(err.value))
    (message,) = messages
    assert f"byte {offset} (line {bad_line})" in message and "\n" not in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    replaced = [encode_corpus(path, tok, tmp_path / f"r{w}", val_fraction=0.1, invalid_utf8="replace",
                              chunk_bytes=4096, progress=False, workers=w) for w in (1, 2)]
    assert replaced[0] == replaced[1] and _digests(tmp_path / "r1") == _digests(tmp_path / "r2")


def test_progress_counts_every_byte_with_workers(corpus, tmp_path, capfd):
    tok = build_char_tokenizer(corpus, tmp_path / "c.json", TokenizerConfig(kind="char"))
    encode_corpus(corpus, tok, tmp_path / "enc", val_fraction=0.1, chunk_bytes=1 << 14, workers=2)
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("encode: ")]
    total = corpus.stat().st_size / 1e6
    assert 2 <= len(lines) <= 12 and lines[-1] == f"encode: {total:.1f} of {total:.1f} MB"


def test_a_tokenizer_workers_cannot_load_is_encoded_in_process(corpus, tmp_path):
    class Upper(Tokenizer):      # not minilm's file-backed kinds: no worker could rebuild it
        kind, path, hash, vocab_size = "upper", tmp_path / "none", "0" * 64, 256
        unk_id, bos_id, eos_id, pad_id = 0, 1, 2, 3

        def encode(self, text, *, bos=False, eos=False):
            return [min(255, ord(c)) for c in text.upper()]

        def decode(self, ids):
            return "".join(map(chr, ids))

        def token_id(self, piece):
            return None

    metas = [encode_corpus(corpus, Upper(), tmp_path / f"u{w}", val_fraction=0.1, chunk_bytes=4096,
                           progress=False, workers=w) for w in (1, 2)]
    assert metas[0] == metas[1] and _digests(tmp_path / "u1") == _digests(tmp_path / "u2")


def test_a_tokenizer_file_changed_under_the_workers_is_refused(corpus, tmp_path):
    tok = build_char_tokenizer(corpus, tmp_path / "c.json", TokenizerConfig(kind="char"))
    build_char_tokenizer(corpus, tmp_path / "c.json", TokenizerConfig(kind="char", special_tokens=["XYZ"]))
    with pytest.raises(CheckpointError, match="changed while the corpus was being encoded"):
        encode_corpus(corpus, tok, tmp_path / "out", val_fraction=0.1, chunk_bytes=4096, progress=False,
                      workers=2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_dead_worker_is_one_line(corpus, tmp_path):
    tok = build_char_tokenizer(corpus, tmp_path / "c.json", TokenizerConfig(kind="char"))
    dtype = np.dtype(np.uint16)
    with WorkerPool(tok, dtype, "strict", 1) as pool:
        pool.send(b"hello\n")
        assert pool.receive() == (OK, encode_lines(tok, b"hello\n", "strict", dtype))
        pool.procs[0].kill()
        pool.procs[0].wait()
        with pytest.raises(DataError, match=r"encode worker process exited with code -9.*encode.workers: 1"):
            pool.send(b"again\n")
            pool.receive()


def test_worker_count_is_checked(corpus, tmp_path):
    tok = build_char_tokenizer(corpus, tmp_path / "c.json", TokenizerConfig(kind="char"))
    with pytest.raises(ConfigError, match=r"workers must be >= 0 \(0 = all cores\), got -1"):
        encode_corpus(corpus, tok, tmp_path / "o", val_fraction=0.1, workers=-1)
    assert resolve_workers(0) >= 1 and resolve_workers(3) == 3


def test_encode_workers_param_is_validated(tmp_path):
    from pathlib import Path

    from stages.params import load_params

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert load_params(root / "params.yaml").encode.workers == params["encode"]["workers"] == 0
    params["encode"]["workers"] = -1
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "p.yaml")
    assert "encode.workers must be >= 0 (0 = one per core), got -1" in str(err.value)
    assert "\n" not in str(err.value)
