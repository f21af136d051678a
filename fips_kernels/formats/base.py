"""What a sparse-factor format is: the interface every format module implements,
the registry the package looks formats up in, and :class:`FormatError`.

A format stores a logical matrix ``B (K × N)`` in reduction-major form
(``docs/FORMATS.md``) as a ``values`` tensor plus named auxiliary int32
tensors (``aux``), described by a small typed parameter record (the N:M
pattern, the bitmap tile, …). The record becomes the two integers
``(p0, p1)`` of the flat ``meta`` list only at the custom-op boundary
(:meth:`Params.to_pair` / :meth:`Params.from_pair`).

Adding a format: one module in this package that defines a :class:`Params`
record and a :class:`Format` subclass and calls :func:`register`, imported
from ``formats/__init__.py`` (see docs/CONTRIBUTING.md). The reference
backend then runs it with no other change; kernels list it when they learn it.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Tuple

import torch

__all__ = ["FormatError", "Params", "NoParams", "Format", "register", "get", "names", "expect_shape"]

Aux = Mapping[str, torch.Tensor]


class FormatError(ValueError):
    """A sparse factor (or the tensor it is packed from) breaks a format rule."""


@dataclasses.dataclass(frozen=True)
class Params:
    """A format's parameters. Subclasses are frozen dataclasses with at most two
    integer-valued fields (a tuple field counts as its items), which map to the
    ``(p0, p1)`` slots of the ops' flat ``meta`` list."""

    def to_pair(self) -> Tuple[int, int]:
        flat = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            flat.extend(v if isinstance(v, tuple) else [v])
        flat += [0] * (2 - len(flat))
        return int(flat[0]), int(flat[1])

    @classmethod
    def from_pair(cls, p0: int, p1: int) -> "Params":
        fields = dataclasses.fields(cls)
        if not fields:
            return cls()
        if len(fields) == 1:  # a single tuple field (the bitmap tile)
            return cls((int(p0), int(p1)))
        return cls(int(p0), int(p1))

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class NoParams(Params):
    """A format without parameters (dense, csr)."""


class Format:
    """One sparse-factor format. Subclasses set the class attributes and
    implement the methods; every method works on raw tensors with the
    factor's ``(K, N)`` and :class:`Params`, so the ops can call them on
    static shapes (no host synchronisation) under ``torch.compile``.

    Attributes:
        name: the format's name (``SparseFactor.format``, checkpoints, ops).
        aux: names of the int32 tensors stored beside ``values``, in the
            order the custom ops take them (``aux0``, ``aux1``).
        params: its :class:`Params` record type.
        quantizable: whether values may be int8/int4 with scales.
        default_params: keyword defaults for :meth:`make_params` (e.g. the tile).
    """

    name: str = "?"
    aux: Tuple[str, ...] = ()
    params: type = NoParams
    quantizable: bool = False
    default_params: Dict[str, object] = {}

    # ---- parameters ---------------------------------------------------
    def make_params(self, **given) -> Params:
        """The parameter record from keyword arguments (``None`` means "not given")."""
        names = self.params.field_names()
        unknown = sorted(k for k, v in given.items() if v is not None and k not in names)
        if unknown:
            raise FormatError(f"{self.name} format takes no parameter {', '.join(unknown)} "
                              f"(its parameters: {', '.join(names) or 'none'})")
        values = {k: given.get(k) if given.get(k) is not None else self.default_params.get(k) for k in names}
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise FormatError(f"{self.name} format needs {' and '.join(missing)}"
                              + (f", e.g. {self.example}" if getattr(self, "example", "") else ""))
        record = self.params(**{k: tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else int(v)
                                for k, v in values.items()})
        self.check_params(record)
        return record

    def check_params(self, params: Params) -> None:
        """Raise :class:`FormatError` for parameters the format cannot hold."""

    def pattern(self, params: Params) -> str:
        """The sparsity pattern a user would name (``"1:4"``, ``"unstructured"`` …)."""
        raise NotImplementedError

    # ---- geometry -----------------------------------------------------
    def value_rows(self, K: int, N: int, params: Params) -> Optional[int]:
        """Length of axis 0 of the (unquantised) ``values`` from the shape alone,
        or None when it depends on the data (then :meth:`value_shape` reads ``aux``)."""
        raise NotImplementedError

    def stored_rows(self, K: int, N: int, params: Params, aux: Aux) -> int:
        """Length of axis 0 of the (unquantised) ``values``; may read ``aux`` on the
        host (validation and byte counts only, never inside the ops)."""
        rows = self.value_rows(K, N, params)
        if rows is None:
            raise NotImplementedError(f"{self.name}: stored_rows must read the aux tensors")
        return rows

    # ---- storage ------------------------------------------------------
    def pack(self, dense: torch.Tensor, params: Params) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(values, aux)`` of a dense ``(K, N)`` tensor whose zeros are the pruned
        entries; raise :class:`FormatError` if the tensor breaks the pattern."""
        raise NotImplementedError

    def unpack(self, K: int, N: int, params: Params, values: torch.Tensor, aux: Tuple[torch.Tensor, ...]
               ) -> torch.Tensor:
        """The dense ``(K, N)`` tensor (exact; static shapes only)."""
        raise NotImplementedError

    def gather(self, K: int, N: int, params: Params, dense: torch.Tensor, aux: Tuple[torch.Tensor, ...],
               nnz: int) -> torch.Tensor:
        """The entries of a dense ``(K, N)`` tensor at the stored positions, laid out
        like ``values`` (the adjoint of :meth:`unpack`; used for gradients)."""
        raise NotImplementedError

    def validate(self, K: int, N: int, params: Params, values: torch.Tensor, aux: Aux) -> None:
        """Check the format's own rules (positions, counts, padding) on float
        ``values`` (quantised ones arrive decoded); raise :class:`FormatError`.
        Dtypes and devices are checked before this is called; shapes are the
        format's to check (:func:`expect_shape`)."""

    def __repr__(self) -> str:
        return f"<format {self.name}>"


_REGISTRY: Dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Make ``fmt`` known by its name (each format module calls this once)."""
    if fmt.name in _REGISTRY:
        raise ValueError(f"a format named {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def names() -> Tuple[str, ...]:
    """Registered format names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Format:
    """The format called ``name``; an unknown name raises :class:`FormatError`."""
    fmt = _REGISTRY.get(name)
    if fmt is None:
        raise FormatError(f"unknown format {name!r}; expected one of {names()}")
    return fmt


def expect_shape(fmt: str, name: str, t: torch.Tensor, shape: Tuple[int, ...], K: int, N: int) -> None:
    if tuple(t.shape) != tuple(shape):
        raise FormatError(f"{fmt}: {name} must have shape {tuple(shape)} for a ({K}, {N}) factor, "
                          f"got {tuple(t.shape)}")
