"""The strategy template every kernel backend uses (DESIGN §2): which way a FiPS
layer is computed, chosen by M from the measured crossovers.

* **factored** (small and medium M): expand ``z = x·U`` then ``y = act(z·B + b)``
  with ``B`` decompressed on chip; contract ``z = x·B`` then ``y = z·Uᵀ + b``.
  The bytes moved are the compressed bytes.
* **reconstruct** (large M, compute-bound): ``W = U·B`` rebuilt once per call
  into a reusable workspace, then one dense GEMM.
* backend extras (a :class:`Strategy` subclass each): Triton's
  ``tile_reconstruct`` for ``ell`` factors, CUDA's ``sparse24`` (2:4 sparse
  tensor cores at large M).

A backend supplies a :class:`Matmul` — its sparse product ``act(A·B + b)``,
the gated product, the weight builder, and the reasons each cannot run a
factor — and a list of strategies; :class:`StrategySet` turns that into the
op kernels dispatch calls. The choice: the strategies of the regime the M
falls in (``reconstruct_min_m`` in :mod:`fips_kernels.tuning`), in the
backend's order, the first without reasons; then those of the other regime.
``FIPS_KERNELS_STRATEGY`` forces one (a strategy the backend lacks, or one
that cannot run the call, raises ``ValueError`` with the reasons).

Quantised factors and an int8 base (a quantised dense factor ``U (d × r)``
with one scale per column) go through the same products: the backend's
kernels dequantise in registers.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .dispatch import Problem
from .formats import Layout, SparseFactor
from .ops import base_matrix
from .reference import activate
from .tuning import STRATEGY_ENV, forced_strategy, reconstruct_min_m

__all__ = ["Matmul", "Strategy", "Factored", "Reconstruct", "StrategySet", "Base"]

Base = Union[torch.Tensor, SparseFactor]  # float U, or int8 U as a quantised dense factor


class Matmul:
    """A backend's products, for the strategies. Subclasses implement all four."""

    def sparse_reasons(self, layout: Layout, transpose: bool = False) -> List[str]:
        """Why :meth:`sparse` cannot take this factor (``transpose``: ``A·Bᵀ``)."""
        raise NotImplementedError

    def sparse(self, a: torch.Tensor, factor: SparseFactor, bias: Optional[torch.Tensor] = None,
               activation: str = "none", transpose: bool = False) -> torch.Tensor:
        """``act(a·B + bias)`` (``a·Bᵀ`` with ``transpose``), ``B`` decompressed on chip."""
        raise NotImplementedError

    def gated_reasons(self, layout: Layout) -> List[str]:
        return self.sparse_reasons(layout)

    def gated(self, a: torch.Tensor, gate: SparseFactor, up: SparseFactor, bias_gate: Optional[torch.Tensor],
              bias_up: Optional[torch.Tensor]) -> torch.Tensor:
        """``silu(a·B_g + b_g) * (a·B_u + b_u)``, both factors decoded in one K loop."""
        raise NotImplementedError

    def weight_reasons(self, layout: Layout, kind: str) -> List[str]:
        """Why :meth:`weight_dh` cannot build this layer's weight."""
        raise NotImplementedError

    def weight_dh(self, U: torch.Tensor, factor: SparseFactor, kind: str, reuse: bool = False) -> torch.Tensor:
        """``U·V`` as ``(d × h)`` (expand: ``U·B``; contract: ``U·Bᵀ``; may be a
        transposed view) from a float ``U``; ``reuse``: the result is used once,
        so a reusable workspace (:mod:`fips_kernels.workspaces`) may hold it."""
        raise NotImplementedError


def x_times_base(mm: Matmul, x2: torch.Tensor, U: Base) -> torch.Tensor:
    """``z = x·U`` (cuBLAS for a float base; in-register dequantisation for int8)."""
    return mm.sparse(x2, U) if isinstance(U, SparseFactor) else torch.mm(x2, U)


