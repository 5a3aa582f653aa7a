"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def stdlib_text(tmp_path):
    """Path of a ~200 KB UTF-8 file of real English text (Python's pydoc help topics), ending in a newline."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    path = tmp_path / "stdlib.txt"
    path.write_text(text[: text.rfind("\n", 0, 200_000) + 1], encoding="utf-8")
    return path
