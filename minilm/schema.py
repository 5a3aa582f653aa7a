"""Typed sections from plain mappings: the validation machinery behind every config dataclass.

:func:`build` refuses unknown keys (suggesting the closest valid one), checks each value's type against
the dataclass annotation (a float must be finite: NaN and infinity are refused), then runs the class's
``problems()`` for ranges and cross-field invariants. All problems are reported together in one line.
:func:`load_yaml` reads a params file with one-line errors for every way it can be wrong, duplicate keys
included. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import ConfigError

T = TypeVar("T")

def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true/false"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value) where value is converted to ``tp`` when that is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return (value in get_args(tp)), value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)) and math.isfinite(value):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            return False, value
        out = []
        for item in value:
            ok, v = _coerce(item, inner)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def build(cls: type[T], data: Any, section: str, *, source: str = "params.yaml",
          allow_derived: bool = False) -> T:
    """Build dataclass ``cls`` from a mapping, validating keys, types and values.

    Raises :class:`ConfigError` with every problem found, in one line.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values, got "
                          f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    derived: dict[str, str] = {} if allow_derived else getattr(cls, "_derived", {})
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key in derived:
            problems.append(f"{section}.{key} is not set here: it comes from {derived[key]}")
            continue
        if key not in fields:
            valid = [k for k in fields if k not in derived]
            problems.append(f"unknown key {section}.{key}{suggest(key, valid)}; valid keys: "
                            f"{', '.join(sorted(valid))}")
            continue
        ok, coerced = _coerce(value, hints[key])
        if not ok and isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{section}.{key} must be a finite number, got {value}")
            continue
        if not ok:
            problems.append(f"{section}.{key} must be {_type_name(hints[key])}, got {value!r}")
            continue
        kwargs[key] = coerced
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    obj = cls(**kwargs)
    check = getattr(obj, "problems", None)
    if check is not None:
        problems = [f"{section}.{p}" for p in check()]
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict of its init fields (JSON- and YAML-friendly)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def from_dict(cls: type[T], data: dict[str, Any], section: str = "config",
              source: str = "checkpoint") -> T:
    """Rebuild a dataclass saved with :func:`to_dict` (validated the same way)."""
    return build(cls, data, section, source=source, allow_derived=True)


def positive(problems: list[str], obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None:
            continue
        if (v < 0) if allow_zero else (v <= 0):
            problems.append(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")



def _unique_key_loader():
    """A SafeLoader that refuses a key written twice in one mapping (YAML would keep the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    mark = key_node.start_mark
                    try:
                        first = seen.setdefault(key, mark)
                    except TypeError:            # an unhashable key: let PyYAML report it
                        continue
                    if first is not mark:
                        where = (f"lines {first.line + 1} and {mark.line + 1}" if first.line != mark.line
                                 else f"line {mark.line + 1}, columns {first.column + 1} and "
                                      f"{mark.column + 1}")
                        raise ConfigError(f"duplicate key {key!r} at {where}; keep one (YAML would "
                                          "silently use the last)")
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a params file: a mapping of sections, with one-line errors for every way it can be wrong."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} not found; pass --params PATH or create it (see README)")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise ConfigError(f"params file {path} is {kind}; pass --params PATH of a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not valid UTF-8 (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"params file {path} cannot be read ({err.strerror or err}); check its "
                          "permissions") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}; fix the file") from None
    if data is None:
        raise ConfigError(f"{path} is empty; it must hold the params sections (see README)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of sections (e.g. 'model:'), got "
                          f"{type(data).__name__}")
    return data
