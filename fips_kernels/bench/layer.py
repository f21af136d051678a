"""The layer benchmark behind ``fips-kernels bench``.

For every preset × sparsity pattern it builds one expand and one contract
layer from random factors (:mod:`.cases`), then for every M and provider
(:mod:`.providers`) times one call and writes one CSV row — incrementally, so
an interrupted run keeps its rows. Each row carries the roofline of this run
(bandwidth and peak measured at the start, :mod:`.timing`) and where it ran
(:mod:`.env`). See ``benchmarks/results/README.md`` for the columns.
"""
from __future__ import annotations

import csv
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import reference
from .cases import LayerCase, build_cases
from .group import GROUP_PROVIDERS, build_group_case, group_provider_reasons
from .env import run_metadata, utc_now
from .providers import PROVIDERS, Prepared
from .shapes import ALL_PRESETS, DEFAULT_M, PATTERNS, PRESETS, TINY_M, TINY_PRESETS
from .timing import TimingConfig, measure_roofline, time_ms

__all__ = [
    "COLUMNS",
    "METADATA_COLUMNS",
    "BenchConfig",
    "BenchError",
    "DTYPES",
    "resolve_config",
    "run",
    "summary_table",
    "summarize_csv",
]

METADATA_COLUMNS = ("device", "gpu_name", "driver", "torch", "triton", "cuda", "date", "commit")
COLUMNS = (
    "preset", "d", "h", "r", "kind", "layer", "pattern", "format", "dtype", "M", "provider", "backend",
    "status", "reason", "time_ms", "bytes", "flops", "roofline_ms", "frac_of_roofline",
    "speedup_vs_dense", "compressed_ratio", "group_compressed_ratio", "rel_err",
    "bandwidth_GBps", "peak_TFLOPs",
) + METADATA_COLUMNS

DTYPES: Dict[str, torch.dtype] = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# rel_err above this (vs the fp32 reference) flags a row: fp32 allows TF32 kernels.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-2}
CPU_NOTE = "CPU timings only check the harness: they are not kernel figures."
# layer: one layer per timed call (U read by every call); group: all layers of
# a group back to back (U can stay in L2 between them, as in a model).
SCOPES = ("layer", "group")


class BenchError(ValueError):
    """A bad benchmark argument (unknown preset, provider, dtype, ...)."""


@dataclass(frozen=True)
class BenchConfig:
    presets: Tuple[str, ...]
    patterns: Tuple[str, ...]
    ms: Tuple[int, ...]
    providers: Tuple[str, ...]
    dtype: torch.dtype
    device: torch.device
    out: Path
    timing: TimingConfig = field(default_factory=TimingConfig)
    seed: int = 0
    check: bool = True
    progress: bool = True
    notes: Tuple[str, ...] = ()
    scopes: Tuple[str, ...] = ("layer", "group")

    @property
    def points(self) -> int:
        """Rows the sweep writes."""
        per_point = 0
        if "layer" in self.scopes:
            per_point += 2 * len(self.providers)
        if "group" in self.scopes:
            per_point += len(GROUP_PROVIDERS)
        return len(self.presets) * len(self.patterns) * len(self.ms) * per_point


def _choose(kind: str, given: Optional[Sequence[str]], known: Iterable[str], default: Sequence[str]) -> Tuple[str, ...]:
    known = list(known)
    if given is None:
        return tuple(default)
    names = [g.strip() for g in given if g.strip()]
    if not names:
        raise BenchError(f"no {kind} given; choose from {', '.join(known)}")
    bad = [n for n in names if n not in known]
    if bad:
        raise BenchError(f"unknown {kind} {', '.join(repr(b) for b in bad)}; choose from {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def timing_overrides(timing: TimingConfig, warmup_ms: Optional[float], rep_ms: Optional[float],
                     reps: Optional[int]) -> TimingConfig:
    """``timing`` with the command line's ``--warmup-ms``, ``--rep-ms``, ``--reps`` (checked)."""
    if warmup_ms is not None:
        if warmup_ms < 0:
            raise BenchError(f"--warmup-ms must be >= 0, got {warmup_ms}")
        timing = replace(timing, warmup_ms=float(warmup_ms))
    if rep_ms is not None:
        if rep_ms <= 0:
            raise BenchError(f"--rep-ms must be > 0, got {rep_ms}")
        timing = replace(timing, rep_ms=float(rep_ms))
    if reps is not None:
        if reps < 1:
            raise BenchError(f"--reps must be >= 1, got {reps}")
        timing = replace(timing, cpu_reps=int(reps))
    return timing


