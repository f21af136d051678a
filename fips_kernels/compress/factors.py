"""Dense training factors in and FiPS layers out.

* :func:`svd_factors` — the SVD initialisation of a group as dense tensors
  (:func:`fips_kernels.factorize.svd_init`: stacking in ``d × h``
  orientation, SVD, overcomplete growth when ``r > d``), before any masking;
  training applies its own masks (:mod:`.schedule`).
* :func:`pack_group` — the trained ``U``, masked ``V_i`` and biases packed with
  :meth:`SparseFactor.pack` into a :class:`FiPSGroup` of :class:`FiPSLinear`,
  optionally stored in a 16-bit float dtype (``factor_dtype``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..factorize import d_by_h, svd_init
from ..formats import SparseFactor, default_format, parse_pattern
from ..modules import FiPSGroup, FiPSLinear, SharedBase

__all__ = ["svd_factors", "pack_group", "default_format"]


def svd_factors(linears: Sequence[nn.Module], kinds: Sequence[str], rank: int,
                svd_device: Optional[torch.device] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(U (d × r), [V_i (r × h_i)])`` in fp32: the paper's SVD init of the
    group at rank ``r``, unmasked (``U·V_i`` is layer ``i``'s weight in ``d × h``
    orientation, up to the truncation)."""
    mats = d_by_h([lin.weight.detach() for lin in linears], kinds)
    _, U, V = svd_init(mats, rank, svd_device)
    device = mats[0].device
    return U.to(device).contiguous(), [v.to(device).contiguous() for v in V.split([m.shape[1] for m in mats], dim=1)]


def pack_group(U: torch.Tensor, Vs: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
               kinds: Sequence[str], pattern: Tuple, fmt: str, *, dtype: torch.dtype,
               device=None, tile: Tuple[int, int] = (64, 64), info: Optional[dict] = None,
               qbits: Optional[int] = None, qgroup: int = 64, base_qbits: Optional[int] = None,
               factor_dtype: Optional[torch.dtype] = None) -> FiPSGroup:
    """A :class:`FiPSGroup` from dense factors whose zeros are the pruned entries
    (``V_i`` is ``r × h_i``; the factor stored is ``V`` for expand, ``Vᵀ`` for contract),
    rounded to int8/int4 (``qbits``) and an int8 base (``base_qbits``) when asked:
    the grid training used (see :func:`fips_kernels.pgd.quantize_dequantize`).

    ``factor_dtype`` (other than ``dtype``, the model's): the group is packed from
    the fp32 factors exactly as without it (same masks, same integer grid), then
    every float tensor — ``U``, float factor values, the scales of int8/int4
    values and of an int8 base, the biases — is rounded to ``factor_dtype`` and
    the layers cast their input to it and their output back (``cast_input``).
    A value beyond the dtype's range raises ValueError."""
    pat = parse_pattern(pattern)
    cast = factor_dtype is not None and factor_dtype != dtype
    if cast:  # pack from fp32 (the training result), round once to factor_dtype below
        dtype = torch.float32
    base = SharedBase(U.detach().to(device=device, dtype=dtype).contiguous())
    if base_qbits:
        base.quantize_(base_qbits)
    layers = []
    for V, bias, kind in zip(Vs, biases, kinds):
        B = V.detach().to(device=device, dtype=dtype)
        B = B if kind == "expand" else B.t()
        factor = SparseFactor.pack(B.contiguous(), fmt, qbits=qbits, qgroup=qgroup,
                                   **pat.format_params(fmt, kind, U.shape[1], tile))
        b = None if bias is None else bias.detach().to(device=device, dtype=dtype).clone()
        layers.append(FiPSLinear(base, factor, kind, b, cast_input=cast))
    group = FiPSGroup(base, layers, info)
    if cast:
        limit = torch.finfo(factor_dtype).max
        for name, t in group.state_dict().items():
            if t.is_floating_point() and t.numel() and float(t.abs().max()) > limit:
                raise ValueError(f"{name} holds a trained value of magnitude {float(t.abs().max()):.4g}, beyond "
                                 f"the {factor_dtype} range (max {limit:.4g}); use bfloat16 or float32 factors")
        group.to(factor_dtype)  # floating parameters and buffers only: int8/int4 values and indices keep theirs
    return group
