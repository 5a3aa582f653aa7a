"""MLflow tracking against real stores: a sqlite file and a real `mlflow server` process.

Also covers the run record (runinfo) and the offline plots/tables that stages log next to it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from minilm.config import build
from minilm.errors import ConfigError, TrackingError
from stages.plots import plot_curves, write_table_csv, write_table_tsv
from stages.runinfo import run_info
from stages.tracking import TrackingConfig, check_tracking, flatten_params, resolve_uri, start_run
from conftest import wait_for_mlflow_server


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its schema takes ~1.5 s); tests use own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _cfg(uri: str, experiment: str, **kw) -> TrackingConfig:
    return build(TrackingConfig, {"tracking_uri": uri, "experiment": experiment, **kw}, "mlflow")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# config and URIs


def test_config_and_uri_resolution(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="flush_every must be >= 1"):
        build(TrackingConfig, {"flush_every": 0}, "mlflow")
    with pytest.raises(ConfigError, match="did you mean 'tracking_uri'"):
        build(TrackingConfig, {"tracking_url": "x"}, "mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert resolve_uri("") == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))      # dvc exp run --temp: the real repo
    assert resolve_uri("") == f"sqlite:///{tmp_path.resolve() / 'repo' / 'mlflow.db'}"
    assert resolve_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_uri("") == "http://127.0.0.1:5000"
    assert resolve_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path.resolve() / 'sub' / 'x.db'}"
    assert check_tracking(resolve_uri("sqlite:///sub/x.db")) and (tmp_path / "sub").is_dir()
    assert flatten_params({"model": {"d_model": 64, "ffn": {"mult": 2.5}}, "seed": 1, "tags": []}) == {
        "model.d_model": 64, "model.ffn.mult": 2.5, "seed": 1, "tags": []}


def test_closed_port_is_a_one_line_tracking_error():
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(TrackingError) as info:
        check_tracking(uri, timeout=2)
    msg = str(info.value)
    assert uri in msg and "mlflow server --host 127.0.0.1" in msg and "\n" not in msg
    with pytest.raises(TrackingError, match="not reachable"):
        start_run(TrackingConfig(tracking_uri=uri, timeout_s=2), "prepare", {})


# --------------------------------------------------------------------------------------------------
# sqlite store


def test_run_logs_params_batched_metrics_tags_and_artifacts(sqlite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-fox")
    monkeypatch.delenv("DVC_STAGE", raising=False)
    repo = tmp_path / "gitrepo"              # the run starts inside a git repo with a known commit
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    (repo / "params.yaml").write_text("model: {}\n")
    git("add", "params.yaml")
    git("commit", "-qm", "init")
    commit = git("rev-parse", "HEAD")
    monkeypatch.chdir(repo)
    cfg = _cfg(sqlite_uri, "logging", flush_every=7)
    params = {"model": {"d_model": 64, "n_head": 4}, "train": {"lr": 1e-3, "betas": [0.9, 0.95]}}
    run = start_run(cfg, "pretrain", params, tags={"note": "tiny"})
    for step in range(3):
        run.log_metrics({"train_loss": 5.0 - step}, step)
    assert _history(sqlite_uri, run.run_id, "train_loss") == []      # still buffered (3 < 7)
    for step in range(3, 10):
        run.log_metrics({"train_loss": 5.0 - step, "lr": 1e-3 * step}, step)
        if step % 5 == 0:
            run.log_metrics({"val_loss": 4.5 - step / 10}, step)
    assert len(_history(sqlite_uri, run.run_id, "train_loss")) >= 7    # flushed in batches meanwhile
    artifact = tmp_path / "metrics.json"
    artifact.write_text('{"loss": 1.5}', encoding="utf-8")
    assert run.log_artifact(artifact, "reports")
    assert run.log_dict({"a": 1}, "config.json")
    assert not run.log_checkpoint(artifact)                          # log_checkpoints is off
    assert run.close() == [] and run.status == "FINISHED"

    client = _client(sqlite_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "pretrain"
    assert got.data.params == {"model.d_model": "64", "model.n_head": "4", "train.lr": "0.001",
                               "train.betas": "[0.9, 0.95]"}
    assert _history(sqlite_uri, run.run_id, "train_loss") == [(s, 5.0 - s) for s in range(10)]
    assert _history(sqlite_uri, run.run_id, "val_loss") == [(5, 4.0)]
    lr = _history(sqlite_uri, run.run_id, "lr")
    assert [s for s, _ in lr] == list(range(3, 10)) and math.isclose(lr[-1][1], 9e-3)
    tags = got.data.tags
    assert tags["minilm.stage"] == "pretrain" and tags["note"] == "tiny"
    assert tags["dvc.exp_name"] == "brisk-fox" and "dvc.stage" not in tags
    assert tags["minilm.info.python"] == run_info()["python"]
    assert len(commit) == 40 and tags["mlflow.source.git.commit"] == commit
    assert "mlflow.parentRunId" not in tags
    listed = {a.path for a in client.list_artifacts(run.run_id)}
    assert listed == {"reports", "config.json"}
    local = client.download_artifacts(run.run_id, "reports/metrics.json", str(tmp_path / "dl"))
    assert Path(local).read_text(encoding="utf-8") == '{"loss": 1.5}'
    # artifacts live beside the database, not in the directory the tests run from
    db_dir = Path(sqlite_uri[len("sqlite:///"):]).parent
    assert (db_dir / "mlartifacts" / "logging").is_dir()


def test_context_manager_sets_failed_and_killed(sqlite_uri):
    cfg = _cfg(sqlite_uri, "statuses")
    with pytest.raises(RuntimeError):
        with start_run(cfg, "train", {}) as failed:
            failed.log_metrics({"loss": 1.0}, 0)
            raise RuntimeError("loss is nan")
    with pytest.raises(KeyboardInterrupt):
        with start_run(cfg, "train", {}) as killed:
            raise KeyboardInterrupt
    client = _client(sqlite_uri)
    run = client.get_run(failed.run_id)
    assert run.info.status == "FAILED" and run.data.tags["minilm.error"] == "RuntimeError: loss is nan"
    assert _history(sqlite_uri, failed.run_id, "loss") == [(0, 1.0)]  # flushed on the way out
    assert client.get_run(killed.run_id).info.status == "KILLED"


def test_group_nests_stages_under_one_parent(sqlite_uri):
    cfg = _cfg(sqlite_uri, "groups")
    with start_run(cfg, "prepare", {}, group="exp-a") as first:
        pass
    with start_run(cfg, "pretrain", {}, group="exp-a") as second:
        pass
    with start_run(cfg, "prepare", {}, group="exp-b") as other:
        pass
    assert first.parent_run_id == second.parent_run_id != other.parent_run_id
    client = _client(sqlite_uri)
    parent = client.get_run(first.parent_run_id)
    assert parent.info.run_name == "pipeline:exp-a" and parent.data.tags["minilm.group"] == "exp-a"
    assert parent.info.status == "FINISHED"
    for child in (first, second):
        tags = client.get_run(child.run_id).data.tags
        assert tags["mlflow.parentRunId"] == first.parent_run_id and tags["minilm.in_group"] == "exp-a"
    exp = client.get_experiment_by_name("groups")
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{first.parent_run_id}'")
    assert sorted(r.info.run_name for r in children) == ["prepare", "pretrain"]
    with pytest.raises(TrackingError, match="may only hold"):
        start_run(cfg, "prepare", {}, group="it's")


def test_resume_continues_the_run_without_duplicating_steps(sqlite_uri, capsys):
    cfg = _cfg(sqlite_uri, "resume", flush_every=4)
    run = start_run(cfg, "pretrain", {"train": {"lr": 0.1}})
    for step in range(10):
        run.log_metrics({"train_loss": 100.0 + step}, step)
    run.log_metrics({"val_loss": 7.0}, 5)
    run.close("KILLED")                          # e.g. the machine went away at step 9

    again = start_run(cfg, "pretrain", {"train": {"lr": 0.1}}, resume_run_id=run.run_id)
    assert again.run_id == run.run_id and again.skip_until_step == 9
    assert _client(sqlite_uri).get_run(run.run_id).info.status == "RUNNING"
    for step in range(5, 15):                    # restarted from the step-5 checkpoint
        again.log_metrics({"train_loss": 200.0 + step}, step)
        if step % 5 == 0:
            again.log_metrics({"val_loss": 6.0}, step)
    again.log_params({"train": {"lr": 0.5}})     # params are immutable: reported, not raised
    failures = again.close()
    assert len(failures) == 1 and "train.lr" in failures[0]
    assert "warning" in capsys.readouterr().err
    expected = [(s, 100.0 + s) for s in range(10)] + [(s, 200.0 + s) for s in range(10, 15)]
    assert _history(sqlite_uri, run.run_id, "train_loss") == expected
    assert _history(sqlite_uri, run.run_id, "val_loss") == [(5, 7.0), (10, 6.0)]
    got = _client(sqlite_uri).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.params["train.lr"] == "0.1"

    with pytest.raises(TrackingError, match="does not exist"):
        start_run(cfg, "pretrain", {}, resume_run_id="0" * 32)


# --------------------------------------------------------------------------------------------------
# a real MLflow server


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@pytest.fixture
def mlflow_server(tmp_path, request):
    port = _free_port()
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    cmd = ([exe] if exe else [sys.executable, "-m", "mlflow"]) + [
        "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}",
        "--artifacts-destination", str(tmp_path / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)          # own process group: uvicorn is a child

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()

    request.addfinalizer(stop)
    url = f"http://127.0.0.1:{port}"
    wait_for_mlflow_server(url, proc, tmp_path / "server.log", timeout_s=60)
    return url, proc


def test_real_server_round_trip_and_death_mid_run(mlflow_server, tmp_path, capsys):
    url, proc = mlflow_server
    cfg = TrackingConfig(tracking_uri=url, experiment="served", flush_every=3, timeout_s=2)
    with start_run(cfg, "pretrain", {"model": {"d_model": 32}}, group="g1") as run:
        for step in range(5):
            run.log_metrics({"train_loss": 3.0 - step / 10}, step)
        run.log_metrics({"grad_norm": float("nan")}, 4)              # non-finite values travel too
        report = tmp_path / "report.txt"
        report.write_text("hello", encoding="utf-8")
        assert run.log_artifact(report)
    assert run.failures == []

    # read it back over the REST API, independently of the MLflow client
    got = _get_json(f"{url}/api/2.0/mlflow/runs/get?run_id={run.run_id}")["run"]
    assert got["info"]["status"] == "FINISHED" and got["info"]["run_name"] == "pretrain"
    assert {"key": "model.d_model", "value": "32"} in got["data"]["params"]
    tags = {t["key"]: t["value"] for t in got["data"]["tags"]}
    assert tags["minilm.stage"] == "pretrain" and tags["mlflow.parentRunId"] == run.parent_run_id
    hist = _get_json(f"{url}/api/2.0/mlflow/metrics/get-history?run_id={run.run_id}&metric_key=train_loss")
    assert sorted((m["step"], m["value"]) for m in hist["metrics"]) == [(s, 3.0 - s / 10) for s in range(5)]
    latest = {m["key"]: m["value"] for m in got["data"]["metrics"]}
    assert latest == {"train_loss": 2.6, "grad_norm": "NaN"}
    files = _get_json(f"{url}/api/2.0/mlflow-artifacts/artifacts?path="
                      f"{got['info']['artifact_uri'].split('mlflow-artifacts:/', 1)[1]}")
    assert [f["path"] for f in files.get("files", [])] == ["report.txt"]

    # the server dies mid-run: logging goes on without raising, and the loss is reported
    live = start_run(TrackingConfig(tracking_uri=url, experiment="served", flush_every=1, timeout_s=2),
                     "finetune", {})
    live.log_metrics({"train_loss": 1.0}, 0)
    assert live.failures == []
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for step in range(1, 4):
        live.log_metrics({"train_loss": 1.0 / step}, step)              # must not raise
    assert live.failures and "log_batch" in live.failures[0]
    failures = live.close()
    assert any("were not sent" in f for f in failures) and live.failure_count >= 2
    err = capsys.readouterr().err
    assert "warning: MLflow tracking failed" in err and "tracking call(s) failed" in err


# --------------------------------------------------------------------------------------------------
# run record, plots and tables


def test_run_info_is_complete_and_personal_data_free():
    info = run_info(seed=7)
    assert info["seed"] == 7 and info["python"].count(".") == 2
    for key in ("torch", "numpy", "mlflow", "platform", "cpu_cores", "ram_gb", "timestamp_utc",
                "git_commit", "git_dirty", "torch_threads", "cuda_device", "bf16_cuda"):
        assert key in info
    assert info["numpy"] and info["mlflow"] and info["timestamp_utc"].endswith("Z")
    assert socket.gethostname() not in json.dumps(info)
    outside = run_info(repo_dir="/")
    assert outside["git_commit"] is None and outside["git_dirty"] is None


def test_plots_and_tables(tmp_path):
    rows = [{"step": s, "train_loss": 4.0 - s / 50} for s in range(100)]
    for r in rows[::20]:
        r["val_loss"] = 4.2 - r["step"] / 60
    rows[3]["train_loss"] = float("nan")
    assert plot_curves(rows, tmp_path / "loss.png", ys=("train_loss", "val_loss", "missing")) == [
        "train_loss", "val_loss"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves([], tmp_path / "empty.png") == []
    assert (tmp_path / "empty.png").stat().st_size > 0
    write_table_tsv(rows[:2], tmp_path / "t.tsv")
    assert (tmp_path / "t.tsv").read_text(encoding="utf-8").splitlines() == [
        "step\ttrain_loss\tval_loss", "0\t4.0\t4.2", "1\t3.98\t"]
    import pandas as pd

    write_table_csv(pd.DataFrame(rows), tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv")
    assert len(back) == 100 and back["val_loss"].notna().sum() == 5
