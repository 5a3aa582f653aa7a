"""The package boundaries and dvc.yaml's dependency lists are true by construction, and stay so."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import deps

ROOT = Path(__file__).resolve().parent.parent
STAGES = deps.stage_names((ROOT / "dvc.yaml").read_text())
FORBIDDEN_IN_LIBRARY = ("mlflow", "dvc", "matplotlib", "stages")


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_dvc_yaml_code_deps_are_the_stages_imports():
    text = (ROOT / "dvc.yaml").read_text()
    assert deps.rewrite(text) == text, "dvc.yaml's code deps drifted: run `python -m stages.deps --write`"


def test_the_closure_follows_imports_inside_functions_and_parent_packages():
    files = deps.closure("stages.generate")
    assert "minilm/sampling.py" in files and "minilm/__init__.py" in files and "stages/__init__.py" in files
    assert "stages/tracking.py" not in files           # logging, not results: documented exception
    assert "minilm/train.py" not in deps.closure("stages.prepare")


def test_an_edit_to_an_imported_file_changes_the_fingerprint(tmp_path, monkeypatch):
    before = deps.code_fingerprint("stages.tokenizer")
    assert before == deps.code_fingerprint("stages.tokenizer")
    assert before != deps.code_fingerprint("stages.encode")
    fake_root = tmp_path / "repo"
    for rel in deps.closure("stages.tokenizer"):
        (fake_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake_root / rel).write_bytes((ROOT / rel).read_bytes())
    monkeypatch.setattr(deps, "ROOT", fake_root)
    assert deps.code_fingerprint("stages.tokenizer") == before
    tok = fake_root / "minilm" / "tokenizer.py"
    tok.write_text(tok.read_text() + "\n# an edit\n")
    assert deps.code_fingerprint("stages.tokenizer") != before


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_lists_in_dvc_yaml_exactly_the_params_its_module_declares(stage):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    module = importlib.import_module(f"stages.{stage}")
    assert spec.get("params", []) == module.PARAMS
    assert not any(p.startswith(("mlflow", "project.progress")) or p == "project" for p in module.PARAMS)


def test_the_library_imports_no_pipeline_code():
    offenders = {}
    for path in sorted((ROOT / "minilm").rglob("*.py")):
        bad = _imported_roots(path) & set(FORBIDDEN_IN_LIBRARY)
        if bad:
            offenders[path.relative_to(ROOT).as_posix()] = sorted(bad)
    assert offenders == {}


def test_reading_params_imports_no_torch():
    code = ("import sys; from stages.params import load_params; p = load_params('params.yaml'); "
            "assert p.model.d_model > 0; print(sorted(m for m in ('torch', 'mlflow', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
