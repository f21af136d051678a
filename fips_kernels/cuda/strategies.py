"""The CUDA backend's kernels for each op, and the choice of strategy by M.

* **factored** (small and medium M): expand ``z = x·U`` (cuBLAS; the int8
  base through :func:`sparse_mm` as a quantised dense factor), then
  ``y = act(z·B + b)`` by :func:`sparse_mm` with ``B`` decompressed in shared
  memory and the bias/activation in its epilogue; contract ``z = x·B`` by
  :func:`sparse_mm`, then ``y = z·Uᵀ + b`` (cuBLAS, or :func:`sparse_mm`
  transposed for the int8 base).
* **reconstruct** (large M, from the same measured crossover as the Triton
  backend, :func:`fips_kernels.tuning.reconstruct_min_m` with
  ``backend="cuda"``): ``W = U·B`` by :func:`sparse_mm` with ``A = U``, then
  one dense GEMM. A contract weight is ``U·Bᵀ``: :func:`sparse_mm` transposed
  for a dense factor; ``fips_kernels_cuda::reconstruct_nm`` for a float nm
  factor (either layout, no dense ``B``); :func:`sparse_mm` has no transposed
  sparse operand, so for bitmap and quantised nm factors ``B`` is decoded by
  PyTorch and ``U·Bᵀ`` is one cuBLAS GEMM into a reused workspace
  (:mod:`fips_kernels.workspaces`).
* **sparse24** (large M, 2:4 float factors, fp16/bf16, sm80+): torch's
  semi-structured sparse tensor cores (:mod:`.sparse24`); where it cannot run
  (its :func:`~.sparse24.reasons`) large M takes reconstruct.

``FIPS_KERNELS_STRATEGY=factored|reconstruct|sparse24`` forces one (forcing
``sparse24`` where it cannot run raises with its reasons). Gate/up always runs
factored: ``z = x·U`` once, then gate and up in one fused kernel.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..formats import SparseFactor
from ..ops import base_matrix
from ..reference import activate
from ..tuning import STRATEGY_ENV, forced_strategy, reconstruct_min_m
from ..workspaces import clear_workspaces, workspace, workspace_bytes
from . import sparse24
from .spmm import sparse_mm, sparse_mm_gated

__all__ = ["expand", "contract", "gate_up", "reconstruct", "choose_strategy", "STRATEGIES", "clear_workspaces",
           "workspace_bytes"]

STRATEGIES = ("factored", "reconstruct", "sparse24")

Base = Union[torch.Tensor, SparseFactor]  # float U, or int8 U as a quantised dense factor


def choose_strategy(M: int, kind: str, factor: SparseFactor, d: int, dtype: torch.dtype, device: torch.device,
                    forced: Optional[str] = None) -> Tuple[str, bool]:
    """(strategy, whether it was forced): ``factored`` below the crossover M,
    from it on ``sparse24`` where it can run, else ``reconstruct``."""
    forced = forced_strategy(forced)
    if forced:
        if forced not in STRATEGIES:
            raise ValueError(f"{STRATEGY_ENV}={forced!r} is not a strategy of the cuda backend, which runs this "
                             f"call; choose one of {STRATEGIES} (or force another backend)")
        if forced == "sparse24":
            why = sparse24.reasons(factor, kind, dtype, device)
            if why:
                raise ValueError(f"{STRATEGY_ENV}='sparse24' cannot run this {kind} layer:\n  - "
                                 + "\n  - ".join(why))
        return forced, True
    if M < reconstruct_min_m(device, kind, factor, d, backend="cuda"):
        return "factored", False
    return ("reconstruct" if sparse24.reasons(factor, kind, dtype, device) else "sparse24"), False


def _x_times_base(x2: torch.Tensor, U: Base) -> torch.Tensor:
    """``z = x·U`` (cuBLAS for a float base; the int8 base dequantised in registers)."""
    return sparse_mm(x2, U) if isinstance(U, SparseFactor) else torch.mm(x2, U)


def _z_times_base_t(z: torch.Tensor, U: Base, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y = z·Uᵀ + b``."""
    return sparse_mm(z, U, bias, transpose=True) if isinstance(U, SparseFactor) else F.linear(z, U, bias)


