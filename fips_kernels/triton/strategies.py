"""The Triton backend's kernels for each op, and the choice of strategy by M.

* **factored** (small and medium M): expand ``z = x·U`` (cuBLAS), then
  ``y = act(z·B + b)`` with ``B`` decompressed tile by tile in SRAM; contract
  ``z = x·B`` (sparse operand in SRAM), then ``y = z·Uᵀ + b`` (cuBLAS). ``z``
  is only ``M × r`` and passes through L2 between the two launches; the bytes
  moved are the compressed bytes.
* **tile_reconstruct** (``ell`` factors, few non-zeros per hidden unit): each
  weight tile is rebuilt in SRAM from rows of ``U`` and fed to ``tl.dot``
  (:mod:`.tile_reconstruct`); this replaces ``factored`` for that format.
* **reconstruct** (large M, compute-bound): ``W = U·B`` is rebuilt once per
  call by the same Triton kernels into a reusable workspace (no allocation
  after the first call for a shape), then one dense GEMM.

The crossover between the two comes from :mod:`fips_kernels.tuning`.

Quantised factors (int8/int4 values with scales) and an int8 base are
dequantised in registers inside the same kernels (the base is then the
kernel's B operand: ``x·U`` and ``z·Uᵀ`` run through :func:`sparse_matmul`
with ``U`` as a quantised dense factor). The reconstruct paths, which write a
dense weight anyway, take a dequantised copy of an int8 base.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..formats import SparseFactor
from ..ops import base_matrix
from ..reference import activate
from ..workspaces import clear_workspaces, workspace, workspace_bytes
from .sparse_matmul import sparse_matmul
from .tile_reconstruct import tile_reconstruct_linear, tile_reconstruct_weight
from ..tuning import STRATEGY_ENV, forced_strategy, reconstruct_min_m

__all__ = ["expand", "contract", "gate_up", "reconstruct", "choose_strategy", "STRATEGIES", "clear_workspaces",
           "workspace_bytes"]

STRATEGIES = ("factored", "tile_reconstruct", "reconstruct")

Base = Union[torch.Tensor, SparseFactor]  # float U, or int8 U as a quantised dense factor


def choose_strategy(M: int, kind: str, factor: SparseFactor, d: int, device: torch.device,
                    forced: Optional[str] = None) -> str:
    """``reconstruct`` from the measured crossover M on; below it ``factored``
    (``tile_reconstruct`` for ell factors). ``forced``, else ``FIPS_KERNELS_STRATEGY``, forces one."""
    small = "tile_reconstruct" if factor.format == "ell" else "factored"
    forced = forced_strategy(forced)
    if forced:
        if forced == "sparse24":
            raise ValueError(f"{STRATEGY_ENV}='sparse24' is a strategy of the cuda backend (2:4 sparse tensor "
                             f"cores), but this call runs on triton; its strategies: {STRATEGIES}")
        if forced not in STRATEGIES:
            raise ValueError(f"{STRATEGY_ENV}={forced!r}: choose one of {STRATEGIES}")
        if forced != "reconstruct" and forced != small:
            raise ValueError(f"{STRATEGY_ENV}={forced!r} cannot run a {factor.format!r} factor "
                             f"(its strategies: {small}, reconstruct)")
        return forced
    return "reconstruct" if M >= reconstruct_min_m(device, kind, factor, d) else small


def _x_times_base(x2: torch.Tensor, U: Base) -> torch.Tensor:
    """``z = x·U`` (cuBLAS for a float base; in-register dequantisation for int8)."""
    return sparse_matmul(x2, U) if isinstance(U, SparseFactor) else torch.mm(x2, U)


def _z_times_base_t(z: torch.Tensor, U: Base, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y = z·Uᵀ + b``."""
    return sparse_matmul(z, U, bias, transpose=True) if isinstance(U, SparseFactor) else F.linear(z, U, bias)


def _dense_weight_dn(U: Base, factor: SparseFactor, kind: str, out: Optional[torch.Tensor] = None):
    """``U·V`` as ``(d × h)``: expand ``U·B``; contract ``U·Bᵀ``."""
    U = base_matrix(U)
    if factor.format == "ell":
        if kind == "expand":
            return tile_reconstruct_weight(U, factor, kind, out=out)
        h = factor.shape[0]
        if out is None:
            out = torch.empty(U.shape[0], h, dtype=U.dtype, device=U.device)
        tile_reconstruct_weight(U, factor, kind, out=out.t())  # the kernel writes (U·V)ᵀ
        return out
    return sparse_matmul(U, factor, out=out, transpose=(kind == "contract"))


def expand(x2: torch.Tensor, U: Base, factor: SparseFactor, bias: Optional[torch.Tensor],
           activation: str = "none", strategy: Optional[str] = None) -> torch.Tensor:
    """``act((x·U)·B + b)``; x2 ``(M, d)`` → ``(M, h)``."""
    act = None if activation in (None, "none") else activation
    d = U.shape[0]
    strategy = choose_strategy(x2.shape[0], "expand", factor, d, x2.device, strategy)
    if strategy == "reconstruct":
        W = _dense_weight_dn(U, factor, "expand", workspace((d, factor.shape[1]), x2.dtype, x2.device))
        return activate(F.linear(x2, W.t(), bias), act)
    if strategy == "tile_reconstruct":
        return tile_reconstruct_linear(x2, base_matrix(U), factor, "expand", bias, act)
    z = _x_times_base(x2, U)
    return sparse_matmul(z, factor, bias, act)


def contract(x2: torch.Tensor, U: Base, factor: SparseFactor, bias: Optional[torch.Tensor],
             strategy: Optional[str] = None) -> torch.Tensor:
    """``(x·B)·Uᵀ + b``; x2 ``(M, h)`` → ``(M, d)``."""
    d = U.shape[0]
    strategy = choose_strategy(x2.shape[0], "contract", factor, d, x2.device, strategy)
    if strategy == "reconstruct":
        W = _dense_weight_dn(U, factor, "contract", workspace((d, factor.shape[0]), x2.dtype, x2.device))
        return F.linear(x2, W, bias)
    if strategy == "tile_reconstruct":
        return tile_reconstruct_linear(x2, base_matrix(U), factor, "contract", bias)
    z = sparse_matmul(x2, factor)
    return _z_times_base_t(z, U, bias)


def gate_up(x2: torch.Tensor, U: Base, gate: SparseFactor, up: SparseFactor,
            bias_gate: Optional[torch.Tensor], bias_up: Optional[torch.Tensor]) -> torch.Tensor:
    """``silu(z·B_g + b_g) * (z·B_u + b_u)`` with ``z = x·U`` computed once and both
    factors decompressed in the same K loop."""
    z = _x_times_base(x2, U)
    return sparse_matmul(z, gate, bias_gate, up=up, up_bias=bias_up)


def reconstruct(U: Base, factor: SparseFactor, kind: str) -> torch.Tensor:
    """The torch-layout weight, written once (no dense copy of ``B`` on the way)."""
    U = base_matrix(U)
    d = U.shape[0]
    if kind == "expand":
        W = torch.empty(factor.shape[1], d, dtype=U.dtype, device=U.device)  # (h, d) = (U·B)ᵀ
        _dense_weight_dn(U, factor, kind, out=W.t())
        return W
    return _dense_weight_dn(U, factor, kind)  # (d, h) = U·Bᵀ
