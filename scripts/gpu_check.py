#!/usr/bin/env python3
"""The budgeted GPU check behind ``scripts/gpu-check.sh`` (read its header first).

Stages run in priority order; each ends at its own deadline (seconds since
the start, :data:`STAGES`), prints one summary line as soon as it ends, and
leaves its results in ``$OUT`` as they come: a stage stopped at its deadline
is PARTIAL (its rows and test results so far are kept), not FAILED. The whole
run ends by :data:`TOTAL_S` seconds of command time.

``--plan`` (no GPU needed; CI runs it) prints the stages, the Triton kernels
each row stage will compile (counted by running the benchmark's own launch
code on meta tensors: ``fips_kernels.bench.triton_launches``), the rows, and
last ``estimated N s`` from the per-unit costs in :data:`COSTS`, each with
where it comes from.

This file uses the standard library only, so the run does not depend on the
package it is about to build; ``--plan`` imports the package.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
TOTAL_S = 480  # the script's command time: 15 device-minutes less the machine start and one rerun of a stage

# The correctness stage: the conformance suite over every backend, then what is specific to each backend.
TEST_FILES = ("tests/test_backend_conformance.py", "tests/test_triton.py", "tests/test_cuda_kernel.py",
              "tests/test_cuda_backend.py", "tests/test_hashed.py")
TEST_WORKERS = 8  # pytest-xdist processes sharing the GPU (16 CPU cores compile their Triton kernels)
MAXFAIL = 25  # stop a broken build early, but report more than the first failure


@dataclass(frozen=True)
class Stage:
    name: str
    end_s: int  # deadline, seconds since the start
    what: str
    bounded: bool  # True: runs until its deadline by design (its estimate is its slot)
    min_s: int = 15  # with less time than this left (scaled like the deadlines) the stage is skipped


STAGES = (
    Stage("env", 8, "GPU, driver, runtime, nvcc, torch/Triton versions -> env.txt", False, min_s=0),
    Stage("build", 150, "pip install -e . (csrc/ for this GPU's arch only), with a timeout; the extension must load",
          False),
    Stage("tests", 262, f"pytest -n {TEST_WORKERS} --maxfail={MAXFAIL}, FIPS_KERNELS_AUTOTUNE=0: "
          + ", ".join(TEST_FILES), True),
    Stage("headline", 345, "the headline rows (fips_kernels/bench/gpu_rows.py) -> layer_<gpu>_<date>.csv", False),
    Stage("wider", 365, "more rows while time remains, appended to the same CSV", True),
    Stage("tuned", 445, "the headline Triton rows autotuned -> layer-tuned_<gpu>_<date>.csv, "
          "triton_configs_<gpu>.json", False),
    Stage("memcheck", 473, "compute-sanitizer memcheck of sparse_mm (PYTORCH_NO_CUDA_MEMORY_CACHING=1); "
          "'Device not supported' is SKIPPED", True),
)
SUMMARY_S = TOTAL_S - STAGES[-1].end_s  # the closing table
GRACE_S = 10  # a stage gets SIGINT this long before its deadline (rows flushed), SIGKILL at it

# Per-unit costs of the estimate: (value, unit, where it comes from). None is measured on the H200 yet;
# the first lent GPU's summary.txt (seconds per stage) is what should replace them.
COSTS: Dict[str, Tuple[float, str, str]] = {
    "env_s": (5, "s", "nvidia-smi, nvcc --version and one Python probe: a guess"),
    "build_s": (75, "s for pip install -e . (4 translation units, sm_90 only, MAX_JOBS = the 16 cores)",
                "measured here: nvcc on csrc/sparse_mm.cu, the slowest unit, for sm_90 alone took 57 s of CPU time "
                "(53 s user + 4 s sys) on this project's CI machine; the units compile in parallel, so the build "
                "takes about that plus the link and pip's ~10 s (the H200 host's cores assumed no slower)"),
    "process_s": (8, "s per Python process (import torch and Triton, CUDA context)", "a guess"),
    "compile_s": (1.3, "s per Triton compile in one process",
                  "issue 13's audit: about 1.3 s a compile on Triton 3.6 / sm_90"),
    "compile_workers": (14, "processes compiling ahead (16 cores, 2 left)", "the H200 machine's 16 CPU cores"),
    "compile_parallel": (0.5, "of a linear speed-up when compiling in parallel",
                         "a guess: LLVM and ptxas share memory bandwidth and the disk cache"),
    "autotune_bench_s": (0.15, "s per config the autotuner times",
                         "Triton's do_bench defaults: 25 ms warm-up + 100 ms of repeats, and its first runs"),
    "row_s": (0.12, "s per benchmark row",
              "do_bench --warmup-ms 5 --rep-ms 25 (30 ms), the fp32 reference check and Python: a guess"),
    "build_layer_ns": (3, "ns per weight element of each random layer a sweep builds",
                       "randn, top-k mask and packing on the GPU: a guess (a Llama layer: 107 M elements)"),
    "roofline_s": (2, "s per sweep to measure copy bandwidth and GEMM peak",
                   "a 1 GiB copy and an 8192^3 GEMM through do_bench: a guess"),
}


def _cost(name: str) -> float:
    return float(COSTS[name][0])


# ---------------------------------------------------------------- the plan (CPU)

def _precompile_s(compiles: int) -> float:
    if compiles == 0:
        return 0.0
    rounds = math.ceil(compiles / _cost("compile_workers"))
    return _cost("process_s") + rounds * _cost("compile_s") / _cost("compile_parallel")


def row_stage_estimate(u: Dict[str, object]) -> float:
    """Seconds a row stage needs, from its counted units."""
    return (_cost("process_s") + _precompile_s(int(u["new_compiles"]))
            + int(u["autotune_benchmarks"]) * _cost("autotune_bench_s") + int(u["rows"]) * _cost("row_s")
            + int(u["elements_built"]) * _cost("build_layer_ns") * 1e-9 + int(u["sweeps"]) * _cost("roofline_s"))


def plan(out=print) -> int:
    """Print the plan; returns the estimate in seconds (the last line says it)."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: the kernels' module loads for the interpreter
    from fips_kernels.bench.gpu_rows import ROW_SETS, units
    from fips_kernels.bench.triton_launches import H200, Target

    out(f"gpu-check plan for one {H200.name} ({H200.sm_count} SMs): {TOTAL_S} s of command time, "
        f"{len(STAGES)} stages in priority order, each ending at its deadline (s since the start)")
    out("per-unit costs (value, unit: source):")
    for name, (value, unit, source) in COSTS.items():
        out(f"  {name:18s} {value:g} {unit}: {source}")
    targets = {"headline": H200, "wider": H200, "tuned": Target(H200.name, H200.sm_count, autotune=True,
                                                                 use_table=False)}
    compiled: frozenset = frozenset()
    total, prev_end = 0.0, 0
    for stage in STAGES:
        slot = stage.end_s - prev_end
        prev_end = stage.end_s
        out("")
        out(f"stage {stage.name} (deadline {stage.end_s} s, slot {slot} s): {stage.what}")
        if stage.name == "env":
            est = _cost("env_s")
        elif stage.name == "build":
            est = _cost("build_s")
        elif stage.name == "tests":
            present = [f for f in TEST_FILES if (REPO / f).exists()]
            missing = [f for f in TEST_FILES if f not in present]
            out(f"  files: {' '.join(present)}" + (f" (not in this tree yet: {' '.join(missing)})" if missing else ""))
            out("  runs until done or its deadline; results so far are kept (PARTIAL)")
            est = slot
        elif stage.name == "memcheck":
            out("  scripts/sanitize_sparse_mm.py under compute-sanitizer; bounded by its deadline")
            est = slot
        else:
            rowset = ROW_SETS[stage.name]
            u = units(rowset, targets[stage.name], compiled)
            compiled = u["compile_keys"]
            out(f"  rows: {u['rows']} in {u['sweeps']} sweeps: {rowset.description}")
            kernels = ", ".join(f"{k} x{n}" for k, n in sorted(u["kernels"].items())) or "none"
            out(f"  Triton compiles: {u['compiles']} ({kernels}); new (not cached by an earlier stage): "
                f"{u['new_compiles']}; autotuner timings: {u['autotune_benchmarks']}")
            out("  (fips and fips_gate_up dispatch to the cuda backend, cuda_* and the peers launch no Triton "
                "kernel; hashed_* kernels are not counted)")
            out(f"  random layers built: {u['layers_built']} ({u['elements_built'] / 1e9:.2f} G elements)")
            need = row_stage_estimate(u)
            est = slot if stage.bounded else need
            if stage.bounded:
                out(f"  to finish every row it would need ~{need:.0f} s; it stops at its deadline (PARTIAL)")
        over = "" if stage.bounded or est <= slot else f"  OVER ITS SLOT by {est - slot:.0f} s"
        out(f"  estimate {est:.0f} s" + over)
        total += est
    out("")
    out(f"summary: {SUMMARY_S} s")
    total += SUMMARY_S
    out(f"estimated {total:.0f} s")
    return int(round(total))


