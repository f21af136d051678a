"""Measured crossovers, kept as data (``crossovers.json``) per GPU name, and
the ``FIPS_KERNELS_STRATEGY`` override shared by the Triton and CUDA backends.

A GPU without an entry uses ``default``, which is an estimate, not a
measurement; the benchmark writes the figures that replace it. An entry may
hold ``"by_backend": {"cuda": {...}}`` with the same keys, measured for the
CUDA backend's kernels; without it the CUDA backend uses the entry's own
figures. (Nothing here imports Triton.)
"""
from __future__ import annotations

import functools
import json
import os
from importlib import resources
from typing import Dict, Optional, Union

import torch

from ..formats import Layout, SparseFactor

STRATEGY_ENV = "FIPS_KERNELS_STRATEGY"


@functools.lru_cache(maxsize=None)
def crossovers() -> Dict[str, dict]:
    text = resources.files(__package__).joinpath("crossovers.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


@functools.lru_cache(maxsize=None)
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def entry_for(device: torch.device) -> dict:
    table = crossovers()
    return table.get(_gpu_name(device), table["default"])


def reconstruct_min_m(device: torch.device, kind: str, factor: Union[SparseFactor, Layout], d: int,
                      backend: str = "triton") -> int:
    """Smallest M at which the large-M strategies (reconstruct-GEMM, 2:4) run instead
    of the factored kernels, for ``backend`` (``factor``: a SparseFactor or its Layout)."""
    entry = entry_for(device)
    scoped = entry.get("by_backend", {}).get(backend, {})
    for source in (scoped, entry):
        by_format = source.get("by_format", {}).get(factor.format, {})
        if kind in by_format:
            return int(by_format[kind])
        if "reconstruct_min_m" in source:
            return int(source["reconstruct_min_m"])
    raise KeyError(f"crossovers.json: no reconstruct_min_m for {_gpu_name(device)}")  # pragma: no cover


def forced_strategy(forced: Optional[str] = None) -> str:
    """The strategy forced by the argument, else by ``FIPS_KERNELS_STRATEGY`` ('' if none)."""
    return (forced or os.environ.get(STRATEGY_ENV, "")).strip().lower()
