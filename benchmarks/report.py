#!/usr/bin/env python3
"""Build ``BENCHMARKS.md`` and its plots from the committed benchmark CSVs.

    python3 benchmarks/report.py                       # read benchmarks/results/, write BENCHMARKS.md + benchmarks/plots/
    python3 benchmarks/report.py --import gpu-check-out  # first copy a GPU run's CSVs/JSON into benchmarks/results/

Every number the report writes is a value of one CSV row (formatted, or
converted from bytes to MiB / from a fraction to a percentage), and every
table names the CSV file(s) it comes from. Only GPU rows count
(``device == cuda``): CPU runs check the harness and are listed as ignored.
Without a GPU CSV the report says so and holds no numbers.

* layer benchmark (``fips-kernels bench``, ``layer_*.csv``): per GPU, the
  newest file: the run's GPU, driver, versions, date, commit and measured
  roofline; per preset and layer kind (expand, contract, the group scope),
  speed-up over dense ``F.linear`` and % of roofline by M for every provider
  (ours next to the peers and the dense baseline); the dense time;
  plots of speed-up vs M and of achieved bandwidth (bytes / time) against the
  run's measured copy bandwidth. ``layer-tuned_*.csv`` (``scripts/gpu-check.sh``'s
  autotuned rows) get a section of their own. Each provider's role (ours,
  peer, baseline) is the CSV's ``role`` column.
* end-to-end benchmark (``fips-kernels bench-e2e``, ``e2e_*.csv``): per GPU,
  the rows of every file (a point measured in several files: the newest ok
  row): weight memory per variant, throughput and speed-up per model, dtype,
  mode and batch, peak GPU memory of the run, decode roofline; a speed-up
  plot per model.
* pytest-benchmark runs stored under ``benchmarks/results/pytest-benchmark/``: listed.

Needs matplotlib only when there is something to plot.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OUT_MD = REPO / "BENCHMARKS.md"
PLOTS = REPO / "benchmarks" / "plots"
PYBENCH_DIR = "pytest-benchmark"
TUNED_PREFIX = "layer-tuned_"  # gpu-check.sh's autotuned rows: a section of their own
TRITON_CONFIGS = REPO / "fips_kernels" / "tuning" / "triton_configs.json"

META = ("gpu_name", "driver", "torch", "triton", "cuda", "date", "commit")
KIND_ORDER = ("expand", "contract", "group")
MODE_ORDER = ("eager", "cudagraph", "compile", "compile-cudagraph")
ROLE_ORDER = ("baseline", "ours", "peer")  # the benchmark's roles (fips_kernels/bench/registry.py)
UNKNOWN_ROLE = "?"
PROVIDER_ORDER = ("dense", "fips", "fips_gate_up", "triton_factored", "triton_reconstruct", "reference",
                  "two_gemm", "csr_rebuild", "semi_structured_24")

Row = Dict[str, str]


def roles_of(rows: Iterable[Row]) -> Dict[str, str]:
    """``provider -> role`` from the CSV's ``role`` column, which the benchmark writes from the
    registry entry that made each row (``?`` for a CSV written before the column existed)."""
    out: Dict[str, str] = {}
    for r in rows:
        out.setdefault(r["provider"], r.get("role") or UNKNOWN_ROLE)
    return out


# ---------------------------------------------------------------- formatting (shared with tests/test_report.py)

def num(v) -> Optional[float]:
    try:
        return None if v in (None, "") else float(v)
    except (TypeError, ValueError):
        return None


def _formatter(render):
    """A column formatter: ``render(number)``, or "" for an empty or non-numeric cell."""
    def fmt(v) -> str:
        x = num(v)
        return "" if x is None else render(x)
    return fmt


fmt_ratio = _formatter(lambda x: f"{x:.2f}")
fmt_pct = _formatter(lambda x: f"{100 * x:.0f}%")
fmt_ms = _formatter(lambda x: f"{x:.3g}")
fmt_mib = _formatter(lambda x: f"{x / 2 ** 20:.1f}")
fmt_rate = _formatter(lambda x: f"{x:.0f}" if x >= 100 else f"{x:.3g}")
fmt_gbps = _formatter(lambda x: f"{x:.0f}")


SKIPPED, FAILED = "–", "✗"


def cell(row: Optional[Row], column: str, fmt) -> str:
    """A table cell for ``row[column]``: ``–`` skipped or absent, ``✗`` failed,
    a trailing ``!`` when the row carries a WARNING."""
    if row is None or row.get("status") == "skipped":
        return SKIPPED
    if row.get("status") != "ok":
        return FAILED
    text = fmt(row.get(column))
    if not text:
        return SKIPPED
    return text + ("!" if "WARNING" in (row.get("reason") or "") else "")


def md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align_left: int = 1) -> List[str]:
    lines = ["| " + " | ".join(md_escape(h) for h in header) + " |",
             "|" + "|".join(":---" if i < align_left else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(md_escape(c) for c in r) + " |")
    return lines


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


# ---------------------------------------------------------------- loading

class CsvFile:
    def __init__(self, path: Path, rows: List[Row], kind: str):
        self.path, self.rows, self.kind = path, rows, kind
        for r in rows:
            r["_file"] = path.name

    @property
    def gpu_rows(self) -> List[Row]:
        return [r for r in self.rows if r.get("device") == "cuda"]

    @property
    def date(self) -> str:
        return max((r.get("date", "") for r in self.rows), default="")


def classify(fieldnames: Sequence[str]) -> Optional[str]:
    names = set(fieldnames or ())
    if {"model", "mode", "batch", "provider"} <= names:
        return "e2e"
    if {"preset", "kind", "M", "provider", "speedup_vs_dense"} <= names:
        return "layer"
    return None


def load_csvs(results: Path) -> Tuple[List[CsvFile], List[Tuple[Path, str]]]:
    """Every benchmark CSV in ``results`` (not recursive); ``ignored``: (path, why)."""
    files, ignored = [], []
    for path in sorted(results.glob("*.csv")):
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                kind = classify(reader.fieldnames)
                rows = list(reader)
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            ignored.append((path, f"unreadable: {exc}"))
            continue
        if kind is None:
            ignored.append((path, "not a layer or e2e benchmark CSV"))
            continue
        cf = CsvFile(path, rows, kind)
        if not cf.gpu_rows:
            ignored.append((path, "no GPU rows (a CPU run checks the harness only)"))
            continue
        files.append(cf)
    return files, ignored


def pybench_runs(results: Path) -> List[Tuple[Path, dict]]:
    runs = []
    for path in sorted((results / PYBENCH_DIR).glob("*/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        runs.append((path, data))
    return runs


# ---------------------------------------------------------------- importing a GPU run

def machine_id(data: dict) -> str:
    """pytest-benchmark's storage folder for a run (``get_machine_id``: system, implementation, version, bits)."""
    info = data.get("machine_info", {})
    version = ".".join(str(info.get("python_version", "0.0")).split(".")[:2])
    return f"{info.get('system', 'Unknown')}-{info.get('python_implementation', 'Python')}-{version}-64bit"


