"""The end-to-end benchmark behind ``fips-kernels bench-e2e``.

Whole models, dense against FiPS at budget p = 0.5 and against the peer paths
of the layer benchmark, in the same process:

* **image models** (``deit-b``, ``swin-l``): timm DeiT-B and Swin-L built from
  their configs (``timm.create_model(name, pretrained=False)``: nothing is
  downloaded, the weights are random). Their MLPs (fc1/fc2) are grouped —
  DeiT-B: 4 consecutive blocks per group; Swin-L: up to 6 consecutive blocks
  within a stage (groups never cross a change of width, DESIGN §1) — and
  replaced by FiPS layers built from random factors at the group's rank
  (:func:`.shapes.group_rank`, :func:`.cases.random_factor`),
  exactly as the layer benchmark builds its layers. Images/s per batch.
* **decode** (``llama3-8b-mlp``): one group of 4 Llama-3-8B-shaped gated MLP
  blocks (gate/up/down, SiLU gating, residual add, no biases), one token per
  sequence per step; FiPS runs gate and up fused (:func:`fips_kernels.ops.gate_up`,
  ``z = x·U`` once). Tokens/s per batch.

Providers (model variants): ``dense`` (the model's ``nn.Linear`` MLPs),
``fips`` (:class:`FiPSLinear` through the dispatched op), and the peers
``two_gemm`` (V stored dense, two GEMMs), ``csr_rebuild`` (V as a torch CSR
tensor, ``W = U·V`` rebuilt every call) and ``semi_structured_24`` (2:4 factor
on sparse tensor cores). All FiPS-family variants of one pattern are built
from the same random factors, sharing each group's base once.

Modes: ``eager``, ``cudagraph`` (the eager model captured in one CUDA graph),
``compile`` (``torch.compile``) and ``compile-cudagraph``
(``torch.compile(mode="reduce-overhead")``).

Per row: median time of one call (:func:`.timing.time_ms`: ``do_bench`` on a
GPU), throughput, speed-up over the dense model in the same mode, the bytes
of the model's parameters and buffers (whole model and MLPs only) and the peak
GPU memory allocated while the mode was set up and run. ``--budget-s`` bounds
the run: the points it leaves get ``skipped`` rows saying so. Columns:
``benchmarks/README.md``. CPU runs (``--tiny``) only check the harness.
"""
from __future__ import annotations

import csv
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import dispatch, modules
from ..cuda import clear_packs
from ..modules import FiPSLinear, SharedBase
from ..workspaces import clear_workspaces
from .cases import random_factor
from .env import run_metadata, utc_now
from .layer import DTYPE_NAMES, DTYPES, METADATA_COLUMNS, BenchError, _describe, _fmt, resolve_device, timing_overrides
from .shapes import BUDGET, PATTERNS, Pattern, group_rank
from .timing import TimingConfig, measure_bandwidth, time_ms

__all__ = [
    "E2E_COLUMNS",
    "MODELS",
    "TINY_MODELS",
    "MODES",
    "E2E_PROVIDERS",
    "ModelSpec",
    "E2EConfig",
    "resolve_config",
    "run",
    "summary_table",
    "module_bytes",
    "tensor_nbytes",
    "mlp_groups",
]

E2E_COLUMNS = (
    "model", "arch", "task", "provider", "pattern", "format", "dtype", "mode", "batch", "mlp_rows", "backend",
    "status", "reason", "time_ms", "throughput", "unit", "speedup_vs_dense",
    "weight_bytes", "mlp_weight_bytes", "weight_ratio_vs_dense", "mlp_weight_ratio_vs_dense", "run_peak_bytes",
    "groups", "blocks_per_group", "ranks", "rel_err", "bytes", "roofline_ms", "frac_of_roofline",
    "bandwidth_GBps",
) + METADATA_COLUMNS

