"""The pure-PyTorch semantics of FiPS layers: the single source of truth that
every kernel is tested against.

Notation (``docs/FORMATS.md``, DESIGN §1): ``U`` is the shared base
``(d × r)``; ``V`` is a layer's factor ``(r × h)``.

* expand (d→h):   ``y = (x·U)·V + b``,   torch weight ``W (h × d) = (U·V)ᵀ``
* contract (h→d): ``y = (x·Vᵀ)·Uᵀ + b``, torch weight ``W (d × h) = U·V``

All arithmetic is in fp32 (fp64 stays fp64); the result has the input's dtype.
``V`` may be a dense tensor or a :class:`~fips_kernels.formats.SparseFactor`
in reduction-major form (``B = V`` for expand, ``B = Vᵀ`` for contract).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..formats import SparseFactor

__all__ = ["KINDS", "ACTIVATIONS", "activate", "expand", "contract", "gate_up", "fips_linear", "reconstruct",
           "linear_weight", "factor_matrix"]

KINDS = ("expand", "contract")
ACTIVATIONS = ("none", "gelu", "silu")
Factor = Union[torch.Tensor, SparseFactor]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def factor_matrix(V: Factor, kind: str) -> torch.Tensor:
    """The dense ``V (r × h)`` of a layer, from a dense tensor or a reduction-major factor."""
    if isinstance(V, SparseFactor):
        B = V.to_dense()
        return B if kind == "expand" else B.t()
    return V


def base_matrix(U: Factor) -> torch.Tensor:
    """The dense ``U (d × r)``: a tensor, or a quantised dense SparseFactor dequantised."""
    return U.to_dense() if isinstance(U, SparseFactor) else U


def _bias(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def activate(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """``none``, ``gelu`` (exact erf form, as ``nn.GELU()``) or ``silu``."""
    if activation in (None, "none"):
        return y
    if activation == "gelu":
        return torch.nn.functional.gelu(y)
    if activation == "silu":
        return torch.nn.functional.silu(y)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def expand(x: torch.Tensor, U: torch.Tensor, V: Factor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None) -> torch.Tensor:
    """``y = act((x·U)·V + b)``.

    Args:
        x: ``(*, d)``.
        U: ``(d, r)`` (or an int8 dense SparseFactor, dequantised).
        V: ``(r, h)`` dense, or a SparseFactor with shape ``(r, h)``.
        bias: ``(h,)`` or None.
        activation: ``None``/``"none"``, ``"gelu"`` (ViT fc1) or ``"silu"``.
    Returns:
        ``(*, h)`` in ``x.dtype``.
    """
    acc = _acc_dtype(x.dtype)
    Vd = factor_matrix(V, "expand")
    z = x.to(acc) @ base_matrix(U).to(acc)
    return activate(_bias(z @ Vd.to(acc), bias), activation).to(x.dtype)


def gate_up(x: torch.Tensor, U: torch.Tensor, V_gate: Factor, V_up: Factor,
            bias_gate: Optional[torch.Tensor] = None, bias_up: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Llama/Gemma MLP input: ``silu((x·U)·V_gate + b_g) * ((x·U)·V_up + b_u)``.

    ``x (*, d)``, ``U (d, r)``, ``V_gate``/``V_up`` ``(r, h)`` → ``(*, h)``.
    """
    acc = _acc_dtype(x.dtype)
    z = x.to(acc) @ base_matrix(U).to(acc)
    gate = _bias(z @ factor_matrix(V_gate, "expand").to(acc), bias_gate)
    up = _bias(z @ factor_matrix(V_up, "expand").to(acc), bias_up)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def contract(x: torch.Tensor, U: torch.Tensor, V: Factor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = (x·Vᵀ)·Uᵀ + b``.

    Args:
        x: ``(*, h)``.
        U: ``(d, r)``.
        V: ``(r, h)`` dense, or a SparseFactor with shape ``(h, r)`` (``B = Vᵀ``).
        bias: ``(d,)`` or None.
    Returns:
        ``(*, d)`` in ``x.dtype``.
    """
    acc = _acc_dtype(x.dtype)
    Vd = factor_matrix(V, "contract")
    z = x.to(acc) @ Vd.to(acc).t()
    return _bias(z @ base_matrix(U).to(acc).t(), bias).to(x.dtype)


def fips_linear(x: torch.Tensor, U: torch.Tensor, V: Factor, kind: str,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`expand` or :func:`contract` by ``kind``."""
    if kind == "expand":
        return expand(x, U, V, bias)
    if kind == "contract":
        return contract(x, U, V, bias)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def reconstruct(U: torch.Tensor, V: Factor, kind: str = "expand") -> torch.Tensor:
    """``U·V`` as a dense ``(d × h)`` tensor in ``U.dtype`` (fp32 accumulation).
    ``kind`` only says how a SparseFactor is oriented."""
    Ud = base_matrix(U)
    acc = _acc_dtype(Ud.dtype)
    return (Ud.to(acc) @ factor_matrix(V, kind).to(acc)).to(Ud.dtype)


def linear_weight(U: torch.Tensor, V: Factor, kind: str) -> torch.Tensor:
    """The layer's torch weight (``out × in``): ``(U·V)ᵀ`` for expand, ``U·V`` for contract."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    W = reconstruct(U, V, kind)
    return W.t().contiguous() if kind == "expand" else W
