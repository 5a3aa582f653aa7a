"""Crash-safe file writing and hashing.

Every artifact minilm writes goes through :func:`atomic_write`: the bytes go to a temporary file in the
same directory, are flushed and fsynced, then renamed over the target. A crash at any moment leaves
either the old complete file or the new complete one, never a torn one. A writer killed mid-write leaves
only a hidden ``.<name>.*.tmp`` beside the target, which :func:`remove_stale_temps` clears.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import MinilmError


def _default_mode() -> int:
    """rw for everyone the umask allows (mkstemp alone would make every artifact private, 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_mode()


def _mkstemp_beside(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _FILE_MODE)
    return fd, tmp


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _io_error(path: Path, err: OSError) -> MinilmError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return MinilmError(f"no space left on device while writing {path}: free some disk space and "
                           "run again (the previous file was left intact)")
    if err.errno == errno.EFBIG:
        return MinilmError(f"cannot write {path}: file too large for this file system or the file-size "
                           "limit (ulimit -f); raise the limit or write elsewhere (the previous file was "
                           "left intact)")
    if err.errno == errno.EROFS:
        return MinilmError(f"cannot write {path}: the file system is read-only; make the directory "
                           "writable or choose another output path (the previous file was left intact)")
    if err.errno in (errno.EACCES, errno.EPERM):
        return MinilmError(f"cannot write {path}: permission denied; make the directory writable or "
                           "choose another output path (the previous file was left intact)")
    if err.errno is None:       # a short write with no cause given
        return MinilmError(f"cannot write {path}: only part of it was written ({err}); the disk may be "
                           "full or a file-size limit reached - free space and run again (the previous "
                           "file was left intact)")
    return MinilmError(f"cannot write {path}: {err.strerror or err}; the previous file was left intact")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched. OS errors (full disk,
    read-only directory) become a one-line :class:`MinilmError`.
    """
    path = Path(path)
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    try:
        fd, tmp = _mkstemp_beside(path)
    except OSError as err:
        raise _io_error(path, err) from None
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise _io_error(path, err) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_replace(tmp_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync a finished temporary file and rename it over ``path`` (for writers that need a file name)."""
    tmp_path, path = Path(tmp_path), Path(path)
    try:
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise _io_error(path, err) from None


def temp_path_beside(path: str | os.PathLike) -> Path:
    """A fresh, unused temporary file name in ``path``'s directory (the caller writes it, then calls
    :func:`atomic_replace`)."""
    path = Path(path)
    try:
        fd, tmp = _mkstemp_beside(path)
    except OSError as err:
        raise _io_error(path, err) from None
    os.close(fd)
    return Path(tmp)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a writer of ``path`` killed mid-write (SIGKILL, power loss) left beside
    it; returns them. Call it only where no other process is writing ``path`` at the same time."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove a file can be made in it (a read-only or foreign
    directory is caught before hours of work, not at the first checkpoint)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise _io_error(directory, err) from None
    os.close(fd)
    os.unlink(tmp)
    return directory


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def safe_join(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """``root / relative``, refusing any result that escapes ``root`` (``..``, absolute paths, links)."""
    root_r = Path(root).resolve()
    target = (root_r / relative).resolve()
    if target != root_r and root_r not in target.parents:
        raise MinilmError(f"path {str(relative)!r} escapes its output directory {root}; use a path "
                          "inside it")
    return target


_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # protocol-2+ pickle, zip (torch.save)


def check_safetensors_file(path: str | os.PathLike, kind: str, *, missing: str, fix: str) -> Path:
    """Refuse, with one line, anything that is not a safetensors file - before any parser sees it.

    ``kind`` names the file ("checkpoint", "adapter"); ``missing`` is the advice when it does not exist,
    ``fix`` when it is broken. Pickles (and torch.save zips) are named as such: minilm never unpickles.
    """
    from .errors import CheckpointError

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{kind} {path} not found; {missing}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; point to a {kind} file (*.safetensors)")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path} is empty or truncated; {fix}")
    if head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
        return path
    if head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{path} is a pickle/torch.save file; minilm loads only safetensors {kind}s "
                              "and never unpickles (it could run code)")
    raise CheckpointError(f"{path} is not a safetensors {kind} (unknown format); point to a file written by "
                          "minilm")


def safetensors_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    """``safetensors.torch.save`` with the header's metadata keys in sorted order. The library writes
    ``__metadata__`` from a hash map, so with two or more keys their order (and the file's bytes) changes
    from one process to the next, which breaks byte-reproducible outputs. Tensor entries are already in a
    fixed order, and the data section is left untouched."""
    import struct

    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + size:]


def short_error(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (or its type), for one-line error reports."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]
