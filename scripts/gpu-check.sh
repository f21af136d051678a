#!/usr/bin/env bash
# Build, test and benchmark fips_kernels on a CUDA machine, in one go.
#
# Made for one call of the device tool on a lent H100 (torch, Triton, pytest,
# pytest-benchmark, timm preinstalled; no package registry):
#
#     FIPS_KERNELS_COMMIT=<short sha> bash scripts/gpu-check.sh            # stage "all"
#     FIPS_KERNELS_COMMIT=<short sha> bash scripts/gpu-check.sh compile    # a second call: torch.compile modes
#
# Everything it writes goes to $OUT (default ./gpu-check-out), one folder deep:
#   all:     env.txt, build.log, pytest.log, bench.log (layer, e2e and pytest-benchmark logs, one after the
#            other), layer_<gpu>_<date>.csv, e2e_<gpu>_<date>.csv, pytest-benchmark_<gpu>_<date>.json  (7 files)
#   compile: env.txt, build.log, bench.log, e2e-compile_<gpu>_<date>.csv                                (4 files)
# Then, on the machine with the repo: python3 benchmarks/report.py --import <$OUT> (copies the CSVs and the
# JSON into benchmarks/results/, rebuilds BENCHMARKS.md and benchmarks/plots/), and commit.
# A failing step does not stop the later ones but the exit status is 1 if any step failed.
#
# Time plan on an H100 (stage "all" ends by HARD_END_S=530 s, under the device's 10-minute limit). Each
# benchmark step runs until its deadline (seconds since the start) or for its minimum if earlier steps ran
# late, never past HARD_END_S; a step with less than 20 s left is skipped:
#   env.txt              ~5 s
#   build (pip -e .)     ~1-2 min   csrc/ for this GPU's architecture only, MAX_JOBS=16
#   pytest               ~1-3 min   capped at PYTEST_LIMIT_S=180; GPU tests included; the pytest-benchmark file
#                                   is left to its own step
#   memcheck             <= MEMCHECK_LIMIT_S=90: compute-sanitizer --tool memcheck over scripts/sanitize_sparse_mm.py
#                                   (every sparse_mm format/dtype/quantisation, tails, split-K), into pytest.log
#   layer benchmark      to LAYER_END_S=370 (min 60 s): 3 presets x 4 patterns x 8 M x (2 layers x 13 providers
#                                   + 4 group providers) = 2880 rows (skipped ones included), do_bench 5 ms
#                                   warm-up + 25 ms per point; not yet timed with the 3 cuda_* providers; stopped
#                                   at its deadline, rows so far kept (BENCH_ARGS --providers narrows it)
#   e2e benchmark        to E2E_END_S=470 (min 45 s): DeiT-B, Swin-L, the Llama MLP stack x fp16, bf16 x eager,
#                                   CUDA graph x dense, FiPS (3 patterns), peers x batches; --budget-s splits
#                                   the time evenly over model x dtype and writes "skipped (budget)" rows for
#                                   what is left (dense and FiPS come before the peers)
#   pytest-benchmark     to PYBENCH_END_S=520 (min 30 s): ~40 key points x 100 rounds, ~20-40 s
#   summary              ~5 s
# Stage "compile" (~9 min): env, build (incremental when the machine is still warm), then the e2e benchmark's
#   torch.compile and compile+CUDA-graph modes, dense and FiPS, fp16, until HARD_END_S. Each compile of a model
#   takes tens of seconds (a batch size after the first one recompiles once, with a dynamic batch), so the
#   budget decides how much it covers and marks the rest skipped; more calls with other E2E_COMPILE_ARGS (e.g.
#   --dtype bf16, --providers two_gemm semi_structured_24) fill in the matrix, and report.py merges the CSVs.
# Override: PYTHON, OUT, SKIP_BUILD=1 (keep the installed build: a warm machine), CUDA_HOME, TORCH_CUDA_ARCH_LIST (default: this GPU's architecture only),
# PYTEST_LIMIT_S, MEMCHECK_LIMIT_S, LAYER_END_S, E2E_END_S, PYBENCH_END_S, HARD_END_S (DEADLINE_S is its old name), BENCH_ARGS
# (layer), E2E_ARGS, E2E_COMPILE_ARGS. A copy of the tree without .git records commit "unknown" in the
# CSVs: set FIPS_KERNELS_COMMIT=<short sha>[-dirty] to record the commit it was copied from.
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
STAGE="${1:-all}"
case "$STAGE" in all|compile) ;; *) echo "usage: $0 [all|compile]" >&2; exit 2 ;; esac
HARD_END_S="${HARD_END_S:-${DEADLINE_S:-530}}"   # no step runs past this (seconds since the start)
PYTEST_LIMIT_S="${PYTEST_LIMIT_S:-180}"
MEMCHECK_LIMIT_S="${MEMCHECK_LIMIT_S:-90}"
LAYER_END_S="${LAYER_END_S:-370}"
E2E_END_S="${E2E_END_S:-470}"
PYBENCH_END_S="${PYBENCH_END_S:-520}"
BENCH_ARGS="${BENCH_ARGS:---warmup-ms 5 --rep-ms 25 --m 1 4 16 64 256 1024 4096 16384}"
E2E_ARGS="${E2E_ARGS:---modes eager cudagraph --warmup-ms 5 --rep-ms 20}"
E2E_COMPILE_ARGS="${E2E_COMPILE_ARGS:---modes compile compile-cudagraph --providers dense fips --dtype fp16 --warmup-ms 5 --rep-ms 20}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

