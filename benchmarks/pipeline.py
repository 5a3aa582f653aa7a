"""Row 6: pipeline overhead - wall time per stage of the default ``dvc repro``, and of a ``dvc repro`` with
nothing to do.

It runs in a fresh git repository in a temporary directory holding a copy of the pipeline code (minilm/,
stages/, dvc.yaml, params.yaml, .dvc/config), so the project's own outputs are never touched. Each stage is
reproduced by its own ``dvc repro <stage>``, in dvc.yaml's order, and timed from outside; the stage's
MLflow run gives the time spent inside the run, so ``wall - in run`` is the overhead of DVC, the Python
start-up and imports. The baseline is DVC's own floor: a no-op ``dvc repro`` of a repository with one
trivial stage, timed alternately with ours.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .harness import ROOT, Context, line, median, median_ratio

# --quick: the tiny params of tests/test_pipeline.py
QUICK_PARAMS = {
    "project": {"progress": False},
    "data": {"corpus_max_mb": 0.15},
    "tokenizer": {"vocab_size": 384},
    "model": {"context_length": 64, "n_layer": 2, "n_head": 2, "d_model": 64},
    "pretrain": {"max_steps": 30, "batch_size": 8, "warmup_steps": 5, "eval_every": 15, "eval_batches": 2,
                 "log_every": 5},
    "sft": {"max_steps": 20, "batch_size": 8, "warmup_steps": 2, "eval_every": 10, "eval_batches": 2,
            "log_every": 5},
    "evaluate": {"batches": 4, "batch_size": 8, "sft_pairs": 40},
    "generate": {"prompts": ["The function", "A list"], "min_new_tokens": 5, "max_new_tokens": 12,
                 "sft_questions": 2},
}
# and for any training section added later and not listed above
QUICK_TRAINING = {"max_steps": 20, "batch_size": 8, "warmup_steps": 2, "eval_every": 10, "eval_batches": 2,
                  "log_every": 5}


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    e.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", GIT_AUTHOR_NAME="bench",
             GIT_AUTHOR_EMAIL="bench@example.com", GIT_COMMITTER_NAME="bench",
             GIT_COMMITTER_EMAIL="bench@example.com", PYTHONPATH="")
    return e


def sh(cwd: Path, *cmd: str) -> tuple[float, str]:
    """(seconds, stdout + stderr) of a command that must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}) in {cwd}:\n{out[-3000:]}")
    return seconds, out


def _merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in over.items():
        out.setdefault(section, {}).update(values)
    return out


def _git_init(path: Path) -> None:
    sh(path, "git", "init", "-q", "-b", "main")
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-qm", "init")


def quick_overrides(params: dict) -> dict:
    """QUICK_PARAMS, plus tiny step counts for every other section that trains (has ``max_steps``); only
    keys the section has are set, so the params stay valid."""
    out = {k: dict(v) for k, v in QUICK_PARAMS.items()}
    for section, values in params.items():
        if section not in out and isinstance(values, dict) and "max_steps" in values:
            out[section] = {k: v for k, v in QUICK_TRAINING.items() if k in values}
    return out


