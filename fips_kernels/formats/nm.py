"""``nm``: N:M along the reduction axis (``n`` kept out of every ``m``
consecutive rows of ``B``); the kernels' first format.

``values (G·n, N)`` with ``G = ceil(K/m)`` (row ``g·n + t`` is the ``t``-th kept
element of group ``g``, in increasing row order); ``indices`` int32 words of
``bits(m)``-wide positions within the group (1/2/4/4 bits for m = 2/4/8/16, a
power of two so no entry straddles a word). Exact layout: docs/FORMATS.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .base import Format, FormatError, Params, expect_shape, register
from .words import to_int32_words

__all__ = ["NMParams", "NM", "FORMAT", "nm_bits", "positions", "keep_mask", "geometry"]


def nm_bits(m: int) -> int:
    """Bits per stored ``nm`` index: a power of two so no entry straddles an int32 word."""
    if m not in (2, 4, 8, 16):
        raise FormatError(f"nm format: m must be one of 2, 4, 8, 16, got m={m}")
    return {2: 1, 4: 2, 8: 4, 16: 4}[m]


@dataclass(frozen=True)
class NMParams(Params):
    n: int
    m: int


def geometry(K: int, n: int, m: int) -> Tuple[int, int, int, int]:
    """(groups G, stored rows G·n, entries per word P, index word rows)."""
    per_word = 32 // nm_bits(m)
    groups = -(-K // m)
    rows = groups * n
    return groups, rows, per_word, -(-rows // per_word)


def positions(indices: torch.Tensor, K: int, n: int, m: int) -> torch.Tensor:
    """Row (in the padded ``G·m`` range) of every stored value, shape ``(G·n, N)``, int64."""
    groups, rows, per_word, _ = geometry(K, n, m)
    bits = nm_bits(m)
    j = torch.arange(rows, device=indices.device)
    words = indices.index_select(0, j // per_word)
    shift = ((j % per_word) * bits).to(torch.int32).unsqueeze(1)
    within = (words >> shift) & ((1 << bits) - 1)
    return (j // n * m).unsqueeze(1) + within.to(torch.int64)


def keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the ``n`` largest scores of every ``m`` consecutive rows (axis 0)."""
    K, N = scores.shape
    G = -(-K // m)
    padded = torch.nn.functional.pad(scores.float(), (0, 0, 0, G * m - K), value=-float("inf")).reshape(G, m, N)
    keep = torch.topk(padded, min(n, m), dim=1).indices
    mask = torch.zeros(padded.shape, dtype=torch.bool, device=scores.device).scatter_(1, keep, True)
    return mask.reshape(G * m, N)[:K]


class NM(Format):
    name = "nm"
    aux = ("indices",)
    params = NMParams
    quantizable = True
    example = "n=1, m=4"

    def check_params(self, p):
        nm_bits(p.m)
        if not 1 <= p.n <= p.m:
            raise FormatError(f"nm: needs 1 <= n <= m, got {p.n}:{p.m}")

    def pattern(self, p):
        return f"{p.n}:{p.m}"

    def value_rows(self, K, N, p):
        return geometry(K, p.n, p.m)[1]

    def pack(self, dense, p):
        K, N = dense.shape
        n, m = p.n, p.m
        bits = nm_bits(m)
        groups, rows, per_word, words = geometry(K, n, m)
        padded = torch.nn.functional.pad(dense, (0, 0, 0, groups * m - K)).reshape(groups, m, N)
        nonzero = padded != 0
        counts = nonzero.sum(1)
        if bool((counts > n).any()):
            g, c = (int(v) for v in (counts > n).nonzero()[0])
            raise FormatError(
                f"tensor breaks the {n}:{m} pattern along axis 0: rows {g * m}..{min(g * m + m, K) - 1} "
                f"of column {c} hold {int(counts[g, c])} non-zeros (at most {n} allowed)")
        # Non-zeros first, then the lowest free positions as explicit zeros; sorted by row.
        rank = torch.arange(m, device=dense.device).view(1, m, 1)
        key = (~nonzero).to(torch.int64) * m + rank
        within = torch.sort(torch.topk(key, n, dim=1, largest=False).values % m, dim=1).values
        values = padded.gather(1, within).reshape(rows, N)
        within = within.reshape(rows, N)
        within = torch.nn.functional.pad(within, (0, 0, 0, words * per_word - rows))
        shifts = (torch.arange(per_word, device=dense.device) * bits).view(1, per_word, 1)
        packed = (within.reshape(words, per_word, N) << shifts).sum(1)
        return values.contiguous(), {"indices": to_int32_words(packed).contiguous()}

    def unpack(self, K, N, p, values, aux):
        groups = -(-K // p.m)
        pos = positions(aux[0], K, p.n, p.m)
        return values.new_zeros(groups * p.m, N).scatter_(0, pos, values)[:K]

    def gather(self, K, N, p, dense, aux, nnz):
        groups = -(-K // p.m)
        padded = torch.nn.functional.pad(dense, (0, 0, 0, groups * p.m - K))
        return padded.gather(0, positions(aux[0], K, p.n, p.m))

    def validate(self, K, N, p, values, aux):
        n, m = p.n, p.m
        bits = nm_bits(m)
        groups, rows, per_word, words = geometry(K, n, m)
        expect_shape(self.name, "values", values, (rows, N), K, N)
        expect_shape(self.name, "indices", aux["indices"], (words, N), K, N)
        if rows == 0 or N == 0:
            return
        idx = aux["indices"].to(torch.int64) & 0xFFFFFFFF
        j = torch.arange(words * per_word, device=idx.device)
        within = (idx[j // per_word] >> ((j % per_word) * bits).unsqueeze(1)) & ((1 << bits) - 1)
        if bool((within[rows:] != 0).any()):
            raise FormatError("nm: unused entries in the last index word must be 0")
        within = within[:rows]
        if bool((within >= m).any()):
            r, c = (int(v) for v in (within >= m).nonzero()[0])
            raise FormatError(f"nm: index out of range: entry {r} of column {c} is {int(within[r, c])}, "
                              f"but positions within a group of {m} are 0..{m - 1}")
        per_group = within.reshape(groups, n, N)
        if n > 1 and bool((per_group[:, 1:] <= per_group[:, :-1]).any()):
            g, t, c = (int(v) for v in (per_group[:, 1:] <= per_group[:, :-1]).nonzero()[0])
            raise FormatError(f"nm: positions must strictly increase within a group: group {g} of "
                              f"column {c} stores {per_group[g, :, c].tolist()}")
        absolute = (torch.arange(groups, device=idx.device) * m).view(groups, 1, 1) + per_group
        beyond = (absolute >= K) & (values.reshape(groups, n, N) != 0)
        if bool(beyond.any()):
            g, t, c = (int(v) for v in beyond.nonzero()[0])
            raise FormatError(f"nm: index out of range: column {c} stores a non-zero at row "
                              f"{int(absolute[g, t, c])}, but the factor has K={K} rows")


FORMAT = register(NM())
