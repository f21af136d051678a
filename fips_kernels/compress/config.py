"""``CompressConfig``: the settings of :func:`fips_kernels.compress` as one object.

``compress(model, config, calib_data=...)`` is the same call as
``compress(model, budget=..., pattern=..., ..., calib_data=...)`` with the
config's fields; keyword arguments given beside a config override its fields
when they differ from their defaults. Data and callbacks (``calib_data``,
``eval_data``, ``forward``, ``output_fn``, ``resume_dir`` …) stay arguments:
a config describes *how* to compress, reusable across models and runs.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, Optional, Tuple, Union

import torch

__all__ = ["CompressConfig", "merge"]


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """How to compress (see :func:`fips_kernels.compress` for each field's meaning).
    Defaults equal the function's."""

    budget: Optional[float] = None   # 0.5 unless ratio is given
    sparsity: Optional[float] = None
    pattern: Optional[str] = None    # "unstructured" unless ratio chooses
    group_size: Optional[int] = None
    steps: int = 600
    preset: Optional[str] = None
    unit: Optional[str] = None
    batch_size: int = 8
    holdout: Union[int, float] = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.05
    pruning: str = "gmp"
    prune_every: int = 50
    prune_end: float = 0.75
    mask_scope: str = "global"
    nm_schedule: str = "gradual"
    rigl_alpha: float = 0.3
    format: Optional[str] = None
    tile: Tuple[int, int] = (64, 64)
    seed: int = 0
    qbits: Optional[int] = None
    qgroup: Optional[int] = None     # 64 unless ratio chooses
    base_qbits: Optional[int] = None
    factor_dtype: Union[None, str, torch.dtype] = None
    finetune_steps: Optional[int] = None  # as many as steps
    finetune_lr: float = 1e-4
    ratio: Optional[float] = None
    prune_schedule: str = "cubic"
    cpu_mode: Optional[str] = None   # how the returned model runs on a CPU (fips_kernels.cpu)

    def replace(self, **changes) -> "CompressConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def merge(fn, config: CompressConfig, given: Dict[str, Any]) -> Dict[str, Any]:
    """Keyword arguments for ``fn``: the config's fields, then every argument in
    ``given`` (the call's own parameters) whose value differs from ``fn``'s default."""
    defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    out = config.to_dict()
    for name, value in given.items():
        if name in defaults and name != "budget" and not _same(value, defaults[name]):
            out[name] = value
    return out


def _same(a, b) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else False
    except Exception:  # noqa: BLE001 - e.g. a DataLoader's __eq__
        return a is b
