"""Each stage's code dependencies, derived from its real imports: ``python -m stages.deps [--write]``.

A stage's code deps in ``dvc.yaml`` are the files of ``stages/`` and ``minilm/`` that ``stages.<name>``
imports, directly or through other modules, at module level or inside functions (found by reading the
source with :mod:`ast`, nothing is imported). Two modules are left out on purpose, like the ``mlflow``
params section: ``stages/tracking.py`` and ``stages/runinfo.py`` decide where results are logged and what
is recorded about the machine, not what the results are, so editing them reruns nothing.

With no flag the command prints, for each stage, the list it should have and exits 1 if ``dvc.yaml``
differs; ``--write`` rewrites those lists in place (the other deps, data and models, are kept as they
are). ``tests/test_deps.py`` fails when ``dvc.yaml`` and the imports disagree. The same closure is the
code fingerprint that decides whether a checkpoint may be resumed (:func:`code_fingerprint`).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("minilm", "stages")
NOT_RESULTS = ("stages/tracking.py", "stages/runinfo.py")   # logging, not results (see the docstring)


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Modules named by the import statements of one file (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)   # `from pkg import module`
    return found


def closure(module: str) -> list[str]:
    """Repository-relative files (sorted) that importing ``module`` may execute, logging modules out."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or name in seen:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]        # parent packages run first
        todo += sorted(_imports(path, name))
    files = {p.relative_to(ROOT).as_posix() for p in seen.values()}
    return sorted(f for f in files if f not in NOT_RESULTS)


def code_fingerprint(module: str) -> str:
    """sha256 over the files of :func:`closure`: a checkpoint is resumed only by the code that wrote it."""
    h = hashlib.sha256()
    for rel in closure(module):
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# dvc.yaml


_STAGE = re.compile(r"^  (\w+):\s*$")
_CODE_DEP = re.compile(r"^      - (stages|minilm)/\S+\.py\s*$")


def stage_names(text: str) -> list[str]:
    return [m.group(1) for line in text.splitlines() if (m := _STAGE.match(line))]


def rewrite(text: str) -> str:
    """``dvc.yaml`` with each stage's code deps replaced by its import closure."""
    out: list[str] = []
    stage, in_deps = None, False
    for line in text.splitlines():
        m = _STAGE.match(line)
        if m:
            stage, in_deps = m.group(1), False
        elif stage and line.strip() == "deps:":
            out.append(line)
            out += [f"      - {f}" for f in closure(f"stages.{stage}")]
            in_deps = True
            continue
        elif in_deps and not line.startswith("      "):
            in_deps = False
        if in_deps and _CODE_DEP.match(line):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.deps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps in place")
    parser.add_argument("--dvc-yaml", default=str(ROOT / "dvc.yaml"), metavar="PATH")
    args = parser.parse_args(argv)
    path = Path(args.dvc_yaml)
    text = path.read_text(encoding="utf-8")
    wanted = rewrite(text)
    if args.write:
        path.write_text(wanted, encoding="utf-8")
        print(f"{path}: code deps of {len(stage_names(text))} stages rewritten from their imports")
        return 0
    for name in stage_names(text):
        print(f"{name}: {' '.join(closure(f'stages.{name}'))}")
    if wanted != text:
        print(f"{path} disagrees with the imports; run `python -m stages.deps --write`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