def resolve_device(device: Optional[str]) -> torch.device:
    """``cuda`` (the current GPU) when available and not told otherwise, else ``cpu``;
    :class:`BenchError` for an unknown device or ``cuda`` without a GPU."""
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise BenchError(f"unknown device {device!r}; use cpu or cuda") from None
        if dev.type not in ("cpu", "cuda"):
            raise BenchError(f"device {device!r} is not supported; use cpu or cuda")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda, but torch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_config(*, presets: Optional[Sequence[str]] = None, patterns: Optional[Sequence[str]] = None,
                   ms: Optional[Sequence[int]] = None, providers: Optional[Sequence[str]] = None,
                   dtype: Optional[str] = None, device: Optional[str] = None, tiny: bool = False,
                   out: Optional[str] = None, warmup_ms: Optional[float] = None,
                   rep_ms: Optional[float] = None, reps: Optional[int] = None, seed: int = 0,
                   check: bool = True, progress: bool = True,
                   scopes: Optional[Sequence[str]] = None) -> BenchConfig:
    """Validate the arguments of a sweep and fill in the defaults.

    Without CUDA and without a choice of presets or M, the tiny sweep runs on
    the CPU (it checks the harness in seconds). Raises :class:`BenchError`.
    """
    notes: List[str] = []
    dev = resolve_device(device)

    if dev.type == "cpu" and not tiny and presets is None and ms is None:
        tiny = True
        notes.append("no CUDA GPU: running the tiny sweep on the CPU (choose --presets/--m for others).")
    if dev.type == "cpu":
        notes.append(CPU_NOTE)

    preset_default = list(TINY_PRESETS) if tiny else list(PRESETS)
    chosen_presets = _choose("preset", presets, ALL_PRESETS, preset_default)
    if dev.type == "cpu" and any(p in PRESETS for p in chosen_presets):
        notes.append("full-size presets on the CPU are slow (minutes per preset) and only check the harness.")
    chosen_patterns = _choose("pattern", patterns, PATTERNS, list(PATTERNS))
    chosen_providers = _choose("provider", providers, PROVIDERS, list(PROVIDERS))
    if "dense" not in chosen_providers:
        chosen_providers = ("dense",) + chosen_providers
        notes.append("dense is always timed: it is the baseline of speedup_vs_dense.")
    else:  # dense first, so every other row of a point can use its time
        chosen_providers = ("dense",) + tuple(p for p in chosen_providers if p != "dense")

    if ms is None:
        chosen_ms = tuple(TINY_M if tiny else DEFAULT_M)
    else:
        chosen_ms = tuple(dict.fromkeys(int(m) for m in ms))
        if not chosen_ms or any(m < 1 for m in chosen_ms):
            raise BenchError(f"--m needs positive integers, got {list(ms)}")

    if dtype is None:
        torch_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    else:
        key = str(dtype).strip().lower()
        if key not in DTYPES:
            raise BenchError(f"unknown dtype {dtype!r}; choose from bf16, fp16, fp32")
        torch_dtype = DTYPES[key]
    if dev.type == "cpu" and torch_dtype == torch.bfloat16:
        raise BenchError("--dtype bf16 is not timed on the CPU: bf16 arithmetic is wrong under the Triton "
                         "interpreter (DESIGN §7) and CPU bf16 timings say nothing about the kernels; use fp32 "
                         "(the CPU default) or fp16 on the CPU, and bf16 on a GPU")

    timing = TimingConfig()
    if tiny:
        timing = replace(timing, warmup_ms=5.0, rep_ms=20.0, cpu_warmup=1, cpu_reps=3)
    timing = timing_overrides(timing, warmup_ms, rep_ms, reps)

    if out is None:
        out_path = Path.cwd() / f"fips_bench_{dev.type}_{utc_now():%Y%m%dT%H%M%SZ}.csv"
    else:
        out_path = Path(out)
        if out_path.is_dir():
            raise BenchError(f"--out {out} is a directory; give a file name")
    chosen_scopes = _choose("scope", scopes, SCOPES, SCOPES)
    return BenchConfig(chosen_presets, chosen_patterns, chosen_ms, chosen_providers, torch_dtype, dev,
                       out_path, timing, seed, check, progress, tuple(notes), chosen_scopes)


