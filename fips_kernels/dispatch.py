"""One priority runner over the registered backends, for the FiPS ops and the
hashed ops alike.

Each backend (a package: ``cuda/``, ``cpu/``, ``triton/``, ``reference/`` — see
:data:`BACKEND_PACKAGES`) declares once what it supports — ops, device types,
dtypes, factor formats — and answers ``not_supported_reasons(problem)`` with
those checks plus its own per-problem hook (:meth:`Backend.problem_reasons`:
a strategy that cannot run, a tile the kernel cannot take …). The first
backend in priority order with no reasons runs. ``FIPS_KERNELS_BACKEND`` (or
the :func:`use_backend` context manager, which wins over the variable) forces
one; forcing a backend that cannot run raises :class:`BackendUnavailable`
listing its reasons, never a silent fallback.

Problems are small records: :class:`Problem` for a FiPS layer op
(``expand``, ``contract``, ``gate_up``, ``reconstruct``) and
``fips_kernels.hashed.ops.HashedProblem`` for the hashed ops.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .formats import Layout

__all__ = [
    "Problem",
    "Backend",
    "BackendUnavailable",
    "BACKEND_PACKAGES",
    "FIPS_OPS",
    "backend",
    "backends",
    "backend_names",
    "register",
    "not_supported_reasons",
    "select",
    "explain",
    "use_backend",
    "forced_backend",
    "prepare",
]

ENV_VAR = "FIPS_KERNELS_BACKEND"
# Priority order: each is a subpackage of fips_kernels whose ``backend`` module registers one Backend.
BACKEND_PACKAGES = ("cuda", "cpu", "triton", "reference")
FIPS_OPS = ("expand", "contract", "gate_up", "reconstruct")


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the problem; the message lists why."""


@dataclass(frozen=True)
class Problem:
    """A FiPS op call, as far as choosing a backend needs to know it.

    ``op`` is ``expand``, ``contract``, ``gate_up`` or ``reconstruct``;
    ``kind`` the layer's orientation (``expand``/``contract``); ``layout`` the
    factor's :class:`~fips_kernels.formats.Layout` (format, ``(K, N)``, typed
    parameters, quantisation); ``dtype`` the arithmetic dtype; ``M`` the input
    rows (0 for ``reconstruct``); ``d`` the base's rows (``U`` is ``d × r``).
    """

    op: str
    kind: str
    layout: Layout
    dtype: torch.dtype
    device: torch.device
    M: int
    d: int
    activation: str = "none"

    family = "fips"

    @classmethod
    def for_layer(cls, op: str, kind: str, layout: Layout, dtype: torch.dtype, device, M: int, d: int,
                  activation: str = "none") -> "Problem":
        return cls(op, kind, layout, dtype, torch.device(device), int(M), int(d), activation or "none")

    @property
    def fmt(self) -> str:
        return self.layout.format

    @property
    def K(self) -> int:
        return self.layout.shape[0]

    @property
    def N(self) -> int:
        return self.layout.shape[1]

    @property
    def r(self) -> int:
        return self.K if self.kind == "expand" else self.N

    def describe(self) -> str:
        q = f" int{self.layout.quant.bits}" if self.layout.quant else ""
        return (f"{self.op} ({self.fmt} {self.layout.pattern()}{q}, {self.dtype}, {self.device}, M={self.M}, "
                f"K={self.K}, N={self.N})")


