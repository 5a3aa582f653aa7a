"""``python -m benchmarks.sweep``: the pretraining sweep behind the default data and regularisation.

The default pipeline used to overfit: 800 steps of 16 x 256 tokens passed over its ~0.6M-token corpus
about five times. This sweep tries what the issue names (more English text that ships with installed
packages, dropout, weight decay, model size and steps) as DVC experiments of the ``pretrain`` stage, and
reads the results back from MLflow, where every experiment is a run (the evidence).

    python -m benchmarks.sweep queue            # dvc exp run --queue pretrain -n sweep-<name> -S ... per variant
    dvc queue start -j 1                        # run them one at a time (or: python -m benchmarks.sweep run)
    python -m benchmarks.sweep report           # the table, from MLflow, into benchmarks/sweep.md and .json

Run it in a clean clone (``dvc exp run --queue`` snapshots the workspace as it is when queued). Every
variant is held out on the same text: ``data.packages`` docstrings go before the primary corpus and the
validation split stays the primary corpus's tail (README "Choosing the defaults"), so bits per byte are
comparable across tokenizers and corpora.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from minilm.fileio import write_json, write_text

SMALL = "[numpy,pandas]"
LARGE = "[numpy,pandas,torch,networkx,scipy,sklearn,matplotlib,sqlalchemy]"
# name -> (what it tries, params overrides). Step counts of the other model shapes are set so that a
# run costs the default's 700 steps of 4 x 256 (step cost ratios measured in one process, README).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("the old default: Python's docstrings only", []),
    "dropout": ("dropout 0.1", ["model.dropout=0.1"]),
    "wd03": ("weight decay 0.3", ["pretrain.weight_decay=0.3"]),
    "text6mb": ("+ numpy and pandas docstrings", [f"data.packages={SMALL}"]),
    "text26mb": ("+ the docstrings of 8 packages", [f"data.packages={LARGE}"]),
    # other shapes for the same time (one-thread CPU time per step: 6x256 1.44x, 4x192 0.73x)
    "6x256": ("6 layers, 486 steps", ["model.n_layer=6", "pretrain.max_steps=486"]),
    "4x192": ("d_model 192, 960 steps", ["model.d_model=192", "model.n_head=3", "pretrain.max_steps=960"]),
    "4x192-wd03": ("d_model 192, 960 steps, weight decay 0.3", ["model.d_model=192", "model.n_head=3",
                                                                "pretrain.max_steps=960", "pretrain.weight_decay=0.3"]),
}
# one-thread CPU seconds per step over the default shape's, measured in one process (README); 1 if absent
STEP_COST = {"6x256": 1.44, "4x192": 0.73, "4x192-wd03": 0.73}
METRICS = ("final_best_val_bits_per_byte", "final_best_val_loss", "final_last_val_loss")


def _dvc(*args: str) -> str:
    done = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"dvc {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def queue(names: list[str], extra: list[str]) -> None:
    for name in names:
        overrides = [arg for o in VARIANTS[name][1] + extra for arg in ("-S", o)]
        _dvc("exp", "run", "--queue", "pretrain", "-n", f"sweep-{name}", *overrides)
        print(f"queued sweep-{name}: {' '.join(VARIANTS[name][1] + extra) or '(defaults)'}")


def run() -> None:
    """Start one queue worker and wait until nothing is queued or running."""
    _dvc("queue", "start", "-j", "1")
    while any(w in _dvc("queue", "status") for w in ("Queued", "Running")):
        time.sleep(30)
    print(_dvc("queue", "status"))


def _last(client: Any, run_id: str, key: str) -> float | None:
    history = client.get_metric_history(run_id, key)
    return history[-1].value if history else None


def collect(names: list[str], uri: str) -> list[dict[str, Any]]:
    """One row per variant: its pretrain run's final figures, its train loss, the corpus it saw."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    rows = []
    for name in names:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`dvc.exp_name` = 'sweep-{name}' and tags.`dvc.stage` = 'pretrain'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            print(f"sweep-{name}: no pretrain run in {uri} yet")
            continue
        r = runs[0]
        row = {"variant": name, "what": VARIANTS.get(name, ("?", []))[0], "run_id": r.info.run_id,
               "train_loss": _last(client, r.info.run_id, "train_loss"),
               "train_seconds": (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time else None,
               **{k: r.data.metrics.get(k) for k in METRICS},
               "steps": r.data.params.get("pretrain.max_steps"),
               "model": f"{r.data.params.get('model.n_layer')}x{r.data.params.get('model.d_model')}"}
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    head = ["variant", "what", "model", "steps", "budget (steps x step cost)", "val bits/byte", "val loss",
            "last train loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        budget = int(r["steps"] or 0) * STEP_COST.get(r["variant"], 1.0)
        cells = [r["variant"], r["what"], r["model"], r["steps"], f"{budget:.0f}",
                 _f(r["final_best_val_bits_per_byte"], 4), _f(r["final_best_val_loss"], 3), _f(r["train_loss"], 3)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _f(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["queue", "run", "report"])
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                   help="an override added to every variant (e.g. pretrain.threads=1 to run two at once)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="where the runs were logged")
    p.add_argument("--out", default=str(Path(__file__).with_name("sweep")), help="report path stem")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if args.action == "queue":
        queue(names, args.set)
    elif args.action == "run":
        run()
    else:
        rows = collect(names, args.tracking_uri)
        write_json(Path(args.out).with_suffix(".json"), rows)
        write_text(Path(args.out).with_suffix(".md"), render(rows))
        print(render(rows))


if __name__ == "__main__":
    main()
