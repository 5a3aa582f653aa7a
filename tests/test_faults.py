"""Fault injection against the real stage processes: nothing lost, nothing let in.

- kill -9, SIGTERM and SIGINT of `python -m stages.pretrain` / `stages.sft` at several points; rerunning
  the stage resumes and ends bit-identical (CPU) to an uninterrupted run in another repo, in the same
  MLflow run, with no metric step logged twice or lost;
- torn writes: a writer killed or failing mid-write leaves the old complete file; a full disk (tmpfs)
  or a read-only output directory is one line and leaves the previous checkpoint intact;
- tracking: an unreachable server is refused at stage start; a server that dies mid-run does not stop
  pretraining and is reported at the end;
- safe loading: a pickle that runs code on a plain torch.load is refused without running it, and no
  path from params or an adapter can make minilm write outside its output directories.

Bad params, data, checkpoints and numerics are in test_bad_input.py.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_pipeline import ROOT, TINY, env, make_repo, merge, sh

from minilm.checkpoint import read_meta
from minilm.errors import MinilmError
from conftest import wait_for_mlflow_server

pytestmark = pytest.mark.slow

# room after the last interruption: a tiny model in bf16 runs a step in a few ms, so a signal sent 50 ms
# after a save can land tens of steps later
PRETRAIN_STEPS, SFT_STEPS, DPO_STEPS = 100, 60, 60
FAULT = merge(TINY, {
    "data": {"corpus": "corpus_src.txt"},
    # `last` at every evaluation (10, 20, ...); one thread each, so two runs share the 2 cores
    "pretrain": {"max_steps": PRETRAIN_STEPS, "eval_every": 10, "log_every": 5, "save_every": 0,
                 "threads": 1},
    "sft": {"max_steps": SFT_STEPS, "eval_every": 10, "log_every": 5, "save_every": 0, "threads": 1},
    "dpo": {"max_steps": DPO_STEPS, "eval_every": 10, "log_every": 5, "save_every": 0, "threads": 1,
            "lora_dropout": 0.1},               # dropout: the resumed run must restore the RNG too
})


# --------------------------------------------------------------------------------------------------
# helpers


def write_corpus(path: Path) -> None:
    """~200 KB of real English (Python's pydoc topics)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    path.write_text(text[: text.rfind("\n", 0, 200_000) + 1], encoding="utf-8")


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def stage(repo: Path, name: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", f"stages.{name}", check=check)


def start_stage(repo: Path, name: str, log: str) -> tuple[subprocess.Popen, Path, Path]:
    out, err = repo / f"{log}.out", repo / f"{log}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{name}"], cwd=repo, env=env(),
                                stdout=fo, stderr=fe, text=True)
    return proc, out, err


def step_of(path: Path) -> int:
    """Step of a checkpoint, -1 while there is none."""
    try:
        return read_meta(path)["step"]
    except (MinilmError, OSError):
        return -1


def wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass
class Stop:
    """One interrupted invocation of a training stage."""

    signum: int
    seen_step: int      # `last` step observed when the signal was decided
    rc: int
    stdout: str
    stderr: str
    saved_step: int     # `last` step once the process was gone


def interrupt(repo: Path, name: str, signum: int, *, after_step: int, delay: float = 0.0) -> Stop:
    """Run stage ``name`` until its `last` holds a step >= ``after_step`` newer than what it started
    from, wait ``delay`` seconds, send ``signum`` and wait for the process to end."""
    last = repo / "out" / name / "last.safetensors"
    target = max(after_step, step_of(last) + 1)
    proc, out, err = start_stage(repo, name, f"{name}-{signum}-{target}")
    try:
        wait_for(proc, lambda: step_of(last) >= target, f"`last` reached step {target}")
        seen = step_of(last)
        time.sleep(delay)
        assert proc.poll() is None, f"{name} finished before it could be interrupted"
        proc.send_signal(signum)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Stop(signum, seen, rc, out.read_text(), err.read_text(), step_of(last))


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys(), (a, sorted(set(ta) ^ set(tb)))
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"


