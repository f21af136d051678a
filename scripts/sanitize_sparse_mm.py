"""A small run of ``fips_kernels_cuda::sparse_mm`` (and ``sparse_mm_gated``) for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_sparse_mm.py

Every format, fp16 and bf16, float and int8/int4 values, the transposed
(int8 base) form, tails in K and N, M = 1 / 16 / 33 (the three row tiles)
and a forced split-K: each call's cp.async spans end exactly at, or past,
the arrays' ends, which is what memcheck should see. Prints one line per call
and exits 1 if a result disagrees with the fp64 reference.
"""
import sys

import torch

from fips_kernels import _extension
from fips_kernels.formats import SparseFactor


def main() -> int:
    dev = "cpu" if "--cpu" in sys.argv else "cuda"  # --cpu: the same calls on the CPU emulation
    if (dev == "cuda" and not torch.cuda.is_available()) or not _extension.available():
        print(f"needs a CUDA GPU and the extension ({_extension.error()})")
        return 1
    torch.manual_seed(0)
    op = torch.ops.fips_kernels_cuda.sparse_mm
    bad = 0
    K, N = 133, 70
    for dtype in (torch.float16, torch.bfloat16):
        for fmt, opts in (("dense", {}), ("nm", {"n": 1, "m": 4}), ("nm", {"n": 2, "m": 4}),
                          ("nm", {"n": 5, "m": 16}), ("bitmap", {})):
            for qbits in (None, 8, 4):
                W = torch.randn(K, N, device=dev)
                if fmt == "bitmap":
                    W = W * (torch.rand(K, N, device=dev) < 0.3)
                elif fmt == "nm":
                    n, m = opts["n"], opts["m"]
                    G = -(-K // m)
                    P = torch.nn.functional.pad(W, (0, 0, 0, G * m - K)).reshape(G, m, N)
                    keep = torch.zeros_like(P, dtype=torch.bool).scatter_(1, P.abs().topk(n, dim=1).indices, True)
                    W = (P * keep).reshape(G * m, N)[:K]
                f = SparseFactor.pack(W.to(dtype), fmt, qbits=qbits, **opts)
                aux = list(f.aux_tensors) + [None, None]
                p0, p1 = (f.n, f.m) if fmt == "nm" else f.tile if fmt == "bitmap" else (0, 0)
                for M, split in ((1, 0), (16, 3), (33, 1)):
                    a = torch.randn(M, K, dtype=dtype, device=dev)
                    bias = torch.randn(N, dtype=dtype, device=dev)
                    out = op(a, f.values, aux[0], aux[1], f.scales if f.quantized else None, bias, fmt, K, N,
                             p0, p1, qbits or 0, f.qgroup or 0, False, "gelu", split, None)
                    ref = torch.nn.functional.gelu(a.double() @ f.to_dense().double() + bias.double())
                    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
                    ok = err < (2e-2 if dtype == torch.bfloat16 else 3e-3)
                    bad += not ok
                    print(f"{str(dtype):15s} {fmt:6s} {opts} q{qbits} M={M} split={split}: rel err {err:.2e}"
                          f"{'' if ok else '  FAIL'}")
    for fmt, opts in (("nm", {"n": 1, "m": 4}), ("bitmap", {})):
        Wg, Wu = (torch.randn(K, N, device=dev) for _ in range(2))
        if fmt == "bitmap":
            Wg, Wu = (W * (torch.rand(K, N, device=dev) < 0.3) for W in (Wg, Wu))
        else:
            Wg, Wu = (W * (torch.arange(K, device=dev) % 4 == 0)[:, None] for W in (Wg, Wu))
        g, u = (SparseFactor.pack(W.half(), fmt, **opts) for W in (Wg, Wu))
        bg, bu = (torch.randn(N, device=dev, dtype=torch.float16) for _ in range(2))
        for M, split in ((1, 0), (20, 3)):
            a = torch.randn(M, K, device=dev, dtype=torch.float16)
            ga, ua = list(g.aux_tensors) + [None], list(u.aux_tensors) + [None]
            p0, p1 = (1, 4) if fmt == "nm" else (64, 64)
            out = torch.ops.fips_kernels_cuda.sparse_mm_gated(
                a, g.values, ga[0], ga[1], None, bg, u.values, ua[0], ua[1], None, bu, fmt, K, N, p0, p1, 0, 0,
                split, None)
            ref = (torch.nn.functional.silu(a.double() @ g.to_dense().double() + bg.double())
                   * (a.double() @ u.to_dense().double() + bu.double()))
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            bad += err > 3e-3
            print(f"gated {fmt:6s} M={M} split={split}: rel err {err:.2e}{'' if err <= 3e-3 else '  FAIL'}")
    U = SparseFactor.pack(torch.randn(77, 45, device=dev, dtype=torch.float16), "dense", qbits=8, qgroup=77)
    z = torch.randn(5, 45, device=dev, dtype=torch.float16)
    out = op(z, U.values, None, None, U.scales, None, "dense", 45, 77, 0, 0, 8, 77, True, "none", 0, None)
    err = ((out.double() - z.double() @ U.to_dense().double().t()).abs().max()).item()
    print(f"transposed int8 base: max err {err:.2e}")
    bad += err > 0.05
    if dev == "cuda":
        torch.cuda.synchronize()
    print("FAILED" if bad else "all sparse_mm calls agree with the reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
