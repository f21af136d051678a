"""The Triton backend's products for the strategy template
(:mod:`fips_kernels.strategies`): :func:`.sparse_matmul.sparse_matmul` for the
factored product (dense, nm, bitmap factors; float or int8/int4 values and the
int8 base dequantised in registers), the same kernel writing ``W = U·B`` into a
reused workspace for reconstruct, and :mod:`.tile_reconstruct` for ``ell``
factors (each weight tile rebuilt in SRAM from rows of ``U``), which replaces
the factored product for that format.

Importing this module imports Triton; :mod:`.backend` imports it lazily.
"""
from __future__ import annotations

from typing import List

import torch

from ..formats import Layout
from ..ops import base_matrix
from ..strategies import Factored, Matmul, Reconstruct, Strategy, StrategySet
from ..workspaces import workspace
from .sparse_matmul import FMT_CODES, sparse_matmul
from .tile_reconstruct import tile_reconstruct_linear, tile_reconstruct_weight

__all__ = ["TritonMatmul", "TileReconstruct", "STRATEGIES"]


def _ell_axis(kind: str) -> int:
    return 0 if kind == "expand" else 1  # the lists run along the rank axis


class TritonMatmul(Matmul):
    def sparse_reasons(self, layout: Layout, transpose: bool = False) -> List[str]:
        if layout.format not in FMT_CODES:
            return [f"the Triton sparse product does not take the {layout.format!r} format"
                    + (" (tile_reconstruct runs it)" if layout.format == "ell" else "")]
        if layout.format == "bitmap":
            tk, tn = layout.params.tile
            if tk < 16 or tk & (tk - 1) or tn & (tn - 1):
                return [f"bitmap tile ({tk}, {tn}) is not a power of two >= 16 in both axes"]
        return []

    def sparse(self, a, factor, bias=None, activation="none", transpose=False):
        return sparse_matmul(a, factor, bias, activation, transpose=transpose)

    def gated_reasons(self, layout):
        if layout.format == "ell":
            return ["no fused Triton gate/up for ell factors (tile_reconstruct has no gated form)"]
        return self.sparse_reasons(layout)

    def gated(self, a, gate, up, bias_gate, bias_up):
        return sparse_matmul(a, gate, bias_gate, up=up, up_bias=bias_up)

    def weight_reasons(self, layout, kind):
        if layout.format == "ell":
            if layout.params.axis != _ell_axis(kind):
                return [f"tile-reconstruct needs a {kind} ell factor's lists along the rank axis (axis "
                        f"{_ell_axis(kind)}), got axis {layout.params.axis}"]
            return []
        return self.sparse_reasons(layout)

    def weight_dh(self, U, factor, kind, reuse=False):
        d = U.shape[0]
        h = factor.shape[1] if kind == "expand" else factor.shape[0]
        out = workspace((d, h), U.dtype, U.device) if reuse else None
        if factor.format == "ell":
            if kind == "expand":
                return tile_reconstruct_weight(U, factor, kind, out=out)
            if out is None:
                out = torch.empty(d, h, dtype=U.dtype, device=U.device)
            tile_reconstruct_weight(U, factor, kind, out=out.t())  # the kernel writes (U·V)ᵀ
            return out
        return sparse_matmul(U, factor, out=out, transpose=(kind == "contract"))


class TileReconstruct(Strategy):
    """``ell`` factors at small M: the weight tiles rebuilt in SRAM inside the matmul."""

    name = "tile_reconstruct"
    regime = "small"

    def reasons(self, p):
        if p.fmt != "ell":
            return [f"tile_reconstruct runs ell factors, not {p.fmt!r}"]
        return self.mm.weight_reasons(p.layout, p.kind)

    def expand(self, x2, U, factor, bias, activation, strict=False):
        return tile_reconstruct_linear(x2, base_matrix(U), factor, "expand", bias, activation)

    def contract(self, x2, U, factor, bias, strict=False):
        return tile_reconstruct_linear(x2, base_matrix(U), factor, "contract", bias)


_MM = TritonMatmul()
STRATEGIES = StrategySet("triton", _MM, [TileReconstruct(_MM), Factored(_MM), Reconstruct(_MM)])
