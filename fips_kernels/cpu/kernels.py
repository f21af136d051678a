"""The ``cpu`` backend's kernels (compressed mode): the FiPS ops on CPU tensors
in fp32 arithmetic, with the sparse factor read as stored.

* ``bitmap`` factors: ``torch.ops.fips_kernels_cpu.bitmap_mm`` (csrc/cpu) —
  ``x·B + b`` straight from the packed values, the bias in its epilogue; the
  activation by torch; ``x·U`` and ``z·Uᵀ`` are torch GEMMs.
* ``dense`` factors (plain low rank): torch GEMMs on the dequantised factor.

Every kernel returns the input's dtype. Signatures as
:class:`fips_kernels.dispatch.Backend` documents.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from ..formats import SparseFactor

__all__ = ["expand", "contract", "gate_up", "reconstruct", "factor_product"]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _base(U) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``U (d × r)`` as ``(values in fp32, per-column scales in fp32 or None)``. An int8 base
    (one scale per column) is converted for this call only and its scales are applied to the
    ``M × r`` side of the product (``(x·U_q)·s`` instead of ``x·(U_q·s)``): at few rows that
    saves the ``d × r`` multiply per call."""
    if isinstance(U, SparseFactor):
        if U.format == "dense" and U.qbits == 8 and U.scales.shape[0] == 1:
            return U.values.to(torch.float32), U.scales.to(torch.float32).reshape(-1)
        return U.to_dense().to(torch.float32), None
    return U.to(torch.float32), None


def _times_base(x: torch.Tensor, U) -> torch.Tensor:
    """``x·U`` in fp32 for ``x (M × d)``."""
    values, scales = _base(U)
    z = _f32(x) @ values
    return z if scales is None else z.mul_(scales)


def factor_product(z: torch.Tensor, factor: SparseFactor, bias: Optional[torch.Tensor] = None,
                   activation: str = "none") -> torch.Tensor:
    """``act(z·B + bias)`` in fp32 for ``z (M × K)`` and a factor ``B (K × N)``."""
    if factor.format == "bitmap":
        K, N = factor.shape
        tk, tn = factor.params.tile
        bitmask, offsets = factor.aux_tensors
        # bias in the kernel's epilogue; the activation by torch's vectorised GELU/SiLU (the
        # kernel's scalar erf costs more than the product at MiniLM's shapes)
        y = torch.ops.fips_kernels_cpu.bitmap_mm(
            _f32(z), factor.values, bitmask, offsets, factor.scales, None if bias is None else bias.contiguous(),
            K, N, tk, tn, factor.qbits or 0, factor.qgroup or 0, 0)
    else:
        y = z.to(torch.float32) @ factor.to_dense().to(torch.float32)
        if bias is not None:
            y += bias.to(torch.float32)
    return _activate_(y, activation)


def _activate_(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation, in place where torch has it (y is this call's own buffer)."""
    if activation == "silu":
        return torch.nn.functional.silu(y, inplace=True)
    return reference.activate(y, activation)


def expand(x2, U, factor, bias=None, activation="none"):
    z = _times_base(x2, U)
    return factor_product(z, factor, bias, activation or "none").to(x2.dtype)


def contract(x2, U, factor, bias=None):
    z = factor_product(x2, factor)  # this call's own fp32 buffer
    values, scales = _base(U)
    if scales is not None:
        z.mul_(scales)
    Ut = values.t()
    y = torch.mm(z, Ut) if bias is None else torch.addmm(bias.to(torch.float32), z, Ut)
    return y.to(x2.dtype)


def gate_up(x2, U, gate, up, bias_gate=None, bias_up=None):
    z = _times_base(x2, U)  # once for both
    return (factor_product(z, gate, bias_gate, "silu") * factor_product(z, up, bias_up)).to(x2.dtype)


def _dense_factor(factor: SparseFactor) -> torch.Tensor:
    if factor.format == "bitmap":
        K, N = factor.shape
        tk, tn = factor.params.tile
        bitmask, offsets = factor.aux_tensors
        return torch.ops.fips_kernels_cpu.bitmap_to_dense(factor.values, bitmask, offsets, factor.scales, K, N,
                                                          tk, tn, factor.qbits or 0, factor.qgroup or 0)
    return factor.to_dense().to(torch.float32)


def reconstruct(U, factor, kind):
    """The layer's torch-layout weight in the factor's dtype: ``(U·B)ᵀ`` (expand) or ``U·Bᵀ`` (contract)."""
    B = _dense_factor(factor)
    values, scales = _base(U)
    Uf = values if scales is None else values * scales
    W = (Uf @ B).t() if kind == "expand" else Uf @ B.t()
    return W.to(factor.dtype).contiguous()
