"""FiPS layers: :class:`SharedBase`, :class:`FiPSLinear`, :class:`FiPSGroup`,
:class:`FiPSGatedMLP`, and :func:`install`, which puts a group into a model and
fuses what can run fused.

A group of linear layers (the MLPs of ``n`` consecutive blocks) shares one
dense base ``U (d × r)``; each layer owns a sparse factor ``V_i (r × h_i)``
(DESIGN §1).

**Base ownership — one rule everywhere:** a group's :class:`SharedBase` is a
submodule named ``shared_base`` of the group's *first* layer; every other
layer holds a plain (unregistered) reference to it. So ``U`` appears once in
``parameters()``, ``state_dict()`` and checkpoints (as
``<first layer>.shared_base.U``), moves with the model, and a group of one
layer owns its base.

The initialisation (SVD, masks, budget → rank) lives in :mod:`.factorize`,
:mod:`.masks` and :mod:`.budget`; fusion sites in :mod:`.fusion`.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import cpu as cpu_modes
from . import dispatch, fusion, ops, reference
from .formats import AUX_NAMES, SparseFactor

__all__ = ["SharedBase", "FiPSLinear", "FiPSGroup", "FiPSGatedMLP", "install", "bases_of", "fips_layers",
           "get_submodule", "set_submodule", "prepare"]

KINDS = reference.KINDS


class SharedBase(nn.Module):
    """The dense base ``U (d × r)`` shared by every layer of a group.

    ``U`` is a float parameter, or — after :meth:`quantize_` or when built
    with ``U_scales`` — an int8 buffer with one scale per column
    (``U_scales (1, r)``); the kernels dequantise it in registers.
    """

    def __init__(self, U: torch.Tensor, U_scales: Optional[torch.Tensor] = None):
        super().__init__()
        if U.dim() != 2:
            raise ValueError(f"SharedBase: U must be 2-D (d, r), got shape {tuple(U.shape)}")
        if U_scales is None:
            if not U.is_floating_point():
                raise ValueError(f"SharedBase: a float U must have a floating dtype, got {U.dtype} "
                                 f"(an int8 U comes with U_scales)")
            self.U = nn.Parameter(U)
            self.register_buffer("U_scales", None)
        else:
            if U.dtype != torch.int8 or U_scales.shape != (1, U.shape[1]):
                raise ValueError(f"SharedBase: a quantised U must be int8 with U_scales of shape (1, {U.shape[1]}), "
                                 f"got {U.dtype} and {tuple(U_scales.shape)}")
            self.register_buffer("U", U)
            self.register_buffer("U_scales", U_scales)

    @property
    def d(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def quantized(self) -> bool:
        return self.U_scales is not None

    @property
    def dtype(self) -> torch.dtype:
        """The arithmetic dtype (the scales' for an int8 base)."""
        return (self.U_scales if self.quantized else self.U).dtype

    @property
    def operand(self):
        """What the ops take as the base: ``U``, or the int8 ``U`` as a quantised dense SparseFactor."""
        return ops.base_operand(self.U, self.U_scales)

    def matrix(self) -> torch.Tensor:
        """The dense float ``U`` (dequantised when int8)."""
        return ops.base_matrix(self.operand)

    def quantize_(self, bits: int = 8) -> "SharedBase":
        """Round ``U`` to int8 with one scale per column (symmetric, round to nearest), in place."""
        if bits != 8:
            raise ValueError(f"SharedBase: only an int8 base is supported, got bits={bits}")
        if self.quantized:
            return self
        q = SparseFactor.pack(self.U.detach(), "dense", qbits=8, qgroup=max(self.d, 1))
        del self.U
        self.register_buffer("U", q.values)
        self.U_scales = q.scales
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.U_scales) if t is not None)

    def extra_repr(self) -> str:
        quant = ", int8 per-column scales" if self.quantized else ""
        return f"d={self.d}, rank={self.rank}, dtype={self.dtype}{quant}"


