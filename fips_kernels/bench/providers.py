"""This package's own ways of computing a layer (role ``ours``) for the layer
benchmark; the peers and the dense baseline are in :mod:`.peers`, the
registry and the roles in :mod:`.registry`.

A provider says why it cannot run (like the backends of
:mod:`fips_kernels.dispatch`) and builds, for one :class:`LayerCase`, a
:class:`Prepared` callable together with the bytes it must move and the
arithmetic it does. Adding a provider is one class::

    @register
    class MyKernel(Provider):
        name = "my_kernel"
        description = "..."
        role = OURS  # this package's code: failures fail the run

        def not_supported_reasons(self, device, dtype, pattern):
            return [] if device.type == "cuda" else ["needs a CUDA GPU"]

        def prepare(self, case):
            return Prepared(run=lambda x: my_op(x, ...),
                            weight_bytes=case.fips_weight_bytes,
                            flops=lambda M: factored_flops(case, M))

(a provider defined in another module is registered when that module is
imported; import it from here so ``fips-kernels bench`` sees it).

Byte counts are minimal traffic: the weights exactly as the provider stores
them (``weight_bytes``) plus ``x`` read and ``y`` written (added by the
runner); FLOPs count the provider's own arithmetic.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .. import dispatch
from .cases import LayerCase
from .registry import OURS, PROVIDERS, Prepared, Provider, register
from .sizes import tensor_bytes

__all__ = [
    "Prepared",
    "Provider",
    "PROVIDERS",
    "register",
    "factored_flops",
    "dense_flops",
    "forced_strategy_run",
    "dispatched_backend",
]


def dense_flops(case: LayerCase, M: int) -> int:
    return 2 * M * case.in_features * case.out_features


def factored_flops(case: LayerCase, M: int) -> int:
    """``2·M·(d·r + nnz(V))``: both products of the factored form, stored values only."""
    return 2 * M * (case.preset.d * case.rank + case.factor.nnz)


def dispatched_backend(layer, M: int) -> str:
    """The backend dispatch picks when the FiPS ``layer`` runs on ``M`` rows (the problem the op builds)."""
    return dispatch.select(layer.dispatch_problem(M)).name


# ---------------------------------------------------------------- this package


@register
class FiPS(Provider):
    name = "fips"
    description = "the FiPSLinear (dispatched op; the backend dispatch picks)"
    role = OURS
    backend: Optional[str] = None  # a backend forced around each call (None: dispatch picks)

    def prepare(self, case: LayerCase) -> Prepared:
        layer, forced = case.layer, self.backend

        def run(x):
            with dispatch.use_backend(forced):
                return layer(x)

        return Prepared(run=layer if forced is None else run, weight_bytes=case.fips_weight_bytes,
                        flops=lambda M: factored_flops(case, M),
                        backend=forced or (lambda M: dispatched_backend(layer, M)))


@register
class Reference(FiPS):
    name = "reference"
    description = "the FiPSLinear forced onto the pure-PyTorch reference backend"
    backend = "reference"


class _TritonStrategy(Provider):
    """The Triton backend's kernels with one strategy forced (no op/dispatch overhead)."""

    strategy = "?"
    role = OURS

    @property
    def triton_strategy(self) -> str:
        """The Triton strategy this provider forces (:func:`.triton_launches.row_launches` counts its kernels)."""
        return self.strategy

    def not_supported_reasons(self, device, dtype, pattern):
        import os

        reasons = []
        if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            reasons.append(f"needs a CUDA GPU (input is on {device.type}; or TRITON_INTERPRET=1 on CPU)")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {dtype} is not supported")
        return reasons

    def prepare(self, case: LayerCase) -> Prepared:
        from ..triton import strategies

        strategy = self.strategy
        run = _layer_run(strategies, case, strategy)
        if strategy == "reconstruct":  # W rebuilt per call: 2·d·r·h dense-equivalent MACs, then the GEMM
            flops = lambda M: 2 * case.preset.d * case.rank * case.preset.h + dense_flops(case, M)  # noqa: E731
        else:
            flops = lambda M: factored_flops(case, M)  # noqa: E731
        return Prepared(run=run, weight_bytes=case.fips_weight_bytes, flops=flops,
                        backend=f"triton/{strategy}")


@register
class TritonFactored(_TritonStrategy):
    name = "triton_factored"
    description = "Triton, factored strategy: z = x·U (cuBLAS) then z·B with B decompressed in SRAM (expand); mirrored for contract"
    strategy = "factored"


@register
class TritonReconstruct(_TritonStrategy):
    name = "triton_reconstruct"
    description = "Triton, reconstruct strategy: W = U·B rebuilt by the Triton kernel into a reused workspace, then cuBLAS"
    strategy = "reconstruct"