# ---------------------------------------------------------------- running (GPU)

class Run:
    def __init__(self, out: Path, python: str, scale: float):
        self.out, self.py, self.scale = out, python, scale
        self.t0 = time.monotonic()
        self.results: List[Tuple[str, str, float]] = []
        self.failed = False
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.gpu = _gpu_name()
        slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.gpu).strip("_") or "gpu"
        self.layer_csv = out / f"layer_{slug}_{stamp}.csv"
        self.tuned_csv = out / f"layer-tuned_{slug}_{stamp}.csv"
        self.configs_json = out / f"triton_configs_{slug}.json"
        self.built = False
        self.cuda_home = find_cuda_home()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self, stage: Stage) -> float:
        return stage.end_s * self.scale - self.elapsed()

    def record(self, stage: str, status: str, detail: str, t0: float) -> None:
        secs = self.elapsed() - t0
        self.results.append((stage, status, secs))
        if status.startswith("FAILED"):
            self.failed = True
        line = f"[gpu-check] {stage:9s} {status:9s} {secs:6.1f} s  {detail}"
        print(line, flush=True)
        with open(self.out / "summary.txt", "a") as f:
            f.write(line + "\n")

    def call(self, cmd: List[str], log: Path, limit: float, env: Optional[Dict[str, str]] = None) -> Tuple[int, bool]:
        """Run ``cmd`` (its own process group), output appended to ``log``, for at most ``limit`` seconds:
        SIGINT a grace before the limit (a benchmark stops between rows, its CSV flushed), SIGKILL at it.
        Returns (exit code, timed out)."""
        grace = min(GRACE_S * self.scale, max(0.0, limit) / 2)
        with open(log, "a") as f:
            f.write(f"===== {' '.join(cmd)} ({self.elapsed():.0f} s into the run)\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                    env=dict(os.environ, **(env or {})))
            try:
                return proc.wait(timeout=max(0.0, limit - grace)), False
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGINT)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    _signal(proc, signal.SIGKILL)
                    proc.wait()
                f.write(f"\n===== stopped at its deadline ({self.elapsed():.0f} s into the run)\n")
                return 124, True


