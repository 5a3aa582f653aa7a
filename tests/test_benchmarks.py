"""The benchmark suite cannot rot: ``python -m benchmarks --quick`` runs every row end to end and writes a
JSON with numbers for each and the Markdown table; plus the pieces its figures rest on (the FLOP count,
the rotated timing rounds, the median ratio, merging a partial run). No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is not an installed package, and plain `pytest` does not put the repo root on sys.path
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness, report  # noqa: E402
from benchmarks.harness import Context, Shape, alternate, build_model, matmul_params, median_ratio  # noqa: E402
from benchmarks.run import main, parse_rows  # noqa: E402
ROW_KEYS = ["training", "utilisation", "generation", "finetune", "quality", "speedrun"]


def run_quick(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path / "r.json"),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("bench")
    text = tmp / "shakespeare.txt"
    from pydoc_data.topics import topics  # real English text; the suite never needs ../shared
    text.write_text("\n".join(topics[k] for k in sorted(topics))[:120_000], encoding="utf-8")
    proc = run_quick(tmp, "--rows", "1,2,3,4,5,9", "--shakespeare", str(text))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "r.json").read_text()), (tmp / "r.md").read_text()


def test_quick_run_has_every_row_with_numbers(quick_results):
    results, _ = quick_results
    assert list(results["rows"]) == ROW_KEYS
    for key, row in results["rows"].items():
        assert not row.get("error") and not row.get("skipped"), (key, row)
        assert row["lines"], key
        for ln in row["lines"]:
            assert number(ln["minilm"]), (key, ln)
            if ln["baseline"] is not None and ln["ratio"] is not None:
                assert number(ln["baseline"]) and ln["ratio"] > 0, (key, ln)
    machine = results["machine"]
    assert machine["cpu_cores"] and machine["torch"] and machine["torch_threads"] >= 1
    assert results["mode"] == "quick"


def test_quick_run_compares_against_the_baselines(quick_results):
    results, _ = quick_results
    rows = results["rows"]
    have_hf = harness.missing("transformers") is None
    baselines = {ln["baseline_name"] for ln in rows["training"]["lines"]}
    assert any(b and b.startswith("transformers") for b in baselines) == have_hf
    gen = {ln["case"]: ln for ln in rows["generation"]["lines"]}
    assert "batch 1 KV cache vs no cache" in gen
    if have_hf:   # same weights, greedy, fp32: the two implementations must pick the same tokens
        assert gen["batch 1 minilm fp32 KV cache"]["same_tokens"] == 1.0
        assert any(case.startswith("batch 1 best vs best") for case in gen)
    lora = {ln["case"]: ln for ln in rows["finetune"]["lines"]}
    full, adapter = lora["minilm full FT step"], lora["minilm LoRA step"]
    assert adapter["trainable"] < full["trainable"] == build_model(harness.TINY_A).num_parameters()
    assert full["train_mb"] > 0 and adapter["train_mb"] > 0
    util = rows["utilisation"]["lines"]
    # a share of the measured peak GEMM rate. The model FLOPs count attention unmasked (nanoGPT's
    # estimate, not halved for the causal mask), and at the quick run's tiny shapes attention is a large
    # part of them, so the share may pass 1 a little there (seen: up to ~1.1); far above means a wrong count
    assert util and all(0 < ln["minilm"] < 1.5 and ln["model_gflops"] > 0 and ln["peak_gflops"] > 0
                        for ln in util), util
    quality = rows["quality"]["lines"][0]
    assert 0 < quality["minilm"] < math.log(quality["vocab_size"])      # it learned: better than uniform
    speed = {ln["case"].split(":")[0]: ln for ln in rows["speedrun"]["lines"]}
    assert set(speed) == {"defaults", "muon"}               # --quick: two levers, one seed, 30 steps
    for ln in speed.values():        # the clock stopped at the one evaluation (step 30), under the loss
        assert ln["steps_reached"] == [30] and 0 < ln["minilm"] <= ln["wall_s_mean"]
        assert 0 < ln["final_val_loss_mean"] < math.log(quality["vocab_size"])


def test_markdown_table_is_written(quick_results):
    results, md = quick_results
    assert md.startswith("# minilm benchmarks")
    assert f"Machine: {report.machine_line(results['machine'])}." in md     # the CPU or 'unknown CPU'
    for row in results["rows"].values():
        assert f"## {row['id']}. {row['title']}" in md
    assert "| case | metric | minilm |" in md and "## Targets" in md


def test_missing_corpus_skips_quality_row_and_keeps_earlier_rows(tmp_path, capsys):
    out = tmp_path / "r.json"
    earlier = {"id": 6, "key": "pipeline", "title": "Pipeline overhead", "lines": [], "notes": [],
               "seconds": 1.0}
    out.write_text(json.dumps({"command": "python -m benchmarks --quick --rows 6", "mode": "quick",
                               "machine": {"timestamp_utc": "then"}, "rows": {"pipeline": earlier}}))
    code = main(["--quick", "--rows", "quality", "--shakespeare", str(tmp_path / "absent.txt"),
                 "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert list(results["rows"]) == ["quality", "pipeline"]
    assert "absent.txt not found" in results["rows"]["quality"]["skipped"]
    assert "then" in results["rows"]["pipeline"]["earlier_run"]
    md = out.with_suffix(".md").read_text()
    assert "Skipped:" in md and "earlier run" in md


def test_rows_argument():
    assert parse_rows("1,3") == [1, 3]
    assert parse_rows("quality, 2") == [2, 5]
    assert parse_rows("speedrun") == [9]
    assert parse_rows("data") == parse_rows("10") == [10]
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="unknown row '11'"):
        parse_rows("11")


def test_alternate_rotates_the_order_and_times_every_round():
    order: list[str] = []
    fns = {name: (lambda n=name: order.append(n)) for name in "abc"}
    out = alternate(fns, Context(repeats=3, warmup=1, min_seconds=0.0))
    assert all(len(out[n]["seconds"]) == 3 and out[n]["calls"] == 1 for n in "abc")
    assert order == list("abc") + list("abc") + list("bca") + list("cab")   # warm-up, then rotated rounds


def test_median_ratio_is_per_round():
    assert median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0      # ratios 2, 4, 3
    assert median_ratio([2.0, None, 6.0], [1.0, 1.0, 2.0]) == 2.5    # a missing round is left out
    assert median_ratio([None], [1.0]) is None


def test_flop_count_counts_every_matmul_once():
    shape = Shape("t", n_layer=2, n_head=2, d_model=32, context_length=16, batch_size=1, vocab_size=50)
    for tie in (True, False):
        model = build_model(shape, tie_embeddings=tie)
        cfg = model.config
        per_layer = 4 * 32 * 32 + 3 * 32 * cfg.hidden_dim
        assert matmul_params(model) == 2 * per_layer + 50 * 32      # the lm_head, tied or not
        expected = 6 * matmul_params(model) + 12 * 2 * 32 * 16
        assert harness.train_flops_per_token(model) == expected


def test_training_steps_learn_the_same_on_both_sides():
    pytest.importorskip("transformers")
    from benchmarks.steps import hf_step, minilm_step
    from minilm.hf import to_transformers

    shape = harness.TINY_A
    batch, cfg = harness.random_batch(shape), harness.train_config()
    ours, theirs = build_model(shape), to_transformers(build_model(shape))
    a, b = minilm_step(ours, batch, cfg, "fp32"), hf_step(theirs, batch, cfg, "fp32")
    losses = [(a(), b()) for _ in range(3)]
    for la, lb in losses:           # same weights, batch, loss and optimizer maths: the same trajectory
        assert la == pytest.approx(lb, rel=1e-4)
    assert losses[-1][0] < losses[0][0]
    torch.testing.assert_close(theirs.model.layers[0].mlp.up_proj.weight,
                               ours.model.layers[0].mlp.up_proj.weight, rtol=1e-4, atol=1e-6)


def test_render_shows_failures_and_skips():
    results = {"command": "c", "mode": "quick", "machine": {"cpu": "X"},
               "rows": {"training": {"id": 1, "title": "T", "error": "RuntimeError: boom", "lines": []},
                        "quality": {"id": 5, "title": "Q", "skipped": "no file", "lines": []}}}
    md = report.render(results)
    assert "Failed: `RuntimeError: boom`" in md and "Skipped: no file" in md


def test_quick_data_row(tmp_path):
    """Row 10 at toy sizes: encode with every core and with 1 worker writes the same bytes, with MB/s and
    peak RSS for each; tokenizer training's peak RSS at two max_sentences values gives a positive slope."""
    proc = run_quick(tmp_path, "--rows", "data")
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads((tmp_path / "r.json").read_text())["rows"]["data"]
    assert not row.get("error"), row
    encode = [ln for ln in row["lines"] if ln["case"].startswith("encode")]
    tokenizer = [ln for ln in row["lines"] if ln["case"].startswith("tokenizer")]
    assert len(encode) == 2 and encode[-1]["target"] == ">= 2x"
    for ln in encode:
        assert ln["same_bytes"] is True and ln["workers"] >= 1
        assert all(number(ln[k]) and ln[k] > 0 for k in ("minilm", "baseline", "ratio", "rss_mb",
                                                          "baseline_rss_mb", "cpu_s_per_mb"))
    assert len(tokenizer) >= 4
    assert all(number(ln["minilm"]) and ln["bytes_per_sentence"] > 0 for ln in tokenizer)
    assert "## 10. Data throughput" in (tmp_path / "r.md").read_text()


def test_quick_pipeline_params_are_tiny_and_valid(tmp_path):
    import yaml

    from benchmarks.pipeline import _merge, quick_overrides
    from stages.params import load_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tiny = _merge(params, quick_overrides(params))
    training = [name for name, values in params.items() if isinstance(values, dict) and "max_steps" in values]
    assert "pretrain" in training
    assert all(tiny[name]["max_steps"] <= 30 for name in training)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny))
    load_params(tmp_path / "params.yaml")          # validates every section


@pytest.mark.slow
def test_quick_pipeline_row(tmp_path):
    proc = run_quick(tmp_path, "--rows", "6")
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads((tmp_path / "r.json").read_text())["rows"]["pipeline"]
    cases = {ln["case"]: ln for ln in row["lines"]}
    assert cases["dvc repro pretrain"]["stages_run"] == ["pretrain"]
    assert all(number(ln["minilm"]) and ln["minilm"] > 0 for ln in row["lines"])
    assert number(cases["no-op dvc repro"]["ratio"])
