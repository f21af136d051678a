"""The int8 / int4 grid: the one definition of quantised values used by the
formats (storage), PGD (projection) and training (straight-through rounding).

Symmetric round-to-nearest with one scale per ``group`` rows of the reduction
axis and column: ``s = max|v| / Q`` over the group (``Q = 127`` for int8,
``7`` for int4; an all-zero group gets ``s = 1``), ``q = clamp(round(v/s), −Q, Q)``
(round half to even, as ``torch.round``; −128 / −8 are never stored), and the
value is ``q · s`` computed in fp32. int4 storage packs two values per byte
along axis 0, the first in the low nibble (docs/FORMATS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .base import FormatError

__all__ = ["QBITS", "Quant", "qmax", "group_scales", "scale_matrix", "to_grid", "quantize_dequantize",
           "encode", "decode"]

QBITS = (8, 4)


def qmax(bits: int) -> int:
    """Largest magnitude of the symmetric grid: 127 for int8, 7 for int4 (−128 / −8 unused)."""
    if bits not in QBITS:
        raise FormatError(f"quantisation: bits must be 8 or 4, got {bits}")
    return (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class Quant:
    """How a factor's values are quantised: ``bits`` (8 or 4) and ``group`` (rows
    of the reduction axis sharing one scale per column)."""

    bits: int
    group: int

    def __post_init__(self):
        qmax(self.bits)
        if self.group < 1:
            raise FormatError(f"quantisation: qgroup must be >= 1, got {self.group}")

    def to_pair(self) -> Tuple[int, int]:
        return int(self.bits), int(self.group)

    def scales_shape(self, K: int, N: int) -> Tuple[int, int]:
        return -(-K // self.group), N


def group_scales(B: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """fp32 scales ``(ceil(K/group), N)`` of a ``(K, N)`` tensor: ``max|v| / Q`` per
    group and column, 1 for an all-zero group."""
    Q = qmax(bits)
    K, N = B.shape
    G = -(-K // group)
    padded = torch.nn.functional.pad(B.detach().abs().float(), (0, 0, 0, G * group - K))
    amax = padded.reshape(G, group, N).amax(1) if K else padded.new_zeros(0, N)
    return torch.where(amax > 0, amax / Q, torch.ones_like(amax))


def scale_matrix(scales: torch.Tensor, K: int, group: int) -> torch.Tensor:
    """The per-element scale of a ``(K, N)`` factor, fp32: row k uses ``scales[k // group]``."""
    return scales.to(torch.float32).repeat_interleave(group, dim=0)[:K]


def to_grid(v: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer grid points (as fp32) nearest to ``v / s``."""
    Q = qmax(bits)
    return torch.clamp(torch.round(v.float() / s), -Q, Q)


def quantize_dequantize(B: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``B (K × N)`` rounded to the grid and returned dequantised (fp32)."""
    s = scale_matrix(group_scales(B, bits, group), B.shape[0], group)
    return to_grid(B, s, bits) * s


def decode(values: torch.Tensor, bits: int, rows: Optional[int] = None) -> torch.Tensor:
    """Integer values (as fp32) from int8 storage; int4 holds two values per byte
    along axis 0, the first in the low nibble; ``rows`` drops the padding nibble."""
    if bits == 8:
        return values.to(torch.float32)
    b = values.to(torch.int16) & 0xFF
    lo, hi = b & 0xF, b >> 4
    lo, hi = lo - ((lo >> 3) << 4), hi - ((hi >> 3) << 4)  # sign-extend the nibbles
    out = torch.stack([lo, hi], dim=1).reshape(2 * values.shape[0], *values.shape[1:])
    return (out if rows is None else out[:rows]).to(torch.float32)


def encode(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 storage of integer values (any integer or integral float dtype); int4 packs
    pairs along axis 0."""
    if bits == 8:
        return q.to(torch.int8)
    q = q.to(torch.int16)
    if q.shape[0] % 2:
        q = torch.cat([q, q.new_zeros(1, *q.shape[1:])])
    pairs = q.reshape(q.shape[0] // 2, 2, *q.shape[1:])
    byte = (pairs[:, 0] & 0xF) | ((pairs[:, 1] & 0xF) << 4)
    return torch.where(byte >= 128, byte - 256, byte).to(torch.int8)


def packed_rows(rows: int, bits: int) -> int:
    """Rows of int8 storage for ``rows`` values along axis 0."""
    return rows if bits == 8 else -(-rows // 2)
