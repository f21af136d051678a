"""Benchmarks of fips_kernels layers (``fips-kernels bench``).

* :mod:`.shapes` — presets (DeiT-B, Swin-L stage 3, Llama-3-8B, tiny), patterns, the budget's rank.
* :mod:`.cases` — the timed layers, built from random factors at that rank/sparsity/pattern.
* :mod:`.registry` — the provider registry and the roles (ours / peer / baseline) written in every CSV.
* :mod:`.providers` — this package's ways of computing a layer (fips, reference, triton_*, cuda_*);
  :mod:`.hashed_providers` the hashed layers'; add one with ``@register``.
* :mod:`.peers` — the peers and the dense baseline, each defined once with its faces (speed today; quality next).
* :mod:`.group` — the group scope (every layer of a group back to back).
* :mod:`.timing` — do_bench on CUDA, perf_counter on the CPU; the run's roofline.
* :mod:`.env` — device, driver, versions, date, commit of a run.
* :mod:`.layer` — the layer sweep; :mod:`.e2e` (with :mod:`.e2e_config`, :mod:`.e2e_models`) the whole models.
* :mod:`.rows` — the CSV writer; :mod:`.table` — the printed summary; :mod:`.sizes` — stored bytes.

Importing this package needs neither a GPU nor Triton.
"""
from .layer import (  # noqa: F401
    COLUMNS,
    METADATA_COLUMNS,
    BenchConfig,
    BenchError,
    resolve_config,
    run,
    summarize_csv,
    summary_table,
)
from .providers import PROVIDERS, Prepared, Provider, register  # noqa: F401
from .peers import PEERS, Peer, register_peer  # noqa: F401
from .shapes import PATTERNS, PRESETS, TINY_PRESETS  # noqa: F401

__all__ = [
    "BenchConfig",
    "BenchError",
    "COLUMNS",
    "METADATA_COLUMNS",
    "PATTERNS",
    "PRESETS",
    "PEERS",
    "PROVIDERS",
    "Peer",
    "Prepared",
    "Provider",
    "TINY_PRESETS",
    "register",
    "register_peer",
    "resolve_config",
    "run",
    "summarize_csv",
    "summary_table",
]
