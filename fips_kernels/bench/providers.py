"""What the layer benchmark times: one provider per way of computing a layer.

A provider says why it cannot run (like the backends of
:mod:`fips_kernels.dispatch`) and builds, for one :class:`LayerCase`, a
:class:`Prepared` callable together with the bytes it must move and the
arithmetic it does. Adding a provider is one class::

    @register
    class MyKernel(Provider):
        name = "my_kernel"
        description = "..."
        ours = True  # this package's code: failures fail the run

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

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F

from .. import dispatch
from .cases import LayerCase, tensor_bytes

__all__ = [
    "Prepared",
    "Provider",
    "PROVIDERS",
    "register",
    "factored_flops",
    "dense_flops",
]


@dataclass
class Prepared:
    """A provider ready to run one layer.

    Attributes:
        run: ``y = run(x)`` for a 2-D input ``(M, in_features)``.
        weight_bytes: bytes of everything the provider stores for the layer
            (weights, indices, metadata, bias) — all of it is read per call.
        flops: ``M -> arithmetic of one call``.
        backend: a name, or ``M -> name`` (what actually runs).
        same_layer: the output is the FiPS layer's (so it is checked against
            the fp32 reference); False for the dense baseline's random weights.
    """

    run: Callable[[torch.Tensor], torch.Tensor]
    weight_bytes: int
    flops: Callable[[int], int]
    backend: Union[str, Callable[[int], str]] = "torch"
    same_layer: bool = True

    def backend_for(self, M: int) -> str:
        return self.backend(M) if callable(self.backend) else self.backend


class Provider:
    """One way of computing a layer. Subclasses set :attr:`name` and implement
    :meth:`prepare`; :meth:`not_supported_reasons` lists why it cannot run
    (an empty list: it can)."""

    name = "?"
    description = ""
    ours = False  # this package's own implementation: a failure or wrong output fails `fips-kernels bench`

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype, pattern: str) -> List[str]:
        return []

    def prepare(self, case: LayerCase) -> Prepared:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<provider {self.name}>"


PROVIDERS: Dict[str, Provider] = {}


def register(cls):
    """Class decorator: add a provider (in definition order) to :data:`PROVIDERS`."""
    if cls.name in PROVIDERS:
        raise ValueError(f"provider {cls.name!r} is registered twice")
    PROVIDERS[cls.name] = cls()
    return cls


def dense_flops(case: LayerCase, M: int) -> int:
    return 2 * M * case.in_features * case.out_features


def factored_flops(case: LayerCase, M: int) -> int:
    """``2·M·(d·r + nnz(V))``: both products of the factored form, stored values only."""
    return 2 * M * (case.preset.d * case.rank + case.factor.nnz)


def _problem(case: LayerCase, M: int) -> dispatch.Problem:
    """The problem the op builds when the layer runs on ``M`` rows (see ``ops.py``)."""
    return case.layer.dispatch_problem(M)


def _dense_V(case: LayerCase) -> torch.Tensor:
    """The layer's ``V (r × h)`` as a dense tensor in the case's dtype."""
    return case.layer.V.detach().contiguous()


# ---------------------------------------------------------------- baseline


@register
class Dense(Provider):
    name = "dense"
    description = "F.linear with a dense weight of the same shape (cuBLAS): the baseline"

    def prepare(self, case: LayerCase) -> Prepared:
        W, b = case.dense_weight, case.dense_bias
        return Prepared(run=lambda x: F.linear(x, W, b), weight_bytes=tensor_bytes(W, b),
                        flops=lambda M: dense_flops(case, M), backend="torch", same_layer=False)


# ---------------------------------------------------------------- this package


@register
class FiPS(Provider):
    name = "fips"
    description = "the FiPSLinear (dispatched op; the backend dispatch picks)"
    ours = True

    def prepare(self, case: LayerCase) -> Prepared:
        layer = case.layer
        return Prepared(run=layer, weight_bytes=case.fips_weight_bytes,
                        flops=lambda M: factored_flops(case, M),
                        backend=lambda M: dispatch.select(_problem(case, M)).name)


@register
class Reference(Provider):
    name = "reference"
    description = "the FiPSLinear forced onto the pure-PyTorch reference backend"
    ours = True

    def prepare(self, case: LayerCase) -> Prepared:
        layer = case.layer

        def run(x):
            with dispatch.use_backend("reference"):
                return layer(x)

        return Prepared(run=run, weight_bytes=case.fips_weight_bytes,
                        flops=lambda M: factored_flops(case, M), backend="reference")


class _TritonStrategy(Provider):
    """The Triton backend's kernels with one strategy forced (no op/dispatch overhead)."""

    strategy = "?"
    ours = True

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
        run = _forced_strategy_run(strategies, case, strategy)
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


def _forced_strategy_run(strategies, case: LayerCase, strategy: str) -> Callable:
    """``x -> y`` of the case's layer through a backend's strategies module with ``strategy`` forced."""
    layer, factor = case.layer, case.factor
    U, b = layer.base.operand, layer.bias.detach() if layer.bias is not None else None
    if case.kind == "expand":
        return lambda x: strategies.expand(x, U, factor, b, strategy=strategy)
    return lambda x: strategies.contract(x, U, factor, b, strategy=strategy)


class _CudaStrategy(Provider):
    """The CUDA backend's strategies with one forced (no op/dispatch overhead)."""

    strategy = "?"
    ours = True

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
            weight_bytes = sparse24.tensor_nbytes(Bt) + tensor_bytes(U_pad, b)
            r_pad = U_pad.shape[1]
        run = _forced_strategy_run(strategies, case, strategy)
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


