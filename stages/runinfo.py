"""What every run records about where it ran: versions, hardware, git state, time.

No personal data (no host name, user name or paths). Fast and never raises: a fact that cannot be read
is ``None``. Torch facts (threads, CUDA, bf16) are read only when torch is already imported, so calling
this from a light process does not pay torch's import time.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = {"torch": "torch", "numpy": "numpy", "sentencepiece": "sentencepiece",
             "mlflow": "mlflow", "dvc": "dvc", "minilm": "minilm"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except Exception:
        pass
    if dist == "mlflow":
        return _version("mlflow-skinny")
    if dist == "minilm":                       # running from a source checkout, not installed
        try:
            from minilm import __version__
            return __version__
        except Exception:
            return None
    return None


def _cpuinfo() -> tuple[str | None, set[str]]:
    """(CPU model name, CPU flags) from /proc/cpuinfo; (platform.processor() or None, {}) elsewhere."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or None, flags


def _total_ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _git(repo_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True,
                             timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _torch_facts() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    facts: dict[str, Any] = {"torch_threads": None, "cuda_device": None, "bf16_cuda": None,
                             "tf32_matmul": None}
    if torch is None:
        return facts
    try:
        facts["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            facts["cuda_device"] = torch.cuda.get_device_name(0)
            facts["bf16_cuda"] = bool(torch.cuda.is_bf16_supported())
            facts["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)   # fp32 matmuls on TF32
    except Exception:
        pass
    return facts


def run_info(seed: int | None = None, repo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Environment facts for a run record (flat dict of str/int/float/bool/None values)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    info: dict[str, Any] = {"seed": seed, "timestamp_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                            "python": platform.python_version()}
    for name, dist in _PACKAGES.items():
        info[name] = _version(dist)
    try:
        info["platform"] = platform.platform()
        info["machine"] = platform.machine() or None
    except Exception:
        info["platform"] = info["machine"] = None
    model, flags = _cpuinfo()
    info["cpu"] = model
    info["cpu_bf16_native"] = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) if flags else None
    info["cpu_cores"] = os.cpu_count()
    try:
        info["cpu_cores_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["cpu_cores_usable"] = None
    info["ram_gb"] = _total_ram_gb()
    info.update(_torch_facts())
    repo = Path(repo_dir) if repo_dir is not None else Path.cwd()
    commit = _git(repo, "rev-parse", "HEAD")
    info["git_commit"] = commit
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no") if commit else None
    info["git_dirty"] = None if dirty is None else bool(dirty)
    return info