# ---------------------------------------------------------------- the sweep

def _fmt(v, digits: int = 6) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return msg if len(msg) <= 300 else msg[:297] + "..."


class _Reference:
    """fp32 reference output of a case (the dense V built once)."""

    def __init__(self, case: LayerCase):
        self.case = case
        self._args = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._args is None:
            c = self.case
            b = c.layer.bias
            self._args = (c.layer.base.matrix().detach().float(), c.layer.V.detach().float(),
                          b.detach().float() if b is not None else None)
        U, V, b = self._args
        return reference.fips_linear(x.float(), U, V, self.case.kind, b)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(config: BenchConfig, *, log: Callable[[str], None] = print) -> List[Dict[str, str]]:
    """Run the sweep, writing ``config.out`` row by row; returns the rows written.

    On the CPU the sweep runs on one thread (restored afterwards): CPU numbers
    only check the harness, and on a shared machine a multi-threaded tiny GEMM
    waits whole scheduler slices for its workers.
    """
    threads = torch.get_num_threads()
    if config.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(config, log)
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchConfig, log: Callable[[str], None]) -> List[Dict[str, str]]:
    from tqdm.auto import tqdm

    device, dtype, cfg = config.device, config.dtype, config.timing
    meta = run_metadata(device)
    for note in config.notes:
        log(f"note: {note}")
    log(f"device {device} ({meta['gpu_name']}), dtype {DTYPE_NAMES[dtype]}, torch {meta['torch']}, "
        f"triton {meta['triton']}, commit {meta['commit']}")
    bw, peak = measure_roofline(device, dtype, cfg)
    log(f"roofline of this run: copy bandwidth {bw / 1e9:.1f} GB/s, {DTYPE_NAMES[dtype]} GEMM "
        f"{peak / 1e12:.3g} TFLOP/s")
    log(f"writing {config.points} rows to {config.out}")
    config.out.parent.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    common = {"dtype": DTYPE_NAMES[dtype], "bandwidth_GBps": _fmt(bw / 1e9), "peak_TFLOPs": _fmt(peak / 1e12),
              **meta}
    rows: List[Dict[str, str]] = []
    bar = tqdm(total=config.points, disable=not config.progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5, desc="fips bench")
    try:
        _run_sweep(config, common, itemsize, bw, peak, rows, bar)
    finally:
        bar.close()
    return rows


def _run_sweep(config, common, itemsize, bw, peak, rows, bar) -> None:
    with open(config.out, "w", newline="") as f, torch.no_grad():
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        f.flush()

        def emit(row: Dict[str, object]) -> None:
            full = {k: _fmt(row.get(k)) for k in COLUMNS}
            writer.writerow(full)
            f.flush()
            rows.append(full)
            bar.update(1)

        for preset_name in config.presets:
            preset = ALL_PRESETS[preset_name]
            for pattern_name in config.patterns:
                pattern = PATTERNS[pattern_name]
                _sweep_pattern(config, preset, pattern, common, itemsize, bw, peak, emit, bar)


def _sweep_pattern(config, preset, pattern, common, itemsize, bw, peak, emit, bar) -> None:
    if "layer" in config.scopes:
        _sweep_layers(config, preset, pattern, common, itemsize, bw, peak, emit, bar)
    if "group" in config.scopes:
        _sweep_group(config, preset, pattern, common, bw, peak, emit, bar)


