"""Projected gradient descent for sparse, quantised factorisations
``M (d × H) ≈ U (d × r) · V (r × H)`` (Kuzmin et al., arXiv 2207.11048).

Alternating block updates from an SVD start, each followed by projections:

* **U**: exact least squares when unconstrained; with an int8 base, a gradient
  step (step 1/L) then rounding to the int8 grid with one scale per column.
* **V**: a gradient step (step 1/L, L = ‖UᵀGU‖₂) then the projection onto the
  sparse set (the group's magnitude masks: unstructured, N:M along each
  layer's reduction axis, or top-k per hidden unit) and onto the
  quantisation grid (round to nearest, symmetric, one scale per ``qgroup``
  rows of the reduction axis and column — the storage grid of
  :meth:`SparseFactor.pack`); exact least squares when V is unconstrained.
* **vq** (one non-zero of value 1 per column): the V-update is the exact
  minimisation over that set — each column takes its nearest atom — and the
  U-update the least-squares centroids: Lloyd's k-means.

Special cases: no sparsity and no quantisation is alternating least squares
(truncated SVD's error); sparsity without quantisation is sparse coding of the
columns in a learned dictionary (the sparse-PCA form); quantisation without
sparsity is a quantised low-rank factorisation. ``G`` (optional, ``d × d``,
e.g. ``XᵀX`` of calibration inputs) weights the error: ``tr((M−UV)ᵀ G (M−UV))``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .formats import parse_pattern
from .formats.quant import quantize_dequantize  # the storage grid (re-exported: pgd.quantize_dequantize)
from .masks import group_masks

__all__ = ["PGDResult", "pgd_factorize", "quantize_dequantize", "project_v"]


@dataclass
class PGDResult:
    U: torch.Tensor  # (d, r), fp32, on the grid when quantised
    V: torch.Tensor  # (r, H), fp32, sparse and on the grid
    losses: List[float] = field(default_factory=list)  # relative error ‖M−UV‖/‖M‖ per step (G-weighted)


def project_v(V: torch.Tensor, widths: Sequence[int], kinds: Sequence[str], pattern: Tuple, sparsity: float,
              scope: str, qbits: Optional[int], qgroup: int) -> torch.Tensor:
    """The group's V onto the sparse set (magnitude masks) and the quantisation grid."""
    Vs = list(V.split(list(widths), dim=1))
    masks = group_masks(Vs, kinds, pattern, sparsity, scope)
    out = []
    for Vi, mask, kind in zip(Vs, masks, kinds):
        Vi = Vi * mask
        if qbits:  # the grid runs along each layer's reduction axis: B = V (expand) or Vᵀ (contract)
            B = Vi if kind == "expand" else Vi.t()
            B = quantize_dequantize(B, qbits, qgroup)
            Vi = B if kind == "expand" else B.t()
        out.append(Vi)
    return torch.cat(out, dim=1)


def _spectral_norm(A: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(A, ord=2)) if A.numel() else 0.0


def _rel_error(M, U, V, G) -> float:
    R = M - U @ V
    if G is None:
        return float(R.norm() / M.norm().clamp_min(1e-30))
    return float(torch.sqrt((R * (G @ R)).sum() / (M * (G @ M)).sum().clamp_min(1e-30)))


def pgd_factorize(M: torch.Tensor, U0: torch.Tensor, V0: torch.Tensor, *, widths: Sequence[int],
                  kinds: Sequence[str], pattern: str = "dense", sparsity: float = 0.0, scope: str = "global",
                  qbits: Optional[int] = None, qgroup: int = 64, base_qbits: Optional[int] = None,
                  vq: bool = False, steps: int = 100, G: Optional[torch.Tensor] = None,
                  ridge: float = 1e-6) -> PGDResult:
    """Minimise ``‖M − U·V‖`` (G-weighted) over projected ``U``, ``V`` from ``(U0, V0)``.

    Args:
        M: ``(d, H)``, the group's weights side by side in ``d × h`` orientation.
        U0, V0: the start, ``(d, r)`` and ``(r, H)`` (e.g. from the SVD).
        widths, kinds: each layer's ``h`` and ``"expand"``/``"contract"`` (the
            N:M axis and the quantisation grid follow each layer's reduction axis).
        pattern, sparsity, scope: as :func:`fips_kernels.factorize_group`.
        qbits, qgroup: the factors' grid (None: float). base_qbits: 8 for an int8 base.
        vq: one non-zero of value 1 per column (k-means); ignores pattern and qbits.
        steps: alternating updates. G: optional ``(d, d)`` weighting.
    Returns:
        :class:`PGDResult`; ``losses[0]`` is the start after projection.
    """
    M = M.float()
    U, V = U0.float().clone(), V0.float().clone()
    d, r = U.shape
    Gm = G.float() if G is not None else None
    pat = parse_pattern(pattern)
    v_free = not vq and pat[0] == "dense" and not qbits
    eye = torch.eye(r, device=M.device)

    def proj_v(V):
        if vq:
            return V
        return project_v(V, widths, kinds, pat, sparsity, scope, qbits, qgroup)

    def proj_u(U):
        return quantize_dequantize(U, base_qbits, max(d, 1)) if base_qbits else U

    U, V = proj_u(U), proj_v(V)
    losses = [_rel_error(M, U, V, Gm)]
    for _ in range(steps):
        # U-update: exact least squares, or a projected gradient step for an int8 base
        if base_qbits:
            GR = (U @ V - M) if Gm is None else Gm @ (U @ V - M)
            L = max(_spectral_norm(V) ** 2 * (_spectral_norm(Gm) if Gm is not None else 1.0), 1e-12)
            U = proj_u(U - GR @ V.t() / L)
        else:
            U = torch.linalg.solve(V @ V.t() + ridge * eye, V @ M.t()).t()
        # V-update
        if vq:  # nearest atom (G-weighted): the k-means assignment step
            GU = U if Gm is None else Gm @ U
            dist = (U * GU).sum(0).unsqueeze(1) - 2 * (GU.t() @ M)  # ‖u_k‖² − 2 u_kᵀ m_c (+‖m_c‖²)
            V = torch.zeros_like(V).scatter_(0, dist.argmin(0, keepdim=True), 1.0)
        elif v_free:
            UtG = U.t() if Gm is None else U.t() @ Gm
            V = torch.linalg.solve(UtG @ U + ridge * eye, UtG @ M)
        else:
            UtG = U.t() if Gm is None else U.t() @ Gm
            L = max(_spectral_norm(UtG @ U), 1e-12)
            V = proj_v(V - UtG @ (U @ V - M) / L)
        losses.append(_rel_error(M, U, V, Gm))
    return PGDResult(U, V, losses)
