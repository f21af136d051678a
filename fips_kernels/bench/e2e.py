"""The end-to-end benchmark behind ``fips-kernels bench-e2e``: the runner.

Whole models, dense against FiPS at budget p = 0.5 and against the peer paths
of the layer benchmark, in the same process:

* **image models** (``deit-b``, ``swin-l``): timm DeiT-B and Swin-L built from
  their configs (random weights); their MLPs grouped — DeiT-B: 4 consecutive
  blocks per group; Swin-L: up to 6 consecutive blocks within a stage (groups
  never cross a change of width, DESIGN §1) — and replaced by FiPS layers
  built from random factors at the group's rank, exactly as the layer
  benchmark builds its layers. Images/s per batch.
* **decode** (``llama3-8b-mlp``): one group of 4 Llama-3-8B-shaped gated MLP
  blocks, one token per sequence per step. Tokens/s per batch.

The parts, one job each: :mod:`.e2e_config` (models, variants and their
roles, modes, the checked arguments), :mod:`.e2e_models` (the models and how
each variant is put in), this module (running each mode and point, checking
outputs, timing), :mod:`.rows` (the CSV) and :mod:`.table` (the summary).

Modes: ``eager``, ``cudagraph`` (the eager model captured in one CUDA graph),
``compile`` (``torch.compile``) and ``compile-cudagraph``
(``torch.compile(mode="reduce-overhead")``).

Per row: median time of one call (:func:`.timing.time_ms`: ``do_bench`` on a
GPU), throughput, speed-up over the dense model in the same mode, the bytes
of the model's parameters and buffers (whole model and MLPs only) and the peak
GPU memory allocated while the mode was set up and run. ``--budget-s`` bounds
the run: the points it leaves get ``skipped`` rows saying so. Columns:
``benchmarks/README.md``. CPU runs (``--tiny``) only check the harness.
"""
from __future__ import annotations

import gc
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import dispatch
from ..cuda import clear_packs
from ..modules import FiPSLinear
from ..workspaces import clear_workspaces
from .e2e_config import *  # noqa: F401,F403  (the configuration's names, as before the split)
from .e2e_config import (ALL_MODELS, E2E_ROLES, TIMM_MISSING, TOLERANCE, E2EConfig, ModelSpec,
                         resolve_config)
from .e2e_models import ModelUnderTest, mlp_groups, timm_module
from .env import METADATA_COLUMNS, run_metadata
from .layer import DTYPE_NAMES
from .peers import PeerLinear
from .providers import dispatched_backend
from .rows import RowWriter, describe
from .shapes import PATTERNS
from .sizes import module_bytes, tensor_bytes
from .table import speedup_table
from .timing import measure_bandwidth, time_ms

__all__ = ["E2E_COLUMNS", "run", "summary_table", "module_bytes", "tensor_nbytes", "mlp_groups", "resolve_config",
           "E2EConfig", "ModelSpec"]

E2E_COLUMNS = (
    "model", "arch", "task", "provider", "role", "pattern", "format", "dtype", "mode", "batch", "mlp_rows",
    "backend", "status", "reason", "time_ms", "throughput", "unit", "speedup_vs_dense",
    "weight_bytes", "mlp_weight_bytes", "weight_ratio_vs_dense", "mlp_weight_ratio_vs_dense", "run_peak_bytes",
    "groups", "blocks_per_group", "ranks", "rel_err", "bytes", "roofline_ms", "frac_of_roofline",
    "bandwidth_GBps",
) + METADATA_COLUMNS

tensor_nbytes = tensor_bytes  # one tensor's stored bytes (the name this module exported before the split)
_timm = timm_module  # tests replace it to run without timm


# ---------------------------------------------------------------- running one mode