class FiPSLinear(nn.Module):
    """A drop-in for ``nn.Linear`` computing ``act(x·Wᵀ + b)`` with ``W`` in factored form.

    * ``kind="expand"`` (d→h): ``y = act((x·U)·V + b)``; the factor is ``B = V (r × h)``.
    * ``kind="contract"`` (h→d): ``y = (x·Vᵀ)·Uᵀ + b``; the factor is ``B = Vᵀ (h × r)``.

    Args:
        base: the group's :class:`SharedBase` (``U`` is ``(d, r)``).
        factor: the layer's reduction-major :class:`SparseFactor` (see above).
        kind: ``"expand"`` or ``"contract"``.
        bias: ``(out_features,)`` or None.
        own_base: register ``base`` as this layer's ``shared_base`` submodule:
            the first layer of its group owns the base (:class:`FiPSGroup` and
            :func:`install` set this); other layers only refer to it.
        cast_input: a floating input of another dtype than the layer's (its
            factors' arithmetic dtype, :attr:`compute_dtype`) is cast to it and
            the output cast back to the input's dtype — e.g. fp16 factors inside
            an fp32 model. Off by default: a mismatched input is refused.
        activation: ``"none"``, or for an expand layer ``"gelu"``/``"silu"``
            applied in the kernel's epilogue (what :func:`install` sets when it
            absorbs the MLP's activation module).

    Input ``(*, in_features)`` → output ``(*, out_features)``, same dtype.
    The dense ``weight`` is only built when the property is read.
    """

    def __init__(self, base: SharedBase, factor: SparseFactor, kind: str,
                 bias: Optional[torch.Tensor] = None, *, own_base: bool = False, cast_input: bool = False,
                 activation: str = "none"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"FiPSLinear: kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(base, SharedBase):
            raise TypeError(f"FiPSLinear: base must be a SharedBase, got {type(base).__name__}")
        if not isinstance(factor, SparseFactor):
            raise TypeError(f"FiPSLinear: factor must be a SparseFactor, got {type(factor).__name__}")
        K, N = factor.shape
        r = K if kind == "expand" else N
        if base.rank != r:
            raise ValueError(f"FiPSLinear: the {kind} factor of shape ({K}, {N}) needs a base of rank {r}, "
                             f"got U of shape {tuple(base.U.shape)}")
        object.__setattr__(self, "_base", base)  # a reference; registered once, on the group's first layer
        if own_base:
            self.shared_base = base
        self.kind = kind
        self.format = factor.format
        self.meta = list(factor.meta)
        self.in_features = base.d if kind == "expand" else K
        self.out_features = N if kind == "expand" else base.d
        if factor.quantized:  # int values are constants; the scales carry the dtype
            self.register_buffer("V_values", factor.values)
            self.register_buffer("V_scales", factor.scales)
        else:
            self.V_values = nn.Parameter(factor.values)
            self.register_buffer("V_scales", None)
        self._aux_names = tuple(f"V_{name}" for name in AUX_NAMES[factor.format])
        for name, t in factor.aux.items():
            self.register_buffer(f"V_{name}", t)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"FiPSLinear: bias must have shape ({self.out_features},), "
                                 f"got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias)
        else:
            self.register_parameter("bias", None)
        self.cast_input = bool(cast_input)
        self.activation = "none"
        self.set_activation(activation)
        self._weight_cache: Optional[torch.Tensor] = None
        self._cache_versions: Tuple[int, ...] = ()
        self.cpu_mode: Optional[str] = None  # "speed" / "compressed" / None (the default): fips_kernels.cpu

    # ---- the factors ------------------------------------------------------
    @property
    def base(self) -> SharedBase:
        return self._base

    @property
    def owns_base(self) -> bool:
        """Whether this layer registers the group's base (the group's first layer)."""
        return self._modules.get("shared_base") is self._base

    @property
    def U(self) -> torch.Tensor:
        return self._base.U

    @property
    def rank(self) -> int:
        return self._base.rank

    @property
    def factor(self) -> SparseFactor:
        """This layer's packed factor (a view of its parameters and buffers)."""
        aux = [getattr(self, n) for n in self._aux_names]
        return SparseFactor.from_parts(self.format, self.meta, self.V_values, aux, validate=False,
                                       scales=self.V_scales)

    def _set_factor(self, factor: SparseFactor) -> None:
        """Replace the stored factor (same shape and format), e.g. by its quantised form."""
        if factor.shape != self.factor.shape or factor.format != self.format:
            raise ValueError(f"FiPSLinear: a new factor must keep shape {self.factor.shape} and format "
                             f"{self.format!r}, got {factor!r}")
        del self.V_values, self.V_scales
        if factor.quantized:
            self.register_buffer("V_values", factor.values)
            self.register_buffer("V_scales", factor.scales)
        else:
            self.V_values = nn.Parameter(factor.values)
            self.register_buffer("V_scales", None)
        for name, t in factor.aux.items():
            setattr(self, f"V_{name}", t)
        self.meta = list(factor.meta)
        self._weight_cache = None

    def set_activation(self, activation: str) -> None:
        """Fuse ``activation`` (``"gelu"``/``"silu"``; ``"none"`` removes it) into this
        expand layer's epilogue."""
        if activation not in reference.ACTIVATIONS:
            raise ValueError(f"FiPSLinear: activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
        if activation != "none" and self.kind != "expand":
            raise ValueError("FiPSLinear: an activation epilogue is only fused into expand layers")
        self.activation = activation

    @property
    def compute_dtype(self) -> torch.dtype:
        """The layer's arithmetic dtype: its float values' (a quantised factor's scales')."""
        return (self.V_scales if self.V_scales is not None else self.V_values).dtype

    @property
    def V(self) -> torch.Tensor:
        """The dense ``V (r × h)`` (built on request)."""
        return reference.factor_matrix(self.factor, self.kind)

    @property
    def weight(self) -> torch.Tensor:
        """The dense torch-layout weight ``(out_features, in_features)``, rebuilt on every read."""
        return ops.reconstruct(self._base.operand, self.factor, self.kind)

    def nbytes(self) -> int:
        """Bytes this layer owns (factor + bias; the shared base is counted by its group)."""
        return self.factor.nbytes + self.bias_nbytes()

    def bias_nbytes(self) -> int:
        return self.bias.numel() * self.bias.element_size() if self.bias is not None else 0

    def num_parameters(self) -> int:
        """Stored factor values + bias (the base is counted by its group)."""
        return self.factor.nnz + (self.bias.numel() if self.bias is not None else 0)

    def dispatch_problem(self, M: int, op: Optional[str] = None) -> dispatch.Problem:
        """The dispatch problem of a call with ``M`` input rows (``op`` defaults to the kind)."""
        return dispatch.Problem.for_layer(op or self.kind, self.kind, self.factor.layout, self.compute_dtype,
                                          self.V_values.device, M, self._base.d, self.activation)

    # ---- speed over memory: a cached dense weight for large M ---------------
    def cache_weight(self, enabled: bool = True, dtype: Optional[torch.dtype] = None) -> int:
        """Keep the rebuilt dense weight for inputs of at least the large-M
        crossover rows (where a call would rebuild it anyway), trading
        ``out·in·itemsize`` bytes of memory for the rebuild. Returns the bytes
        the cache holds. The cache is refreshed when ``U`` or the factor values
        change in place (eager mode); call again after replacing them.
        ``dtype``: the cached weight's dtype (default: the factor's)."""
        if not enabled:
            self._weight_cache = None
            return 0
        with torch.no_grad():
            self._weight_cache = self.weight.detach().to(dtype or self.factor.dtype)
        self._cache_versions = self._versions()
        return self._weight_cache.numel() * self._weight_cache.element_size()

    def prepare_cpu_weight(self) -> int:
        """The CPU speed mode's one-time rebuild (:mod:`fips_kernels.cpu`): the dense
        weight in fp32 for fp16/bf16 factors (no fast half GEMM on CPUs; rebuilt
        from the fp32 values of the factors, not rounded to half), else in the
        factor's dtype. Returns the bytes held."""
        dtype = self.compute_dtype
        half = dtype in (torch.float16, torch.bfloat16)
        if half:
            dtype = torch.float32
        W = self._weight_cache
        if W is None or W.dtype != dtype or W.device != self.V_values.device \
                or self._versions() != self._cache_versions:
            with torch.no_grad():
                if half:
                    W = ops.reconstruct(self._base.operand.to(dtype), self.factor.to(dtype), self.kind)
                else:
                    W = self.weight.detach()
            self._weight_cache, self._cache_versions = W, self._versions()
        return W.numel() * W.element_size()

    def cpu_speed_path(self, x: torch.Tensor) -> bool:
        """Whether this call runs the CPU speed mode's dense GEMM: inference on a CPU
        float input the layer accepts, in speed mode."""
        return (x.device.type == "cpu" and not torch.is_grad_enabled() and x.is_floating_point()
                and cpu_modes.mode_of(self) == "speed" and self.V_values.device.type == "cpu")

    def _cpu_dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.prepare_cpu_weight()  # a no-op once built (a version check)
        W = self._weight_cache
        bias = self.bias
        if bias is not None and bias.dtype != W.dtype:
            bias = bias.to(W.dtype)
        y = torch.nn.functional.linear(x if x.dtype == W.dtype else x.to(W.dtype), W, bias)
        y = reference.activate(y, self.activation)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _versions(self) -> Tuple[int, ...]:
        return tuple(t._version for t in (self._base.U, self._base.U_scales, self.V_values, self.V_scales)
                     if t is not None)

    def _large_m(self, x: torch.Tensor) -> bool:
        from .tuning import reconstruct_min_m

        M = x.numel() // max(x.shape[-1], 1)
        return M >= reconstruct_min_m(x.device, self.kind, self.factor, self._base.d)

    def _cached_weight(self) -> torch.Tensor:
        if self._versions() != self._cache_versions or self._weight_cache.device != self.V_values.device:
            self.cache_weight(True, self._weight_cache.dtype)
        return self._weight_cache

    # ---- forward ----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cast_input and x.is_floating_point() and x.dtype != self.compute_dtype:
            raise TypeError(f"FiPSLinear: dtype mismatch: input is {x.dtype} but the layer's factors are "
                            f"{self.compute_dtype} (cast_input=True casts the input)")
        if self.cpu_speed_path(x):
            return self._cpu_dense_forward(x)
        if self.cast_input and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled() \
                and self.compute_dtype in (torch.float16, torch.bfloat16):
            return self._forward(x)  # fp32 activations, half factors: the ops take them as they are ("mixed")
        if self.cast_input and x.is_floating_point() and x.dtype != self.compute_dtype:
            return self._forward(x.to(self.compute_dtype)).to(x.dtype)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight_cache is not None and not torch.is_grad_enabled() and self._large_m(x):
            W = self._cached_weight()
            y = torch.nn.functional.linear(x.to(W.dtype), W, None if self.bias is None else self.bias.to(W.dtype))
            return reference.activate(y, self.activation).to(x.dtype)
        aux = [getattr(self, n) for n in self._aux_names] + [None, None]
        base = self._base
        if self.kind == "expand":
            return torch.ops.fips_kernels.expand(x, base.U, base.U_scales, self.V_values, aux[0], aux[1],
                                                 self.V_scales, self.bias, self.format, self.meta, self.activation)
        return torch.ops.fips_kernels.contract(x, base.U, base.U_scales, self.V_values, aux[0], aux[1],
                                               self.V_scales, self.bias, self.format, self.meta)

    def extra_repr(self) -> str:
        f = self.factor
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"rank={self.rank}, format={self.format}, pattern={f.pattern()}, "
                f"density={f.density:.3f}, bias={self.bias is not None}"
                + (f", activation={self.activation}" if self.activation != "none" else "")
                + (f", dtype={self.compute_dtype}, cast_input=True" if self.cast_input else ""))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, budget: float = 0.5, sparsity: Optional[float] = None,
                    pattern: str = "unstructured", kind: Optional[str] = None, **kwargs) -> "FiPSLinear":
        """A group of one: factorise a single ``nn.Linear`` into a layer that owns its base
        (a shortcut for :func:`fips_kernels.factorize_group`, imported on call so
        this module does not depend on the initialisation code)."""
        from .factorize import factorize_group

        group = factorize_group([linear], budget=budget, sparsity=sparsity, pattern=pattern,
                                kinds=None if kind is None else [kind], **kwargs)
        return group.layers[0]


