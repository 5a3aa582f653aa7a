"""What every stage shares: the file layout, ``--params``, and an MLflow run with lineage.

Run records: each stage writes ``out/runs/<stage>.json`` (its MLflow run id and the sha256 of what it
wrote). They are no DVC out and no stage's dep: DVC caches content only, so the same params give the
same hashes on every machine of a kind. A stage that consumes another's outputs records, as tags of its
own run, the producer's run id and the hashes of the files it read (``lineage.<input>.run_id`` /
``.sha256``), so a user can walk from a sample back to the data it came from in the MLflow UI.

Grouping: the runs of one ``dvc repro`` share a parent run ``pipeline:<group>``. The group is
``exp-<name>`` for ``dvc exp run`` (``<name>`` is the DVC experiment name); otherwise it is derived from
the git commit and the params file, so every stage run for the same code and params lands under one
parent. Headline metrics and loss curves are mirrored onto the parent (see ``parent_metrics``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Iterator

from minilm.errors import CheckpointError
from minilm.fileio import sha256_file, write_json

from .params import Params, check_hardware, load_params

DATA = Path("data")
CORPUS = DATA / "corpus.txt"
SFT_TRAIN = DATA / "sft_train.jsonl"
SFT_VAL = DATA / "sft_val.jsonl"
OUT = Path("out")
TOKENIZER = OUT / "tokenizer"
ENCODED = OUT / "encoded"
PRETRAIN = OUT / "pretrain"
SFT = OUT / "sft"
TUNED = SFT / "tuned"          # what sft made: PEFT adapter files (method lora) or FULL_WEIGHTS (full)
FULL_WEIGHTS = "model.safetensors"
MERGE = OUT / "merge"
MERGED = MERGE / "model.safetensors"
PREFERENCES = OUT / "preferences"
PREF_TRAIN = PREFERENCES / "train.jsonl"
PREF_VAL = PREFERENCES / "val.jsonl"
DPO = OUT / "dpo"
DPO_ADAPTER = DPO / "adapter"   # the DPO LoRA adapter in PEFT's layout (on the merged SFT model)
DPO_MODEL = DPO / "model.safetensors"   # the SFT model with the DPO adapter merged in
EVALUATE = OUT / "evaluate"
GENERATE = OUT / "generate"
RUNS = OUT / "runs"            # run records: read for lineage only, never cached, never a dep


def parse_args(stage: str, doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="params file to read (default: params.yaml)")
    return parser.parse_args(argv)


def setup(stage: str, doc: str | None, argv: list[str] | None) -> Params:
    """Parse the command line, load + validate the whole params file, and check that this machine has
    the devices and precisions it names (every stage checks every section, so a setting only one stage
    uses fails in all of them, before any work)."""
    args = parse_args(stage, doc, argv)
    params = load_params(args.params)
    check_hardware(params)
    return params


def tokenizer_path() -> Path:
    """The tokenizer file written by the tokenizer stage (SentencePiece .model or char .json)."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if (TOKENIZER / name).exists():
            return TOKENIZER / name
    raise CheckpointError(f"no tokenizer in {TOKENIZER}/; run `dvc repro tokenizer` first")


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
    """The run record of the stage that wrote ``path``: data/ comes from prepare, out/<stage>/... from
    <stage>."""
    if DATA in path.parents:
        stage = "prepare"
    elif OUT in path.parents:
        stage = path.relative_to(OUT).parts[0]
    else:
        return None
    try:
        return json.loads((RUNS / f"{stage}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: list[str], *, out_dir: Path,
              inputs: dict[str, Path] | None = None, resume_run_id: str | None = None,
              tags: dict[str, Any] | None = None, parent_metrics: Iterable[str] = (),
              facts: dict[str, Any] | None = None) -> Iterator[Any]:
    """An MLflow run named after the stage, logging the params it read and its lineage.

    On success ``out/runs/<stage>.json`` records the run id, the hashes of what the stage wrote and
    ``facts`` (what is true of this run only, e.g. the step it resumed from; the stage may fill the dict
    in while the run is open).
    """
    from .tracking import start_run

    read = {name: params.section(name) for name in sections}
    all_tags = {"dvc.stage": stage, **lineage_tags(inputs or {}), **(tags or {})}
    with start_run(params.mlflow, stage, read, tags=all_tags, group=group_name(params),
                   resume_run_id=resume_run_id, parent_metrics=parent_metrics) as run:
        yield run
        outputs = {p.relative_to(out_dir).as_posix(): sha256_file(p) for p in sorted(out_dir.rglob("*"))
                   if p.is_file()} if out_dir.exists() else {}
        path = RUNS / f"{stage}.json"
        write_json(path, {"stage": stage, "run_id": run.run_id, "tracking_uri": run.tracking_uri,
                          "outputs": outputs, "inputs": {k: str(v) for k, v in (inputs or {}).items()},
                          **(facts or {})})
        run.log_artifact(path, "run")


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
