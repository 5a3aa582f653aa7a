"""tokenizer: train the SentencePiece model on data/corpus.txt (or build the char vocabulary),
per params `tokenizer`. Writes out/tokenizer/tokenizer.model (or tokenizer.json)."""

from __future__ import annotations

from minilm.errors import run_main
from minilm.fileio import write_json
from minilm.tokenizer import train_tokenizer

from .common import CORPUS, TOKENIZER, setup, stage_run

PARAMS = ["tokenizer"]


def main(argv: list[str] | None = None) -> None:
    params = setup("tokenizer", __doc__, argv)
    cfg = params.tokenizer
    name = "tokenizer.model" if cfg.kind == "sentencepiece" else "tokenizer.json"
    for stale in TOKENIZER.glob("tokenizer.*"):
        if stale.name != name:
            stale.unlink()
    with stage_run("tokenizer", params, ["tokenizer"], out_dir=TOKENIZER,
                   inputs={"corpus": CORPUS}) as run:
        tok = train_tokenizer(CORPUS, TOKENIZER / name, cfg)
        sample = CORPUS.read_text(encoding="utf-8", errors="replace")[:200_000]
        n_tokens = len(tok.encode(sample))
        stats = {"vocab_size": tok.vocab_size, "bytes_per_token": len(sample.encode()) / max(n_tokens, 1),
                 "sha256": tok.hash, "kind": tok.kind}
        write_json(TOKENIZER / "stats.json", stats)
        run.log_metrics({"vocab_size": tok.vocab_size, "bytes_per_token": stats["bytes_per_token"]}, 0)
        run.log_artifact(TOKENIZER / name)
    print(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens, {stats['bytes_per_token']:.2f} bytes/token "
          f"-> {TOKENIZER / name}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
