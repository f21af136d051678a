"""The ``cpu`` backend: the FiPS ops on CPU tensors with the compiled kernels of
``csrc/cpu`` (``fips_kernels._cpu``) for bitmap factors and torch GEMMs for
dense ones (:mod:`.kernels`). It is what dispatch picks for CPU tensors in
compressed mode; the speed mode (:mod:`fips_kernels.cpu`) rebuilds a layer's
weight once with this backend's ``reconstruct``. fp64 stays on the reference
backend (the truth of the tests), as do the formats listed as unsupported."""
from __future__ import annotations

from typing import Callable, List

import torch

from .. import _extension, dispatch

__all__ = ["CpuBackend", "BACKEND"]


class CpuBackend(dispatch.Backend):
    name = "cpu"
    ops = dispatch.FIPS_OPS
    device_types = ("cpu",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)  # fp32 arithmetic, the input's dtype out
    formats = ("bitmap", "dense")

    def problem_reasons(self, p) -> List[str]:
        if p.fmt != "bitmap":
            return []
        reasons = []
        if not _extension.CPU.available():
            reasons.append(f"the CPU kernels are not available: {_extension.CPU.error()}")
        tk, tn = p.layout.params.tile
        if not 1 <= tk <= 64 or tn not in (32, 64):
            reasons.append(f"the CPU kernel takes bitmap tiles of 1..64 rows and 32 or 64 columns, got ({tk}, {tn})")
        return reasons

    def kernel(self, op: str) -> Callable:
        from . import kernels

        return {"expand": kernels.expand, "contract": kernels.contract, "gate_up": kernels.gate_up,
                "reconstruct": kernels.reconstruct}[op]


BACKEND = dispatch.register(CpuBackend())
