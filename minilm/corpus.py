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
import importlib.metadata
import importlib.util
import os
import random
import re
import sys
import sysconfig
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

from .config import DataConfig
from .errors import DataError
from .fileio import atomic_write

MB = 1_000_000
_TEXT_SUFFIXES = (".txt", ".md", ".rst")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MIN_DOCSTRING = 40                # shorter docstrings ("Return self.") carry no useful prose
_READ_CHARS = 1 << 20              # readline() piece size: bounds memory on files with huge lines
_MAX_DOC_CHARS = 1 << 20           # a paragraph longer than this is cut at its next line end...
_HARD_DOC_CHARS = 8 << 20          # ...or anywhere once it gets this long (a file with no newlines)
_UTF8_FIX = "set data.invalid_utf8: replace to substitute U+FFFD"
# Input that is not text. A file whose characters are at least JUNK_LIMIT NUL, other C0 control codes
# (tab, line breaks and form feed are text), DEL or U+FFFD (what invalid UTF-8 becomes under
# `invalid_utf8: replace`) is refused whatever the policy, judged on every prefix from JUDGE_AFTER
# characters on (so a binary file fails fast) and on the whole file: a binary file decodes to ~45% U+FFFD
# and ~12% control codes, UTF-16 to ~50% NUL, text in a legacy 8-bit encoding to a U+FFFD per non-ASCII
# letter. Below the limit NUL bytes, never text, are stripped and counted; the rest is kept.
JUNK_LIMIT = 0.10
JUDGE_AFTER = 4096
_JUNK = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")
_SNIFF_BYTES = 64 << 20            # an error message's diagnosis reads at most this much of the file


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


def _fresh(text: str, seen: set[bytes]) -> str | None:
    """``text`` stripped, or None if it is short, not encodable or already in ``seen`` (then added)."""
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


def stdlib_documents() -> Iterator[str]:
    """Real English that ships with Python: pydoc topic pages, then standard-library docstrings.

    Source files are parsed with :mod:`ast`, never imported. Exact duplicates and docstrings shorter
    than 40 characters are dropped. The order is deterministic for a given Python version.
    """
    seen: set[bytes] = set()
    try:
        from pydoc_data.topics import topics
    except ImportError:                  # some distributions split pydoc_data out
        topics = {}
    for key in sorted(topics):
        if (text := _fresh(topics[key], seen)) is not None:
            yield text
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        for doc in _docstrings(tree):
            if (text := _fresh(doc, seen)) is not None:
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


def junk_share(text: str) -> tuple[int, int, int]:
    """(junk characters, of which NUL, of which U+FFFD) in ``text``; see :data:`JUNK_LIMIT`."""
    junk = len(_JUNK.findall(text))
    return junk, text.count("\0") if junk else 0, text.count("\ufffd") if junk else 0


