"""End to end: the real DVC pipeline in a temporary git repo, with a real MLflow sqlite store.

One `dvc repro` of a tiny params file runs every stage; the tests then check the outputs, the metrics,
the MLflow runs (names, params, metrics, lineage, grouping), that a second repro does nothing, and that
a generate-only param change reruns only `generate`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "tokenizer", "encode", "pretrain", "sft", "merge", "preferences", "dpo", "evaluate",
          "generate", "export"]

TINY = {
    "project": {"progress": False},
    "data": {"corpus_max_mb": 0.15},
    "tokenizer": {"vocab_size": 384},
    "model": {"context_length": 64, "n_layer": 2, "n_head": 2, "d_model": 64},
    "pretrain": {"max_steps": 30, "batch_size": 8, "warmup_steps": 5, "eval_every": 15,
                 "eval_batches": 2, "log_every": 5},
    "sft": {"max_steps": 20, "batch_size": 8, "warmup_steps": 2, "eval_every": 10, "eval_batches": 2,
            "log_every": 5},
    "preferences": {"max_pairs": 48, "max_new_tokens": 16},
    "dpo": {"max_steps": 12, "batch_size": 4, "warmup_steps": 2, "eval_every": 6, "eval_batches": 2,
            "log_every": 3, "lr": 5.0e-3},
    "evaluate": {"batches": 4, "batch_size": 8, "sft_pairs": 40},
    "generate": {"prompts": ["The function", "A list"], "min_new_tokens": 5, "max_new_tokens": 12,
                 "sft_questions": 2},
}


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    e.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", GIT_AUTHOR_NAME="t",
             GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
             PYTHONPATH="")
    return e


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in over.items():
        out.setdefault(section, {}).update(values)
    return out


def make_repo(path: Path, overrides: dict) -> Path:
    """A fresh git repo holding the project's pipeline code and a tiny params.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("minilm", "stages"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, path / name)
    shutil.copytree(ROOT / ".dvc", path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(path, "git", "init", "-q", "-b", "main")
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-qm", "init")
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    path = make_repo(tmp_path_factory.mktemp("pipeline") / "repo", TINY)
    proc = sh(path, "dvc", "repro")
    (path / "repro.log").write_text(proc.stdout + proc.stderr)
    return path


def mlflow_runs(repo: Path) -> list:
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("minilm")
    return client, client.search_runs([exp.experiment_id], max_results=200)


def test_repro_writes_every_output(repo):
    for rel in ["data/corpus.txt", "data/sft_train.jsonl", "data/sft_val.jsonl",
                "out/tokenizer/tokenizer.model", "out/encoded/train.bin", "out/encoded/val.bin",
                "out/pretrain/best.safetensors", "out/pretrain/last.safetensors",
                "out/pretrain/history.csv", "out/pretrain/loss.png", "out/evaluate/metrics.json",
                "out/sft/tuned/adapter_model.safetensors", "out/sft/tuned/adapter_config.json",
                "out/sft/loss.png", "out/merge/model.safetensors", "out/merge/metrics.json",
                "out/generate/samples.md", "out/generate/samples.jsonl", "out/preferences/train.jsonl",
                "out/preferences/val.jsonl", "out/dpo/adapter/adapter_model.safetensors",
                "out/dpo/adapter/adapter_config.json", "out/dpo/model.safetensors", "out/dpo/loss.png"]:
        assert (repo / rel).is_file() and (repo / rel).stat().st_size > 0, rel
    assert (repo / "out/pretrain/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (repo / "out/generate/samples.jsonl").read_text().splitlines()]
    base = [s for s in samples if s["model"] == "base"]
    assert [s["prompt"] for s in base] == TINY["generate"]["prompts"]
    assert all(s["completion"] for s in base)
    answers = [s for s in samples if s["model"] == "sft"]
    assert len(answers) == 2 and all(s["prompt"].startswith("### Instruction:\n") for s in answers)
    assert all(s["prompt"].endswith("### Response:\n") for s in answers)
    dpo = [s for s in samples if s["model"] == "dpo"]            # next to the SFT model's answers
    assert [s["prompt"] for s in dpo] == [s["prompt"] for s in answers]


def merge_changed_the_base(repo: Path) -> bool:
    """Whether the merged model's weights differ from the base's in every merged projection."""
    import torch

    from minilm.checkpoint import load_checkpoint

    base = load_checkpoint(repo / "out/pretrain/best.safetensors").model_state
    merged = load_checkpoint(repo / "out/merge/model.safetensors").model_state
    targets = yaml.safe_load((repo / "params.yaml").read_text())["lora"]["targets"]
    names = [k for k in merged if k.endswith(".weight") and k.split(".")[-2] in targets]
    return bool(names) and all(not torch.equal(base[k].float(), merged[k].float()) for k in names)


def test_metrics_are_sane_and_shown_by_dvc(repo):
    import math
    m = json.loads((repo / "out/evaluate/metrics.json").read_text())
    text = m["base"]["val_text"]
    assert 0 < text["loss"] < math.log(384)           # better than uniform over the vocab
    assert text["perplexity"] == pytest.approx(math.exp(text["loss"]), rel=1e-6)
    assert 0 < text["bits_per_byte"] < 8
    # fine-tuning on the template lowers the held-out response loss
    assert m["sft"]["sft_val_responses"]["loss"] < m["base"]["sft_val_responses"]["loss"]
    merge = json.loads((repo / "out/merge/metrics.json").read_text())
    assert merge["max_abs_logit_diff"] < 1e-4          # fp32 rounding (README: 1.7e-5 on the default run)
    assert merge_changed_the_base(repo)                 # ...and not because the adapter was a no-op
    shown = json.dumps(json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout))
    assert "sft_val_responses" in shown and "max_abs_logit_diff" in shown
    pre = json.loads((repo / "out/pretrain/metrics.json").read_text())
    assert pre["steps"] == 30 and pre["best_val_loss"] < math.log(384)


def test_dpo_learns_the_self_play_preferences(repo):
    """Self-play pairs (chosen = the reference answer, rejected = the SFT model's own sample) from the
    training and the held-out SFT sets; DPO moves held-out preference accuracy above chance, and evaluate
    reports it with what it costs the LM."""
    import math

    train_pairs = [json.loads(x) for x in (repo / "out/preferences/train.jsonl").read_text().splitlines()]
    sft_train = [json.loads(x) for x in (repo / "data/sft_train.jsonl").read_text().splitlines()]
    assert 0 < len(train_pairs) <= 48
    assert all(p["chosen"] != p["rejected"] and p["rejected"] for p in train_pairs)
    assert {(p["prompt"], p["chosen"]) for p in train_pairs} <= {(q["instruction"], q["response"])
                                                                for q in sft_train}
    dpo = json.loads((repo / "out/dpo/metrics.json").read_text())
    assert dpo["steps"] == 12 and dpo["val_preference_accuracy"] > 0.6 and dpo["val_reward_margin"] > 0
    m = json.loads((repo / "out/evaluate/metrics.json").read_text())
    assert m["dpo"]["preferences_val"]["accuracy"] == pytest.approx(dpo["val_preference_accuracy"], abs=1e-6)
    assert 0 < m["dpo"]["val_text"]["loss"] < math.log(384) and "loss" in m["dpo"]["sft_val_responses"]
    history = (repo / "out/dpo/history.csv").read_text().splitlines()[0].split(",")
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "val_rewards/accuracies"):
        assert name in history, name
    client, runs = mlflow_runs(repo)
    run = next(r for r in runs if r.info.run_name == "dpo")
    assert run.data.metrics["final_val_preference_accuracy"] == pytest.approx(dpo["val_preference_accuracy"])
    assert "rewards/margins" in run.data.metrics and run.data.params["dpo.beta"] == "0.1"