def make_repo(path: Path, overrides: dict) -> Path:
    """A fresh git + DVC repository holding the project's pipeline code and its params (with overrides)."""
    path.mkdir(parents=True)
    for name in ("minilm", "stages"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, path / name)
    (path / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")), overrides)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    _git_init(path)
    return path


def make_trivial_repo(path: Path) -> Path:
    """A git + DVC repository with one stage that writes one file: DVC's floor."""
    path.mkdir(parents=True)
    (path / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    (path / "dvc.yaml").write_text("stages:\n  touch:\n    cmd: echo done > out.txt\n    outs:\n"
                                   "      - out.txt:\n          cache: false\n", encoding="utf-8")
    (path / ".gitignore").write_text("/out.txt\n", encoding="utf-8")
    _git_init(path)
    sh(path, "dvc", "repro")
    return path


def mlflow_seconds(repo: Path) -> dict[str, float]:
    """Seconds inside each stage's MLflow run (by run name), or {} when they cannot be read."""
    try:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
        exp = client.get_experiment_by_name("minilm")
        if exp is None:
            return {}
        runs = client.search_runs([exp.experiment_id], max_results=500)
        return {r.info.run_name: (r.info.end_time - r.info.start_time) / 1000 for r in runs
                if r.info.end_time and r.info.start_time and not r.info.run_name.startswith("pipeline")}
    except Exception:
        return {}


def _model_results(repo: Path) -> list[dict[str, Any]]:
    """What the timed pipeline produced (out/evaluate and out/merge metrics), so the timing and the
    quality it bought are recorded together."""
    try:
        ev = json.loads((repo / "out" / "evaluate" / "metrics.json").read_text(encoding="utf-8"))
        merge = json.loads((repo / "out" / "merge" / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    base, sft = ev["base"], ev["sft"]
    return [
        line("base model val loss", "nats/token", base["val_text"]["loss"],
             perplexity=base["val_text"]["perplexity"], bits_per_byte=base["val_text"]["bits_per_byte"]),
        line("SFT response loss on held-out pairs", "nats/token", sft["sft_val_responses"]["loss"],
             baseline_name="base model, zero-shot with the template",
             baseline=base["sft_val_responses"]["loss"]),
        line("SFT model val loss (general text)", "nats/token", sft["val_text"]["loss"],
             bits_per_byte=sft["val_text"]["bits_per_byte"]),
        line("merge: largest absolute logit difference, merged vs base+adapter", "logits",
             merge["max_abs_logit_diff"]),
    ]


def run(ctx: Context) -> dict[str, Any]:
    if shutil.which("dvc") is None or shutil.which("git") is None:
        return {"skipped": "dvc or git is not on PATH", "lines": [], "notes": []}
    if ctx.quick:
        overrides = quick_overrides(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    else:
        overrides = {"project": {"progress": False}}
    with tempfile.TemporaryDirectory(prefix="minilm-bench-pipeline-") as tmp:
        repo = make_repo(Path(tmp) / "repo", overrides)
        trivial = make_trivial_repo(Path(tmp) / "trivial")
        stages = list(yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
        walls: dict[str, float] = {}
        ran: dict[str, list[str]] = {}
        for stage in stages:
            ctx.log(f"  pipeline: dvc repro {stage}")
            walls[stage], out = sh(repo, "dvc", "repro", stage)
            ran[stage] = re.findall(r"Running stage '([^']+)'", out)
        inside = mlflow_seconds(repo)
        noop: list[float] = []
        floor: list[float] = []
        for r in range(3 if ctx.quick else 5):
            pair = [(noop, repo), (floor, trivial)]
            for sink, where in (pair if r % 2 == 0 else pair[::-1]):
                seconds, out = sh(where, "dvc", "repro")
                if "Running stage" in out:
                    raise RuntimeError(f"a second `dvc repro` in {where} ran a stage:\n{out[-2000:]}")
                sink.append(seconds)
        status_s, _ = sh(repo, "dvc", "status")
        results = _model_results(repo)
    lines = []
    for stage in stages:
        t_in = inside.get(stage)
        lines.append(line(f"dvc repro {stage}", "s", walls[stage], in_run_s=t_in,
                          overhead_s=(walls[stage] - t_in) if t_in is not None else None,
                          stages_run=ran[stage]))
    lines.append(line("dvc repro, all stages", "s", sum(walls.values()),
                      in_run_s=sum(inside.get(s, 0.0) for s in stages) if inside else None))
    lines.append(line("no-op dvc repro", "s", median(noop),
                      baseline_name="no-op dvc repro, one trivial stage", baseline=median(floor),
                      ratio=median_ratio(floor, noop)))
    lines.append(line("dvc status (nothing changed)", "s", status_s))
    lines += results
    notes = [f"{'tiny params of tests/test_pipeline.py (--quick)' if ctx.quick else 'default params.yaml'} "
             "in a temporary git repo; each stage timed as its own `dvc repro <stage>` in dvc.yaml order "
             "(stages_run shows what each call ran); in_run_s = the stage's MLflow run duration; overhead = "
             "wall - in run (DVC, interpreter start-up, imports, run setup). Ratio of the no-op = DVC "
             "floor / ours (1 = no overhead beyond DVC's own)."]
    return {"lines": lines, "notes": notes}
