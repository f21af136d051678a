"""``bitmap``: unstructured sparsity, per tile (default 64 × 64).

Per tile a bitmask (int32 words, ``(T, TK, TN/32)``), the tile's non-zeros in
row-major order one tile after another (``values (nnz,)``), and an offset per
tile (``offsets (T+1,)``). Exact layout: docs/FORMATS.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .base import Format, FormatError, Params, expect_shape, register
from .words import to_int32_words

__all__ = ["BitmapParams", "Bitmap", "FORMAT", "DEFAULT_TILE", "positions", "grid"]

DEFAULT_TILE = (64, 64)


@dataclass(frozen=True)
class BitmapParams(Params):
    tile: Tuple[int, int] = DEFAULT_TILE


def grid(K: int, N: int, tile: Tuple[int, int]) -> Tuple[int, int]:
    tk, tn = tile
    return -(-K // tk), -(-N // tn)


def positions(bitmask: torch.Tensor, offsets: torch.Tensor):
    """Per tile element: (is stored, index into ``values``), both ``(T, TK·TN)``."""
    T, tk, words = bitmask.shape
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(T, tk * words * 32)
    exclusive = torch.cumsum(bits, dim=1, dtype=torch.int64) - bits
    return bits.bool(), offsets[:T].to(torch.int64).unsqueeze(1) + exclusive


def tiles_to_matrix(tiles: torch.Tensor, K, N, tile, g) -> torch.Tensor:
    (tk, tn), (kt, nt) = tile, g
    full = tiles.reshape(kt, nt, tk, tn).permute(0, 2, 1, 3).reshape(kt * tk, nt * tn)
    return full[:K, :N]


def matrix_to_tiles(dense: torch.Tensor, tile, g) -> torch.Tensor:
    (tk, tn), (kt, nt) = tile, g
    K, N = dense.shape
    padded = torch.nn.functional.pad(dense, (0, nt * tn - N, 0, kt * tk - K))
    return padded.reshape(kt, tk, nt, tn).permute(0, 2, 1, 3).reshape(kt * nt, tk * tn)


class Bitmap(Format):
    name = "bitmap"
    aux = ("bitmask", "offsets")
    params = BitmapParams
    quantizable = True
    default_params = {"tile": DEFAULT_TILE}

    def check_params(self, p):
        tk, tn = p.tile
        if tk < 1 or tn < 32 or tn % 32:
            raise FormatError(f"bitmap: tile must be (TK >= 1, TN a multiple of 32), got {p.tile}")

    def pattern(self, p):
        return "unstructured"

    def value_rows(self, K, N, p):
        return None  # nnz: the offsets' last entry

    def stored_rows(self, K, N, p, aux):
        offsets = aux["offsets"]
        return int(offsets[-1]) if offsets.numel() else 0

    def pack(self, dense, p):
        K, N = dense.shape
        tk, tn = p.tile
        g = grid(K, N, p.tile)
        tiles = matrix_to_tiles(dense, p.tile, g)  # (T, TK*TN), row-major inside a tile
        stored = tiles != 0
        values = tiles[stored]  # boolean indexing keeps row-major order: tile by tile
        T = tiles.shape[0]
        bits = stored.reshape(T, tk, tn // 32, 32).to(torch.int64)
        shifts = torch.arange(32, device=dense.device)
        words = to_int32_words((bits << shifts).sum(-1))
        counts = stored.sum(1).to(torch.int64)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
        return values.contiguous(), {"bitmask": words.contiguous(), "offsets": offsets}

    def unpack(self, K, N, p, values, aux):
        stored, pos = positions(aux[0], aux[1])
        nnz = values.shape[0]
        if nnz == 0:
            return values.new_zeros(K, N)
        gathered = values[pos.clamp(max=nnz - 1)]
        tiles = torch.where(stored, gathered, gathered.new_zeros(()))
        return tiles_to_matrix(tiles, K, N, p.tile, grid(K, N, p.tile))

    def gather(self, K, N, p, dense, aux, nnz):
        stored, pos = positions(aux[0], aux[1])
        tiles = matrix_to_tiles(dense, p.tile, grid(K, N, p.tile))
        dump = torch.where(stored, pos, torch.full_like(pos, nnz))
        out = dense.new_zeros(nnz + 1).scatter_(0, dump.reshape(-1), tiles.reshape(-1))
        return out[:nnz]

    def validate(self, K, N, p, values, aux):
        bitmask, offsets = aux["bitmask"], aux["offsets"]
        g = grid(K, N, p.tile)
        expect_shape(self.name, "bitmask", bitmask, (g[0] * g[1], p.tile[0], p.tile[1] // 32), K, N)
        expect_shape(self.name, "offsets", offsets, (g[0] * g[1] + 1,), K, N)
        if values.dim() != 1:
            raise FormatError(f"bitmap: values must be 1-D, got shape {tuple(values.shape)}")
        nnz = values.shape[0]
        stored, _ = positions(bitmask, offsets)
        inside = matrix_to_tiles(torch.ones(K, N, dtype=torch.bool, device=bitmask.device), p.tile, g).bool()
        if bool((stored & ~inside).any()):
            t = int((stored & ~inside).any(1).nonzero()[0])
            raise FormatError(f"bitmap: index out of range: tile {t} sets bits outside the {K}x{N} factor")
        counts = stored.sum(1).to(torch.int64)
        off = offsets.to(torch.int64)
        if int(off[0]) != 0 or int(off[-1]) != nnz:
            raise FormatError(f"bitmap: offsets must start at 0 and end at nnz={nnz}, "
                              f"got {int(off[0])} and {int(off[-1])}")
        bad = (off[1:] - off[:-1]) != counts
        if bool(bad.any()):
            t = int(bad.nonzero()[0])
            raise FormatError(f"bitmap: offsets disagree with the bitmask: tile {t} sets "
                              f"{int(counts[t])} bits but offsets give it {int(off[t + 1] - off[t])} values")


FORMAT = register(Bitmap())
