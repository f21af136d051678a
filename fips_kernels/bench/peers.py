"""The peers and the dense baseline: every way of computing a layer that is
not this package's, each defined once, for every benchmark.

A peer is what a user would otherwise run (role ``peer``); the dense baseline
(role ``baseline``) is the denominator of every speed-up. Each is one
:class:`Peer` subclass registered with :func:`register_peer` in :data:`PEERS`,
with the **faces** it has:

* ``speed`` — :meth:`Peer.replace`: the peer's form of a FiPS group (the
  *same* factors and base, so outputs are comparable), as modules
  ``(shared, [one module per layer])``; ``shared`` holds the group's tensors
  once. From it come, with no further code per peer, the layer benchmark's
  rows (:meth:`Peer.prepare`, the ``fips-kernels bench`` provider), the group
  rows (:meth:`Peer.group`) and the end-to-end model variant
  (``fips-kernels bench-e2e`` installs the modules in the model). Each module
  counts its own arithmetic (``flops(M)``) and names what runs (``backend``).
* ``quality`` — :meth:`Peer.compress_weight` ``(W, stats, **setting) ->
  Compressed``: one trained weight compressed the peer's way (the weight it
  leaves and every byte it stores, :mod:`.quantizers`), with the calibration
  statistics it asks for (``calibration``: none, the inputs' ``XᵀX`` or their
  norms), swept over ``quality_settings`` by ``fips-kernels bench-quality``
  (:mod:`.quality`); ``library`` says where the algorithm comes from and
  ``quality_reasons`` why it cannot run here (its library missing, or never
  on this machine). A peer with only this face (round to nearest, GPTQ, HQQ …)
  is left out of the speed benchmarks (:func:`peers_with`).

Adding a peer is one subclass::

    @register_peer
    class MyPeer(Peer):
        name = "my_peer"
        description = "..."

        def not_supported_reasons(self, device, dtype, pattern):
            return [] if device.type == "cuda" else ["needs a CUDA GPU"]

        def replace(self, base, layers):
            shared = SharedTensors(U=base.matrix().detach())
            return shared, [MyLinear(layer.kind, shared, layer.bias, ...) for layer in layers]

This package's own providers (``fips``, ``triton_*``, ``cuda_*``, …, role
``ours``) are in :mod:`.providers`; roles are declared in :mod:`.registry`.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import BASELINE, PEER, PROVIDERS, Prepared, Provider
from .sizes import module_bytes, tensor_bytes

__all__ = ["Peer", "PEERS", "register_peer", "peers_with", "FACES", "SharedTensors", "PeerLinear",
           "DenseBaseline", "TwoGemm", "CsrRebuild", "SemiStructured24", "RoundToNearest", "GPTQ", "SparseGPT",
           "Wanda", "HQQ", "TorchAO"]

FACES = ("speed", "quality")
PEERS: Dict[str, "Peer"] = {}


def _bias(layer: nn.Module) -> Optional[torch.Tensor]:
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach()


def _cuda_reasons(device: torch.device) -> List[str]:
    if device.type != "cuda":
        return [f"needs a CUDA GPU (input is on {device.type})"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
        cap = torch.cuda.get_device_capability(device)
        return [f"needs compute capability 8.0+, this GPU is {cap[0]}.{cap[1]}"]
    return []


# ---------------------------------------------------------------- the modules of the speed face

class SharedTensors(nn.Module):
    """One group's shared tensors for a peer (registered once per model)."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


class PeerLinear(nn.Module):
    """A peer's form of one FiPS layer ``(*, in_features) -> (*, out_features)``;
    the group's tensors live in ``shared`` (a plain reference: whoever owns
    the modules registers ``shared`` once)."""

    backend = "torch"

    def __init__(self, kind: str, in_features: int, out_features: int, shared: SharedTensors,
                 bias: Optional[torch.Tensor], **own: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "_shared", shared)
        self.kind, self.in_features, self.out_features = kind, in_features, out_features
        for name, t in own.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)

    def flops(self, M: int) -> int:
        """Arithmetic of one call on ``M`` rows."""
        raise NotImplementedError


class TwoGemmLinear(PeerLinear):
    """``(x·U)·V + b`` (contract ``(x·Vᵀ)·Uᵀ + b``), V stored dense."""

    def forward(self, x):
        U = self._shared.U
        if self.kind == "expand":
            return F.linear(F.linear(x, U.t()), self.V.t(), self.bias)
        return F.linear(F.linear(x, self.V), U, self.bias)

    def flops(self, M: int) -> int:
        return 2 * M * (self._shared.U.numel() + self.V.numel())


