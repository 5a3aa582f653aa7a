"""What the training stages (pretrain, sft) share: where to resume, curves, timings, interruption."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from minilm.checkpoint import read_meta
from minilm.config import TrainConfig
from minilm.distributed import Parallel, init, under_torchrun
from minilm.train import TrainResult, resume_point

from .deps import code_fingerprint


def resume_run_id(out_dir: Path, run_config: dict[str, Any], cfg: TrainConfig) -> str | None:
    """The MLflow run to reopen: the one ``last`` was logging to, when training continues from ``last``
    (an interrupted run, or a finished one given more steps). A run that branches from WSD's stable
    point, or starts afresh, opens a new MLflow run."""
    point = resume_point(out_dir, run_config, cfg)
    if point is None or point.name != "last.safetensors":
        return None
    return read_meta(point).get("extra", {}).get("mlflow_run_id")


def stage_fingerprint(stage: str) -> str:
    """The code a stage's checkpoints depend on: its import closure (see :mod:`stages.deps`)."""
    return code_fingerprint(f"stages.{stage}")


def write_curves(history: list[dict[str, Any]], out_dir: Path, title: str) -> None:
    """history.csv (DVC plots) and loss.png (a picture that opens offline) of a training run."""
    from .plots import plot_curves, write_table_csv

    write_table_csv(history, out_dir / "history.csv")
    plot_curves(history, out_dir / "loss.png", title=title)


def timings(result: TrainResult) -> dict[str, Any]:
    """What this run measured (wall time, throughput): the only figures that differ between two runs of
    the same params, so they go to the run record (``out/runs/<stage>.json``) and MLflow, never into a
    file DVC caches."""
    speeds = [r["tokens_per_sec"] for r in result.throughput]
    return {"train_seconds": result.seconds, "resumed_from_step": result.resumed_from,
            "mean_tokens_per_sec": sum(speeds) / len(speeds) if speeds else 0.0,
            "throughput": result.throughput, "tf32_matmul": result.tf32}


def stop_if_interrupted(stage: str, result: TrainResult) -> None:
    """After SIGINT/SIGTERM the trainer saved `last` and returned early: end the stage as interrupted
    (the MLflow run is marked KILLED, no outputs are written, DVC records nothing, exit code 130)."""
    if result.interrupted:
        print(f"{stage}: interrupted at step {result.step}; `last` saved - rerun the stage (or "
              "`dvc repro`) to continue", flush=True)
        raise KeyboardInterrupt


def start_ranks(stage: str, params: Any, argv: list[str] | None) -> Parallel | None:
    """This process's place among the training ranks (:func:`minilm.distributed.init`: one process, or
    a rank torchrun started). None when params ask for ``distributed.nproc_per_node`` > 1 outside
    torchrun: this process then ran the stage as that many ranks (:mod:`stages.launch`), which are done."""
    cfg = params.distributed
    if cfg.nproc_per_node > 1 and not under_torchrun():
        from .launch import run_under_torchrun

        run_under_torchrun(stage, ["-m", f"stages.{stage}", *(sys.argv[1:] if argv is None else argv)], cfg)
        return None
    return init(cfg, params.project.device)


def global_config(cfg: TrainConfig, par: Parallel) -> TrainConfig:
    """``cfg`` as checkpoints record it: ``grad_accum`` counts the micro-batches of a step over all ranks,
    so ``last`` resumes at another world size with the same global batch (2 ranks x accumulation 1 =
    1 rank x accumulation 2) and no other (the global batch would change mid-run)."""
    return dataclasses.replace(cfg, grad_accum=cfg.grad_accum * par.world)


def rank_tags(par: Parallel) -> dict[str, Any]:
    """MLflow tags of a training run: how many processes shared it, and how."""
    return {"minilm.world_size": par.world, "minilm.strategy": par.strategy if par.active else "none"}
