"""Benchmarks of hashed (ROAST / STABLE-RPS) layers.

* Two providers of the layer benchmark (``fips-kernels bench``), forward only,
  timed on the same layer shapes as the FiPS rows against the same dense
  ``F.linear``: ``hashed_fwd`` (a STABLE-RPS :class:`HashedLinear` whose array
  holds ``BUDGET`` × the layer's weights, through the dispatched op: the fused
  Triton kernel on a GPU) and ``hashed_materialize`` (the same layer, ``W``
  gathered by the Triton kernel into a temporary, then cuBLAS). A hashed layer
  does not depend on the FiPS sparsity pattern: its rows are timed with the
  ``unstructured`` pattern only, and only on a GPU (the CPU path is checked by
  ``tests/test_hashed.py``).
* :func:`run_sweep` (``benchmarks/bench_hashed.py``): forward **and**
  forward+backward of hashed layers vs dense ``F.linear`` with autograd, per
  (shape, M, method, budget), in its own CSV with the layer benchmark's
  metadata columns. The layer benchmark's rows are forward calls compared with
  a dense forward, so the backward does not fit them.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import dispatch
from ..hashed import mapping
from ..hashed.modules import HashedLinear
from ..hashed.ops import deterministic_gradients, problem, select
from .cases import LayerCase
from .sizes import tensor_bytes
from .env import METADATA_COLUMNS, run_metadata
from .providers import Prepared, Provider, dense_flops, register
from .registry import BASELINE, OURS
from .rows import RowWriter
from .shapes import BUDGET, PRESETS
from .timing import TimingConfig, time_ms

__all__ = ["HashedFwd", "HashedMaterialize", "run_sweep", "COLUMNS", "DEFAULT_SHAPES", "DEFAULT_M",
           "build_layer"]

STRATEGY_ENV = "FIPS_KERNELS_HASHED_STRATEGY"
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@contextlib.contextmanager
def _strategy(name: Optional[str]):
    old = os.environ.get(STRATEGY_ENV)
    if name is None:
        os.environ.pop(STRATEGY_ENV, None)
    else:
        os.environ[STRATEGY_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(STRATEGY_ENV, None)
        else:
            os.environ[STRATEGY_ENV] = old


def build_layer(in_features: int, out_features: int, budget: float, method: str, dtype: torch.dtype,
                device: torch.device, bias: bool = True, seed: int = 0, align: int = 1) -> HashedLinear:
    """A hashed layer owning an array of ``ceil(budget·out·in)`` slots (rounded up to ``align``)."""
    return HashedLinear(in_features, out_features, bias=bias, budget=budget, method=method, seed=seed,
                        align=align, dtype=dtype, device=device)


def _check(layer: HashedLinear, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative error of ``y`` against the fp32 reference."""
    W = mapping.materialize(layer.shared_memory.weight.detach(), layer.spec, layer.scale, torch.float32)
    b = layer.bias.detach().float() if layer.bias is not None else None
    ref = F.linear(x.float(), W, b)
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


class _HashedProvider(Provider):
    strategy = "fused"
    align = 8  # the preset shapes are multiples of 8: the kernels' vectorised (hinted) loads apply
    role = OURS

    def not_supported_reasons(self, device, dtype, pattern):
        reasons = []
        if device.type != "cuda":
            reasons.append("hashed layers are timed on a GPU only (tests/test_hashed.py checks them on the CPU)")
        if pattern != "unstructured":
            reasons.append("a hashed layer does not depend on the FiPS pattern: timed in the unstructured rows")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {dtype} is not supported")
        return reasons

    def prepare(self, case: LayerCase) -> Prepared:
        layer = build_layer(case.in_features, case.out_features, BUDGET, "stable", case.dtype, case.device,
                            bias=case.dense_bias is not None, align=self.align)
        for p in layer.parameters():
            p.requires_grad_(False)
        strategy = self.strategy
        x = case.make_input(16)
        with _strategy(strategy):
            err = _check(layer, x, layer(x))
        if not err <= CHECK_TOLERANCE[case.dtype]:
            raise RuntimeError(f"hashed layer output is wrong: rel_err {err:.3g} vs the fp32 reference")

        def run(x):
            with _strategy(strategy):
                return layer(x)

        def backend(M):
            p = problem("hashed_linear", layer.spec, case.dtype, case.device, M)
            name = select(p, layer.spec)
            return f"{name}/{strategy}" if name == "triton" else name

        mem = layer.shared_memory.weight
        return Prepared(run=run, weight_bytes=tensor_bytes(mem, layer.bias), flops=lambda M: dense_flops(case, M),
                        backend=backend, same_layer=False)


