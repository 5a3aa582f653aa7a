"""encode: encode data/corpus.txt with the trained tokenizer into flat token files
(out/encoded/train.bin, val.bin, meta.json); the last `encode.val_fraction` of the corpus is held out."""

from __future__ import annotations

from minilm.corpus import JUNK_LIMIT, not_text_error, sniff_text
from minilm.data import encode_corpus
from minilm.errors import run_main
from minilm.tokenizer import load_tokenizer

from .common import CORPUS, ENCODED, flat_numbers, setup, stage_run, tokenizer_path

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
        meta = encode_corpus(CORPUS, tok, ENCODED, val_fraction=params.encode.val_fraction,
                             invalid_utf8=params.encode.invalid_utf8, progress=params.project.progress)
        run.log_metrics(flat_numbers({"tokens": meta["tokens"], "bytes": meta["bytes"]}), step=0)
        run.log_artifact(ENCODED / "meta.json")
    print(f"encode: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens -> {ENCODED}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
