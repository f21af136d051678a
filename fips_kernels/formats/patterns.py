"""Sparsity patterns as users name them (``"unstructured"``, ``"dense"``, ``"1:4"``,
``"top4"``) and the one map from a pattern to the formats that store it."""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

from .base import FormatError
from .nm import nm_bits

__all__ = ["Pattern", "parse_pattern", "nm_sparsity", "PATTERN_FORMATS", "default_format"]

# pattern kind -> the formats that can store it, the default first
PATTERN_FORMATS: Dict[str, Tuple[str, ...]] = {
    "unstructured": ("bitmap", "csr"),
    "nm": ("nm",),
    "dense": ("dense",),
    "topk": ("ell",),
}


class Pattern(NamedTuple):
    """A parsed pattern: ``kind`` is ``unstructured``, ``dense``, ``nm`` (``n`` of
    every ``m``) or ``topk`` (at most ``n`` non-zeros per hidden unit).
    Unpacks as ``(kind, n, m)``."""

    kind: str
    n: Optional[int] = None
    m: Optional[int] = None

    @property
    def formats(self) -> Tuple[str, ...]:
        return PATTERN_FORMATS[self.kind]

    @property
    def default_format(self) -> str:
        return PATTERN_FORMATS[self.kind][0]

    def format_params(self, fmt: str, kind: str, rank: int, tile: Tuple[int, int] = (64, 64)) -> dict:
        """Keyword parameters for ``SparseFactor.pack(B, fmt, ...)`` of a layer's factor
        (``kind`` is ``expand``/``contract``; ``rank`` bounds a top-k list)."""
        if fmt not in self.formats:
            raise FormatError(f"format {fmt!r} does not fit pattern {self.name()!r} (use "
                              f"{' or '.join(self.formats)})")
        if fmt == "nm":
            return {"n": self.n, "m": self.m}
        if fmt == "bitmap":
            return {"tile": tuple(tile)}
        if fmt == "ell":
            return {"k": min(self.n, rank), "axis": 0 if kind == "expand" else 1}
        return {}

    def name(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "topk":
            return f"top{self.n}"
        return self.kind


def nm_sparsity(n: int, m: int) -> float:
    return 1.0 - n / m


def parse_pattern(pattern: str) -> Pattern:
    """``"unstructured"`` / ``"dense"`` / ``"N:M"`` / ``"topK"`` -> :class:`Pattern`.

    ``topK`` keeps at most K non-zeros per hidden unit (a column of V): the
    ``ell`` format, for very sparse or vector-quantisation-like factors.
    """
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, tuple):  # (kind, n, m) as Pattern unpacks
        return Pattern(*pattern)
    p = str(pattern).strip().lower()
    if p in ("unstructured", "dense"):
        return Pattern(p)
    if p.startswith("top") and p[3:].isdigit() and int(p[3:]) >= 1:
        return Pattern("topk", int(p[3:]))
    if ":" in p:
        a, b = p.split(":", 1)
        try:
            n, m = int(a), int(b)
        except ValueError:
            raise FormatError(f"pattern {pattern!r}: expected 'unstructured', 'dense', 'N:M' or 'topK'") from None
        nm_bits(m)
        if not 1 <= n < m:
            raise FormatError(f"pattern {pattern!r}: needs 1 <= N < M")
        return Pattern("nm", n, m)
    raise FormatError(f"pattern {pattern!r}: expected 'unstructured', 'dense', 'N:M' (e.g. '1:4') or "
                      f"'topK' (e.g. 'top4')")


def default_format(kind: str) -> str:
    """The default storage format of a pattern kind."""
    return PATTERN_FORMATS[kind][0]
