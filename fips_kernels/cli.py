"""The ``fips-kernels`` command.

    fips-kernels compress [MODEL]     FiPS-compress a model's MLPs (default: all-MiniLM-L6-v2 on built-in text)
    fips-kernels info                 versions, CUDA extension, GPU, which backend runs a sample layer
    fips-kernels bench [options]      the layer benchmark (CSV + summary); see ``fips-kernels bench -h``
    fips-kernels bench-e2e [options]  whole models (DeiT-B, Swin-L, a Llama MLP stack), dense vs FiPS vs peers
    fips-kernels bench-quality [MODEL]  quality per byte: FiPS vs RTN, HQQ, GPTQ, SparseGPT, Wanda, torchao
    fips-kernels bench-cpu [options]  CPU speed of the compressed all-MiniLM-L6-v2: dense vs the two CPU modes
    fips-kernels --version

Also runs as ``python -m fips_kernels.cli``. Bad arguments print a one-line
error and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]

PROG = "fips-kernels"


def _split(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``--x a,b --x c`` / ``--x a b`` -> ``[a, b, c]``."""
    if values is None:
        return None
    return [v.strip() for item in values for v in str(item).split(",") if v.strip()]


def _ints(values: Optional[Sequence[str]], flag: str) -> Optional[List[int]]:
    names = _split(values)
    if names is None:
        return None
    try:
        return [int(v) for v in names]
    except ValueError:
        raise _UsageError(f"{flag} needs integers, got {', '.join(names)}") from None


class _UsageError(ValueError):
    pass


# ---------------------------------------------------------------- bench

def _bench(args: argparse.Namespace) -> int:
    from .bench import layer
    from .bench.group import GROUP_PROVIDERS
    from .bench.providers import PROVIDERS
    from .bench.shapes import ALL_PRESETS, PATTERNS, preset_rank

    if args.list:
        print("presets (d, h, blocks per group, layers per MLP; rank at p=0.5 per pattern):")
        for name, p in ALL_PRESETS.items():
            ranks = ", ".join(f"{pat} r={preset_rank(p, PATTERNS[pat])}" for pat in PATTERNS)
            print(f"  {name:10s} d={p.d} h={p.h} blocks={p.blocks} F={p.layers_per_mlp}  ({ranks})  {p.description}")
        print("patterns: " + ", ".join(f"{n} ({p.format})" for n, p in PATTERNS.items()))
        print("providers (role: ours = this package, peer = what a user would otherwise run, baseline = dense):")
        for name, prov in PROVIDERS.items():
            print(f"  {name:20s} {prov.role:8s} {prov.description}")
        print("group providers (--group-providers): " + ", ".join(GROUP_PROVIDERS))
        return 0
    try:
        config = layer.resolve_config(
            presets=_split(args.presets), patterns=_split(args.patterns), ms=_ints(args.m, "--m"),
            providers=_split(args.providers), dtype=args.dtype, device=args.device, tiny=args.tiny,
            out=args.out, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, reps=args.reps, seed=args.seed,
            check=not args.no_check, progress=not args.no_progress, scopes=_split(args.scope),
            group_providers=_split(args.group_providers))
    except (layer.BenchError, _UsageError) as exc:
        print(f"{PROG} bench: error: {exc}", file=sys.stderr)
        return 2
    return _sweep("bench", layer, config, "this package's own providers",
                  lambda b: f"{b['provider']} {b['preset']} {b['kind']} {b['pattern']} M={b['M']}")


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="time FiPS layers against dense and peer implementations (CSV + summary)",
        description="Time one expand and one contract FiPS layer per shape preset and sparsity pattern "
                    "(built from random factors at the budget's rank) over a sweep of M, against dense "
                    "F.linear and the peer paths, with the roofline of this run. Writes one CSV row per "
                    "(preset, kind, pattern, M, provider). Without a CUDA GPU the default is the tiny sweep "
                    "on the CPU, which only checks the harness. Lists take commas or spaces.")
    p.add_argument("--tiny", action="store_true",
                   help="small shapes, M in {1,16,64}, few reps (seconds on a CPU; for CI)")
    p.add_argument("--presets", nargs="+", metavar="NAME",
                   help="deit-b, swin-l-s3, llama3-8b (default: all three; --tiny: tiny, tiny-f3)")
    p.add_argument("--patterns", nargs="+", metavar="NAME", help="unstructured, 1:4, 2:4 (default: all)")
    p.add_argument("--m", nargs="+", metavar="M", help="rows of x (default: 1 2 4 ... 16384)")
    p.add_argument("--providers", nargs="+", metavar="NAME",
                   help="per-layer providers (see --list; default: all; dense is always timed)")
    p.add_argument("--scope", nargs="+", metavar="SCOPE",
                   help="layer (one layer per call, U read by each) and/or group (all layers of a group "
                        "back to back, U read once per group: the model's case); default: both")
    p.add_argument("--group-providers", nargs="+", metavar="NAME",
                   help="group-scope providers (see --list; default: all; dense is always timed)")
    p.add_argument("--dtype", help="fp16 (default on a GPU), bf16, fp32 (default on the CPU)")
    _timing_arguments(p, "fips_bench", warmup=25, rep=100, reps="5; --tiny 3", seeded="factors and inputs",
                      checked="each output with the fp32 reference", listed="presets, patterns and providers")
    p.set_defaults(func=_bench)


