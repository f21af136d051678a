"""``compress(ratio=R)``: choose the factors' form so that the MLP bytes reach
``dense bytes / R`` — never more — with the best quality the rules below know.

Bytes are counted exactly as the report counts them (:attr:`SparseFactor.nbytes`
of every factor plus the base ``U`` and its scales; biases are not counted):
:func:`group_bytes` computes them from the shapes without packing anything, and
a test checks it against packed groups. For a given form (pattern, sparsity,
value bits, scale group, base bits, stored float dtype) the rank of every
group is the largest whose bytes stay within the group's share ``dense bytes
of the group / R``, so the whole model is within the target too.

Which form: :data:`RULES`, measured on all-MiniLM-L6-v2 (docs/COMPRESS.md, the
quality log): the first rule whose ratio range holds ``R`` and whose form
reaches ``R`` at a useful rank wins; a rule that cannot reach ``R`` (the rank
it leaves is below ``min_rank_fraction · d``) passes to the next. Explicit
arguments (``pattern``, ``sparsity``, ``qbits``, ``base_qbits``,
``factor_dtype``, ``qgroup``) override what the rules choose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch

from ..budget import resolve_sparsity, stored_values

__all__ = ["Form", "RULES", "Plan", "group_bytes", "max_rank", "plan_ratio", "RatioError"]

TILE = (64, 64)


class RatioError(ValueError):
    """A ratio that no form reaches (or bad ratio arguments)."""


@dataclass(frozen=True)
class Form:
    """How the factors of every group are stored."""

    pattern: str = "unstructured"
    sparsity: Optional[float] = 0.75
    qbits: Optional[int] = None          # factor values: None (float), 8 or 4
    qgroup: int = 64
    base_qbits: Optional[int] = None     # None (float) or 8
    factor_dtype: Optional[torch.dtype] = None  # stored float dtype (None: the model's)

    def describe(self) -> str:
        dt = str(self.factor_dtype).replace("torch.", "") if self.factor_dtype is not None else "model dtype"
        values = f"int{self.qbits} (scale per {self.qgroup})" if self.qbits else dt
        return (f"{self.pattern} s={self.sparsity}, values {values}, base "
                f"{'int8' if self.base_qbits else dt}, floats {dt}")


@dataclass(frozen=True)
class Rule:
    low: float                 # the rule applies to ratios in [low, high)
    high: float
    form: Form
    min_rank_fraction: float = 0.25   # of d: below it the form is too thin; try the next rule


# Measured on all-MiniLM-L6-v2 (docs/COMPRESS.md, quality log): at equal bytes a higher rank at
# s = 0.5 beats s = 0.75 (the bitmap's bit per element costs as much as a 4-bit value at s = 0.75)
# and beats a dense factor at a rank below d; int8 values up to 6.5x, int4 values (with an int8
# base) beyond; floats stored in fp16. s = 0.75 is the last resort for ratios s = 0.5 cannot reach.
RULES: Tuple[Rule, ...] = (
    Rule(1.0, 6.5, Form("unstructured", 0.5, 8, 64, 8, torch.float16)),
    Rule(1.0, 1e9, Form("unstructured", 0.5, 4, 64, 8, torch.float16)),
    Rule(1.0, 1e9, Form("unstructured", 0.75, 4, 64, 8, torch.float16), 0.0),
)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _factor_bytes(K: int, N: int, pattern: Tuple, nnz: int, qbits: Optional[int], qgroup: int,
                  itemsize: int) -> int:
    """Bytes of one packed ``K × N`` factor holding ``nnz`` stored values."""
    ptype, n, m = pattern

    def values(count: int, rows: Optional[int] = None) -> int:
        if qbits == 8:
            return count
        if qbits == 4:  # two values per byte along axis 0 (an odd count of rows is padded)
            return count // 2 + (count % 2) if rows is None else -(-rows // 2) * (count // max(rows, 1))
        return count * itemsize

    scales = -(-K // qgroup) * N * itemsize if qbits else 0
    if ptype == "dense":
        return values(K * N, K) + scales
    if ptype == "nm":
        from ..formats import nm_bits

        groups = -(-K // m)
        rows = groups * n
        per_word = 32 // nm_bits(m)
        words = -(-rows // per_word)
        return values(rows * N, rows) + words * N * 4 + scales
    tiles = -(-K // TILE[0]) * -(-N // TILE[1])
    return values(nnz) + tiles * (TILE[0] * TILE[1] // 32) * 4 + (tiles + 1) * 4 + scales


def group_bytes(d: int, hidden: Sequence[int], kinds: Sequence[str], rank: int, form: Form,
                dtype: torch.dtype = torch.float32) -> int:
    """Stored bytes of one group at ``rank`` in ``form`` (what the report counts)."""
    pat, s = resolve_sparsity(form.pattern, form.sparsity)
    itemsize = _itemsize(form.factor_dtype or dtype)
    total = d * rank * (1 if form.base_qbits else itemsize) + (rank * itemsize if form.base_qbits else 0)
    for kind, h in zip(kinds, hidden):
        K, N = (rank, h) if kind == "expand" else (h, rank)
        nnz = stored_values(kind, rank, h, pat, s)
        total += _factor_bytes(K, N, pat, nnz, form.qbits, form.qgroup, itemsize)
    return total


def max_rank(d: int, hidden: Sequence[int], kinds: Sequence[str], limit: int, form: Form,
             dtype: torch.dtype = torch.float32) -> int:
    """The largest rank whose :func:`group_bytes` is at most ``limit`` (0 if none)."""
    lo, hi = 0, max(1, 4 * d)
    while group_bytes(d, hidden, kinds, hi, form, dtype) <= limit and hi < 64 * d:
        hi *= 2
    while lo < hi:  # bytes grow with the rank
        mid = (lo + hi + 1) // 2
        if group_bytes(d, hidden, kinds, mid, form, dtype) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Plan:
    """What :func:`plan_ratio` chose: the form, each group's rank, the bytes."""

    ratio: float
    form: Form
    ranks: List[int]
    bytes: int
    dense_bytes: int
    budget: float              # kept fraction of the MLP parameters the ranks give

    @property
    def reached(self) -> float:
        return self.dense_bytes / self.bytes

    def describe(self) -> str:
        return (f"target ratio {self.ratio:g}: {self.form.describe()}, ranks {self.ranks}, "
                f"{self.bytes:,} of {self.dense_bytes:,} bytes (ratio {self.reached:.3f}), "
                f"{self.budget:.3f} of the parameters")


