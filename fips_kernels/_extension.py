"""Loading of the optional compiled extension ``fips_kernels._C``.

``fips_kernels._C`` is an empty Python module whose shared object registers
the ``torch.ops.fips_kernels_cuda`` operators (CPU and CUDA implementations)
with the dispatcher. It is built by setup.py only when a CUDA toolkit is
found, so it may be missing: nothing here ever raises.

    from fips_kernels import _extension
    if _extension.available():
        torch.ops.fips_kernels_cuda.reconstruct_nm(...)
    else:
        print(_extension.error())

This module imports nothing else from the package (it must stay import-safe).
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Optional

__all__ = ["load", "available", "error", "OP_NAMESPACE", "NOT_BUILT"]

_logger = logging.getLogger("fips_kernels")

EXTENSION_MODULE = "fips_kernels._C"
OP_NAMESPACE = "fips_kernels_cuda"
NOT_BUILT = (
    "not built (no fips_kernels/_C*.so; install with a CUDA toolkit or see "
    "FIPS_KERNELS_SKIP_CUDA_BUILD)"
)

_lock = threading.Lock()
_tried = False
_available = False
_error: Optional[str] = None


def _register_fakes() -> None:
    """Fake (meta) implementations, for FakeTensor / torch.compile tracing."""
    import torch

    ops = getattr(torch.ops, OP_NAMESPACE)
    if not hasattr(ops, "reconstruct_nm"):
        return

    def reconstruct_nm_fake(U, values, indices, K, N, n, m, contract):
        torch._check(U.dim() == 2, lambda: f"U must be 2-D, got {U.dim()}-D")
        d = U.shape[0]
        shape = (d, K) if contract else (N, d)
        return U.new_empty(shape)

    torch.library.register_fake(
        f"{OP_NAMESPACE}::reconstruct_nm", reconstruct_nm_fake
    )
    if not hasattr(ops, "sparse_mm"):
        return

    def sparse_mm_fake(A, values, aux0, aux1, scales, bias, fmt, K, N, p0, p1, qbits, qgroup,
                       transpose, activation, split_k, out_dtype):
        torch._check(A.dim() == 2, lambda: f"A must be 2-D (M, K), got {A.dim()}-D")
        torch._check(A.shape[1] == K, lambda: f"A must be (M, {K}), got {tuple(A.shape)}")
        return A.new_empty((A.shape[0], N), dtype=out_dtype or A.dtype)

    torch.library.register_fake(f"{OP_NAMESPACE}::sparse_mm", sparse_mm_fake)
    if not hasattr(ops, "sparse_mm_gated"):
        return

    def sparse_mm_gated_fake(A, values, aux0, aux1, scales, bias, up_values, up_aux0, up_aux1, up_scales,
                             up_bias, fmt, K, N, p0, p1, qbits, qgroup, split_k, out_dtype):
        torch._check(A.dim() == 2, lambda: f"A must be 2-D (M, K), got {A.dim()}-D")
        torch._check(A.shape[1] == K, lambda: f"A must be (M, {K}), got {tuple(A.shape)}")
        return A.new_empty((A.shape[0], N), dtype=out_dtype or A.dtype)

    torch.library.register_fake(f"{OP_NAMESPACE}::sparse_mm_gated", sparse_mm_gated_fake)


def load() -> bool:
    """Imports the extension once (thread-safe, cached); True if available.

    On failure logs one warning on the ``fips_kernels`` logger and records
    the reason (see :func:`error`). Never raises.
    """
    global _tried, _available, _error
    if _tried:
        return _available
    with _lock:
        if _tried:
            return _available
        try:
            # torch first: the shared object links against libc10/libtorch,
            # which only the torch import puts in the process.
            import torch  # noqa: F401

            importlib.import_module(EXTENSION_MODULE)
        except ModuleNotFoundError as exc:
            if exc.name == EXTENSION_MODULE:
                _error = NOT_BUILT
            else:
                _error = f"{type(exc).__name__}: {exc}"
        except BaseException as exc:  # noqa: BLE001 - OSError, undefined symbol, ...
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            _error = f"{type(exc).__name__}: {exc}"
        else:
            _available = True
            try:
                _register_fakes()
            except Exception as exc:  # noqa: BLE001
                # The operators work; only FakeTensor tracing (torch.compile)
                # of them is affected.
                _logger.warning(
                    "fips_kernels: registering the fake implementations of "
                    "torch.ops.%s failed: %s: %s",
                    OP_NAMESPACE, type(exc).__name__, exc,
                )
        if not _available:
            # Not built is a choice (no toolkit, or FIPS_KERNELS_SKIP_CUDA_BUILD):
            # say it quietly; a build that does not load is a fault: warn.
            log = _logger.info if _error == NOT_BUILT else _logger.warning
            log(
                "fips_kernels: the compiled CUDA extension is unavailable, "
                "the 'cuda' backend is disabled: %s",
                _error,
            )
        _tried = True
    return _available


def available() -> bool:
    """True if ``fips_kernels._C`` loaded and its operators are registered."""
    return load()


def error() -> Optional[str]:
    """Why the extension is unavailable, or None if it is available."""
    load()
    return _error