def test_every_stage_is_an_mlflow_run_with_params_metrics_and_lineage(repo):
    client, runs = mlflow_runs(repo)
    by_name = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    for stage in STAGES:
        assert len(by_name.get(stage, [])) == 1, (stage, list(by_name))
        run = by_name[stage][0]
        assert run.info.status == "FINISHED"
        assert run.data.tags["dvc.stage"] == stage
        assert run.data.tags.get("mlflow.source.git.commit")
    pre = by_name["pretrain"][0]
    assert pre.data.params["model.d_model"] == "64" and pre.data.params["pretrain.max_steps"] == "30"
    assert by_name["sft"][0].data.params["lora.rank"] == "8"
    assert by_name["sft"][0].data.tags["lineage.base_model.run_id"] == pre.info.run_id
    history = client.get_metric_history(pre.info.run_id, "train_loss")
    assert [h.step for h in history] == [5, 10, 15, 20, 25, 30]
    # lineage: generate -> pretrain -> encode/tokenizer -> prepare
    gen = by_name["generate"][0].data.tags
    assert gen["lineage.base_model.run_id"] == pre.info.run_id
    assert pre.data.tags["lineage.tokenizer.run_id"] == by_name["tokenizer"][0].info.run_id
    tok = by_name["tokenizer"][0].data.tags
    assert tok["lineage.corpus.run_id"] == by_name["prepare"][0].info.run_id
    from minilm.fileio import sha256_file
    assert tok["lineage.corpus.sha256"] == sha256_file(repo / "data/corpus.txt")
    # one repro = one parent run
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs if r.info.run_name in STAGES}
    assert len(parents) == 1 and None not in parents


