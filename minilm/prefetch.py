"""A step's batches, prepared one step ahead off the training thread and copied to the device.

While step ``k`` runs, a background thread gathers step ``k + 1``'s micro-batches (numpy indexing into
the token memmap) and, for a CUDA device, puts them in pinned memory, so the host-to-device copy that the
training thread issues is asynchronous. Language-model windows cross as the token file's own dtype
(uint16 for vocabularies up to 65535: a quarter of the bytes of int64) and are widened on the device.

Fetching ahead is only for batch sources that declare themselves pure (:func:`pure_batches`): a batch
that is a function of ``(step, micro)`` alone, with no side effects, can be made at any moment and in any
thread without changing what the run computes. Any other source (a subclass that overrides ``batch``, a
wrapper) is asked for its batches at the start of their step in the training thread, as always.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

Batch = Sequence[Any]          # (x, y) or (x, y, forward_kwargs)
Micro = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


def pure_batches(method: Callable) -> Callable:
    """Mark a ``batch(step, micro)`` method as a pure function of its arguments (safe to call ahead, from
    another thread). A subclass that overrides ``batch`` is not covered unless it marks its own."""
    method.pure_batches = True
    return method


def prefetchable(data: Any) -> bool:
    return bool(getattr(getattr(type(data), "batch", None), "pure_batches", False))


def to_device(b: Batch, device: torch.device) -> Micro:
    """``(x, y, kwargs)`` of a batch on ``device``; integer windows of a narrower dtype (a uint16 token
    file's) are copied as they are and widened to int64 there."""
    x, y = _to(b[0], device), _to(b[1], device)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in (b[2] if len(b) > 2 else {}).items()}
    return x, y, kw


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device, non_blocking=True)
    return t if t.is_floating_point() or t.dtype in (torch.int64, torch.bool) else t.to(torch.int64)


class StepBatches:
    """Step ``k``'s micro-batches on ``device`` and the count of their units (``count(y)`` summed, taken
    on the host copy, so no device sync): ``get(k)`` returns what a background thread prepared while step
    ``k - 1`` ran, then starts on step ``k + 1`` (up to ``last``). Use as a context manager: leaving waits
    for the background thread. Its errors (e.g. a bad data file) are raised by the ``get`` of that step."""

    def __init__(self, data: Any, micro: list[int], device: torch.device,
                 count: Callable[[torch.Tensor], int], last: int) -> None:
        self.data, self.micro, self.device, self.count, self.last = data, micro, device, count, last
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self.windows = self.pin and hasattr(data, "windows")   # ship the narrow dtype, widen on the device
        self.ahead = prefetchable(data)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="minilm-batches") if self.ahead else None
        self._next: tuple[int, Future] | None = None

    def get(self, step: int) -> tuple[list[Micro], int]:
        if self._next is not None and self._next[0] == step:
            host, n = self._next[1].result()
        else:
            host, n = self._host(step)
        self._next = None
        if self._pool is not None and step + 1 < self.last:
            self._next = (step + 1, self._pool.submit(self._host, step + 1))
        return [self._device(b) for b in host], n

    def _host(self, step: int) -> tuple[list[Batch], int]:
        if self.windows:
            host = [(self.data.windows(step, m),) for m in self.micro]
            n = sum(self.count(w[:, 1:].to(torch.int64)) for (w,) in host)
        else:
            host = [self.data.batch(step, m) for m in self.micro]
            n = sum(self.count(b[1]) for b in host)
        if self.pin:
            host = [tuple(t.pin_memory() if torch.is_tensor(t) else t for t in b) for b in host]
        return host, n

    def _device(self, b: Batch) -> Micro:
        if len(b) == 1:                       # a (B, T + 1) window: x is its first T tokens, y its last T
            w = _to(b[0], self.device)
            return w[:, :-1].contiguous(), w[:, 1:].contiguous(), {}
        return to_device(b, self.device)

    def __enter__(self) -> "StepBatches":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