class CsrRebuildLinear(PeerLinear):
    """``W = U·V`` rebuilt every call from a CSR ``Vᵀ`` (``torch.sparse.mm``), then ``F.linear``."""

    backend = "torch.sparse"

    def forward(self, x):
        Wt = torch.sparse.mm(self.Vt_csr, self._shared.Ut)  # (h × d): the expand weight; its transpose the contract's
        return F.linear(x, Wt if self.kind == "expand" else Wt.t(), self.bias)

    def flops(self, M: int) -> int:
        d = self._shared.Ut.shape[1]
        return 2 * d * self.Vt_csr.values().numel() + 2 * M * self.in_features * self.out_features


class SemiStructuredLinear(PeerLinear):
    """The 2:4 factor on sparse tensor cores (``to_sparse_semi_structured``),
    the rank zero-padded to a multiple of :attr:`SemiStructured24.PAD`."""

    @property
    def backend(self) -> str:
        return str(getattr(self.A, "BACKEND", type(self.A).__name__))

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        U = self._shared.U_pad
        if self.kind == "expand":  # y = (x·U)·V: the sparse operand is Vᵀ (h × r), 2:4 along r
            y = F.linear(x2 @ U, self.A, self.bias)
        else:  # y = (x·Vᵀ)·Uᵀ: the sparse operand is V (r × h), 2:4 along h
            y = F.linear(F.linear(x2, self.A), U, self.bias)
        return y.reshape(*lead, y.shape[-1])

    def flops(self, M: int) -> int:
        d, r_pad = self._shared.U_pad.shape
        h = self.out_features if self.kind == "expand" else self.in_features
        return 2 * M * (d * r_pad + r_pad * h // 2)


# ---------------------------------------------------------------- the registry

class Peer(Provider):
    """A peer (or the baseline): see the module docstring for its faces."""

    role = PEER

    def replace(self, base, layers: Sequence[nn.Module]) -> Tuple[nn.Module, List[nn.Module]]:
        """Speed face: this peer's form of ``layers`` (FiPS layers sharing ``base``):
        ``(shared, modules)``, one module per layer, in order."""
        raise NotImplementedError

    # -- the quality face
    library = ""                              # where the algorithm comes from (a package, or this one)
    calibration: Optional[str] = None         # per-layer statistics it needs: None, "hessian" or "norm"
    quality_settings: Tuple[dict, ...] = ()   # the points of its curve in the quality benchmark
    quality_note = ""                         # said in every row of its curve

    def compress_weight(self, W: torch.Tensor, stats: Optional[torch.Tensor], **setting):
        """Quality face: ``W (out × in)`` compressed this peer's way, as a
        :class:`~.quantizers.Compressed` (the weight it leaves, its stored bytes)."""
        raise NotImplementedError

    def quality_reasons(self) -> List[str]:
        """Why the quality face cannot run here (empty: it can)."""
        return []

    @property
    def faces(self) -> Tuple[str, ...]:
        mine = type(self)
        has = {"speed": mine.replace is not Peer.replace or mine.prepare is not Peer.prepare,
               "quality": bool(mine.quality_settings)}
        return tuple(f for f in FACES if has[f])

    # -- derived from the speed face
    def prepare(self, case) -> Prepared:
        """Layer face: the case's layer in this peer's form."""
        shared, (mod,) = self.replace(case.layer.base, [case.layer])
        return Prepared(run=mod, weight_bytes=module_bytes(shared, mod), flops=mod.flops, backend=mod.backend)

    def group(self, case):
        """Group face: every layer of a :class:`~.group.GroupCase` back to back (a :class:`~.group.GroupRun`)."""
        from .group import GroupRun

        shared, mods = self.replace(case.group.base, case.layers)

        def run(xs):
            y = None
            for mod in mods:
                y = mod(xs[mod.kind])
            return y

        return GroupRun(run, module_bytes(shared, *mods), lambda M: sum(mod.flops(M) for mod in mods),
                        mods[0].backend if mods else "torch")


def register_peer(cls):
    """Class decorator: add a peer to :data:`PEERS` and, when it has the speed
    face, to the layer benchmark's providers."""
    peer = cls()
    if peer.role not in (PEER, BASELINE):
        raise ValueError(f"peer {cls.name!r}: role {peer.role!r} must be {PEER!r} or {BASELINE!r}")
    if cls.name in PEERS or cls.name in PROVIDERS:
        raise ValueError(f"peer {cls.name!r} is registered twice")
    PEERS[cls.name] = peer
    if "speed" in peer.faces:
        PROVIDERS[cls.name] = peer
    return cls


def peers_with(face: str) -> Dict[str, Peer]:
    """The registered peers (and baseline) that have ``face``, in registration order."""
    if face not in FACES:
        raise ValueError(f"unknown face {face!r}; faces: {FACES}")
    return {name: p for name, p in PEERS.items() if face in p.faces}


@register_peer
class DenseBaseline(Peer):
    name = "dense"
    role = BASELINE
    description = "F.linear with a dense weight of the same shape (cuBLAS): the baseline"

    @staticmethod
    def linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> nn.Linear:
        """A dense ``nn.Linear`` of that shape with random weights (:func:`.cases.random_dense`)."""
        from .cases import random_dense

        W, b = random_dense(out_features, in_features, bias, dtype, generator, device)
        lin = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            if bias:
                lin.bias.copy_(b)
        return lin.requires_grad_(False)

    def prepare(self, case) -> Prepared:
        W, b = case.dense_weight, case.dense_bias
        return Prepared(run=lambda x: F.linear(x, W, b), weight_bytes=tensor_bytes(W, b),
                        flops=lambda M: 2 * M * case.in_features * case.out_features, same_layer=False)

    def group(self, case):
        from .group import GroupRun

        kinds = [layer.kind for layer in case.layers]
        dense = case.dense

        def run(xs):
            y = None
            for kind, (W, b) in zip(kinds, dense):
                y = F.linear(xs[kind], W, b)
            return y

        return GroupRun(run, case.dense_bytes, case.dense_flops)


@register_peer
class TwoGemm(Peer):
    name = "two_gemm"
    description = "two dense GEMMs (x·U)·V (contract: (x·Vᵀ)·Uᵀ) with V stored dense: the FiPS authors' path"

    def replace(self, base, layers):
        shared = SharedTensors(U=base.matrix().detach())
        return shared, [TwoGemmLinear(l.kind, l.in_features, l.out_features, shared, _bias(l),
                                      V=l.V.detach().contiguous()) for l in layers]


@register_peer
class CsrRebuild(Peer):
    name = "csr_rebuild"
    description = "V as a torch CSR tensor; W = U·V rebuilt every call (torch.sparse.mm), then F.linear"

    def replace(self, base, layers):
        shared = SharedTensors(Ut=base.matrix().detach().t().contiguous())  # (r × d)
        mods = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            for l in layers:  # torch.sparse.mm wants the sparse operand first: Vᵀ (h × r)
                Vt = l.V.detach().t().contiguous().to_sparse_csr()
                mods.append(CsrRebuildLinear(l.kind, l.in_features, l.out_features, shared, _bias(l), Vt_csr=Vt))
        return shared, mods


@register_peer
class SemiStructured24(Peer):
    name = "semi_structured_24"
    description = ("2:4 factor on sparse tensor cores (torch.sparse.to_sparse_semi_structured), "
                   "two F.linear calls; the rank padded with zeros to a multiple of 64")

    PAD = 64  # both cuSPARSELt (16) and CUTLASS (32 rows, 64 columns) accept multiples of 64

    def not_supported_reasons(self, device, dtype, pattern):
        reasons = []
        if pattern != "2:4":
            reasons.append(f"sparse tensor cores need the 2:4 pattern, not {pattern}")
        reasons += _cuda_reasons(device)
        if dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"needs float16 or bfloat16, not {str(dtype).replace('torch.', '')}")
        if not hasattr(torch.sparse, "to_sparse_semi_structured"):
            reasons.append(f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured")
        return reasons

    def replace(self, base, layers):
        U = base.matrix().detach()
        pad = -U.shape[1] % self.PAD
        shared = SharedTensors(U_pad=F.pad(U, (0, pad)).contiguous())  # (d × r_pad), zero columns
        mods = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for l in layers:
                V = l.V.detach()
                dense = F.pad(V.t(), (0, pad)) if l.kind == "expand" else F.pad(V, (0, 0, 0, pad))
                A = torch.sparse.to_sparse_semi_structured(dense.contiguous())
                mods.append(SemiStructuredLinear(l.kind, l.in_features, l.out_features, shared, _bias(l), A=A))
        return shared, mods


# ---------------------------------------------------------------- the weight compressors (quality face)

def _bits_groups(bits, groups=(64,)) -> Tuple[dict, ...]:
    return tuple(dict(bits=b, group=g) for b in bits for g in groups)


def _importable(module: str, why: str = "") -> List[str]:
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means it cannot run here
        return [f"{module} is not importable ({type(exc).__name__}: {exc}){why}; pip install 'fips-kernels[quality]'"]
    return []


@register_peer
class RoundToNearest(Peer):
    name = "rtn"
    library = "fips_kernels (plain)"
    description = ("round to nearest, asymmetric min-max grid per group of inputs, fp16 scale + integer zero "
                   "point, no calibration")
    quality_settings = _bits_groups((8, 4, 3, 2), (64, 128))

    def compress_weight(self, W, stats, bits, group=64):
        from . import quantizers

        return quantizers.rtn(W, bits, group)


@register_peer
class GPTQ(Peer):
    name = "gptq"
    library = "fips_kernels (from the paper)"
    description = "GPTQ (arXiv 2210.17323) on the RTN grid, calibrated block by block"
    calibration = "hessian"
    quality_settings = _bits_groups((4, 3, 2), (64, 128))

    def compress_weight(self, W, H, bits, group=64):
        from . import quantizers

        return quantizers.gptq(W, H, bits, group)


@register_peer
class SparseGPT(Peer):
    name = "sparsegpt"
    library = "fips_kernels (from the paper)"
    description = ("SparseGPT (arXiv 2301.00774): 50 % unstructured or 2:4, fp16 or int4 values (joint), bitmap / "
                   "N:M indices as the package stores them")
    calibration = "hessian"
    quality_settings = (dict(pattern="unstructured"), dict(pattern="unstructured", bits=4),
                        dict(pattern="2:4", bits=4))

    def compress_weight(self, W, H, sparsity=0.5, pattern="unstructured", bits=None, group=64):
        from . import quantizers

        return quantizers.sparsegpt(W, H, sparsity, pattern=pattern, bits=bits, group=group)


@register_peer
class Wanda(Peer):
    name = "wanda"
    library = "fips_kernels (from the paper)"
    description = "Wanda (arXiv 2306.11695): |w|·‖x‖ pruning per output row, 50 % unstructured or 2:4, fp16 values"
    calibration = "norm"
    quality_settings = (dict(pattern="unstructured"), dict(pattern="2:4"))

    def compress_weight(self, W, norms, sparsity=0.5, pattern="unstructured"):
        from . import quantizers

        return quantizers.wanda(W, norms, sparsity, pattern=pattern)


class _Library(Peer):
    """A quantiser from a library users install (its algorithm in :mod:`.quantizers`)."""

    module = ""       # the package that must import
    function = ""     # the :mod:`.quantizers` function: (W, bits, group) -> Compressed
    quality_settings = _bits_groups((8, 4, 3, 2), (64, 128))

    def quality_reasons(self):
        return _importable(self.module)

    def compress_weight(self, W, stats, bits, group=64):
        from . import quantizers

        return getattr(quantizers, self.function)(W, bits, group)


@register_peer
class HQQ(_Library):
    name = library = module = "hqq"
    function = "hqq_weight"
    description = "HQQ (half-quadratic quantisation; the hqq package's HQQLinear), fp16 scale and zero per group"


@register_peer
class TorchAO(_Library):
    name = library = module = "torchao"
    function = "torchao_weight"
    description = ("torchao weight-only: Int8WeightOnlyConfig (per channel), IntxWeightOnlyConfig int4/int3/int2 "
                   "per group (the CPU path)")
    quality_settings = (dict(bits=8), *_bits_groups((4, 3, 2)))
    quality_note = "counted at the bit width; torchao keeps int2-int4 values unpacked in int8 on the CPU"


class _Unavailable(Peer):
    """A library users would pick that cannot run here: listed in the quality benchmark with why."""

    quality_settings = (dict(),)
    reason = ""

    def quality_reasons(self):
        return [self.reason]


@register_peer
class TorchAOInt4(_Unavailable):
    name = "torchao-int4"
    library = "torchao"
    description = "torchao Int4WeightOnlyConfig (the tinygemm / mslk int4 layouts)"
    reason = ("Int4WeightOnlyConfig needs the mslk-cuda kernels or an NVIDIA GPU (plain and preshuffled layouts "
              "import mslk, plain_int32 has no CPU support, tile_packed_to_4d needs a driver); IntxWeightOnlyConfig "
              "(peer torchao) is its CPU path")


@register_peer
class LLMCompressor(_Unavailable):
    name = "llmcompressor"
    library = "llmcompressor"
    description = "GPTQ / SparseGPT / Wanda from llmcompressor"
    reason = ("llmcompressor 0.14 requires torch<=2.14.0 and transformers<=5.17.0: installing it would replace the "
              "installed torch; GPTQ, SparseGPT and Wanda are implemented here from their papers instead (peers "
              "gptq, sparsegpt, wanda)")


@register_peer
class GPTQModel(_Unavailable):
    name = "gptqmodel"
    library = "gptqmodel"
    description = "GPTQ from GPTQModel"
    reason = ("GPTQModel 7.7 has model definitions for decoder LLMs only (no BERT-family encoder such as MiniLM); "
              "peer gptq implements the paper instead")
