"""Reusable scratch buffers of the reconstruct strategies (Triton and CUDA backends).

A reconstruct call writes a dense weight it throws away after one GEMM. Keeping
that buffer per (device, dtype, shape) means no allocation after the first call
of a shape, so a warmed-up layer can be captured in a CUDA graph. Calls on one
stream use a buffer in turn; the two backends share buffers of equal shape.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

__all__ = ["workspace", "clear_workspaces", "workspace_bytes"]

_workspaces: Dict[Tuple[torch.device, torch.dtype, Tuple[int, ...]], torch.Tensor] = {}


def workspace(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The buffer for (device, dtype, shape), allocated on first use."""
    key = (torch.device(device), dtype, tuple(shape))
    buf = _workspaces.get(key)
    if buf is None:
        buf = _workspaces[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def clear_workspaces() -> None:
    """Free every buffer (they are reallocated on the next large-M call)."""
    _workspaces.clear()


def workspace_bytes() -> int:
    """Bytes held by the buffers: what cache-free reconstruction costs in memory."""
    return sum(t.numel() * t.element_size() for t in _workspaces.values())