def _expand_weight(U: Base, factor: SparseFactor) -> torch.Tensor:
    """``U·B`` ``(d × h)``: the expand layer's weight, transposed."""
    return sparse_mm(base_matrix(U), factor)


def _nm_weight(U: Base, factor: SparseFactor, kind: str) -> torch.Tensor:
    """The torch-layout weight of a float nm layer, written directly by
    ``fips_kernels_cuda::reconstruct_nm`` (either orientation, no dense ``B``)."""
    K, N = factor.shape
    return torch.ops.fips_kernels_cuda.reconstruct_nm(base_matrix(U).contiguous(), factor.values,
                                                      factor.aux["indices"], K, N, factor.n, factor.m,
                                                      kind == "contract")


def _float_nm(factor: SparseFactor) -> bool:
    return factor.format == "nm" and not factor.quantized


def _contract_weight(U: Base, factor: SparseFactor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``U·Bᵀ`` ``(d × h)``: the contract layer's weight."""
    Uf = base_matrix(U)
    if factor.format == "dense":
        return sparse_mm(Uf, factor, transpose=True)
    if _float_nm(factor):
        return _nm_weight(U, factor, "contract")
    B = factor.to_dense()  # no transposed sparse operand in sparse_mm: decode, then one cuBLAS GEMM
    return torch.mm(Uf, B.t(), out=out)


def expand(x2: torch.Tensor, U: Base, factor: SparseFactor, bias: Optional[torch.Tensor],
           activation: str = "none", strategy: Optional[str] = None) -> torch.Tensor:
    """``act((x·U)·B + b)``; x2 ``(M, d)`` → ``(M, h)``."""
    act = activation or "none"
    chosen, forced = choose_strategy(x2.shape[0], "expand", factor, U.shape[0], x2.dtype, x2.device, strategy)
    if chosen == "sparse24":
        packed = sparse24.operands(U, factor, "expand", strict=forced)
        if packed is not None:
            return sparse24.expand(x2, packed, bias, act)
        chosen = "reconstruct"
    if chosen == "reconstruct":
        return activate(F.linear(x2, _expand_weight(U, factor).t(), bias), act)
    return sparse_mm(_x_times_base(x2, U), factor, bias, act)


def contract(x2: torch.Tensor, U: Base, factor: SparseFactor, bias: Optional[torch.Tensor],
             strategy: Optional[str] = None) -> torch.Tensor:
    """``(x·B)·Uᵀ + b``; x2 ``(M, h)`` → ``(M, d)``."""
    d = U.shape[0]
    chosen, forced = choose_strategy(x2.shape[0], "contract", factor, d, x2.dtype, x2.device, strategy)
    if chosen == "sparse24":
        packed = sparse24.operands(U, factor, "contract", strict=forced)
        if packed is not None:
            return sparse24.contract(x2, packed, bias)
        chosen = "reconstruct"
    if chosen == "reconstruct":
        decoded = factor.format != "dense" and not _float_nm(factor)  # through a dense B and cuBLAS
        ws = workspace((d, factor.shape[0]), x2.dtype, x2.device) if decoded else None
        return F.linear(x2, _contract_weight(U, factor, ws), bias)
    return _z_times_base_t(sparse_mm(x2, factor), U, bias)


def gate_up(x2: torch.Tensor, U: Base, gate: SparseFactor, up: SparseFactor,
            bias_gate: Optional[torch.Tensor], bias_up: Optional[torch.Tensor]) -> torch.Tensor:
    """``silu(z·B_g + b_g) * (z·B_u + b_u)`` with ``z = x·U`` once, then one
    :func:`sparse_mm_gated` launch (both factors decoded in one K loop, the
    product formed in fp32 and rounded once)."""
    return sparse_mm_gated(_x_times_base(x2, U), gate, up, bias_gate, bias_up)


def reconstruct(U: Base, factor: SparseFactor, kind: str) -> torch.Tensor:
    """The torch-layout weight (``out × in``), contiguous."""
    if _float_nm(factor):
        return _nm_weight(U, factor, kind)
    if kind == "expand":
        return _expand_weight(U, factor).t().contiguous()
    return _contract_weight(U, factor)
