"""``ell``: at most ``k`` non-zeros per hidden unit (``pattern="topK"``), for very
sparse or vector-quantisation-like factors (served by the tile-reconstruct kernel).

``axis`` is the axis of ``B`` the lists run along (0 for an expand factor, one
list per column; 1 for a contract factor, one list per row). ``values (k, units)``
and ``index (k, units)`` int32 with strictly increasing positions; a unit with
fewer than ``k`` non-zeros stores explicit zeros at its lowest free positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Format, FormatError, Params, expect_shape, register

__all__ = ["EllParams", "Ell", "FORMAT"]


@dataclass(frozen=True)
class EllParams(Params):
    k: int
    axis: int


class Ell(Format):
    name = "ell"
    aux = ("index",)
    params = EllParams
    example = "k=4, axis=0"

    def check_params(self, p):
        if p.axis not in (0, 1):
            raise FormatError(f"ell: axis must be 0 or 1, got {p.axis}")
        if p.k < 1:
            raise FormatError(f"ell: needs k >= 1, got k={p.k}")

    def pattern(self, p):
        return f"top{p.k}/{'column' if p.axis == 0 else 'row'}"

    def value_rows(self, K, N, p):
        return p.k

    def pack(self, dense, p):
        k, axis = p.k, p.axis
        lists = dense if axis == 0 else dense.t()  # (length, units): one list per column
        length, units = lists.shape
        if not 1 <= k <= max(length, 1):
            raise FormatError(f"ell format: needs 1 <= k <= {length} (the list axis), got k={k}")
        nonzero = lists != 0
        counts = nonzero.sum(0)
        if bool((counts > k).any()):
            u = int((counts > k).nonzero()[0])
            raise FormatError(f"tensor breaks the ell pattern: unit {u} holds {int(counts[u])} non-zeros "
                              f"(at most k={k} allowed)")
        if length == 0:
            return lists.new_zeros(k, units), {"index": torch.zeros(k, units, dtype=torch.int32, device=dense.device)}
        rank = torch.arange(length, device=dense.device).unsqueeze(1)
        key = (~nonzero).to(torch.int64) * length + rank
        pos = torch.sort(torch.topk(key, k, dim=0, largest=False).values % length, dim=0).values
        return lists.gather(0, pos).contiguous(), {"index": pos.to(torch.int32).contiguous()}

    def unpack(self, K, N, p, values, aux):
        if (K, N)[p.axis] == 0:  # no positions to point at: an empty factor
            return values.new_zeros(K, N)
        if p.axis == 0:
            return values.new_zeros(K, N).scatter_(0, aux[0].to(torch.int64), values)
        return values.new_zeros(K, N).scatter_(1, aux[0].t().to(torch.int64), values.t())

    def gather(self, K, N, p, dense, aux, nnz):
        if (K, N)[p.axis] == 0:
            return dense.new_zeros(aux[0].shape)
        if p.axis == 0:
            return dense.gather(0, aux[0].to(torch.int64))
        return dense.gather(1, aux[0].t().to(torch.int64)).t()

    def validate(self, K, N, p, values, aux):
        k, axis = p.k, p.axis
        length, units = (K, N) if axis == 0 else (N, K)
        if not 1 <= k <= max(length, 1):
            raise FormatError(f"ell: needs 1 <= k <= {length}, got k={k}")
        index = aux["index"]
        expect_shape(self.name, "values", values, (k, units), K, N)
        expect_shape(self.name, "index", index, (k, units), K, N)
        if index.numel() == 0 or length == 0:
            return
        if bool(((index < 0) | (index >= length)).any()):
            j, u = (int(v) for v in ((index < 0) | (index >= length)).nonzero()[0])
            raise FormatError(f"ell: index out of range: entry {j} of unit {u} is {int(index[j, u])}, "
                              f"outside 0..{length - 1}")
        if k > 1 and bool((index[1:] <= index[:-1]).any()):
            u = int((index[1:] <= index[:-1]).any(0).nonzero()[0])
            raise FormatError(f"ell: positions must strictly increase within a unit: unit {u} stores "
                              f"{index[:, u].tolist()}")


FORMAT = register(Ell())
