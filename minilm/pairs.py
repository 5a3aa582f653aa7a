"""Instruction/response pairs for SFT: the chatterbot-corpus default or the user's own file.

``data.sft`` is ``"chatterbot"`` (the installed ``chatterbot-corpus`` package) or a
.jsonl/.json/.csv/.parquet file, or a .txt file in the plain format::

    ### Instruction:
    What is a list?

    ### Response:
    An ordered, mutable sequence.

They are written as ``sft_train.jsonl`` / ``sft_val.jsonl``. The split is by *instruction*: all pairs
that share an instruction land on the same side, so validation prompts are never seen in training.
"""

from __future__ import annotations

import json
import math
import os
import numbers
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .config import DataConfig
from .corpus import JUDGE_AFTER, JUNK_LIMIT, junk_share, not_text_error, sniff_text, utf8_error
from .errors import DataError
from .fileio import atomic_write, sha256_file

if TYPE_CHECKING:
    import pandas as pd

_SFT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


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


_SFT_KEYS = ("SFT data ", "data.sft", "data.instruction_field / data.response_field")


def _records_frame(df: "pd.DataFrame", path: Path, fields: tuple[str, ...],
                   keys: tuple[str, str, str] = _SFT_KEYS) -> Iterator[tuple[str, Any]]:
    missing = [f for f in fields if f not in df.columns]
    if missing:
        have = ", ".join(map(str, df.columns)) or "none"
        raise DataError(f"{path} has no column {missing[0]!r} (columns: {have}); set {keys[2]}")
    for i, row in enumerate(df[list(fields)].itertuples(index=False, name=None), 1):
        yield f"row {i}", dict(zip(fields, row))


def _open_records(path: Path, fields: tuple[str, ...], errors: str,
                  keys: tuple[str, str, str] = _SFT_KEYS) -> Iterator[tuple[str, Any]]:
    """(where, record) items of a pairs file; ``keys`` name the data and the params that fix it."""
    import pandas as pd

    ext = path.suffix.lower()
    if ext == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path} is not a readable Parquet file ({type(err).__name__}); "
                            "re-export it") from None
        yield from _records_frame(df, path, fields, keys)
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
                yield from _records_frame(df, path, fields, keys)
    except UnicodeDecodeError:
        raise utf8_error(path, keys[0], keys[1]) from None