def _timing_arguments(p, csv_stem: str, *, warmup: int, rep: int, reps: str, seeded: str, checked: str,
                      listed: str) -> None:
    """The options ``bench`` and ``bench-e2e`` share (device, CSV, timing, seed, checks, listing)."""
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", metavar="PATH",
                   help=f"CSV file (default: {csv_stem}_<device>_<utc date>.csv in the current directory)")
    p.add_argument("--warmup-ms", type=float, metavar="MS",
                   help=f"do_bench warm-up per point on CUDA (default {warmup})")
    p.add_argument("--rep-ms", type=float, metavar="MS", help=f"do_bench timing budget per point on CUDA (default {rep})")
    p.add_argument("--reps", type=int, help=f"timed calls per point on the CPU (default {reps})")
    p.add_argument("--seed", type=int, default=0, help=f"seed of the random {seeded}")
    p.add_argument("--no-check", action="store_true", help=f"skip comparing {checked} (the rel_err column)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help=f"list {listed}, then exit")


def _sweep(command: str, bench, config, what: str, describe) -> int:
    """Run ``bench.run(config)`` (a benchmark module: ``run``, ``summary_table``,
    ``CPU_NOTE``) and summarise it; 130 after an interrupt (said, with where the rows are)."""
    try:
        rows = bench.run(config)
    except KeyboardInterrupt:
        print(f"\n{PROG} {command}: interrupted; the rows written so far are in {config.out}", file=sys.stderr)
        return 130
    return _finish_sweep(command, rows, bench.summary_table(rows), config, bench.CPU_NOTE, what, describe)


def _finish_sweep(command: str, rows, table: str, config, cpu_note: str, what: str, describe) -> int:
    """Print the summary table, the row counts and (on a CPU) what CPU timings mean;
    1 (and a one-line error naming the first) when a row of this package's own
    providers failed or disagrees with the reference, else 0."""
    from .bench.registry import OURS

    print()
    print(table)
    print()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    print(f"wrote {len(rows)} rows ({counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed) "
          f"to {config.out}")
    if config.device.type == "cpu":
        print(f"note: {cpu_note}")

    broken = [r for r in rows if r["role"] == OURS
              and (r["status"] == "failed" or r["reason"].startswith("WARNING"))]
    if broken:
        print(f"{PROG} {command}: {len(broken)} rows of {what} failed or disagree with the reference, e.g. "
              f"{describe(broken[0])}: {broken[0]['reason']}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- bench-e2e

def _bench_e2e(args: argparse.Namespace) -> int:
    from .bench import e2e
    from .bench.layer import BenchError

    if args.list:
        print("models:")
        for name, spec in e2e.ALL_MODELS.items():
            print(f"  {name:14s} {spec.task:6s} batches {','.join(map(str, spec.batches))}  {spec.description}")
        print("providers: " + ", ".join(e2e.E2E_PROVIDERS))
        print("modes: " + ", ".join(e2e.MODES))
        return 0
    try:
        config = e2e.resolve_config(
            models=_split(args.models), providers=_split(args.providers), patterns=_split(args.patterns),
            modes=_split(args.modes), dtypes=_split(args.dtype), batch=_ints(args.batch, "--batch"),
            decode_batch=_ints(args.decode_batch, "--decode-batch"), device=args.device, tiny=args.tiny,
            out=args.out, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, reps=args.reps, budget_s=args.budget_s,
            seed=args.seed, check=not args.no_check, progress=not args.no_progress)
    except (BenchError, _UsageError) as exc:
        print(f"{PROG} bench-e2e: error: {exc}", file=sys.stderr)
        return 2
    return _sweep("bench-e2e", e2e, config, "this package's FiPS models",
                  lambda b: f"{b['model']} {b['dtype']} {b['mode']} {b['pattern']} batch {b['batch']}")


def _add_bench_e2e(sub) -> None:
    p = sub.add_parser(
        "bench-e2e", help="whole models: dense vs FiPS (p = 0.5) vs peers, images/s and tokens/s (CSV + summary)",
        description="Time timm DeiT-B and Swin-L (built from config, random weights) with their MLPs as dense "
                    "layers, FiPS layers (p = 0.5, random factors at the budget's rank) or the peer paths, and a "
                    "Llama-3-8B-shaped MLP stack for decode; eager, CUDA graph, torch.compile and both. Writes "
                    "one CSV row per (model, dtype, mode, provider, pattern, batch) with throughput, speed-up "
                    "over dense, weight bytes and peak GPU memory. Without a CUDA GPU the default is the tiny "
                    "models on the CPU, eager only, which only checks the harness. Lists take commas or spaces.")
    p.add_argument("--tiny", action="store_true", help="tiny-vit, tiny-swin, tiny-mlp (seconds on a CPU; for CI)")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="deit-b, swin-l, llama3-8b-mlp (default: all three; --tiny: the tiny ones)")
    p.add_argument("--providers", nargs="+", metavar="NAME",
                   help="dense, fips, two_gemm, csr_rebuild, semi_structured_24 (default: all; dense always runs)")
    p.add_argument("--patterns", nargs="+", metavar="NAME", help="unstructured, 1:4, 2:4 (default: all)")
    p.add_argument("--modes", nargs="+", metavar="MODE",
                   help="eager, cudagraph, compile, compile-cudagraph (default: all on a GPU, eager on the CPU)")
    p.add_argument("--dtype", nargs="+", metavar="DTYPE",
                   help="fp16, bf16, fp32 (default: fp16 bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--batch", nargs="+", metavar="N", help="images per call (default: 1 8 64 256)")
    p.add_argument("--decode-batch", nargs="+", metavar="N", help="sequences per decode step (default: 1 4 16 64)")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="stop starting points after S seconds (each model x dtype gets an equal share of what is "
                        "left); the points left get skipped rows")
    _timing_arguments(p, "fips_bench_e2e", warmup=10, rep=50, reps="3", seeded="weights, factors and inputs",
                      checked="outputs with the eager reference", listed="models, providers and modes")
    p.set_defaults(func=_bench_e2e)