# ---------------------------------------------------------------- peers
# What a user would otherwise run: the FiPS authors' own inference paths.


@register
class TwoGemm(Provider):
    name = "two_gemm"
    description = "two dense GEMMs (x·U)·V (contract: (x·Vᵀ)·Uᵀ) with V stored dense"

    def prepare(self, case: LayerCase) -> Prepared:
        U, V, b = case.layer.base.matrix().detach(), _dense_V(case), case.layer.bias
        b = b.detach() if b is not None else None
        if case.kind == "expand":
            def run(x):
                z = x @ U
                return torch.addmm(b, z, V) if b is not None else z @ V
        else:
            Vt, Ut = V.t(), U.t()

            def run(x):
                z = x @ Vt
                return torch.addmm(b, z, Ut) if b is not None else z @ Ut
        r, h = V.shape
        return Prepared(run=run, weight_bytes=tensor_bytes(U, V, b),
                        flops=lambda M: 2 * M * (case.preset.d * r + r * h), backend="torch")


@register
class CsrRebuild(Provider):
    name = "csr_rebuild"
    description = "V as a torch CSR tensor; W = U·V rebuilt every call (torch.sparse.mm), then F.linear"

    def prepare(self, case: LayerCase) -> Prepared:
        U, b = case.layer.base.matrix().detach(), case.layer.bias
        b = b.detach() if b is not None else None
        Vt = _dense_V(case).t().contiguous()  # (h × r): torch.sparse.mm wants the sparse operand first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            Vt_csr = Vt.to_sparse_csr()
        del Vt
        Ut = U.t().contiguous()  # (r × d)
        expand = case.kind == "expand"

        def run(x):
            Wt = torch.sparse.mm(Vt_csr, Ut)  # Vᵀ·Uᵀ (h × d): the expand weight; its transpose is the contract's
            return F.linear(x, Wt if expand else Wt.t(), b)

        nnz = Vt_csr.values().numel()
        stored = tensor_bytes(Vt_csr.crow_indices(), Vt_csr.col_indices(), Vt_csr.values(), Ut, b)
        d = case.preset.d
        return Prepared(run=run, weight_bytes=stored,
                        flops=lambda M: 2 * d * nnz + dense_flops(case, M), backend="torch.sparse")


@register
class SemiStructured24(Provider):
    name = "semi_structured_24"
    description = ("2:4 factor on sparse tensor cores (torch.sparse.to_sparse_semi_structured), "
                   "two F.linear calls; the rank padded with zeros to a multiple of 64")

    PAD = 64  # both cuSPARSELt (16) and CUTLASS (32 rows, 64 columns) accept multiples of 64

    def not_supported_reasons(self, device, dtype, pattern):
        reasons = []
        if pattern != "2:4":
            reasons.append(f"sparse tensor cores need the 2:4 pattern, not {pattern}")
        if device.type != "cuda":
            reasons.append(f"needs a CUDA GPU (input is on {device.type})")
        elif torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
            cap = torch.cuda.get_device_capability(device)
            reasons.append(f"needs compute capability 8.0+, this GPU is {cap[0]}.{cap[1]}")
        if dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"needs float16 or bfloat16, not {str(dtype).replace('torch.', '')}")
        if not hasattr(torch.sparse, "to_sparse_semi_structured"):
            reasons.append(f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured")
        return reasons

    def prepare(self, case: LayerCase) -> Prepared:
        U, b = case.layer.base.matrix().detach(), case.layer.bias
        b = b.detach() if b is not None else None
        r = case.rank
        pad = -r % self.PAD
        U_pad = F.pad(U, (0, pad)).contiguous()  # (d × r_pad), zero columns
        V = _dense_V(case)  # (r × h)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if case.kind == "expand":  # y = (x·U)·V: the sparse operand is Vᵀ (h × r), 2:4 along r
                A = torch.sparse.to_sparse_semi_structured(F.pad(V.t(), (0, pad)).contiguous())

                def run(x):
                    return F.linear(x @ U_pad, A, b)
            else:  # y = (x·Vᵀ)·Uᵀ: the sparse operand is V (r × h), 2:4 along h
                A = torch.sparse.to_sparse_semi_structured(F.pad(V, (0, 0, 0, pad)).contiguous())

                def run(x):
                    return F.linear(F.linear(x, A), U_pad, b)
        del V
        names = A.__tensor_flatten__()[0]
        stored = sum(tensor_bytes(getattr(A, n)) for n in names) + tensor_bytes(U_pad, b)
        r_pad, h, d = r + pad, case.preset.h, case.preset.d
        return Prepared(run=run, weight_bytes=stored,
                        flops=lambda M: 2 * M * (d * r_pad + r_pad * h // 2),
                        backend=str(getattr(A, "BACKEND", type(A).__name__)))


def provider_names() -> List[str]:
    return list(PROVIDERS)


def get(name: str) -> Optional[Provider]:
    return PROVIDERS.get(name)


__all__ += ["provider_names", "get", "Dense", "FiPS", "Reference", "TritonFactored", "TritonReconstruct",
            "CudaFactored", "CudaReconstruct", "CudaSparse24", "TwoGemm", "CsrRebuild", "SemiStructured24"]

from . import hashed_providers  # noqa: E402,F401  (registers hashed_fwd, hashed_materialize)