def sniff_text(path: Path) -> dict[str, Any]:
    """What the file is made of, decoded with invalid bytes replaced (its first 64 MB): characters, junk,
    NUL, U+FFFD, and whether it reads as UTF-16 (a BOM, or NUL bytes nearly all at even or at odd offsets)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    chars = junk = nul = bad = 0
    parity = [0, 0]
    with open(path, "rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        done = 0
        while done < _SNIFF_BYTES:
            block = fh.read(1 << 20)
            text = decoder.decode(block, final=not block)
            chars += len(text)
            j, n, b = junk_share(text)
            junk, nul, bad = junk + j, nul + n, bad + b
            if not block:
                break
            even = block[0::2].count(0)
            parity[done % 2] += even
            parity[1 - done % 2] += block.count(0) - even
            done += len(block)
    utf16 = head in (b"\xff\xfe", b"\xfe\xff") or (
        sum(parity) >= 0.3 * max(done, 1) and max(parity) >= 0.95 * sum(parity))
    return {"chars": chars, "junk": junk, "nul": nul, "bad": bad, "utf16": utf16}


def not_text_error(path: Path, what: str = "", option: str = "data.corpus",
                   seen: tuple[int, int] | None = None) -> DataError:
    """A file refused as not text, with the advice that fits what it looks like (never the replace policy:
    replacing would keep the garbage). ``seen``: (characters, junk) of the part that was judged."""
    f = sniff_text(path)
    chars, junk = seen or (f["chars"], f["junk"])
    which = "its" if seen is None else f"its first {chars}"
    share = f"{100 * junk / max(chars, 1):.0f}% of {which} characters are NUL, control codes or U+FFFD"
    if f["utf16"]:
        advice = (f"it looks like UTF-16 text: convert it to UTF-8 (iconv -f utf-16 -t utf-8 {path.name} > "
                  f"{path.stem}.utf8{path.suffix}) and point {option} at that")
    elif f["junk"] - f["bad"] >= 0.01 * f["chars"]:
        advice = f"it looks like a binary file: point {option} at UTF-8 text instead"
    elif _first_invalid_utf8(path) >= 0:
        advice = ("it looks like text in another encoding: convert it to UTF-8 (iconv -f ENCODING -t "
                  f"utf-8, e.g. -f cp1252 or -f iso-8859-7) and point {option} at that")
    else:
        advice = ("it is valid UTF-8 that already holds the U+FFFD of an earlier lossy conversion: convert "
                  f"the original to UTF-8 again and point {option} at that")
    return DataError(f"{what}{path} is not UTF-8 text ({share}; at most {JUNK_LIMIT:.0%} is accepted "
                     f"whatever data.invalid_utf8 says); {advice}")


def utf8_error(path: Path, what: str = "", option: str = "data.corpus") -> DataError:
    """Invalid UTF-8 in ``path``: where, and the fixes that work (the replace policy only for a file that
    is text apart from a few bad bytes)."""
    f = sniff_text(path)
    if f["junk"] >= JUNK_LIMIT * max(f["chars"], 1):
        return not_text_error(path, what, option)
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


def file_documents(path: str | os.PathLike, invalid_utf8: str = "error",
                   counts: dict[str, int] | None = None) -> Iterator[str]:
    """A text file's paragraphs (blank-line separated), streamed.

    A paragraph longer than ~1M characters is cut at its next line end (a one-sentence-per-line
    corpus has no blank lines), so memory stays bounded. NUL bytes are dropped; a file that is not
    mostly text (:data:`JUNK_LIMIT`: in any prefix of 4096 characters or more, or as a whole) is a
    :class:`DataError` whatever ``invalid_utf8`` says.
    ``counts``, if given, gains ``nul_stripped`` and ``replacement_chars`` (U+FFFD kept).
    """
    path = Path(path)
    buf: list[str] = []
    size = chars = junk = nul = bad = 0
    line_start = True
    try:
        with open(path, encoding="utf-8-sig", errors="strict" if invalid_utf8 == "error" else "replace",
                  newline=None) as fh:
            for piece in iter(lambda: fh.readline(_READ_CHARS), ""):
                chars += len(piece)
                j, n, b = junk_share(piece)
                if j:
                    junk, nul, bad = junk + j, nul + n, bad + b
                    if chars >= JUDGE_AFTER and junk >= JUNK_LIMIT * chars:
                        raise not_text_error(path, seen=(chars, junk))
                    if n:
                        piece = piece.replace("\0", "")
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
            if junk >= JUNK_LIMIT * max(chars, 1):
                raise not_text_error(path)
            if buf and "".join(buf).strip():
                yield "".join(buf).rstrip()
    except UnicodeDecodeError:
        raise utf8_error(path) from None
    except OSError as err:
        raise DataError(f"cannot read corpus file {path}: {err.strerror or err}") from None
    if counts is not None:
        counts["nul_stripped"] = counts.get("nul_stripped", 0) + nul
        counts["replacement_chars"] = counts.get("replacement_chars", 0) + bad


def _package_root(name: str) -> Path:
    """The source directory (or single module file) of an installed top-level package, not imported."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        raise DataError(f"data.packages: {name!r} is not an installed Python package with source files; "
                        f"pip install it or remove it from data.packages")
    origin = Path(spec.origin)
    return origin.parent if origin.name == "__init__.py" else origin


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """``{import name: "distribution version"}`` for the packages named (``"?"`` where unknown)."""
    dists = importlib.metadata.packages_distributions()
    out = {}
    for name in names:
        found = sorted(dists.get(name, []))
        try:
            out[name] = f"{found[0]} {importlib.metadata.version(found[0])}" if found else "?"
        except importlib.metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def package_documents(names: Sequence[str], exclude: set[bytes] | None = None) -> Iterator[str]:
    """The docstrings of installed packages (their tests left out), parsed with :mod:`ast`, never imported.

    Packages in the order named, files sorted, docstrings in source order; exact duplicates, docstrings
    under 40 characters and any text whose SHA-1 is in ``exclude`` (the primary corpus, so that nothing
    of the validation split leaks into training) are dropped.
    """
    seen = set(exclude or ())
    roots = [_package_root(name) for name in names]        # every name checked before any work
    for root in roots:
        files = [root] if root.is_file() else _stdlib_files(root)
        for path in files:
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, OSError):
                continue
            for doc in _docstrings(tree):
                if (text := _fresh(doc, seen)) is not None:
                    yield text


