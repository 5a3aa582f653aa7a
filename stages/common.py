"""What every stage shares: the file layout, ``--params``, and an MLflow run with lineage.

Lineage: each stage writes ``out/<stage>/run.json`` (its MLflow run id and the sha256 of what it
wrote). A stage that consumes another's outputs records, as tags of its own run, the producer's run id
and the hashes of the files it read (``lineage.<input>.run_id`` / ``.sha256``), so a user can walk from
a sample back to the data it came from in the MLflow UI.

Grouping: the runs of one ``dvc repro`` share a parent run ``pipeline:<group>``. The group is the DVC
experiment name under ``dvc exp run``; otherwise it is derived from the git commit and the params file,
so every stage run for the same code and params lands under one parent.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from minilm.fileio import sha256_file, write_json
from .params import Params, load_params

DATA = Path("data")
CORPUS = DATA / "corpus.txt"
SFT_TRAIN = DATA / "sft_train.jsonl"
SFT_VAL = DATA / "sft_val.jsonl"
OUT = Path("out")
TOKENIZER = OUT / "tokenizer"
ENCODED = OUT / "encoded"
PRETRAIN = OUT / "pretrain"
SFT = OUT / "sft"
ADAPTER = SFT / "adapter"
MERGE = OUT / "merge"
MERGED = MERGE / "model.safetensors"
EVALUATE = OUT / "evaluate"
GENERATE = OUT / "generate"


def parse_args(stage: str, doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="params file to read (default: params.yaml)")
    return parser.parse_args(argv)


def setup(stage: str, doc: str | None, argv: list[str] | None) -> Params:
    """Parse the command line and load + validate the whole params file."""
    args = parse_args(stage, doc, argv)
    return load_params(args.params)


def tokenizer_path() -> Path:
    """The tokenizer file written by the tokenizer stage (SentencePiece .model or char .json)."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if (TOKENIZER / name).exists():
            return TOKENIZER / name
    from minilm.errors import CheckpointError
    raise CheckpointError(f"no tokenizer in {TOKENIZER}/; run `dvc repro tokenizer` first")


def code_fingerprint() -> str:
    """sha256 over the minilm package's source: a checkpoint is resumed only by the code that wrote it."""
    import minilm

    h = hashlib.sha256()
    for f in sorted(Path(minilm.__file__).parent.rglob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def group_name(params: Params) -> str:
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return f"exp-{exp}"
    digest = hashlib.sha256(_git_head().encode() + Path(params.path).read_bytes()).hexdigest()
    return f"repro-{digest[:10]}"


def lineage_tags(inputs: dict[str, Path]) -> dict[str, str]:
    """Tags naming the files a stage consumed: their sha256 and the run that produced them."""
    tags: dict[str, str] = {}
    for name, path in inputs.items():
        path = Path(path)
        if path.is_file():
            tags[f"lineage.{name}.sha256"] = sha256_file(path)
        producer = _producer(path)
        if producer:
            tags[f"lineage.{name}.run_id"] = producer.get("run_id", "")
            tags[f"lineage.{name}.stage"] = producer.get("stage", "")
    return tags


def _producer(path: Path) -> dict[str, Any] | None:
    """run.json of the stage that wrote ``path``: data/ comes from prepare, out/<stage>/... from <stage>."""
    if DATA in path.parents:
        run_json = OUT / "prepare" / "run.json"
    elif OUT in path.parents:
        run_json = OUT / path.relative_to(OUT).parts[0] / "run.json"
    else:
        return None
    try:
        return json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: list[str], *, out_dir: Path,
              inputs: dict[str, Path] | None = None, resume_run_id: str | None = None,
              tags: dict[str, Any] | None = None) -> Iterator[Any]:
    """An MLflow run named after the stage, logging the params it read and its lineage.

    On success ``out_dir/run.json`` records the run id (read by downstream stages).
    """
    from .tracking import start_run

    read = {name: params.section(name) for name in sections}
    all_tags = {"dvc.stage": stage, **lineage_tags(inputs or {}), **(tags or {})}
    with start_run(params.mlflow, stage, read, tags=all_tags, group=group_name(params),
                   resume_run_id=resume_run_id) as run:
        yield run
        outputs = {str(p.relative_to(out_dir)): sha256_file(p) for p in sorted(out_dir.rglob("*"))
                   if p.is_file() and p.name != "run.json"} if out_dir.exists() else {}
        write_json(out_dir / "run.json", {"stage": stage, "run_id": run.run_id,
                                          "tracking_uri": run.tracking_uri, "outputs": outputs,
                                          "inputs": {k: str(v) for k, v in (inputs or {}).items()}})
        run.log_artifact(out_dir / "run.json")


def flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict as ``a.b`` keys (for MLflow metrics)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_numbers(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def resumable(out_dir: Path, run_config: dict, max_steps: int) -> tuple[bool, str | None]:
    """Whether ``out_dir/last.safetensors`` is an unfinished run with the same params and code, and
    the MLflow run id it was logging to (so the resumed stage continues that run).

    A finished ``last`` is not resumed: DVC reruns a stage only when something it depends on changed
    (or when forced), so that is a fresh run."""
    from minilm.checkpoint import read_meta

    last = out_dir / "last.safetensors"
    if not last.exists():
        return False, None
    meta = read_meta(last)
    if meta.get("config") != json.loads(json.dumps(run_config)) or meta["step"] >= max_steps:
        return False, None
    return True, meta.get("extra", {}).get("mlflow_run_id")


def write_curves(history: list[dict[str, Any]], out_dir: Path, title: str) -> None:
    """history.csv (DVC plots) and loss.png (a picture that opens offline) of a training run."""
    from .plots import plot_curves, write_table_csv

    write_table_csv(history, out_dir / "history.csv")
    plot_curves(history, out_dir / "loss.png", title=title)


def stop_if_interrupted(stage: str, result: Any) -> None:
    """After SIGINT/SIGTERM the trainer saved `last` and returned early: end the stage as interrupted
    (the MLflow run is marked KILLED, no outputs are written, DVC records nothing, exit code 130)."""
    if result.interrupted:
        print(f"{stage}: interrupted at step {result.step}; `last` saved - rerun the stage (or "
              "`dvc repro`) to continue", flush=True)
        raise KeyboardInterrupt
