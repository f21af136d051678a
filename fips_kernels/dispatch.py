"""Backends in priority order, each able to say why it cannot run a problem.

``cuda`` (compiled extension), ``triton`` and ``reference`` are asked in
that order; the first with no reasons runs. ``FIPS_KERNELS_BACKEND`` (or the
:func:`use_backend` context manager, which wins over the variable) forces one;
forcing a backend that cannot run raises :class:`BackendUnavailable` listing
its reasons, never a silent fallback.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = [
    "Problem",
    "Backend",
    "BackendUnavailable",
    "BACKENDS",
    "backend_names",
    "not_supported_reasons",
    "select",
    "explain",
    "use_backend",
    "forced_backend",
]

ENV_VAR = "FIPS_KERNELS_BACKEND"
OPS = ("expand", "contract", "gate_up", "reconstruct")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the problem; the message lists why."""


@dataclass(frozen=True)
class Problem:
    """What a backend needs to know to decide whether it can run an op call.

    ``M`` is the number of input rows (0 for ``reconstruct``); ``K × N`` is the
    reduction-major sparse factor, ``d × r`` the base.
    """

    op: str
    fmt: str
    dtype: torch.dtype
    device: torch.device
    M: int
    K: int
    N: int
    d: int
    r: int
    meta: Tuple[int, ...] = ()
    kind: str = ""  # expand / contract (the layer's orientation; op names it for layer ops)
    base_quantized: bool = False  # U is int8 with per-column scales

    @property
    def quantized(self) -> bool:
        """The factor's values are int8/int4 (``meta`` carries ``[qbits, qgroup]``)."""
        return len(self.meta) == 6 and self.meta[4] != 0

    @property
    def orientation(self) -> str:
        return self.kind or ("contract" if self.op == "contract" else "expand")


class Backend:
    """One implementation of the ops. Subclasses fill :attr:`kernels` and
    :meth:`_reasons`; :meth:`not_supported_reasons` is what dispatch asks.

    Kernel signatures (``x2`` 2-D, factors are
    :class:`~fips_kernels.formats.SparseFactor`): ``expand(x2, U, factor, bias,
    activation) -> y2``, ``contract(x2, U, factor, bias) -> y2``,
    ``gate_up(x2, U, gate, up, bias_gate, bias_up) -> y2`` and
    ``reconstruct(U, factor, kind)``, which returns the layer's torch-layout weight.
    """

    name = "?"

    def __init__(self) -> None:
        self.kernels: Dict[Tuple[str, str], Callable] = {}

    def _reasons(self, p: Problem) -> List[str]:
        return []

    def not_supported_reasons(self, p: Problem) -> List[str]:
        reasons = list(self._reasons(p))
        if not reasons and (p.op, p.fmt) not in self.kernels and (p.op, "*") not in self.kernels:
            reasons.append(f"no {self.name} kernel for op {p.op!r} with the {p.fmt!r} format yet")
        return reasons

    def kernel(self, op: str, fmt: str) -> Callable:
        return self.kernels.get((op, fmt)) or self.kernels[(op, "*")]

    def __repr__(self) -> str:
        return f"<{self.name} backend>"


class ReferenceBackend(Backend):
    """Pure PyTorch (``fips_kernels.reference``): runs everywhere, every format."""

    name = "reference"

    def __init__(self) -> None:
        super().__init__()
        from . import reference

        self.kernels = {("expand", "*"): reference.expand, ("contract", "*"): reference.contract,
                        ("gate_up", "*"): reference.gate_up, ("reconstruct", "*"): reference.linear_weight}


class TritonBackend(Backend):
    """Triton kernels on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``,
    which must be set before ``fips_kernels`` first dispatches)."""

    name = "triton"
    FORMATS = ("dense", "nm", "bitmap", "ell")

    def __init__(self) -> None:
        super().__init__()
        self.import_error: Optional[str] = None
        self.interpreted = False
        try:
            from .triton import sparse_matmul, strategies
        except Exception as exc:  # triton missing or broken: the reasons say so
            self.import_error = f"{type(exc).__name__}: {exc}"
            return
        self.interpreted = sparse_matmul.INTERPRETED
        for fmt in self.FORMATS:
            for op in OPS:
                if fmt == "ell" and op == "gate_up":
                    continue  # no fused gate/up for tile-reconstruct: the reference runs it
                self.kernels[(op, fmt)] = getattr(strategies, op)

    def _reasons(self, p: Problem) -> List[str]:
        reasons = []
        if self.import_error is not None:
            reasons.append(f"triton kernels could not be imported ({self.import_error})")
        if p.device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                reasons.append("input is on the CPU and TRITON_INTERPRET=1 is not set")
            elif self.import_error is None and not self.interpreted:
                reasons.append("the Triton kernels were imported before TRITON_INTERPRET=1 was set")
        elif p.device.type != "cuda":
            reasons.append(f"device {p.device} is not supported (needs cuda)")
        if p.dtype not in KERNEL_DTYPES:
            reasons.append(f"dtype {p.dtype} is not supported (needs float16, bfloat16 or float32)")
        if p.fmt == "ell" and len(p.meta) == 4:
            want = 0 if p.orientation == "expand" else 1
            if p.meta[3] != want:
                reasons.append(f"tile-reconstruct needs a {p.orientation} ell factor's lists along the rank "
                               f"axis (axis {want}), got axis {p.meta[3]}")
        if p.fmt == "bitmap" and len(p.meta) == 4:
            tk, tn = p.meta[2], p.meta[3]
            if tk < 16 or tk & (tk - 1) or tn & (tn - 1):
                reasons.append(f"bitmap tile ({tk}, {tn}) is not a power of two >= 16 in both axes")
        return reasons


