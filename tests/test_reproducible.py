"""Byte-reproducible pipeline outputs, so DVC's caching does its job (real DVC, real git, two folders).

Two default-shaped runs of the tiny pipeline in two different folders write the same dvc.lock: every
out and every stage-to-stage file has the same hash (run ids, timestamps and absolute paths live only in
out/runs/ and the resume bookkeeping, which are no outs). An edit that does not change a stage's output
reruns that stage and nothing downstream, and a team shares results through a DVC remote: push, clone,
pull, and nothing needs to run.
"""

from __future__ import annotations

import json

import pytest
import yaml

from test_pipeline import TINY, make_repo, sh

pytestmark = pytest.mark.slow


def ran(proc) -> list[str]:
    return [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    repos = [make_repo(root / name / "project", TINY) for name in ("first", "second-folder")]
    for repo in repos:
        sh(repo, "dvc", "repro")
    return repos


def test_two_runs_in_two_folders_write_the_same_dvc_lock(twins):
    a, b = ((r / "dvc.lock").read_text() for r in twins)
    lock = yaml.safe_load(a)
    outs = [o for stage in lock["stages"].values() for o in stage.get("outs", [])]
    assert len(outs) >= 15 and all(o.get("md5") for o in outs)
    assert a == b
    for repo in twins:     # what differs per run is kept out of the outs, not lost
        record = json.loads((repo / "out/runs/pretrain.json").read_text())
        assert record["run_id"] and record["train_seconds"] > 0 and record["throughput"]
        assert str(repo) not in (repo / "out/pretrain/metrics.json").read_text()


def test_an_edit_that_changes_no_output_reruns_only_that_stage(twins):
    repo = twins[1]
    before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    module = repo / "stages" / "tokenizer.py"
    module.write_text(module.read_text() + "\n# a comment changes the code, not the tokenizer\n")
    assert ran(sh(repo, "dvc", "repro")) == ["tokenizer"]
    after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert after["tokenizer"]["outs"] == before["tokenizer"]["outs"]
    assert {k: v for k, v in after.items() if k != "tokenizer"} == {
        k: v for k, v in before.items() if k != "tokenizer"}


def test_push_clone_pull_and_nothing_to_rerun(twins, tmp_path):
    repo = twins[0]
    remote = tmp_path / "remote"
    sh(repo, "dvc", "remote", "add", "-d", "team", str(remote))
    sh(repo, "dvc", "push")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull")
    status = sh(clone, "dvc", "status")
    assert "up to date" in (status.stdout + status.stderr).lower(), status.stdout
    assert ran(sh(clone, "dvc", "repro")) == []
    assert (clone / "out/merge/model.safetensors").read_bytes() == (
        repo / "out/merge/model.safetensors").read_bytes()
