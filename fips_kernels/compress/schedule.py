"""Sparsity schedules for the factors ``V_i``: gradual magnitude pruning (GMP)
and RigL.

GMP (Zhu & Gupta's cubic schedule; the paper's text describes gradual magnitude pruning): the target sparsity
at step ``t`` is ``s_t = s_f · (1 − (1 − t/T_end)³)``, from 0 at ``t = 0`` to
``s_f`` at ``T_end = end · steps`` (``end = 0.75``); masks are recomputed at
``t = 0, every, 2·every, …`` and at ``T_end`` (so the final sparsity is
reached exactly), then fixed. A pruned entry stays pruned (its value is set to
zero and it can never outrank a kept one). Counts are integers: the pruned
count at step ``t`` is ``round(frac_t · pruned_final)`` with
``frac_t = s_t / s_f``, and ``pruned_final`` is what the budget counts
(:func:`~fips_kernels.budget.stored_values`), so the final masks hold
exactly the number of values the rank was chosen for.

* ``scope="global"``: one magnitude threshold over all factors of the group;
  ``"layer"``: each factor pruned on its own. (The FiPS authors' code uses one
  threshold over the whole model; here groups are trained one after another, or
  on different ranks, so the widest scope is the group.)
* ``schedule="accelerated"`` (:func:`accelerated_fraction`): the FiPS authors'
  code's accelerated cubic schedule — sparsity 0.05 until the first update after
  step 0, then a jump to 0.5 and a cubic to the final sparsity at ``T_end``. The
  plain cubic above (Zhu & Gupta) is ``schedule="cubic"``, the default.
* N:M patterns keep the pattern exact at every update: along each product's
  reduction axis (r for expand, h for contract) every group of ``m`` keeps
  ``n_t = m − round(frac_t · (m − n))`` entries, so 1:4 goes 4:4 → 3:4 → 2:4 →
  1:4 on the cubic schedule (a gradual N:M schedule; ``nm_schedule="fixed"``
  applies the final N:M mask from step 0 instead).

RigL (Evci et al. 2020; unstructured only): start at the final sparsity from
the magnitude mask; at each update before ``T_end`` drop the
``α_t = α/2·(1 + cos(π t / T_end))`` fraction of the active entries with the
smallest magnitude and grow as many inactive entries with the largest dense
gradient (at value 0); the number of kept entries never changes.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from ..budget import stored_values
from ..formats import parse_pattern
from ..masks import magnitude_masks as magnitude_masks_at
from ..masks import nm_keep, top_k as _top

__all__ = ["cubic_fraction", "accelerated_fraction", "prune_end_step", "update_steps", "final_keep_counts",
           "magnitude_masks",
           "nm_keep", "rigl_fraction", "rigl_update"]


def prune_end_step(steps: int, end: float = 0.75) -> int:
    """``T_end = round(end · steps)``."""
    return int(round(end * steps))


def cubic_fraction(t: int, t_end: int) -> float:
    """``1 − (1 − t/T_end)³`` clamped to [0, 1] (1 from ``T_end`` on)."""
    if t_end <= 0 or t >= t_end:
        return 1.0
    return 1.0 - (1.0 - max(t, 0) / t_end) ** 3


def accelerated_fraction(t: int, t_end: int, t_accel: int, final: float, start: float = 0.05,
                         jump: float = 0.5) -> float:
    """The FiPS authors' accelerated cubic schedule as a fraction of the final sparsity
    ``final``: sparsity ``start`` before ``t_accel``, then a jump to ``jump`` and a cubic
    from there to ``final`` at ``T_end`` (both clamped to ``final``).
    Their code divides by ``T_end`` rather than ``T_end − t_accel``, so it stops short of
    the final sparsity unless ``t_accel = 0``; this reaches it at ``T_end`` exactly."""
    if final <= 0:
        return 1.0
    if t_end <= 0 or t >= t_end:
        return 1.0
    if t < t_accel:
        return min(start, final) / final
    s0 = min(jump, final)
    span = max(t_end - t_accel, 1)
    s = final + (s0 - final) * (1.0 - (t - t_accel) / span) ** 3
    return min(max(s / final, 0.0), 1.0)


def update_steps(steps: int, every: int, end: float = 0.75) -> List[int]:
    """The steps at which masks are recomputed: ``0, every, 2·every, … < T_end``
    and ``T_end`` itself (``T_end`` < ``steps`` unless ``end`` = 1)."""
    if every < 1:
        raise ValueError(f"prune_every must be >= 1, got {every}")
    if not 0.0 < end <= 1.0:
        raise ValueError(f"prune_end must be in (0, 1], got {end}")
    t_end = min(prune_end_step(steps, end), max(steps - 1, 0))
    out = sorted(set(range(0, t_end, every)) | {t_end})
    return out if steps > 0 else []


def final_keep_counts(kinds: Sequence[str], rank: int, hidden: Sequence[int], pattern: Tuple,
                      sparsity: float) -> List[int]:
    """Values each factor keeps at the end (what :func:`group_rank` budgets for)."""
    return [stored_values(k, rank, h, pattern, sparsity) for k, h in zip(kinds, hidden)]


def magnitude_masks(Vs: Sequence[torch.Tensor], prev: Optional[Sequence[torch.Tensor]], kinds: Sequence[str],
                    pattern: Tuple, frac: float, final_keep: Sequence[int], scope: str = "global",
                    nm_gradual: bool = True) -> List[torch.Tensor]:
    """Masks for fraction ``frac`` ∈ [0, 1] of the way to the final sparsity.

    ``Vs`` are the factors ``(r × h)``; ``prev`` the current masks (entries they
    prune stay pruned) or None; ``pattern`` is ``(ptype, n, m)``;
    ``final_keep`` the final kept count of each factor (unstructured).
    """
    pattern = parse_pattern(pattern)
    with torch.no_grad():
        scores = [V.detach().abs().float() for V in Vs]
        if prev is not None:  # a pruned entry stays pruned: it scores below every kept one
            scores = [torch.where(p, s, torch.full_like(s, -1.0)) for s, p in zip(scores, prev)]
        if pattern.kind == "nm":
            m, n = pattern.m, pattern.n
            return magnitude_masks_at(scores, kinds, pattern, nm_n=m - int(round(frac * (m - n))) if nm_gradual else n)
        if pattern.kind not in ("dense", "unstructured"):
            raise ValueError(f"compress supports unstructured, N:M and dense patterns, got {pattern.kind!r}")
        totals = [V.numel() for V in Vs]
        if scope == "layer":
            keep = [t - int(round(frac * (t - k))) for t, k in zip(totals, final_keep)]
        else:
            T, K = sum(totals), sum(final_keep)
            keep = T - int(round(frac * (T - K)))
        return magnitude_masks_at(scores, kinds, pattern, keep, scope)


def rigl_fraction(t: int, t_end: int, alpha: float = 0.3) -> float:
    """RigL's drop fraction ``α/2 · (1 + cos(π t / T_end))`` (0 from ``T_end`` on)."""
    if t >= t_end or t_end <= 0:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / t_end))


