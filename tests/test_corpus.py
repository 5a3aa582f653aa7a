"""Corpus and SFT data materialisation: real English offline, streaming, deterministic, clear errors."""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest

from minilm.config import build
from minilm.config import DataConfig
import hashlib

from minilm.config import TokenizerConfig
from minilm.corpus import (file_documents, package_documents, stdlib_documents, val_fraction_of,
                           write_corpus)
from minilm.data import encode_corpus, load_tokens
from minilm.tokenizer import build_char_tokenizer
from minilm.pairs import chatterbot_pairs, read_pairs, write_sft
from minilm.errors import ConfigError, DataError
from minilm.fileio import sha256_file


def _cfg(**kw) -> DataConfig:
    return build(DataConfig, kw, "data")


# --------------------------------------------------------------------------------------------------
# config


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="sft_val_fraction"):
        _cfg(sft_val_fraction=1.5)
    with pytest.raises(ConfigError, match="invalid_utf8"):
        _cfg(invalid_utf8="ignore")
    with pytest.raises(ConfigError, match="did you mean 'corpus_max_mb'"):
        _cfg(corpus_max_m=3)


# --------------------------------------------------------------------------------------------------
# pretraining corpus


def test_stdlib_documents_are_real_english():
    docs, size = [], 0
    for doc in stdlib_documents():              # stop once we have > 1 MB; the rest is more of it
        docs.append(doc)
        size += len(doc.encode("utf-8"))
        if size > 1_100_000:
            break
    assert size > 1_000_000
    text = "\n\n".join(docs)
    ascii_share = sum(c < 128 for c in text.encode("utf-8")) / size
    assert ascii_share > 0.98
    words = text.lower().split()
    for common in ("the", "of", "and", "is", "to"):
        assert words.count(common) / len(words) > 0.005, common
    assert all(len(d) >= 40 for d in docs)
    assert len(set(docs)) == len(docs)             # exact duplicates dropped


def test_write_corpus_stdlib_is_deterministic_and_capped(tmp_path):
    cfg = _cfg(corpus_max_mb=0.3)
    a = write_corpus(cfg, tmp_path / "a.txt")
    b = write_corpus(cfg, tmp_path / "b.txt")
    assert a["sha256"] == b["sha256"] == sha256_file(tmp_path / "a.txt")
    assert a["truncated"] and a["documents"] > 10
    size = (tmp_path / "a.txt").stat().st_size
    assert size == a["bytes"] and 250_000 < size <= 300_000
    text = (tmp_path / "a.txt").read_text(encoding="utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n")
    bigger = write_corpus(_cfg(corpus_max_mb=0.4), tmp_path / "c.txt")
    # a larger cap extends the same document stream: the smaller corpus is a prefix of it
    assert (tmp_path / "c.txt").read_text(encoding="utf-8").startswith(text.rstrip("\n") + "\n\n")
    assert bigger["documents"] > a["documents"]


def test_packages_join_training_and_leave_validation_alone(tmp_path):
    """`data.packages` docstrings come before the primary corpus, which is written byte for byte as
    without them; the held-out tail (val_fraction_of) is the same text, so val loss stays comparable."""
    src = tmp_path / "book.txt"
    src.write_text("\n\n".join(f"Paragraph {i} of the book: " + "word " * (i % 7 + 3) for i in range(400)),
                   encoding="utf-8")
    plain = write_corpus(_cfg(corpus=str(src)), tmp_path / "plain.txt")
    extra = write_corpus(_cfg(corpus=str(src), packages=["yaml"]), tmp_path / "extra.txt")
    assert plain["primary_offset"] == 0 and plain["packages"] == {}
    assert extra["packages"]["yaml"].startswith("PyYAML ") and extra["package_documents"] > 20
    body = (tmp_path / "extra.txt").read_bytes()
    start = extra["primary_offset"]
    assert body[start:] == (tmp_path / "plain.txt").read_bytes() and body[start - 2:start] == b"\n\n"
    assert b"YAML" in body[:start] and extra["bytes"] == len(body)

    tok = build_char_tokenizer(tmp_path / "extra.txt", tmp_path / "char.json", TokenizerConfig(kind="char"))
    held = {}
    for name, stats in (("plain", plain), ("extra", extra)):
        out = tmp_path / f"enc-{name}"
        meta = encode_corpus(tmp_path / f"{name}.txt", tok, out, val_fraction=val_fraction_of(stats, 0.05))
        held[name] = (meta["bytes"]["val"], tok.decode(load_tokens(out / "val.bin").tolist()))
    assert held["plain"] == held["extra"] and held["plain"][0] > 0
    assert val_fraction_of(plain, 0.05) == 0.05


def test_packages_never_repeat_the_primary_corpus(tmp_path):
    """json ships with Python: every docstring it has is already in the stdlib corpus, so it adds none
    (nothing of the validation split can reach training through a package)."""
    digests = {hashlib.sha1(d.encode("utf-8")).digest() for d in stdlib_documents()}
    assert len(list(package_documents(["json"]))) > 5
    assert list(package_documents(["json"], exclude=digests)) == []


