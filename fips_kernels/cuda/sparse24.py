"""2:4 factors on sparse tensor cores, through torch's semi-structured sparsity
(``torch.sparse.to_sparse_semi_structured``: cuSPARSELt, or CUTLASS).

A 2:4 ``nm`` factor ``B (K × N)`` is 2:4 along K, so ``Bᵀ (N × K)`` is exactly
the semi-structured layout ``F.linear`` takes as its weight:

* expand:   ``y = act(F.linear(x·U_pad, Bᵀ_sparse, b))``
* contract: ``y = F.linear(F.linear(x, Bᵀ_sparse), U_pad, b)``

The rank axis is zero-padded to a multiple of :data:`PAD` (``Bᵀ`` and a copy
of ``U`` with zero columns, so ``z`` comes out padded with no copy per call);
the hidden width ``h`` must already be one (padding it would copy ``x`` or
``y`` on every call).

The conversion is a packing step done once per factor and cached (key: the
source tensor's address, version, shape, dtype and device; bounded LRU). An
entry holds a reference to its source tensors, so their addresses cannot be
reused by other tensors while it is cached. :func:`pack_for_cuda` packs a
whole model ahead of time, e.g. before CUDA-graph capture (a conversion is
never attempted during capture: that call reconstructs instead). A captured
graph reads the packs it was captured with: do not clear them while it lives.
"""
from __future__ import annotations

import collections
import logging
from typing import Dict, List, Optional, OrderedDict, Tuple, Union

import torch
import torch.nn.functional as F

from ..formats import Layout, SparseFactor
from ..reference import activate

__all__ = ["PAD", "reasons", "operands", "expand", "contract", "pack_layer", "pack_for_cuda", "clear_packs",
           "packed_bytes", "tensor_nbytes"]

_logger = logging.getLogger("fips_kernels")

PAD = 64  # cuSPARSELt needs multiples of 16 and CUTLASS (32 rows, 64 columns): 64 suits both
MAX_ENTRIES = 512  # > the FiPS layers of the largest model we know (Llama-3-70B: 240), plus their bases
DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)

Base = Union[torch.Tensor, SparseFactor]
_cache: "OrderedDict[tuple, Tuple[torch.Tensor, tuple]]" = collections.OrderedDict()
_failed: Dict[Tuple[torch.device, torch.dtype], str] = {}  # conversions that raised, with the error


def _hidden(layout: Layout, kind: str) -> int:
    return layout.shape[1] if kind == "expand" else layout.shape[0]


def reasons(layout: Union[Layout, SparseFactor], kind: str, dtype: torch.dtype, device: torch.device) -> List[str]:
    """Why the 2:4 path cannot run this layer (empty: it can)."""
    layout = getattr(layout, "layout", layout)
    out = []
    if layout.format != "nm" or (layout.params.n, layout.params.m) != (2, 4):
        out.append(f"sparse tensor cores need a 2:4 nm factor, got the {layout.pattern()} pattern "
                   f"({layout.format})")
    if layout.quant is not None:
        out.append(f"sparse tensor cores need float factor values, not int{layout.quant.bits}")
    if dtype not in DTYPES:
        out.append(f"sparse tensor cores need float16 or bfloat16, not {str(dtype).replace('torch.', '')}")
    if device.type != "cuda":
        out.append(f"sparse tensor cores need a CUDA device (input is on {device.type})")
    elif torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) < MIN_CAPABILITY:
            out.append(f"sparse tensor cores need compute capability 8.0+, this GPU is {cap[0]}.{cap[1]}")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        out.append(f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured")
    h = _hidden(layout, kind)
    if h == 0 or h % PAD:
        out.append(f"the hidden width h={h} is not a positive multiple of {PAD} (torch's semi-structured "
                   f"kernels; padding h would copy x or y on every call)")
    if (device, dtype) in _failed:
        out.append(f"torch's semi-structured conversion failed on {device} for {dtype}: {_failed[(device, dtype)]}")
    return out


# ---------------------------------------------------------------- the cache

def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot change outside inference)
        return -1


def _ident(t: Optional[torch.Tensor]) -> tuple:
    if t is None:
        return ()
    return (t.data_ptr(), _version(t), tuple(t.shape), t.dtype, t.device)


def _lookup(key: tuple) -> Optional[torch.Tensor]:
    hit = _cache.get(key)
    if hit is None:
        return None
    _cache.move_to_end(key)
    return hit[0]