# ---------------------------------------------------------------- bench-quality

def _add_bench_quality(sub) -> None:
    from .bench import quality

    p = sub.add_parser("bench-quality", help=quality.HELP, description=quality.DESCRIPTION)
    quality.add_arguments(p)
    p.set_defaults(func=lambda args: quality.main_args(args, PROG))


# ---------------------------------------------------------------- bench-cpu

def _add_bench_cpu(sub) -> None:
    from .bench import cpu

    p = sub.add_parser("bench-cpu", help=cpu.HELP, description=cpu.DESCRIPTION)
    cpu.add_arguments(p)
    p.set_defaults(func=lambda args: cpu.main_args(args, PROG))


# ---------------------------------------------------------------- info

def _info(args: argparse.Namespace) -> int:
    import torch

    import fips_kernels
    from . import _extension, dispatch
    from .formats import Layout
    from .bench.env import driver_version, triton_version
    from .bench.layer import DTYPE_NAMES, DTYPES
    from .bench.shapes import PATTERNS, PRESETS, Pattern, preset_rank

    if args.device is not None:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise _UsageError(f"unknown device {args.device!r}; use cpu or cuda") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise _UsageError("--device cuda, but torch sees no CUDA GPU")
        if device.type not in ("cpu", "cuda"):
            raise _UsageError(f"device {args.device!r} is not supported; use cpu or cuda")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is not None:
        if args.dtype.lower() not in DTYPES:
            raise _UsageError(f"unknown dtype {args.dtype!r}; choose from bf16, fp16, fp32")
        dtype = DTYPES[args.dtype.lower()]
    else:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.m < 1:
        raise _UsageError(f"--m must be >= 1, got {args.m}")

    print(f"fips-kernels {fips_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or 'none'}), triton {triton_version()}")
    if _extension.available():
        print("CUDA extension (fips_kernels._C): available")
    else:
        print(f"CUDA extension (fips_kernels._C): not available: {_extension.error()}")
    if _extension.CPU.available():
        print(f"CPU kernels (fips_kernels._cpu): available, {torch.ops.fips_kernels_cpu.isa()} code"
              + (", AVX-512 row kernel" if torch.ops.fips_kernels_cpu.has_rows_kernel() else ""))
    else:
        print(f"CPU kernels (fips_kernels._cpu): not available: {_extension.CPU.error()}")
    from . import cpu

    print(f"CPU mode (FiPS layers on CPU tensors): {cpu.default_mode()} by default "
          f"({cpu.ENV_VAR} or fips_kernels.cpu.set_mode to change)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {props.name}, compute capability {props.major}.{props.minor}, "
                  f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
        print(f"driver: {driver_version()}")
    else:
        print("GPU: none (torch sees no CUDA device)")
    for var in (dispatch.ENV_VAR, "TRITON_INTERPRET"):
        print(f"{var}={os.environ.get(var, '')!r}" if var in os.environ else f"{var}: unset")
    try:
        forced = dispatch.forced_backend()
    except dispatch.BackendUnavailable as exc:
        forced = f"invalid: {exc}"
    print(f"backends in priority order: {', '.join(dispatch.backend_names())}"
          + (f" (forced: {forced})" if forced else ""))

    preset = PRESETS["deit-b"]
    print()
    print(f"sample problem: {preset.name} expand layer ({preset.layer_name('expand')}: d={preset.d} -> "
          f"h={preset.h}), M={args.m}, {DTYPE_NAMES[dtype]} on {device}")
    samples = (  # format, pattern, the factor's meta[2:] (tile, n:m)
        ("bitmap", PATTERNS["unstructured"], (64, 64)),
        ("nm", PATTERNS["1:4"], (1, 4)),
        ("dense", Pattern("dense", "dense", 0.0), (0, 0)),
        ("csr", PATTERNS["unstructured"], (0, 0)),
    )
    for fmt, pattern, params in samples:
        r = preset_rank(preset, pattern)
        layout = Layout.from_meta(fmt, (r, preset.h, *params))
        problem = dispatch.Problem.for_layer("expand", "expand", layout, dtype, device, args.m, preset.d)
        label = pattern.name if fmt != "nm" else f"{pattern.name} (n:m)"
        print(f"\n[{fmt}] {label}, r={r}: factor K={r} x N={preset.h}")
        print(_what_a_call_does(problem))
    return 0


def _what_a_call_does(problem) -> str:
    """Which backend a call would run, as a call decides it: with a forced backend, that one or the error
    the call raises (explain alone ranks the backends as if none were forced)."""
    from . import dispatch

    try:
        forced = dispatch.forced_backend()
        chosen = dispatch.select(problem).name
    except dispatch.BackendUnavailable as exc:
        return "error: a call raises BackendUnavailable: " + str(exc).replace("\n", "\n" + " " * 7)
    return dispatch.explain(problem) if forced is None else f"{chosen:10s} runs (forced)"


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, CUDA extension, GPU, and which backend runs a sample layer",
                       description="Print versions, whether the CUDA extension loaded, the GPU, and for a "
                                   "DeiT-B expand layer in each factor format which backend runs and why "
                                   "the others cannot (with a forced backend: that one, or the error a call "
                                   "raises).")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="fp16 (default on a GPU), bf16, fp32 (default on the CPU)")
    p.add_argument("--m", type=int, default=1, help="rows of x of the sample problem (default 1)")
    p.set_defaults(func=_info)


