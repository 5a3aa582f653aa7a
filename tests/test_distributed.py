"""Data-parallel training under real torchrun: 2 processes, gloo, 127.0.0.1 (tests/distkit.py runs).

One torchrun launch runs every 2-rank case (DDP and FSDP2, pretrain and LoRA SFT, the resumes); the
one-process references run in pytest itself. A second launch, through the stage's own launcher
(stages/launch.py), SIGKILLs a rank.

Tolerances: 2 ranks reduce the gradients in another order than one process sums them, so the runs agree
to float rounding, not bit for bit: measured 0 (DDP) and 1.5e-8 (FSDP2) on the weights, 2.4e-7 on the
losses, 1.1e-7 relative on the gradient norms. The bounds (weights 1e-5, losses 1e-5, norms 1e-4
relative) are far below what a gradient off by the world size gives (measured: norms off by 50%,
weights by 7.6e-3 pretrain / 8.1e-4 LoRA, with grad_clip below the norms) - the error of FSDP2's gloo
reduce-scatter summing instead of averaging (pytorch/pytorch#162338), which torch 2.13 does not have
and minilm does not rely on (it reduces with sums, see minilm/distributed.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "tests" / "distkit.py"
sys.path.insert(0, str(ROOT / "tests"))

from distkit import run_case  # noqa: E402

from minilm.checkpoint import load_checkpoint  # noqa: E402

TWO_RANKS = ["pretrain-ddp", "pretrain-fsdp", "lora-ddp", "lora-fsdp", "dpo-ddp", "dpo-fsdp",
             "pretrain-fsdp+ema:ema",
             "pretrain-fsdp+nan@3:nan",            # rank 1's step 4 is non-finite
             "pretrain-fsdp:r12",                  # continues a 1-process run at 2 ranks
             "pretrain-ddp+stop@3:r21", "lora-fsdp+stop@3:r21lora"]   # stop at 4, continued by 1


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def torchrun(workdir: Path, *cases: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(KIT), str(workdir), *cases]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)


def result(workdir: Path, name: str, rank: int = 0, world: int | None = None) -> dict:
    """What a rank saw (``world``: of the run at that world size; default: 2 ranks if there was one)."""
    if world is None:
        world = 2 if (workdir / f"{name}.w2.r{rank}.json").exists() else 1
    return json.loads((workdir / f"{name}.w{world}.r{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    for kind in ("pretrain", "lora", "dpo"):   # one process, the same global batch (2 x 1 = 1 x 2)
        run_case(f"{kind}-ddp:ref-{kind}", work, grad_accum=2)
    run_case("pretrain-ddp+ema:ref-ema", work, grad_accum=2)
    run_case("pretrain-ddp+nan@3:ref-nan", work, grad_accum=2)
    stopped = run_case("pretrain-fsdp+stop@3:r12", work, grad_accum=2)
    assert stopped.interrupted and stopped.step == 4
    proc = torchrun(work, *TWO_RANKS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for tag in ("r21", "r21lora"):             # 2 ranks stopped at step 4: continue with one
        run_case(("pretrain" if tag == "r21" else "lora") + f"-ddp:{tag}", work, grad_accum=2)
    return work


def assert_same_run(work: Path, name: str, ref: str, world: int | None = None) -> None:
    a, b = load_checkpoint(work / ref / "last.safetensors"), load_checkpoint(work / name / "last.safetensors")
    assert a.step == b.step == 8 and a.model_state.keys() == b.model_state.keys()
    dw = max((a.model_state[k] - b.model_state[k]).abs().max().item() for k in a.model_state)
    moments = [(a.optimizer_state["state"][p][k] - b.optimizer_state["state"][p][k]).abs().max().item()
               for p in a.optimizer_state["state"] for k in ("exp_avg", "exp_avg_sq")]
    assert dw <= 1e-5 and max(moments) <= 1e-5, (name, dw, max(moments))
    ha, hb = result(work, ref)["history"], result(work, name, world=world)["history"]
    assert [r["step"] for r in ha] == [r["step"] for r in hb]
    for x, y in zip(ha, hb):
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert y.get("val_loss", 0.0) == pytest.approx(x.get("val_loss", 0.0), abs=1e-5)


@pytest.mark.parametrize("case", ["pretrain-ddp", "pretrain-fsdp", "lora-ddp", "lora-fsdp", "dpo-ddp",
                                  "dpo-fsdp"])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(runs, case):
    assert_same_run(runs, case, "ref-" + case.split("-")[0])
    assert result(runs, case, 1)["history"] == result(runs, case, 0)["history"]   # the ranks agree


def test_dpo_figures_are_reduced_over_the_ranks(runs):
    """The rewards a 2-rank DPO run logs are those of the whole global batch (each rank holds half the
    pairs), equal to one process's; the frozen base stays frozen on every rank."""
    ref, two = result(runs, "ref-dpo")["history"], result(runs, "dpo-ddp")["history"]
    for x, y in zip(ref, two):
        for key in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected",
                    "val_rewards/margins"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-5, rel=1e-4), (key, x["step"])
    assert any("rewards/margins" in r for r in two) and any("val_rewards/margins" in r for r in two)
    assert all(result(runs, "dpo-fsdp", rank)["base_change"] == 0.0 for rank in (0, 1))


def test_ema_under_fsdp_equals_one_rank(runs):
    assert_same_run(runs, "ema", "ref-ema")
    a, b = (load_checkpoint(runs / name / "last.safetensors") for name in ("ref-ema", "ema"))
    assert max((a.ema_state[k] - b.ema_state[k]).abs().max().item() for k in a.ema_state) <= 1e-5
    a, b = (load_checkpoint(runs / name / "best.safetensors") for name in ("ref-ema", "ema"))
    assert max((a.model_state[k] - b.model_state[k]).abs().max().item() for k in a.model_state) <= 1e-5


