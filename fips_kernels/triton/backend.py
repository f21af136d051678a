"""The ``triton`` backend: Triton kernels on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (which must be set before ``fips_kernels`` first dispatches).

What it runs: the FiPS ops for dense, nm, bitmap (power-of-two tiles) and ell
factors in fp16/bf16/fp32 through the strategies of :mod:`.strategies`, and the
hashed ops (:mod:`.hashed`). Importing this module does not import Triton; the
kernels are imported on first use, and an import failure becomes a reason.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, List

import torch

from .. import dispatch
from ..hashed.ops import OPS as HASHED_OPS

__all__ = ["TritonBackend", "BACKEND"]


@functools.lru_cache(maxsize=None)
def _import(module: str):
    """(module, None) or (None, the import error as text)."""
    import importlib

    try:
        return importlib.import_module(f"fips_kernels.triton.{module}"), None
    except Exception as exc:  # triton missing or broken: the reasons say so
        return None, f"{type(exc).__name__}: {exc}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(dispatch.Backend):
    name = "triton"
    ops = dispatch.FIPS_OPS + HASHED_OPS
    device_types = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    formats = ("dense", "nm", "bitmap", "ell")

    def availability_reasons(self) -> List[str]:
        _, error = _import("strategies")
        return [f"triton kernels could not be imported ({error})"] if error else []

    def device_reasons(self, device: torch.device) -> List[str]:
        if device.type == "cpu":
            if not _interpreting():
                return ["input is on the CPU and TRITON_INTERPRET=1 is not set"]
            sm, _ = _import("sparse_matmul")
            if sm is not None and not sm.INTERPRETED:
                return ["the Triton kernels were imported before TRITON_INTERPRET=1 was set"]
            return []
        if device.type != "cuda":
            return [f"device {device} is not supported (needs cuda)"]
        return []

    def problem_reasons(self, p) -> List[str]:
        reasons = []
        if p.device.type == "cpu" and p.dtype == torch.bfloat16:
            # the interpreter's bf16 arithmetic is wrong (numpy has no bf16): errors up to 1e21, silently
            reasons.append("bfloat16 is not supported under the Triton interpreter (its bf16 arithmetic is "
                           "wrong); run bf16 on a GPU")
        if p.family == "fips":
            reasons += self.strategies().reasons(p)
        else:
            reasons += self._hashed_reasons(p)
        return reasons

    def _hashed_reasons(self, p) -> List[str]:
        reasons = []
        if p.spec.method == "roast" and p.spec.tile[1] < 16:
            reasons.append(f"ROAST tile width {p.spec.tile[1]} is below 16, the smallest Triton block "
                           f"(a tile row must hold a whole column block)")
        hashed, error = _import("hashed")
        if error:
            reasons.append(f"the hashed Triton kernels could not be imported ({error})")
        elif p.device.type == "cpu" and not hashed.INTERPRETED:
            reasons.append("the hashed Triton kernels were imported before TRITON_INTERPRET=1 was set")
        return reasons

    def strategies(self):
        module, _ = _import("strategies")
        return module.STRATEGIES if module is not None else None

    def kernel(self, op: str) -> Callable:
        if op in dispatch.FIPS_OPS:
            return self.strategies().kernels()[op]
        hashed, _ = _import("hashed")
        return getattr(hashed, op.replace("hashed_", ""))


BACKEND = dispatch.register(TritonBackend())
