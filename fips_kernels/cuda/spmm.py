"""The Python face of ``torch.ops.fips_kernels_cuda.sparse_mm``:
``act(A · B + bias)`` with ``B`` a packed :class:`SparseFactor` decompressed
in shared memory by the compiled kernel (cp.async + mma.sync m16n8k16).

The op exists on CUDA tensors and, through a CPU implementation that runs the
same decode and fragment code warp by warp, on CPU tensors (tests). It only
computes in fp16/bf16: float32 is refused.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _extension
from ..formats import SparseFactor
from ..reference import ACTIVATIONS, activate

__all__ = ["sparse_mm", "sparse_mm_gated", "op_available", "unavailable_reason", "KERNEL_DTYPES", "FORMATS", "BITMAP_TILE"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
FORMATS = ("dense", "nm", "bitmap")
BITMAP_TILE = (64, 64)
_ALIGN = 16  # cp.async copies 16-byte chunks: every array base must be 16-byte aligned


@functools.lru_cache(maxsize=None)
def _has_op() -> bool:
    # an extension built from an older csrc/ loads but lacks the ops
    ops = torch.ops.fips_kernels_cuda
    return hasattr(ops, "sparse_mm") and hasattr(ops, "sparse_mm_gated")


def op_available() -> bool:
    """True when the compiled extension is loaded and registers ``sparse_mm``."""
    return _extension.available() and _has_op()


def unavailable_reason() -> Optional[str]:
    """Why :func:`op_available` is False (None when it is True)."""
    if not _extension.available():
        return f"the CUDA extension is not available: {_extension.error()}"
    if not _has_op():
        return ("the CUDA extension has no sparse_mm / sparse_mm_gated op (built from an older csrc/; "
                "reinstall with `pip install --no-build-isolation -e .`)")
    return None


def _aligned(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Contiguous, and a fresh (aligned) copy when the base address is not 16-byte aligned."""
    if t is None:
        return None
    t = t.contiguous()
    if t.numel() and t.data_ptr() % _ALIGN:
        t = t.clone()
    return t


def _dims(factor: SparseFactor, transpose: bool):
    K, N = factor.shape
    return (N, K) if transpose else (K, N)