def _sweep_group(config, preset, pattern, common, bw, peak, emit, bar) -> None:
    """All layers of one group back to back, per provider (see :mod:`.group`)."""
    device, dtype = config.device, config.dtype
    base = dict(common, preset=preset.name, d=preset.d, h=preset.h, kind="group", pattern=pattern.name,
                format=pattern.format,
                layer=f"{preset.blocks}x({'+'.join(preset.expand_names + preset.contract_names)})")
    try:
        case, error = build_group_case(preset, pattern, dtype, device, seed=config.seed), None
        base["r"] = case.rank
    except Exception as exc:  # noqa: BLE001
        case, error = None, f"building the group failed: {_describe(exc)}"
        _free(device)
    prepared, reasons = {}, {}
    for name, make in GROUP_PROVIDERS.items():
        why = [error] if error else group_provider_reasons(name, preset)
        if why:
            reasons[name] = "; ".join(why)
            continue
        try:
            prepared[name] = make(case)
        except Exception as exc:  # noqa: BLE001
            reasons[name] = f"preparing failed: {_describe(exc)}"
    for M in config.ms:
        xs = case.inputs(M) if case is not None else None
        dense_ms = None
        for name in GROUP_PROVIDERS:
            bar.set_postfix_str(f"{preset.name} group {pattern.name} M={M} {name}", refresh=False)
            row = dict(base, M=M, provider=name, backend="torch" if name in ("dense", "two_gemm") else "")
            if name in reasons:
                failed = reasons[name].startswith(("building", "preparing"))
                emit(dict(row, status="failed" if failed else "skipped", reason=reasons[name]))
                continue
            run_fn, weight_bytes, flops_fn = prepared[name]
            try:
                if name.startswith("fips"):
                    layer = case.layers[0]
                    row["backend"] = _dispatched_backend(layer, M)
                t = time_ms(lambda: run_fn(xs), device, config.timing)
            except Exception as exc:  # noqa: BLE001
                _free(device)
                emit(dict(row, status="failed", reason=f"running failed: {_describe(exc)}"))
                continue
            nbytes = weight_bytes + case.activation_bytes(M)
            flops = flops_fn(M)
            roof = max(nbytes / bw, flops / peak) * 1e3
            if name == "dense":
                dense_ms = t
            emit(dict(row, status="ok", time_ms=t, bytes=nbytes, flops=flops, roofline_ms=roof,
                      frac_of_roofline=roof / t, speedup_vs_dense=(dense_ms / t) if dense_ms else None,
                      compressed_ratio=case.dense_bytes / weight_bytes,
                      group_compressed_ratio=case.dense_bytes / case.fips_bytes))


def _dispatched_backend(layer, M: int) -> str:
    from .. import dispatch

    return dispatch.select(layer.dispatch_problem(M)).name


