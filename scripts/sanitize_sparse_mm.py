"""A small run of ``fips_kernels_cuda::sparse_mm`` for compute-sanitizer.

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