def _check(a, factor, bias, activation, transpose, split_k, out_dtype) -> None:
    where = "fips_kernels.cuda.sparse_mm"
    if not isinstance(factor, SparseFactor):
        raise ValueError(f"{where}: the factor must be a SparseFactor, got {type(factor).__name__}")
    if not isinstance(a, torch.Tensor) or a.dim() != 2:
        got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise ValueError(f"{where}: A must be a 2-D tensor (M, K), got {got}")
    if a.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{where}: A must be float16 or bfloat16 (the kernel runs fp16/bf16 tensor cores), "
                         f"got {a.dtype}")
    if factor.format not in FORMATS:
        raise ValueError(f"{where}: no cuda kernel for the {factor.format!r} format (supported: {FORMATS})")
    if factor.format == "bitmap" and tuple(factor.tile) != BITMAP_TILE:
        raise ValueError(f"{where}: bitmap tile {tuple(factor.tile)} is not supported (only {BITMAP_TILE})")
    if transpose and factor.format != "dense":
        raise ValueError(f"{where}: transpose=True needs a dense factor, got {factor.format!r}")
    K, N = _dims(factor, transpose)
    if a.shape[1] != K:
        which = "Bᵀ" if transpose else "B"
        raise ValueError(f"{where}: A has {a.shape[1]} columns but {which} has {K} rows "
                         f"(factor shape {factor.shape}, transpose={transpose})")
    if factor.dtype != a.dtype:
        what = "scales" if factor.quantized else "values"
        raise ValueError(f"{where}: dtype mismatch: A is {a.dtype} but the factor's {what} are {factor.dtype}")
    tensors = {"values": factor.values, **factor.aux, "scales": factor.scales, "bias": bias}
    for name, t in tensors.items():
        if t is not None and t.device != a.device:
            raise ValueError(f"{where}: device mismatch: {name} is on {t.device} but A is on {a.device}")
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{where}: bias must have shape ({N},), got {tuple(bias.shape)}")
        if bias.dtype != a.dtype:
            raise ValueError(f"{where}: dtype mismatch: bias is {bias.dtype} but A is {a.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 0:
        raise ValueError(f"{where}: split_k must be an int >= 0 (0: the op chooses), got {split_k!r}")
    if out_dtype not in (None, a.dtype, torch.float32):
        raise ValueError(f"{where}: out_dtype must be None, {a.dtype} or torch.float32, got {out_dtype}")


def _degenerate(a, N, bias, activation, dtype) -> torch.Tensor:
    """M, N or K is 0: no kernel launch (the result is empty, or act(bias) broadcast)."""
    M = a.shape[0]
    if M == 0 or N == 0 or bias is None:
        out = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    else:
        out = bias.float().expand(M, N)
    return activate(out, activation).to(dtype)


def _pattern(factor: SparseFactor):
    """The op's ``(p0, p1)``: ``(n, m)`` for nm, the tile for bitmap, ``(0, 0)`` for dense."""
    if factor.format == "nm":
        return factor.n, factor.m
    return tuple(factor.tile) if factor.format == "bitmap" else (0, 0)


def _raw(factor: SparseFactor, bias: Optional[torch.Tensor]):
    """The op's per-factor arguments: values, aux0, aux1, scales, bias (aligned)."""
    aux = [_aligned(t) for t in factor.aux_tensors] + [None, None]
    return (_aligned(factor.values), aux[0], aux[1], _aligned(factor.scales), _aligned(bias))


def sparse_mm(a: torch.Tensor, factor: SparseFactor, bias: Optional[torch.Tensor] = None,
              activation: Optional[str] = None, *, transpose: bool = False, split_k: int = 0,
              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``act(a · B + bias)`` (``a · Bᵀ`` with ``transpose=True``), shape ``(M, N)``.

    Args:
        a: ``(M, K)`` float16 or bfloat16; any strides.
        factor: ``B (K × N)``: dense, nm or bitmap (64×64 tiles); float values
            of ``a``'s dtype, or int8/int4 values with scales of ``a``'s dtype.
            With ``transpose=True`` a dense factor of shape ``(N, K)`` (e.g. an
            int8 base ``U (d, r)`` for ``z · Uᵀ``).
        bias: ``(N,)`` or None, added in fp32 before the activation.
        activation: None / ``"none"``, ``"gelu"`` (exact erf) or ``"silu"``.
        split_k: K splits (0: the op picks from the SM count).
        out_dtype: None (``a``'s dtype) or ``torch.float32``.
    """
    activation = activation or "none"
    _check(a, factor, bias, activation, transpose, split_k, out_dtype)
    K, N = _dims(factor, transpose)
    dtype = out_dtype or a.dtype
    if a.shape[0] == 0 or N == 0 or K == 0:
        return _degenerate(a, N, bias, activation, dtype)
    return torch.ops.fips_kernels_cuda.sparse_mm(
        _aligned(a), *_raw(factor, bias), factor.format, K, N, *_pattern(factor), factor.qbits or 0,
        factor.qgroup or 0, transpose, activation, split_k, out_dtype)


def sparse_mm_gated(a: torch.Tensor, gate: SparseFactor, up: SparseFactor,
                    bias_gate: Optional[torch.Tensor] = None, bias_up: Optional[torch.Tensor] = None, *,
                    split_k: int = 0, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``silu(a·B_gate + b_gate) * (a·B_up + b_up)``, shape ``(M, N)``: one
    kernel decodes both factors in the same K loop and reads ``a`` once;
    the product is formed in fp32 and rounded once.

    Args:
        a: ``(M, K)`` float16 or bfloat16.
        gate, up: ``(K, N)`` factors with the same format, shape, pattern and
            quantisation (as :func:`sparse_mm` takes them; no transposed form).
        bias_gate, bias_up: ``(N,)`` or None each.
    """
    where = "fips_kernels.cuda.sparse_mm_gated"
    _check(a, gate, bias_gate, "silu", False, split_k, out_dtype)
    _check(a, up, bias_up, "none", False, split_k, out_dtype)
    if (up.format, up.shape, up.meta, up.quantized) != (gate.format, gate.shape, gate.meta, gate.quantized):
        raise ValueError(f"{where}: gate and up must share format, shape, pattern and quantisation, got "
                         f"{gate.format} {gate.shape} {gate.meta} and {up.format} {up.shape} {up.meta}")
    K, N = gate.shape
    dtype = out_dtype or a.dtype
    if a.shape[0] == 0 or N == 0 or K == 0:
        g = _degenerate(a, N, bias_gate, "silu", torch.float32)
        u = _degenerate(a, N, bias_up, "none", torch.float32)
        return (g * u).to(dtype)
    return torch.ops.fips_kernels_cuda.sparse_mm_gated(
        _aligned(a), *_raw(gate, bias_gate), *_raw(up, bias_up), gate.format, K, N, *_pattern(gate),
        gate.qbits or 0, gate.qgroup or 0, split_k, out_dtype)
