"""The committed per-GPU table of Triton kernel configs (``triton_configs.json``).

Each GPU name maps to ``{"source": ..., "configs": [{"key": {...}, "config": {...}}]}``:
``key`` is the kernel's autotune key (``fips_kernels/triton/sparse_matmul.py``,
``TUNE_KEY``: bucketed M, N and K, format, pattern, orientation, gating,
split-K, dtype), ``config`` its block sizes, warps and stages. A GPU without an
entry uses ``default``, which is empty: the table holds only what a GPU run's
tuned stage measured (:func:`merge` adds such a run's file).
``FIPS_KERNELS_TRITON_CONFIGS=0`` ignores the table (the tuned stage does, to tune afresh).
"""
from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["TABLE_ENV", "table", "triton_config", "merge"]

TABLE_ENV = "FIPS_KERNELS_TRITON_CONFIGS"
TABLE_FILE = "triton_configs.json"


def _frozen(key: dict) -> Tuple:
    return tuple(sorted((str(k), v) for k, v in key.items()))


@functools.lru_cache(maxsize=None)
def table() -> Dict[str, dict]:
    """The file's entries (GPU name -> entry), without its ``_about``."""
    text = resources.files(__package__).joinpath(TABLE_FILE).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


@functools.lru_cache(maxsize=None)
def _index(gpu: str) -> Dict[Tuple, dict]:
    entry = table().get(gpu, table()["default"])
    return {_frozen(c["key"]): c["config"] for c in entry.get("configs", [])}


def triton_config(device: torch.device, key: dict) -> Optional[dict]:
    """The config measured for ``key`` on this GPU, or None (also on a CPU, or with the table turned off)."""
    if device.type != "cuda" or os.environ.get(TABLE_ENV, "1") == "0":
        return None
    return _index(torch.cuda.get_device_name(device)).get(_frozen(key))


def merge(run_file: Path, table_file: Optional[Path] = None) -> Tuple[str, int]:
    """Add a tuned stage's ``triton_configs_<gpu>.json`` (``{"gpu": name, "source": ..., "configs": [...]}``)
    to the table under its GPU name (a key measured again replaces the old config). Returns (gpu, entries)."""
    run = json.loads(Path(run_file).read_text())
    gpu, configs = run.get("gpu"), run.get("configs")
    if not gpu or gpu == "default" or not isinstance(configs, list):
        raise ValueError(f"{run_file}: not a tuned stage's output (needs 'gpu' and a 'configs' list)")
    path = Path(table_file) if table_file else Path(str(resources.files(__package__).joinpath(TABLE_FILE)))
    data = json.loads(path.read_text())
    old: List[dict] = data.get(gpu, {}).get("configs", [])
    merged = {_frozen(c["key"]): c for c in old}
    merged.update({_frozen(c["key"]): c for c in configs})
    data[gpu] = {"source": run.get("source", str(run_file)), "configs": list(merged.values())}
    path.write_text(json.dumps(data, indent=2) + "\n")
    table.cache_clear()
    _index.cache_clear()
    return gpu, len(merged)
