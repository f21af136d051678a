"""Loading of the optional compiled modules: the CUDA extension
``fips_kernels._C`` and the CPU kernels ``fips_kernels._cpu``.

``fips_kernels._C`` is an empty Python module whose shared object registers
the ``torch.ops.fips_kernels_cuda`` operators (CPU and CUDA implementations)
with the dispatcher. It is built by setup.py only when a CUDA toolkit is
found, so it may be missing: nothing here ever raises. ``fips_kernels._cpu``
(``torch.ops.fips_kernels_cpu``, the ``cpu`` backend's kernels, csrc/cpu) is
built whenever torch is importable at install time; :data:`CPU` loads it.

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

__all__ = ["CompiledExtension", "CUDA", "CPU", "load", "available", "error", "OP_NAMESPACE", "NOT_BUILT",
           "CPU_OP_NAMESPACE", "CPU_NOT_BUILT"]

_logger = logging.getLogger("fips_kernels")

EXTENSION_MODULE = "fips_kernels._C"
OP_NAMESPACE = "fips_kernels_cuda"
NOT_BUILT = (
    "not built (no fips_kernels/_C*.so; install with a CUDA toolkit or see "
    "FIPS_KERNELS_SKIP_CUDA_BUILD)"
)



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


class CompiledExtension:
    """One optional compiled module: imported once (thread-safe, cached), never raising.

    ``module`` is the Python module whose shared object registers the
    ``torch.ops.<namespace>`` operators; ``not_built`` the message when it is
    absent; ``register_fakes`` adds their fake implementations once loaded;
    ``backend`` names what is disabled without it (for the log line).
    """

    def __init__(self, module: str, namespace: str, not_built: str, register_fakes, backend: str):
        self.module, self.namespace, self.not_built = module, namespace, not_built
        self._register_fakes, self.backend = register_fakes, backend
        self._lock = threading.Lock()
        self._tried = False
        self._available = False
        self._error: Optional[str] = None

    def load(self) -> bool:
        """Imports the module once; True if available. On failure logs one line on
        the ``fips_kernels`` logger and records the reason (see :meth:`error`)."""
        if self._tried:
            return self._available
        with self._lock:
            if self._tried:
                return self._available
            try:
                # torch first: the shared object links against libc10/libtorch,
                # which only the torch import puts in the process.
                import torch  # noqa: F401

                importlib.import_module(self.module)
            except ModuleNotFoundError as exc:
                self._error = self.not_built if exc.name == self.module else f"{type(exc).__name__}: {exc}"
            except BaseException as exc:  # noqa: BLE001 - OSError, undefined symbol, ...
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                self._error = f"{type(exc).__name__}: {exc}"
            else:
                self._available = True
                try:
                    self._register_fakes()
                except Exception as exc:  # noqa: BLE001
                    # The operators work; only FakeTensor tracing (torch.compile) of them is affected.
                    _logger.warning("fips_kernels: registering the fake implementations of torch.ops.%s "
                                    "failed: %s: %s", self.namespace, type(exc).__name__, exc)
            if not self._available:
                # Not built is a choice (no toolkit, or a SKIP flag): say it quietly; a build that
                # does not load is a fault: warn.
                log = _logger.info if self._error == self.not_built else _logger.warning
                log("fips_kernels: the compiled module %s is unavailable, %s: %s", self.module, self.backend,
                    self._error)
            self._tried = True
        return self._available

    def available(self) -> bool:
        """True if the module loaded and its operators are registered."""
        return self.load()

    def error(self) -> Optional[str]:
        """Why the module is unavailable, or None if it is available."""
        self.load()
        return self._error


def _register_cpu_fakes() -> None:
    import torch

    def bitmap_mm_fake(x, values, bitmask, offsets, scales, bias, K, N, tk, tn, qbits, qgroup, activation,
                       path="auto", isa=""):
        torch._check(x.dim() == 2 and x.shape[1] == K, lambda: f"x must be (M, {K}), got {tuple(x.shape)}")
        return x.new_empty((x.shape[0], N), dtype=torch.float32)

    def bitmap_to_dense_fake(values, bitmask, offsets, scales, K, N, tk, tn, qbits, qgroup):
        return values.new_empty((K, N), dtype=torch.float32)

    torch.library.register_fake(f"{CPU_OP_NAMESPACE}::bitmap_mm", bitmap_mm_fake)
    torch.library.register_fake(f"{CPU_OP_NAMESPACE}::bitmap_to_dense", bitmap_to_dense_fake)


CPU_OP_NAMESPACE = "fips_kernels_cpu"
CPU_NOT_BUILT = ("not built (no fips_kernels/_cpu*.so; install with torch importable, or see "
                 "FIPS_KERNELS_SKIP_CPU_BUILD)")

CUDA = CompiledExtension(EXTENSION_MODULE, OP_NAMESPACE, NOT_BUILT, lambda: _register_fakes(),
                         "the 'cuda' backend is disabled")
CPU = CompiledExtension("fips_kernels._cpu", CPU_OP_NAMESPACE, CPU_NOT_BUILT, lambda: _register_cpu_fakes(),
                        "the 'cpu' backend runs dense factors only")


def load() -> bool:
    """Imports the CUDA extension ``fips_kernels._C`` once; True if available. Never raises."""
    return CUDA.load()


def available() -> bool:
    """True if ``fips_kernels._C`` loaded and its operators are registered."""
    return CUDA.available()


def error() -> Optional[str]:
    """Why the CUDA extension is unavailable, or None if it is available."""
    return CUDA.error()
