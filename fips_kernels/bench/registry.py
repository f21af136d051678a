"""The layer benchmark's provider registry and the role of every provider.

A *provider* is one way of computing a layer. Each declares its **role**,
written into the ``role`` column of every benchmark CSV and read by
``benchmarks/report.py``:

* ``ours`` — this package's code (``fips``, ``reference``, ``triton_*``,
  ``cuda_*``, ``hashed_*``): a failure or a wrong output fails the run;
* ``peer`` — what a user would otherwise run (:mod:`.peers`);
* ``baseline`` — dense ``F.linear``, the denominator of every speed-up.

Our own providers live in :mod:`.providers` (and :mod:`.hashed_providers`),
the peers and the baseline in :mod:`.peers`; both register here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Union

import torch

__all__ = ["ROLES", "OURS", "PEER", "BASELINE", "Prepared", "Provider", "PROVIDERS", "register"]

OURS, PEER, BASELINE = "ours", "peer", "baseline"
ROLES = (OURS, PEER, BASELINE)


@dataclass
class Prepared:
    """A provider ready to run one layer.

    Attributes:
        run: ``y = run(x)`` for a 2-D input ``(M, in_features)``.
        weight_bytes: bytes of everything the provider stores for the layer
            (weights, indices, metadata, bias) — all of it is read per call.
        flops: ``M -> arithmetic of one call``.
        backend: a name, or ``M -> name`` (what actually runs).
        same_layer: the output is the FiPS layer's (so it is checked against
            the fp32 reference); False for the dense baseline's random weights.
    """

    run: Callable[[torch.Tensor], torch.Tensor]
    weight_bytes: int
    flops: Callable[[int], int]
    backend: Union[str, Callable[[int], str]] = "torch"
    same_layer: bool = True

    def backend_for(self, M: int) -> str:
        return self.backend(M) if callable(self.backend) else self.backend


class Provider:
    """One way of computing a layer. Subclasses set :attr:`name`, :attr:`role`
    and implement :meth:`prepare`; :meth:`not_supported_reasons` lists why it
    cannot run (an empty list: it can)."""

    name = "?"
    description = ""
    role = PEER

    @property
    def ours(self) -> bool:
        """This package's own implementation: a failure or wrong output fails ``fips-kernels bench``."""
        return self.role == OURS

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype, pattern: str) -> List[str]:
        return []

    def prepare(self, case) -> Prepared:
        """The layer face: a :class:`Prepared` for one :class:`~.cases.LayerCase`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.role} provider {self.name}>"


PROVIDERS: Dict[str, Provider] = {}


def register(cls):
    """Class decorator: add a provider (in definition order) to :data:`PROVIDERS`."""
    if cls.name in PROVIDERS:
        raise ValueError(f"provider {cls.name!r} is registered twice")
    if cls.role not in ROLES:
        raise ValueError(f"provider {cls.name!r}: role {cls.role!r} is not one of {ROLES}")
    PROVIDERS[cls.name] = cls()
    return cls
