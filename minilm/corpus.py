"""Training data without a network: a real-English pretraining corpus and instruction pairs for SFT.

Pretraining text comes from ``data.corpus``: ``"stdlib"`` (English shipped with Python itself: the
pydoc topic pages and the docstrings of the standard library, read with :mod:`ast`, never imported) or
a UTF-8 text file / directory of text files. It is written as one UTF-8 file, documents separated by a
blank line, streamed so a multi-GB corpus never sits in memory.

SFT pairs come from ``data.sft``: ``"chatterbot"`` (the installed ``chatterbot-corpus`` package) or a
.jsonl/.json/.csv/.parquet file, or a .txt file in the plain format::

    ### Instruction:
    What is a list?

    ### Response:
    An ordered, mutable sequence.

They are written as ``sft_train.jsonl`` / ``sft_val.jsonl``. The split is by *instruction*: all pairs
that share an instruction land on the same side, so validation prompts are never seen in training.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import json
import math
import numbers
import os
import random
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal

from .errors import DataError
from .fileio import atomic_write, sha256_file

if TYPE_CHECKING:
    import pandas as pd

MB = 1_000_000
_TEXT_SUFFIXES = (".txt", ".md", ".rst")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MIN_DOCSTRING = 40                # shorter docstrings ("Return self.") carry no useful prose
_READ_CHARS = 1 << 20              # readline() piece size: bounds memory on files with huge lines
_MAX_DOC_CHARS = 1 << 20           # a paragraph longer than this is cut at its next line end...
_HARD_DOC_CHARS = 8 << 20          # ...or anywhere once it gets this long (a file with no newlines)
_SFT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_UTF8_FIX = "set data.invalid_utf8: replace to substitute U+FFFD"


@dataclass
class DataConfig:
    """Where the pretraining corpus and the SFT pairs come from (params.yaml ``data:``)."""

    corpus: str = "stdlib"                 # "stdlib" or a UTF-8 text file / directory of them
    corpus_max_mb: float = 0               # 0 = all; else cap, cut at a document boundary
    sft: str = "chatterbot"                # "chatterbot" or a .jsonl/.json/.csv/.parquet/.txt file
    instruction_field: str = "instruction"
    response_field: str = "response"
    sft_val_fraction: float = 0.1
    invalid_utf8: Literal["error", "replace"] = "error"
    bad_records: Literal["error", "skip"] = "error"
    seed: int = 1337

    def problems(self) -> list[str]:
        p: list[str] = []
        if not self.corpus.strip():
            p.append("corpus must be 'stdlib' or a path, got an empty string")
        if not self.sft.strip():
            p.append("sft must be 'chatterbot' or a path, got an empty string")
        if self.corpus_max_mb < 0:
            p.append(f"corpus_max_mb must be >= 0 (0 = no cap), got {self.corpus_max_mb}")
        if not 0.0 < self.sft_val_fraction < 1.0:
            p.append(f"sft_val_fraction must be in (0, 1), got {self.sft_val_fraction}")
        if not self.instruction_field or not self.response_field:
            p.append("instruction_field and response_field must not be empty")
        elif self.instruction_field == self.response_field:
            p.append(f"instruction_field and response_field must differ, both are "
                     f"{self.instruction_field!r}")
        return p


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


def _utf8_error(path: Path, what: str = "") -> DataError:
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
        raise _utf8_error(path) from None
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


# --------------------------------------------------------------------------------------------------
# SFT pairs


def _text(value: Any) -> str | None:
    """A stripped non-empty string from a record value (numbers are converted), else None."""
    if isinstance(value, str):
        s = value
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        s = str(value)
    else:
        return None
    s = s.strip()
    return s or None


def chatterbot_pairs() -> "pd.DataFrame":
    """(instruction, response) pairs from the installed chatterbot-corpus English conversations.

    Each conversation is a list of turns; every two consecutive turns make a pair.
    """
    import pandas as pd
    import yaml

    try:
        import chatterbot_corpus
    except ImportError:
        raise DataError("the chatterbot-corpus package is not installed; pip install "
                        "chatterbot-corpus, or set data.sft to your own pairs file") from None
    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    files = sorted(root.glob("*.yml"))
    if not files:
        raise DataError(f"chatterbot-corpus has no English data under {root}; reinstall it "
                        "(pip install --force-reinstall chatterbot-corpus)")
    rows = []
    for path in files:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise DataError(f"{path} is not readable YAML ({type(err).__name__}); reinstall "
                            "chatterbot-corpus") from None
        conversations = data.get("conversations") if isinstance(data, dict) else None
        for conv in conversations if isinstance(conversations, list) else []:
            if not isinstance(conv, list):
                continue
            turns = [_text(t) for t in conv]
            rows += [(a, b) for a, b in zip(turns, turns[1:]) if a and b]
    if not rows:
        raise DataError(f"no conversation pairs found in {root}; reinstall chatterbot-corpus")
    return pd.DataFrame(rows, columns=["instruction", "response"])


_HEADER = re.compile(r"^###\s*(instruction|response)\s*:\s?(.*)$", re.IGNORECASE)


def _records_txt(fh) -> Iterator[tuple[str, Any]]:
    """Parse the plain ``### Instruction: / ### Response:`` format into (where, record) items."""
    start, part, instr, resp = 0, None, [], []

    def finish():
        if part is None:
            return None
        if part == "instruction":
            return f"line {start}", f"the '### Instruction:' block at line {start} has no '### Response:'"
        return f"line {start}", {"instruction": "".join(instr), "response": "".join(resp)}

    for lineno, line in enumerate(fh, 1):
        m = _HEADER.match(line.rstrip("\r\n"))
        kind = m.group(1).lower() if m else None
        if kind == "instruction":
            if (done := finish()) is not None:
                yield done
            start, part, instr, resp = lineno, "instruction", [m.group(2) + "\n"], []
        elif kind == "response" and part == "instruction":
            part = "response"
            resp.append(m.group(2) + "\n")
        elif part == "instruction":
            instr.append(line)
        elif part == "response":
            resp.append(line)
        elif line.strip():
            yield f"line {lineno}", (f"line {lineno} is outside any '### Instruction:' block "
                                     "(a '### Response:' needs an instruction before it)")
    if (done := finish()) is not None:
        yield done


