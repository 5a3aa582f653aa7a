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


def wait_for_mlflow_server(url: str, proc, log_path, timeout_s: float) -> None:
    """Poll a just-started `mlflow server` until /health answers 200; fail with its log otherwise."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-2000:]
            pytest.fail(f"mlflow server did not come up:\n{tail}")
        time.sleep(0.2)