class _Runner:
    """The callable of one (variant, mode); built once, reused for every batch."""

    def __init__(self, model: nn.Module, mode: str, device: torch.device):
        self.model, self.mode, self.device = model, mode, device
        self.compiled = None
        if mode == "compile":
            self.compiled = torch.compile(model)
        elif mode == "compile-cudagraph":
            self.compiled = torch.compile(model, mode="reduce-overhead")

    def prepare(self, x: torch.Tensor) -> Tuple[Callable[[], torch.Tensor], torch.Tensor]:
        """Warm up (compile, autotune, capture) for ``x``; returns ``(fn, output)``."""
        if self.mode == "eager":
            y = self.model(x)
            return (lambda: self.model(x)), y
        if self.mode == "cudagraph":
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.model(x)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = self.model(x)
            graph.replay()
            return graph.replay, y
        fn = self.compiled
        for _ in range(3):
            y = fn(x)
        y = fn(x).clone() if self.mode == "compile-cudagraph" else fn(x)
        return (lambda: fn(x)), y

    def close(self) -> None:
        self.compiled = None
        if self.mode.startswith("compile"):
            torch._dynamo.reset()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device, collect: bool = False) -> None:
    """Drop what a variant left behind. ``collect``: also run the garbage
    collector (slow with timm and dynamo loaded: only after compiled modes,
    which leave reference cycles)."""
    if collect:
        gc.collect()
    clear_workspaces()  # reconstruct workspaces and 2:4 packs: part of a variant's run, not the next's
    clear_packs()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _variant_reasons(provider: str, device: torch.device, dtype: torch.dtype, pattern: str) -> List[str]:
    """Why a peer's variant cannot run here (the layer benchmark's reasons); none for dense and FiPS."""
    from .peers import PEERS

    return PEERS[provider].not_supported_reasons(device, dtype, pattern) if provider in PEERS else []


def _mode_reasons(mode: str, device: torch.device) -> List[str]:
    if mode in ("cudagraph", "compile-cudagraph") and device.type != "cuda":
        return [f"CUDA graphs need a CUDA GPU (device is {device.type})"]
    return []


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _backend(layer: nn.Module, M: int) -> str:
    """What runs the layer at ``M`` rows: dispatch's pick for a FiPS layer, the peer's own name, else torch."""
    if isinstance(layer, FiPSLinear):
        try:
            return dispatched_backend(layer, M)
        except Exception:  # noqa: BLE001
            return "?"
    return layer.backend if isinstance(layer, PeerLinear) else "torch"


# ---------------------------------------------------------------- the run

def run(config: E2EConfig, *, log: Callable[[str], None] = print) -> List[Dict[str, str]]:
    """Run the benchmark, writing ``config.out`` row by row; returns the rows.
    On the CPU it runs on one thread (restored afterwards)."""
    threads = torch.get_num_threads()
    if config.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _Run(config, log).go()
    finally:
        torch.set_num_threads(threads)


