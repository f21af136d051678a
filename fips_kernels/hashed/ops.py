"""``torch.library`` custom ops of hashed layers (namespace ``fips_kernels``):

* ``hashed_linear(x, memory, bias, spec, scale)`` → ``x·Wᵀ + b``
* ``hashed_grad_input(grad, memory, spec, scale)`` → ``grad·W``
* ``hashed_grad_memory(grad, x, memory, spec, scale, deterministic)`` → the
  array's gradient ``(m,)``
* ``hashed_weight(memory, spec, scale)`` → ``W (out × in)``
* ``hashed_scatter(grad_w, memory, spec, scale, deterministic)`` → the array's
  gradient from a weight gradient

with ``W = λ·s ⊙ mem[idx]`` (``scale`` is λ; ``spec`` is
:meth:`HashSpec.to_list <fips_kernels.hashed.mapping.HashSpec.to_list>`).
Each op checks its inputs (metadata only: no host sync), picks a backend
through :mod:`fips_kernels.dispatch` (the same runner as the FiPS ops, with a
:class:`HashedProblem`: ``triton``, else ``reference``) and runs it. All
have fake implementations (``torch.compile(fullgraph=True)``, CUDA graphs);
``hashed_linear`` and ``hashed_weight`` have autograd formulas whose backward
calls the gradient ops, so they dispatch too.

The array gradient is deterministic (bitwise reproducible) when
``torch.are_deterministic_algorithms_enabled()``, ``FIPS_KERNELS_DETERMINISTIC=1``
or inside :func:`deterministic_gradients`; otherwise the Triton backend uses
atomics.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch

from .. import dispatch
from .mapping import HashSpec

__all__ = ["hashed_linear", "hashed_weight", "select", "explain", "problem", "HashedProblem",
           "deterministic_gradients", "deterministic_enabled", "OPS", "DETERMINISTIC_ENV"]

OPS = ("hashed_linear", "hashed_grad_input", "hashed_grad_memory", "hashed_weight", "hashed_scatter")
DETERMINISTIC_ENV = "FIPS_KERNELS_DETERMINISTIC"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------- dispatch

@dataclass(frozen=True)
class HashedProblem:
    """A hashed op call, for :mod:`fips_kernels.dispatch`: the op, the layer's
    :class:`~.mapping.HashSpec`, dtype, device and input rows ``M`` (0 for the
    weight ops). The backends that run hashed ops list them in their ``ops``."""

    op: str
    spec: HashSpec
    dtype: torch.dtype
    device: torch.device
    M: int

    family = "hashed"

    def describe(self) -> str:
        s = self.spec
        return (f"{self.op} ({s.method}, {self.dtype}, {self.device}, M={self.M}, in={s.in_features}, "
                f"out={s.out_features}, m={s.size})")


def problem(op: str, spec: HashSpec, dtype: torch.dtype, device, M: int) -> HashedProblem:
    """The dispatch problem of a hashed op."""
    return HashedProblem(op, spec, dtype, torch.device(device), int(M))


def select(p: HashedProblem, spec: Optional[HashSpec] = None) -> str:
    """The name of the backend that runs ``p``: the forced one (raising
    :class:`~fips_kernels.dispatch.BackendUnavailable` with its reasons if it
    cannot), else the first in priority order that can."""
    return dispatch.select(p).name


def explain(p: HashedProblem, spec: Optional[HashSpec] = None) -> str:
    """Which backend runs ``p`` and why the others cannot."""
    return dispatch.explain(p)


def _run(op: str, spec: HashSpec, dtype, device, M: int, *args):
    return dispatch.select(problem(op, spec, dtype, device, M)).kernel(op)(*args)


# ---------------------------------------------------------------- checks

@functools.lru_cache(maxsize=1024)
def _spec(spec: tuple) -> HashSpec:
    return HashSpec.from_list(spec)


def _as_spec(op: str, spec: Sequence[int]) -> HashSpec:
    try:
        return _spec(tuple(int(v) for v in spec))
    except ValueError as exc:
        raise ValueError(f"fips_kernels.{op}: bad spec: {exc}") from None


def _check_memory(op: str, memory: torch.Tensor, spec: HashSpec) -> None:
    if memory.dim() != 1 or memory.shape[0] != spec.size:
        raise ValueError(f"fips_kernels.{op}: the shared array must be 1-D with {spec.size} slots, "
                         f"got shape {tuple(memory.shape)}")
    if memory.dtype not in _FLOAT:
        raise TypeError(f"fips_kernels.{op}: the shared array must be floating point, got {memory.dtype}")


def _check_operand(op: str, what: str, t: torch.Tensor, features: int, memory: torch.Tensor, label: str) -> None:
    if t.dim() < 1 or t.shape[-1] != features:
        raise ValueError(f"fips_kernels.{op}: expected {what} of shape (*, {features}) ({label}={features}), "
                         f"got {tuple(t.shape)}")
    if t.dtype != memory.dtype:
        raise TypeError(f"fips_kernels.{op}: dtype mismatch: {what} is {t.dtype} but the shared array is "
                        f"{memory.dtype}")
    if t.device != memory.device:
        raise ValueError(f"fips_kernels.{op}: device mismatch: {what} is on {t.device} but the shared array "
                         f"is on {memory.device}")


def _check_linear(x, memory, bias, spec_list, scale) -> HashSpec:
    spec = _as_spec("hashed_linear", spec_list)
    _check_memory("hashed_linear", memory, spec)
    _check_operand("hashed_linear", "input", x, spec.in_features, memory, "in_features")
    if bias is not None:
        if tuple(bias.shape) != (spec.out_features,):
            raise ValueError(f"fips_kernels.hashed_linear: bias must have shape ({spec.out_features},), "
                             f"got {tuple(bias.shape)}")
        _check_operand("hashed_linear", "bias", bias, spec.out_features, memory, "out_features")
    return spec


def _rows(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1] if t.shape[-1] else 0


# ---------------------------------------------------------------- ops

@torch.library.custom_op("fips_kernels::hashed_linear", mutates_args=())
def _hashed_linear(x: torch.Tensor, memory: torch.Tensor, bias: Optional[torch.Tensor], spec: List[int],
                   scale: float) -> torch.Tensor:
    s = _check_linear(x, memory, bias, spec, scale)
    x2 = x.reshape(-1, s.in_features)
    y2 = _run("hashed_linear", s, x.dtype, x.device, x2.shape[0], x2, memory, bias, s, scale)
    return y2.reshape(*x.shape[:-1], s.out_features)


@_hashed_linear.register_fake
def _(x, memory, bias, spec, scale):
    s = _check_linear(x, memory, bias, spec, scale)
    return x.new_empty(*x.shape[:-1], s.out_features)


def _check_grad_input(grad, memory, spec_list) -> HashSpec:
    s = _as_spec("hashed_grad_input", spec_list)
    _check_memory("hashed_grad_input", memory, s)
    _check_operand("hashed_grad_input", "grad", grad, s.out_features, memory, "out_features")
    return s


@torch.library.custom_op("fips_kernels::hashed_grad_input", mutates_args=())
def _hashed_grad_input(grad: torch.Tensor, memory: torch.Tensor, spec: List[int], scale: float) -> torch.Tensor:
    s = _check_grad_input(grad, memory, spec)
    g2 = grad.reshape(-1, s.out_features)
    dx = _run("hashed_grad_input", s, grad.dtype, grad.device, g2.shape[0], g2, memory, s, scale)
    return dx.reshape(*grad.shape[:-1], s.in_features)


@_hashed_grad_input.register_fake
def _(grad, memory, spec, scale):
    s = _check_grad_input(grad, memory, spec)
    return grad.new_empty(*grad.shape[:-1], s.in_features)


def _check_grad_memory(grad, x, memory, spec_list) -> HashSpec:
    s = _as_spec("hashed_grad_memory", spec_list)
    _check_memory("hashed_grad_memory", memory, s)
    _check_operand("hashed_grad_memory", "grad", grad, s.out_features, memory, "out_features")
    _check_operand("hashed_grad_memory", "input", x, s.in_features, memory, "in_features")
    if grad.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"fips_kernels.hashed_grad_memory: grad {tuple(grad.shape)} and input {tuple(x.shape)} "
                         f"have different leading dimensions")
    return s


@torch.library.custom_op("fips_kernels::hashed_grad_memory", mutates_args=())
def _hashed_grad_memory(grad: torch.Tensor, x: torch.Tensor, memory: torch.Tensor, spec: List[int], scale: float,
                        deterministic: bool) -> torch.Tensor:
    s = _check_grad_memory(grad, x, memory, spec)
    g2 = grad.reshape(-1, s.out_features)
    x2 = x.reshape(-1, s.in_features)
    return _run("hashed_grad_memory", s, grad.dtype, grad.device, g2.shape[0], g2, x2, memory, s, scale,
                deterministic)


@_hashed_grad_memory.register_fake
def _(grad, x, memory, spec, scale, deterministic):
    _check_grad_memory(grad, x, memory, spec)
    return memory.new_empty(memory.shape)


@torch.library.custom_op("fips_kernels::hashed_weight", mutates_args=())
def _hashed_weight(memory: torch.Tensor, spec: List[int], scale: float) -> torch.Tensor:
    s = _as_spec("hashed_weight", spec)
    _check_memory("hashed_weight", memory, s)
    return _run("hashed_weight", s, memory.dtype, memory.device, 0, memory, s, scale)


@_hashed_weight.register_fake
def _(memory, spec, scale):
    s = _as_spec("hashed_weight", spec)
    _check_memory("hashed_weight", memory, s)
    return memory.new_empty(s.out_features, s.in_features)


def _check_scatter(grad_w, memory, spec_list) -> HashSpec:
    s = _as_spec("hashed_scatter", spec_list)
    _check_memory("hashed_scatter", memory, s)
    if tuple(grad_w.shape) != (s.out_features, s.in_features):
        raise ValueError(f"fips_kernels.hashed_scatter: the weight gradient must be "
                         f"({s.out_features}, {s.in_features}), got {tuple(grad_w.shape)}")
    if grad_w.device != memory.device:
        raise ValueError(f"fips_kernels.hashed_scatter: device mismatch: {grad_w.device} vs {memory.device}")
    return s


@torch.library.custom_op("fips_kernels::hashed_scatter", mutates_args=())
def _hashed_scatter(grad_w: torch.Tensor, memory: torch.Tensor, spec: List[int], scale: float,
                    deterministic: bool) -> torch.Tensor:
    s = _check_scatter(grad_w, memory, spec)
    return _run("hashed_scatter", s, grad_w.dtype, grad_w.device, 0, grad_w, memory, s, scale, deterministic)


@_hashed_scatter.register_fake
def _(grad_w, memory, spec, scale, deterministic):
    _check_scatter(grad_w, memory, spec)
    return memory.new_empty(memory.shape)


# ---------------------------------------------------------------- autograd

_local = threading.local()


@contextlib.contextmanager
def deterministic_gradients(enabled: bool = True) -> Iterator[None]:
    """Inside the block, the array gradients of hashed layers are computed
    without atomics (bitwise reproducible), or with them (``enabled=False``)."""
    previous = getattr(_local, "deterministic", None)
    _local.deterministic = bool(enabled)
    try:
        yield
    finally:
        _local.deterministic = previous


def deterministic_enabled() -> bool:
    """:func:`deterministic_gradients` if set, else
    ``torch.are_deterministic_algorithms_enabled()`` or ``FIPS_KERNELS_DETERMINISTIC=1``."""
    local = getattr(_local, "deterministic", None)
    if local is not None:
        return local
    return torch.are_deterministic_algorithms_enabled() or \
        os.environ.get(DETERMINISTIC_ENV, "").strip().lower() in ("1", "true", "yes")


def _setup_linear(ctx, inputs, output):
    x, memory, bias, spec, scale = inputs
    ctx.save_for_backward(x, memory)
    ctx.spec, ctx.scale, ctx.has_bias = list(spec), float(scale), bias is not None


def _linear_backward(ctx, grad):
    x, memory = ctx.saved_tensors
    need_x, need_m, need_b = ctx.needs_input_grad[:3]
    gx = gm = gb = None
    if need_x:
        gx = torch.ops.fips_kernels.hashed_grad_input(grad, memory, ctx.spec, ctx.scale)
    if need_m:
        gm = torch.ops.fips_kernels.hashed_grad_memory(grad, x, memory, ctx.spec, ctx.scale, deterministic_enabled())
    if need_b and ctx.has_bias:
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        gb = grad.reshape(-1, grad.shape[-1]).to(acc).sum(0).to(grad.dtype)
    return gx, gm, gb, None, None


def _setup_weight(ctx, inputs, output):
    memory, spec, scale = inputs
    ctx.save_for_backward(memory)
    ctx.spec, ctx.scale = list(spec), float(scale)


def _weight_backward(ctx, grad):
    (memory,) = ctx.saved_tensors
    gm = torch.ops.fips_kernels.hashed_scatter(grad.contiguous(), memory, ctx.spec, ctx.scale,
                                               deterministic_enabled())
    return gm, None, None


_hashed_linear.register_autograd(_linear_backward, setup_context=_setup_linear)
_hashed_weight.register_autograd(_weight_backward, setup_context=_setup_weight)


# ---------------------------------------------------------------- public helpers

def hashed_linear(x: torch.Tensor, memory: torch.Tensor, spec: HashSpec, scale: float,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x·Wᵀ + b`` with ``W = λ·s ⊙ mem[idx]`` through the dispatched op.

    Args:
        x: ``(*, in_features)``, same dtype and device as ``memory``.
        memory: the shared array ``(m,)``.
        spec: the layer's :class:`~fips_kernels.hashed.mapping.HashSpec`.
        scale: λ.
        bias: ``(out_features,)`` or None.
    """
    return torch.ops.fips_kernels.hashed_linear(x, memory, bias, spec.to_list(), float(scale))


def hashed_weight(memory: torch.Tensor, spec: HashSpec, scale: float) -> torch.Tensor:
    """The materialised ``W (out × in)`` (differentiable) through the dispatched op."""
    return torch.ops.fips_kernels.hashed_weight(memory, spec.to_list(), float(scale))