def history(path: Path) -> list[dict[str, str]]:
    """history.csv without the wall-clock column."""
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "tokens_per_sec"} for row in csv.DictReader(fh)]


def mlflow_history(repo: Path, stage_name: str, key: str) -> tuple[str, list[tuple[int, float]]]:
    """(run id, [(step, value)] sorted by step) of the only run named ``stage_name``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("minilm")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=500)
            if r.info.run_name == stage_name]
    assert len(runs) == 1, f"{len(runs)} MLflow runs named {stage_name!r}"
    assert runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    return rid, sorted((m.step, m.value) for m in client.get_metric_history(rid, key))


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*.tmp"))


def hashes(root: Path, *subdirs: str) -> dict[str, str]:
    from minilm.fileio import sha256_file

    return {str(p.relative_to(root)): sha256_file(p) for d in subdirs for p in sorted((root / d).rglob("*"))
            if p.is_file()}


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def set_params(repo: Path, edit: dict) -> None:
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), edit)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# --------------------------------------------------------------------------------------------------
# fixtures: one prepared repo, then pretrain (uninterrupted vs interrupted), then SFT likewise


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A repo with data/, out/tokenizer and out/encoded made by the real stages."""
    repo = make_repo(tmp_path_factory.mktemp("faults") / "prepared", FAULT)
    write_corpus(repo / "corpus_src.txt")
    for name in ("prepare", "tokenizer", "encode"):
        stage(repo, name)
    return repo


@pytest.fixture(scope="module")
def pretrain_runs(prepared, tmp_path_factory):
    """(uninterrupted repo, interrupted-and-rerun repo, [Stop, ...]) for pretraining."""
    base = tmp_path_factory.mktemp("pretrain")
    ref, chain = copy_repo(prepared, base / "ref"), copy_repo(prepared, base / "chain")
    ref_proc, _, ref_err = start_stage(ref, "pretrain", "uninterrupted")   # alongside the chain
    try:
        stops = [
            interrupt(chain, "pretrain", signal.SIGKILL, after_step=10),               # first `last`
            interrupt(chain, "pretrain", signal.SIGTERM, after_step=20, delay=0.05),   # between saves
            interrupt(chain, "pretrain", signal.SIGKILL, after_step=40, delay=0.05),   # mid-step
        ]
        # what a kill in the middle of saving `last` leaves: the rerun must clear it
        (chain / "out/pretrain/.last.safetensors.k1ll3d.tmp").write_bytes(b"torn")
        stage(chain, "pretrain")                                # runs to the end
    finally:
        ref_proc.wait(timeout=600)
    assert ref_proc.returncode == 0, ref_err.read_text()[-3000:]
    return ref, chain, stops


def stopped_and_rerun(source: Path, base: Path, name: str, second: int) -> tuple[Path, Path, list[Stop]]:
    """(uninterrupted repo, interrupted-and-rerun repo, [Stop, ...]) for stage ``name``, both copied from
    ``source``: the chain is killed (SIGKILL) after its first `last`, stopped with ``second`` between
    saves, then rerun to the end while the reference runs alongside."""
    ref, chain = copy_repo(source, base / "ref"), copy_repo(source, base / "chain")
    ref_proc, _, ref_err = start_stage(ref, name, "uninterrupted")
    try:
        stops = [
            interrupt(chain, name, signal.SIGKILL, after_step=10),
            interrupt(chain, name, second, after_step=20, delay=0.05),
        ]
        stage(chain, name)
    finally:
        ref_proc.wait(timeout=600)
    assert ref_proc.returncode == 0, ref_err.read_text()[-3000:]
    return ref, chain, stops


