"""Benchmark CSVs: one writer for every benchmark, row by row.

Each row is written and flushed as soon as it is measured, so a run stopped
at a deadline (``scripts/gpu-check.sh``) or interrupted keeps every row it
finished. Values are formatted once here (floats to 6 significant digits,
None and NaN as an empty cell).
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["fmt", "describe", "RowWriter", "write_rows"]


def fmt(v, digits: int = 6) -> str:
    """A CSV cell: ``""`` for None/NaN, floats to ``digits`` significant digits."""
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters (a row's reason)."""
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return msg if len(msg) <= 300 else msg[:297] + "..."


def write_rows(path: Optional[str], rows: List[Dict[str, str]], columns: Sequence[str]) -> None:
    """Rewrite the whole CSV at ``path`` (None: nothing) with ``rows``, atomically (a
    ``.tmp`` file renamed over it): for benchmarks that rewrite their file after each row."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
    os.replace(tmp, path)


class RowWriter:
    """Writes ``columns`` of each emitted row to ``path`` (header first) and keeps
    the formatted rows in :attr:`rows`. ``append``: add to an existing CSV with
    the same header (the header is written only into an empty file). Use as a
    context manager."""

    def __init__(self, path: Path, columns: Sequence[str], on_row: Optional[Callable[[Dict[str, str]], None]] = None,
                 append: bool = False):
        self.path, self.columns, self.on_row = Path(path), tuple(columns), on_row
        self.rows: List[Dict[str, str]] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not append or not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != self.columns:
                raise ValueError(f"{self.path}: cannot append, its columns differ from this benchmark's")
        self._f = open(self.path, "w" if fresh else "a", newline="")
        self._writer = csv.DictWriter(self._f, fieldnames=self.columns)
        if fresh:
            self._writer.writeheader()
        self._f.flush()

    def emit(self, row: Dict[str, object]) -> Dict[str, str]:
        full = {k: fmt(row.get(k)) for k in self.columns}
        self._writer.writerow(full)
        self._f.flush()
        self.rows.append(full)
        if self.on_row is not None:
            self.on_row(full)
        return full

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
