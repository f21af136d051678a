"""The ``cpu`` backend and the CPU memory policy of FiPS models (docs/CPU.md).

Two modes, chosen per model (:func:`set_mode`, the ``cpu_mode=`` argument of
:func:`fips_kernels.load`, :func:`fips_kernels.from_pretrained` and
:func:`fips_kernels.compress`, or ``FIPS_KERNELS_CPU_MODE``):

* ``"speed"`` (the default): each layer's dense weight is rebuilt once — when
  the mode is set on a CPU model, else on its first CPU call — and every
  inference call is one dense GEMM. Costs the dense MLP weights in memory
  (fp32 for fp16/bf16 factors: CPUs have no fast half GEMM) on top of the
  compressed tensors, which stay for saving and for other devices.
* ``"compressed"``: nothing is rebuilt or cached; the resident MLP bytes are
  the compressed bytes. Calls run the factored product with the compiled
  kernels of ``csrc/cpu`` (:mod:`.kernels`): ``x·U`` by torch's GEMM, the
  sparse factor straight from its packed (int8/int4/float) values.

Training (grad enabled) and non-CPU inputs ignore the mode.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator, Optional

from torch import nn

__all__ = ["MODES", "DEFAULT_MODE", "ENV_VAR", "default_mode", "check_mode", "mode_of", "set_mode", "override",
           "compressed_while_running"]

MODES = ("speed", "compressed")
# A user of a small encoder on a CPU (the README's MiniLM) expects the dense model's latency; its dense
# MLP weights are tens of MiB. Models whose dense MLP weights do not fit choose "compressed".
DEFAULT_MODE = "speed"
ENV_VAR = "FIPS_KERNELS_CPU_MODE"


def check_mode(mode: str, what: str = "cpu_mode") -> str:
    if mode not in MODES:
        raise ValueError(f"{what} must be one of {MODES}, got {mode!r}")
    return mode


def default_mode() -> str:
    """``FIPS_KERNELS_CPU_MODE`` if set, else :data:`DEFAULT_MODE`."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    return check_mode(value, ENV_VAR) if value else DEFAULT_MODE


_local = threading.local()


@contextlib.contextmanager
def override(mode: str) -> Iterator[None]:
    """Every FiPS layer runs in ``mode`` inside the block (this thread), whatever its own."""
    check_mode(mode)
    previous = getattr(_local, "mode", None)
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = previous


def compressed_while_running(fn):
    """Run ``fn`` under ``override("compressed")``: compression trains and evaluates the
    layers while their values change, where a speed-mode rebuild would be redone on
    every call and would hold the dense weights."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with override("compressed"):
            return fn(*args, **kwargs)

    return wrapper


def mode_of(layer: nn.Module) -> str:
    """The CPU mode of a FiPS layer: an :func:`override`, its own (set by
    :func:`set_mode`), or the default."""
    return getattr(_local, "mode", None) or layer.__dict__.get("cpu_mode") or default_mode()


def set_mode(model: nn.Module, mode: Optional[str], *, prepare: bool = True) -> nn.Module:
    """Set the CPU mode of every FiPS layer in ``model`` (``None``: back to the default).

    ``"speed"`` with ``prepare=True`` rebuilds the dense weights of the layers
    already on the CPU now (the one-time cost at load), the others on their
    first CPU call; ``"compressed"`` drops any rebuilt weight. Returns ``model``.
    """
    from ..modules import FiPSLinear

    if mode is not None:
        check_mode(mode)
    for layer in model.modules():
        if isinstance(layer, FiPSLinear):
            layer.cpu_mode = mode
            effective = mode_of(layer)
            if effective == "compressed":
                layer.cache_weight(False)
            elif prepare and layer.V_values.device.type == "cpu":
                layer.prepare_cpu_weight()
    return model