def _primary(cfg: DataConfig, counts: dict[str, int]) -> tuple[Iterable[str], str, int | None, set[bytes]]:
    """The primary corpus: its documents, source label, file count and (stdlib) document digests."""
    if cfg.corpus == "stdlib":
        # seeded shuffle of the (small, in-memory) document list, so that the validation split (the
        # corpus's tail) is drawn from every module rather than from the alphabetically last ones
        doc_list = list(stdlib_documents())
        random.Random(cfg.seed).shuffle(doc_list)
        digests = {hashlib.sha1(d.encode("utf-8")).digest() for d in doc_list}
        return doc_list, f"stdlib:python{sys.version_info.major}.{sys.version_info.minor}", None, digests
    files = _corpus_files(Path(cfg.corpus))
    docs = (d for f in files for d in file_documents(f, cfg.invalid_utf8, counts))
    return docs, str(cfg.corpus), len(files), set()


class _DocWriter:
    """Writes documents separated by a blank line, hashing and counting what it writes."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.digest = fh, hashlib.sha256()
        self.bytes = self.docs = 0

    def write(self, doc: str, cap: int = 0, since: int = 0) -> bool:
        """Write one document; False (nothing written) if it would take bytes past ``since + cap``."""
        data = (b"\n\n" if self.docs else b"") + doc.encode("utf-8")
        if cap and self.bytes - since + len(data) + 1 > cap:      # +1: the final newline
            return False
        self.fh.write(data)
        self.digest.update(data)
        self.bytes += len(data)
        self.docs += 1
        return True


def write_corpus(cfg: DataConfig, out_path: str | os.PathLike) -> dict[str, Any]:
    """Write the pretraining corpus as one UTF-8 file (documents separated by a blank line).

    The docstrings of ``cfg.packages`` come first, then the primary corpus (``cfg.corpus``, capped at
    ``corpus_max_mb``), so that the validation split, the tail of the primary corpus
    (``primary_offset`` onwards, see :func:`val_fraction_of`), is the same text with or without them.
    Returns stats: source, files, documents, bytes, sha256, truncated, primary_offset, packages (name:
    version) and package_documents, and for files nul_stripped (NUL bytes dropped) and
    replacement_chars (U+FFFD in the text, e.g. from ``invalid_utf8: replace``).
    """
    counts: dict[str, int] = {}
    docs, source, n_files, digests = _primary(cfg, counts)
    versions = package_versions(cfg.packages)
    cap = int(cfg.corpus_max_mb * MB)
    truncated = False
    with atomic_write(out_path, "wb") as fh:
        w = _DocWriter(fh)
        for doc in package_documents(cfg.packages, digests):
            w.write(doc)
        n_extra, start = w.docs, w.bytes + (2 if w.docs else 0)
        for doc in docs:
            if doc.strip() and not w.write(doc, cap, since=start):
                truncated = True
                break
        if w.docs == n_extra:
            if truncated:
                raise DataError(f"data.corpus_max_mb={cfg.corpus_max_mb} is smaller than the first "
                                f"document of {source}; raise it or set 0 (no cap)")
            raise DataError(f"corpus {source} holds no text; point data.corpus at non-empty text")
        fh.write(b"\n")
        w.digest.update(b"\n")
    return {"source": source, "files": n_files, "documents": w.docs, "bytes": w.bytes + 1,
            "sha256": w.digest.hexdigest(), "truncated": truncated, "primary_offset": start,
            "packages": versions, "package_documents": n_extra, **counts}


def val_fraction_of(stats: dict[str, Any], val_fraction: float) -> float:
    """The share of the whole corpus file to hold out so that validation is the last ``val_fraction``
    of the primary corpus (what it would be without ``data.packages``), for :func:`write_corpus` stats."""
    size, start = stats["bytes"], stats.get("primary_offset", 0)
    if not start:
        return val_fraction
    target = start + round((size - start) * (1.0 - val_fraction))
    return 1.0 - target / size
