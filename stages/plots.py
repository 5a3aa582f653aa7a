"""Offline PNG plots and small tables (TSV/CSV) for DVC plots and people.

Plots use matplotlib's object API with the Agg canvas, so nothing touches pyplot's global state or the
process-wide backend; every file is written atomically.
"""

from __future__ import annotations

import csv
import math
import os
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from minilm.fileio import atomic_write

if TYPE_CHECKING:
    import pandas as pd

def _records(rows: Any) -> list[dict[str, Any]]:
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):     # a pandas DataFrame
        return rows.to_dict("records")
    return [dict(r) for r in rows]


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        xv, yv = _number(rec.get(x)), _number(rec.get(y))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def plot_curves(rows: "list[dict[str, Any]] | pd.DataFrame", out_png: str | os.PathLike, x: str = "step",
                ys: Sequence[str] = ("train_loss", "val_loss"), title: str | None = None,
                ylabel: str | None = None) -> list[str]:
    """Plot each column of ``ys`` against ``x`` as a line; returns the names that had data.

    Missing columns and NaN/inf/None values are skipped (val_loss logged every N steps shows as its
    own sparser line). A figure with no data at all says so instead of failing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = _records(rows)
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = []
    for name in ys:
        xs, vs = _series(records, x, name)
        if not xs:
            continue
        marker = "o" if len(xs) <= 30 else None
        ax.plot(xs, vs, label=name, marker=marker, markersize=3, linewidth=1.4)
        plotted.append(name)
    if plotted:
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no data for {', '.join(ys)}", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or ("loss" if all(n.endswith("loss") for n in ys) else "value"))
    ax.set_title(title or f"{', '.join(ys)} by {x}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_write(out_png, "wb") as fh:
        fig.savefig(fh, format="png")
    return plotted


def _columns(records: Iterable[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for rec in records:
        cols.update(dict.fromkeys(rec))
    return list(cols)


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def write_table(rows: "list[dict[str, Any]] | pd.DataFrame", path: str | os.PathLike,
                delimiter: str = ",") -> None:
    """Write rows as a CSV (or TSV) table; columns are the union of keys in first-seen order."""
    records = _records(rows)
    cols = _columns(records)
    with atomic_write(path, "w") as fh:
        writer = csv.writer(fh, delimiter=delimiter, lineterminator="\n")
        writer.writerow(cols)
        for rec in records:
            writer.writerow([_cell(rec.get(c)) for c in cols])


def write_table_csv(rows: "list[dict[str, Any]] | pd.DataFrame", path: str | os.PathLike) -> None:
    write_table(rows, path, ",")


def write_table_tsv(rows: "list[dict[str, Any]] | pd.DataFrame", path: str | os.PathLike) -> None:
    write_table(rows, path, "\t")
