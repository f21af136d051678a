"""The benchmark rows of ``scripts/gpu-check.sh``: one definition, run by the
script's row stages and counted by its ``--plan`` (:mod:`.gpu_plan`).

* ``headline`` (issue 13): Llama-3-8B MLP (d 4096, h 14336) then DeiT-B
  (768, 3072), p = 0.5, M ∈ {1, 16, 256, 4096}, fp16; dense, ``fips``
  (dispatched), ``triton_factored``, ``cuda_factored`` for 1:4, unstructured
  (bitmap) and 1:4-int8, per layer and per group (``fips_gate_up`` too); then
  2:4 at M = 4096 with ``cuda_sparse24``. Each sweep measures the copy
  bandwidth and GEMM peak of the run (the roofline column).
* ``wider``: in priority order (a stage stopped at its deadline keeps the rows
  it wrote): the peers at the headline shapes; more M and the reconstruct
  strategies; bf16; Swin-L stage 3; the hashed layers.
* ``tuned``: the headline rows that run Triton kernels (``triton_factored``,
  with its dense baseline) with autotuning on and the per-GPU table off; the
  configs it picks are written for ``fips_kernels/tuning/triton_configs.json``.

``python -m fips_kernels.bench.gpu_rows ROWSET --out CSV`` runs a row set
(appending to ``--out``): first the Triton kernels its rows will launch are
compiled ahead in parallel (:func:`.triton_launches.precompile`), then the
sweeps run one after another.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["RowSet", "ROW_SETS", "configs", "units", "main"]

HEADLINE_PRESETS = ("llama3-8b", "deit-b")
HEADLINE_M = (1, 16, 256, 4096)
HEADLINE = dict(presets=HEADLINE_PRESETS, patterns=("1:4", "unstructured", "1:4-int8"), ms=HEADLINE_M,
                providers=("fips", "triton_factored", "cuda_factored"), scopes=("layer", "group"),
                group_providers=("fips", "fips_gate_up"), dtype="fp16")
TIMING = dict(warmup_ms=5.0, rep_ms=25.0)  # per point: enough for a median on a GPU, short for the lease


@dataclass(frozen=True)
class RowSet:
    """Sweeps of the layer benchmark (``resolve_config`` arguments), run in order into one CSV."""

    name: str
    description: str
    sweeps: Tuple[Dict, ...]
    env: Tuple[Tuple[str, str], ...] = (("FIPS_KERNELS_AUTOTUNE", "0"),)  # the script tunes in its own stage
    tuned: bool = False  # autotuning on: write the configs it chose


ROW_SETS: Dict[str, RowSet] = {s.name: s for s in (
    RowSet("headline", "Llama-3-8B and DeiT-B MLPs at p = 0.5, fp16, M 1/16/256/4096: dense, fips, triton_factored, "
                       "cuda_factored (1:4, bitmap, 1:4-int8; layer and group), cuda_sparse24 (2:4, M 4096)",
           (HEADLINE,
            dict(HEADLINE, patterns=("2:4",), ms=(4096,), providers=("fips", "cuda_sparse24"), scopes=("layer",)))),
    RowSet("wider", "peers at the headline shapes; more M with the reconstruct strategies; bf16; Swin-L stage 3; "
                    "hashed layers (in this order, while time remains)",
           (dict(HEADLINE, patterns=("1:4", "unstructured", "2:4"), providers=("two_gemm", "semi_structured_24",
                                                                              "csr_rebuild"), scopes=("layer",)),
            dict(HEADLINE, ms=(64, 1024, 16384), providers=HEADLINE["providers"] + ("triton_reconstruct",
                                                                                   "cuda_reconstruct")),
            dict(HEADLINE, dtype="bf16"),
            dict(HEADLINE, presets=("swin-l-s3",), patterns=("1:4", "unstructured", "2:4"),
                 providers=HEADLINE["providers"] + ("two_gemm", "cuda_sparse24", "semi_structured_24")),
            dict(HEADLINE, patterns=("unstructured",), providers=("hashed_fwd", "hashed_materialize"),
                 scopes=("layer",), presets=("llama3-8b", "deit-b", "swin-l-s3")))),
    RowSet("tuned", "the headline rows that run Triton (triton_factored and its dense baseline), autotuned",
           (dict(HEADLINE, providers=("triton_factored",), scopes=("layer",)),),
           env=(("FIPS_KERNELS_AUTOTUNE", "1"), ("FIPS_KERNELS_TRITON_CONFIGS", "0")), tuned=True),
)}


def configs(rowset: RowSet, out: str, device: Optional[str] = None) -> List:
    """The :class:`~.layer.BenchConfig` of each sweep of ``rowset``, appending to ``out``."""
    from .layer import resolve_config

    return [resolve_config(**dict(sweep, **TIMING), device=device, out=out, append=True, progress=False)
            for sweep in rowset.sweeps]


def units(rowset: RowSet, target, compiled: frozenset = frozenset()) -> Dict[str, object]:
    """What a row set costs, counted from the code that runs it (no GPU): ``rows``, ``sweeps``,
    ``compiles`` (Triton compiles, :func:`.triton_launches.row_launches`), ``new_compiles`` (those not
    in ``compiled``: Triton's on-disk cache keeps an earlier stage's), ``autotune_benchmarks``,
    ``layers_built`` and ``elements_built`` (the random layers the sweeps build), ``kernels``
    (compiles per kernel name) and ``compile_keys`` (to pass on as ``compiled``)."""
    from collections import Counter
    from dataclasses import replace

    import torch

    from .shapes import ALL_PRESETS, PATTERNS, preset_rank
    from .triton_launches import row_launches

    rows, keys, benches, layers, elements = 0, {}, 0, 0, 0
    for sweep in rowset.sweeps:
        bf16 = sweep.get("dtype") == "bf16"  # not resolvable on a CPU: count it as fp16, then relabel
        config = configs(RowSet(rowset.name, "", (dict(sweep, dtype="fp16") if bf16 else sweep,)), "plan.csv",
                         "cpu")[0]
        if bf16:
            config = replace(config, dtype=torch.bfloat16)
        rows += config.points
        rec = row_launches(config, target)
        keys.update(rec.compiles())
        benches += rec.autotune_benchmarks()
        for preset_name in config.presets:
            preset = ALL_PRESETS[preset_name]
            for pattern_name in config.patterns:
                r = preset_rank(preset, PATTERNS[pattern_name])
                per_layer = r * preset.h
                n = (2 if "layer" in config.scopes else 0) + \
                    (len(preset.group_kinds) if "group" in config.scopes else 0)
                layers, elements = layers + n, elements + n * per_layer
    new = [k for k in keys if k not in compiled]
    return dict(rows=rows, sweeps=len(rowset.sweeps), compiles=len(keys), new_compiles=len(new),
                autotune_benchmarks=benches, layers_built=layers, elements_built=elements,
                kernels=dict(Counter(k[1] for k in keys)), compile_keys=frozenset(keys) | compiled)


def _target(autotune: bool):
    import torch

    from .triton_launches import Target

    dev = torch.device("cuda")
    return Target(torch.cuda.get_device_name(dev), torch.cuda.get_device_properties(dev).multi_processor_count,
                  autotune=autotune, use_table=os.environ.get("FIPS_KERNELS_TRITON_CONFIGS", "1") != "0")


def _precompile(sweeps, autotune: bool, log) -> None:
    """Compile the rows' Triton kernels ahead, in parallel; a failure only costs time."""
    import time

    from .triton_launches import precompile, row_launches

    t0 = time.monotonic()
    try:
        target = _target(autotune)
        recorders = [row_launches(config, target) for config in sweeps]
        total, errors = 0, []
        for rec in recorders:
            n, errs = precompile(rec)
            total, errors = total + n, errors + errs
        log(f"precompiled {total} Triton kernels in {time.monotonic() - t0:.0f} s"
            + (f"; {len(errors)} failed (compiled when first run instead), e.g. {errors[0]}" if errors else ""))
    except Exception as exc:  # noqa: BLE001
        log(f"precompiling skipped ({type(exc).__name__}: {exc}); kernels compile when first run")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Run one of gpu-check.sh's row sets of the layer benchmark.")
    p.add_argument("rowset", choices=list(ROW_SETS))
    p.add_argument("--out", required=True, help="the layer CSV to append the rows to")
    p.add_argument("--configs-out", help="tuned row set: where to write the Triton configs autotuning chose")
    p.add_argument("--device", default=None)
    p.add_argument("--no-precompile", action="store_true")
    args = p.parse_args(argv)
    rowset = ROW_SETS[args.rowset]
    for name, value in rowset.env:
        os.environ[name] = value
    from ..triton import sparse_matmul as sm
    from . import layer

    sm.AUTOTUNE = rowset.tuned and not sm.INTERPRETED  # also if the module was imported before the line above

    log = lambda s: print(f"[{rowset.name}] {s}", flush=True)  # noqa: E731
    sweeps = configs(rowset, args.out, args.device)
    log(f"planned {sum(c.points for c in sweeps)} rows in {len(sweeps)} sweeps: {rowset.description}")
    if sweeps[0].device.type == "cuda" and not args.no_precompile:
        _precompile(sweeps, rowset.tuned, log)
    failed = 0
    try:
        for i, config in enumerate(sweeps, 1):
            log(f"sweep {i}/{len(sweeps)}: {config.points} rows")
            rows = layer.run(config, log=log)
            failed += sum(r["status"] == "failed" for r in rows)
    finally:
        if rowset.tuned and args.configs_out:
            _write_configs(args.configs_out, log)
    log(f"done; {failed} rows failed")
    return 1 if failed else 0


def _write_configs(path: str, log) -> None:
    import torch

    from ..triton.sparse_matmul import tuned_configs

    entries = tuned_configs()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    from .env import git_commit, utc_now

    with open(path, "w") as f:
        json.dump({"gpu": gpu, "source": f"gpu-check.sh tuned stage, {utc_now().isoformat()}, commit {git_commit()}",
                   "configs": entries}, f, indent=1)
    log(f"wrote {len(entries)} tuned configs to {path}")


if __name__ == "__main__":
    sys.exit(main())