def read_pairs(path: str | os.PathLike, instruction_field: str = "instruction",
               response_field: str = "response", bad_records: str = "error", *,
               invalid_utf8: str = "error") -> "pd.DataFrame":
    """Read (instruction, response) pairs from .jsonl/.json/.csv/.parquet or the plain .txt format.

    Returns a DataFrame with columns ``instruction`` and ``response`` (stripped, non-empty).
    With ``bad_records="skip"`` malformed records are dropped and counted in ``df.attrs["skipped"]``;
    with ``"error"`` the first one raises a :class:`DataError` naming its line, row or record. A file that
    is not text (:data:`minilm.corpus.JUNK_LIMIT`) is refused whatever either policy says; NUL characters
    are dropped from the fields and counted in ``df.attrs["nul_stripped"]``.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"SFT data {path} not found; set data.sft to an existing "
                        f"{'/'.join(_SFT_SUFFIXES)} file, or to 'chatterbot'")
    if path.suffix.lower() not in _SFT_SUFFIXES:
        raise DataError(f"SFT data {path}: unsupported file type {path.suffix or '(none)'!r}; use one "
                        f"of {', '.join(_SFT_SUFFIXES)}")
    if path.suffix.lower() != ".parquet":          # a binary file is refused whatever the policies say
        f = sniff_text(path)
        if f["junk"] >= JUNK_LIMIT * max(f["chars"], 1):
            raise not_text_error(path, "SFT data ", "data.sft")
    fields = (instruction_field, response_field)
    rows, skipped, nul = [], 0, 0
    errors = "strict" if invalid_utf8 == "error" else "replace"
    for where, rec in _open_records(path, fields, errors):
        problem = None
        if isinstance(rec, str):
            problem = rec
        elif not isinstance(rec, dict):
            problem = f"{where} is not a JSON object"
        else:
            for name in fields:
                if isinstance(rec.get(name), str) and "\0" in rec[name]:      # NUL is never text
                    nul += rec[name].count("\0")
                    rec[name] = rec[name].replace("\0", "")
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
    chars = sum(len(a) + len(b) for a, b in rows)
    junk = sum(junk_share(a)[0] + junk_share(b)[0] for a, b in rows)
    if chars >= JUDGE_AFTER and junk >= JUNK_LIMIT * chars:    # a few pairs: the file's own check decides
        raise DataError(f"{path}: {100 * junk / chars:.0f}% of the text of its pairs is U+FFFD replacement "
                        f"characters or control codes (at most {JUNK_LIMIT:.0%} is accepted whatever "
                        "data.invalid_utf8 says): text lost in an earlier conversion; export the pairs from "
                        "their source as UTF-8 again and point data.sft at that")
    df = pd.DataFrame(rows, columns=["instruction", "response"])
    df.attrs["skipped"] = skipped
    df.attrs["nul_stripped"] = nul
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
    nul = int(df.attrs.get("nul_stripped", 0))
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
            "duplicates_removed": total - len(df), "skipped": skipped, "nul_stripped": nul,
            "train_sha256": sha256_file(train_path), "val_sha256": sha256_file(val_path)}


# --------------------------------------------------------------------------------------------------
# preference pairs (DPO)

_PREF_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_preferences(path: str | os.PathLike, prompt_field: str = "prompt", chosen_field: str = "chosen",
                     rejected_field: str = "rejected", bad_records: str = "error", *,
                     invalid_utf8: str = "error") -> "pd.DataFrame":
    """Read preference pairs (TRL's layout: a prompt, a chosen and a rejected response) from
    .jsonl/.json/.csv/.parquet; field names are configurable. Returns a DataFrame with columns ``prompt``,
    ``chosen`` and ``rejected`` (stripped, non-empty). A record missing a field, with an empty one, or
    whose chosen equals its rejected response is malformed: with ``bad_records="error"`` the first one
    raises a :class:`DataError` naming it, with ``"skip"`` they are dropped and counted in
    ``df.attrs["skipped"]``."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"preference data {path} not found; set preferences.source to an existing "
                        f"{'/'.join(_PREF_SUFFIXES)} file, or to 'self'")
    if path.suffix.lower() not in _PREF_SUFFIXES:
        raise DataError(f"preference data {path}: unsupported file type {path.suffix or '(none)'!r}; use one "
                        f"of {', '.join(_PREF_SUFFIXES)}")
    if path.suffix.lower() != ".parquet":
        f = sniff_text(path)
        if f["junk"] >= JUNK_LIMIT * max(f["chars"], 1):
            raise not_text_error(path, "preference data ", "preferences.source")
    fields = (prompt_field, chosen_field, rejected_field)
    rows, skipped = [], 0
    errors = "strict" if invalid_utf8 == "error" else "replace"
    keys = ("preference data ", "preferences.source",
            "preferences.prompt_field / preferences.chosen_field / preferences.rejected_field")
    for where, rec in _open_records(path, fields, errors, keys):
        problem = _preference_problem(where, rec, fields)
        if problem is None:
            rows.append(tuple(_text(rec[name]) for name in fields))
        elif bad_records == "skip":
            skipped += 1
        else:
            raise DataError(f"{path}: {problem}; fix it or set preferences.bad_records: skip")
    if not rows:
        why = f" (all {skipped} records were malformed and skipped)" if skipped else ""
        raise DataError(f"{path} holds no preference pairs{why}; add some or point preferences.source "
                        "elsewhere")
    df = pd.DataFrame(rows, columns=["prompt", "chosen", "rejected"])
    df.attrs["skipped"] = skipped
    return df


def _preference_problem(where: str, rec: Any, fields: tuple[str, str, str]) -> str | None:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return f"{where} is not a JSON object"
    for name in fields:
        if name not in rec:
            keys = ", ".join(map(str, rec)) or "none"
            return (f"{where} has no {name!r} field (fields: {keys}); set preferences.prompt_field / "
                    "chosen_field / rejected_field")
        if _text(rec[name]) is None:
            return f"{where} has an empty or non-text {name!r}"
    if _text(rec[fields[1]]) == _text(rec[fields[2]]):
        return f"{where} has the same text as chosen and as rejected (nothing to prefer)"
    return None


def split_preferences(df: "pd.DataFrame", fraction: float, seed: int) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """Seeded (train, val) split of preference pairs; pairs sharing a prompt stay together."""
    train_idx, val_idx = _split_by_instruction(df.rename(columns={"prompt": "instruction"}), fraction, seed)
    return df.iloc[train_idx].reset_index(drop=True), df.iloc[val_idx].reset_index(drop=True)


def write_preferences(path: str | os.PathLike, df: "pd.DataFrame") -> None:
    """Preference pairs as JSONL (``prompt``, ``chosen``, ``rejected``), written atomically."""
    with atomic_write(Path(path), "w") as fh:
        for prompt, chosen, rejected in df[["prompt", "chosen", "rejected"]].itertuples(index=False, name=None):
            fh.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected},
                                ensure_ascii=False) + "\n")