class FiPSGroup(nn.Module):
    """One shared base and the layers that use it (what :func:`factorize_group` returns).

    Indexable like a list of :class:`FiPSLinear`. The base is registered on the
    first layer: ``state_dict()`` holds ``layers.0.shared_base.U`` once and
    ``layers.<i>.*`` for each layer.
    """

    def __init__(self, base: SharedBase, layers: Sequence[FiPSLinear], info: Optional[dict] = None):
        super().__init__()
        if len(layers) == 0:
            raise ValueError("FiPSGroup: needs at least one layer")
        for i, layer in enumerate(layers):
            if layer.base is not base:
                raise ValueError(f"FiPSGroup: layer {i} uses a different base")
            if i and layer.owns_base:
                del layer.shared_base  # the first layer owns the base
        layers[0].shared_base = base
        object.__setattr__(self, "_base", base)
        self.layers = nn.ModuleList(layers)
        self.info = dict(info or {})

    @property
    def base(self) -> SharedBase:
        return self._base

    def __getitem__(self, i: int) -> FiPSLinear:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def cache_weights(self, enabled: bool = True) -> int:
        """Speed over memory: every layer keeps its rebuilt dense weight for large-M
        inference (see :meth:`FiPSLinear.cache_weight`). Returns the bytes the
        caches hold — the dense size of the group's weights, on top of the
        compressed factors."""
        return sum(layer.cache_weight(enabled) for layer in self.layers)

    def num_parameters(self) -> int:
        """``d·r + Σ nnz(V_i)`` (+ biases)."""
        return self.base.U.numel() + sum(layer.num_parameters() for layer in self.layers)

    def quantize_(self, bits: int = 8, qgroup: int = 64, base_bits: Optional[int] = 8) -> "FiPSGroup":
        """Round every factor to int8/int4 (one scale per ``qgroup`` rows of the
        reduction axis and column) and, unless ``base_bits`` is None, the base to
        int8 with per-column scales — in place. Round to nearest on the symmetric
        grid of :mod:`fips_kernels.formats.quant`; the sparsity patterns are kept."""
        for layer in self.layers:
            layer._set_factor(layer.factor.quantize(bits, qgroup))
        if base_bits is not None:
            self.base.quantize_(base_bits)
        return self

    def nbytes(self) -> int:
        """Every stored byte: base, factors (values + indices + offsets) and biases."""
        return self.base.nbytes() + sum(layer.nbytes() for layer in self.layers)

    def extra_repr(self) -> str:
        keys = ("rank", "budget", "sparsity", "pattern")
        return ", ".join(f"{k}={self.info[k]}" for k in keys if k in self.info)