def _sweep_layers(config, preset, pattern, common, itemsize, bw, peak, emit, bar) -> None:
    device, dtype = config.device, config.dtype
    try:
        cases = build_cases(preset, pattern, dtype, device, seed=config.seed)
        build_error = None
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: skip the preset's rows, keep going
        cases, build_error = None, f"building the layers failed: {_describe(exc)}"
        _free(device)
    for kind in ("expand", "contract"):
        case = None if cases is None else next(c for c in cases if c.kind == kind)
        base = dict(common, preset=preset.name, d=preset.d, h=preset.h, kind=kind,
                    layer=preset.layer_name(kind), pattern=pattern.name, format=pattern.format,
                    r=case.rank if case else "")
        prepared: Dict[str, Prepared] = {}
        reasons: Dict[str, str] = {}
        failed = set()  # providers that broke (as opposed to ones that cannot run here)
        for name in config.providers:
            if build_error:
                reasons[name] = build_error
                failed.add(name)
                continue
            why = PROVIDERS[name].not_supported_reasons(device, dtype, pattern.name)
            if why:
                reasons[name] = "; ".join(why)
                continue
            try:
                prepared[name] = PROVIDERS[name].prepare(case)
            except Exception as exc:  # noqa: BLE001 - a peer torch lacks: a reason, not a crash
                reasons[name] = f"preparing failed: {_describe(exc)}"
                failed.add(name)
                _free(device)
        ref = _Reference(case) if case is not None and config.check else None
        for M in config.ms:
            x = case.make_input(M) if case is not None else None
            y_ref = None
            dense_ms = None
            for name in config.providers:
                bar.set_postfix_str(f"{preset.name} {kind} {pattern.name} M={M} {name}", refresh=False)
                row = dict(base, M=M, provider=name)
                if name in reasons:
                    emit(dict(row, status="failed" if name in failed else "skipped", reason=reasons[name]))
                    continue
                p = prepared[name]
                try:
                    row["backend"] = p.backend_for(M)
                    y = p.run(x)
                    if tuple(y.shape) != (M, case.out_features):
                        raise RuntimeError(f"output shape {tuple(y.shape)}, expected {(M, case.out_features)}")
                    note = ""
                    if ref is not None and p.same_layer:
                        if y_ref is None:
                            y_ref = ref(x)
                        err = _rel_err(y, y_ref)
                        row["rel_err"] = err
                        if not err <= TOLERANCE[dtype]:
                            note = f"WARNING: rel_err {err:.3g} vs the fp32 reference exceeds {TOLERANCE[dtype]}"
                    del y
                    t = time_ms(lambda: p.run(x), device, config.timing)
                except Exception as exc:  # noqa: BLE001
                    _free(device)
                    emit(dict(row, status="failed", reason=f"running failed: {_describe(exc)}"))
                    continue
                nbytes = p.weight_bytes + M * (case.in_features + case.out_features) * itemsize
                flops = p.flops(M)
                roof = max(nbytes / bw, flops / peak) * 1e3
                if name == "dense":
                    dense_ms = t
                emit(dict(row, status="ok", reason=note, time_ms=t, bytes=nbytes, flops=flops,
                          roofline_ms=roof, frac_of_roofline=roof / t,
                          speedup_vs_dense=(dense_ms / t) if dense_ms else None,
                          compressed_ratio=case.dense_weight_bytes / p.weight_bytes,
                          group_compressed_ratio=case.group_compressed_ratio if PROVIDERS[name].ours else None))
            del x, y_ref
        del prepared, ref
        _free(device)
    del cases
    _free(device)


# ---------------------------------------------------------------- summary

def _num(v) -> Optional[float]:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def summary_table(rows: Sequence[Dict[str, object]], providers: Optional[Sequence[str]] = None) -> str:
    """Speed-up over dense: one line per (preset, kind, pattern, provider), one column per M.

    ``-`` marks a skipped point."""
    ms: List[int] = []
    table: "OrderedDict[tuple, Dict[int, str]]" = OrderedDict()
    for row in rows:
        prov = str(row["provider"])
        if prov == "dense" or (providers is not None and prov not in providers):
            continue
        M = int(row["M"])
        if M not in ms:
            ms.append(M)
        key = (str(row["preset"]), str(row["kind"]), str(row["pattern"]), prov)
        s = _num(row.get("speedup_vs_dense"))
        cell = "-" if row.get("status") != "ok" else ("?" if s is None else f"{s:.2f}" if s >= 0.01 else f"{s:.0e}")
        table.setdefault(key, {})[M] = cell
    if not table:
        return "(no rows)"
    ms.sort()
    heads = ("preset", "kind", "pattern", "provider")
    widths = [max(len(h), *(len(k[i]) for k in table)) for i, h in enumerate(heads)]
    colw = [max(len(str(m)), 5) for m in ms]
    lines = ["speed-up over dense (dense time / time; >1 is faster), by M:",
             "  ".join(h.ljust(w) for h, w in zip(heads, widths)) + "  "
             + " ".join(str(m).rjust(w) for m, w in zip(ms, colw))]
    for key, cells in table.items():
        lines.append("  ".join(k.ljust(w) for k, w in zip(key, widths)) + "  "
                     + " ".join(cells.get(m, "").rjust(w) for m, w in zip(ms, colw)))
    return "\n".join(lines)


def summarize_csv(path, providers: Optional[Sequence[str]] = None) -> str:
    """:func:`summary_table` of a CSV written by :func:`run`."""
    with open(path, newline="") as f:
        return summary_table(list(csv.DictReader(f)), providers)