class Backend:
    """One implementation of the ops. A subclass declares what it supports in
    the class attributes, adds per-problem reasons in :meth:`problem_reasons`,
    says why it is unavailable at all in :meth:`availability_reasons`, and
    returns the callable of an op from :meth:`kernel`.

    Kernel signatures (``x2`` 2-D, factors are
    :class:`~fips_kernels.formats.SparseFactor`, ``U`` a float tensor or an
    int8 dense factor): ``expand(x2, U, factor, bias, activation) -> y2``,
    ``contract(x2, U, factor, bias) -> y2``, ``gate_up(x2, U, gate, up,
    bias_gate, bias_up) -> y2``, ``reconstruct(U, factor, kind)`` (the layer's
    torch-layout weight); the hashed ops as in :mod:`fips_kernels.hashed.ops`.
    """

    name = "?"
    ops: Tuple[str, ...] = ()                 # op names it has kernels for
    device_types: Tuple[str, ...] = ()        # e.g. ("cuda",)
    dtypes: Tuple[torch.dtype, ...] = ()      # arithmetic dtypes
    formats: Optional[Tuple[str, ...]] = None  # FiPS factor formats (None: every registered format)

    def availability_reasons(self) -> List[str]:
        """Why this backend cannot run anything here (missing library, extension …)."""
        return []

    def device_reasons(self, device: torch.device) -> List[str]:
        if device.type not in self.device_types:
            return [f"input is on {device}, not a {' or '.join(self.device_types)} device"]
        return []

    def problem_reasons(self, p) -> List[str]:
        """The backend's own reasons for one problem (the extra-reasons hook)."""
        return []

    def not_supported_reasons(self, p) -> List[str]:
        """Every reason this backend cannot run ``p`` (empty: it can)."""
        reasons = list(self.availability_reasons())
        if p.op not in self.ops:
            reasons.append(f"no {self.name} kernel for op {p.op!r}")
        reasons += self.device_reasons(p.device)
        if p.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {p.dtype} is not supported (needs {names})")
        if getattr(p, "family", "") == "fips" and self.formats is not None and p.fmt not in self.formats:
            reasons.append(f"no {self.name} kernel for the {p.fmt!r} format (it runs {', '.join(self.formats)})")
        if not reasons:
            reasons += self.problem_reasons(p)
        return reasons

    def kernel(self, op: str) -> Callable:
        raise NotImplementedError

    def strategies(self):
        """The backend's :class:`~fips_kernels.strategies.StrategySet`, or None
        (a backend with one way of computing each op)."""
        return None

    def prepare(self, layer) -> int:
        """Pack ahead of time what a first call would pack (see
        :func:`fips_kernels.modules.prepare`); returns the bytes added."""
        return 0

    def __repr__(self) -> str:
        return f"<{self.name} backend>"


_REGISTRY: Dict[str, Backend] = {}
_lock = threading.Lock()


def register(b: Backend) -> Backend:
    """Register a backend (its package's ``backend`` module calls this on import)."""
    _REGISTRY[b.name] = b
    return b


def backends() -> Dict[str, Backend]:
    """The backends by name, in priority order (their packages imported on first use;
    importing a backend package never imports Triton or touches the extension)."""
    if len(_REGISTRY) < len(BACKEND_PACKAGES):
        with _lock:
            for pkg in BACKEND_PACKAGES:
                importlib.import_module(f"fips_kernels.{pkg}.backend")
    return {name: _REGISTRY[name] for name in BACKEND_PACKAGES if name in _REGISTRY}


def backend(name: str) -> Backend:
    table = backends()
    if name not in table:
        raise ValueError(f"unknown backend {name!r}; choose from {tuple(table)}")
    return table[name]


def backend_names() -> Tuple[str, ...]:
    """Backends in priority order."""
    return tuple(backends())


_local = threading.local()


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend inside a ``with`` block (``None`` restores automatic choice)."""
    if name is not None:
        backend(name)
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
    if name is not None and name not in backends():
        raise BackendUnavailable(f"{ENV_VAR}={name!r} is not a backend; choose from {backend_names()}")
    return name


def not_supported_reasons(p) -> Dict[str, List[str]]:
    """Every backend's reasons for ``p`` (an empty list means it can run)."""
    return {name: b.not_supported_reasons(p) for name, b in backends().items()}


def select(p) -> Backend:
    """The backend that runs ``p``: the forced one, or the first with no reasons."""
    forced = forced_backend()
    if forced is not None:
        b = backends()[forced]
        reasons = b.not_supported_reasons(p)
        if reasons:
            raise BackendUnavailable(f"backend {forced!r} was forced but cannot run {p.describe()}:\n  - "
                                     + "\n  - ".join(reasons))
        return b
    for b in backends().values():
        if not b.not_supported_reasons(p):
            return b
    raise BackendUnavailable(f"no backend can run {p.describe()}")  # pragma: no cover - reference runs all


def explain(p) -> str:
    """A readable table of which backend would run ``p`` and why the others cannot;
    a forced backend is marked, and one that cannot run says so."""
    forced = forced_backend()
    lines = []
    chosen = None
    for name, reasons in not_supported_reasons(p).items():
        if forced is not None:
            runs = name == forced and not reasons
        else:
            runs = not reasons and chosen is None
        if runs:
            chosen = name
        if name == forced and reasons:
            mark = "forced, cannot run (calls raise BackendUnavailable)"
        elif runs:
            mark = "runs (forced)" if name == forced else "runs"
        else:
            mark = "could run" if not reasons else "cannot run"
        lines.append(f"{name:10s} {mark}" + "".join(f"\n{'':11s}- {r}" for r in reasons))
    return "\n".join(lines)


def prepare(layer, name: Optional[str] = None) -> int:
    """Ask the backends (or one) to pack ``layer`` ahead of time; returns bytes added."""
    table = backends()
    chosen = [table[name]] if name is not None else list(table.values())
    return sum(b.prepare(layer) for b in chosen)
