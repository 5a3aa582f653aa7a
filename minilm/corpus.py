"""Pretraining text without a network: real English that ships with Python, or the user's own files.

``data.corpus`` is ``"stdlib"`` (English shipped with Python itself: the pydoc topic pages and the
docstrings of the standard library, read with :mod:`ast`, never imported) or a UTF-8 text file /
directory of text files. It is written as one UTF-8 file, documents separated by a blank line, streamed
so a multi-GB corpus never sits in memory. Instruction pairs for SFT are :mod:`minilm.pairs`.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import os
import random
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .config import DataConfig
from .errors import DataError
from .fileio import atomic_write

if TYPE_CHECKING:
    pass

MB = 1_000_000
_TEXT_SUFFIXES = (".txt", ".md", ".rst")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MIN_DOCSTRING = 40                # shorter docstrings ("Return self.") carry no useful prose
_READ_CHARS = 1 << 20              # readline() piece size: bounds memory on files with huge lines
_MAX_DOC_CHARS = 1 << 20           # a paragraph longer than this is cut at its next line end...
_HARD_DOC_CHARS = 8 << 20          # ...or anywhere once it gets this long (a file with no newlines)
_UTF8_FIX = "set data.invalid_utf8: replace to substitute U+FFFD"


# --------------------------------------------------------------------------------------------------
# pretraining corpus


def _stdlib_files(root: Path) -> list[Path]:
    """The standard library's .py files, test suites and third-party packages left out, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings in source order (cleaned like inspect.cleandoc)."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    if isinstance(tree, kinds):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(tree):
        yield from _docstrings(child)


def stdlib_documents() -> Iterator[str]:
    """Real English that ships with Python: pydoc topic pages, then standard-library docstrings.

    Source files are parsed with :mod:`ast`, never imported. Exact duplicates and docstrings shorter
    than 40 characters are dropped. The order is deterministic for a given Python version.
    """
    seen: set[bytes] = set()

    def fresh(text: str) -> str | None:
        text = text.strip()
        if len(text) < _MIN_DOCSTRING:
            return None
        try:
            digest = hashlib.sha1(text.encode("utf-8")).digest()
        except UnicodeEncodeError:       # a lone surrogate written as an escape in some docstring
            return None
        if digest in seen:
            return None
        seen.add(digest)
        return text

    try:
        from pydoc_data.topics import topics
    except ImportError:                  # some distributions split pydoc_data out
        topics = {}
    for key in sorted(topics):
        if (text := fresh(topics[key])) is not None:
            yield text
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        for doc in _docstrings(tree):
            if (text := fresh(doc)) is not None:
                yield text


def _first_invalid_utf8(path: Path) -> int:
    """Byte offset of the first invalid UTF-8 sequence in ``path`` (streamed)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pos = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 20)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                return pos - pending + err.start
            if not block:
                return -1
            pos += len(block)


def utf8_error(path: Path, what: str = "") -> DataError:
    offset = _first_invalid_utf8(path)
    where = f" at byte {offset}" if offset >= 0 else ""
    return DataError(f"{what}{path} is not valid UTF-8{where}; convert it to UTF-8 (e.g. iconv -f "
                     f"latin1 -t utf-8) or {_UTF8_FIX}")


def _corpus_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"corpus {path} not found; set data.corpus to an existing text file or "
                        "directory, or to 'stdlib'")
    if path.is_file():
        return [path]
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if not files:
        raise DataError(f"corpus directory {path} holds no *.txt, *.md or *.rst files; add some or "
                        "point data.corpus elsewhere")
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def file_documents(path: str | os.PathLike, invalid_utf8: str = "error") -> Iterator[str]:
    """A text file's paragraphs (blank-line separated), streamed.

    A paragraph longer than ~1M characters is cut at its next line end (a one-sentence-per-line
    corpus has no blank lines), so memory stays bounded.
    """
    path = Path(path)
    buf: list[str] = []
    size = 0
    line_start = True
    try:
        with open(path, encoding="utf-8-sig", errors="strict" if invalid_utf8 == "error" else "replace",
                  newline=None) as fh:
            for piece in iter(lambda: fh.readline(_READ_CHARS), ""):
                blank = line_start and not piece.strip()
                line_start = piece.endswith("\n")
                if blank:
                    if buf:
                        yield "".join(buf).rstrip()
                        buf, size = [], 0
                    continue
                buf.append(piece)
                size += len(piece)
                if (size >= _MAX_DOC_CHARS and line_start) or size >= _HARD_DOC_CHARS:
                    yield "".join(buf).rstrip()
                    buf, size = [], 0
            if buf and "".join(buf).strip():
                yield "".join(buf).rstrip()
    except UnicodeDecodeError:
        raise utf8_error(path) from None
    except OSError as err:
        raise DataError(f"cannot read corpus file {path}: {err.strerror or err}") from None


def write_corpus(cfg: DataConfig, out_path: str | os.PathLike) -> dict[str, Any]:
    """Write the pretraining corpus as one UTF-8 file (documents separated by a blank line).

    Returns stats: source, files, documents, bytes, sha256, truncated.
    """
    if cfg.corpus == "stdlib":
        # seeded shuffle of the (small, in-memory) document list, so that the validation split (the
        # corpus's tail) is drawn from every module rather than from the alphabetically last ones
        doc_list = list(stdlib_documents())
        random.Random(cfg.seed).shuffle(doc_list)
        docs: Iterable[str] = doc_list
        source = f"stdlib:python{sys.version_info.major}.{sys.version_info.minor}"
        n_files = None
    else:
        files = _corpus_files(Path(cfg.corpus))
        docs = (d for f in files for d in file_documents(f, cfg.invalid_utf8))
        source, n_files = str(cfg.corpus), len(files)
    cap = int(cfg.corpus_max_mb * MB)
    digest = hashlib.sha256()
    n_docs = n_bytes = 0
    truncated = False
    with atomic_write(out_path, "wb") as fh:
        for doc in docs:
            if not doc.strip():
                continue
            data = (b"\n\n" if n_docs else b"") + doc.encode("utf-8")
            if cap and n_bytes + len(data) + 1 > cap:       # +1: the final newline
                truncated = True
                break
            fh.write(data)
            digest.update(data)
            n_bytes += len(data)
            n_docs += 1
        if n_docs == 0:
            if truncated:
                raise DataError(f"data.corpus_max_mb={cfg.corpus_max_mb} is smaller than the first "
                                f"document of {source}; raise it or set 0 (no cap)")
            raise DataError(f"corpus {source} holds no text; point data.corpus at non-empty text")
        fh.write(b"\n")
        digest.update(b"\n")
        n_bytes += 1
    return {"source": source, "files": n_files, "documents": n_docs, "bytes": n_bytes,
            "sha256": digest.hexdigest(), "truncated": truncated}
