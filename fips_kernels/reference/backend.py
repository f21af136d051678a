"""The ``reference`` backend: pure PyTorch (:mod:`fips_kernels.reference` and
:mod:`fips_kernels.hashed.reference`). Runs every op, format, dtype and device;
the truth the kernels are tested against, and the fallback of last resort."""
from __future__ import annotations

from typing import Callable

import torch

from .. import dispatch
from ..hashed import ops as hashed_ops

__all__ = ["ReferenceBackend", "BACKEND"]


class ReferenceBackend(dispatch.Backend):
    name = "reference"
    ops = dispatch.FIPS_OPS + hashed_ops.OPS
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    formats = None  # every registered format: it decodes through the format's own unpack

    def device_reasons(self, device):
        return []

    def kernel(self, op: str) -> Callable:
        from .. import reference
        from ..hashed import reference as hashed

        table = {"expand": reference.expand, "contract": reference.contract, "gate_up": reference.gate_up,
                 "reconstruct": reference.linear_weight, "hashed_linear": hashed.linear,
                 "hashed_grad_input": hashed.grad_input, "hashed_grad_memory": hashed.grad_memory,
                 "hashed_weight": hashed.weight, "hashed_scatter": hashed.scatter}
        return table[op]


BACKEND = dispatch.register(ReferenceBackend())