def forced_strategy_run(strategies, kind: str, U, factor, bias: Optional[torch.Tensor], strategy: str) -> Callable:
    """``x -> y`` of one layer (``U`` the base operand, ``factor`` its B) through a backend's
    ``StrategySet`` (``fips_kernels.<backend>.strategies.STRATEGIES``) with ``strategy`` forced: what the
    ``triton_*`` and ``cuda_*`` providers time (and what ``scripts/gpu_check.py --plan`` drives to count
    the Triton kernels they compile)."""
    if kind == "expand":
        return lambda x: strategies.expand(x, U, factor, bias, strategy=strategy)
    return lambda x: strategies.contract(x, U, factor, bias, strategy=strategy)


def _layer_run(strategies, case: LayerCase, strategy: str) -> Callable:
    layer = case.layer
    bias = layer.bias.detach() if layer.bias is not None else None
    return forced_strategy_run(strategies.STRATEGIES, case.kind, layer.base.operand, case.factor, bias, strategy)


class _CudaStrategy(Provider):
    """The CUDA backend's strategies with one forced (no op/dispatch overhead)."""

    strategy = "?"
    role = OURS

    def not_supported_reasons(self, device, dtype, pattern):
        from ..cuda.spmm import KERNEL_DTYPES, unavailable_reason

        reasons = []
        missing = unavailable_reason()
        if missing is not None:
            reasons.append(missing)
        if device.type != "cuda":
            reasons.append(f"needs a CUDA GPU (input is on {device.type})")
        elif torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
            cap = torch.cuda.get_device_capability(device)
            reasons.append(f"needs compute capability 8.0+ (mma.sync bf16), this GPU is {cap[0]}.{cap[1]}")
        if dtype not in KERNEL_DTYPES:
            reasons.append(f"the cuda kernels run fp16/bf16 tensor cores, not {str(dtype).replace('torch.', '')}")
        return reasons

    def _flops(self, case: LayerCase, r_pad: int) -> Callable[[int], int]:
        if self.strategy == "reconstruct":  # W rebuilt per call, then the GEMM
            return lambda M: 2 * case.preset.d * case.rank * case.preset.h + dense_flops(case, M)
        if self.strategy == "sparse24":  # x·U_pad dense, the 2:4 product at half the MACs
            d, h = case.preset.d, case.preset.h
            return lambda M: 2 * M * (d * r_pad + r_pad * h // 2)
        return lambda M: factored_flops(case, M)

    def prepare(self, case: LayerCase) -> Prepared:
        from ..cuda import sparse24, strategies

        layer, factor, strategy = case.layer, case.factor, self.strategy
        U, b = layer.base.operand, layer.bias.detach() if layer.bias is not None else None
        weight_bytes, r_pad = case.fips_weight_bytes, case.rank
        if strategy == "sparse24":  # what a call reads: the semi-structured factor and the padded base
            why = sparse24.reasons(factor, case.kind, case.dtype, case.device)
            if why:
                raise ValueError("the 2:4 path cannot run this layer: " + "; ".join(why))
            Bt, U_pad = sparse24.operands(U, factor, case.kind, strict=True)
            weight_bytes = tensor_bytes(Bt, U_pad, b)
            r_pad = U_pad.shape[1]
        run = _layer_run(strategies, case, strategy)
        return Prepared(run=run, weight_bytes=weight_bytes, flops=self._flops(case, r_pad),
                        backend=f"cuda/{strategy}")


@register
class CudaFactored(_CudaStrategy):
    name = "cuda_factored"
    description = ("CUDA extension, factored strategy: z = x·U (cuBLAS) then z·B by sparse_mm "
                   "(B decompressed in shared memory, mma.sync tensor cores); mirrored for contract")
    strategy = "factored"


@register
class CudaReconstruct(_CudaStrategy):
    name = "cuda_reconstruct"
    description = "CUDA extension, reconstruct strategy: W = U·B rebuilt by sparse_mm per call, then cuBLAS"
    strategy = "reconstruct"


@register
class CudaSparse24(_CudaStrategy):
    name = "cuda_sparse24"
    description = ("CUDA backend, 2:4 strategy: the factor packed once by torch.sparse.to_sparse_semi_structured "
                   "(rank padded to a multiple of 64), two F.linear calls on sparse tensor cores")
    strategy = "sparse24"

    def not_supported_reasons(self, device, dtype, pattern):
        reasons = super().not_supported_reasons(device, dtype, pattern)
        if pattern != "2:4":
            reasons.append(f"sparse tensor cores need the 2:4 pattern with float values, not {pattern}")
        if not hasattr(torch.sparse, "to_sparse_semi_structured"):
            reasons.append(f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured")
        return reasons


def provider_names() -> List[str]:
    return list(PROVIDERS)


def get(name: str) -> Optional[Provider]:
    return PROVIDERS.get(name)


__all__ += ["provider_names", "get", "FiPS", "Reference", "TritonFactored", "TritonReconstruct",
            "CudaFactored", "CudaReconstruct", "CudaSparse24"]

from . import hashed_providers  # noqa: E402,F401  (registers hashed_fwd, hashed_materialize)
from . import peers  # noqa: E402,F401  (registers the dense baseline and the peers)
