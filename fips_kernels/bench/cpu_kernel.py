"""The CPU kernel on its own (``fips-kernels bench-cpu --kernels``): ``fips_kernels_cpu::bitmap_mm``
against torch's dense fp32 GEMM of the same product, per MLP factor shape of the compressed model.

For the first expand and the first contract layer of the checkpoint, and each row count M, the two
are timed interleaved in one process (:func:`~.cpu.interleaved`): the kernel on the factor as stored
(``path="auto"``: what the compressed mode runs; which loop that is at each M is bitmap_mm's choice,
docs/CPU.md) and ``x @ B`` with the factor decoded to a dense fp32
``K × N`` matrix (what the dense model's multiply costs for that shape). A row says the milliseconds,
the multiply-adds per second of each — the kernel's counted on the stored values only (``nnz · M``),
the GEMM's on all of them (``K · N · M``) — and their ratio, which is how far the sparse product runs
from the dense GEMM's rate per useful multiply-add. Its output is checked against fp64 truth.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..modules import FiPSLinear
from .rows import describe, write_rows

KERNEL_COLUMNS = ["model", "layer", "kind", "K", "N", "nnz", "density", "value_bits", "M", "threads",
                  "kernel_median_ms", "gemm_median_ms", "kernel_useful_gmacs", "gemm_gmacs", "useful_rate_vs_gemm",
                  "time_vs_gemm", "max_rel_err", "status", "reason", "reps", "warmup"]


def factor_layers(model: torch.nn.Module) -> List[tuple]:
    """``(name, layer)`` of the first expand and the first contract FiPS layer with a bitmap factor."""
    seen: Dict[str, tuple] = {}
    for name, m in model.named_modules():
        if isinstance(m, FiPSLinear) and m.factor.format == "bitmap" and m.kind not in seen:
            seen[m.kind] = (name, m)
    return [seen[k] for k in ("expand", "contract") if k in seen]


def kernel_rows(model: torch.nn.Module, model_name: str, rows: Sequence[int], *, reps: int, warmup: int,
                threads: int, meta: Dict[str, str], progress: bool = True) -> List[Dict[str, str]]:
    """One row per (factor layer, M); see the module docstring."""
    from .cpu import interleaved

    out: List[Dict[str, str]] = []
    torch.set_num_threads(threads)
    for name, layer in factor_layers(model):
        f = layer.factor
        K, N = f.shape
        bitmask, offsets = f.aux_tensors
        dense = f.to(torch.float32).to_dense() if f.quantized else f.to_dense().float()
        nnz = int(f.nnz)
        for M in rows:
            torch.manual_seed(M)
            x = torch.randn(M, K)

            def kernel(x=x):
                return torch.ops.fips_kernels_cpu.bitmap_mm(x, f.values, bitmask, offsets, f.scales, None, K, N,
                                                            *f.params.tile, f.qbits or 0, f.qgroup or 0, 0)

            def gemm(x=x):
                return x @ dense

            row = dict(meta, model=model_name, layer=name, kind=layer.kind, K=str(K), N=str(N), nnz=str(nnz),
                       density=f"{nnz / (K * N):.4f}", value_bits=str(f.qbits or torch.finfo(f.dtype).bits),
                       M=str(M), threads=str(threads), reps=str(reps), warmup=str(warmup),
                       status="ok", reason="")
            try:
                truth = x.double() @ dense.double()
                err = ((kernel().double() - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()
                times = interleaved({"kernel": kernel, "gemm": gemm}, warmup, reps)
            except Exception as exc:  # noqa: BLE001 - a failing shape is a row, not the end of the run
                row.update(status="failed", reason=describe(exc))
                out.append(row)
                continue
            k_ms = sorted(times["kernel"])[len(times["kernel"]) // 2]
            g_ms = sorted(times["gemm"])[len(times["gemm"]) // 2]
            useful, full = nnz * M / k_ms / 1e6, K * N * M / g_ms / 1e6
            row.update(kernel_median_ms=f"{k_ms:.3f}", gemm_median_ms=f"{g_ms:.3f}",
                       kernel_useful_gmacs=f"{useful:.2f}", gemm_gmacs=f"{full:.2f}",
                       useful_rate_vs_gemm=f"{useful / full:.3f}", time_vs_gemm=f"{k_ms / g_ms:.3f}",
                       max_rel_err=f"{err:.2e}")
            if err > 1e-4:  # fp32 sums over at most a few thousand products
                row.update(status="failed", reason=f"WARNING: relative error {err:.2e} against fp64 truth")
            out.append(row)
            if progress:
                print(f"  {layer.kind:8s} {K}x{N} M={M:5d} kernel {k_ms:8.3f} ms "
                      f"({useful:6.2f} G useful MAC/s)  dense GEMM {g_ms:8.3f} ms ({full:6.2f} G MAC/s)", flush=True)
    return out


def write(path: str, rows: Sequence[Dict[str, str]], metadata_columns: Sequence[str]) -> None:
    write_rows(path, list(rows), [*KERNEL_COLUMNS, *[c for c in metadata_columns if c not in KERNEL_COLUMNS]])


def summary(rows: Sequence[Dict[str, str]]) -> str:
    lines = ["| factor (K × N, density) | M | kernel ms | dense GEMM ms | useful MAC/s vs GEMM | time vs GEMM |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['kind']} {r['K']} × {r['N']} | {r['M']} | {r['reason']} | | | |")
            continue
        lines.append(f"| {r['kind']} {r['K']} × {r['N']} ({float(r['density']):.2f}) | {r['M']} | "
                     f"{r['kernel_median_ms']} | {r['gemm_median_ms']} | {float(r['useful_rate_vs_gemm']):.2f} | "
                     f"{float(r['time_vs_gemm']):.2f}x |")
    return "\n".join(lines)


def default_rows() -> List[int]:
    return [1, 18, 128, 640]


def first_failure(rows: Sequence[Dict[str, str]]) -> Optional[Dict[str, str]]:
    return next((r for r in rows if r["status"] != "ok"), None)
