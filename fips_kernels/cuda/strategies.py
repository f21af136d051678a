"""The CUDA backend's products for the strategy template
(:mod:`fips_kernels.strategies`), over the compiled ``fips_kernels_cuda::sparse_mm``
op (:mod:`.spmm`), plus the ``sparse24`` strategy (:mod:`.sparse24`).

* factored: :func:`sparse_mm` with ``B`` decompressed in shared memory and the
  bias/activation in its epilogue (the int8 base through :func:`sparse_mm` as
  a quantised dense factor, transposed for ``z·Uᵀ``); gate/up is one
  :func:`sparse_mm_gated` launch.
* reconstruct: ``U·B`` by :func:`sparse_mm` with ``A = U``. A contract weight
  is ``U·Bᵀ``: :func:`sparse_mm` transposed for a float or int8 dense factor;
  ``fips_kernels_cuda::reconstruct_nm`` for a float nm factor (either layout, no
  dense ``B``); otherwise (bitmap, quantised nm, int4 dense: :func:`sparse_mm`
  has no transposed sparse or int4 operand) ``B`` is decoded by PyTorch and
  ``U·Bᵀ`` is one cuBLAS GEMM into a reused workspace.
* sparse24 (large M, 2:4 float factors, fp16/bf16, sm80+): torch's
  semi-structured sparse tensor cores; where it cannot run (its
  :func:`~.sparse24.reasons`) large M takes reconstruct.
"""
from __future__ import annotations

from typing import List

import torch

from ..formats import Layout, SparseFactor
from ..strategies import Factored, Matmul, Reconstruct, Strategy, StrategySet
from ..workspaces import workspace
from . import sparse24
from .spmm import BITMAP_TILE, FORMATS, sparse_mm, sparse_mm_gated

__all__ = ["CudaMatmul", "Sparse24", "STRATEGIES"]


def _float_nm(layout: Layout) -> bool:
    return layout.format == "nm" and layout.quant is None


class CudaMatmul(Matmul):
    def sparse_reasons(self, layout: Layout, transpose: bool = False) -> List[str]:
        reasons = []
        if layout.format not in FORMATS:
            reasons.append(f"no cuda kernel for the {layout.format!r} format (it runs {', '.join(FORMATS)})")
        elif layout.format == "bitmap" and tuple(layout.params.tile) != BITMAP_TILE:
            reasons.append(f"bitmap tile {tuple(layout.params.tile)} is not supported by the cuda kernel "
                           f"(only {BITMAP_TILE[0]}x{BITMAP_TILE[1]})")
        if transpose and (layout.format != "dense" or (layout.quant and layout.quant.bits == 4)):
            reasons.append("the cuda kernel's transposed operand must be a float or int8 dense factor")
        return reasons

    def sparse(self, a, factor, bias=None, activation="none", transpose=False):
        return sparse_mm(a, factor, bias, activation, transpose=transpose)

    def gated(self, a, gate, up, bias_gate, bias_up):
        return sparse_mm_gated(a, gate, up, bias_gate, bias_up)

    def weight_reasons(self, layout, kind):
        return self.sparse_reasons(layout)

    def weight_dh(self, U, factor, kind, reuse=False):
        if _float_nm(factor.layout):  # the nm kernel writes the torch layout of either kind
            W = self._nm_weight(U, factor, kind)
            return W.t() if kind == "expand" else W
        if kind == "expand":
            return sparse_mm(U, factor)
        if not self.sparse_reasons(factor.layout, transpose=True):
            return sparse_mm(U, factor, transpose=True)
        d, h = U.shape[0], factor.shape[0]
        out = workspace((d, h), U.dtype, U.device) if reuse else None
        return torch.mm(U, factor.to_dense().t(), out=out)  # decoded B, one cuBLAS GEMM

    @staticmethod
    def _nm_weight(U: torch.Tensor, factor: SparseFactor, kind: str) -> torch.Tensor:
        K, N = factor.shape
        return torch.ops.fips_kernels_cuda.reconstruct_nm(U.contiguous(), factor.values, factor.aux["indices"], K, N,
                                                          factor.n, factor.m, kind == "contract")


class Sparse24(Strategy):
    """2:4 float factors at large M on sparse tensor cores; falls back to
    ``fallback`` (reconstruct) when the pack cannot be had now (e.g. during
    CUDA-graph capture before :func:`fips_kernels.prepare`)."""

    name = "sparse24"
    regime = "large"

    def __init__(self, mm: Matmul, fallback: Strategy):
        super().__init__(mm)
        self.fallback = fallback

    def reasons(self, p):
        return sparse24.reasons(p.layout, p.kind, p.dtype, p.device)

    def expand(self, x2, U, factor, bias, activation, strict=False):
        packed = sparse24.operands(U, factor, "expand", strict=strict)
        if packed is None:
            return self.fallback.expand(x2, U, factor, bias, activation)
        return sparse24.expand(x2, packed, bias, activation)

    def contract(self, x2, U, factor, bias, strict=False):
        packed = sparse24.operands(U, factor, "contract", strict=strict)
        if packed is None:
            return self.fallback.contract(x2, U, factor, bias)
        return sparse24.contract(x2, packed, bias)


_MM = CudaMatmul()
_RECONSTRUCT = Reconstruct(_MM)
STRATEGIES = StrategySet("cuda", _MM, [Factored(_MM), Sparse24(_MM, _RECONSTRUCT), _RECONSTRUCT])
