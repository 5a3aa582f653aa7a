"""encode: encode data/corpus.txt with the trained tokenizer into flat token files
(out/encoded/train.bin, val.bin, meta.json); the last `encode.val_fraction` of the corpus is held out."""

from __future__ import annotations

import json

from minilm.corpus import JUNK_LIMIT, not_text_error, sniff_text, val_fraction_of
from minilm.data import encode_corpus
from minilm.errors import run_main
from minilm.tokenizer import load_tokenizer

from .common import CORPUS, ENCODED, OUT, flat_numbers, setup, stage_run, tokenizer_path

STATS = OUT / "prepare" / "stats.json"

PARAMS = ["encode"]                   # project.progress is display only


def main(argv: list[str] | None = None) -> None:
    params = setup("encode", __doc__, argv)
    tok_path = tokenizer_path()
    if CORPUS.is_file():     # a hand-placed binary is refused whatever encode.invalid_utf8 says, as in prepare
        seen = sniff_text(CORPUS)
        if seen["junk"] >= JUNK_LIMIT * max(seen["chars"], 1):
            raise not_text_error(CORPUS)
    with stage_run("encode", params, ["encode"], out_dir=ENCODED,
                   inputs={"corpus": CORPUS, "tokenizer": tok_path}) as run:
        tok = load_tokenizer(tok_path)
        meta = encode_corpus(CORPUS, tok, ENCODED, val_fraction=held_out_fraction(params.encode.val_fraction),
                             invalid_utf8=params.encode.invalid_utf8, progress=params.project.progress,
                             workers=params.encode.workers)
        run.log_metrics(flat_numbers({"tokens": meta["tokens"], "bytes": meta["bytes"]}), step=0)
        run.log_artifact(ENCODED / "meta.json")
    print(f"encode: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens -> {ENCODED}")


def held_out_fraction(val_fraction: float) -> float:
    """The share of data/corpus.txt to hold out: the last ``val_fraction`` of the primary corpus, which
    prepare writes after the docstrings of ``data.packages`` (its stats say where it starts). A corpus
    placed by hand, which those stats do not describe, is held out as a whole."""
    try:
        stats = json.loads(STATS.read_text(encoding="utf-8"))["corpus"]
    except (OSError, ValueError, KeyError, TypeError):
        return val_fraction
    if not isinstance(stats, dict) or stats.get("bytes") != CORPUS.stat().st_size:
        return val_fraction
    return val_fraction_of(stats, val_fraction)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
