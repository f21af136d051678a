"""Run a function right after a module is first imported, without importing it.

``import fips_kernels`` must stay quick, and importing transformers' quantizer
registry takes seconds, so the FiPS quantizer is registered when transformers
loads that registry (``transformers.quantizers.auto``): at once if it is
already imported, else by a finder on ``sys.meta_path`` that wraps the
module's loader. Every ``from_pretrained`` imports the registry before it
reads a quantization config, so the quantizer is always in place in time.
"""
from __future__ import annotations

import importlib.abc
import sys
from typing import Callable, Dict

__all__ = ["after_import"]


class _Loader(importlib.abc.Loader):
    """The module's own loader, with ``callback(module)`` after it runs."""

    def __init__(self, loader, callback: Callable):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package ... as the real loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.callbacks: Dict[str, Callable] = {}

    def find_spec(self, fullname, path, target=None):
        callback = self.callbacks.pop(fullname, None)
        if callback is None:
            return None
        for finder in sys.meta_path:  # the spec the import would have found without us
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, callback)
        return spec


_finder = _Finder()


def after_import(name: str, callback: Callable) -> None:
    """Call ``callback(module)`` once module ``name`` is imported (now, if it is)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    _finder.callbacks[name] = callback
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
