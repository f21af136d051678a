"""The ``cuda`` backend's Python side: strategies over the compiled
``fips_kernels_cuda::sparse_mm`` op (:mod:`.spmm`), and 2:4 factors on
torch's semi-structured sparse tensor cores (:mod:`.sparse24`).

Importing this package never touches the extension, so it works (and
:func:`pack_for_cuda` is a no-op) where the extension is missing; dispatch
asks :func:`fips_kernels.dispatch.CudaBackend` whether the kernels can run.
"""
from .sparse24 import clear_packs, pack_for_cuda, packed_bytes
from .spmm import op_available, sparse_mm, sparse_mm_gated

__all__ = ["pack_for_cuda", "clear_packs", "packed_bytes", "op_available", "sparse_mm", "sparse_mm_gated"]