@pytest.fixture(scope="module")
def sft_runs(pretrain_runs, tmp_path_factory):
    return stopped_and_rerun(pretrain_runs[0], tmp_path_factory.mktemp("sft"), "sft", signal.SIGINT)


@pytest.fixture(scope="module")
def dpo_runs(sft_runs, tmp_path_factory):
    ref_sft = sft_runs[0]
    for name in ("merge", "preferences"):
        stage(ref_sft, name)
    return stopped_and_rerun(ref_sft, tmp_path_factory.mktemp("dpo"), "dpo", signal.SIGTERM)


# --------------------------------------------------------------------------------------------------
# 1. kill and resume


def _check_resume(ref: Path, chain: Path, name: str, stops: list[Stop], steps: int) -> None:
    out_ref, out = ref / "out" / name, chain / "out" / name
    # every interruption left a complete, loadable `last` and no step went backwards
    saved = [s.saved_step for s in stops]
    assert all(10 <= s < steps for s in saved) and saved == sorted(saved), saved
    for s in stops:
        if s.signum == signal.SIGKILL:
            assert s.rc == -signal.SIGKILL
    metrics, metrics_ref = (json.loads((d / "metrics.json").read_text()) for d in (out, out_ref))
    record = json.loads((chain / "out" / "runs" / f"{name}.json").read_text())
    assert record["resumed_from_step"] == stops[-1].saved_step
    # bit-identical weights, optimizer state and RNG state; equal losses
    for f in ("best.safetensors", "last.safetensors"):
        same_tensors(out / f, out_ref / f)
    assert read_meta(out / "last.safetensors")["step"] == steps
    for k, v in metrics_ref.items():
        if "loss" in k or "perplexity" in k or k in ("steps", "skipped_steps"):
            assert metrics[k] == v, k
    assert history(out / "history.csv") == history(out_ref / "history.csv")
    assert temp_files(chain / "out") == []


def test_pretrain_killed_and_resumed_equals_the_uninterrupted_run(pretrain_runs):
    ref, chain, stops = pretrain_runs
    _check_resume(ref, chain, "pretrain", stops, PRETRAIN_STEPS)


def test_sigterm_saves_last_before_exiting(pretrain_runs):
    stop = pretrain_runs[2][1]
    assert stop.signum == signal.SIGTERM and stop.rc == 130, stop.stderr[-2000:]
    m = re.search(r"interrupted at step (\d+); `last` saved", stop.stdout)
    assert m, stop.stdout
    assert stop.saved_step == int(m.group(1)) >= stop.seen_step >= 20
    assert "Traceback" not in stop.stderr


def test_sft_killed_and_resumed_equals_the_uninterrupted_run(sft_runs):
    ref, chain, stops = sft_runs
    _check_resume(ref, chain, "sft", stops, SFT_STEPS)
    same_tensors(chain / "out/sft/tuned/adapter_model.safetensors",
                 ref / "out/sft/tuned/adapter_model.safetensors")


def test_dpo_killed_and_resumed_equals_the_uninterrupted_run(dpo_runs):
    """DPO through the stage: killed (SIGKILL, then SIGTERM) and rerun, it ends bit-identical to a run
    never stopped: checkpoints, the PEFT adapter, the merged model, every logged figure."""
    ref, chain, stops = dpo_runs
    _check_resume(ref, chain, "dpo", stops, DPO_STEPS)
    for rel in ("adapter/adapter_model.safetensors", "model.safetensors"):
        same_tensors(chain / "out/dpo" / rel, ref / "out/dpo" / rel)
    assert "rewards/margins" in history(chain / "out/dpo/history.csv")[0]


def test_sigint_saves_last_before_exiting(sft_runs):
    stop = sft_runs[2][-1]
    assert stop.rc == 130, stop.stderr[-2000:]
    m = re.search(r"interrupted at step (\d+); `last` saved", stop.stdout)
    assert m and stop.saved_step == int(m.group(1)) >= stop.seen_step >= 20, stop.stdout