@register
class HashedFwd(_HashedProvider):
    name = "hashed_fwd"
    description = (f"STABLE-RPS HashedLinear (align 8) with an array of {BUDGET:g}× the layer's weights: the fused "
                   f"Triton kernel loads hashed tiles of W inside the matmul (W never in memory)")
    strategy = "fused"


@register
class HashedMaterialize(_HashedProvider):
    name = "hashed_materialize"
    description = "the same hashed layer, W gathered by a Triton kernel into a temporary, then cuBLAS"
    strategy = "materialize"


# ---------------------------------------------------------------- forward + backward sweep

COLUMNS = ("shape", "in_features", "out_features", "M", "method", "budget", "align", "slots", "dtype", "provider",
           "role", "pass",
           "backend", "status", "reason", "time_ms", "ratio_vs_dense", "rel_err") + METADATA_COLUMNS
ROLES = {"dense": BASELINE, "hashed": OURS, "hashed_deterministic": OURS, "hashed_materialize": OURS}


def _preset_shapes() -> List[Tuple[str, int, int]]:
    out = []
    for p in PRESETS.values():
        out.append((f"{p.name}:{p.layer_name('expand')}", p.d, p.h))
        out.append((f"{p.name}:{p.layer_name('contract')}", p.h, p.d))
    return out


DEFAULT_SHAPES: List[Tuple[str, int, int]] = _preset_shapes()  # (name, in_features, out_features)
DEFAULT_M: Tuple[int, ...] = (256, 1024, 4096, 16384)
PROVIDER_NAMES = ("dense", "hashed", "hashed_deterministic", "hashed_materialize")