def test_the_experiment_opens_as_model_training_with_comparable_parent_rows(repo):
    """MLflow 3 opens an untagged experiment in its GenAI view; the top-level rows (one parent per
    pipeline run) carry the loss curves and headline metrics, so the chart view compares pipeline runs
    with no set-up."""
    client, runs = mlflow_runs(repo)
    exp = client.get_experiment_by_name("minilm")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = [r for r in runs if r.info.run_name.startswith("pipeline:")]
    metrics = parent.data.metrics
    for key in ("pretrain/final_best_val_loss", "pretrain/final_best_val_bits_per_byte",
                "sft/final_best_val_response_loss", "evaluate/sft.val_text.bits_per_byte",
                "evaluate/sft.sft_val_responses.loss", "evaluate/base.sft_val_responses.loss"):
        assert key in metrics, (key, sorted(metrics))
    pre = next(r for r in runs if r.info.run_name == "pretrain")
    assert metrics["pretrain/final_best_val_loss"] == pre.data.metrics["final_best_val_loss"]
    curve = client.get_metric_history(parent.info.run_id, "pretrain/train_loss")
    assert [m.step for m in curve] == [5, 10, 15, 20, 25, 30]
    assert [m.value for m in curve] == [m.value for m in client.get_metric_history(pre.info.run_id, "train_loss")]


def test_second_repro_does_nothing(repo):
    proc = sh(repo, "dvc", "repro")
    out = proc.stdout + proc.stderr
    assert "Running stage" not in out
    assert "up to date" in out.lower()