# ---------------------------------------------------------------- compress

def _compress(args: argparse.Namespace) -> int:
    from .compress import command
    from .compress.calibration import CalibrationError
    from .compress.presets import PresetError
    from .compress.state import ResumeError

    try:
        return command.run(args)
    except (command.CommandError, PresetError, CalibrationError, ResumeError) as exc:
        print(f"{PROG} compress: error: {exc}", file=sys.stderr)
        return 2


def _add_compress(sub) -> None:
    from .compress import command

    p = sub.add_parser(
        "compress", help="FiPS-compress a model's MLPs (default: all-MiniLM-L6-v2 on built-in text)",
        description="Compress the MLPs of a trained model with FiPS (shared base U, sparse factors V_i): SVD init, "
                    "then block-wise reconstruction training with gradual magnitude pruning. Writes a "
                    "fips_kernels checkpoint and a JSON report, and prints the report. With no MODEL: "
                    f"{command.DEFAULT_MODEL}, calibrated on the built-in sentences. Under torchrun each rank "
                    "compresses its share of the groups.")
    command.add_arguments(p)
    p.set_defaults(func=_compress)


# ---------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="fips_kernels: compressed FiPS linear layers.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench(sub)
    _add_bench_e2e(sub)
    _add_bench_quality(sub)
    _add_bench_cpu(sub)
    _add_compress(sub)
    _add_info(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
