"""prepare: materialise the pretraining corpus and the SFT pairs as plain files under data/.

Default: real English text that ships with Python (pydoc topics and the standard library's
docstrings) and the chatterbot-corpus question/answer pairs. Point params `data.corpus` / `data.sft` at
your own text file, directory or pairs file (JSONL/CSV/Parquet/plain text) to use your data.
"""

from __future__ import annotations

from minilm.errors import run_main
from minilm.corpus import write_corpus
from minilm.pairs import write_sft
from minilm.fileio import write_json

from .common import CORPUS, DATA, OUT, flat_numbers, setup, stage_run

PARAMS = ["data"]


def main(argv: list[str] | None = None) -> None:
    params = setup("prepare", __doc__, argv)
    out_dir = OUT / "prepare"
    with stage_run("prepare", params, ["data"], out_dir=out_dir) as run:
        stats = {"corpus": write_corpus(params.data, CORPUS), "sft": write_sft(params.data, DATA)}
        write_json(out_dir / "stats.json", stats)
        run.log_metrics(flat_numbers(stats), step=0)
        run.log_artifact(out_dir / "stats.json")
    print(f"prepare: corpus {stats['corpus'].get('bytes', 0) / 1e6:.1f} MB -> {CORPUS}; "
          f"sft pairs -> {DATA}/sft_*.jsonl")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
