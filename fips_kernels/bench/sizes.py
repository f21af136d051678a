"""Stored bytes of tensors and modules: what a benchmarked variant must read.

One count for every benchmark: the layer rows' ``weight_bytes``, the group
rows' bytes and the end-to-end ``weight_bytes`` columns all come from here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["tensor_bytes", "module_bytes"]


def _one(t: Optional[torch.Tensor]) -> int:
    if t is None:
        return 0
    if t.layout == torch.sparse_csr:  # indices + values
        return sum(_one(p) for p in (t.crow_indices(), t.col_indices(), t.values()))
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        # a traceable subclass (e.g. a semi-structured sparse tensor): its inner tensors
        names = t.__tensor_flatten__()[0]
        return sum(_one(getattr(t, n, None)) for n in names)
    return t.numel() * t.element_size()


def tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    """Stored bytes of ``tensors`` (None counts 0): strided, sparse CSR, or a
    traceable tensor subclass such as ``to_sparse_semi_structured``'s."""
    return sum(_one(t) for t in tensors)


def module_bytes(*mods: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``mods``, each tensor counted once
    (a group's shared base is registered once, however many layers use it)."""
    seen, total = set(), 0
    for mod in mods:
        for t in list(mod.parameters()) + list(mod.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            total += _one(t)
    return total
