"""The :class:`SparseFactor` type, its :class:`Layout` record, and the raw-tensor
``unpack`` / ``gather_values`` the ops use.

A :class:`SparseFactor` stores a logical matrix ``B`` of shape ``(K, N)`` in
*reduction-major* form: the sparse product a layer computes is
``a (M×K) · B (K×N)``, so an N:M pattern is always along axis 0. For an
expand layer ``B = V`` (r×h); for a contract layer ``B = Vᵀ`` (h×r). Nothing
here knows a particular format: each format module (``dense``, ``nm``,
``bitmap``, ``csr``, ``ell``) implements :class:`~.base.Format`.

:func:`unpack` and :func:`gather_values` work on the raw tensors with static
shapes only (no host synchronisation, no data-dependent shapes), so the ops
and their backward passes can call them under ``torch.compile`` and
CUDA-graph capture.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import quant
from .base import Format, FormatError, Params, get
from .quant import Quant

__all__ = ["Layout", "SparseFactor", "unpack", "gather_values", "VALUE_DTYPES"]

VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Layout:
    """Everything about a factor but its tensors: format, shape ``(K, N)``, the
    format's typed parameters and the quantisation (None for float values).

    The ops take it as a flat ``meta`` list: ``[K, N, p0, p1]`` plus
    ``[qbits, qgroup]`` when quantised (:meth:`to_meta` / :meth:`from_meta`);
    that list exists only at the custom-op boundary."""

    format: str
    shape: Tuple[int, int]
    params: Params
    quant: Optional[Quant] = None

    @property
    def fmt(self) -> Format:
        return get(self.format)

    @property
    def K(self) -> int:
        return self.shape[0]

    @property
    def N(self) -> int:
        return self.shape[1]

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def pattern(self) -> str:
        return self.fmt.pattern(self.params)

    def to_meta(self) -> List[int]:
        meta = [int(self.shape[0]), int(self.shape[1]), *self.params.to_pair()]
        return meta + list(self.quant.to_pair()) if self.quant is not None else meta

    @classmethod
    def from_meta(cls, format: str, meta: Sequence[int]) -> "Layout":
        fmt = get(format)
        if len(meta) not in (4, 6):
            raise FormatError(f"meta must be [K, N, p0, p1] (+ [qbits, qgroup] when quantised), got {list(meta)}")
        K, N, p0, p1 = (int(v) for v in meta[:4])
        q = Quant(int(meta[4]), int(meta[5])) if len(meta) == 6 and int(meta[4]) else None
        return cls(format, (K, N), fmt.params.from_pair(p0, p1), q)


def unpack(fmt: str, meta: Sequence[int], values: torch.Tensor,
           aux0: Optional[torch.Tensor] = None, aux1: Optional[torch.Tensor] = None,
           scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense ``B (K, N)`` from raw packed tensors (``meta``: see :class:`Layout`).
    A quantised factor's element ``(k, c)`` is ``q · scales[k // group, c]``,
    computed in fp32 and rounded to the scales' dtype."""
    layout = Layout.from_meta(fmt, meta)
    return _unpack(layout, values, tuple(t for t in (aux0, aux1) if t is not None), scales)


def _unpack(layout: Layout, values, aux: Tuple[torch.Tensor, ...], scales) -> torch.Tensor:
    f, (K, N) = layout.fmt, layout.shape
    if layout.quant is None:
        return f.unpack(K, N, layout.params, values, aux)
    bits, group = layout.quant.to_pair()
    q = quant.decode(values, bits, f.value_rows(K, N, layout.params))
    B = f.unpack(K, N, layout.params, q, aux)
    return (B * quant.scale_matrix(scales, K, group)).to(scales.dtype)


def gather_values(fmt: str, meta: Sequence[int], dense: torch.Tensor,
                  aux0: Optional[torch.Tensor] = None, aux1: Optional[torch.Tensor] = None,
                  nnz: Optional[int] = None) -> torch.Tensor:
    """The entries of a dense ``(K, N)`` tensor at the factor's stored positions,
    laid out like ``values`` (the adjoint of :func:`unpack`; used for gradients).
    For a quantised factor this is the layout of its *unquantised* values."""
    layout = Layout.from_meta(fmt, meta)
    aux = tuple(t for t in (aux0, aux1) if t is not None)
    return layout.fmt.gather(layout.K, layout.N, layout.params, dense, aux, nnz)


def _tensor_dtype(t) -> object:
    return t.dtype if isinstance(t, torch.Tensor) else type(t)


