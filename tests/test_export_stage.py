"""The export stage end to end in a temporary working directory: from out/merge/model.safetensors and
out/tokenizer/ to out/export/hf/ and out/export/model.gguf, byte-identical on a rerun; and one line when
its input is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.exporting import sp_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    from minilm.checkpoint import save_checkpoint

    (tmp_path / "out" / "tokenizer").mkdir(parents=True)
    (tmp_path / "out" / "merge").mkdir()
    tok = sp_tokenizer(tmp_path)
    shutil.copy(tok.path, tmp_path / "out" / "tokenizer" / "tokenizer.model")
    save_checkpoint(tmp_path / "out" / "merge" / "model.safetensors", tiny_model(tok.vocab_size, n_kv_head=2),
                    extra={"tokenizer_sha256": tok.hash})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generate"]["temperature"] = 0.8
    params["export"]["gguf_type"] = "f16"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_export_stage_writes_both_formats_reproducibly(workdir):
    from stages.export import main

    main([])
    out = workdir / "out" / "export"
    names = sorted(p.name for p in (out / "hf").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(names)
    assert json.loads((out / "hf" / "generation_config.json").read_text())["temperature"] == 0.8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["gguf_bytes"] == (out / "model.gguf").stat().st_size
    first = {n: (out / "hf" / n).read_bytes() for n in names} | {"gguf": (out / "model.gguf").read_bytes()}
    main([])
    again = {n: (out / "hf" / n).read_bytes() for n in names} | {"gguf": (out / "model.gguf").read_bytes()}
    assert first == again


def test_export_stage_without_merged_model_is_one_line(workdir, capsys):
    from minilm.cli import run_main
    from stages.export import main

    (workdir / "out" / "merge" / "model.safetensors").unlink()
    assert run_main(main, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "dvc repro merge" in err, err
    assert not (workdir / "out" / "export" / "model.gguf").exists()