def _records_jsonl(fh) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            yield f"line {lineno}", f"line {lineno} is not valid JSON ({err.msg})"


def _records_frame(df: "pd.DataFrame", path: Path, fields: tuple[str, str]) -> Iterator[tuple[str, Any]]:
    missing = [f for f in fields if f not in df.columns]
    if missing:
        have = ", ".join(map(str, df.columns)) or "none"
        raise DataError(f"{path} has no column {missing[0]!r} (columns: {have}); set "
                        "data.instruction_field / data.response_field")
    for i, row in enumerate(df[list(fields)].itertuples(index=False, name=None), 1):
        yield f"row {i}", dict(zip(fields, row))


def _open_records(path: Path, fields: tuple[str, str], errors: str) -> Iterator[tuple[str, Any]]:
    import pandas as pd

    ext = path.suffix.lower()
    if ext == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path} is not a readable Parquet file ({type(err).__name__}); "
                            "re-export it") from None
        yield from _records_frame(df, path, fields)
        return
    try:
        with open(path, encoding="utf-8-sig", errors=errors, newline=None) as fh:
            if ext == ".jsonl":
                yield from _records_jsonl(fh)
            elif ext == ".txt":
                yield from _records_txt(fh)
            elif ext == ".json":
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); fix it, "
                                    "or rename it to .jsonl if it holds one object per line") from None
                if not isinstance(data, list):
                    raise DataError(f"{path} must hold a JSON array of objects, got "
                                    f"{type(data).__name__}; wrap the records in [...]")
                yield from ((f"record {i}", rec) for i, rec in enumerate(data, 1))
            else:  # .csv
                try:
                    df = pd.read_csv(fh, dtype=str, keep_default_na=False)
                except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
                    msg = str(err).strip().splitlines()[0] if str(err).strip() else "empty file"
                    raise DataError(f"{path} is not valid CSV ({msg}); fix the file") from None
                yield from _records_frame(df, path, fields)
    except UnicodeDecodeError:
        raise _utf8_error(path, "SFT data ") from None