def _store(key: tuple, value: torch.Tensor, sources: tuple) -> torch.Tensor:
    # a new version of the same tensor replaces the old pack instead of piling up beside it
    stale = [k for k in _cache if k[0] == key[0] and k[1][0] == key[1][0] and k[1][4] == key[1][4]]
    for k in stale:
        del _cache[k]
    _cache[key] = (value, sources)
    while len(_cache) > MAX_ENTRIES:
        _cache.popitem(last=False)
    return value


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, a semi-structured one included (its packed values and metadata)."""
    if hasattr(t, "__tensor_flatten__"):
        names = t.__tensor_flatten__()[0]
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def clear_packs() -> None:
    """Drop every cached 2:4 pack and padded base (rebuilt on the next large-M call).
    Not while a CUDA graph captured with them may still be replayed: it reads their memory."""
    _cache.clear()
    _failed.clear()


def packed_bytes() -> int:
    """Bytes the cache holds (semi-structured factors and padded bases)."""
    return sum(tensor_nbytes(v) for v, _ in _cache.values())


def _convert(dense: torch.Tensor) -> torch.Tensor:
    return torch.sparse.to_sparse_semi_structured(dense)


def _padded_rank(r: int) -> int:
    return -(-r // PAD) * PAD


def _rank(factor: SparseFactor, kind: str) -> int:
    return factor.shape[0] if kind == "expand" else factor.shape[1]


def _weight_key(factor: SparseFactor, kind: str) -> tuple:
    return ("Bt", _ident(factor.values), _ident(factor.aux["indices"]), kind)


def _base_key(U: Base, r_pad: int) -> Optional[tuple]:
    """None when ``U`` itself serves (a float base whose rank needs no padding)."""
    if isinstance(U, SparseFactor):
        return ("U", _ident(U.values), _ident(U.scales), r_pad)
    return None if U.shape[1] == r_pad else ("U", _ident(U), (), r_pad)


def _sparse_weight(factor: SparseFactor, kind: str) -> torch.Tensor:
    """``Bᵀ`` zero-padded to multiples of :data:`PAD`, semi-structured."""
    key = _weight_key(factor, kind)
    hit = _lookup(key)
    if hit is not None:
        return hit
    Bt = factor.to_dense().t()
    N, K = Bt.shape
    Bt = F.pad(Bt, (0, -K % PAD, 0, -N % PAD)).contiguous()
    return _store(key, _convert(Bt), (factor.values, factor.aux["indices"]))


def _padded_base(U: Base, r_pad: int) -> torch.Tensor:
    """``U`` with zero columns up to ``r_pad`` (an int8 base dequantised once here)."""
    key = _base_key(U, r_pad)
    if key is None:
        return U
    hit = _lookup(key)
    if hit is not None:
        return hit
    quantized = isinstance(U, SparseFactor)
    Uf = U.to_dense() if quantized else U
    U_pad = F.pad(Uf, (0, r_pad - Uf.shape[1])).contiguous()
    return _store(key, U_pad, (U.values, U.scales) if quantized else (U,))


class ConversionError(RuntimeError):
    """torch could not build the semi-structured tensor (recorded: later calls see it as a reason)."""


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def operands(U: Base, factor: SparseFactor, kind: str, strict: bool = False
             ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(Bᵀ semi-structured, U padded)``, from the cache or packed now.

    None when they cannot be had now (the conversion failed, or they are not
    packed yet and a CUDA graph is being captured); ``strict`` raises
    :class:`ConversionError` instead.
    """
    device, dtype = factor.device, factor.dtype
    r_pad = _padded_rank(_rank(factor, kind))
    if _capturing(device):
        # kernels recorded during capture do not run: a pack built now would hold garbage outside the graph
        base_key = _base_key(U, r_pad)
        packed = (_lookup(_weight_key(factor, kind)), U if base_key is None else _lookup(base_key))
        if packed[0] is None or packed[1] is None:
            if strict:
                raise ConversionError("the 2:4 factor was not packed before CUDA-graph capture "
                                      "(call fips_kernels.cuda.pack_for_cuda(model) first)")
            return None
        return packed
    with torch.no_grad():
        try:
            Bt = _sparse_weight(factor, kind)
        except (RuntimeError, NotImplementedError) as exc:
            _failed[(device, dtype)] = f"{type(exc).__name__}: {exc}"
            _logger.warning("fips_kernels: 2:4 semi-structured conversion failed on %s (%s), the cuda backend "
                            "uses reconstruct instead: %s", device, dtype, _failed[(device, dtype)])
            if strict:
                raise ConversionError(_failed[(device, dtype)]) from exc
            return None
        return Bt, _padded_base(U, r_pad)


# ---------------------------------------------------------------- the products

def expand(x2: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor], bias: Optional[torch.Tensor],
           activation: str = "none") -> torch.Tensor:
    """``act((x·U)·B + b)``; the padded columns of ``z`` are zero."""
    Bt, U_pad = packed
    return activate(F.linear(torch.mm(x2, U_pad), Bt, bias), activation)


def contract(x2: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor],
             bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``(x·B)·Uᵀ + b``; ``z`` has the padded rank, matched by ``U``'s zero columns."""
    Bt, U_pad = packed
    return F.linear(F.linear(x2, Bt), U_pad, bias)


# ---------------------------------------------------------------- ahead of time

def pack_layer(layer) -> int:
    """Pack one FiPS layer (anything with ``dispatch_problem``, ``base`` and
    ``factor``: :class:`~fips_kernels.FiPSLinear`) if the cuda backend would run
    it on 2:4 sparse tensor cores at large M; returns the bytes added. A failed
    conversion is logged and becomes one of :func:`reasons`."""
    from .. import dispatch

    problem = layer.dispatch_problem(1 << 30)
    if dispatch.backend("cuda").not_supported_reasons(problem) or \
            reasons(problem.layout, problem.kind, problem.dtype, problem.device):
        return 0
    before = packed_bytes()
    operands(layer.base.operand, layer.factor, layer.kind)
    return packed_bytes() - before


def pack_for_cuda(module: torch.nn.Module) -> int:
    """Pack every FiPS layer of ``module`` (a model, a FiPSGroup or one layer)
    that the cuda backend would run on 2:4 sparse tensor cores, so no large-M
    call pays for the conversion (and none has to happen during CUDA-graph
    capture): the same as ``fips_kernels.prepare(module, "cuda")``. Layers that
    cannot take the 2:4 path are skipped, and so are all after a conversion
    that fails (logged once, then one of :func:`reasons`).

    Memory: the cache then holds, per 2:4 layer, a semi-structured copy of its
    factor (the kept values of ``Bᵀ`` padded to multiples of 64, about the
    size of the factor's own values, plus torch's metadata), and per group
    whose rank is not a multiple of 64 one zero-padded copy of the base ``U``.
    The layer's own tensors stay as they are. Returns the bytes added
    (:func:`packed_bytes` reports the total; :func:`clear_packs` frees it).
    """
    return sum(pack_layer(m) for m in module.modules() if callable(getattr(m, "dispatch_problem", None)))