def test_generate_only_param_reruns_only_generate(repo):
    """generate.seed is read by generate only (the sampling defaults export writes into
    generation_config.json do rerun export)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["generate"]["seed"] = 99
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh(repo, "dvc", "status", "--json").stdout)
    assert set(status) == {"generate"}, status
    proc = sh(repo, "dvc", "repro")
    ran = [line for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'generate':"], proc.stdout


def test_lora_param_reruns_only_the_fine_tuning_half(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["lora"]["rank"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh(repo, "dvc", "status", "--json").stdout)
    assert set(status) == {"sft"}, status      # downstream stages follow once sft's outputs change
    proc = sh(repo, "dvc", "repro")
    ran = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["sft", "merge", "preferences", "dpo", "evaluate", "generate", "export"], proc.stdout


def test_a_dpo_param_reruns_only_dpo_and_what_follows(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dpo"]["beta"] = 0.2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh(repo, "dvc", "status", "--json").stdout)
    assert set(status) == {"dpo", "evaluate"}, status      # evaluate reads dpo.beta for its rewards
    proc = sh(repo, "dvc", "repro")
    ran = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["dpo", "evaluate", "generate"], proc.stdout


def test_full_fine_tuning_writes_a_whole_model_that_merge_passes_through(repo):
    from minilm.checkpoint import load_checkpoint

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sft"].update(method="full", lr=5e-4, min_lr=5e-5)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = sh(repo, "dvc", "repro")
    ran = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["sft", "merge", "preferences", "dpo", "evaluate", "generate", "export"], proc.stdout
    assert sorted(p.name for p in (repo / "out/sft/tuned").iterdir()) == ["model.safetensors"]
    sft = json.loads((repo / "out/sft/metrics.json").read_text())
    assert sft["trainable_share"] == 1.0 and sft["best_val_response_loss"] < 8
    merge = json.loads((repo / "out/merge/metrics.json").read_text())
    assert merge == {"max_abs_logit_diff": 0.0, "merged_layers": 0}
    tuned, merged = (load_checkpoint(repo / p) for p in ("out/sft/tuned/model.safetensors",
                                                         "out/merge/model.safetensors"))
    base = load_checkpoint(repo / "out/pretrain/best.safetensors")
    assert merged.meta["extra"]["sft_method"] == "full"
    assert all(torch.equal(tuned.model_state[k], v) for k, v in merged.model_state.items())
    assert any(not torch.equal(base.model_state[k], v) for k, v in merged.model_state.items())
    evaluated = json.loads((repo / "out/evaluate/metrics.json").read_text())
    assert evaluated["sft"]["sft_val_responses"]["loss"] < evaluated["base"]["sft_val_responses"]["loss"]


def test_dvc_exp_run_and_show(repo):
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "after repro")
    proc = sh(repo, "dvc", "exp", "run", "-n", "hot", "-S", "generate.seed=4242")
    ran = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["generate"], proc.stdout
    shown = json.dumps(json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout))
    assert "hot" in shown and "4242" in shown
    client, runs = mlflow_runs(repo)
    tagged = [r for r in runs if r.data.tags.get("dvc.exp_name") == "hot"]
    assert sorted(r.info.run_name for r in tagged) == ["generate", "pipeline:exp-hot"]
    gen = next(r for r in tagged if r.info.run_name == "generate")
    parent = client.get_run(gen.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "pipeline:exp-hot"


def test_dvc_plots_render_offline(repo):
    out = repo / "plots_out"
    sh(repo, "dvc", "plots", "show", "-o", str(out))
    assert (out / "index.html").exists()
    static = list(out.rglob("*.png"))
    assert static, "the PNG loss curve must be part of the plots output"


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_help(stage):
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--params" in proc.stdout


@pytest.mark.parametrize("edit, expected", [
    ({"model": {"n_haed": 4}}, "unknown key model.n_haed (did you mean 'n_head'?)"),
    ({"pretrain": {"lr": "fast"}}, "pretrain.lr must be a number, got 'fast'"),
    ({"model": {"d_model": 100, "n_head": 3}}, "must be divisible by n_head"),
    ({"modle": {}}, "unknown section 'modle' (did you mean 'model'?)"),
])
def test_bad_params_stop_a_stage_with_one_line(tmp_path, edit, expected):
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), edit)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.pretrain", "--params", str(path)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_params_keys_named_in_dvc_yaml_exist():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in dvc["stages"].items():
        for key in stage.get("params", []):
            keys = [key] if isinstance(key, str) else list(key)
            for k in keys:
                node = params
                for part in k.split("."):
                    assert isinstance(node, dict) and part in node, f"{name}: {k}"
                    node = node[part]
    from stages.params import load_params
    load_params(ROOT / "params.yaml")     # the shipped file validates


def test_readme_documents_every_params_key():
    readme = (ROOT / "README.md").read_text()
    ref = readme[readme.index("## Params reference"):readme.index("## The library")]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = [f"{s}.{k}" for s, keys in params.items() for k in keys if f"`{k}`" not in ref]
    assert not missing, f"README's params reference lacks {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 -e ".[test,bench]" && python -m pytest -q'
    assert command in readme
    assert command.replace("pip install ", "pip install -q ") in ci


def test_sft_tunes_an_imported_hugging_face_model_without_pretraining(tmp_path):
    """A user's own small Llama (a transformers directory) goes through minilm-import; with
    `tokenizer.path` and `sft.base` pointing at what it wrote, `dvc repro merge` LoRA-tunes that model on
    the pipeline's SFT data: the pipeline's tokenizer is the model's own (the same bytes, so the
    checkpoint's recorded tokenizer matches) and pretraining does not run."""
    import math

    from exporting import sp_tokenizer, trained_model
    from minilm.checkpoint import load_checkpoint
    from minilm.hf import to_transformers

    tok = sp_tokenizer(tmp_path)
    model = trained_model(tok, tmp_path / "corpus.txt", steps=20)
    hf = tmp_path / "hf-llama"
    to_transformers(model).save_pretrained(hf)
    shutil.copy(tok.path, hf / "tokenizer.model")
    shape = {k: getattr(model.config, k) for k in ("context_length", "n_layer", "n_head", "d_model")}
    repo = make_repo(tmp_path / "repo", merge(TINY, {"tokenizer": {"path": "init/tokenizer.model"},
                                                     "sft": {"base": "init/model.safetensors"},
                                                     "model": shape}))
    printed = sh(repo, "minilm-import", str(hf), "--out", "init/model.safetensors").stdout
    assert f"  n_layer: {shape['n_layer']}\n" in printed and f"  d_model: {shape['d_model']}\n" in printed
    proc = sh(repo, "dvc", "repro", "merge")
    ran = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["prepare", "tokenizer", "sft", "merge"], proc.stdout
    assert (repo / "out/tokenizer/tokenizer.model").read_bytes() == tok.path.read_bytes()
    base = load_checkpoint(repo / "init/model.safetensors").model_state
    merged = load_checkpoint(repo / "out/merge/model.safetensors").model_state
    assert base and all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())   # imported exactly
    changed = [k for k in merged if k.endswith("q_proj.weight")]
    assert changed and all(not torch.equal(base[k], merged[k]) for k in changed)
    sft = json.loads((repo / "out/sft/metrics.json").read_text())
    assert sft["steps"] == TINY["sft"]["max_steps"] and math.isfinite(sft["best_val_response_loss"])
    adapter = json.loads((repo / "out/sft/tuned/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "init/model.safetensors"
