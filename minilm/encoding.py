"""Chunks of whole lines into token bytes: in this process, or in worker processes on every core.

:func:`encode_lines` is the one place a chunk of the corpus becomes tokens. Each line (with its ``"\\n"``)
is encoded on its own, so the tokens of a file never depend on where it was cut into chunks.
:class:`WorkerPool` runs the same function in ``n`` worker processes: chunk ``i`` goes to worker
``i mod n`` and the replies are read back in the order the chunks were sent, so the token files that
:func:`minilm.data.encode_corpus` writes are byte-identical for any worker count.

A worker is a fresh interpreter (``python -m minilm.encoding``) that imports the tokenizer and numpy, not
torch: it loads the tokenizer file itself and refuses one whose SHA-256 differs from the parent's. It
talks over its stdin and stdout. A request is an 8-byte little-endian length and that many bytes of
text; a reply is a status byte, an 8-byte length and a payload: ``OK`` and the tokens' bytes,
``BAD_UTF8`` and two int64s (the offset of the first bad byte in the chunk, and the newlines before it),
or ``FAILED`` and ``"ClassName\\nmessage"`` in UTF-8. A worker has at most ``IN_FLIGHT`` chunks in
flight, so while the parent waits for the oldest reply every worker has its next chunk at hand; it reads
requests and writes replies on threads of its own, so neither side ever waits on a full pipe. Memory is
bounded by the workers times ``IN_FLIGHT`` chunks, whatever the corpus size.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import errors as _errors
from .errors import CheckpointError, DataError
from .tokenizer import CharTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

OK, BAD_UTF8, FAILED = 0, 1, 2
IN_FLIGHT = 2                     # chunks sent to one worker and not yet answered, at most
_LENGTH = struct.Struct("<Q")
_REPLY = struct.Struct("<BQ")
_BAD = struct.Struct("<QQ")
_ROOT = Path(__file__).resolve().parents[1]   # the directory holding the minilm package


def split_lines(text: str) -> list[str]:
    """Split after every ``"\\n"`` only (str.splitlines also splits on \\r, \\x0c, U+2028, ...)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def encode_lines(tokenizer: Tokenizer, chunk: bytes, errors: str, dtype: np.dtype) -> bytes:
    """The token ids of ``chunk`` (UTF-8 text decoded with ``errors``: strict or replace) as ``dtype``
    bytes, each line encoded on its own. Raises UnicodeDecodeError (strict) on invalid UTF-8."""
    ids = tokenizer.encode_batch(split_lines(chunk.decode("utf-8", errors=errors)))
    count = sum(map(len, ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype, count).tobytes()


def resolve_workers(workers: int) -> int:
    """``workers``, with 0 meaning every core this process may run on."""
    if workers < 0:
        raise _errors.ConfigError(f"workers must be >= 0 (0 = all cores), got {workers}")
    if workers:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def can_share(tokenizer: Tokenizer) -> bool:
    """Whether a worker process can load the same tokenizer from its file (minilm's own kinds)."""
    return type(tokenizer) in (SentencePieceTokenizer, CharTokenizer)


class WorkerPool:
    """``n`` worker processes encoding chunks; :meth:`send` and :meth:`receive` keep chunk order."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, errors: str, n: int):
        path = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path)      # the worker imports this very minilm
        cmd = [sys.executable, "-m", "minilm.encoding", str(tokenizer.path), tokenizer.hash,
               np.dtype(dtype).name, errors]
        self.procs: list[subprocess.Popen] = []
        self.sent = self.received = 0
        try:
            for _ in range(n):
                self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                   env=env))
        except OSError as err:
            self.close(kill=True)
            raise DataError(f"could not start {n} encode worker processes ({err}); set "
                            "encode.workers: 1 to encode in this process") from None

    @property
    def in_flight(self) -> int:
        return self.sent - self.received

    @property
    def capacity(self) -> int:
        """How many chunks may be in flight: send only while ``in_flight < capacity``."""
        return IN_FLIGHT * len(self.procs)

    def send(self, chunk: bytes) -> None:
        proc = self.procs[self.sent % len(self.procs)]
        try:
            proc.stdin.write(_LENGTH.pack(len(chunk)))
            proc.stdin.write(chunk)
            proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._died(proc) from None
        self.sent += 1

    def receive(self) -> tuple[int, bytes]:
        """``(status, payload)`` of the oldest chunk sent and not yet received."""
        proc = self.procs[self.received % len(self.procs)]
        head = _read(proc.stdout, _REPLY.size)
        status, size = _REPLY.unpack(head) if head is not None else (None, 0)
        body = _read(proc.stdout, size) if status is not None else None
        if body is None:
            raise self._died(proc)
        self.received += 1
        if status == FAILED:
            name, _, message = body.decode("utf-8", errors="replace").partition("\n")
            cls = getattr(_errors, name, None)
            if isinstance(cls, type) and issubclass(cls, _errors.MinilmError):
                raise cls(message)
            raise RuntimeError(f"encode worker failed: {name}: {message}")
        return status, body

    def _died(self, proc: subprocess.Popen) -> DataError:
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        return DataError(f"an encode worker process exited with code {code} before answering (killed, or "
                         "out of memory?); set encode.workers: 1 to encode in this process")

    def close(self, kill: bool = False) -> None:
        """End the workers: at end of input they exit; ``kill`` (after an error) stops them at once."""
        for proc in self.procs:
            if kill:
                proc.kill()
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(kill=exc_type is not None)


def _read(stream: IO[bytes], n: int) -> bytes | None:
    """Exactly ``n`` bytes, or None at end of stream."""
    data = stream.read(n) if n else b""
    return data if len(data) == n else None


# --------------------------------------------------------------------------------------------------
# the worker process


def _load(path: str, digest: str) -> Tokenizer:
    tokenizer = load_tokenizer(path)
    if tokenizer.hash != digest:
        raise CheckpointError(f"tokenizer file {path} changed while the corpus was being encoded; rerun "
                              "the encode stage")
    if isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer.threads = 1        # the parallelism is the worker processes
    return tokenizer


def _reply(chunk: bytes, tokenizer: Tokenizer | None, failure: str | None, errors: str,
           dtype: np.dtype) -> tuple[int, bytes]:
    if failure is not None or tokenizer is None:
        return FAILED, (failure or "RuntimeError\nno tokenizer").encode()
    try:
        return OK, encode_lines(tokenizer, chunk, errors, dtype)
    except UnicodeDecodeError as err:
        return BAD_UTF8, _BAD.pack(err.start, chunk.count(b"\n", 0, err.start))
    except Exception as err:     # sent to the parent, which raises it there
        return FAILED, f"{type(err).__name__}\n{' '.join(str(err).splitlines())}".encode()


def _serve(argv: list[str]) -> int:
    """Answer requests on stdin until it closes (the parent finished, failed or died)."""
    path, digest, dtype_name, errors = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # Ctrl-C: the parent stops us
    out = os.fdopen(os.dup(1), "wb")                     # replies only: stray prints go to stderr
    os.dup2(2, 1)
    tokenizer, failure = None, None
    try:
        tokenizer = _load(path, digest)
    except Exception as err:
        failure = f"{type(err).__name__}\n{' '.join(str(err).splitlines())}"
    dtype = np.dtype(dtype_name)
    requests: queue.Queue[bytes | None] = queue.Queue()        # the parent keeps these to IN_FLIGHT
    replies: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
    threading.Thread(target=_pump_in, args=(sys.stdin.buffer, requests), daemon=True).start()
    writer = threading.Thread(target=_pump_out, args=(out, replies), daemon=True)
    writer.start()
    while (chunk := requests.get()) is not None:
        replies.put(_reply(chunk, tokenizer, failure, errors, dtype))
    replies.put(None)
    writer.join()
    return 0


def _pump_in(inp: IO[bytes], requests: queue.Queue) -> None:
    try:
        while (head := _read(inp, _LENGTH.size)) is not None:
            chunk = _read(inp, _LENGTH.unpack(head)[0])
            if chunk is None:
                break
            requests.put(chunk)
    finally:
        requests.put(None)


def _pump_out(out: IO[bytes], replies: queue.Queue) -> None:
    try:
        while (reply := replies.get()) is not None:
            status, body = reply
            out.write(_REPLY.pack(status, len(body)))
            out.write(body)
            out.flush()
    except BrokenPipeError:       # the parent is gone: leave without flushing into the closed pipe
        os._exit(0)


if __name__ == "__main__":
    raise SystemExit(_serve(sys.argv[1:]))