def read_pairs(path: str | os.PathLike, instruction_field: str = "instruction",
               response_field: str = "response", bad_records: str = "error", *,
               invalid_utf8: str = "error") -> "pd.DataFrame":
    """Read (instruction, response) pairs from .jsonl/.json/.csv/.parquet or the plain .txt format.

    Returns a DataFrame with columns ``instruction`` and ``response`` (stripped, non-empty).
    With ``bad_records="skip"`` malformed records are dropped and counted in ``df.attrs["skipped"]``;
    with ``"error"`` the first one raises a :class:`DataError` naming its line, row or record.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"SFT data {path} not found; set data.sft to an existing "
                        f"{'/'.join(_SFT_SUFFIXES)} file, or to 'chatterbot'")
    if path.suffix.lower() not in _SFT_SUFFIXES:
        raise DataError(f"SFT data {path}: unsupported file type {path.suffix or '(none)'!r}; use one "
                        f"of {', '.join(_SFT_SUFFIXES)}")
    fields = (instruction_field, response_field)
    rows, skipped = [], 0
    errors = "strict" if invalid_utf8 == "error" else "replace"
    for where, rec in _open_records(path, fields, errors):
        problem = None
        if isinstance(rec, str):
            problem = rec
        elif not isinstance(rec, dict):
            problem = f"{where} is not a JSON object"
        else:
            for name in fields:
                if name not in rec:
                    keys = ", ".join(map(str, rec)) or "none"
                    problem = (f"{where} has no {name!r} field (fields: {keys}); set "
                               "data.instruction_field / data.response_field")
                    break
                if _text(rec[name]) is None:
                    problem = f"{where} has an empty or non-text {name!r}"
                    break
        if problem is None:
            rows.append((_text(rec[instruction_field]), _text(rec[response_field])))
        elif bad_records == "skip":
            skipped += 1
        else:
            raise DataError(f"{path}: {problem}; fix it or set data.bad_records: skip")
    if not rows:
        why = f" (all {skipped} records were malformed and skipped)" if skipped else ""
        raise DataError(f"{path} holds no instruction/response pairs{why}; add some or point data.sft "
                        "elsewhere")
    df = pd.DataFrame(rows, columns=["instruction", "response"])
    df.attrs["skipped"] = skipped
    return df


def _split_by_instruction(df: "pd.DataFrame", fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split into (train, val) row indices; pairs sharing an instruction stay together."""
    n = len(df)
    target = max(1, round(n * fraction))
    groups: dict[str, list[int]] = {}
    for i, instruction in enumerate(df["instruction"]):
        groups.setdefault(instruction, []).append(i)
    rng = random.Random(seed)
    if len(groups) < 2:                       # one instruction only: split the pairs themselves
        order = list(range(n))
        rng.shuffle(order)
        val = set(order[:min(target, n - 1)])
    else:
        keys = list(groups)
        rng.shuffle(keys)
        val = set()
        for key in keys[:-1]:                 # the last group always stays in training
            if len(val) >= target:
                break
            val.update(groups[key])
    return [i for i in range(n) if i not in val], sorted(val)


def _write_jsonl(path: Path, df: "pd.DataFrame") -> None:
    with atomic_write(path, "w") as fh:
        for instruction, response in df.itertuples(index=False, name=None):
            fh.write(json.dumps({"instruction": instruction, "response": response},
                                ensure_ascii=False) + "\n")


def write_sft(cfg: DataConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``sft_train.jsonl`` and ``sft_val.jsonl`` (exact duplicates removed, seeded split)."""
    if cfg.sft == "chatterbot":
        from importlib.metadata import PackageNotFoundError, version

        df = chatterbot_pairs()
        try:
            source = f"chatterbot-corpus {version('chatterbot-corpus')}"
        except PackageNotFoundError:
            source = "chatterbot-corpus"
    else:
        df = read_pairs(cfg.sft, cfg.instruction_field, cfg.response_field, cfg.bad_records,
                        invalid_utf8=cfg.invalid_utf8)
        source = str(cfg.sft)
    skipped = int(df.attrs.get("skipped", 0))
    total = len(df)
    df = df.drop_duplicates(ignore_index=True)
    if len(df) < 2:
        raise DataError(f"SFT data {source} has {len(df)} distinct pair(s); at least 2 are needed (one "
                        "for training, one for validation)")
    train_idx, val_idx = _split_by_instruction(df, cfg.sft_val_fraction, cfg.seed)
    out_dir = Path(out_dir)
    train_path, val_path = out_dir / "sft_train.jsonl", out_dir / "sft_val.jsonl"
    _write_jsonl(train_path, df.iloc[train_idx])
    _write_jsonl(val_path, df.iloc[val_idx])
    return {"source": source, "pairs": len(df), "train": len(train_idx), "val": len(val_idx),
            "duplicates_removed": total - len(df), "skipped": skipped,
            "train_sha256": sha256_file(train_path), "val_sha256": sha256_file(val_path)}