def test_a_non_finite_step_on_one_rank_is_skipped_by_all(runs):
    seen = [result(runs, "nan", rank) for rank in (0, 1)]
    assert [(r["skipped"], r["step"]) for r in seen] == [(1, 8), (1, 8)]
    assert 4 not in [row["step"] for row in seen[0]["history"]]
    assert seen[0]["history"] == seen[1]["history"]
    assert_same_run(runs, "nan", "ref-nan")        # one process skips the same step


def test_only_rank_0_writes(runs):
    # every rank trains into its own out_dir; rank 1's is never created
    assert (runs / "pretrain-ddp" / "last.safetensors").exists()
    assert not [p.name for p in runs.iterdir() if ".rank" in p.name]


def test_lora_under_fsdp_keeps_the_base_frozen_and_saves_only_the_adapter(runs):
    for rank in (0, 1):
        assert result(runs, "lora-fsdp", rank)["base_change"] == 0.0
    for name in ("last", "best"):
        keys = load_checkpoint(runs / "lora-fsdp" / f"{name}.safetensors").model_state
        assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)


def test_resume_across_world_sizes(runs):
    r12 = result(runs, "r12")
    assert (r12["world"], r12["resumed_from"], r12["step"]) == (2, 4, 8)      # 1 -> 2 (FSDP)
    assert_same_run(runs, "r12", "ref-pretrain")
    for tag, ref in (("r21", "ref-pretrain"), ("r21lora", "ref-lora")):       # 2 -> 1 (DDP, FSDP)
        resumed = result(runs, tag, world=1)
        assert (resumed["resumed_from"], resumed["step"]) == (4, 8)
        assert_same_run(runs, tag, ref, world=1)


def test_a_stop_is_decided_by_all_ranks(runs):
    # SIGTERM reached rank 1 alone, while step 4's batch was drawn: both ranks finished that step,
    # saved `last` and stopped
    for tag in ("r21", "r21lora"):
        seen = [result(runs, tag, rank, world=2) for rank in (0, 1)]
        assert [(r["interrupted"], r["step"]) for r in seen] == [(True, 4), (True, 4)]


def test_a_killed_rank_stops_the_others_with_one_line_and_a_rerun_resumes(tmp_path):
    code = ("import sys; from minilm.errors import run_main; from minilm.config import DistributedConfig; "
            "from stages.launch import run_under_torchrun; "
            "sys.exit(run_main(lambda a: run_under_torchrun('pretrain', sys.argv[1:], "
            "DistributedConfig(nproc_per_node=2))))")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(KIT), str(tmp_path), "pretrain-ddp+kill@5:k"],
                          env=env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert elapsed < 60
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert any("rank 1 of 2 was killed by SIGKILL" in line for line in errors), lines
    assert all(line.startswith("error:") for line in lines), lines          # nothing but those lines
    rerun = run_case("pretrain-ddp:k", tmp_path, grad_accum=2)              # same global batch, 1 rank
    assert (rerun.resumed_from, rerun.step) == (4, 8)


def test_the_pretrain_stage_runs_itself_as_two_ranks_and_resumes(tmp_path):
    """`distributed.nproc_per_node: 2` makes `python -m stages.pretrain` (the DVC stage's cmd) run as 2
    ranks: one MLflow run, rank 0's outputs; raising max_steps then continues the finished run."""
    from test_pipeline import TINY, make_repo, merge, mlflow_runs, sh

    from minilm.config import TokenizerConfig
    from minilm.data import encode_corpus
    from minilm.tokenizer import train_tokenizer

    over = {"tokenizer": {"kind": "char"}, "distributed": {"nproc_per_node": 2, "timeout_s": 30},
            # cosine: a longer run continues from `last` in the same MLflow run (WSD would branch from
            # its stable point, step 6, in a new one: tests/test_train.py covers that)
            "pretrain": {"max_steps": 8, "batch_size": 4, "eval_every": 4, "log_every": 2, "schedule": "cosine"}}
    repo = make_repo(tmp_path / "repo", merge(TINY, over))
    corpus = repo / "data" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text((ROOT / "README.md").read_text() * 2)
    tok = train_tokenizer(corpus, repo / "out" / "tokenizer" / "tokenizer.json", TokenizerConfig(kind="char"))
    encode_corpus(corpus, tok, repo / "out" / "encoded", val_fraction=0.05, progress=False)
    proc = sh(repo, sys.executable, "-m", "stages.pretrain")
    assert "running 2 processes under torchrun" in proc.stdout and "x 2 processes" in proc.stdout
    assert proc.stdout.count("pretrain: best val loss") == 1          # rank 0 alone reports
    for name in ("best.safetensors", "metrics.json", "history.csv", "loss.png"):
        assert (repo / "out" / "pretrain" / name).exists()
    client, runs = mlflow_runs(repo)
    stage_runs = [r for r in runs if r.data.tags.get("dvc.stage") == "pretrain"]
    assert len(stage_runs) == 1
    run = stage_runs[0]
    assert run.data.tags["minilm.world_size"] == "2" and run.data.tags["minilm.strategy"] == "ddp"
    assert run.data.params["distributed.nproc_per_node"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2, 4, 6, 8]

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["max_steps"] = 12
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, sys.executable, "-m", "stages.pretrain")
    record = json.loads((repo / "out" / "runs" / "pretrain.json").read_text())
    assert record["resumed_from_step"] == 8 and record["run_id"] == run.info.run_id   # the same run
    assert json.loads((repo / "out" / "pretrain" / "metrics.json").read_text())["steps"] == 12