declare -a STEPS=() RESULTS=() TIMES=()
FAILED=0

run_step() {  # run_step NAME LOG COMMAND...: log stdout+stderr (appended), record status and duration
    local name=$1 log=$2 t0=$SECONDS rc=0
    shift 2
    echo "== $name (log: $log)"
    echo "===== $name: $(date -u +%H:%M:%SZ), ${SECONDS} s into the script" >>"$log"
    "$@" >>"$log" 2>&1 || rc=$?
    STEPS+=("$name")
    TIMES+=("$((SECONDS - t0))")
    if [ "$rc" -eq 0 ]; then
        RESULTS+=("ok")
    elif [ "$rc" -eq 124 ]; then
        RESULTS+=("TIMED OUT")
        FAILED=1
        echo "   $name ran out of time; what it wrote is in $log (and, for bench, in the CSV)"
    else
        RESULTS+=("FAILED (exit $rc)")
        FAILED=1
        echo "   $name failed with exit $rc; last lines of $log:"
        tail -n 15 "$log" | sed 's/^/   | /' || true
    fi
}

step_limit() {  # step_limit END MIN: seconds a step may run (to END, at least MIN, never past HARD_END_S)
    local left=$(($1 - SECONDS)) hard=$((HARD_END_S - SECONDS))
    if [ "$left" -lt "$2" ]; then left=$2; fi
    if [ "$left" -gt "$hard" ]; then left=$hard; fi
    echo "$left"
}

skip_step() {  # skip_step NAME WHY
    STEPS+=("$1")
    RESULTS+=("SKIPPED ($2)")
    TIMES+=(0)
    echo "== $1 skipped: $2"
}

# ---- 1. environment (~5 s) -------------------------------------------------
{
    echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) (FIPS_KERNELS_COMMIT=${FIPS_KERNELS_COMMIT:-unset})"
    echo "status: $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed paths (if a git tree)"
    echo "CUDA_HOME: $CUDA_HOME"
    echo
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
    echo
    "$CUDA_HOME/bin/nvcc" --version 2>&1 || echo "no nvcc under $CUDA_HOME"
    echo
    "$PY" - <<'EOF' 2>&1 || echo "python version probe failed"
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"cc {p.major}.{p.minor}", f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
EOF
    echo
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|timm|numpy|safetensors|tqdm|setuptools) ' || true
} >"$OUT/env.txt" 2>&1 || true

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # build for this GPU only: half the compile time
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "8.0;9.0")
    export TORCH_CUDA_ARCH_LIST
fi
echo "TORCH_CUDA_ARCH_LIST: $TORCH_CUDA_ARCH_LIST" >>"$OUT/env.txt"

# ---- 2. build (~1-2 min) ---------------------------------------------------
build() {
    if [ -n "${SKIP_BUILD:-}" ]; then
        echo "SKIP_BUILD set: not reinstalling (a warm machine that built this tree already)"
    else
        MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
    fi &&
        "$PY" -c 'import fips_kernels._extension as e; ok = e.available(); print("extension available:", ok, "" if ok else e.error()); raise SystemExit(0 if ok else 1)'
}
run_step build "$OUT/build.log" build

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | sed 's/[^A-Za-z0-9._-]\+/_/g; s/_$//' || true)
GPU=${GPU:-gpu}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
CSV="$OUT/layer_${GPU}_${STAMP}.csv"
E2E_CSV="$OUT/e2e_${GPU}_${STAMP}.csv"
PYBENCH_JSON="$OUT/pytest-benchmark_${GPU}_${STAMP}.json"