class _Run:
    def __init__(self, config: E2EConfig, log):
        self.c, self.log = config, log
        self.rows: List[Dict[str, str]] = []
        self.t0 = time.monotonic()

    # -- budget: each (model, dtype) block gets an equal share of what is left
    def _elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _block_deadline(self, blocks_left: int) -> Optional[float]:
        if self.c.budget_s is None:
            return None
        left = max(0.0, self.c.budget_s - self._elapsed())
        return self._elapsed() + left / max(1, blocks_left)

    def _over(self, deadline: Optional[float]) -> bool:
        return deadline is not None and self._elapsed() >= deadline

    def go(self) -> List[Dict[str, str]]:
        from tqdm.auto import tqdm

        c = self.c
        meta = run_metadata(c.device)
        for note in c.notes:
            self.log(f"note: {note}")
        self.log(f"device {c.device} ({meta['gpu_name']}), torch {meta['torch']}, triton {meta['triton']}, "
                 f"commit {meta['commit']}")
        self.bw = None
        if any(ALL_MODELS[m].task == "decode" for m in c.models):
            bw_dtype = torch.float16 if c.device.type == "cuda" else torch.float32
            self.bw = measure_bandwidth(c.device, bw_dtype, c.timing)
            self.log(f"copy bandwidth of this run: {self.bw / 1e9:.1f} GB/s (decode roofline)")
        budget = f", budget {c.budget_s:.0f} s" if c.budget_s else ""
        self.log(f"writing up to {c.points} rows to {c.out}{budget}")
        c.out.parent.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.bar = tqdm(total=c.points, disable=not c.progress, file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5, desc="fips bench-e2e")
        try:
            with RowWriter(c.out, E2E_COLUMNS, on_row=lambda row: (self.rows.append(row), self.bar.update(1))) as w:
                self.emit = w.emit
                blocks = [(m, dt) for m in c.models for dt in c.dtypes]
                for i, (name, dtype) in enumerate(blocks):
                    self._block(ALL_MODELS[name], dtype, self._block_deadline(len(blocks) - i))
        finally:
            self.bar.close()
        return self.rows

    def _base_row(self, spec: ModelSpec, dtype, provider, pattern, mode, batch) -> Dict[str, object]:
        return dict(self.meta, model=spec.name, arch=spec.arch, task=spec.task, provider=provider,
                    role=E2E_ROLES[provider],
                    pattern=pattern or "none", format=PATTERNS[pattern].format if pattern else "dense",
                    dtype=DTYPE_NAMES[dtype], mode=mode, batch=batch, unit=spec.unit,
                    bandwidth_GBps=(self.bw / 1e9) if (self.bw and spec.task == "decode") else None)

    def _skip_all(self, spec, dtype, status, reason, variants=None, modes=None) -> None:
        for mode in modes or self.c.modes:
            for provider, pattern in variants or self.c.variants():
                for batch in self.c.batches(spec):
                    self.emit(dict(self._base_row(spec, dtype, provider, pattern, mode, batch),
                                   status=status, reason=reason))

    def _block(self, spec: ModelSpec, dtype: torch.dtype, deadline: Optional[float]) -> None:
        c = self.c
        self.log(f"{spec.name} {DTYPE_NAMES[dtype]}: {spec.description}")
        if spec.task == "images" and _timm() is None:
            self._skip_all(spec, dtype, "skipped", TIMM_MISSING)
            return
        try:
            m = ModelUnderTest(spec, dtype, c.device, c.seed)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory
            _free(c.device)
            self._skip_all(spec, dtype, "failed", f"building the model failed: {describe(exc)}")
            return
        self.refs: Dict[Tuple[str, int], torch.Tensor] = {}
        self.mlp_rows: Dict[int, int] = {}
        self.dense_time: Dict[Tuple[str, int], float] = {}
        self.dense_bytes: Optional[Tuple[int, int]] = None
        for mode in c.modes:
            mode_why = _mode_reasons(mode, c.device)
            for provider, pattern in c.variants():
                why = mode_why + _variant_reasons(provider, c.device, dtype, pattern)
                if why:
                    self._skip_all(spec, dtype, "skipped", "; ".join(why), [(provider, pattern)], [mode])
                    continue
                if self._over(deadline):
                    self._skip_all(spec, dtype, "skipped", self._budget_reason(), [(provider, pattern)], [mode])
                    continue
                self._variant(m, spec, dtype, provider, pattern, mode, deadline)
        del m
        self.refs = {}
        _free(c.device, collect=True)

    def _budget_reason(self) -> str:
        return f"not run: the time budget (--budget-s {self.c.budget_s:g}) was spent"

    def _install(self, m: ModelUnderTest, provider: str, pattern: str) -> None:
        """Install the variant; fill the reference outputs it will be compared with."""
        c = self.c
        batches = c.batches(m.spec)
        if provider == "dense":
            m.install_dense()
            for b in batches:  # also records each batch's mlp_rows
                if ("dense", b) not in self.refs or b not in self.mlp_rows:
                    y = self._eager_ref(m, b, reference=False)
                    if c.check:
                        self.refs[("dense", b)] = y
            return
        pat = PATTERNS[pattern]
        groups = m.install_fips(pat)
        need = [b for b in batches if (pattern, b) not in self.refs] if c.check else []
        for b in need:
            self.refs[(pattern, b)] = self._eager_ref(m, b, reference=True)
        if provider != "fips":
            m.install_peer(provider, groups, pat)
        del groups

    def _eager_ref(self, m: ModelUnderTest, batch: int, reference: bool) -> torch.Tensor:
        x = m.make_input(batch)
        rows = {}

        def record(mod, args):  # a pre-hook returning None leaves the arguments alone
            rows.setdefault("M", args[0].numel() // args[0].shape[-1])

        hook = m.first_mlp().register_forward_pre_hook(record)
        try:
            if reference:
                with dispatch.use_backend("reference"):
                    y = m.model(x)
            else:
                y = m.model(x)
        finally:
            hook.remove()
        if "M" in rows:  # a fused gate/up never calls the gate module itself
            self.mlp_rows[batch] = rows["M"]
        return y.detach().clone()

    def _variant(self, m: ModelUnderTest, spec, dtype, provider, pattern, mode, deadline) -> None:
        c = self.c
        batches = c.batches(spec)
        try:
            self._install(m, provider, pattern)
            _free(c.device)
            weight_bytes = module_bytes(m.model)
            mlp_bytes = module_bytes(*m.mlp_modules())
        except Exception as exc:  # noqa: BLE001
            _free(c.device)
            for batch in batches:
                self.emit(dict(self._base_row(spec, dtype, provider, pattern, mode, batch), status="failed",
                               reason=f"building the variant failed: {describe(exc)}"))
            return
        if provider == "dense":
            self.dense_bytes = (weight_bytes, mlp_bytes)
        common = dict(weight_bytes=weight_bytes, mlp_weight_bytes=mlp_bytes,
                      groups=len(m.slots), blocks_per_group=spec.group_size,
                      ranks=" ".join(str(r) for r in m.ranks) if m.ranks else None)
        if self.dense_bytes:
            common["weight_ratio_vs_dense"] = weight_bytes / self.dense_bytes[0]
            common["mlp_weight_ratio_vs_dense"] = mlp_bytes / self.dense_bytes[1]
        runner = None
        try:
            runner = _Runner(m.model, mode, c.device)
        except Exception as exc:  # noqa: BLE001
            runner_error = f"preparing {mode} failed: {describe(exc)}"
        else:
            runner_error = None
        for batch in batches:
            self.bar.set_postfix_str(f"{spec.name} {DTYPE_NAMES[dtype]} {mode} {provider} {pattern} b={batch}",
                                     refresh=False)
            row = dict(self._base_row(spec, dtype, provider, pattern, mode, batch), **common)
            row["mlp_rows"] = self.mlp_rows.get(batch)
            if runner_error:
                self.emit(dict(row, status="failed", reason=runner_error))
                continue
            if self._over(deadline):
                self.emit(dict(row, status="skipped", reason=self._budget_reason()))
                continue
            row["backend"] = _backend(m.first_mlp(), self.mlp_rows.get(batch) or batch)
            self._point(m, runner, row, spec, dtype, provider, pattern, mode, batch)
        compiled = mode.startswith("compile")
        if runner is not None:
            runner.close()
        del runner
        _free(c.device, collect=compiled)

    def _point(self, m, runner, row, spec, dtype, provider, pattern, mode, batch) -> None:
        c, dev = self.c, self.c.device
        x = m.make_input(batch)
        note = ""
        try:
            _sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            skips_before = _cudagraph_skips() if mode == "compile-cudagraph" else 0
            fn, y = runner.prepare(x)
            for _ in range(2):
                fn()
            _sync(dev)
            if dev.type == "cuda":
                row["run_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
            if mode == "compile-cudagraph" and _cudagraph_skips() > skips_before:
                note = "WARNING: inductor skipped CUDA graphs for this model (see the log)"
            ref = self.refs.get(("dense" if provider == "dense" else pattern, batch))
            if ref is not None and not (provider == "dense" and mode == "eager"):
                err = _rel_err(y, ref)
                row["rel_err"] = err
                if not err <= TOLERANCE[dtype]:
                    note = (note + "; " if note else "") + \
                        f"WARNING: rel_err {err:.3g} vs the eager reference exceeds {TOLERANCE[dtype]}"
            del y
            t = time_ms(fn, dev, c.timing)
        except Exception as exc:  # noqa: BLE001
            _free(dev)
            self.emit(dict(row, status="failed", reason=f"running failed: {describe(exc)}"))
            return
        if provider == "dense":
            self.dense_time[(mode, batch)] = t
        dense_t = self.dense_time.get((mode, batch))
        row.update(status="ok", reason=note, time_ms=t, throughput=batch / (t * 1e-3),
                   speedup_vs_dense=(dense_t / t) if dense_t else None)
        if spec.task == "decode" and self.bw:
            item = torch.empty((), dtype=dtype).element_size()
            acts = sum(batch * (in_f + out_f) * item for slot in m.slots for _, _, in_f, out_f, _ in slot)
            nbytes = int(row["mlp_weight_bytes"]) + acts
            roof = nbytes / self.bw * 1e3
            row.update(bytes=nbytes, roofline_ms=roof, frac_of_roofline=roof / t)
        self.emit(row)


def _cudagraph_skips() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # noqa: BLE001
        return 0



# ---------------------------------------------------------------- summary

def summary_table(rows: Sequence[Dict[str, object]]) -> str:
    """Speed-up over the dense model, one line per (model, dtype, mode, provider,
    pattern), one column per batch; then the variants that did not run, once, with their reasons."""
    return speedup_table(rows, ("model", "dtype", "mode", "provider", "pattern"), "batch",
                         "speed-up over the dense model (dense time / time; >1 is faster), by batch:")