def run_sweep(*, shapes: Sequence[Tuple[str, int, int]] = DEFAULT_SHAPES, ms: Sequence[int] = DEFAULT_M,
              methods: Sequence[str] = ("stable", "roast"), budgets: Sequence[float] = (0.5, 0.1),
              aligns: Sequence[int] = (1, 8), dtype: torch.dtype = torch.bfloat16,
              device: Optional[torch.device] = None, out=None,
              reps: int = 5, warmup_ms: float = 25.0, rep_ms: float = 100.0, backend: Optional[str] = None,
              log: Callable[[str], None] = print) -> List[Dict[str, str]]:
    """Time dense vs hashed layers, forward and forward+backward; write ``out`` (CSV) row by row.

    Providers: ``dense`` (``F.linear``, autograd), ``hashed`` (the dispatched
    op; array gradient with atomics), ``hashed_deterministic`` (backward only:
    the fixed-order array gradient), ``hashed_materialize`` (GPU: ``W``
    gathered then cuBLAS, forward and input gradient). ``ratio_vs_dense`` is
    time / dense time of the same pass (>1: slower than dense). ``backend``
    forces a backend (e.g. ``reference`` on a CPU without the interpreter).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = TimingConfig(warmup_ms=warmup_ms, rep_ms=rep_ms, cpu_warmup=1, cpu_reps=reps)
    meta = run_metadata(device)
    out = Path(out or f"hashed_bench_{device.type}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    dname = str(dtype).replace("torch.", "")
    log(f"device {device} ({meta['gpu_name']}), dtype {dname}, torch {meta['torch']}, triton {meta['triton']}, "
        f"commit {meta['commit']}; writing {out}")
    rows: List[Dict[str, str]] = []
    force = dispatch.use_backend(backend) if backend else contextlib.nullcontext()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU timings only check the harness; one thread avoids scheduler stalls
    try:
        with RowWriter(out, COLUMNS, on_row=rows.append) as writer, force:
            for shape, in_f, out_f in shapes:
                for method in methods:
                    for budget in budgets:
                        for align in aligns:
                            _sweep_layer(shape, in_f, out_f, method, budget, align, ms, dtype, device, cfg, meta,
                                         writer.emit, log)
    finally:
        torch.set_num_threads(threads)
    return rows


def _sweep_layer(shape, in_f, out_f, method, budget, align, ms, dtype, device, cfg, meta, emit, log) -> None:
    dname = str(dtype).replace("torch.", "")
    base = dict(meta, shape=shape, in_features=in_f, out_features=out_f, method=method, budget=budget, align=align,
                dtype=dname)
    try:
        layer = build_layer(in_f, out_f, budget, method, dtype, device, align=align)
    except Exception as exc:  # noqa: BLE001
        for M in ms:
            emit(dict(base, M=M, status="failed", reason=f"building the layer failed: {type(exc).__name__}: {exc}"))
        return
    base["slots"] = layer.spec.size
    g = torch.Generator(device=device).manual_seed(0)
    W = (torch.randn(out_f, in_f, generator=g, device=device) / math.sqrt(in_f)).to(dtype).requires_grad_(True)
    b = torch.zeros(out_f, device=device, dtype=dtype, requires_grad=True)
    for M in ms:
        x = torch.randn(M, in_f, generator=g, device=device).to(dtype)
        gy = torch.randn(M, out_f, generator=g, device=device).to(dtype)
        xg = x.clone().requires_grad_(True)
        p = problem("hashed_linear", layer.spec, dtype, device, M)
        try:
            chosen = select(p, layer.spec)
        except dispatch.BackendUnavailable as exc:
            chosen, why = None, str(exc).splitlines()[0]
        dense_t: Dict[str, float] = {}

        def dense_fwd():
            with torch.no_grad():
                return F.linear(x, W, b)

        def dense_bwd():
            y = F.linear(xg, W, b)
            y.backward(gy)

        def hashed_fwd():
            with torch.no_grad():
                return layer(x)

        def hashed_bwd():
            layer(xg).backward(gy)

        cases = [("dense", "fwd", dense_fwd, None, False, "torch"), ("dense", "fwd_bwd", dense_bwd, None, False,
                                                                      "torch")]
        for prov, strategy, det in (("hashed", None, False), ("hashed_deterministic", None, True),
                                    ("hashed_materialize", "materialize", False)):
            be = f"{chosen}/{strategy or 'fused'}" if chosen == "triton" else chosen
            if prov != "hashed_deterministic":
                cases.append((prov, "fwd", hashed_fwd, strategy, det, be))
            cases.append((prov, "fwd_bwd", hashed_bwd, strategy, det, be))
        rel = None
        for prov, pas, fn, strategy, det, be in cases:
            row = dict(base, M=M, provider=prov, role=ROLES[prov], **{"pass": pas}, backend=be or "")
            if prov != "dense" and chosen is None:
                emit(dict(row, status="skipped", reason=why))
                continue
            if strategy == "materialize" and chosen != "triton":
                emit(dict(row, status="skipped", reason="the materialize strategy is the Triton backend's"))
                continue
            try:
                with _strategy(strategy), deterministic_gradients(det):
                    if prov == "hashed" and pas == "fwd":
                        rel = _check(layer, x, fn())
                    t = time_ms(fn, device, cfg)
            except Exception as exc:  # noqa: BLE001
                emit(dict(row, status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
                continue
            finally:
                xg.grad = None
                W.grad = b.grad = None
                for q in layer.parameters():
                    q.grad = None
            if prov == "dense":
                dense_t[pas] = t
            ratio = t / dense_t[pas] if pas in dense_t else None
            emit(dict(row, status="ok", time_ms=t, ratio_vs_dense=ratio,
                      rel_err=rel if prov == "hashed" and pas == "fwd" else None))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log(f"{shape} {method} budget {budget} align {align}: done")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Hashed (ROAST / STABLE-RPS) layers vs dense, forward and backward")
    ap.add_argument("--m", type=int, nargs="+", help="rows of x (default 256 1024 4096 16384; tiny: 8 32)")
    ap.add_argument("--methods", nargs="+", default=["stable", "roast"], choices=list(mapping.METHODS))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.1])
    ap.add_argument("--aligns", type=int, nargs="+", default=[1, 8],
                    help="mapping alignment(s): 8 lets the kernels vectorise loads (default: both)")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default bf16 on a GPU, fp32 on a CPU)")
    ap.add_argument("--tiny", action="store_true", help="small shapes: checks the harness in seconds")
    ap.add_argument("--backend", default=None, help="force a backend (reference | triton)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tiny = args.tiny or device.type == "cpu"
    shapes = [("tiny:expand", 64, 256), ("tiny:contract", 256, 64)] if tiny else DEFAULT_SHAPES
    ms = args.m or ([8, 32] if tiny else list(DEFAULT_M))
    backend = args.backend or ("reference" if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"
                               else None)
    if device.type == "cpu":
        print("note: no CUDA GPU: tiny shapes on the CPU; these timings only check the harness", file=sys.stderr)
    rows = run_sweep(shapes=shapes, ms=ms, methods=args.methods, budgets=args.budgets, aligns=args.aligns,
                     dtype=dtype, device=device, out=args.out, backend=backend)
    bad = [r for r in rows if r["status"] == "failed"]
    for r in rows:
        if r["status"] == "ok" and r["provider"] != "dense":
            print(f"{r['shape']:28s} {r['method']:6s} p={r['budget']:4s} A={r['align']} M={r['M']:>6s} "
                  f"{r['provider']:21s} "
                  f"{r['pass']:7s} {float(r['time_ms']):9.4f} ms  x{r['ratio_vs_dense']} of dense")
    for r in bad:
        print(f"FAILED {r['shape']} {r['method']} M={r['M']} {r['provider']} {r['pass']}: {r['reason']}")
    return 1 if bad else 0
