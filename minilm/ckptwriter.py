"""Checkpoints written in the background, so a save does not stall training.

A save copies the state into host buffers reused from save to save (pinned when the state lives on a
CUDA device, so the copies run asynchronously and the device is synchronised once), and then hashes
(SHA-256), writes, fsyncs and renames the file in one background thread while training goes on. The
training step mutates the live tensors in place, so the copy is what makes the background write see one
consistent state: the bytes written are exactly those :func:`minilm.checkpoint.save_checkpoint` would
write at the same point (same tensors, same metadata, same checksum).

Crash safety is the synchronous path's: the file goes to a temporary name beside the target and is
renamed over it only once complete and fsynced, so a process killed during a background write leaves
the previous checkpoint whole (and a hidden temporary file that the next run removes). Writes happen one
at a time, in the order they were asked for. A save waits for the write still using its buffers, and
:meth:`CheckpointWriter.wait` (called at the end of training and on every exit path) waits for all; an
error in the writer thread (a full disk, a read-only directory) is raised in the training thread as the
same one-line error a synchronous save gives, at the next save or wait.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import write_checkpoint


class CheckpointWriter:
    """Writes checkpoints from host snapshots in a background thread.

    ``pin`` allocates the snapshot buffers in page-locked memory (for state on a CUDA device). Each
    ``slot`` (e.g. ``"last"``, ``"best"``) has buffers of its own, reused by every save to that slot, so
    a save of one slot does not wait for the write of another.
    """

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}
        self._busy: dict[str, threading.Thread] = {}      # slot -> the write reading its buffers
        self._queue: list[tuple[threading.Thread, Callable[[], None] | None]] = []   # in order
        self._error: BaseException | None = None
        self.writes = 0                                    # writes started (for tests and reports)

    def save(self, slot: str, path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
             done: Callable[[], None] | None = None) -> None:
        """Snapshot ``tensors`` and ``meta`` now, write them to ``path`` in the background; ``done`` is
        called in this thread once the file is in place (at a later :meth:`save` or :meth:`wait`)."""
        busy = self._busy.get(slot)
        if busy is not None:
            busy.join()
        self._reap()
        host = self._snapshot(slot, tensors)
        meta = json.loads(json.dumps(meta))               # the loop keeps appending to its history
        previous = self._queue[-1][0] if self._queue else None
        thread = threading.Thread(target=self._write, args=(previous, Path(path), host, meta),
                                  name=f"minilm-checkpoint-{slot}")
        thread.start()
        self.writes += 1
        self._busy[slot] = thread
        self._queue.append((thread, done))

    def wait(self, *, raise_error: bool = True) -> None:
        """Block until every write asked for is on disk; raise the first error one of them hit (unless
        ``raise_error`` is false: another error is already on its way out)."""
        for thread, _ in self._queue:
            thread.join()
        self._reap(raise_error)

    def pending(self) -> bool:
        """Whether a write is still running."""
        return any(t.is_alive() for t, _ in self._queue)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.wait(raise_error=exc_type is None)

    def _reap(self, raise_error: bool = True) -> None:
        """Forget the finished writes (calling their ``done`` in order); raise a writer error."""
        while self._queue and not self._queue[0][0].is_alive():
            _, done = self._queue.pop(0)
            if done is not None and self._error is None:
                done()
        err, self._error = self._error, None
        if err is not None and raise_error:
            raise err

    def _write(self, previous: threading.Thread | None, path: Path, host: dict[str, torch.Tensor],
               meta: dict[str, Any]) -> None:
        if previous is not None:
            previous.join()                # one write at a time, in order
        if self._error is not None:        # an earlier write failed: the training thread hears of it
            return
        try:
            write_checkpoint(path, host, meta)
        except BaseException as err:       # raised in the training thread at its next save or wait
            self._error = err

    def _snapshot(self, slot: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of ``tensors`` in this slot's host buffers (allocated once per name, shape and dtype);
        device-to-host copies are issued asynchronously and waited for once."""
        buffers = self._buffers.setdefault(slot, {})
        for name in [n for n in buffers if n not in tensors]:
            del buffers[name]
        devices = set()
        with torch.no_grad():
            for name, src in tensors.items():
                src = src.detach()
                buf = buffers.get(name)
                if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                    pin = self.pin and torch.cuda.is_available()
                    buf = buffers[name] = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
                async_copy = src.is_cuda and buf.is_pinned()
                buf.copy_(src, non_blocking=async_copy)
                if async_copy:
                    devices.add(src.device)
        for device in devices:
            torch.cuda.synchronize(device)
        return {name: buffers[name] for name in tensors}
