"""scripts/gpu-check.sh on the CPU: its plan fits the lease, and its mechanics
work against a stub GPU.

The stub run puts a fake ``nvidia-smi``, ``nvcc`` and ``compute-sanitizer``
(which answers "Device not supported", as on the lent machine's gVisor
runtime) on PATH and runs every stage's command through a stub Python: pytest
reports a few tests and hangs, the headline rows write two rows and hang, the
other row stages finish. Every deadline is scaled down
(``GPU_CHECK_TIME_SCALE``), so the whole run takes seconds. Nothing here
measures speed: it checks deadlines, statuses, partial results and ``$OUT``.
"""
import csv
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCALE = 0.03  # every deadline x 0.03: the 480 s run in ~15 s
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_HOME", "OUT", "PYTHON")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_plan_fits_the_lease():
    """`--plan` runs without a GPU and ends with `estimated N s`, N <= 480; every stage with a bounded amount
    of work fits before its deadline, and the row stages' Triton compiles are counted."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--plan"], capture_output=True, text=True,
                          env=_env(OMP_NUM_THREADS="1"), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    last = re.fullmatch(r"estimated (\d+) s", lines[-1])
    assert last, lines[-1]
    assert int(last.group(1)) <= gpu_check.TOTAL_S == 480
    assert "OVER ITS SLOT" not in proc.stdout
    assert [m.group(1) for m in re.finditer(r"^stage (\w+) ", proc.stdout, re.M)] == [s.name for s in gpu_check.STAGES]
    for name in ("headline", "tuned"):
        section = proc.stdout.split(f"stage {name} ")[1].split("\nstage ")[0]
        compiles = int(re.search(r"Triton compiles: (\d+)", section).group(1))
        assert compiles > 0 and re.search(r"rows: \d+", section)
    assert "autotuner timings: 0" in proc.stdout.split("stage headline ")[1].split("stage wider")[0]
    for name in gpu_check.COSTS:  # every per-unit cost is printed with its source
        assert re.search(rf"^  {name} +\S+ .*: \S", proc.stdout, re.M), name


def test_the_estimate_is_the_sum_of_the_stages(monkeypatch):
    """The check above can fail: more compiles, or a costlier one, push the estimate past the lease."""
    from fips_kernels.bench import gpu_rows

    units = dict(rows=100, sweeps=1, compiles=40, new_compiles=40, autotune_benchmarks=0, layers_built=10,
                 elements_built=10 ** 8, kernels={"k": 40}, compile_keys=frozenset())
    monkeypatch.setattr(gpu_rows, "units", lambda rowset, target, compiled: dict(units))
    lines = []
    fits = gpu_check.plan(out=lines.append)
    assert lines[-1] == f"estimated {fits} s" and fits <= gpu_check.TOTAL_S
    monkeypatch.setitem(gpu_check.COSTS, "compile_s", (60.0, "s", "test"))  # 40 compiles: ~3 rounds of 120 s
    lines = []
    assert gpu_check.plan(out=lines.append) > gpu_check.TOTAL_S
    assert lines[-1].startswith("estimated ") and any("OVER ITS SLOT" in line for line in lines)


STUB_PYTHON = r'''#!{python}
"""A stub of the GPU machine's python for gpu_check.py's stages."""
import csv, json, os, sys, time
args = sys.argv[1:]
if args and args[0].endswith("gpu_check.py"):
    os.execv({python!r}, [{python!r}] + args)
def hang():
    with open(os.environ["STUB_PIDS"], "a") as f:
        f.write(f"{{os.getpid()}}\n")
    time.sleep(3600)
def opt(name):
    return args[args.index(name) + 1]
def rows(path, n, status="ok"):
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["preset", "provider", "status"])
        for i in range(n):
            w.writerow(["stub", f"p{{i}}", status])
if args[:2] == ["-m", "pip"]:
    print("Successfully installed fips_kernels (stub)")
elif args[0] == "-c":
    code = args[1]
    print("extension available: True" if "_extension" in code else "xdist" if "xdist" in code else
          "9.0" if "get_device_capability" in code and "platform" not in code else "python 3.12 torch 2.11 (stub)")
elif args[:2] == ["-m", "pytest"]:
    assert "-n" in args and any(a.startswith("--maxfail") for a in args) and "-x" not in args, args
    assert os.environ.get("FIPS_KERNELS_AUTOTUNE") == "0"
    for outcome in ("passed", "passed", "skipped", "passed"):  # after pytest's progress characters, as for real
        print(f".GPU-CHECK-TEST {{outcome}} tests/test_x.py::t", flush=True)
    hang()
elif args[:2] == ["-m", "fips_kernels.bench.gpu_rows"]:
    rowset, out = args[2], opt("--out")
    planned = {{"headline": 10, "wider": 3, "tuned": 4}}[rowset]
    print(f"[{{rowset}}] planned {{planned}} rows in 1 sweeps: stub", flush=True)
    if rowset == "headline":
        rows(out, 2)
        hang()
    rows(out, planned, "skipped" if rowset == "wider" else "ok")
    if rowset == "tuned":
        with open(opt("--configs-out"), "w") as f:
            json.dump({{"gpu": "NVIDIA H200", "source": "stub", "configs": []}}, f)
else:
    sys.exit(f"stub python: unexpected {{args}}")
'''

FAKE_TOOLS = {
    "nvidia-smi": 'case "$*" in *--query-gpu=name*) echo "NVIDIA H200";; *) echo "| NVIDIA H200 (stub) |";; esac',
    "nvcc": 'echo "Cuda compilation tools, release 13.0 (stub)"',
    "compute-sanitizer": 'echo "========= COMPUTE-SANITIZER"; echo "========= Error: Device not supported"; exit 1',
}


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_stub_gpu_run(tmp_path):
    bin_dir = tmp_path / "toolkit" / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in FAKE_TOOLS.items():
        _executable(bin_dir / name, "#!/bin/sh\n" + body + "\n")
    stub = tmp_path / "python-stub"
    _executable(stub, STUB_PYTHON.format(python=sys.executable))
    out, pids = tmp_path / "out", tmp_path / "pids"
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(stub), OUT=str(out),
               GPU_CHECK_TIME_SCALE=str(SCALE), GPU_CHECK_CUDA_DEFAULT=str(tmp_path / "no-cuda"), STUB_PIDS=str(pids))
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr  # PARTIAL and SKIPPED are not failures

    summary = {line.split()[1]: line for line in (out / "summary.txt").read_text().splitlines()}
    status = {name: line.split()[2] for name, line in summary.items()}
    assert status == {"env": "ok", "build": "ok", "tests": "PARTIAL", "headline": "PARTIAL", "wider": "ok",
                      "tuned": "ok", "memcheck": "SKIPPED"}, summary
    assert f"CUDA_HOME {tmp_path / 'toolkit'}" in summary["env"]  # nvcc found on PATH, no /usr/local/cuda
    assert "3 passed, 1 skipped before its deadline" in summary["tests"]
    assert "2 of 10 rows (2 ok, 0 skipped, 0 failed)" in summary["headline"]
    assert "3 of 3 rows (0 ok, 3 skipped, 0 failed)" in summary["wider"]
    assert "Device not supported" in summary["memcheck"]

    # deadlines: a stage stopped at its deadline ends by it (SIGINT a grace before, SIGKILL at it)
    ends = {}
    clock = 0.0
    for name, _, secs in (line.split()[1:4] for line in summary.values()):
        clock += float(secs)
        ends[name] = clock
    slack = 1.0  # process starts and the summary lines' rounding
    for stage in gpu_check.STAGES:
        if status[stage.name] == "PARTIAL":
            assert ends[stage.name] <= stage.end_s * SCALE + slack, (stage.name, ends)
    assert wall <= gpu_check.TOTAL_S * SCALE + 10  # process starts on a busy CI machine on top
    for pid in map(int, pids.read_text().split()):  # the hung stages' process groups are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    # $OUT: at most 8 files, no folder; the partial rows are kept and the later stage appended after them
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert len(files) <= 8 and all("/" not in f for f in files), files
    layer = [f for f in files if re.fullmatch(r"layer_NVIDIA_H200_\d{8}T\d{6}Z\.csv", f)]
    tuned = [f for f in files if re.fullmatch(r"layer-tuned_NVIDIA_H200_\d{8}T\d{6}Z\.csv", f)]
    assert set(files) == {"env.txt", "build.log", "tests.log", "bench.log", "summary.txt",
                          "triton_configs_NVIDIA_H200.json"} | set(layer) | set(tuned)
    with open(out / layer[0], newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok"] * 2 + ["skipped"] * 3
    assert json.loads((out / "triton_configs_NVIDIA_H200.json").read_text())["gpu"] == "NVIDIA H200"
    assert "NVIDIA H200" in (out / "env.txt").read_text()
    assert proc.stdout.strip().splitlines()[-1].startswith("total ")