def _merge_triton_configs(path: Path, table: Path):
    sys.path.insert(0, str(REPO))
    from fips_kernels.tuning.triton_configs import merge

    return merge(path, table)


def import_run(src: Path, results: Path, log=print, triton_configs: Path = TRITON_CONFIGS) -> List[Path]:
    """Copy a GPU run's outputs (``gpu-check.sh``'s ``$OUT``) into ``results``:
    ``layer_*.csv``, ``layer-tuned_*.csv`` and ``e2e_*.csv`` with GPU rows as they are;
    ``pytest-benchmark_*.json`` into pytest-benchmark's storage layout
    (``pytest-benchmark/<machine id>/<NNNN>_<name>.json``), so that
    ``--benchmark-compare`` finds it; ``triton_configs_<gpu>.json`` (the tuned
    stage's choices) merged into ``triton_configs`` (the package's per-GPU
    table). Returns the paths written."""
    written = []
    results.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.csv")):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            kind = classify(reader.fieldnames)
            rows = list(reader)
        if kind is None:
            log(f"skip {path.name}: not a benchmark CSV")
            continue
        if not any(r.get("device") == "cuda" for r in rows):
            log(f"skip {path.name}: no GPU rows (CPU runs are not committed)")
            continue
        dest = results / path.name
        shutil.copyfile(path, dest)
        written.append(dest)
        log(f"copied {path.name} -> {dest}")
    for path in sorted(src.glob("triton_configs_*.json")):  # gpu-check.sh's tuned stage
        gpu, n = _merge_triton_configs(path, triton_configs)
        written.append(triton_configs)
        log(f"merged {path.name} into {triton_configs} ({gpu}: {n} configs)")
    for path in sorted(src.glob("pytest-benchmark*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            log(f"skip {path.name}: not JSON")
            continue
        if not data.get("benchmarks"):
            log(f"skip {path.name}: no benchmarks in it")
            continue
        if not any(b.get("extra_info", {}).get("device") == "cuda" for b in data["benchmarks"]):
            log(f"skip {path.name}: not a GPU run (CPU runs are not committed)")
            continue
        folder = results / PYBENCH_DIR / machine_id(data)
        folder.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for p in folder.glob("*.json") if (m := re.match(r"(\d{4})_", p.name))]
        stem = re.sub(r"^pytest-benchmark_?", "", path.stem) or "run"
        dest = folder / f"{max(numbers, default=0) + 1:04d}_{stem}.json"
        shutil.copyfile(path, dest)
        written.append(dest)
        log(f"copied {path.name} -> {dest}")
    return written


# ---------------------------------------------------------------- helpers

def ordered(values: Iterable[str], order: Sequence[str] = ()) -> List[str]:
    seen = list(OrderedDict.fromkeys(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def sort_providers(names: Iterable[str], roles: Dict[str, str]) -> List[str]:
    """The baseline, ours, then the peers (each in PROVIDER_ORDER, then first seen)."""
    names = ordered(names, PROVIDER_ORDER)
    rank = {r: i for i, r in enumerate(ROLE_ORDER)}
    return sorted(names, key=lambda n: (rank.get(roles.get(n, UNKNOWN_ROLE), len(rank)), names.index(n)))


def rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def metadata_lines(rows: Sequence[Row], extra: Sequence[Tuple[str, str, object]] = ()) -> List[str]:
    """A two-column table of the run's metadata (distinct values joined)."""
    def values(col):
        return ", ".join(OrderedDict.fromkeys(r.get(col, "") for r in rows if r.get(col, "") != "")) or "?"

    items = [("GPU", values("gpu_name")), ("driver", values("driver")), ("torch", values("torch")),
             ("Triton", values("triton")), ("CUDA (torch)", values("cuda")), ("date (UTC)", values("date")),
             ("commit", values("commit"))]
    for label, col, fmt in extra:
        vals = OrderedDict.fromkeys(fmt(r.get(col)) for r in rows if fmt(r.get(col)))
        if vals:
            items.append((label, ", ".join(vals)))
    return md_table(("", ""), items, align_left=2)


def reasons_lines(rows: Sequence[Row]) -> List[str]:
    """Footnotes: why points were skipped or failed, and warnings (distinct per provider)."""
    notes: "OrderedDict[Tuple[str, str], List[str]]" = OrderedDict()
    for r in rows:
        reason = (r.get("reason") or "").strip()
        if not reason or (r.get("status") == "ok" and "WARNING" not in reason):
            continue
        label = {"skipped": "skipped", "failed": "failed"}.get(r.get("status"), "warning")
        key = (r["provider"], f"{label}: {reason}")
        notes.setdefault(key, [])
    if not notes:
        return []
    return ["", "Notes: " + "; ".join(f"`{p}` {text}" for p, text in notes) + "."]


# ---------------------------------------------------------------- layer section

def layer_section(cf: CsvFile, md_dir: Path, plots_dir: Path, plots: List[Path], tuned: bool = False) -> List[str]:
    """The tables and plots of one layer CSV; ``tuned``: gpu-check.sh's autotuned rows (``layer-tuned_*.csv``)."""
    rows = cf.gpu_rows
    roles = roles_of(rows)
    src = f"[{cf.path.name}]({rel(cf.path, md_dir)})"
    gpu = rows[0].get("gpu_name", "?")
    kind_tag = "layer-tuned" if tuned else "layer"
    what_run = ", Triton configs autotuned (gpu-check.sh's tuned stage)" if tuned else ""
    out = [f"### Layer benchmark on {gpu}{what_run}", "",
           f"Source: {src} (`fips-kernels bench`; columns: "
           f"[benchmarks/results/README.md]({rel(RESULTS / 'README.md', md_dir)})).", ""]
    out += metadata_lines(rows, (("dtype", "dtype", str), ("measured copy bandwidth (GB/s)", "bandwidth_GBps", fmt_gbps),
                                 ("measured GEMM peak (TFLOP/s)", "peak_TFLOPs", fmt_ms)))
    out.append("")
    out.append(f"Cells: `{SKIPPED}` skipped (cannot run there; see the notes), `{FAILED}` failed, "
               "`!` the output disagreed with the fp32 reference. Rows: the dense `F.linear` baseline, "
               "this package (ours), then the peers.")
    for preset in ordered(r["preset"] for r in rows):
        prow = [r for r in rows if r["preset"] == preset]
        d, h, rank = prow[0].get("d"), prow[0].get("h"), ", ".join(ordered(r.get("r", "") for r in prow if r.get("r")))
        out += ["", f"#### {preset} (d = {d}, h = {h}; rank {rank})", ""]
        for kind in ordered((r["kind"] for r in prow), KIND_ORDER):
            krow = [r for r in prow if r["kind"] == kind]
            ms = sorted({int(r["M"]) for r in krow})
            layer = krow[0].get("layer", "")
            title = "group scope: every layer of one group back to back, U read once" if kind == "group" else \
                f"{kind} layer ({layer})"
            for what, column, fmt in (("speed-up over dense (dense time / time)", "speedup_vs_dense", fmt_ratio),
                                      ("% of roofline (roofline time / time)", "frac_of_roofline", fmt_pct)):
                tag = "speedup" if column == "speedup_vs_dense" else "roofline"
                out += [f"<!-- table: {kind_tag}-{tag} gpu={slug(gpu)} preset={preset} kind={kind} -->",
                        f"**{preset}, {title}: {what}, by M.** Source: {src}, rows preset={preset}, kind={kind}.", ""]
                body = []
                for pattern in ordered(r["pattern"] for r in krow):
                    pat_rows = [r for r in krow if r["pattern"] == pattern]
                    for provider in sort_providers((r["provider"] for r in pat_rows), roles):
                        by_m = {int(r["M"]): r for r in pat_rows if r["provider"] == provider}
                        body.append([pattern, provider, roles[provider]] + [cell(by_m.get(m), column, fmt) for m in ms])
                        if column == "speedup_vs_dense" and provider == "fips":
                            backends = [by_m[m].get("backend", "") if m in by_m else "" for m in ms]
                            if any(backends):
                                body.append([pattern, "↳ fips backend", ""] + backends)
                out += md_table(["pattern", "provider", "role"] + [f"M={m}" for m in ms], body, align_left=3)
                out += reasons_lines(krow) if column == "speedup_vs_dense" else []
                out.append("")
        # dense time per kind and pattern
        out += [f"<!-- table: {kind_tag}-dense-time gpu={slug(gpu)} preset={preset} -->",
                f"**{preset}: dense `F.linear` time (ms), by M.** Source: {src}, rows preset={preset}, provider=dense.", ""]
        dense = [r for r in prow if r["provider"] == "dense"]
        ms = sorted({int(r["M"]) for r in dense})
        body = []
        for kind in ordered((r["kind"] for r in dense), KIND_ORDER):
            for pattern in ordered(r["pattern"] for r in dense if r["kind"] == kind):
                by_m = {int(r["M"]): r for r in dense if r["kind"] == kind and r["pattern"] == pattern}
                body.append([kind, pattern] + [cell(by_m.get(m), "time_ms", fmt_ms) for m in ms])
        out += md_table(["kind", "pattern"] + [f"M={m}" for m in ms], body, align_left=2)
        out.append("")
        for name, path in layer_plots(prow, gpu, preset, plots_dir, kind_tag):
            plots.append(path)
            out += [f"![{name}]({rel(path, md_dir)})", ""]
    return out


_PLOTS_ENABLED = True


def _mpl():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("report.py: the plots need matplotlib (pip install matplotlib, or "
                         "pip install -e .[bench]); --no-plots writes the tables alone") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#7f7f7f")


def _colors(labels: Iterable[str]) -> Dict[str, str]:
    """One colour per line label for a whole figure (the same provider looks the same in every panel)."""
    names = [n for n in OrderedDict.fromkeys(labels) if n != "dense"]
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _style(provider: str, role: str, color: Optional[str] = None) -> dict:
    style = {"baseline": dict(color="black", linestyle=":", marker=None),
             "ours": dict(linestyle="-", marker="o", markersize=3),
             "peer": dict(linestyle="--", marker="s", markersize=3)}.get(role, dict(linestyle="-."))
    if color and provider != "dense":
        style["color"] = color
    return style


def _figure_legend(fig, axes) -> None:
    """One legend below the panels: every label once, in first-seen order."""
    handles, labels = [], []
    for ax in axes.flat:
        for hnd, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(hnd)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)


def _log2_axis(ax, xs: Sequence[int]) -> None:
    """A log2 x axis with a labelled tick at each measured value (few ticks: quick to lay out)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ticks = list(xs) if len(xs) <= 8 else list(xs)[::2]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(t) for t in ticks], fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(True, alpha=0.3)


def layer_plots(rows: Sequence[Row], gpu: str, preset: str, plots_dir: Path,
                prefix: str = "layer") -> List[Tuple[str, Path]]:
    """Speed-up vs M and achieved bandwidth vs M (with the measured copy bandwidth), one grid per preset."""
    if not _PLOTS_ENABLED:
        return []
    plt = _mpl()
    kinds = ordered((r["kind"] for r in rows), KIND_ORDER)
    patterns = ordered(r["pattern"] for r in rows)
    roles = roles_of(rows)
    colors = _colors(sort_providers((r["provider"] for r in rows if r.get("status") == "ok"), roles))
    written = []
    for what in ("speedup", "bandwidth"):
        fig, axes = plt.subplots(len(kinds), len(patterns), figsize=(4.2 * len(patterns), 3.2 * len(kinds)),
                                 squeeze=False, sharex=True)
        for i, kind in enumerate(kinds):
            for j, pattern in enumerate(patterns):
                ax = axes[i][j]
                sub = [r for r in rows if r["kind"] == kind and r["pattern"] == pattern and r.get("status") == "ok"]
                for provider in sort_providers((r["provider"] for r in sub), roles):
                    pts = sorted((int(r["M"]), r) for r in sub if r["provider"] == provider)
                    if what == "speedup":
                        xy = [(m, num(r.get("speedup_vs_dense"))) for m, r in pts]
                    else:  # achieved bandwidth: bytes / time
                        xy = [(m, num(r.get("bytes")) / (num(r.get("time_ms")) * 1e6))
                              for m, r in pts if num(r.get("bytes")) and num(r.get("time_ms"))]
                    xy = [(x, y) for x, y in xy if y is not None]
                    if xy:
                        ax.plot([x for x, _ in xy], [y for _, y in xy], label=provider,
                                **_style(provider, roles[provider], colors.get(provider)))
                if what == "speedup":
                    ax.axhline(1.0, color="grey", linewidth=0.8)
                else:
                    bws = sorted({num(r.get("bandwidth_GBps")) for r in sub if num(r.get("bandwidth_GBps"))})
                    for bw in bws:
                        ax.axhline(bw, color="red", linewidth=1.0, linestyle="-.", label="measured copy bandwidth")
                _log2_axis(ax, sorted({int(r["M"]) for r in rows}))
                ax.set_title(f"{kind}, {pattern}", fontsize=9)
                if j == 0:
                    ax.set_ylabel("speed-up over dense" if what == "speedup" else "achieved GB/s (bytes / time)",
                                  fontsize=8)
                if i == len(kinds) - 1:
                    ax.set_xlabel("M (rows of x)", fontsize=8)
        _figure_legend(fig, axes)
        fig.suptitle(f"{preset} on {gpu}: " + ("speed-up over dense F.linear" if what == "speedup"
                                                 else "achieved bandwidth vs the run's measured copy bandwidth"))
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.92, wspace=0.25, hspace=0.35)
        plots_dir.mkdir(parents=True, exist_ok=True)
        path = plots_dir / f"{prefix}_{what}_{slug(gpu)}_{slug(preset)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append((f"{preset} {what}", path))
    return written


# ---------------------------------------------------------------- e2e section

def merge_e2e(files: Sequence[CsvFile]) -> List[Row]:
    """One row per point over all files of a GPU: an ok row wins over others, then the newest."""
    best: "OrderedDict[tuple, Row]" = OrderedDict()
    for cf in files:
        for r in cf.gpu_rows:
            key = (r["model"], r["dtype"], r["mode"], r["provider"], r["pattern"], r["batch"])
            old = best.get(key)
            if old is None or ((r.get("status") == "ok", r.get("date", "")) >= (old.get("status") == "ok", old.get("date", ""))):
                best[key] = r
    return list(best.values())


def _sources(rows: Sequence[Row], by_name: Dict[str, CsvFile], md_dir: Path) -> str:
    names = ordered(r["_file"] for r in rows)
    return ", ".join(f"[{n}]({rel(by_name[n].path, md_dir)})" for n in names)


def _by_mode_table(rows: Sequence[Row], batches: Sequence[int], column: str, fmt) -> List[str]:
    """One line per (mode, provider, pattern), one cell of ``column`` per batch."""
    body = []
    for mode in ordered((r["mode"] for r in rows), MODE_ORDER):
        sub = [r for r in rows if r["mode"] == mode]
        for provider, pattern in ordered((r["provider"], r["pattern"]) for r in sub):
            by_b = {int(r["batch"]): r for r in sub if (r["provider"], r["pattern"]) == (provider, pattern)}
            body.append([mode, provider, pattern] + [cell(by_b.get(b), column, fmt) for b in batches])
    return md_table(["mode", "provider", "pattern"] + [f"batch {b}" for b in batches], body, align_left=3)


def e2e_section(files: Sequence[CsvFile], md_dir: Path, plots_dir: Path, plots: List[Path]) -> List[str]:
    rows = merge_e2e(files)
    roles = roles_of(rows)
    by_name = {cf.path.name: cf for cf in files}
    gpu = rows[0].get("gpu_name", "?")
    out = [f"### End-to-end benchmark on {gpu}", "",
           f"Source: {_sources(rows, by_name, md_dir)} (`fips-kernels bench-e2e`; columns: "
           f"[benchmarks/README.md]({rel(REPO / 'benchmarks' / 'README.md', md_dir)})).", ""]
    out += metadata_lines(rows)
    out += ["", "Models built from timm configs with random weights; FiPS variants at p = 0.5 from random factors "
                "at each group's rank (timing depends on shapes and formats only). Cells as above."]
    for model in ordered(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        unit = mrows[0].get("unit", "")
        out += ["", f"#### {model} ({mrows[0].get('arch', '')}; {unit})", ""]
        # weights
        src = _sources(mrows, by_name, md_dir)
        out += [f"<!-- table: e2e-weights gpu={slug(gpu)} model={model} -->",
                f"**{model}: weight memory (parameters + buffers, MiB; MLPs: the replaced layers and their "
                f"shared bases).** Source: {src}.", ""]
        body = []
        for dtype in ordered(r["dtype"] for r in mrows):
            for provider, pattern in ordered(((r["provider"], r["pattern"]) for r in mrows if r["dtype"] == dtype)):
                cand = [r for r in mrows if (r["dtype"], r["provider"], r["pattern"]) == (dtype, provider, pattern)
                        and r.get("weight_bytes")]
                if not cand:
                    continue
                r = cand[0]
                body.append([dtype, provider, pattern, roles[provider], fmt_mib(r["weight_bytes"]),
                             fmt_ratio(r.get("weight_ratio_vs_dense")), fmt_mib(r.get("mlp_weight_bytes")),
                             fmt_ratio(r.get("mlp_weight_ratio_vs_dense")), r.get("ranks", "")])
        out += md_table(["dtype", "provider", "pattern", "role", "model MiB", "× dense", "MLP MiB", "MLP × dense",
                         "group ranks"], body, align_left=4)
        for dtype in ordered(r["dtype"] for r in mrows):
            drows = [r for r in mrows if r["dtype"] == dtype]
            batches = sorted({int(r["batch"]) for r in drows})
            for mode in ordered((r["mode"] for r in drows), MODE_ORDER):
                sub = [r for r in drows if r["mode"] == mode]
                src = _sources(sub, by_name, md_dir)
                out += ["", f"<!-- table: e2e-throughput gpu={slug(gpu)} model={model} dtype={dtype} mode={mode} -->",
                        f"**{model}, {dtype}, {mode}: {unit} (speed-up over the dense model), by batch.** "
                        f"Source: {src}.", ""]
                body = []
                for provider, pattern in ordered((r["provider"], r["pattern"]) for r in sub):
                    by_b = {int(r["batch"]): r for r in sub if (r["provider"], r["pattern"]) == (provider, pattern)}
                    cells = []
                    for b in batches:
                        r = by_b.get(b)
                        c = cell(r, "throughput", fmt_rate)
                        if r is not None and r.get("status") == "ok" and fmt_ratio(r.get("speedup_vs_dense")):
                            c += f" ({fmt_ratio(r.get('speedup_vs_dense'))}×)"
                        cells.append(c)
                    body.append([provider, pattern, roles[provider]] + cells)
                out += md_table(["provider", "pattern", "role"] + [f"batch {b}" for b in batches], body, align_left=3)
                out += reasons_lines(sub)
            # peak memory of the run
            src = _sources(drows, by_name, md_dir)
            out += ["", f"<!-- table: e2e-peak gpu={slug(gpu)} model={model} dtype={dtype} -->",
                    f"**{model}, {dtype}: peak GPU memory allocated while setting up and running each mode "
                    f"(MiB; weights included), by batch.** Source: {src}.", ""]
            out += _by_mode_table(drows, batches, "run_peak_bytes", fmt_mib)
            if any(r.get("frac_of_roofline") for r in drows):
                out += ["", f"<!-- table: e2e-roofline gpu={slug(gpu)} model={model} dtype={dtype} -->",
                        f"**{model}, {dtype}: % of the roofline (weights + activations at the run's measured "
                        f"copy bandwidth), by batch.** Source: {src}.", ""]
                out += _by_mode_table(drows, batches, "frac_of_roofline", fmt_pct)
        path = e2e_plot(mrows, gpu, model, plots_dir)
        if path is not None:
            plots.append(path)
            out += ["", f"![{model} speed-up]({rel(path, md_dir)})"]
    out.append("")
    return out


def e2e_plot(rows: Sequence[Row], gpu: str, model: str, plots_dir: Path) -> Optional[Path]:
    ok = [r for r in rows if r.get("status") == "ok" and num(r.get("speedup_vs_dense")) is not None]
    roles = roles_of(rows)
    if not ok or not _PLOTS_ENABLED:
        return None
    plt = _mpl()
    dtypes = ordered(r["dtype"] for r in ok)
    modes = ordered((r["mode"] for r in ok), MODE_ORDER)
    label_of = {(r["provider"], r["pattern"]): r["provider"] if r["provider"] == "dense"
                else f"{r['provider']} {r['pattern']}" for r in ok}
    colors = _colors(label_of.values())
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(4.2 * len(modes), 3.2 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sub = [r for r in ok if r["dtype"] == dtype and r["mode"] == mode]
            for provider, pattern in ordered((r["provider"], r["pattern"]) for r in sub):
                pts = sorted((int(r["batch"]), num(r["speedup_vs_dense"])) for r in sub
                             if (r["provider"], r["pattern"]) == (provider, pattern))
                label = label_of[(provider, pattern)]
                ax.plot([b for b, _ in pts], [s for _, s in pts], label=label,
                        **_style(provider, roles[provider], colors.get(label)))
            ax.axhline(1.0, color="grey", linewidth=0.8)
            _log2_axis(ax, sorted({int(r["batch"]) for r in rows}))
            ax.set_title(f"{dtype}, {mode}", fontsize=9)
            ax.set_xlabel("batch", fontsize=8)
            if j == 0:
                ax.set_ylabel("speed-up over dense model", fontsize=8)
    _figure_legend(fig, axes)
    fig.suptitle(f"{model} on {gpu}: speed-up over the dense model")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.2 if len(dtypes) == 1 else 0.14, top=0.88,
                        wspace=0.25, hspace=0.4)
    plots_dir.mkdir(parents=True, exist_ok=True)
    path = plots_dir / f"e2e_speedup_{slug(gpu)}_{slug(model)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the document

HOW_TO = """\
## Producing the results

On a machine with a CUDA GPU (e.g. the lent H200, whose lease is a quarter
of an hour of device time; see [benchmarks/README.md]({bench_readme})):

1. `FIPS_KERNELS_COMMIT=<sha> bash scripts/gpu-check.sh` — build, the GPU
   tests, the headline layer rows, wider rows while time remains, an
   autotuned run of the headline Triton rows and memcheck, each stage by its
   deadline, all into `$OUT` (`bash scripts/gpu-check.sh --plan` shows what
   it will run and its estimate).
2. `python3 benchmarks/report.py --import <that $OUT>` — copies the GPU CSVs
   into `benchmarks/results/`, merges the tuned Triton configs into
   `fips_kernels/tuning/triton_configs.json`, then rebuilds this file and the
   plots in `benchmarks/plots/`.
3. Commit the CSVs, the config table, the plots and this file.
"""


def build(results: Path = RESULTS, out_md: Path = OUT_MD, plots_dir: Path = PLOTS,
          plots_enabled: bool = True) -> Dict[str, object]:
    """Write ``out_md`` (and the plots, unless ``plots_enabled`` is False); returns what was used and written."""
    global _PLOTS_ENABLED
    _PLOTS_ENABLED = plots_enabled
    files, ignored = load_csvs(results)
    md_dir = out_md.resolve().parent
    plots: List[Path] = []
    for pattern in ("layer_*.png", "layer-tuned_*.png", "e2e_*.png"):  # plots of files no longer present must not linger
        for old in plots_dir.glob(pattern) if plots_dir.exists() else ():
            old.unlink()
    lines = ["# Benchmarks", "",
             "<!-- generated by benchmarks/report.py from the CSVs in benchmarks/results/; do not edit by hand -->",
             ""]
    layer = [f for f in files if f.kind == "layer"]
    e2e = [f for f in files if f.kind == "e2e"]
    gpus = ordered(r["gpu_name"] for f in files for r in f.gpu_rows)
    if not gpus:
        lines += ["**No GPU results yet.** No CSV from a GPU run is committed under "
                  f"[benchmarks/results/]({rel(results, md_dir)}), so this report holds no measurements: "
                  "a performance figure exists only if a GPU run produced it, and none has been made.", "",
                  "When one is committed, this file shows, per GPU, with the GPU name, driver, torch, Triton "
                  "and CUDA versions, date and commit of the run:", "",
                  "* the layer benchmark (`fips-kernels bench`): speed-up over dense `F.linear` and % of the "
                  "measured roofline by M for DeiT-B, Swin-L stage 3 and Llama-3-8B layers at p = 0.5 "
                  "(unstructured, 1:4, 2:4), per layer and per group, this package's backends next to the "
                  "peers measured in the same run (the FiPS authors' two-GEMM and CSR paths, `torch.sparse` "
                  "semi-structured 2:4); plots of speed-up vs M and of achieved bandwidth against the "
                  "measured copy bandwidth;",
                  "* the end-to-end benchmark (`fips-kernels bench-e2e`): timm DeiT-B and Swin-L with FiPS "
                  "MLPs against the dense model and the peers, images/s by batch in fp16 and bf16, eager, "
                  "CUDA graphs and `torch.compile`; the weight memory of each variant and the peak memory "
                  "of the run; a Llama-3-8B-shaped MLP stack for decode in tokens/s;",
                  "* the pytest-benchmark runs stored for regression comparisons.", ""]
    for gpu in gpus:
        lines += [f"## {gpu}", ""]
        for tuned in (False, True):  # the layer rows, then gpu-check.sh's autotuned ones
            gl = sorted((f for f in layer if f.path.name.startswith(TUNED_PREFIX) == tuned
                         and any(r["gpu_name"] == gpu for r in f.gpu_rows)), key=lambda f: f.date)
            if gl:
                newest = gl[-1]
                sub = CsvFile.__new__(CsvFile)
                sub.path, sub.kind = newest.path, "layer"
                sub.rows = [r for r in newest.gpu_rows if r["gpu_name"] == gpu]
                lines += layer_section(sub, md_dir, plots_dir, plots, tuned)
                if len(gl) > 1:
                    lines += ["Older layer CSVs of this GPU (not shown): "
                              + ", ".join(f"[{f.path.name}]({rel(f.path, md_dir)})" for f in gl[:-1]) + ".", ""]
            elif not tuned:
                lines += ["No layer benchmark CSV from this GPU.", ""]
        ge = []
        for f in e2e:
            grows = [r for r in f.gpu_rows if r["gpu_name"] == gpu]
            if grows:
                sub = CsvFile.__new__(CsvFile)
                sub.path, sub.kind, sub.rows = f.path, "e2e", grows
                ge.append(sub)
        if ge:
            lines += e2e_section(ge, md_dir, plots_dir, plots)
        else:
            lines += ["No end-to-end benchmark CSV from this GPU.", ""]
    runs = pybench_runs(results)
    lines += ["## pytest-benchmark runs", ""]
    if runs:
        lines += ["Stored for `--benchmark-compare` (see `tests/test_benchmarks_regression.py`):", ""]
        for path, data in runs:
            gpu = OrderedDict.fromkeys(b.get("extra_info", {}).get("gpu_name", "?") for b in data.get("benchmarks", []))
            commit = data.get("commit_info", {}).get("id", "?")
            lines.append(f"* [{rel(path, results)}]({rel(path, md_dir)}): {len(data.get('benchmarks', []))} "
                         f"benchmarks on {', '.join(gpu)}, {data.get('datetime', '?')}, commit {str(commit)[:12]}")
        lines.append("")
    else:
        lines += ["None stored yet.", ""]
    if ignored:
        lines += ["## Files not used", ""]
        lines += [f"* `{p.name}`: {why}" for p, why in ignored]
        lines.append("")
    lines += [HOW_TO.format(bench_readme=rel(REPO / "benchmarks" / "README.md", md_dir))]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines).rstrip() + "\n")
    return {"gpus": gpus, "layer": [f.path for f in layer], "e2e": [f.path for f in e2e], "plots": plots,
            "ignored": ignored, "out": out_md}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Build BENCHMARKS.md and its plots from benchmarks/results/*.csv.")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSVs (default: benchmarks/results)")
    p.add_argument("--out", type=Path, default=OUT_MD, help="the report (default: BENCHMARKS.md at the repo root)")
    p.add_argument("--plots", type=Path, default=PLOTS, help="folder of the PNGs (default: benchmarks/plots)")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    p.add_argument("--import", dest="imports", type=Path, nargs="+", metavar="DIR",
                   help="first copy a GPU run's layer_*.csv, layer-tuned_*.csv, e2e_*.csv and pytest-benchmark_*.json "
                        "from DIR (gpu-check.sh's $OUT) into --results, and merge its triton_configs_*.json into "
                        "fips_kernels/tuning/triton_configs.json")
    args = p.parse_args(argv)
    for src in args.imports or ():
        if not src.is_dir():
            print(f"report.py: --import {src}: not a folder", file=sys.stderr)
            return 2
        import_run(src, args.results)
    info = build(args.results, args.out, args.plots, plots_enabled=not args.no_plots)
    if info["gpus"]:
        print(f"wrote {info['out']} for {', '.join(info['gpus'])} with {len(info['plots'])} plots")
    else:
        print(f"wrote {info['out']}: no GPU results yet (no GPU CSV under {args.results})")
    for path, why in info["ignored"]:
        print(f"ignored {path.name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