def _signal(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else "gpu"
    except (OSError, subprocess.SubprocessError):
        return "gpu"


def find_cuda_home() -> Optional[str]:
    """CUDA_HOME when it has bin/nvcc, else the default toolkit folder, else the one above the nvcc on PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("GPU_CHECK_CUDA_DEFAULT", "/usr/local/cuda")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def _probe(run: Run, code: str, timeout: float = 60) -> str:
    try:
        out = subprocess.run([run.py, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"probe failed: {exc}"


def stage_env(run: Run, stage: Stage) -> Tuple[str, str]:
    lines = [f"date (UTC): {datetime.datetime.now(datetime.timezone.utc).isoformat()}",
             f"commit: {os.environ.get('FIPS_KERNELS_COMMIT', 'unset (FIPS_KERNELS_COMMIT)')}",
             f"kernel: {os.uname().release} (4.4.0 is gVisor: no compute-sanitizer, no ncu counters)",
             f"CUDA_HOME: {run.cuda_home or 'none found (no nvcc)'}",
             f"compute-sanitizer: {_sanitizer(run) or 'none'}"]
    for cmd in (["nvidia-smi"], [os.path.join(run.cuda_home, "bin", "nvcc") if run.cuda_home else "nvcc",
                                 "--version"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            lines += ["", f"$ {' '.join(cmd)}", (res.stdout + res.stderr).strip()]
        except (OSError, subprocess.SubprocessError) as exc:
            lines += ["", f"$ {' '.join(cmd)}: {exc}"]
    lines += ["", _probe(run, "import platform, torch, triton; p = torch.cuda.get_device_properties(0); "
                              "print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', "
                              "torch.version.cuda, 'triton', triton.__version__); print('gpu', p.name, "
                              "f'cc {p.major}.{p.minor}', p.multi_processor_count, 'SMs')")]
    (run.out / "env.txt").write_text("\n".join(lines) + "\n")
    return "ok", f"{run.gpu}; CUDA_HOME {run.cuda_home or 'not found'}"


def stage_build(run: Run, stage: Stage) -> Tuple[str, str]:
    log = run.out / "build.log"
    if not run.cuda_home:
        return "FAILED", "no CUDA toolkit (no nvcc under CUDA_HOME, /usr/local/cuda or on PATH)"
    arch = _probe(run, "import torch; print('%d.%d' % torch.cuda.get_device_capability())").splitlines()
    # FIPS_KERNELS_SKIP_CPU_BUILD: the CPU kernels (csrc/cpu, ~20 s of one core) check nothing on a GPU
    env = {"CUDA_HOME": run.cuda_home, "MAX_JOBS": str(os.cpu_count() or 4), "FIPS_KERNELS_SKIP_CPU_BUILD": "1",
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST") or (arch[-1] if arch else "9.0")}
    if not os.environ.get("SKIP_BUILD"):
        rc, timed_out = run.call([run.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                                  "-v", "-e", "."], log, run.left(stage), env)
        if timed_out:
            return "FAILED", "timed out (see build.log); the later stages run without the extension"
        if rc:
            return "FAILED", f"pip exit {rc} (see build.log)"
    rc, _ = run.call([run.py, "-c", "import fips_kernels._extension as e; ok = e.available(); "
                      "print('extension available:', ok, '' if ok else e.error()); raise SystemExit(0 if ok else 1)"],
                     log, max(30.0 * run.scale, run.left(stage)))
    run.built = rc == 0
    return ("ok", f"extension built for sm_{env['TORCH_CUDA_ARCH_LIST'].replace('.', '')}") if run.built else \
        ("FAILED", "the extension does not load (see build.log)")


def stage_tests(run: Run, stage: Stage) -> Tuple[str, str]:
    log = run.out / "tests.log"
    files = [f for f in TEST_FILES if (REPO / f).exists()]
    env = {"FIPS_KERNELS_AUTOTUNE": "0", "PYTHONPATH": os.pathsep.join(
        [str(REPO / "scripts"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    if run.built:
        env["FIPS_KERNELS_REQUIRE_EXTENSION"] = "1"
    start = log.stat().st_size if log.exists() else 0
    xdist = "xdist" in _probe(run, "import importlib.util as u; print('xdist' if u.find_spec('xdist') else 'none')")
    workers = ["-n", str(TEST_WORKERS)] if xdist else []  # without pytest-xdist: one process, said below
    rc, timed_out = run.call([run.py, "-m", "pytest", "-q", *workers, f"--maxfail={MAXFAIL}",
                              "-p", "no:cacheprovider", "-p", "gpu_check_pytest", *files], log, run.left(stage), env)
    counts = _test_counts(log, start)
    detail = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no test result"
    detail += "" if xdist else " (pytest-xdist missing: one process)"
    if counts["failed"] or counts["error"]:
        return "FAILED", detail + (" (stopped at its deadline)" if timed_out else "") + "; see tests.log"
    if timed_out:
        return "PARTIAL", detail + " before its deadline"
    return ("ok", detail) if rc == 0 else ("FAILED", f"pytest exit {rc}: {detail}; see tests.log")


def _test_counts(log: Path, start: int) -> Dict[str, int]:
    """Outcomes written by scripts/gpu_check_pytest.py (one line per test, as each ends)."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    with open(log, errors="replace") as f:
        f.seek(start)
        for line in f:  # pytest's progress characters may precede a line on the same line
            for outcome in re.findall(r"GPU-CHECK-TEST (\w+) ", line):
                counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _csv_rows(path: Path) -> List[Dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _planned(log: Path, start: int, rowset: str) -> Optional[int]:
    with open(log, errors="replace") as f:
        f.seek(start)
        for line in f:
            if line.startswith(f"[{rowset}] planned "):
                return int(line.split()[2])
    return None


def stage_rows(run: Run, stage: Stage) -> Tuple[str, str]:
    log = run.out / "bench.log"
    csv_path = run.tuned_csv if stage.name == "tuned" else run.layer_csv
    before = len(_csv_rows(csv_path))
    start = log.stat().st_size if log.exists() else 0
    cmd = [run.py, "-m", "fips_kernels.bench.gpu_rows", stage.name, "--out", str(csv_path)]
    if stage.name == "tuned":
        cmd += ["--configs-out", str(run.configs_json)]
    rc, timed_out = run.call(cmd, log, run.left(stage), {"PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])})
    rows = _csv_rows(csv_path)[before:]
    planned = _planned(log, start, stage.name)
    statuses = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "failed")}
    detail = f"{len(rows)}{f' of {planned}' if planned is not None else ''} rows ({statuses['ok']} ok, " \
             f"{statuses['skipped']} skipped, {statuses['failed']} failed) in {csv_path.name}"
    if timed_out:
        return "PARTIAL", detail + ", stopped at its deadline"
    if rc:
        return "FAILED", f"exit {rc}: {detail}; see bench.log"
    return "ok", detail


def _sanitizer(run: Run) -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    if run.cuda_home and os.path.isfile(os.path.join(run.cuda_home, "bin", "compute-sanitizer")):
        return os.path.join(run.cuda_home, "bin", "compute-sanitizer")
    return None


def stage_memcheck(run: Run, stage: Stage) -> Tuple[str, str]:
    tool = _sanitizer(run)
    if not tool:
        return "SKIPPED", "no compute-sanitizer on PATH or under CUDA_HOME"
    if not run.built:
        return "SKIPPED", "the extension did not build: nothing to check"
    log = run.out / "tests.log"
    start = log.stat().st_size if log.exists() else 0
    rc, timed_out = run.call([tool, "--tool", "memcheck", "--error-exitcode", "1", run.py,
                              "scripts/sanitize_sparse_mm.py"], log, run.left(stage),
                             {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "PYTHONPATH": str(REPO)})
    with open(log, errors="replace") as f:
        f.seek(start)
        text = f.read()
    if "Device not supported" in text or "device not supported" in text.lower():
        return "SKIPPED", "compute-sanitizer: Device not supported on this runtime (gVisor)"
    if timed_out:
        return "PARTIAL", "stopped at its deadline with no error reported so far (tests.log)"
    errors = [line for line in text.splitlines() if "ERROR SUMMARY" in line]
    return ("ok", errors[-1].strip() if errors else "no error") if rc == 0 else \
        ("FAILED", (errors[-1].strip() if errors else f"exit {rc}") + "; see tests.log")


RUNNERS: Dict[str, Callable[[Run, Stage], Tuple[str, str]]] = {
    "env": stage_env, "build": stage_build, "tests": stage_tests, "headline": stage_rows, "wider": stage_rows,
    "tuned": stage_rows, "memcheck": stage_memcheck}


def run_all(out: Path, python: str, scale: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, python, scale)
    print(f"[gpu-check] {len(STAGES)} stages, {TOTAL_S * scale:.0f} s at most; results in {out}", flush=True)
    for stage in STAGES:
        t0 = run.elapsed()
        if run.left(stage) < stage.min_s * scale:
            run.record(stage.name, "SKIPPED", f"no time left before its deadline ({stage.end_s} s)", t0)
            continue
        try:
            status, detail = RUNNERS[stage.name](run, stage)
        except Exception as exc:  # noqa: BLE001 - one broken stage must not stop the others
            status, detail = "FAILED", f"{type(exc).__name__}: {exc}"
        run.record(stage.name, status, detail, t0)
    print("", flush=True)
    print(f"{'stage':10s} {'result':9s} {'seconds':>8s}")
    for name, status, secs in run.results:
        print(f"{name:10s} {status:9s} {secs:8.1f}")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    print(f"total {run.elapsed():.0f} s; {len(files)} files in {out}: {' '.join(files)}", flush=True)
    return 1 if run.failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Build, test and benchmark fips_kernels on one lent GPU, in budget.")
    p.add_argument("--plan", action="store_true", help="print the stages, kernels, rows and the estimate (no GPU)")
    args = p.parse_args(argv)
    if args.plan:
        plan()
        return 0
    out = Path(os.environ.get("OUT") or REPO / "gpu-check-out")
    scale = float(os.environ.get("GPU_CHECK_TIME_SCALE", "1"))  # the stub-GPU test runs the stages faster
    return run_all(out, os.environ.get("PYTHON") or sys.executable, scale)


if __name__ == "__main__":
    sys.exit(main())
