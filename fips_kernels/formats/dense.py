"""``dense``: all ``K × N`` values (s = 0, plain low rank). ``values (K, N)``."""
from __future__ import annotations

from .base import Format, NoParams, expect_shape, register

__all__ = ["Dense", "FORMAT"]


class Dense(Format):
    name = "dense"
    aux = ()
    params = NoParams
    quantizable = True

    def pattern(self, params):
        return "dense"

    def value_rows(self, K, N, params):
        return K

    def pack(self, dense, params):
        return dense.clone(), {}

    def unpack(self, K, N, params, values, aux):
        return values

    def gather(self, K, N, params, dense, aux, nnz):
        return dense

    def validate(self, K, N, params, values, aux):
        expect_shape(self.name, "values", values, (K, N), K, N)


FORMAT = register(Dense())
