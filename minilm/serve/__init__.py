"""Talking to a model over HTTP: ``minilm-serve``, an OpenAI-compatible server with a web chat page.

- :mod:`minilm.serve.engine`: the continuous-batching decoder (torch only; ``minilm-chat`` uses it too).
- :mod:`minilm.serve.api`: the FastAPI app (``/v1/completions``, ``/v1/chat/completions``,
  ``/v1/models``, ``/health``, the page at ``/``).
- :mod:`minilm.serve.main`: the ``minilm-serve`` command line.

:class:`ServeConfig` mirrors the ``serve`` section of params.yaml; importing this package imports neither
torch nor FastAPI.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from ..config import DecodePrecision
from ..schema import positive

LOOPBACK_NAMES = ("localhost",)
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


@dataclass
class ServeConfig:
    """How ``minilm-serve`` listens and batches (params.yaml ``serve:``)."""

    host: str = "127.0.0.1"           # a non-loopback host needs an API key (or allow_no_key)
    port: int = 8000
    model_name: str = "minilm"        # the id clients pass as `model`
    api_key_env: str = "MINILM_API_KEY"   # environment variable holding the key; unset or empty = no key
    allow_no_key: bool = False        # serve a non-loopback host without a key anyway
    max_batch: int = 16               # most requests decoded together (1 = serial)
    batch_window_ms: float = 5.0      # an idle engine waits this long for more requests to batch
    max_tokens: int = 512             # the largest max_tokens a request may ask for
    default_max_tokens: int = 120     # when a request gives none (cut to what fits in the context)
    device: str = "auto"              # auto | cpu | cuda[:N]
    precision: DecodePrecision = "auto"   # weights while decoding (as generate.precision)
    threads: int = 0                  # torch CPU threads; 0 = torch's default
    log_level: LogLevel = "warning"

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, self, "max_batch", "max_tokens", "default_max_tokens")
        positive(p, self, "batch_window_ms", "threads", allow_zero=True)
        if not 0 <= self.port <= 65535:
            p.append(f"port must be in 0..65535, got {self.port}")
        if self.default_max_tokens > self.max_tokens:
            p.append(f"default_max_tokens ({self.default_max_tokens}) must not exceed max_tokens "
                     f"({self.max_tokens})")
        if not self.host:
            p.append("host must not be empty (127.0.0.1 = this machine only)")
        if not self.model_name:
            p.append("model_name must not be empty")
        return p


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses only this machine can reach."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["LogLevel", "ServeConfig", "is_loopback"]