def _drop_grow(V: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Drop the ``k`` active entries of smallest |V|, grow ``k`` inactive of largest |grad|."""
    if k <= 0:
        return mask.clone()
    active = int(mask.sum())
    inactive = mask.numel() - active
    k = min(k, active, inactive)
    if k <= 0:
        return mask.clone()
    drop_scores = torch.where(mask, -V.abs().float(), torch.full_like(V, -math.inf, dtype=torch.float32))
    dropped = _top(drop_scores, k)
    after = mask & ~dropped
    grow_scores = torch.where(after, torch.full_like(V, -math.inf, dtype=torch.float32), grad.abs().float())
    grown = _top(grow_scores, k)
    return after | grown


def rigl_update(Vs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                fraction: float, scope: str = "global") -> List[torch.Tensor]:
    """One RigL drop/grow step; returns the new masks (kept counts unchanged:
    per factor with ``scope="layer"``, over the group with ``"global"``)."""
    with torch.no_grad():
        if scope == "layer":
            return [_drop_grow(V, g, mk, int(math.floor(fraction * int(mk.sum()))))
                    for V, g, mk in zip(Vs, grads, masks)]
        if scope != "global":
            raise ValueError(f"mask_scope must be 'global' or 'layer', got {scope!r}")
        sizes = [V.numel() for V in Vs]
        V = torch.cat([v.detach().flatten() for v in Vs])
        g = torch.cat([x.flatten() for x in grads])
        mk = torch.cat([x.flatten() for x in masks])
        new = _drop_grow(V, g, mk, int(math.floor(fraction * int(mk.sum()))))
        return [t.view_as(v) for t, v in zip(new.split(sizes), Vs)]
