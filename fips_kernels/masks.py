"""Magnitude masks of the factors ``V_i (r × h_i)`` — the one implementation used
by the SVD initialisation (:mod:`.factorize`), PGD's projection (:mod:`.pgd`) and
gradual pruning during training (:mod:`.compress.schedule`).

Patterns (:class:`~fips_kernels.formats.Pattern`):

* ``dense``: keep everything;
* ``nm``: along each product's reduction axis (r for an expand factor, h for a
  contract one) every group of ``m`` keeps its ``n`` largest entries;
* ``topk``: each hidden unit (a column of V) keeps its ``n`` largest entries;
* ``unstructured``: the largest entries, counted per layer (``scope="layer"``)
  or with one threshold over all the given factors (``scope="global"``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .budget import stored_values
from .formats import Pattern, parse_pattern
from .formats.nm import keep_mask as nm_keep

__all__ = ["nm_keep", "top_k", "magnitude_masks", "group_masks", "SCOPES"]

SCOPES = ("global", "layer")


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of ``scores`` (same shape)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        flat[torch.topk(scores.flatten(), min(k, scores.numel())).indices] = True
    return flat.view(scores.shape)


def magnitude_masks(scores: Sequence[torch.Tensor], kinds: Sequence[str], pattern: Pattern,
                    keep: Union[int, Sequence[int], None] = None, scope: str = "global",
                    nm_n: Optional[int] = None) -> List[torch.Tensor]:
    """Masks (bool, like each score) keeping the largest ``scores`` under ``pattern``.

    Args:
        scores: per layer ``(r × h)`` magnitudes (entries a caller wants pruned
            for good should score below every kept one, e.g. −1).
        kinds: ``"expand"``/``"contract"`` per layer (the N:M axis).
        pattern: a :class:`Pattern` (or its string).
        keep: unstructured only: the kept count of each layer (``scope="layer"``)
            or the total over all layers (``scope="global"``; a list is summed).
        nm_n: keep this many of every ``m`` instead of the pattern's ``n``
            (a gradual N:M schedule).
    """
    pattern = parse_pattern(pattern)
    if pattern.kind == "dense":
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if pattern.kind == "topk":
        return [torch.zeros_like(s, dtype=torch.bool).scatter_(0, torch.topk(s, min(pattern.n, s.shape[0]),
                                                                            dim=0).indices, True)
                for s in scores]
    if pattern.kind == "nm":
        n = pattern.n if nm_n is None else nm_n
        masks = []
        for s, kind in zip(scores, kinds):
            B = s if kind == "expand" else s.t()  # N:M along the reduction axis (axis 0 of B)
            mask = nm_keep(B, n, pattern.m)
            masks.append(mask if kind == "expand" else mask.t())
        return masks
    if scope not in SCOPES:
        raise ValueError(f"mask_scope must be 'global' or 'layer', got {scope!r}")
    if scope == "layer":
        return [top_k(s, k) for s, k in zip(scores, keep)]
    total = keep if isinstance(keep, int) else sum(keep)
    flat = top_k(torch.cat([s.flatten() for s in scores]), total)
    return [t.view_as(s) for t, s in zip(flat.split([s.numel() for s in scores]), scores)]


def group_masks(Vs: Sequence[torch.Tensor], kinds: Sequence[str], pattern, sparsity: float,
                scope: str = "global") -> List[torch.Tensor]:
    """The final masks of a group at rank ``r = V.shape[0]``: each layer keeps what
    the budget counts (:func:`~fips_kernels.budget.stored_values`)."""
    pattern = parse_pattern(pattern)
    keep = [stored_values(k, V.shape[0], V.shape[1], pattern, sparsity) for V, k in zip(Vs, kinds)]
    with torch.no_grad():
        return magnitude_masks([V.detach().abs().float() for V in Vs], kinds, pattern, keep, scope)
