"""Token data: encode a text corpus into flat token files, and sample training windows from them.

:func:`encode_corpus` streams a UTF-8 text file (any size: it never holds the whole file) into
``train.bin`` / ``val.bin`` (raw uint16 or uint32 tokens) and ``meta.json``. The first ``1 - val_fraction``
of the file's bytes, cut at a line boundary, become the training split and the rest the validation split.
Each line (with its ``"\\n"``) is encoded on its own, so the tokens never depend on how the file was read
(a special token with a newline inside it, not at its end, is therefore never matched in a corpus).
With ``workers`` > 1 the chunks are encoded in worker processes (:mod:`minilm.encoding`) and written in
order: the files are byte-identical for any worker count, and memory stays bounded by the chunks in flight.

:class:`LMBatches` samples random windows from a token array (a read-only memmap from
:func:`load_tokens`) without loading it; a batch depends only on ``(seed, step, micro)``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from .encoding import BAD_UTF8, WorkerPool, can_share, encode_lines, resolve_workers
from .errors import ConfigError, DataError
from .fileio import _io_error, atomic_replace, remove_stale_temps, temp_path_beside, write_json
from .prefetch import pure_batches
from .tokenizer import Tokenizer

FORMAT = "minilm-tokens"
VERSION = 1
SPLITS = ("train", "val")
_SCAN = 1 << 20  # block size when searching for the split's line boundary


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id: uint16 up to 65535 tokens, uint32 above."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


# --------------------------------------------------------------------------------------------------
# encoding


def encode_corpus(text_path: str | os.PathLike, tokenizer: Tokenizer, out_dir: str | os.PathLike, *,
                  val_fraction: float, invalid_utf8: Literal["error", "replace"] = "error",
                  chunk_bytes: int = 1 << 20, progress: bool = True, workers: int = 1) -> dict[str, Any]:
    """Encode ``text_path`` into ``out_dir/{train.bin, val.bin, meta.json}`` and return the meta dict.

    ``invalid_utf8="replace"`` turns undecodable bytes into U+FFFD instead of failing. ``workers`` > 1
    encodes chunks of ``chunk_bytes`` in that many worker processes (0 = one per core; see
    :mod:`minilm.encoding`); the files are byte-identical for any count. Memory stays bounded by about
    ``workers * chunk_bytes`` whatever the corpus size. Files are written atomically; on any error the
    previous outputs are left as they were.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if invalid_utf8 not in ("error", "replace"):
        raise ConfigError(f"invalid_utf8 must be 'error' or 'replace', got {invalid_utf8!r}")
    if chunk_bytes <= 0:
        raise ConfigError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    n_workers = resolve_workers(workers)
    path = Path(text_path)
    if not path.is_file():
        raise DataError(f"corpus {path} not found; create it or fix the corpus path")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"corpus {path} is empty; add text to it")
    out_dir = Path(out_dir)
    for name in ("train.bin", "val.bin", "meta.json"):     # left by an encode killed mid-write
        remove_stale_temps(out_dir / name)
    dtype = token_dtype(tokenizer.vocab_size)

    with open(path, "rb") as fh:
        split = _split_offset(fh, size, val_fraction)
        if split is None:
            raise DataError(f"corpus {path} is too small for val_fraction={val_fraction}: the validation "
                            "split would be empty (no line boundary to cut at); add more lines of text or "
                            "raise val_fraction")
        encoder = _RangeEncoder(fh, tokenizer, dtype, invalid_utf8, chunk_bytes, path)
        n_workers = min(n_workers, -(-size // chunk_bytes))       # no more workers than chunks
        pool = (WorkerPool(tokenizer, dtype, encoder.errors, n_workers)
                if n_workers > 1 and can_share(tokenizer) else contextlib.nullcontext())
        with pool, _byte_progress(size, progress) as bar:
            encoder.pool, encoder.bar = pool, bar
            tokens = _encode_splits(encoder, ((0, split), (split, size)), out_dir)

    meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "tokens": tokens, "bytes": {"train": split, "val": size - split},
            "tokenizer_hash": tokenizer.hash, "source_sha256": encoder.sha256.hexdigest(),
            "val_fraction": val_fraction}
    write_json(out_dir / "meta.json", meta)
    return meta


def _encode_splits(encoder: _RangeEncoder, ranges: Any, out_dir: Path) -> dict[str, int]:
    """Encode each split's byte range into a temp file, then move both into place; the token counts."""
    temps = {name: temp_path_beside(out_dir / f"{name}.bin") for name in SPLITS}
    tokens = {}
    try:
        for name, (start, end) in zip(SPLITS, ranges):
            try:
                with open(temps[name], "wb") as out:
                    tokens[name] = encoder.encode(start, end, out)
            except OSError as err:      # full disk, file-size limit: one line, old files kept
                raise _io_error(out_dir / f"{name}.bin", err) from None
        for name in SPLITS:
            atomic_replace(temps[name], out_dir / f"{name}.bin")
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return tokens


class _Lines:
    """Off a terminal (CI logs, ``dvc repro > log``): a plain line per ~10% of the bytes, not a bar."""

    def __init__(self, total: int, stream: Any) -> None:
        self.total, self.done, self.next, self.stream = total, 0, total // 10, stream

    def update(self, n: int) -> None:
        self.done += n
        if self.done >= self.next or self.done == self.total:
            self.next = self.done + max(1, self.total // 10)
            print(f"encode: {self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB", file=self.stream, flush=True)

    def __enter__(self) -> "_Lines":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _byte_progress(total: int, enabled: bool) -> Any:
    """A byte counter: tqdm on a terminal, plain lines elsewhere, nothing when ``enabled`` is false."""
    stream = sys.stderr
    if enabled and not getattr(stream, "isatty", lambda: False)():
        return _Lines(total, stream)
    return tqdm(total=total, unit="B", unit_scale=True, desc="encode", disable=not enabled, file=stream)


def _split_offset(fh: IO[bytes], size: int, val_fraction: float) -> int | None:
    """Byte offset where validation starts: just after the line holding byte ``(1 - f) * size - 1``, or
    if that line is the last one, just after the line before it. None when there is no such boundary."""
    target = max(1, round(size * (1.0 - val_fraction)))
    pos = target - 1  # forward: first newline in [target - 1, size - 1) keeps val non-empty
    while pos < size - 1:
        fh.seek(pos)
        block = fh.read(min(_SCAN, size - 1 - pos))
        nl = block.find(b"\n")
        if nl >= 0:
            return pos + nl + 1
        pos += len(block)
    end = target - 1  # backward: last newline in [0, target - 1)
    while end > 0:
        start = max(0, end - _SCAN)
        fh.seek(start)
        nl = fh.read(end - start).rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        end = start
    return None


class _RangeEncoder:
    """Encodes byte ranges of one open file, a chunk of whole lines at a time, hashing what it reads;
    in this process, or in a :class:`~minilm.encoding.WorkerPool`'s processes (``pool``), in order."""

    def __init__(self, fh: IO[bytes], tokenizer: Tokenizer, dtype: np.dtype, invalid_utf8: str,
                 chunk_bytes: int, path: Path):
        self.fh, self.tokenizer, self.dtype = fh, tokenizer, dtype
        self.errors = "strict" if invalid_utf8 == "error" else "replace"
        self.chunk_bytes, self.path = chunk_bytes, path
        self.sha256 = hashlib.sha256()
        self.bar: Any = None
        self.pool: Any = None
        self.lines = 0  # newlines before the next chunk to write (for error messages)

    def encode(self, start: int, end: int, out: IO[bytes]) -> int:
        """Encode bytes [start, end) (which starts at a line start) into ``out``; return the token count."""
        pool = self.pool if isinstance(self.pool, WorkerPool) else None
        n_tokens = 0
        sent: collections.deque[tuple[int, int, int]] = collections.deque()  # (offset, bytes, newlines)
        for chunk, offset in self._chunks(start, end):
            if pool is None:
                try:
                    data = encode_lines(self.tokenizer, chunk, self.errors, self.dtype)
                except UnicodeDecodeError as err:
                    raise self._bad_utf8(offset + err.start, chunk.count(b"\n", 0, err.start)) from None
                n_tokens += self._write(data, len(chunk), chunk.count(b"\n"), out)
                continue
            if pool.in_flight == pool.capacity:
                n_tokens += self._collect(pool, sent.popleft(), out)
            pool.send(chunk)
            sent.append((offset, len(chunk), chunk.count(b"\n")))
        while sent:
            n_tokens += self._collect(pool, sent.popleft(), out)
        return n_tokens

    def _chunks(self, start: int, end: int) -> Iterator[tuple[bytes, int]]:
        """``(chunk, offset)``: bytes [start, end) in chunks of whole lines (the last may lack its "\\n")."""
        self.fh.seek(start)
        pos = chunk_start = start
        pending: list[bytes] = []  # pieces of a line not yet ended
        while pos < end:
            block = self.fh.read(min(self.chunk_bytes, end - pos))
            if not block:
                raise DataError(f"corpus {self.path} shrank while it was being read; do not edit it "
                                "during encoding and run again")
            self.sha256.update(block)
            pos += len(block)
            cut = len(block) if pos == end else block.rfind(b"\n") + 1
            if cut == 0:  # no line ends in this block: keep reading
                pending.append(block)
                continue
            chunk = b"".join(pending + [block[:cut]])
            pending = [block[cut:]] if cut < len(block) else []
            yield chunk, chunk_start
            chunk_start += len(chunk)

    def _collect(self, pool: WorkerPool, chunk: tuple[int, int, int], out: IO[bytes]) -> int:
        offset, n_bytes, newlines = chunk
        status, body = pool.receive()
        if status == BAD_UTF8:
            at, before = struct.unpack("<QQ", body)
            raise self._bad_utf8(offset + at, before)
        return self._write(body, n_bytes, newlines, out)

    def _write(self, data: bytes, n_bytes: int, newlines: int, out: IO[bytes]) -> int:
        # file.write, not ndarray.tofile: a full disk then raises with its errno (tofile reports only a
        # short write)
        out.write(data)
        self.lines += newlines
        self.bar.update(n_bytes)
        return len(data) // self.dtype.itemsize

    def _bad_utf8(self, offset: int, newlines_before: int) -> DataError:
        return DataError(f"corpus {self.path} is not valid UTF-8 at byte {offset} (line "
                         f"{self.lines + newlines_before + 1}); re-save it as UTF-8, or set "
                         "encode.invalid_utf8: replace to turn bad bytes into U+FFFD")



# --------------------------------------------------------------------------------------------------
# reading


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` written by :func:`encode_corpus`, checked."""
    path = Path(directory) / "meta.json"
    fix = "rerun the encode stage (e.g. `dvc repro encode`)"
    if not path.is_file():
        raise DataError(f"{path} not found; {fix}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is corrupt ({err}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a minilm token meta file; {fix}")
    tokens = meta.get("tokens")
    if (meta.get("dtype") not in ("uint16", "uint32") or not isinstance(meta.get("vocab_size"), int)
            or not isinstance(tokens, dict) or not all(isinstance(tokens.get(s), int) for s in SPLITS)):
        raise DataError(f"{path} is missing or has malformed fields (dtype, vocab_size, tokens); {fix}")
    return meta


def load_tokens(path: str | os.PathLike) -> np.memmap:
    """A read-only memmap of a token file; its dtype and expected length come from the ``meta.json``
    beside it."""
    path = Path(path)
    meta = read_meta(path.parent)
    fix = "rerun the encode stage (e.g. `dvc repro encode`)"
    if not path.is_file():
        raise DataError(f"token file {path} not found; {fix}")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    expected = meta["tokens"].get(path.stem)
    if size % dtype.itemsize or (expected is not None and size // dtype.itemsize != expected):
        raise DataError(f"token file {path} holds {size} bytes, which does not match meta.json "
                        f"({expected} {dtype.name} tokens); it is truncated or stale: {fix}")
    if size == 0:
        raise DataError(f"token file {path} is empty; {fix} with more text")
    return np.memmap(path, dtype=dtype, mode="r", shape=(size // dtype.itemsize,))


# --------------------------------------------------------------------------------------------------
# batches

_TRAIN, _EVAL = 0, 1  # first seed word: keeps training and evaluation windows independent


class LMBatches:
    """Random windows of ``context_length + 1`` tokens: ``x`` is the first T, ``y`` the last T.

    Batches are a pure function of ``(seed, step, micro)``, so a resumed run sees exactly the batches
    it would have seen. Only the sampled windows are read from ``tokens`` (a memmap stays on disk).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int):
        if batch_size <= 0 or context_length <= 0:
            raise ConfigError(f"batch_size and context_length must be > 0, got {batch_size} and "
                              f"{context_length}")
        if tokens.ndim != 1:
            raise DataError(f"token array must be 1-D, got shape {tokens.shape}")
        if len(tokens) < context_length + 1:
            source = getattr(tokens, "filename", None)      # a memmap knows its file
            what = _relative(source) if source else "the token data"
            raise DataError(f"{what} has {len(tokens)} tokens but one training window needs "
                            f"context_length + 1 = {context_length + 1}; add more text or lower "
                            "model.context_length")
        self.tokens = tokens
        self.batch_size, self.context_length, self.seed = batch_size, context_length, seed
        self._windows = sliding_window_view(tokens, context_length + 1)  # (N - T, T + 1), a view
        self.n_windows = len(self._windows)

    @pure_batches
    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``x, y`` of shape (B, T), int64, with ``y[:, i] == x[:, i + 1]`` along the source text."""
        return _split(self._gather(self._train_rng(step, micro)))

    def windows(self, step: int, micro: int = 0) -> torch.Tensor:
        """The (B, T + 1) windows :meth:`batch` splits into ``x, y``, in the token file's dtype (uint16 or
        uint32): what crosses to a CUDA device, widened there (:mod:`minilm.prefetch`)."""
        return torch.from_numpy(self._gather(self._train_rng(step, micro)))

    def eval_batches(self, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of ``n`` batches (the same for the same ``n``, ``seed`` and data)."""
        rng = np.random.default_rng(_seed_words(_EVAL, seed))
        return [_split(self._gather(rng)) for _ in range(n)]

    def _train_rng(self, step: int, micro: int) -> np.random.Generator:
        return np.random.default_rng(_seed_words(_TRAIN, self.seed, step, micro))

    def _gather(self, rng: np.random.Generator) -> np.ndarray:
        """(B, T + 1) windows at random starts, in the tokens' dtype."""
        return np.asarray(self._windows[rng.integers(0, self.n_windows, size=self.batch_size)])


def _split(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``x, y`` (int64, contiguous) of (B, T + 1) windows."""
    windows = windows.astype(np.int64)
    return (torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
            torch.from_numpy(np.ascontiguousarray(windows[:, 1:])))


def _relative(path: str) -> str:
    """``path`` relative to the working directory when it is inside it (shorter messages)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _seed_words(*keys: int) -> list[int]:
    """Seed words for numpy's SeedSequence (which needs non-negative ints)."""
    return [int(k) % (1 << 64) for k in keys]
