"""From a parameter budget to a rank: the paper's formula and the exact count.

``p`` is the kept fraction of a group's MLP weight parameters; a group with
base ``U (d × r)`` and factors ``V_i (r × h_i)`` stores ``d·r + Σ nnz(V_i)``
values (biases not counted). DESIGN §1.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

from .formats import Pattern, parse_pattern

__all__ = ["rank_for_budget", "stored_values", "resolve_sparsity", "group_rank"]


def rank_for_budget(d: int, hidden: Sequence[int], budget: float, sparsity: float) -> int:
    """The paper's rank formula, generalised to any hidden widths:
    ``r = floor(p·d·H / (d + (1−s)·H))`` with ``H = Σ h_i`` (``= F·n·h``).

    DeiT-B (d=768, 8 layers of h=3072), p=0.5, s=0.75 gives 1365.
    """
    H = sum(hidden)
    return int(math.floor(budget * d * H / (d + (1.0 - sparsity) * H) + 1e-9))


def stored_values(kind: str, r: int, h: int, pattern: Tuple, sparsity: float) -> int:
    """Values a layer's factor stores at rank ``r`` (what the budget counts).
    ``pattern`` is a :class:`~fips_kernels.formats.Pattern` (or its ``(kind, n, m)``)."""
    ptype, n, m = pattern
    if ptype == "nm":
        K, N = (r, h) if kind == "expand" else (h, r)
        return -(-K // m) * n * N
    if ptype == "topk":
        return min(n, r) * h
    if ptype == "dense":
        return r * h
    return int(math.floor((1.0 - sparsity) * r * h))


def resolve_sparsity(pattern: str, sparsity: Optional[float]) -> Tuple[Pattern, float]:
    """``(parse_pattern(pattern), s)``: the sparsity an N:M pattern implies, 0 for
    dense, 0.75 by default for unstructured; a contradiction raises ValueError."""
    pat = parse_pattern(pattern)
    ptype, n, m = pat
    if ptype == "nm":
        implied = 1.0 - n / m
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(f"pattern {pattern} implies sparsity {implied}, got {sparsity}")
        sparsity = implied
    elif ptype == "topk":
        if sparsity is not None:
            raise ValueError(f"pattern {pattern} fixes the non-zeros per unit; do not pass sparsity")
        sparsity = 0.0  # resolved against the rank by group_rank's caller
    elif ptype == "dense":
        if sparsity not in (None, 0, 0.0):
            raise ValueError(f"pattern 'dense' has sparsity 0, got {sparsity}")
        sparsity = 0.0
    elif sparsity is None:
        sparsity = 0.75
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return pat, sparsity


def group_rank(d: int, hidden: Sequence[int], kinds: Sequence[str], pattern: str = "unstructured",
               budget: float = 0.5, sparsity: Optional[float] = None) -> int:
    """The rank :func:`~fips_kernels.factorize_group` chooses: the paper's formula
    (:func:`rank_for_budget`; for ``topK``, ``d·r + K·Σh ≤ p·d·Σh``), then lowered
    until ``d·r + Σ stored values ≤ p·Σ d·h`` holds exactly (N:M tails and floors
    can overshoot the formula by a few values)."""
    pat, sparsity = resolve_sparsity(pattern, sparsity)
    dense_params = sum(d * h for h in hidden)
    if pat.kind == "topk":
        rank = int(math.floor((budget * dense_params - pat.n * sum(hidden)) / d))
    else:
        rank = rank_for_budget(d, hidden, budget, sparsity)
    while rank > 0 and d * rank + sum(stored_values(k, rank, h, pat, sparsity)
                                      for k, h in zip(kinds, hidden)) > budget * dense_params:
        rank -= 1
    if rank < 1:
        raise ValueError(f"budget {budget} leaves no rank for d={d}, hidden={list(hidden)}")
    return rank