class SparseFactor:
    """A sparse factor ``B (K × N)`` in one of the registered formats
    (``dense``, ``nm``, ``bitmap``, ``csr``, ``ell``; docs/FORMATS.md).

    Build one with :meth:`pack` from a dense masked tensor (zeros are the
    pruned entries), or from stored tensors with the constructor, which
    validates every rule unless ``validate=False``::

        SparseFactor("nm", (K, N), values, indices=idx, n=1, m=4)

    Keyword arguments name the format's aux tensors (``indices``; ``bitmask``
    and ``offsets``; ``crow`` and ``col``; ``index``) and its parameters
    (``n``/``m``, ``tile``, ``k``/``axis``); ``scales``/``qbits``/``qgroup``
    describe int8/int4 values.

    Attributes:
        format: the format name.  layout: the :class:`Layout` record.
        shape: ``(K, N)``; K is the reduction axis of the sparse product.
        values: the stored values (layout depends on the format).
        aux: the format's int32 tensors by name.  scales: of a quantised factor.
        Parameters read as attributes: ``n``, ``m`` (nm), ``tile`` (bitmap),
        ``k``, ``axis`` (ell); None where the format has no such parameter.
    """

    _LEGACY_PARAMS = ("n", "m", "tile", "k", "axis")

    def __init__(self, format: str, shape: Tuple[int, int], values: torch.Tensor, *,
                 scales: Optional[torch.Tensor] = None, qbits: Optional[int] = None,
                 qgroup: Optional[int] = None, validate: bool = True, params: Optional[Params] = None,
                 **named):
        f = get(format)
        aux: Dict[str, torch.Tensor] = {}
        for name in f.aux:
            t = named.pop(name, None)
            if t is None:
                raise FormatError(f"{format} format needs the tensor {name!r}")
            aux[name] = t
        tensor_names = {"indices", "bitmask", "offsets", "crow", "col", "index"}
        stray = sorted(k for k, v in named.items() if v is not None and k in tensor_names)
        if stray:
            raise FormatError(f"{format} format stores no tensor {stray[0]!r}")
        if params is None:
            params = f.make_params(**{k: v for k, v in named.items() if k not in tensor_names})
        q = None
        if qbits:
            if not f.quantizable:
                raise FormatError(f"{format} format cannot be quantised (quantised formats: "
                                  f"{tuple(n for n in _quantizable())})")
            if scales is None or not qgroup:
                raise FormatError("a quantised factor needs scales and qgroup")
            q = Quant(int(qbits), int(qgroup))
        elif scales is not None:
            raise FormatError("scales given but qbits is not set")
        self.layout = Layout(format, (int(shape[0]), int(shape[1])), params, q)
        self.values = values
        self.aux = aux
        self.scales = scales
        if validate:
            self.validate()

    # ---- construction -------------------------------------------------
    @classmethod
    def pack(cls, dense: torch.Tensor, format: str, *, qbits: Optional[int] = None, qgroup: int = 64,
             **params) -> "SparseFactor":
        """Pack a dense ``(K, N)`` tensor whose zeros are the pruned entries.

        ``params`` are the format's: ``nm`` needs ``n`` and ``m`` and refuses a
        tensor with more than ``n`` non-zeros in any group of ``m`` rows;
        ``bitmap`` takes a ``tile`` (default 64×64); ``ell`` needs ``k`` and
        ``axis`` and refuses a unit (a column for axis 0, a row for axis 1)
        with more than ``k`` non-zeros. ``None`` values are ignored.

        ``qbits=8`` or ``4`` quantises the kept values (dense, nm, bitmap) on
        the symmetric grid of :mod:`.quant` with one scale per ``qgroup`` rows
        of the reduction axis and column, stored in the tensor's dtype. The
        sparsity pattern is fixed before rounding: a kept value that rounds to
        0 stays a stored zero.
        """
        f = get(format)
        record = f.make_params(**params)
        if dense.dim() != 2:
            raise FormatError(f"pack expects a 2-D (K, N) tensor, got shape {tuple(dense.shape)}")
        if dense.dtype not in VALUE_DTYPES:
            raise FormatError(f"pack expects floating values {VALUE_DTYPES}, got {dense.dtype}")
        dense = dense.detach().contiguous()
        values, aux = f.pack(dense, record)
        factor = cls(format, tuple(dense.shape), values, params=record, **aux)
        return factor.quantize(qbits, qgroup) if qbits else factor

    @classmethod
    def from_layout(cls, layout: Layout, values: torch.Tensor, aux: Sequence[torch.Tensor] = (),
                    scales: Optional[torch.Tensor] = None, validate: bool = True) -> "SparseFactor":
        """From a :class:`Layout` and its tensors (aux in the format's order)."""
        named = dict(zip(layout.fmt.aux, aux))
        q = layout.quant
        return cls(layout.format, layout.shape, values, params=layout.params, scales=scales,
                   qbits=q.bits if q else None, qgroup=q.group if q else None, validate=validate, **named)

    @classmethod
    def from_parts(cls, format: str, meta: Sequence[int], values: torch.Tensor,
                   aux: Sequence[torch.Tensor] = (), validate: bool = True,
                   scales: Optional[torch.Tensor] = None) -> "SparseFactor":
        """Inverse of :attr:`meta` / :attr:`aux_tensors` / :attr:`scales` (what the ops take)."""
        return cls.from_layout(Layout.from_meta(format, meta), values, aux, scales, validate)

    @classmethod
    def from_torch_sparse(cls, sp: torch.Tensor) -> "SparseFactor":
        """From a ``torch.sparse_csr`` (or COO) 2-D tensor."""
        if sp.layout != torch.sparse_csr:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                sp = sp.to_sparse_csr()
        return cls("csr", tuple(sp.shape), sp.values().clone(),
                   crow=sp.crow_indices().to(torch.int32), col=sp.col_indices().to(torch.int32))

    def quantize(self, qbits: int, qgroup: int = 64) -> "SparseFactor":
        """This factor with its values rounded to ``qbits`` (see :meth:`pack`)."""
        if self.quantized:
            raise FormatError("factor is already quantised")
        if not self.fmt.quantizable:
            raise FormatError(f"{self.format} format cannot be quantised (quantised formats: {_quantizable()})")
        q = Quant(int(qbits), int(qgroup))
        K, N = self.shape
        scales = quant.group_scales(self.to_dense(), q.bits, q.group).to(self.dtype)
        per_value = self.fmt.gather(K, N, self.params, quant.scale_matrix(scales, K, q.group),
                                    self.aux_tensors, self.nnz)
        ints = quant.to_grid(self.values, per_value, q.bits)
        return SparseFactor(self.format, self.shape, quant.encode(ints, q.bits).contiguous(), params=self.params,
                            scales=scales.contiguous(), qbits=q.bits, qgroup=q.group, **self.aux)

    # ---- views --------------------------------------------------------
    @property
    def format(self) -> str:
        return self.layout.format

    @property
    def fmt(self) -> Format:
        """The format object (pack / unpack / gather / validate)."""
        return self.layout.fmt

    @property
    def shape(self) -> Tuple[int, int]:
        return self.layout.shape

    @property
    def params(self) -> Params:
        return self.layout.params

    @property
    def qbits(self) -> Optional[int]:
        return self.layout.quant.bits if self.layout.quant else None

    @property
    def qgroup(self) -> Optional[int]:
        return self.layout.quant.group if self.layout.quant else None

    def __getattr__(self, name: str):
        # the format's parameters read as attributes (factor.n, factor.tile, ...)
        if name.startswith("_") or name == "layout":
            raise AttributeError(name)
        params = self.__dict__.get("layout").params if "layout" in self.__dict__ else None
        if params is not None and name in params.field_names():
            return getattr(params, name)
        if name in self._LEGACY_PARAMS:
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def meta(self) -> list:
        """``[K, N, p0, p1]`` (+ ``[qbits, qgroup]``): the layout as the ops take it."""
        return self.layout.to_meta()

    @property
    def quantized(self) -> bool:
        return self.layout.quant is not None

    @property
    def aux_tensors(self) -> Tuple[torch.Tensor, ...]:
        return tuple(self.aux[name] for name in self.fmt.aux)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """Every stored tensor by name (``values`` first, ``scales`` last when quantised)."""
        out = {"values": self.values, **self.aux}
        if self.quantized:
            out["scales"] = self.scales
        return out

    @property
    def dtype(self) -> torch.dtype:
        """The factor's arithmetic dtype (the scales' dtype when quantised)."""
        return self.scales.dtype if self.quantized else self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        """Stored values (explicit zeros of an ``nm`` factor included): what a budget counts."""
        if self.quantized and self.qbits == 4:
            K, N = self.shape
            rows = self.fmt.stored_rows(K, N, self.params, self.aux)
            return rows * math.prod(self.values.shape[1:])
        return self.values.numel()

    @property
    def density(self) -> float:
        K, N = self.shape
        return self.nnz / (K * N) if K * N else 0.0

    @property
    def nbytes(self) -> int:
        """Every stored byte: values, indices, bitmasks, offsets, scales."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def pattern(self) -> str:
        return self.layout.pattern()

    def to_dense(self) -> torch.Tensor:
        """The exact dense ``(K, N)`` tensor (dequantised when quantised)."""
        return _unpack(self.layout, self.values, self.aux_tensors, self.scales)

    def to_torch_sparse(self) -> torch.Tensor:
        if self.format == "csr":
            return torch.sparse_csr_tensor(self.aux["crow"], self.aux["col"], self.values, self.shape,
                                           check_invariants=True)
        return self.to_dense().to_sparse_csr()

    def to(self, *args, **kwargs) -> "SparseFactor":
        """Move to a device and/or cast to a floating dtype: ``values`` (``scales``
        when quantised; int values and index tensors keep their dtype)."""
        if self.quantized:
            scales = self.scales.to(*args, **kwargs)
            values = self.values.to(scales.device)
        else:
            scales, values = None, self.values.to(*args, **kwargs)
        aux = [t.to(values.device) for t in self.aux_tensors]
        return SparseFactor.from_layout(self.layout, values, aux, scales, validate=False)

    def __repr__(self) -> str:
        K, N = self.shape
        q = f", int{self.qbits} (group {self.qgroup})" if self.quantized else ""
        return (f"SparseFactor(format={self.format!r}, shape=({K}, {N}), pattern={self.pattern()}, "
                f"density={self.density:.3f}, dtype={self.dtype}{q}, nbytes={self.nbytes})")

    # ---- validation ---------------------------------------------------
    def validate(self) -> "SparseFactor":
        """Check every rule of the format; raise :class:`FormatError` naming the broken one."""
        K, N = self.shape
        fmt = self.format
        if K < 0 or N < 0:
            raise FormatError(f"{fmt}: shape must be non-negative, got {self.shape}")
        for name, t in self.aux.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
                raise FormatError(f"{fmt}: {name} must be an int32 tensor, got {_tensor_dtype(t)}")
            if isinstance(self.values, torch.Tensor) and t.device != self.values.device:
                raise FormatError(f"{fmt}: {name} is on {t.device} but values are on {self.values.device}")
        self.aux = {k: v.contiguous() for k, v in self.aux.items()}
        if self.quantized:
            return self._validate_quantized()
        if not isinstance(self.values, torch.Tensor) or self.values.dtype not in VALUE_DTYPES:
            raise FormatError(f"{fmt}: values must be a floating tensor {VALUE_DTYPES}, "
                              f"got {_tensor_dtype(self.values)}")
        self.values = self.values.contiguous()
        self.fmt.validate(K, N, self.params, self.values, self.aux)
        return self

    def _validate_quantized(self) -> "SparseFactor":
        """Quantisation rules, then the format's own rules on the decoded integers."""
        fmt, (K, N) = self.format, self.shape
        bits, group = self.layout.quant.to_pair()
        Q = quant.qmax(bits)
        if not isinstance(self.values, torch.Tensor) or self.values.dtype != torch.int8:
            raise FormatError(f"{fmt}: quantised values must be an int8 tensor, got {_tensor_dtype(self.values)}")
        if not isinstance(self.scales, torch.Tensor) or self.scales.dtype not in VALUE_DTYPES:
            raise FormatError(f"{fmt}: scales must be a floating tensor {VALUE_DTYPES}, "
                              f"got {_tensor_dtype(self.scales)}")
        if self.scales.device != self.values.device:
            raise FormatError(f"{fmt}: scales are on {self.scales.device} but values are on {self.values.device}")
        want = self.layout.quant.scales_shape(K, N)
        if tuple(self.scales.shape) != want:
            raise FormatError(f"{fmt}: scales must have shape {want} for a ({K}, {N}) factor, "
                              f"got {tuple(self.scales.shape)}")
        rows = self.fmt.stored_rows(K, N, self.params, self.aux)
        packed = quant.packed_rows(rows, bits)
        if self.values.shape[0] != packed:
            raise FormatError(f"{fmt}: int{bits} values must have {packed} rows along axis 0 for "
                              f"{rows} stored values, got shape {tuple(self.values.shape)}")
        decoded = quant.decode(self.values, bits)
        if decoded.numel() and bool((decoded.abs() > Q).any()):
            raise FormatError(f"{fmt}: a quantised value lies outside the symmetric int{bits} grid -{Q}..{Q}")
        if decoded.shape[0] > rows and bool((decoded[rows:] != 0).any()):
            raise FormatError(f"{fmt}: the unused half of the last int4 byte row must be 0")
        self.values = self.values.contiguous()
        self.scales = self.scales.contiguous()
        self.fmt.validate(K, N, self.params, decoded[:rows].contiguous(), self.aux)
        return self


def _quantizable() -> Tuple[str, ...]:
    from .base import _REGISTRY

    return tuple(name for name, f in _REGISTRY.items() if f.quantizable)
