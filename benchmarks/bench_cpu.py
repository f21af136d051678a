#!/usr/bin/env python3
"""The CPU benchmark: the same code as ``fips-kernels bench-cpu``.

    python benchmarks/bench_cpu.py --checkpoint /tmp/minilm-fips   # dense vs FiPS speed/compressed modes, batches 1, 32
    python benchmarks/bench_cpu.py                                 # builds the default checkpoint first (about 2.5 min)
    python benchmarks/bench_cpu.py --tiny                          # seconds: checks the harness
    python benchmarks/bench_cpu.py --threads 1 2 --batch 1 8 32 --reps 30

Options: ``python benchmarks/bench_cpu.py -h``. Columns of the CSV:
``benchmarks/results/cpu/README.md``.
"""
import sys
from pathlib import Path

try:
    import fips_kernels  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fips_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-cpu", *sys.argv[1:]]))