def z_times_base_t(mm: Matmul, z: torch.Tensor, U: Base, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y = z·Uᵀ + b``."""
    return mm.sparse(z, U, bias, transpose=True) if isinstance(U, SparseFactor) else F.linear(z, U, bias)


class Strategy:
    """One way to compute a layer. ``regime``: ``"small"`` or ``"large"`` M."""

    name = "?"
    regime = "small"

    def __init__(self, mm: Matmul):
        self.mm = mm

    def reasons(self, p: Problem) -> List[str]:
        raise NotImplementedError

    def expand(self, x2, U: Base, factor: SparseFactor, bias, activation: str, strict: bool = False
               ) -> torch.Tensor:
        """``act((x·U)·B + b)``. ``strict``: the strategy was forced, so a strategy that
        would otherwise fall back at run time raises instead."""
        raise NotImplementedError

    def contract(self, x2, U: Base, factor: SparseFactor, bias, strict: bool = False) -> torch.Tensor:
        raise NotImplementedError


class Factored(Strategy):
    """``z = x·U`` then the sparse product (expand); the sparse product then ``z·Uᵀ`` (contract)."""

    name = "factored"
    regime = "small"

    def reasons(self, p):
        return self.mm.sparse_reasons(p.layout)

    def expand(self, x2, U, factor, bias, activation, strict=False):
        return self.mm.sparse(x_times_base(self.mm, x2, U), factor, bias, activation)

    def contract(self, x2, U, factor, bias, strict=False):
        return z_times_base_t(self.mm, self.mm.sparse(x2, factor), U, bias)


class Reconstruct(Strategy):
    """``W = U·B`` once per call into a reused workspace, then one dense GEMM."""

    name = "reconstruct"
    regime = "large"

    def reasons(self, p):
        return self.mm.weight_reasons(p.layout, p.kind)

    def expand(self, x2, U, factor, bias, activation, strict=False):
        W = self.mm.weight_dh(base_matrix(U), factor, "expand", reuse=True)
        return activate(F.linear(x2, W.t(), bias), activation)

    def contract(self, x2, U, factor, bias, strict=False):
        return F.linear(x2, self.mm.weight_dh(base_matrix(U), factor, "contract", reuse=True), bias)


class StrategySet:
    """A backend's strategies, in its order, as the op kernels dispatch calls."""

    def __init__(self, backend: str, mm: Matmul, strategies: Sequence[Strategy]):
        self.backend = backend
        self.mm = mm
        self.strategies = list(strategies)
        self.by_name = {s.name: s for s in self.strategies}

    @property
    def names(self):
        return tuple(self.by_name)

    def _problem(self, op, x2, U, factor, activation="none") -> Problem:
        return Problem.for_layer(op, op, factor.layout, factor.dtype, factor.device, x2.shape[0], U.shape[0],
                                 activation)

    def choose(self, p: Problem, forced: Optional[str] = None) -> Strategy:
        """The strategy that runs ``p`` (see the module docstring)."""
        forced = forced_strategy(forced)
        if forced:
            if forced not in self.by_name:
                raise ValueError(f"{STRATEGY_ENV}={forced!r} is not a strategy of the {self.backend} backend, "
                                 f"which runs this call; choose one of {self.names} (or force another backend)")
            why = self.by_name[forced].reasons(p)
            if why:
                raise ValueError(f"{STRATEGY_ENV}={forced!r} cannot run this {p.kind} layer on the {self.backend} "
                                 f"backend:\n  - " + "\n  - ".join(why))
            return self.by_name[forced]
        large = p.M >= reconstruct_min_m(p.device, p.kind, p.layout, p.d, backend=self.backend)
        regime = "large" if large else "small"
        ordered = [s for s in self.strategies if s.regime == regime] + \
                  [s for s in self.strategies if s.regime != regime]
        for s in ordered:
            if not s.reasons(p):
                return s
        raise ValueError(f"no {self.backend} strategy can run {p.describe()}: " + self.reasons(p)[0])

    def reasons(self, p: Problem) -> List[str]:
        """Why no strategy of this backend can run ``p`` (empty: one can)."""
        if p.op == "gate_up":
            return self.mm.gated_reasons(p.layout)
        if p.op == "reconstruct":
            return self.mm.weight_reasons(p.layout, p.kind)
        per = [(s.name, s.reasons(p)) for s in self.strategies]
        if any(not why for _, why in per):
            return []
        return ["no strategy can run it: " + "; ".join(f"{name}: {', '.join(why)}" for name, why in per)]

    # ---- the op kernels ----------------------------------------------------
    def expand(self, x2, U: Base, factor: SparseFactor, bias, activation: str = "none",
               strategy: Optional[str] = None) -> torch.Tensor:
        """``act((x·U)·B + b)``; x2 ``(M, d)`` → ``(M, h)``."""
        act = activation or "none"
        s = self.choose(self._problem("expand", x2, U, factor, act), strategy)
        return s.expand(x2, U, factor, bias, act, strict=bool(forced_strategy(strategy)))

    def contract(self, x2, U: Base, factor: SparseFactor, bias, strategy: Optional[str] = None) -> torch.Tensor:
        """``(x·B)·Uᵀ + b``; x2 ``(M, h)`` → ``(M, d)``."""
        s = self.choose(self._problem("contract", x2, U, factor), strategy)
        return s.contract(x2, U, factor, bias, strict=bool(forced_strategy(strategy)))

    def gate_up(self, x2, U: Base, gate: SparseFactor, up: SparseFactor, bias_gate, bias_up) -> torch.Tensor:
        """``silu(z·B_g + b_g) * (z·B_u + b_u)`` with ``z = x·U`` computed once and
        both factors decoded in one K loop (always factored)."""
        return self.mm.gated(x_times_base(self.mm, x2, U), gate, up, bias_gate, bias_up)

    def reconstruct(self, U: Base, factor: SparseFactor, kind: str) -> torch.Tensor:
        """The torch-layout weight (``out × in``), contiguous."""
        W = self.mm.weight_dh(base_matrix(U), factor, kind)
        return W.t().contiguous() if kind == "expand" else W.contiguous()

    def kernels(self) -> dict:
        return {"expand": self.expand, "contract": self.contract, "gate_up": self.gate_up,
                "reconstruct": self.reconstruct}
