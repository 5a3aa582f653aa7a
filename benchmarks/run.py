"""``python -m benchmarks``: run the benchmark rows, write the results JSON and its Markdown table.

    python -m benchmarks                      # every row (row 6 reproduces the whole pipeline: ~10 min)
    python -m benchmarks --rows 1,2,3,4,5     # everything but the pipeline row (a few minutes)
    python -m benchmarks --quick              # toy sizes, 1-2 repeats: a smoke run in about a minute
    python -m benchmarks --rows data          # encode and tokenizer throughput and memory (~3 min)

Rows not selected keep their figures from an existing results file of the same mode (marked as from an
earlier run), so the pipeline row can be measured separately.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from minilm.fileio import write_json, write_text

from . import (
    data_throughput,
    finetune,
    generation,
    llamacpp,
    pipeline,
    quality,
    serving,
    speedrun,
    training,
    utilisation,
)
from .harness import ROOT, Context, load_average, machine_info
from .report import render

ROWS: dict[int, tuple[str, str, Callable[[Context], dict[str, Any]]]] = {
    1: ("training", "Training throughput (forward + backward + AdamW)", training.run),
    2: ("utilisation", "Hardware utilisation (model FLOP/s over measured peak GEMM FLOP/s)", utilisation.run),
    3: ("generation", "Generation (greedy decode, 256 new tokens)", generation.run),
    4: ("finetune", "LoRA fine-tuning vs full fine-tuning and peft", finetune.run),
    5: ("quality", "Quality at equal compute (tinyshakespeare, nanoGPT CPU config)", quality.run),
    6: ("pipeline", "Pipeline overhead (dvc repro)", pipeline.run),
    7: ("serving", "Serving (minilm-serve: continuous batching vs one request at a time)", serving.run),
    8: ("llamacpp", "Decoding vs llama.cpp (batch 1, 256 new tokens, f16 and q8_0 GGUF)", llamacpp.run),
    9: ("speedrun", "Time to quality (tinyshakespeare: time to nanoGPT's final val loss) and its levers, 3 seeds",
        speedrun.run),
    10: ("data", "Data throughput (encode: all cores vs 1 worker, MB/s and peak RSS at two corpus sizes; "
         "tokenizer peak RSS vs max_sentences)", data_throughput.run),
}
DEFAULT_OUT = ROOT / "benchmarks" / "results.json"


def parse_rows(text: str) -> list[int]:
    names = {key: i for i, (key, _, _) in ROWS.items()}
    rows = []
    for part in text.split(","):
        part = part.strip()
        if part.isdigit() and int(part) in ROWS:
            rows.append(int(part))
        elif part in names:
            rows.append(names[part])
        else:
            valid = ", ".join(f"{i} ({k})" for i, (k, _, _) in ROWS.items())
            raise argparse.ArgumentTypeError(f"unknown row {part!r}; choose from {valid}")
    return sorted(set(rows))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes and 1-2 repeats (a smoke run)")
    p.add_argument("--rows", type=parse_rows, default=sorted(ROWS), metavar="LIST",
                   help="comma-separated row numbers or names (default: all)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="PATH",
                   help="results JSON; the Markdown table goes beside it with a .md suffix "
                        "(default: benchmarks/results.json)")
    p.add_argument("--shakespeare", type=Path, default=None, metavar="PATH",
                   help="tinyshakespeare.txt for row 5 (char-rnn's input.txt, 1.1 MB; not shipped with "
                        "minilm: without it the row is skipped with a line saying so)")
    p.add_argument("--no-compile", action="store_true", help="do not time minilm under torch.compile (training rows, and the compiled decode "
                        "step of rows 3 and 8)")
    return p


def _previous(out: Path, mode: str) -> dict[str, Any]:
    """Rows of an existing results file of the same mode (to keep the rows not rerun)."""
    try:
        old = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if old.get("mode") != mode or not isinstance(old.get("rows"), dict):
        return {}
    when = old.get("machine", {}).get("timestamp_utc")
    return {k: dict(v, earlier_run=v.get("earlier_run") or f"{when}, `{old.get('command')}`")
            for k, v in old["rows"].items()}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    ctx = Context.make(args.quick, shakespeare=args.shakespeare, log=log)
    if args.no_compile:
        ctx.compile = ctx.decode_compile = False
    mode = "quick" if args.quick else "full"
    command = "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {"command": command.strip(), "mode": mode, "machine": machine_info(),
                               "rows": {}}
    previous = _previous(args.out, mode)
    failed = False
    for i, (key, title, fn) in ROWS.items():
        if i not in args.rows:
            if key in previous:
                results["rows"][key] = previous[key]
            continue
        log(f"row {i}: {title}")
        load_before = load_average()
        t0 = time.perf_counter()
        try:
            row = fn(ctx)
        except Exception as err:  # a broken row must not lose the others' figures
            failed = True
            traceback.print_exc()
            row = {"error": f"{type(err).__name__}: {err}".splitlines()[0], "lines": [], "notes": []}
        row = {"id": i, "key": key, "title": title, **row, "seconds": time.perf_counter() - t0,
               "load_average_before": load_before, "load_average_after": load_average()}
        results["rows"][key] = row
        log(f"row {i} done in {row['seconds']:.0f} s")
    results["rows"] = dict(sorted(results["rows"].items(), key=lambda kv: kv[1]["id"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)
    md_path = args.out.with_suffix(".md")
    write_text(md_path, render(results))
    log(f"wrote {args.out} and {md_path}")
    return 1 if failed else 0