MODES = ("eager", "cudagraph", "compile", "compile-cudagraph")
E2E_PROVIDERS = ("dense", "fips", "two_gemm", "csr_rebuild", "semi_structured_24")
E2E_PATTERNS = ("unstructured", "1:4", "2:4")  # the default; any pattern of the layer benchmark is accepted
OURS = ("fips",)
# rel_err (vs the FiPS model on the reference backend, eager, same dtype) above this flags a row
TOLERANCE = {torch.float16: 5e-2, torch.bfloat16: 1e-1, torch.float32: 1e-3}
CPU_NOTE = "CPU timings only check the harness: they are not model figures."
TIMM_MISSING = "timm is not installed (pip install timm): the image models are built from timm configs"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model.

    ``task="images"``: a timm model (``arch``, built with ``timm_kwargs``), its
    ``fc1``/``fc2`` MLPs grouped ``group_size`` consecutive blocks at a time
    within a stage. ``task="decode"``: ``blocks`` gated MLP blocks of width
    ``d`` and hidden ``h``, one group.
    """

    name: str
    task: str  # "images" or "decode"
    arch: str
    group_size: int
    batches: Tuple[int, ...]
    timm_kwargs: Tuple[Tuple[str, object], ...] = ()
    d: int = 0
    h: int = 0
    blocks: int = 0
    description: str = ""

    @property
    def unit(self) -> str:
        return "images/s" if self.task == "images" else "tokens/s"


IMAGE_BATCHES = (1, 8, 64, 256)
DECODE_BATCHES = (1, 4, 16, 64)
TINY_BATCHES = (1, 4)

MODELS: Dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("deit-b", "images", "deit_base_patch16_224", 4, IMAGE_BATCHES,
              description="timm DeiT-B/16 at 224 px; 12 blocks, 3 groups of 4"),
    ModelSpec("swin-l", "images", "swin_large_patch4_window7_224", 6, IMAGE_BATCHES,
              description="timm Swin-L window 7 at 224 px; stages of 2, 2, 18, 2 blocks, groups of up to 6 within a stage"),
    ModelSpec("llama3-8b-mlp", "decode", "gated-mlp", 4, DECODE_BATCHES, d=4096, h=14336, blocks=4,
              description="Llama-3-8B MLP stack for decode: one group of 4 gate/up/down blocks, SiLU gating"),
)}

# Harness checks on a CPU in seconds (CI); not model figures.
TINY_MODELS: Dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("tiny-vit", "images", "deit_base_patch16_224", 4, TINY_BATCHES,
              (("img_size", 32), ("patch_size", 8), ("embed_dim", 64), ("depth", 8), ("num_heads", 2),
               ("num_classes", 10)),
              description="harness check: DeiT config shrunk to 32 px, width 64, 8 blocks (2 groups of 4)"),
    ModelSpec("tiny-swin", "images", "swin_large_patch4_window7_224", 6, TINY_BATCHES,
              (("img_size", 32), ("patch_size", 4), ("window_size", 4), ("embed_dim", 32),
               ("depths", (2, 8)), ("num_heads", (1, 2)), ("num_classes", 10)),
              description="harness check: Swin config shrunk to 32 px, width 32, stages of 2 and 8 blocks "
                          "(groups of 2, then 6 and 2)"),
    ModelSpec("tiny-mlp", "decode", "gated-mlp", 4, TINY_BATCHES, d=64, h=256, blocks=4,
              description="harness check: 4 gated MLP blocks, d=64, h=256"),
)}

ALL_MODELS: Dict[str, ModelSpec] = {**MODELS, **TINY_MODELS}


# ---------------------------------------------------------------- bytes

def tensor_nbytes(t: torch.Tensor) -> int:
    """Stored bytes of a tensor: strided, sparse CSR (indices + values) or a
    traceable subclass such as a semi-structured sparse tensor (its inner tensors)."""
    if t is None:
        return 0
    if t.layout == torch.sparse_csr:
        return sum(tensor_nbytes(p) for p in (t.crow_indices(), t.col_indices(), t.values()))
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names = t.__tensor_flatten__()[0]
        return sum(tensor_nbytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


def module_bytes(*mods: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``mods``, each tensor counted once
    (a group's shared base is registered once, however many layers use it)."""
    seen, total = set(), 0
    for mod in mods:
        for t in list(mod.parameters()) + list(mod.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            total += tensor_nbytes(t)
    return total


# ---------------------------------------------------------------- model structure

def mlp_groups(model: nn.Module, group_size: int) -> List[List[str]]:
    """The dotted paths of the model's MLPs (modules with ``fc1``/``fc2`` Linear
    children), grouped: consecutive blocks of one container (a ViT's ``blocks``,
    a Swin stage's ``layers.<s>.blocks``), at most ``group_size`` per group."""
    by_container: Dict[str, List[str]] = {}
    for name, mod in model.named_modules():
        fc1, fc2 = getattr(mod, "fc1", None), getattr(mod, "fc2", None)
        if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
            container = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
            by_container.setdefault(container, []).append(name)
    groups = []
    for names in by_container.values():
        for i in range(0, len(names), group_size):
            groups.append(names[i:i + group_size])
    return groups


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``; with FiPS layers fused (:meth:`fuse`),
    gate and up run as one :func:`fips_kernels.ops.gate_up` call (``z = x·U`` once)."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down
        object.__setattr__(self, "_fused", None)

    def fuse(self, enabled: bool = True) -> None:
        """Fuse the FiPS gate and up layers (which share a base and a format)."""
        if not enabled:
            object.__setattr__(self, "_fused", None)
            return
        g, u = self.gate, self.up
        base = g.base
        operand = base.operand if hasattr(base, "operand") else base.U  # int8 bases: a quantised operand
        object.__setattr__(self, "_fused", (operand, g.factor, u.factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            from ..ops import gate_up

            operand, gf, uf = self._fused
            hidden = gate_up(x, operand, gf, uf, self.gate.bias, self.up.bias)
        else:
            hidden = F.silu(self.gate(x)) * self.up(x)
        return self.down(hidden)


class MLPStack(nn.Module):
    """Decode blocks: ``x = x + mlp(x)`` for each gated MLP."""

    def __init__(self, blocks: Sequence[GatedMLP]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


# ---------------------------------------------------------------- peers as modules

class SharedTensors(nn.Module):
    """One group's shared tensors for a peer variant (registered once per model)."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


class PeerLinear(nn.Module):
    """A peer's form of one FiPS layer; the group's tensors live in ``shared``
    (a plain reference: the model registers it once under ``e2e_shared``)."""

    def __init__(self, kind: str, shared: SharedTensors, bias: Optional[torch.Tensor], **own: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "_shared", shared)
        self.kind = kind
        for name, t in own.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)


class TwoGemmLinear(PeerLinear):
    """The FiPS authors' path: ``(x·U)·V + b`` (contract ``(x·Vᵀ)·Uᵀ + b``), V stored dense."""

    def forward(self, x):
        U = self._shared.U
        if self.kind == "expand":
            return F.linear(F.linear(x, U.t()), self.V.t(), self.bias)
        return F.linear(F.linear(x, self.V), U, self.bias)


class CsrRebuildLinear(PeerLinear):
    """``W = U·V`` rebuilt every call from a CSR ``Vᵀ`` (``torch.sparse.mm``), then ``F.linear``."""

    def forward(self, x):
        Wt = torch.sparse.mm(self.Vt_csr, self._shared.Ut)  # (h × d)
        return F.linear(x, Wt if self.kind == "expand" else Wt.t(), self.bias)


class SemiStructuredLinear(PeerLinear):
    """The 2:4 factor on sparse tensor cores (``to_sparse_semi_structured``),
    the rank zero-padded to a multiple of 64 (as the layer benchmark's peer)."""

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        U = self._shared.U_pad
        if self.kind == "expand":
            y = F.linear(x2 @ U, self.A, self.bias)
        else:
            y = F.linear(F.linear(x2, self.A), U, self.bias)
        return y.reshape(*lead, y.shape[-1])


def _peer_reasons(provider: str, device: torch.device, dtype: torch.dtype, pattern: str) -> List[str]:
    from .providers import PROVIDERS

    if provider == "dense":
        return []
    return PROVIDERS[provider].not_supported_reasons(device, dtype, pattern)


def _to_peer(provider: str, group_layers: List[FiPSLinear], base: SharedBase) -> Tuple[SharedTensors, List[nn.Module]]:
    """The peer form of one FiPS group (same factors)."""
    import warnings

    U = (base.matrix() if hasattr(base, "matrix") else base.U).detach()
    if provider == "two_gemm":
        shared = SharedTensors(U=U)
        return shared, [TwoGemmLinear(l.kind, shared, _bias(l), V=l.V.detach().contiguous()) for l in group_layers]
    if provider == "csr_rebuild":
        shared = SharedTensors(Ut=U.t().contiguous())
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            for l in group_layers:
                out.append(CsrRebuildLinear(l.kind, shared, _bias(l),
                                            Vt_csr=l.V.detach().t().contiguous().to_sparse_csr()))
        return shared, out
    if provider == "semi_structured_24":
        from .providers import SemiStructured24

        r = U.shape[1]
        pad = -r % SemiStructured24.PAD
        shared = SharedTensors(U_pad=F.pad(U, (0, pad)).contiguous())
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for l in group_layers:
                V = l.V.detach()
                dense = F.pad(V.t(), (0, pad)) if l.kind == "expand" else F.pad(V, (0, 0, 0, pad))
                A = torch.sparse.to_sparse_semi_structured(dense.contiguous())
                out.append(SemiStructuredLinear(l.kind, shared, _bias(l), A=A))
        return shared, out
    raise ValueError(f"unknown peer {provider!r}")


def _bias(layer: nn.Module) -> Optional[torch.Tensor]:
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach()


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class E2EConfig:
    models: Tuple[str, ...]
    providers: Tuple[str, ...]
    patterns: Tuple[str, ...]
    modes: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    image_batches: Optional[Tuple[int, ...]]  # None: each model's default
    decode_batches: Optional[Tuple[int, ...]]
    device: torch.device
    out: Path
    timing: TimingConfig = field(default_factory=TimingConfig)
    budget_s: Optional[float] = None
    seed: int = 0
    check: bool = True
    progress: bool = True
    notes: Tuple[str, ...] = ()

    def batches(self, spec: ModelSpec) -> Tuple[int, ...]:
        given = self.image_batches if spec.task == "images" else self.decode_batches
        return tuple(given) if given else spec.batches

    def variants(self) -> List[Tuple[str, str]]:
        """``(provider, pattern)`` in run order: dense first (the baseline), then
        FiPS for every pattern, then each peer for every pattern (a run cut
        short by ``--budget-s`` loses peers before FiPS)."""
        out = [("dense", "")]
        for provider in self.providers:
            if provider != "dense":
                out += [(provider, pattern) for pattern in self.patterns]
        return out

    @property
    def points(self) -> int:
        per = len(self.variants()) * len(self.modes) * len(self.dtypes)
        return sum(per * len(self.batches(ALL_MODELS[m])) for m in self.models)


def _choose(kind, given, known, default):
    from .layer import _choose as choose

    return choose(kind, given, known, default)


def _positive_ints(values, flag) -> Optional[Tuple[int, ...]]:
    if values is None:
        return None
    vals = tuple(dict.fromkeys(int(v) for v in values))
    if not vals or any(v < 1 for v in vals):
        raise BenchError(f"{flag} must be positive integers, got {list(values)}")
    return vals


def resolve_config(*, models=None, providers=None, patterns=None, modes=None, dtypes=None, batch=None,
                   decode_batch=None, device=None, tiny=False, out=None, warmup_ms=None, rep_ms=None,
                   reps=None, budget_s=None, seed=0, check=True, progress=True) -> E2EConfig:
    """Validate the arguments and fill in the defaults (without CUDA and without
    a choice of models: the tiny models on the CPU, eager only)."""
    notes: List[str] = []
    dev = resolve_device(device)
    if dev.type == "cpu" and not tiny and models is None:
        tiny = True
        notes.append("no CUDA GPU: running the tiny models on the CPU (choose --models for others).")
    if dev.type == "cpu":
        notes.append(CPU_NOTE)

    chosen_models = _choose("model", models, ALL_MODELS, list(TINY_MODELS if tiny else MODELS))
    chosen_providers = _choose("provider", providers, E2E_PROVIDERS, E2E_PROVIDERS)
    if "dense" not in chosen_providers:
        notes.append("dense is always run: it is the baseline of speedup_vs_dense.")
    chosen_providers = ("dense",) + tuple(p for p in chosen_providers if p != "dense")
    chosen_patterns = _choose("pattern", patterns, PATTERNS, [p for p in E2E_PATTERNS if p in PATTERNS])
    default_modes = MODES if dev.type == "cuda" else ("eager",)
    chosen_modes = _choose("mode", modes, MODES, default_modes)

    if dtypes is None:
        names = ["fp16", "bf16"] if dev.type == "cuda" else ["fp32"]
    else:
        names = [n.strip().lower() for n in dtypes if n.strip()]
        if not names:
            raise BenchError("no dtype given; choose from fp16, bf16, fp32")
    chosen_dtypes = []
    for n in names:
        if n not in DTYPES:
            raise BenchError(f"unknown dtype {n!r}; choose from fp16, bf16, fp32")
        if DTYPES[n] not in chosen_dtypes:
            chosen_dtypes.append(DTYPES[n])
    if dev.type == "cpu" and torch.bfloat16 in chosen_dtypes:
        raise BenchError("bf16 is not timed on the CPU (bf16 arithmetic is wrong under the Triton interpreter "
                         "and CPU bf16 timings say nothing about the kernels); use fp32 or fp16 on the CPU")

    timing = TimingConfig(warmup_ms=10.0, rep_ms=50.0, cpu_warmup=1, cpu_reps=3)
    timing = timing_overrides(timing, warmup_ms, rep_ms, reps)
    if budget_s is not None and budget_s <= 0:
        raise BenchError(f"--budget-s must be > 0, got {budget_s}")

    if out is None:
        out_path = Path.cwd() / f"fips_bench_e2e_{dev.type}_{utc_now():%Y%m%dT%H%M%SZ}.csv"
    else:
        out_path = Path(out)
        if out_path.is_dir():
            raise BenchError(f"--out {out} is a directory; give a file name")
    return E2EConfig(chosen_models, chosen_providers, chosen_patterns, chosen_modes, tuple(chosen_dtypes),
                     _positive_ints(batch, "--batch"), _positive_ints(decode_batch, "--decode-batch"), dev,
                     out_path, timing, budget_s, seed, check, progress, tuple(notes))


# ---------------------------------------------------------------- building the variants

def _timm():
    try:
        import timm
    except Exception:  # noqa: BLE001 - missing or broken install
        return None
    return timm


class _Model:
    """A model whose MLP layers can be swapped between variants.

    ``slots``: per group, the dotted paths of its layers with
    ``(kind, in_features, out_features, has_bias)``.
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device, seed: int):
        self.spec, self.dtype, self.device, self.seed = spec, dtype, device, seed
        torch.manual_seed(seed)  # timm's initialisation draws from the global generator
        if spec.task == "images":
            timm = _timm()
            with torch.device(device):
                model = timm.create_model(spec.arch, pretrained=False, **dict(spec.timm_kwargs))
            size = getattr(model.patch_embed, "img_size", (224, 224))
            self.input_shape = (3, *tuple(size))
            groups = mlp_groups(model, spec.group_size)
            self.slots = []
            for group in groups:
                slot = []
                for mlp in group:
                    for fc, kind in (("fc1", "expand"), ("fc2", "contract")):
                        lin = model.get_submodule(f"{mlp}.{fc}")
                        slot.append((f"{mlp}.{fc}", kind, lin.in_features, lin.out_features, lin.bias is not None))
                self.slots.append(slot)
        else:
            d, h = spec.d, spec.h
            blocks = [GatedMLP(nn.Identity(), nn.Identity(), nn.Identity()) for _ in range(spec.blocks)]
            model = MLPStack(blocks)
            self.input_shape = (d,)
            self.slots = []
            for gi in range(0, spec.blocks, spec.group_size):
                slot = []
                for b in range(gi, min(spec.blocks, gi + spec.group_size)):
                    slot += [(f"blocks.{b}.gate", "expand", d, h, False), (f"blocks.{b}.up", "expand", d, h, False),
                             (f"blocks.{b}.down", "contract", h, d, False)]
                self.slots.append(slot)
        self.model = model.to(dtype=dtype).eval().requires_grad_(False)
        self.variant: Tuple[str, str] = ("", "")
        self.ranks: List[int] = []

    # -- helpers
    def _set(self, path: str, module: nn.Module) -> None:
        modules.set_submodule(self.model, path, module)

    def _clear_shared(self) -> None:
        for name in ("fips_bases", "e2e_shared"):
            if hasattr(self.model, name):
                delattr(self.model, name)
        if self.spec.task == "decode":
            for block in self.model.blocks:
                block.fuse(False)

    def mlp_modules(self) -> List[nn.Module]:
        mods = [self.model.get_submodule(path) for slot in self.slots for path, *_ in slot]
        for name in ("fips_bases", "e2e_shared"):
            if hasattr(self.model, name):
                mods.append(getattr(self.model, name))
        return mods

    def make_input(self, batch: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(self.seed + 5000 + batch)
        return torch.randn(batch, *self.input_shape, generator=g, device=self.device).to(self.dtype)

    # -- variants
    def install_dense(self) -> None:
        self._clear_shared()
        g = torch.Generator(device=self.device).manual_seed(self.seed + 11)
        for slot in self.slots:
            for path, kind, in_f, out_f, has_bias in slot:
                lin = nn.Linear(in_f, out_f, bias=has_bias, device=self.device, dtype=self.dtype)
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(out_f, in_f, generator=g, device=self.device) / math.sqrt(in_f))
                    if has_bias:
                        lin.bias.copy_(0.02 * torch.randn(out_f, generator=g, device=self.device))
                self._set(path, lin.requires_grad_(False))
        self.variant, self.ranks = ("dense", ""), []

    def install_fips(self, pattern: Pattern) -> List[Tuple[SharedBase, List[FiPSLinear]]]:
        """Random FiPS groups at the budget's rank (seeded by pattern: every
        variant of a pattern gets the same factors)."""
        self._clear_shared()
        salt = list(PATTERNS).index(pattern.name) if pattern.name in PATTERNS else 7
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + 100 + salt)
        groups, self.ranks = [], []
        for slot in self.slots:
            kinds = [kind for _, kind, *_ in slot]
            d = slot[0][2] if kinds[0] == "expand" else slot[0][3]
            hidden = [out_f if kind == "expand" else in_f for _, kind, in_f, out_f, _ in slot]
            r = group_rank(d, kinds, hidden, pattern, BUDGET)
            U = (torch.randn(d, r, generator=g, device=self.device) / math.sqrt(d)).to(self.dtype).contiguous()
            base = SharedBase(U).requires_grad_(False)
            if getattr(pattern, "qbits", None) and hasattr(base, "quantize_"):
                base.quantize_(8)  # as the layer benchmark builds a quantised pattern
            layers = []
            for (path, kind, in_f, out_f, has_bias), h in zip(slot, hidden):
                K, N = (r, h) if kind == "expand" else (h, r)
                factor = random_factor(K, N, pattern, self.dtype, g, self.device)
                bias = (0.02 * torch.randn(out_f, generator=g, device=self.device)).to(self.dtype) if has_bias else None
                layers.append(FiPSLinear(base, factor, kind, bias).requires_grad_(False))
            group = modules.FiPSGroup(base, layers)
            modules.install(self.model, group, [path for path, *_ in slot])
            groups.append((base, layers))
            self.ranks.append(r)
        if self.spec.task == "decode":
            for block in self.model.blocks:
                block.fuse(True)
        self.variant = ("fips", pattern.name)
        return groups

    def install_peer(self, provider: str, groups: List[Tuple[SharedBase, List[FiPSLinear]]],
                     pattern: Pattern) -> None:
        """Replace the installed FiPS ``groups`` by ``provider``'s form of the same factors."""
        self._clear_shared()  # drops fips_bases; the FiPS layers still hold their bases until replaced
        self.model.e2e_shared = nn.ModuleList()
        for (base, layers), slot in zip(groups, self.slots):
            shared, peers = _to_peer(provider, layers, base)
            self.model.e2e_shared.append(shared)
            for (path, *_), peer in zip(slot, peers):
                self._set(path, peer)
        del groups
        self.variant = (provider, pattern.name)

    def first_mlp(self) -> nn.Module:
        return self.model.get_submodule(self.slots[0][0][0])


# ---------------------------------------------------------------- running one mode

class _Runner:
    """The callable of one (variant, mode); built once, reused for every batch."""

    def __init__(self, model: nn.Module, mode: str, device: torch.device):
        self.model, self.mode, self.device = model, mode, device
        self.compiled = None
        if mode == "compile":
            self.compiled = torch.compile(model)
        elif mode == "compile-cudagraph":
            self.compiled = torch.compile(model, mode="reduce-overhead")

    def prepare(self, x: torch.Tensor) -> Tuple[Callable[[], torch.Tensor], torch.Tensor]:
        """Warm up (compile, autotune, capture) for ``x``; returns ``(fn, output)``."""
        if self.mode == "eager":
            y = self.model(x)
            return (lambda: self.model(x)), y
        if self.mode == "cudagraph":
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.model(x)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = self.model(x)
            graph.replay()
            return graph.replay, y
        fn = self.compiled
        for _ in range(3):
            y = fn(x)
        y = fn(x).clone() if self.mode == "compile-cudagraph" else fn(x)
        return (lambda: fn(x)), y

    def close(self) -> None:
        self.compiled = None
        if self.mode.startswith("compile"):
            torch._dynamo.reset()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device, collect: bool = False) -> None:
    """Drop what a variant left behind. ``collect``: also run the garbage
    collector (slow with timm and dynamo loaded: only after compiled modes,
    which leave reference cycles)."""
    if collect:
        gc.collect()
    clear_workspaces()  # reconstruct workspaces and 2:4 packs: part of a variant's run, not the next's
    clear_packs()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _mode_reasons(mode: str, device: torch.device) -> List[str]:
    if mode in ("cudagraph", "compile-cudagraph") and device.type != "cuda":
        return [f"CUDA graphs need a CUDA GPU (device is {device.type})"]
    return []


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _backend(layer: nn.Module, M: int) -> str:
    if isinstance(layer, FiPSLinear):
        from .layer import _dispatched_backend

        try:
            return _dispatched_backend(layer, M)
        except Exception:  # noqa: BLE001
            return "?"
    if isinstance(layer, SemiStructuredLinear):
        return "torch.sparse.semi_structured"
    return "torch.sparse" if isinstance(layer, CsrRebuildLinear) else "torch"


# ---------------------------------------------------------------- the run

def run(config: E2EConfig, *, log: Callable[[str], None] = print) -> List[Dict[str, str]]:
    """Run the benchmark, writing ``config.out`` row by row; returns the rows.
    On the CPU it runs on one thread (restored afterwards)."""
    threads = torch.get_num_threads()
    if config.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _Run(config, log).go()
    finally:
        torch.set_num_threads(threads)


class _Run:
    def __init__(self, config: E2EConfig, log):
        self.c, self.log = config, log
        self.rows: List[Dict[str, str]] = []
        self.t0 = time.monotonic()

    # -- budget: each (model, dtype) block gets an equal share of what is left
    def _elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _block_deadline(self, blocks_left: int) -> Optional[float]:
        if self.c.budget_s is None:
            return None
        left = max(0.0, self.c.budget_s - self._elapsed())
        return self._elapsed() + left / max(1, blocks_left)

    def _over(self, deadline: Optional[float]) -> bool:
        return deadline is not None and self._elapsed() >= deadline

    def go(self) -> List[Dict[str, str]]:
        from tqdm.auto import tqdm

        c = self.c
        meta = run_metadata(c.device)
        for note in c.notes:
            self.log(f"note: {note}")
        self.log(f"device {c.device} ({meta['gpu_name']}), torch {meta['torch']}, triton {meta['triton']}, "
                 f"commit {meta['commit']}")
        self.bw = None
        if any(ALL_MODELS[m].task == "decode" for m in c.models):
            bw_dtype = torch.float16 if c.device.type == "cuda" else torch.float32
            self.bw = measure_bandwidth(c.device, bw_dtype, c.timing)
            self.log(f"copy bandwidth of this run: {self.bw / 1e9:.1f} GB/s (decode roofline)")
        budget = f", budget {c.budget_s:.0f} s" if c.budget_s else ""
        self.log(f"writing up to {c.points} rows to {c.out}{budget}")
        c.out.parent.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.bar = tqdm(total=c.points, disable=not c.progress, file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5, desc="fips bench-e2e")
        try:
            with open(c.out, "w", newline="") as f:
                self.writer = csv.DictWriter(f, fieldnames=E2E_COLUMNS)
                self.writer.writeheader()
                f.flush()
                self.f = f
                blocks = [(m, dt) for m in c.models for dt in c.dtypes]
                for i, (name, dtype) in enumerate(blocks):
                    self._block(ALL_MODELS[name], dtype, self._block_deadline(len(blocks) - i))
        finally:
            self.bar.close()
        return self.rows

    def emit(self, row: Dict[str, object]) -> None:
        full = {k: _fmt(row.get(k)) for k in E2E_COLUMNS}
        self.writer.writerow(full)
        self.f.flush()
        self.rows.append(full)
        self.bar.update(1)

    def _base_row(self, spec: ModelSpec, dtype, provider, pattern, mode, batch) -> Dict[str, object]:
        return dict(self.meta, model=spec.name, arch=spec.arch, task=spec.task, provider=provider,
                    pattern=pattern or "none", format=PATTERNS[pattern].format if pattern else "dense",
                    dtype=DTYPE_NAMES[dtype], mode=mode, batch=batch, unit=spec.unit,
                    bandwidth_GBps=(self.bw / 1e9) if (self.bw and spec.task == "decode") else None)

    def _skip_all(self, spec, dtype, status, reason, variants=None, modes=None) -> None:
        for mode in modes or self.c.modes:
            for provider, pattern in variants or self.c.variants():
                for batch in self.c.batches(spec):
                    self.emit(dict(self._base_row(spec, dtype, provider, pattern, mode, batch),
                                   status=status, reason=reason))

    def _block(self, spec: ModelSpec, dtype: torch.dtype, deadline: Optional[float]) -> None:
        c = self.c
        self.log(f"{spec.name} {DTYPE_NAMES[dtype]}: {spec.description}")
        if spec.task == "images" and _timm() is None:
            self._skip_all(spec, dtype, "skipped", TIMM_MISSING)
            return
        try:
            m = _Model(spec, dtype, c.device, c.seed)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory
            _free(c.device)
            self._skip_all(spec, dtype, "failed", f"building the model failed: {_describe(exc)}")
            return
        self.refs: Dict[Tuple[str, int], torch.Tensor] = {}
        self.mlp_rows: Dict[int, int] = {}
        self.dense_time: Dict[Tuple[str, int], float] = {}
        self.dense_bytes: Optional[Tuple[int, int]] = None
        for mode in c.modes:
            mode_why = _mode_reasons(mode, c.device)
            for provider, pattern in c.variants():
                why = mode_why + _peer_reasons(provider, c.device, dtype, pattern)
                if why:
                    self._skip_all(spec, dtype, "skipped", "; ".join(why), [(provider, pattern)], [mode])
                    continue
                if self._over(deadline):
                    self._skip_all(spec, dtype, "skipped", self._budget_reason(), [(provider, pattern)], [mode])
                    continue
                self._variant(m, spec, dtype, provider, pattern, mode, deadline)
        del m
        self.refs = {}
        _free(c.device, collect=True)

    def _budget_reason(self) -> str:
        return f"not run: the time budget (--budget-s {self.c.budget_s:g}) was spent"

    def _install(self, m: _Model, provider: str, pattern: str) -> None:
        """Install the variant; fill the reference outputs it will be compared with."""
        c = self.c
        batches = c.batches(m.spec)
        if provider == "dense":
            m.install_dense()
            for b in batches:  # also records each batch's mlp_rows
                if ("dense", b) not in self.refs or b not in self.mlp_rows:
                    y = self._eager_ref(m, b, reference=False)
                    if c.check:
                        self.refs[("dense", b)] = y
            return
        pat = PATTERNS[pattern]
        groups = m.install_fips(pat)
        need = [b for b in batches if (pattern, b) not in self.refs] if c.check else []
        for b in need:
            self.refs[(pattern, b)] = self._eager_ref(m, b, reference=True)
        if provider != "fips":
            m.install_peer(provider, groups, pat)
        del groups

    def _eager_ref(self, m: _Model, batch: int, reference: bool) -> torch.Tensor:
        x = m.make_input(batch)
        rows = {}

        def record(mod, args):  # a pre-hook returning None leaves the arguments alone
            rows.setdefault("M", args[0].numel() // args[0].shape[-1])

        hook = m.first_mlp().register_forward_pre_hook(record)
        try:
            if reference:
                with dispatch.use_backend("reference"):
                    y = m.model(x)
            else:
                y = m.model(x)
        finally:
            hook.remove()
        if "M" in rows:  # a fused gate/up never calls the gate module itself
            self.mlp_rows[batch] = rows["M"]
        return y.detach().clone()

    def _variant(self, m: _Model, spec, dtype, provider, pattern, mode, deadline) -> None:
        c = self.c
        batches = c.batches(spec)
        try:
            self._install(m, provider, pattern)
            _free(c.device)
            weight_bytes = module_bytes(m.model)
            mlp_bytes = module_bytes(*m.mlp_modules())
        except Exception as exc:  # noqa: BLE001
            _free(c.device)
            for batch in batches:
                self.emit(dict(self._base_row(spec, dtype, provider, pattern, mode, batch), status="failed",
                               reason=f"building the variant failed: {_describe(exc)}"))
            return
        if provider == "dense":
            self.dense_bytes = (weight_bytes, mlp_bytes)
        common = dict(weight_bytes=weight_bytes, mlp_weight_bytes=mlp_bytes,
                      groups=len(m.slots), blocks_per_group=spec.group_size,
                      ranks=" ".join(str(r) for r in m.ranks) if m.ranks else None)
        if self.dense_bytes:
            common["weight_ratio_vs_dense"] = weight_bytes / self.dense_bytes[0]
            common["mlp_weight_ratio_vs_dense"] = mlp_bytes / self.dense_bytes[1]
        runner = None
        try:
            runner = _Runner(m.model, mode, c.device)
        except Exception as exc:  # noqa: BLE001
            runner_error = f"preparing {mode} failed: {_describe(exc)}"
        else:
            runner_error = None
        for batch in batches:
            self.bar.set_postfix_str(f"{spec.name} {DTYPE_NAMES[dtype]} {mode} {provider} {pattern} b={batch}",
                                     refresh=False)
            row = dict(self._base_row(spec, dtype, provider, pattern, mode, batch), **common)
            row["mlp_rows"] = self.mlp_rows.get(batch)
            if runner_error:
                self.emit(dict(row, status="failed", reason=runner_error))
                continue
            if self._over(deadline):
                self.emit(dict(row, status="skipped", reason=self._budget_reason()))
                continue
            row["backend"] = _backend(m.first_mlp(), self.mlp_rows.get(batch) or batch)
            self._point(m, runner, row, spec, dtype, provider, pattern, mode, batch)
        compiled = mode.startswith("compile")
        if runner is not None:
            runner.close()
        del runner
        _free(c.device, collect=compiled)

    def _point(self, m, runner, row, spec, dtype, provider, pattern, mode, batch) -> None:
        c, dev = self.c, self.c.device
        x = m.make_input(batch)
        note = ""
        try:
            _sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            skips_before = _cudagraph_skips() if mode == "compile-cudagraph" else 0
            fn, y = runner.prepare(x)
            for _ in range(2):
                fn()
            _sync(dev)
            if dev.type == "cuda":
                row["run_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
            if mode == "compile-cudagraph" and _cudagraph_skips() > skips_before:
                note = "WARNING: inductor skipped CUDA graphs for this model (see the log)"
            ref = self.refs.get(("dense" if provider == "dense" else pattern, batch))
            if ref is not None and not (provider == "dense" and mode == "eager"):
                err = _rel_err(y, ref)
                row["rel_err"] = err
                if not err <= TOLERANCE[dtype]:
                    note = (note + "; " if note else "") + \
                        f"WARNING: rel_err {err:.3g} vs the eager reference exceeds {TOLERANCE[dtype]}"
            del y
            t = time_ms(fn, dev, c.timing)
        except Exception as exc:  # noqa: BLE001
            _free(dev)
            self.emit(dict(row, status="failed", reason=f"running failed: {_describe(exc)}"))
            return
        if provider == "dense":
            self.dense_time[(mode, batch)] = t
        dense_t = self.dense_time.get((mode, batch))
        row.update(status="ok", reason=note, time_ms=t, throughput=batch / (t * 1e-3),
                   speedup_vs_dense=(dense_t / t) if dense_t else None)
        if spec.task == "decode" and self.bw:
            item = torch.empty((), dtype=dtype).element_size()
            acts = sum(batch * (in_f + out_f) * item for slot in m.slots for _, _, in_f, out_f, _ in slot)
            nbytes = int(row["mlp_weight_bytes"]) + acts
            roof = nbytes / self.bw * 1e3
            row.update(bytes=nbytes, roofline_ms=roof, frac_of_roofline=roof / t)
        self.emit(row)


def _cudagraph_skips() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # noqa: BLE001
        return 0


# ---------------------------------------------------------------- summary

def summary_table(rows: Sequence[Dict[str, object]]) -> str:
    """Speed-up over the dense model, one line per (model, dtype, mode,
    provider, pattern), one column per batch; ``-`` marks a point not run."""
    from collections import OrderedDict

    table: "OrderedDict[tuple, Dict[int, str]]" = OrderedDict()
    batches: List[int] = []
    for r in rows:
        if r["provider"] == "dense":
            continue
        b = int(r["batch"])
        if b not in batches:
            batches.append(b)
        key = (str(r["model"]), str(r["dtype"]), str(r["mode"]), str(r["provider"]), str(r["pattern"]))
        s = r.get("speedup_vs_dense")
        cell = "-" if r.get("status") != "ok" else ("?" if s in (None, "") else f"{float(s):.2f}")
        table.setdefault(key, {})[b] = cell
    if not table:
        return "(no rows)"
    batches.sort()
    heads = ("model", "dtype", "mode", "provider", "pattern")
    widths = [max(len(h), *(len(k[i]) for k in table)) for i, h in enumerate(heads)]
    colw = [max(len(str(b)), 5) for b in batches]
    lines = ["speed-up over the dense model (dense time / time; >1 is faster), by batch:",
             "  ".join(h.ljust(w) for h, w in zip(heads, widths)) + "  "
             + " ".join(str(b).rjust(w) for b, w in zip(batches, colw))]
    for key, cells in table.items():
        lines.append("  ".join(k.ljust(w) for k, w in zip(key, widths)) + "  "
                     + " ".join(cells.get(b, "").rjust(w) for b, w in zip(batches, colw)))
    return "\n".join(lines)