class FiPSGatedMLP(nn.Module):
    """A gated MLP (Llama/Gemma/Mistral/Qwen2) whose gate and up projections are
    FiPS layers of one group: ``down(silu(x·U·V_g + b_g) * (x·U·V_u + b_u))``
    with ``z = x·U`` computed once and gate and up decoded in one fused op
    (:func:`fips_kernels.gate_up`).

    Built by :func:`install` from the model's own MLP module: the children keep
    their names (``gate_proj``/``up_proj``/``down_proj``), so ``state_dict`` keys
    are those of the original model. ``x (*, d)`` → ``(*, d)``.
    """

    def __init__(self, gate: FiPSLinear, up: FiPSLinear, down: nn.Module,
                 names: Tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), activation: str = "silu"):
        super().__init__()
        why = gated_pair_reasons(gate, up)
        if why:
            raise ValueError("FiPSGatedMLP: " + "; ".join(why))
        if activation != "silu":
            raise ValueError(f"FiPSGatedMLP: the fused gate/up op computes silu(gate) * up, got {activation!r}")
        self.names = tuple(names)
        self.activation = activation
        for name, module in zip(self.names, (gate, up, down)):
            self.add_module(name, module)

    @property
    def gate(self) -> FiPSLinear:
        return getattr(self, self.names[0])

    @property
    def up(self) -> FiPSLinear:
        return getattr(self, self.names[1])

    @property
    def down(self) -> nn.Module:
        return getattr(self, self.names[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate, self.up
        if gate.cpu_speed_path(x) or (gate._weight_cache is not None and up._weight_cache is not None
                                      and not torch.is_grad_enabled() and gate._large_m(x)):
            # the CPU speed mode, or cached dense weights (cache_weights): two dense GEMMs
            return self.down(torch.nn.functional.silu(gate(x)) * up(x))
        dtype = gate.compute_dtype
        z = x.to(dtype) if gate.cast_input and x.is_floating_point() else x
        h = ops.gate_up(z, gate.base.operand, gate.factor, up.factor, gate.bias, up.bias)
        return self.down(h.to(x.dtype) if gate.cast_input else h)

    def extra_repr(self) -> str:
        return f"fused gate/up ({self.names[0]}, {self.names[1]}), activation={self.activation}"


def gated_pair_reasons(gate: nn.Module, up: nn.Module) -> List[str]:
    """Why ``gate`` and ``up`` cannot run as one fused gate/up op (empty: they can)."""
    if not isinstance(gate, FiPSLinear) or not isinstance(up, FiPSLinear):
        return ["gate and up are not both FiPS layers"]
    why = []
    if gate.base is not up.base:
        why.append("gate and up do not share a base (they are in different groups)")
    if gate.kind != "expand" or up.kind != "expand":
        why.append("gate and up must be expand layers")
    if gate.format != up.format or gate.meta != up.meta:
        why.append(f"gate and up differ in format or layout ({gate.format} {gate.meta} vs {up.format} {up.meta})")
    if (gate.bias is None) != (up.bias is None):
        why.append("only one of gate and up has a bias")
    if gate.cast_input != up.cast_input or gate.compute_dtype != up.compute_dtype:
        why.append("gate and up differ in dtype")
    if gate.activation != "none" or up.activation != "none":
        why.append("gate or up already has an activation epilogue")
    return why


# --------------------------------------------------------------------------
# Putting groups into a model
# --------------------------------------------------------------------------

def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(model, parent_path)
    setattr(parent, name, module)


def install(model: nn.Module, group: FiPSGroup, names: Sequence[str], *, fuse: bool = True) -> str:
    """Replace the modules at ``names`` (dotted paths) by the group's layers; the
    base stays registered on the first one (``<names[0]>.shared_base``).

    With ``fuse`` (the default), what can run fused does: an exact GELU right
    after an expand layer (timm ``Mlp``, Hugging Face ``*Intermediate``) moves
    into the layer's epilogue and its module becomes ``nn.Identity``; a gated
    MLP (Hugging Face ``*MLP`` with SiLU) whose gate and up are in this group
    becomes a :class:`FiPSGatedMLP`. :func:`fusion_report` lists what was fused
    and why the rest was not. Returns the base's path.
    """
    if len(names) != len(group):
        raise ValueError(f"install: {len(names)} names for a group of {len(group)} layers")
    for name, layer in zip(names, group):
        old = get_submodule(model, name)
        if getattr(old, "in_features", layer.in_features) != layer.in_features or \
                getattr(old, "out_features", layer.out_features) != layer.out_features:
            raise ValueError(f"install: {name} is {old.in_features}→{old.out_features} but the FiPS layer "
                             f"is {layer.in_features}→{layer.out_features}")
    for name, layer in zip(names, group):
        set_submodule(model, name, layer)
    if fuse:
        fuse_layers(model, names)
    return f"{names[0]}.shared_base" if names[0] else "shared_base"


def fuse_layers(model: nn.Module, names: Sequence[str]) -> List[dict]:
    """Fuse activation epilogues and gate/up pairs around the FiPS layers at
    ``names`` (see :func:`install`); returns the fusions applied."""
    done = []
    installed = set(names)
    for site in fusion.activation_sites(model, names):
        layer = get_submodule(model, site.layer)
        if isinstance(layer, FiPSLinear) and layer.kind == "expand" and layer.activation == "none":
            layer.set_activation(site.activation)
            set_submodule(model, site.act, nn.Identity())
            done.append({"fusion": "activation", "layer": site.layer, "activation": site.activation})
    for site in fusion.gated_sites(model, names):
        mlp = get_submodule(model, site.mlp)
        gate, up, down = (getattr(mlp, n) for n in site.children)
        prefix = f"{site.mlp}." if site.mlp else ""
        if prefix + site.children[0] not in installed or gated_pair_reasons(gate, up):
            continue
        set_submodule(model, site.mlp, FiPSGatedMLP(gate, up, down, site.children, site.activation))
        done.append({"fusion": "gate_up", "mlp": site.mlp})
    return done


def fusion_report(model: nn.Module) -> Dict[str, object]:
    """What runs fused in ``model``: expand layers with an activation epilogue, gated
    MLPs on the fused gate/up op, and the gated MLPs that are not, with the reason."""
    acts = [n for n, m in model.named_modules() if isinstance(m, FiPSLinear) and m.activation != "none"]
    gated = [n for n, m in model.named_modules() if isinstance(m, FiPSGatedMLP)]
    unfused = {}
    for site in fusion.gated_sites(model, None, explain=True):
        mlp = get_submodule(model, site.mlp)
        if isinstance(mlp, FiPSGatedMLP):
            continue
        gate, up = (getattr(mlp, n) for n in site.children[:2])
        why = site.reasons or gated_pair_reasons(gate, up)
        if why and isinstance(gate, FiPSLinear):
            unfused[site.mlp] = "; ".join(why)
    return {"activation_epilogues": len(acts), "gate_up": len(gated), "not_fused": unfused}


def fips_layers(model: nn.Module) -> Dict[str, FiPSLinear]:
    """Every :class:`FiPSLinear` of ``model`` by path."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, FiPSLinear)}


def bases_of(model: nn.Module) -> Dict[int, str]:
    """``id(base) -> path`` for every SharedBase registered in ``model``."""
    return {id(mod): name for name, mod in model.named_modules() if isinstance(mod, SharedBase)}


def prepare(model: nn.Module, backend: Optional[str] = None) -> int:
    """Let the backends pack what they would otherwise pack on a first call (the
    cuda backend's 2:4 copies, before CUDA-graph capture; the cpu backend's
    speed-mode weights), for every FiPS layer of ``model``. ``backend`` limits
    it to one. Returns the bytes the backends added."""
    added = 0
    for layer in fips_layers(model).values():
        added += dispatch.prepare(layer, backend)
    return added


# Names that moved out of this module (they import on first use; no import cycle).
_MOVED = {
    "factorize_group": "fips_kernels.factorize", "svd_init": "fips_kernels.factorize",
    "rank_for_budget": "fips_kernels.budget", "group_rank": "fips_kernels.budget",
    "stored_values": "fips_kernels.budget", "resolve_sparsity": "fips_kernels.budget",
}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
