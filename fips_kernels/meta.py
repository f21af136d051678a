"""Building a model without memory for its weights, to load a checkpoint into.

:func:`empty_weights` makes every parameter created inside it a tensor on the
``meta`` device (a shape and a dtype, no storage), while buffers stay real:
the values a module's ``__init__`` computes into non-persistent buffers (rotary
frequencies, position ids) are not in any checkpoint, so they must survive.
:func:`fips_kernels.load` then replaces the meta parameters by the
checkpoint's tensors (``load_state_dict(assign=True)``: no copy), so the
dense MLP weights of the architecture are never allocated.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

from torch import nn

__all__ = ["empty_weights", "meta_tensors", "has_meta"]


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Within this block, parameters registered on any ``nn.Module`` move to the
    ``meta`` device as they are registered; buffers are left real.

    A layer's ``__init__`` may still call ``torch.empty`` for a weight before
    registering it: that allocation is never written (its initialisation runs
    on the meta copy), so the operating system does not back it with memory,
    and it is freed at once.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def meta_tensors(model: nn.Module) -> List[str]:
    """Names of the parameters and buffers of ``model`` still on the meta device."""
    out = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    return out + [n for n, b in model.named_buffers(remove_duplicate=False) if b is not None and b.is_meta]


def has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(b.is_meta for b in model.buffers())
