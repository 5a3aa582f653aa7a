"""tokenizer: train the SentencePiece model on data/corpus.txt (or build the char vocabulary),
per params `tokenizer`, or take an existing SentencePiece model as it is (`tokenizer.path`, e.g. the
tokenizer.model minilm-import wrote beside an imported model, so the pipeline encodes text the way that
model reads it). Writes out/tokenizer/tokenizer.model (or tokenizer.json)."""

from __future__ import annotations

from pathlib import Path

from minilm.errors import CheckpointError, ConfigError, run_main
from minilm.fileio import atomic_write, write_json
from minilm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

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
        tok = adopt(cfg.path, TOKENIZER / name) if cfg.path else train_tokenizer(CORPUS, TOKENIZER / name, cfg)
        sample = CORPUS.read_text(encoding="utf-8", errors="replace")[:200_000]
        n_tokens = len(tok.encode(sample))
        stats = {"vocab_size": tok.vocab_size, "bytes_per_token": len(sample.encode()) / max(n_tokens, 1),
                 "sha256": tok.hash, "kind": tok.kind}
        write_json(TOKENIZER / "stats.json", stats)
        run.log_metrics({"vocab_size": tok.vocab_size, "bytes_per_token": stats["bytes_per_token"]}, 0)
        run.log_artifact(TOKENIZER / name)
    print(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens, {stats['bytes_per_token']:.2f} bytes/token "
          f"-> {TOKENIZER / name}")


def adopt(source: str, target: Path) -> Tokenizer:
    """An existing SentencePiece model, checked by loading it, copied byte for byte (its sha256, which
    checkpoints record, stays the same)."""
    if not Path(source).is_file():
        raise ConfigError(f"tokenizer.path {source} is not a file; point it at a SentencePiece tokenizer.model "
                          "(minilm-import writes one beside the model) or set it to \"\" to train one")
    try:
        tok = load_tokenizer(source)
    except CheckpointError:
        raise ConfigError(f"tokenizer.path {source} is not a SentencePiece model (it could not be parsed); "
                          "point it at a tokenizer.model, e.g. the one minilm-import wrote") from None
    if tok.kind != "sentencepiece":
        raise ConfigError(f"tokenizer.path {source} is not a SentencePiece model (a {tok.kind} vocabulary); "
                          "point it at a tokenizer.model")
    with atomic_write(target, "wb") as fh:
        fh.write(Path(source).read_bytes())
    return load_tokenizer(target)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
