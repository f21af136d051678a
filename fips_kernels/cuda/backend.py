"""The ``cuda`` backend: the compiled CUDA C++ extension (``csrc/``,
``fips_kernels_cuda::sparse_mm`` — fp16/bf16 tensor cores, float or int8/int4
factors and an int8 base dequantised in registers) under the strategies of
:mod:`.strategies`, on sm80+ GPUs. Importing this module never touches the
extension: a missing one is a reason."""
from __future__ import annotations

from typing import Callable, List

import torch

from .. import dispatch
from . import sparse24, spmm

__all__ = ["CudaBackend", "BACKEND"]


class CudaBackend(dispatch.Backend):
    name = "cuda"
    ops = dispatch.FIPS_OPS
    device_types = ("cuda",)
    dtypes = spmm.KERNEL_DTYPES  # fp16/bf16 tensor cores (float32 runs on triton)
    formats = spmm.FORMATS
    MIN_CAPABILITY = (8, 0)

    def availability_reasons(self) -> List[str]:
        missing = spmm.unavailable_reason()
        return [missing] if missing else []

    def device_reasons(self, device: torch.device) -> List[str]:
        reasons = super().device_reasons(device)
        if not reasons and torch.cuda.is_available():
            cap = tuple(torch.cuda.get_device_capability(device))
            if cap < self.MIN_CAPABILITY:
                reasons.append(f"GPU compute capability {cap[0]}.{cap[1]} is below 8.0: needs sm80+ for "
                               f"mma.sync bf16")
        return reasons

    def problem_reasons(self, p) -> List[str]:
        return self.strategies().reasons(p)

    def strategies(self):
        from .strategies import STRATEGIES  # imported on use: never touches the extension

        return STRATEGIES

    def kernel(self, op: str) -> Callable:
        return self.strategies().kernels()[op]

    def prepare(self, layer) -> int:
        return sparse24.pack_layer(layer)


BACKEND = dispatch.register(CudaBackend())
