"""``csr``: compressed sparse rows of ``B`` — interchange only (no kernel runs it).

``crow (K+1,)``, ``col (nnz,)`` int32 and ``values (nnz,)``; columns strictly
increase within a row. ``SparseFactor.to_torch_sparse()`` / ``from_torch_sparse()``.
"""
from __future__ import annotations

import warnings

import torch

from .base import Format, FormatError, NoParams, expect_shape, register

__all__ = ["CSR", "FORMAT", "rows_of"]


def rows_of(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """The row of every stored value, int64 ``(nnz,)``."""
    K = crow.shape[0] - 1
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(K, device=crow.device), counts, output_size=nnz)


class CSR(Format):
    name = "csr"
    aux = ("crow", "col")
    params = NoParams

    def pattern(self, params):
        return "unstructured"

    def value_rows(self, K, N, params):
        return None

    def stored_rows(self, K, N, params, aux):
        crow = aux["crow"]
        return int(crow[-1]) if crow.numel() else 0

    def pack(self, dense, params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            sp = dense.to_sparse_csr()
        return sp.values().clone(), {"crow": sp.crow_indices().to(torch.int32), "col": sp.col_indices().to(torch.int32)}

    def unpack(self, K, N, params, values, aux):
        rows = rows_of(aux[0], values.shape[0])
        return values.new_zeros(K, N).index_put_((rows, aux[1].to(torch.int64)), values)

    def gather(self, K, N, params, dense, aux, nnz):
        return dense[rows_of(aux[0], nnz), aux[1].to(torch.int64)]

    def validate(self, K, N, params, values, aux):
        crow, col = aux["crow"], aux["col"]
        if values.dim() != 1:
            raise FormatError(f"csr: values must be 1-D, got shape {tuple(values.shape)}")
        nnz = values.shape[0]
        expect_shape(self.name, "crow", crow, (K + 1,), K, N)
        expect_shape(self.name, "col", col, (nnz,), K, N)
        crow64 = crow.to(torch.int64)
        if int(crow64[0]) != 0 or int(crow64[-1]) != nnz:
            raise FormatError(f"csr: crow must start at 0 and end at nnz={nnz}")
        if bool((crow64[1:] < crow64[:-1]).any()):
            raise FormatError("csr: crow must be non-decreasing")
        if nnz and bool(((col < 0) | (col >= N)).any()):
            raise FormatError(f"csr: index out of range: column indices must be in 0..{N - 1}")
        if nnz > 1:
            rows = rows_of(crow, nnz)
            same_row = rows[1:] == rows[:-1]
            if bool((same_row & (col[1:] <= col[:-1])).any()):
                raise FormatError("csr: column indices must strictly increase within a row")


FORMAT = register(CSR())