if [ "$STAGE" = all ]; then
# ---- 3. tests (~1-3 min) ---------------------------------------------------
run_step pytest "$OUT/pytest.log" env FIPS_KERNELS_REQUIRE_EXTENSION=1 \
    timeout "$PYTEST_LIMIT_S" "$PY" -m pytest -q -x -p no:cacheprovider tests \
    --ignore=tests/test_benchmarks_regression.py

# ---- 3b. compute-sanitizer memcheck of the CUDA kernel (~30-90 s) ----------
SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
if [ -x "$SANITIZER" ]; then
run_step memcheck "$OUT/pytest.log" timeout "$MEMCHECK_LIMIT_S" \
    "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" scripts/sanitize_sparse_mm.py
else skip_step memcheck "no compute-sanitizer under $CUDA_HOME/bin"; fi

# ---- 4. layer benchmark (to LAYER_END_S, stopped there) --------------------
LEFT=$(step_limit "$LAYER_END_S" 60)
if [ "$LEFT" -lt 20 ]; then skip_step bench "no time left"; else
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
run_step bench "$OUT/bench.log" timeout --signal=INT --kill-after=20 "$LEFT" \
    "$PY" -m fips_kernels.cli bench --out "$CSV" --no-progress $BENCH_ARGS
fi

# ---- 5. end-to-end benchmark (to E2E_END_S; its own budget ends it) --------
LEFT=$(step_limit "$E2E_END_S" 45)
if [ "$LEFT" -lt 20 ]; then skip_step e2e "no time left"; else
# shellcheck disable=SC2086  # E2E_ARGS is a list of words
run_step e2e "$OUT/bench.log" timeout --signal=INT --kill-after=20 "$LEFT" \
    "$PY" -m fips_kernels.cli bench-e2e --out "$E2E_CSV" --no-progress --budget-s $((LEFT * 85 / 100)) $E2E_ARGS
fi

# ---- 6. pytest-benchmark suite on the GPU (to PYBENCH_END_S) ---------------
LEFT=$(step_limit "$PYBENCH_END_S" 30)
if [ "$LEFT" -lt 20 ]; then skip_step pybench "no time left"; else
run_step pybench "$OUT/bench.log" timeout "$LEFT" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_benchmarks_regression.py --benchmark-only --benchmark-json="$PYBENCH_JSON" \
    --benchmark-columns=min,median,max,rounds
fi
else
# ---- stage compile: the e2e benchmark's torch.compile modes ----------------
E2E_CSV="$OUT/e2e-compile_${GPU}_${STAMP}.csv"
LEFT=$(step_limit "$HARD_END_S" 60)
# shellcheck disable=SC2086  # E2E_COMPILE_ARGS is a list of words
run_step e2e-compile "$OUT/bench.log" timeout --signal=INT --kill-after=20 "$LEFT" \
    "$PY" -m fips_kernels.cli bench-e2e --out "$E2E_CSV" --no-progress --budget-s $((LEFT * 85 / 100)) \
    $E2E_COMPILE_ARGS
fi

# ---- summary ---------------------------------------------------------------
echo
if [ -f "$CSV" ]; then
    "$PY" - "$CSV" <<'EOF' || true
import csv, sys
from fips_kernels.bench.layer import summarize_csv
rows = list(csv.DictReader(open(sys.argv[1])))
ok = sum(r["status"] == "ok" for r in rows)
if rows:
    r = rows[0]
    print(f"{sys.argv[1]}: {len(rows)} rows ({ok} ok) on {r['gpu_name']}, {r['dtype']}, copy {float(r['bandwidth_GBps']):.0f} GB/s, "
          f"GEMM {float(r['peak_TFLOPs']):.0f} TFLOP/s")
print(summarize_csv(sys.argv[1], providers=["fips"]))
EOF
fi
if [ -f "$E2E_CSV" ]; then
    "$PY" - "$E2E_CSV" <<'EOF' || true
import csv, sys
from fips_kernels.bench.e2e import summary_table
rows = list(csv.DictReader(open(sys.argv[1])))
counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
print(f"{sys.argv[1]}: {len(rows)} rows ({counts})")
print(summary_table(rows))
EOF
fi
echo
printf '%-12s %-24s %s\n' step result seconds
for i in "${!STEPS[@]}"; do
    printf '%-12s %-24s %s\n' "${STEPS[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
done
echo "total ${SECONDS} s; files in $OUT"
exit "$FAILED"