def test_packages_errors(tmp_path):
    with pytest.raises(ConfigError, match="top-level import names"):
        _cfg(packages=["numpy>=2"])
    with pytest.raises(ConfigError, match="twice"):
        _cfg(packages=["yaml", "yaml"])
    with pytest.raises(DataError, match="'no_such_pkg_xyz' is not an installed") as err:
        write_corpus(_cfg(packages=["yaml", "no_such_pkg_xyz"]), tmp_path / "c.txt")
    assert "\n" not in str(err.value) and not (tmp_path / "c.txt").exists()


def test_user_file_paragraphs_and_cap(tmp_path):
    src = tmp_path / "book.txt"
    paragraphs = [f"Paragraph {i} says something.\nIt has a second line." for i in range(50)]
    src.write_text("\r\n\r\n".join(p.replace("\n", "\r\n") for p in paragraphs) + "\r\n",
                   encoding="utf-8")
    stats = write_corpus(_cfg(corpus=str(src)), tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "\n\n".join(paragraphs) + "\n"
    assert stats["documents"] == 50 and stats["files"] == 1 and not stats["truncated"]

    cap = 0.0005                                   # 500 bytes: cut at a paragraph boundary
    stats = write_corpus(_cfg(corpus=str(src), corpus_max_mb=cap), tmp_path / "small.txt")
    out = (tmp_path / "small.txt").read_text(encoding="utf-8")
    assert stats["truncated"] and len(out.encode()) <= 500
    assert out == "\n\n".join(paragraphs[:stats["documents"]]) + "\n"


def test_user_directory_is_recursive_sorted_and_filtered(tmp_path):
    root = tmp_path / "texts"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b" / "deep" / "z.md").write_text("from z.md", encoding="utf-8")
    (root / "a.txt").write_text("from a.txt\n\nsecond paragraph of a", encoding="utf-8")
    (root / "b" / "c.rst").write_text("from c.rst", encoding="utf-8")
    (root / "b" / "skip.py").write_text("print('not text')", encoding="utf-8")
    (root / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    stats = write_corpus(_cfg(corpus=str(root)), tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == (
        "from a.txt\n\nsecond paragraph of a\n\nfrom c.rst\n\nfrom z.md\n")
    assert stats["files"] == 3 and stats["documents"] == 4


def test_invalid_utf8_names_file_offset_and_fix(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes(b"caf\xc3\xa9 ok\n\n" + b"x" * 3000 + b" na\xefve\n")
    with pytest.raises(DataError) as info:
        write_corpus(_cfg(corpus=str(src)), tmp_path / "out.txt")
    msg = str(info.value)
    assert str(src) in msg and "byte 3013" in msg and "data.invalid_utf8: replace" in msg
    assert "\n" not in msg
    assert not (tmp_path / "out.txt").exists()       # nothing half-written

    write_corpus(_cfg(corpus=str(src), invalid_utf8="replace"), tmp_path / "out.txt")
    out = (tmp_path / "out.txt").read_text(encoding="utf-8")
    assert out.startswith("café ok\n\n") and "na\ufffdve" in out


def test_file_documents_bounds_huge_lines(tmp_path):
    src = tmp_path / "one_line.txt"
    src.write_text("word " * 2_000_000, encoding="utf-8")       # 10 M chars, no newline at all
    docs = list(file_documents(src))
    assert len(docs) >= 2 and max(map(len, docs)) <= 8 << 20
    assert "".join(docs).replace(" ", "") == "word" * 2_000_000


def test_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        write_corpus(_cfg(corpus=str(tmp_path / "nope")), tmp_path / "out.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.txt"):
        write_corpus(_cfg(corpus=str(tmp_path / "empty")), tmp_path / "out.txt")
    (tmp_path / "blank.txt").write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no text"):
        write_corpus(_cfg(corpus=str(tmp_path / "blank.txt")), tmp_path / "out.txt")


# --------------------------------------------------------------------------------------------------
# SFT pairs


def test_chatterbot_pairs():
    df = chatterbot_pairs()
    assert list(df.columns) == ["instruction", "response"]
    assert len(df) > 1000
    for col in df.columns:
        assert all(isinstance(v, str) and v == v.strip() and v for v in df[col])
    assert ("What is AI?" in set(df["instruction"]))


PAIRS = [{"instruction": f"Question {i}?", "response": f"Answer {i}."} for i in range(6)]


def test_read_pairs_formats_agree(tmp_path):
    expected = pd.DataFrame(PAIRS)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS) + "\n",
                                      encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps(PAIRS), encoding="utf-8")
    expected.to_csv(tmp_path / "p.csv", index=False)
    expected.to_parquet(tmp_path / "p.parquet")
    (tmp_path / "p.txt").write_text("\n\n".join(
        f"### Instruction:\n{p['instruction']}\n\n### Response:\n{p['response']}" for p in PAIRS),
        encoding="utf-8")
    for ext in ("jsonl", "json", "csv", "parquet", "txt"):
        df = read_pairs(tmp_path / f"p.{ext}")
        pd.testing.assert_frame_equal(df, expected, obj=ext)
        assert df.attrs["skipped"] == 0


def test_read_pairs_custom_fields_and_multiline_txt(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completion": 42}) + "\n", encoding="utf-8")
    df = read_pairs(path, "prompt", "completion")
    assert df.values.tolist() == [["Hi", "42"]]
    with pytest.raises(DataError, match="line 1 has no 'instruction' field.*prompt, completion"):
        read_pairs(path)

    txt = tmp_path / "m.txt"
    txt.write_text("### Instruction: Write two lines.\n### Response:\nOne.\n\nTwo.\n\n\n"
                   "### Instruction:\nNext?\n\n### Response:\nYes.\n", encoding="utf-8")
    assert read_pairs(txt).values.tolist() == [["Write two lines.", "One.\n\nTwo."], ["Next?", "Yes."]]


def test_read_pairs_bad_records(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(PAIRS[0]), "{not json", json.dumps({"instruction": "x"}),
             json.dumps(PAIRS[1]), json.dumps({"instruction": " ", "response": "y"}), "[1, 2]"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_pairs(path)
    msg = str(info.value)
    assert "line 2 is not valid JSON" in msg and "data.bad_records: skip" in msg and "\n" not in msg
    df = read_pairs(path, bad_records="skip")
    assert df.to_dict("records") == PAIRS[:2]
    assert df.attrs["skipped"] == 4

    txt = tmp_path / "bad.txt"
    txt.write_text("### Instruction:\nA?\n### Response:\nB.\n\n### Instruction:\nno answer\n",
                   encoding="utf-8")
    with pytest.raises(DataError, match="line 6 has no '### Response:'"):
        read_pairs(txt)
    assert read_pairs(txt, bad_records="skip").attrs["skipped"] == 1


def test_read_pairs_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "p.xml").write_text("<x/>", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.xml'"):
        read_pairs(tmp_path / "p.xml")
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no instruction/response pairs"):
        read_pairs(tmp_path / "e.jsonl")
    pd.DataFrame({"q": ["a"], "a": ["b"]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DataError, match="no column 'instruction' \\(columns: q, a\\)"):
        read_pairs(tmp_path / "c.csv")
    (tmp_path / "u.jsonl").write_bytes(b'{"instruction": "caf\xe9", "response": "r"}\n')
    with pytest.raises(DataError, match="byte 20"):
        read_pairs(tmp_path / "u.jsonl")
    df = read_pairs(tmp_path / "u.jsonl", invalid_utf8="replace")
    assert df["instruction"][0] == "caf\ufffd"


def test_write_sft_split_is_deterministic_disjoint_and_deduplicated(tmp_path):
    rows = [{"instruction": f"Q{i % 30}", "response": f"A{i}"} for i in range(90)]
    rows += rows[:10]                                      # exact duplicates
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = _cfg(sft=str(src), sft_val_fraction=0.2, seed=7)
    s1 = write_sft(cfg, tmp_path / "one")
    s2 = write_sft(cfg, tmp_path / "two")
    assert s1 == s2 and s1["duplicates_removed"] == 10 and s1["pairs"] == 90
    assert s1["train"] + s1["val"] == 90 and 18 <= s1["val"] < 30

    def load(name):
        return [json.loads(x) for x in (tmp_path / "one" / name).read_text(encoding="utf-8").splitlines()]

    train, val = load("sft_train.jsonl"), load("sft_val.jsonl")
    as_set = lambda recs: {(r["instruction"], r["response"]) for r in recs}  # noqa: E731
    assert as_set(train).isdisjoint(as_set(val))
    assert as_set(train) | as_set(val) == {(r["instruction"], r["response"]) for r in rows}
    # no validation instruction is seen in training
    assert {r["instruction"] for r in train}.isdisjoint({r["instruction"] for r in val})
    other = write_sft(_cfg(sft=str(src), sft_val_fraction=0.2, seed=8), tmp_path / "three")
    assert other["val_sha256"] != s1["val_sha256"]


def test_write_sft_chatterbot_and_tiny_sets(tmp_path):
    stats = write_sft(_cfg(), tmp_path)
    assert stats["source"].startswith("chatterbot-corpus") and stats["val"] >= 1
    assert stats["train"] > 1000
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[0]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="1 distinct pair"):
        write_sft(_cfg(sft=str(one)), tmp_path / "x")
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps({"instruction": "same", "response": r}) + "\n" for r in "ab"),
                   encoding="utf-8")
    stats = write_sft(_cfg(sft=str(two), sft_val_fraction=0.5), tmp_path / "y")
    assert (stats["train"], stats["val"]) == (1, 1)


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "gap.jsonl"
    path.write_text("\n".join(itertools.chain([json.dumps(PAIRS[0]), "", ""], ["oops"])), encoding="utf-8")
    with pytest.raises(DataError, match="line 4 is not valid JSON"):
        read_pairs(path)
