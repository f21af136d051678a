#!/usr/bin/env bash
# Build, test and benchmark fips_kernels on one lent GPU, inside the lease, in one call.
#
# Made for the device tool's lent machine: one NVIDIA H200 (sm_90, 132 SMs, 60 MB L2; about 4.3 TB/s copy and
# 790 TFLOP/s bf16 measured there), 16 CPU cores, torch 2.11 (CUDA 13.0), Triton 3.6, nvcc 13.0, pytest,
# pytest-xdist, timm; no package registry. A session gets 15 minutes of device time in all, the machine's start
# (1-2+ minutes) included, and at most 600 s per command. So this script ends within 480 s of command time,
# which leaves the start and one rerun of a stage inside the 15 minutes:
#
#     FIPS_KERNELS_COMMIT=<short sha> bash scripts/gpu-check.sh        # on the device (run's timeout_s: 540)
#     bash scripts/gpu-check.sh --plan                                 # anywhere, no GPU: what it will do, and
#                                                                      # last "estimated N s" (CI checks N <= 480)
#
# Stages, in priority order, each ending at its own deadline (seconds since the start; scripts/gpu_check.py,
# STAGES), each printing one summary line when it ends (also appended to $OUT/summary.txt):
#   env       by   8 s  GPU, driver, runtime (gVisor or Firecracker), nvcc, versions -> env.txt
#   build     by 150 s  pip install -e . with csrc/ for this GPU's architecture only, under a timeout; CUDA_HOME,
#                       else /usr/local/cuda, else the toolkit of the nvcc on PATH -> build.log
#   tests     by 262 s  GPU correctness of every backend: tests/test_backend_conformance.py and the backend files
#                       (test_triton, test_cuda_kernel, test_cuda_backend, test_hashed), autotuning off,
#                       pytest-xdist, --maxfail (not -x) -> tests.log, one GPU-CHECK-TEST line per test
#   headline  by 345 s  the headline rows (fips_kernels/bench/gpu_rows.py): Llama-3-8B and DeiT-B MLPs, p = 0.5,
#                       fp16, M 1/16/256/4096, dense/fips/triton_factored/cuda_factored/cuda_sparse24, 1:4,
#                       bitmap, 1:4-int8, layer and group scope, the roofline measured in the same run
#                       -> layer_<gpu>_<date>.csv (its Triton kernels compiled ahead, in parallel)
#   wider     by 365 s  more rows while time remains (peers, more M, bf16, Swin-L, hashed), same CSV
#   tuned     by 445 s  the headline Triton rows autotuned -> layer-tuned_<gpu>_<date>.csv and
#                       triton_configs_<gpu>.json (for fips_kernels/tuning/triton_configs.json)
#   memcheck  by 473 s  compute-sanitizer memcheck over scripts/sanitize_sparse_mm.py with
#                       PYTORCH_NO_CUDA_MEMORY_CACHING=1; "Device not supported" (gVisor) is SKIPPED
#   summary             the stage table and the files in $OUT
# A stage near its deadline gets SIGINT (10 s before: a benchmark stops between rows), SIGKILL at it. A stage
# stopped at its deadline is PARTIAL, not FAILED: its rows and test results so far are in $OUT. The exit
# status is 1 only if a stage FAILED. $OUT gets at most 8 files, none in a folder: env.txt, build.log, tests.log,
# bench.log, summary.txt, layer_*.csv, layer-tuned_*.csv, triton_configs_*.json.
# Then, here: python3 benchmarks/report.py --import <files_at> (copies the CSVs into benchmarks/results/, merges
# the tuned configs into fips_kernels/tuning/triton_configs.json, rebuilds BENCHMARKS.md and the plots); commit.
#
# Environment: OUT (default ./gpu-check-out), PYTHON (default python3), SKIP_BUILD=1 (a warm machine that built
# this tree), CUDA_HOME, TORCH_CUDA_ARCH_LIST, FIPS_KERNELS_COMMIT (a copy without .git records "unknown"
# otherwise), GPU_CHECK_TIME_SCALE (multiplies every deadline; the stub-GPU test in CI uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
exec "$PY" scripts/gpu_check.py "$@"
