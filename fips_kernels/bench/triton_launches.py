"""Which Triton kernels a set of benchmark rows compiles, found by running the
code that launches them, without a GPU; and compiling them ahead, in parallel.

:class:`LaunchRecorder` replaces every Triton kernel object of
``fips_kernels.triton`` by a proxy that records each launch instead of running
it, and makes the launch code believe it runs on a target GPU (its SM count,
autotuning on or off, its rows of ``tuning/triton_configs.json``). The
benchmark's own provider code then runs on ``meta`` tensors of the real
shapes (nothing is computed or allocated), so the launches recorded are the
ones the rows would make (:func:`row_launches`).

A *compile* is one specialization of one kernel: its ``constexpr`` values,
block sizes, warps and stages, the dtypes of its tensors, and each integer
argument as Triton specializes it (equal to 1, a multiple of 16, or other).
An autotuned launch compiles every config its ``early_config_prune`` keeps for
a key not seen before. This mirrors Triton's own cache key closely enough to
count; it is not Triton's code.

:func:`precompile` (GPU only) hands each compile to ``JITFunction.warmup`` in
a pool of processes: Triton compiles it into its on-disk cache without
launching, so the timed run that follows finds every kernel compiled instead
of compiling them one after another (~1.3 s each on Triton 3.6 / sm_90).
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["Target", "H200", "Launch", "LaunchRecorder", "row_launches", "meta_factor", "precompile"]


@dataclass(frozen=True)
class Target:
    """The GPU the launches are planned for."""

    name: str  # torch.cuda.get_device_name, the key of tuning/triton_configs.json
    sm_count: int
    autotune: bool = False
    use_table: bool = True  # look up tuning/triton_configs.json (the tuned stage turns it off)


H200 = Target("NVIDIA H200", 132)  # the lent GPU (device README: 132 SMs, sm_90)


@dataclass
class Launch:
    """One recorded launch: the kernel, its arguments (tensors as their dtypes) and, for an
    autotuned launch, the configs that would be compiled for it (empty when its key was seen)."""

    module: str
    kernel: str
    args: Tuple
    kwargs: Dict
    configs: List[Dict] = field(default_factory=list)  # autotuned: kwargs of each kept config

    def compiles(self, constexprs: Sequence[str], unspecialized: Sequence[str] = (),
                 arg_names: Sequence[str] = ()) -> List[Tuple]:
        """The compile keys of this launch (one, or one per autotune config)."""
        def spec(name, v):
            if name in constexprs or name in ("num_warps", "num_stages"):
                return (name, str(v))
            if name in unspecialized:
                return (name, "any")
            if isinstance(v, torch.dtype):
                return (name, str(v))
            if isinstance(v, bool) or v is None:
                return (name, v)
            if isinstance(v, int):
                return (name, "1" if v == 1 else "d16" if v % 16 == 0 else "i")
            return (name, type(v).__name__)

        names = list(arg_names) + [f"#{i}" for i in range(len(arg_names), len(self.args))]
        base = tuple(spec(k, v) for k, v in self.kwargs.items()) + tuple(
            spec(n, v) for n, v in zip(names, self.args))
        if not self.configs:
            return [(self.module, self.kernel) + base]
        return [(self.module, self.kernel) + base + tuple(spec(k, v) for k, v in sorted(c.items()))
                for c in self.configs]


def _constexprs(kernel) -> List[str]:
    fn = getattr(kernel, "fn", kernel)
    while hasattr(fn, "fn") and not inspect.isfunction(fn):
        fn = fn.fn
    params = inspect.signature(fn).parameters
    return [n for n, p in params.items() if "constexpr" in str(p.annotation)]


def _unspecialized(kernel) -> List[str]:
    """Integer arguments the kernel asks Triton not to specialize (``do_not_specialize``)."""
    if hasattr(kernel, "params"):  # a JITFunction
        return [p.name for p in kernel.params if getattr(p, "do_not_specialize", False)]
    names = (getattr(kernel, "kwargs", None) or {}).get("do_not_specialize") or []  # the interpreter's
    return [n for n in names if isinstance(n, str)]


def _is_kernel(obj) -> bool:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    kinds = [JITFunction, Autotuner]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        kinds.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - Triton without the interpreter
        pass
    return isinstance(obj, tuple(kinds))


def _plain(v):
    """A recorded argument: a tensor becomes its dtype (what specializes a compile)."""
    return v.dtype if isinstance(v, torch.Tensor) else v


class _Proxy:
    def __init__(self, recorder: "LaunchRecorder", module: str, name: str, kernel):
        self.recorder, self.module, self.name, self.kernel = recorder, module, name, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.recorder._record(self, args, kwargs)


class LaunchRecorder:
    """Within ``with LaunchRecorder(target) as rec:``, Triton launches of ``fips_kernels.triton``
    are recorded in ``rec.launches`` instead of run (see the module docstring)."""

    MODULES = ("fips_kernels.triton.sparse_matmul", "fips_kernels.triton.tile_reconstruct",
               "fips_kernels.triton.hashed")

    def __init__(self, target: Target = H200):
        self.target = target
        self.launches: List[Launch] = []
        self._keys_seen: Dict[Tuple, bool] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "LaunchRecorder":
        import importlib

        from ..triton import sparse_matmul as sm

        patch = self._stack.enter_context(_patcher())
        for modname in self.MODULES:
            mod = importlib.import_module(modname)
            for name, obj in list(vars(mod).items()):
                if _is_kernel(obj):
                    patch(mod, name, _Proxy(self, modname.rsplit(".", 1)[1], name, obj))
        target = self.target
        patch(sm, "_on_gpu", lambda device: True)
        patch(sm, "_sm_count", lambda device: target.sm_count)
        patch(sm, "AUTOTUNE", target.autotune)
        patch(sm, "_table_config", self._table_config)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _table_config(self, device, key, split_k):
        from ..triton import sparse_matmul as sm
        from ..tuning import triton_configs

        if not self.target.use_table:
            return None
        found = triton_configs._index(self.target.name).get(
            triton_configs._frozen(dict(key, DOT_DTYPE=str(key["DOT_DTYPE"]))))
        if found is None or not sm.valid_blocks(key, found["BLOCK_M"], found["BLOCK_N"], found["BLOCK_K"]):
            return None
        return sm.LaunchConfig(found["BLOCK_M"], found["BLOCK_N"], found["BLOCK_K"], split_k,
                               found.get("num_warps", 4), found.get("num_stages", sm.NUM_STAGES))

    def _record(self, proxy: _Proxy, args, kwargs) -> None:
        from triton.runtime.autotuner import Autotuner

        kernel = proxy.kernel
        plain_args = tuple(_plain(a) for a in args)
        plain_kwargs = {k: _plain(v) for k, v in kwargs.items()}
        launch = Launch(proxy.module, proxy.name, plain_args, plain_kwargs)
        if isinstance(kernel, Autotuner):
            named = dict(zip(kernel.arg_names, args), **kwargs)
            key = tuple(named[k] for k in kernel.keys) + tuple(
                str(v.dtype) for v in named.values() if isinstance(v, torch.Tensor))
            key = (proxy.module, proxy.name) + key
            if key not in self._keys_seen:
                self._keys_seen[key] = True
                nargs = dict(zip(kernel.arg_names, args))
                kept = kernel.early_config_prune(kernel.configs, nargs, **kwargs) if kernel.early_config_prune \
                    else kernel.configs
                launch.configs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept]
            else:
                return  # the autotuner's cache: no compile, no benchmark
        self.launches.append(launch)

    def compiles(self) -> Dict[Tuple, Launch]:
        """Distinct compiles -> a launch that makes it."""
        out: Dict[Tuple, Launch] = {}
        for launch in self.launches:
            kernel = _kernel(launch)
            jit = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner's kernel
            for key in launch.compiles(_constexprs(kernel), _unspecialized(jit), getattr(jit, "arg_names", ())):
                out.setdefault(key, launch)
        return out

    def autotune_benchmarks(self) -> int:
        """Configs the autotuner would time (one do_bench each)."""
        return sum(len(launch.configs) for launch in self.launches)


@contextlib.contextmanager
def _patcher() -> Iterator:
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        yield patch
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _kernel(launch: Launch):
    import importlib

    mod = importlib.import_module(f"fips_kernels.triton.{launch.module}")
    obj = getattr(mod, launch.kernel)
    return obj.kernel if isinstance(obj, _Proxy) else obj


# ---------------------------------------------------------------- the rows' operands, as meta tensors

def meta_factor(K: int, N: int, pattern, dtype: torch.dtype):
    """A ``SparseFactor`` of shape ``(K, N)`` in ``pattern``'s format on the ``meta`` device: a small
    factor packed for real (so the format's tensors and their dtypes are the format's own), its
    tensors moved to ``meta`` and its shape set to ``(K, N)`` (nothing validated, nothing allocated)."""
    from ..formats import SparseFactor
    from .cases import random_factor

    small = random_factor(64, 64, pattern, dtype, torch.Generator().manual_seed(0), torch.device("cpu"))
    meta = [K, N] + [int(v) for v in small.meta[2:]]
    scales = small.scales.to("meta") if small.quantized else None
    return SparseFactor.from_parts(small.format, meta, small.values.to("meta"),
                                   [t.to("meta") for t in small.aux_tensors], validate=False, scales=scales)


def _meta_base(d: int, r: int, pattern, dtype: torch.dtype):
    """The base operand ``U (d × r)`` on ``meta``: a float tensor, or the int8 base as
    :class:`~fips_kernels.modules.SharedBase` makes it — a quantised ``dense`` factor, whose values are
    ``(d, r)`` int8 (the reconstruct strategies dequantise them, so their shape must be right) with one
    scale per column."""
    if not pattern.qbits:
        return torch.empty(d, r, dtype=dtype, device="meta")
    from ..formats import SparseFactor
    from ..modules import SharedBase

    small = SharedBase(torch.randn(64, 64).to(dtype))
    small.quantize_(8)
    op = small.operand
    assert op.format == "dense" and op.qbits == 8 and op.scales.shape[0] == 1, "SharedBase's int8 layout changed"
    meta = [d, r] + [int(v) for v in op.meta[2:]]
    meta[5] = d  # one scale per column: a group of all d rows
    return SparseFactor.from_parts("dense", meta, torch.empty(d, r, dtype=op.values.dtype, device="meta"), [],
                                   validate=False, scales=torch.empty(1, r, dtype=op.scales.dtype, device="meta"))


def row_launches(config, target: Target = H200) -> LaunchRecorder:
    """Record the Triton launches of every row of a layer-benchmark ``config``
    (:class:`~.layer.BenchConfig`) whose provider runs Triton kernels through a
    backend's strategies (``provider.triton_strategy``); the others (dense,
    cuda_*, the peers, and ``fips``, which dispatch sends to the cuda backend on
    a GPU with the extension built) launch no Triton kernel."""
    from ..triton import strategies
    from .providers import PROVIDERS, forced_strategy_run
    from .shapes import ALL_PRESETS, PATTERNS, preset_rank

    rec = LaunchRecorder(target)
    triton_providers = [p for p in config.providers if getattr(PROVIDERS[p], "triton_strategy", None)]
    with rec, torch.no_grad():
        for preset_name in config.presets:
            preset = ALL_PRESETS[preset_name]
            for pattern_name in config.patterns:
                pattern = PATTERNS[pattern_name]
                if "layer" not in config.scopes:
                    continue
                r = preset_rank(preset, pattern)
                U = _meta_base(preset.d, r, pattern, config.dtype)
                for kind in ("expand", "contract"):
                    K, N = (r, preset.h) if kind == "expand" else (preset.h, r)
                    factor = meta_factor(K, N, pattern, config.dtype)
                    out_f, in_f = (preset.h, preset.d) if kind == "expand" else (preset.d, preset.h)
                    bias = torch.empty(out_f, dtype=config.dtype, device="meta") if preset.bias else None
                    for name in triton_providers:
                        prov = PROVIDERS[name]
                        if prov.not_supported_reasons(torch.device("cuda"), config.dtype, pattern_name):
                            continue
                        run = forced_strategy_run(strategies.STRATEGIES, kind, U, factor, bias, prov.triton_strategy)
                        for M in config.ms:
                            run(torch.empty(M, in_f, dtype=config.dtype, device="meta"))
    return rec


# ---------------------------------------------------------------- compiling ahead (GPU only)

def _warm(item) -> Optional[str]:
    module, kernel_name, args, kwargs = item
    import importlib

    try:
        kernel = getattr(importlib.import_module(f"fips_kernels.triton.{module}"), kernel_name)
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner: its kernel, config given
        fn.warmup(*args, grid=(1,), **kwargs)
        return None
    except Exception as exc:  # noqa: BLE001 - the timed run then compiles it itself
        return f"{kernel_name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def precompile(recorder: LaunchRecorder, workers: Optional[int] = None) -> Tuple[int, List[str]]:
    """Compile every recorded compile into Triton's on-disk cache with ``JITFunction.warmup`` in
    ``workers`` processes. Returns (compiles handed out, errors). GPU only."""
    import multiprocessing as mp

    items = []
    for key, launch in recorder.compiles().items():
        configs = launch.configs or [{}]
        for cfg in configs:
            items.append((launch.module, launch.kernel, launch.args, dict(launch.kwargs, **cfg)))
    items = list({repr(i): i for i in items}.values())
    if not items:
        return 0, []
    workers = workers or max(1, min(len(items), (os.cpu_count() or 2) - 2))
    with mp.get_context("spawn").Pool(workers) as pool:
        errors = [e for e in pool.map(_warm, items) if e]
    return len(items), errors