class CudaBackend(Backend):
    """The compiled CUDA C++ extension (``csrc/``): ``fips_kernels_cuda::sparse_mm``
    (fp16/bf16 tensor cores, float or int8/int4 factors and an int8 base
    dequantised in registers) under the strategies of :mod:`fips_kernels.cuda`."""

    name = "cuda"
    MIN_CAPABILITY = (8, 0)
    FORMATS = ("dense", "nm", "bitmap")
    DTYPES = (torch.float16, torch.bfloat16)
    BITMAP_TILE = (64, 64)

    def __init__(self) -> None:
        super().__init__()
        from .cuda import spmm, strategies  # never touch the extension on import: safe without it

        self._spmm = spmm
        for fmt in self.FORMATS:
            for op in OPS:
                self.kernels[(op, fmt)] = getattr(strategies, op)

    def _reasons(self, p: Problem) -> List[str]:
        reasons = []
        missing = self._spmm.unavailable_reason()
        if missing is not None:
            reasons.append(missing)
        if p.device.type != "cuda":
            reasons.append(f"input is on {p.device}, not a CUDA device")
        elif torch.cuda.is_available():
            cap = tuple(torch.cuda.get_device_capability(p.device))
            if cap < self.MIN_CAPABILITY:
                reasons.append(f"GPU compute capability {cap[0]}.{cap[1]} is below "
                               f"{self.MIN_CAPABILITY[0]}.{self.MIN_CAPABILITY[1]}: needs sm80+ for mma.sync bf16")
        if p.dtype not in self.DTYPES:
            reasons.append(f"dtype {p.dtype} is not supported: the cuda kernels run fp16/bf16 tensor cores "
                           f"(float32 runs on triton)")
        if p.fmt not in self.FORMATS:
            reasons.append(f"no cuda kernel for format {p.fmt!r} (the cuda backend runs {', '.join(self.FORMATS)})")
        if p.fmt == "bitmap" and len(p.meta) >= 4 and (p.meta[2], p.meta[3]) != self.BITMAP_TILE:
            reasons.append(f"bitmap tile ({p.meta[2]}, {p.meta[3]}) is not supported by the cuda kernel "
                           f"(only {self.BITMAP_TILE[0]}x{self.BITMAP_TILE[1]})")
        return reasons


BACKENDS: Dict[str, Backend] = {}


def _registry() -> Dict[str, Backend]:
    if not BACKENDS:
        for cls in (CudaBackend, TritonBackend, ReferenceBackend):
            BACKENDS[cls.name] = cls()
    return BACKENDS


def backend_names() -> Tuple[str, ...]:
    """Backends in priority order."""
    return tuple(_registry())


def register_kernel(backend: str, op: str, fmt: str, fn: Callable) -> None:
    """Add a kernel to a backend (used by ``fips_kernels.triton`` and tests)."""
    _registry()[backend].kernels[(op, fmt)] = fn


_local = threading.local()


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend inside a ``with`` block (``None`` restores automatic choice)."""
    if name is not None and name not in _registry():
        raise ValueError(f"unknown backend {name!r}; choose from {backend_names()}")
    previous = getattr(_local, "forced", "unset")
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = previous


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or ``FIPS_KERNELS_BACKEND``, if any."""
    forced = getattr(_local, "forced", "unset")
    if forced != "unset":
        return forced
    name = os.environ.get(ENV_VAR, "").strip().lower() or None
    if name is not None and name not in _registry():
        raise BackendUnavailable(f"{ENV_VAR}={name!r} is not a backend; choose from {backend_names()}")
    return name


def not_supported_reasons(p: Problem) -> Dict[str, List[str]]:
    """Every backend's reasons for ``p`` (an empty list means it can run)."""
    return {name: b.not_supported_reasons(p) for name, b in _registry().items()}


def select(p: Problem) -> Backend:
    """The backend that runs ``p``: the forced one, or the first with no reasons."""
    forced = forced_backend()
    registry = _registry()
    if forced is not None:
        backend = registry[forced]
        reasons = backend.not_supported_reasons(p)
        if reasons:
            raise BackendUnavailable(
                f"backend {forced!r} was forced but cannot run {p.op} ({p.fmt}, {p.dtype}, {p.device}, "
                f"M={p.M}, K={p.K}, N={p.N}):\n  - " + "\n  - ".join(reasons))
        return backend
    for backend in registry.values():
        if not backend.not_supported_reasons(p):
            return backend
    raise BackendUnavailable("no backend can run " + repr(p))  # pragma: no cover - reference runs all


def explain(p: Problem) -> str:
    """A readable table of which backend would run ``p`` and why the others cannot."""
    lines = []
    chosen = None
    for name, reasons in not_supported_reasons(p).items():
        if not reasons and chosen is None:
            chosen = name
        mark = "runs" if name == chosen else ("could run" if not reasons else "cannot run")
        lines.append(f"{name:10s} {mark}" + "".join(f"\n{'':11s}- {r}" for r in reasons))
    return "\n".join(lines)