def plan_ratio(groups, ratio: float, dtype: torch.dtype = torch.float32, **fixed) -> Plan:
    """A :class:`Plan` for ``groups`` (:class:`~.presets.GroupSpec`) at ``ratio``.

    ``fixed``: any of ``pattern``, ``sparsity``, ``qbits``, ``qgroup``, ``base_qbits``,
    ``factor_dtype`` given by the caller; they replace the rule's choice."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 1.0:
        raise RatioError(f"compress: ratio must be a number > 1 (dense bytes / compressed bytes), got {ratio!r}")
    fixed = {k: v for k, v in fixed.items() if v is not None}
    itemsize = _itemsize(dtype)
    dense = [sum(g.d * h for h in g.hidden) * itemsize for g in groups]
    tried = []
    rules = [r for r in RULES if r.low <= ratio < r.high] or [RULES[-1]]
    for rule in rules:
        form = replace(rule.form, **fixed)
        if "factor_dtype" not in fixed and _itemsize(dtype) <= 2:
            form = replace(form, factor_dtype=None)  # a 16-bit model keeps its own dtype (bf16 stays bf16)
        if "pattern" in fixed and "sparsity" not in fixed:  # the pattern's own sparsity (0.75 unstructured)
            form = replace(form, sparsity=None)
        try:
            resolve_sparsity(form.pattern, form.sparsity)
        except ValueError as exc:
            raise RatioError(f"compress: {exc}") from None
        ranks = [max_rank(g.d, g.hidden, g.kinds, int(dense_g / ratio), form, dtype) for g, dense_g in zip(groups, dense)]
        thin = [r for r, g in zip(ranks, groups) if r < max(1, math.ceil(rule.min_rank_fraction * g.d))]
        if thin:
            tried.append(f"{form.describe()}: ranks {ranks}")
            continue
        total = sum(group_bytes(g.d, g.hidden, g.kinds, r, form, dtype) for g, r in zip(groups, ranks))
        pat, s = resolve_sparsity(form.pattern, form.sparsity)
        params = sum(g.d * r + sum(stored_values(k, r, h, pat, s) for k, h in zip(g.kinds, g.hidden))
                     for g, r in zip(groups, ranks))
        return Plan(float(ratio), form, ranks, total, sum(dense), params / sum(g.d * sum(g.hidden) for g in groups))
    raise RatioError(f"compress: ratio {ratio:g} is out of reach: " + "; ".join(tried) +
                     " (a rank of 0 means even rank 1 is over the byte target; use a smaller ratio"
                     + (" or drop the fixed settings" if fixed else "") + ")")