@pytest.mark.parametrize("name", ["pretrain", "sft", "dpo"])
def test_resumed_stage_continues_one_mlflow_run_without_duplicate_or_missing_steps(name, request):
    ref, chain, _ = request.getfixturevalue(f"{name}_runs")
    steps = {"pretrain": PRETRAIN_STEPS, "sft": SFT_STEPS, "dpo": DPO_STEPS}[name]
    run_id, hist = mlflow_history(chain, name, "train_loss")
    _, hist_ref = mlflow_history(ref, name, "train_loss")
    assert [s for s, _ in hist] == list(range(5, steps + 1, 5))        # no duplicates, no gaps
    assert hist == hist_ref                                              # and the same values
    _, val = mlflow_history(chain, name, "val_loss")
    assert [s for s, _ in val] == list(range(10, steps + 1, 10))
    assert json.loads((chain / "out" / "runs" / f"{name}.json").read_text())["run_id"] == run_id
    assert read_meta(chain / "out" / name / "last.safetensors")["extra"]["mlflow_run_id"] == run_id


# --------------------------------------------------------------------------------------------------
# 2. torn writes, full disk, read-only directory

_SLOW_WRITER = """
import sys, time
from minilm.fileio import atomic_write
with atomic_write(sys.argv[1], "wb") as fh:
    fh.write(b"new" * 100_000)
    fh.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def test_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_bytes(b"old complete file")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        torn = [p for p in tmp_path.iterdir() if p != target]
        assert len(torn) == 1 and torn[0].stat().st_size == 300_000      # the new bytes, off to the side
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_bytes() == b"old complete file"
    # the next successful write of that target clears what the killed writer left behind
    from minilm.fileio import remove_stale_temps, write_json

    remove_stale_temps(target)
    write_json(target, {"ok": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert json.loads(target.read_text()) == {"ok": 1}


def test_exception_mid_write_leaves_the_old_file_and_no_temp(tmp_path):
    from minilm.fileio import atomic_write

    target = tmp_path / "tokens.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target) as fh:
        fh.write(b"partial" * 1000)
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["tokens.bin"]


def test_atomic_write_never_writes_through_a_hard_link(tmp_path):
    """A file hard-linked elsewhere (e.g. a DVC cache) keeps its bytes when the artifact is rewritten."""
    from minilm.fileio import write_text

    cache, target = tmp_path / "cache", tmp_path / "out.txt"
    cache.write_text("cached")
    os.link(cache, target)
    write_text(target, "rewritten")
    assert cache.read_text() == "cached" and target.read_text() == "rewritten"


_FSIZE_WRITER = """
import resource, signal, sys
from pathlib import Path
from minilm.cli import run_main

def main(argv):
    kind, where = sys.argv[1], Path(sys.argv[2])
    if kind == "checkpoint":
        from minilm.checkpoint import save_checkpoint
        from minilm.config import ModelConfig
        from minilm.model import GPT
        model = GPT(ModelConfig(vocab_size=256, context_length=32, n_layer=2, n_head=2, d_model=64))
        write = lambda: save_checkpoint(where / "last.safetensors", model, step=7)
    else:
        from minilm.data import encode_corpus
        from minilm.tokenizer import load_tokenizer
        tok = load_tokenizer(where / "tokenizer.json")
        write = lambda: encode_corpus(where / "corpus.txt", tok, where / "encoded", val_fraction=0.2,
                                      progress=False)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    write()

