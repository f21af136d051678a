"""The printed summary of a benchmark run: one renderer for the layer, group
and end-to-end summaries (the markdown report is ``benchmarks/report.py``).

Speed-up over the dense baseline, one line per point key (e.g. preset, kind,
pattern, provider), one column per M (or batch). A line whose every point was
skipped is left out of the table; the skipped providers are listed once
below it with their reasons (from the CSV's ``reason`` column) and the number
of rows each reason covers, and failed rows likewise.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from .registry import BASELINE

__all__ = ["speedup_table", "not_run_summary", "split_reasons"]

SKIPPED_CELL, FAILED_CELL = "-", "fail"


def _num(v) -> Optional[float]:
    try:
        return None if v in (None, "") else float(v)
    except (TypeError, ValueError):
        return None


def _cell(row: Dict[str, object]) -> str:
    status = row.get("status")
    if status == "skipped":
        return SKIPPED_CELL
    if status != "ok":
        return FAILED_CELL
    s = _num(row.get("speedup_vs_dense"))
    return "?" if s is None else f"{s:.2f}" if s >= 0.01 else f"{s:.0e}"


def _is_baseline(row: Dict[str, object]) -> bool:
    return row.get("role") == BASELINE or (not row.get("role") and row.get("provider") == "dense")


def speedup_table(rows: Sequence[Dict[str, object]], keys: Sequence[str], column: str, title: str,
                  providers: Optional[Sequence[str]] = None) -> str:
    """Speed-up over the baseline by ``column`` (e.g. ``M``), one line per
    ``keys`` tuple; baseline rows are the denominators and get no line.
    ``providers`` keeps those providers only. Lines with every point skipped
    are left out (see :func:`not_run_summary`); then the reasons follow."""
    chosen = [r for r in rows if not _is_baseline(r) and (providers is None or r["provider"] in providers)]
    table: "OrderedDict[tuple, Dict[int, str]]" = OrderedDict()
    for r in chosen:
        table.setdefault(tuple(str(r[k]) for k in keys), {})[int(r[column])] = _cell(r)
    table = OrderedDict((k, v) for k, v in table.items() if set(v.values()) != {SKIPPED_CELL})
    lines = []
    if table:
        cols = sorted({c for cells in table.values() for c in cells})
        widths = [max(len(h), *(len(k[i]) for k in table)) for i, h in enumerate(keys)]
        colw = [max(len(str(c)), 5) for c in cols]
        lines += [title, "  ".join(h.ljust(w) for h, w in zip(keys, widths)) + "  "
                  + " ".join(str(c).rjust(w) for c, w in zip(cols, colw))]
        for key, cells in table.items():
            lines.append("  ".join(k.ljust(w) for k, w in zip(key, widths)) + "  "
                         + " ".join(cells.get(c, "").rjust(w) for c, w in zip(cols, colw)))
    else:
        lines.append("(no point ran)")
    summary = not_run_summary(chosen)
    return "\n".join(lines + ([""] + summary if summary else []))


def split_reasons(reason: str) -> List[str]:
    """The clauses of a row's reason (joined by ``"; "``), keeping parentheses whole."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(reason):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and reason.startswith("; ", i):
            out.append(reason[start:i])
            start = i + 2
    out.append(reason[start:])
    return [c.strip() for c in out if c.strip()]


def not_run_summary(rows: Sequence[Dict[str, object]]) -> List[str]:
    """Skipped and failed rows, once per provider: ``provider: N rows: reason [rows], ...``."""
    lines = []
    for status, head in (("skipped", "skipped (not run here), by provider: rows, then each reason [rows it covers]:"),
                         ("failed", "FAILED, by provider: rows, then each error [rows]:")):
        per: "OrderedDict[str, Dict[str, int]]" = OrderedDict()
        total: Dict[str, int] = {}
        for r in rows:
            if r.get("status") != status:
                continue
            p = str(r["provider"])
            total[p] = total.get(p, 0) + 1
            for clause in split_reasons(str(r.get("reason") or "no reason given")):
                per.setdefault(p, OrderedDict())
                per[p][clause] = per[p].get(clause, 0) + 1
        if not per:
            continue
        width = max(len(p) for p in per)
        lines.append(head)
        for p, reasons in per.items():
            why = "; ".join(f"{c} [{n}]" for c, n in reasons.items())
            lines.append(f"  {p.ljust(width)}  {total[p]} rows: {why}")
    return lines