raise SystemExit(run_main(main))
"""


@pytest.mark.parametrize("kind", ["checkpoint", "tokens"])
def test_write_failing_part_way_keeps_the_previous_file(kind, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes a checkpoint or token file write fail part-way through."""
    from minilm.checkpoint import save_checkpoint
    from minilm.config import ModelConfig, TokenizerConfig
    from minilm.data import encode_corpus
    from minilm.model import GPT
    from minilm.tokenizer import build_char_tokenizer

    if kind == "checkpoint":
        save_checkpoint(tmp_path / "last.safetensors", GPT(ModelConfig(
            vocab_size=16, context_length=8, n_layer=1, n_head=2, d_model=8)), step=3)
        target = tmp_path / "last.safetensors"
    else:
        write_corpus(tmp_path / "corpus.txt")
        tok = build_char_tokenizer(tmp_path / "corpus.txt", tmp_path / "tokenizer.json",
                                   TokenizerConfig(kind="char"))
        encode_corpus(tmp_path / "corpus.txt", tok, tmp_path / "encoded", val_fraction=0.1, progress=False)
        target = tmp_path / "encoded" / "train.bin"
    before = hashes(tmp_path, ".")
    proc = subprocess.run([sys.executable, "-c", _FSIZE_WRITER, kind, str(tmp_path)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120, check=False)
    one_line_error(proc, str(target), "file too large", "previous file was left intact")
    assert hashes(tmp_path, ".") == before and temp_files(tmp_path) == []


@pytest.fixture
def mount_point(tmp_path):
    """Mount helper for root: ``mount(dir, *opts)`` mounts a tmpfs (or a bind) there; undone at teardown."""
    mounted: list[Path] = []

    def mount(where: Path, *args: str) -> None:
        proc = subprocess.run(["mount", *args, str(where)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount here ({proc.stderr.strip()[:100]})")
        mounted.append(where)

    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting needs root")
    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@pytest.fixture
def trained(pretrain_runs, tmp_path) -> Path:
    """A copy of the uninterrupted pretraining repo (its out/pretrain holds a finished run)."""
    return copy_repo(pretrain_runs[0], tmp_path / "repo")


def _move_onto_mount(repo: Path, mount, *opts: str) -> dict[str, str]:
    out = repo / "out" / "pretrain"
    saved = repo / "saved"
    shutil.copytree(out, saved)
    mount(out, *opts)
    for f in saved.iterdir():
        shutil.copy2(f, out / f.name)
    return hashes(repo, "out")


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(trained, mount_point):
    out = trained / "out" / "pretrain"
    used = sum(f.stat().st_size for f in out.iterdir())
    # a tmpfs just big enough for what is there: the next checkpoint cannot be written
    before = _move_onto_mount(trained, mount_point, "-t", "tmpfs", "-o", f"size={used + 64 * 1024}",
                              "tmpfs")
    proc = stage(trained, "pretrain", check=False)
    one_line_error(proc, "no space left on device", "free some disk space",
                   "previous file was left intact")
    assert hashes(trained, "out") == before
    assert temp_files(out) == []


def test_read_only_output_directory_is_refused_before_training(trained, mount_point):
    out = trained / "out" / "pretrain"
    mount_point(out, "--bind", str(out))
    mount_point(out, "-o", "remount,bind,ro")
    before = hashes(trained, "out")
    proc = stage(trained, "pretrain", check=False)
    # the directory itself is named: it was checked before the first training step
    one_line_error(proc, "cannot write out/pretrain:", "read-only", "make the directory writable")
    assert hashes(trained, "out") == before


@pytest.mark.parametrize("name", ["evaluate", "generate", "preferences"])
def test_a_read_only_output_directory_is_refused_before_any_work(trained, mount_point, name):
    """The stages that decode or score check that they can write before loading a model (here none has
    been made: merge never ran, so the refusal can only come from the check made first)."""
    out = trained / "out" / name
    out.mkdir(parents=True, exist_ok=True)
    mount_point(out, "--bind", str(out))
    mount_point(out, "-o", "remount,bind,ro")
    before = hashes(trained, "out")
    proc = stage(trained, name, check=False)
    one_line_error(proc, f"cannot write out/{name}:", "read-only", "make the directory writable")
    assert hashes(trained, "out") == before


# --------------------------------------------------------------------------------------------------
# 4. tracking


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_is_refused_at_stage_start(prepared, tmp_path):
    repo = copy_repo(prepared, tmp_path / "repo")
    url = f"http://127.0.0.1:{_free_port()}"                # nothing listens there
    set_params(repo, {"mlflow": {"tracking_uri": url, "timeout_s": 2}})
    before = hashes(repo, "data", "out")
    proc = stage(repo, "pretrain", check=False)
    one_line_error(proc, f"MLflow tracking server {url} is not reachable", "start a server",
                   "mlflow.tracking_uri")
    assert hashes(repo, "data", "out") == before and not (repo / "out/pretrain").exists()


@pytest.fixture
def mlflow_server(prepared, tmp_path):
    """A real `mlflow server` (its store starts as a copy of an initialised sqlite database)."""
    port = _free_port()
    shutil.copy(prepared / "mlflow.db", tmp_path / "server.db")
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    cmd = ([exe] if exe else [sys.executable, "-m", "mlflow"]) + [
        "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "artifacts")]
    with open(tmp_path / "server.log", "wb") as log:      # own process group: uvicorn is a child
        proc = subprocess.Popen(cmd, cwd=tmp_path, env={**env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_mlflow_server(url, proc, tmp_path / "server.log", timeout_s=90)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_tracking_server_dying_mid_run_does_not_stop_pretraining(prepared, mlflow_server, tmp_path):
    url, server = mlflow_server
    repo = copy_repo(prepared, tmp_path / "repo")
    set_params(repo, {"mlflow": {"tracking_uri": url, "timeout_s": 2, "flush_every": 5}})
    proc, _, err = start_stage(repo, "pretrain", "served")
    try:
        wait_for(proc, lambda: step_of(repo / "out/pretrain/last.safetensors") >= 10, "step 10")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert rc == 0, stderr[-3000:]
    metrics = json.loads((repo / "out/pretrain/metrics.json").read_text())
    assert metrics["steps"] == PRETRAIN_STEPS
    rows = history(repo / "out/pretrain/history.csv")
    assert [int(r["step"]) for r in rows] == list(range(5, PRETRAIN_STEPS + 1, 5))
    assert all(r["train_loss"] for r in rows)
    assert "warning: MLflow tracking failed" in stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert "tracking call(s) failed" in warnings[-1] and url in warnings[-1]
    assert "Traceback" not in stderr


# --------------------------------------------------------------------------------------------------
# 5. safe loading


class _Payload:
    """Unpickling this creates ``marker`` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickles(tmp_path: Path, marker: Path) -> dict[str, bytes]:
    """Two malicious files that create ``marker`` when loaded with a plain torch.load / pickle.load."""
    zip_file = tmp_path / "payload.pt"
    torch.save({"model": _Payload(str(marker)), "weight": torch.zeros(2)}, zip_file)
    return {"torch.save": zip_file.read_bytes(), "pickle": pickle.dumps(_Payload(str(marker)), protocol=4)}


def test_the_planted_pickles_do_run_code_on_a_plain_load(tmp_path):
    """Control: the payloads are real - a plain torch.load runs them."""
    marker = tmp_path / "pwned"
    for kind, blob in plant_pickles(tmp_path, marker).items():
        (tmp_path / "evil.bin").write_bytes(blob)
        subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                        str(tmp_path / "evil.bin")], cwd=ROOT, env=env(), capture_output=True, timeout=120,
                       check=False)
        assert marker.exists(), kind
        marker.unlink()


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_planted_malicious_checkpoint_and_adapter_are_refused_without_running(kind, sft_runs, tmp_path):
    from minilm.checkpoint import load_checkpoint, load_model
    from minilm.errors import CheckpointError
    from minilm.adapter import load_adapter, read_adapter
    from minilm.model import GPT

    repo = copy_repo(sft_runs[0], tmp_path / "repo")
    marker = tmp_path / "pwned"
    blob = plant_pickles(tmp_path, marker)[kind]
    adapter, base = repo / "out/sft/tuned", repo / "out/pretrain/best.safetensors"
    model = GPT(load_checkpoint(base).model_config)

    (adapter / "adapter_model.safetensors").write_bytes(blob)
    base.write_bytes(blob)
    for load in (read_meta, load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match="pickle.*never unpickles"):
            load(base)
    with pytest.raises(CheckpointError, match="pickle.*never unpickles"):
        read_adapter(adapter)
    with pytest.raises(CheckpointError, match="pickle.*never unpickles"):
        load_adapter(adapter, model)
    if kind == "torch.save":         # the real stages: the base model, then the adapter
        for name in ("sft", "evaluate"):
            one_line_error(stage(repo, name, check=False), str(base.relative_to(repo)), "pickle")
        shutil.copy(sft_runs[0] / "out/pretrain/best.safetensors", base)
        one_line_error(stage(repo, "merge", check=False), "adapter_model.safetensors", "pickle",
                       "never unpickles")
    assert not marker.exists()


def test_nothing_is_unpickled_anywhere_in_minilm_or_the_stages():
    """Every torch.load passes weights_only=True; no pickle.load, np.load(allow_pickle) or read_pickle."""
    offenders = []
    for path in sorted([*(ROOT / "minilm").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if not re.search(r"weights_only\s*=\s*True", m.group(0)):
                offenders.append(f"{path.name}: {m.group(0)[:60]}")
        for bad in (r"pickle\.loads?\(", r"allow_pickle\s*=\s*True", r"read_pickle\(", r"dill\.", r"joblib\.load"):
            offenders += [f"{path.name}: {bad}" for _ in re.finditer(bad, text)]
    assert offenders == []


def test_safe_join_refuses_every_way_out(tmp_path):
    from minilm.fileio import safe_join

    root = tmp_path / "out" / "sft"
    root.mkdir(parents=True)
    (root / "link").symlink_to(tmp_path)
    assert safe_join(root, "adapter/adapter_model.safetensors") == (root / "adapter" /
                                                                   "adapter_model.safetensors").resolve()
    for bad in ("../pretrain/best.safetensors", "/etc/passwd", "adapter/../../x", "link/escaped"):
        with pytest.raises(MinilmError, match="escapes its output directory") as err:
            safe_join(root, bad)
        assert "\n" not in str(err.value)


def test_adapter_is_written_only_inside_its_directory(tmp_path):
    """Even with a symlink planted where the adapter goes, nothing outside the adapter dir is written."""
    from minilm.config import ModelConfig
    from minilm.adapter import save_adapter
    from minilm.lora import LoRAConfig, inject_lora
    from minilm.model import GPT

    model = GPT(ModelConfig(vocab_size=32, context_length=8, n_layer=1, n_head=2, d_model=8))
    cfg = LoRAConfig(rank=2, alpha=4)
    inject_lora(model, cfg)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_model.safetensors").symlink_to(victim)
    with pytest.raises(MinilmError, match="escapes its output directory"):
        save_adapter(out, model, cfg, base_sha256=None, base_config=model.config)
    assert victim.read_text() == "precious"


def test_experiment_name_cannot_move_artifacts_out_of_the_store(tmp_path):
    """mlflow.experiment comes from params; the artifact location stays under <db dir>/mlartifacts."""
    from stages.tracking import TrackingConfig, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("..", "../../etc", "."):
        with start_run(TrackingConfig(tracking_uri=uri, experiment=name), "prepare", {}) as run:
            pass
        from mlflow import MlflowClient

        location = MlflowClient(tracking_uri=uri).get_experiment(
            MlflowClient(tracking_uri=uri).get_run(run.run_id).info.experiment_id).artifact_location
        path = Path(location.removeprefix("file://")).resolve()
        assert (tmp_path / "mlartifacts").resolve() in path.parents, (name, location)
