"""FiPS layers: :class:`SharedBase`, :class:`FiPSLinear`, :class:`FiPSGroup`,
:func:`factorize_group` and :func:`install`.

A group of linear layers (the MLPs of ``n`` consecutive blocks) shares one
dense base ``U (d × r)``; each layer owns a sparse factor ``V_i (r × h_i)``
(DESIGN §1). The base is registered once — on the :class:`FiPSGroup`, or on
the model under ``fips_bases`` after :func:`install` — and every layer holds a
plain (unregistered) reference to it, so it appears once in ``parameters()``,
``state_dict()`` and checkpoints, and moves with the model.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import ops, reference
from .formats import AUX_NAMES, DEFAULT_TILE, FormatError, SparseFactor, parse_pattern

__all__ = ["SharedBase", "FiPSLinear", "FiPSGroup", "factorize_group", "rank_for_budget", "group_rank",
           "stored_values", "install"]

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
        return f"d={self.d}, rank={self.rank}, dtype={(self.U_scales if self.quantized else self.U).dtype}{quant}"


class FiPSLinear(nn.Module):
    """A drop-in for ``nn.Linear`` computing ``x·Wᵀ + b`` with ``W`` in factored form.

    * ``kind="expand"`` (d→h): ``y = (x·U)·V + b``; the factor is ``B = V (r × h)``.
    * ``kind="contract"`` (h→d): ``y = (x·Vᵀ)·Uᵀ + b``; the factor is ``B = Vᵀ (h × r)``.

    Args:
        base: the group's :class:`SharedBase` (``U`` is ``(d, r)``).
        factor: the layer's reduction-major :class:`SparseFactor` (see above).
        kind: ``"expand"`` or ``"contract"``.
        bias: ``(out_features,)`` or None.
        own_base: register ``base`` as this layer's submodule (a group of one);
            otherwise the base must be registered by a :class:`FiPSGroup` or a
            model (:func:`install`) so it is saved and moved once.
        cast_input: a floating input of another dtype than the layer's (its
            factors' arithmetic dtype, :attr:`compute_dtype`) is cast to it and
            the output cast back to the input's dtype — e.g. fp16 factors inside
            an fp32 model (``compress(..., factor_dtype=torch.float16)`` sets it;
            checkpoints keep it). Off by default: a mismatched input is refused.

    Input ``(*, in_features)`` → output ``(*, out_features)``, same dtype.
    The dense ``weight`` is only built when the property is read.
    """

    def __init__(self, base: SharedBase, factor: SparseFactor, kind: str,
                 bias: Optional[torch.Tensor] = None, *, own_base: bool = False, cast_input: bool = False):
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
        object.__setattr__(self, "_base", base)  # a reference, not a submodule: stored once elsewhere
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
        self._weight_cache: Optional[torch.Tensor] = None
        self._cache_versions: Tuple[int, int] = (-1, -1)

    # ---- the factors ------------------------------------------------------
    @property
    def base(self) -> SharedBase:
        return self._base

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
        n = self.factor.nbytes
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def num_parameters(self) -> int:
        """Stored factor values + bias (the base is counted by its group)."""
        return self.factor.nnz + (self.bias.numel() if self.bias is not None else 0)

    # ---- speed over memory: a cached dense weight for large M ---------------
    def cache_weight(self, enabled: bool = True) -> int:
        """Keep the rebuilt dense weight for inputs of at least the large-M
        crossover rows (where a call would rebuild it anyway), trading
        ``out·in·itemsize`` bytes of memory for the rebuild. Returns the bytes
        the cache holds. The cache is refreshed when ``U`` or the factor values
        change in place (eager mode); call again after replacing them."""
        if not enabled:
            self._weight_cache = None
            return 0
        with torch.no_grad():
            self._weight_cache = self.weight.detach()
        self._cache_versions = self._versions()
        return self._weight_cache.numel() * self._weight_cache.element_size()

    def _versions(self) -> Tuple[int, ...]:
        return tuple(t._version for t in (self._base.U, self._base.U_scales, self.V_values, self.V_scales)
                     if t is not None)

    def _large_m(self, x: torch.Tensor) -> bool:
        from .tuning import reconstruct_min_m

        M = x.numel() // max(x.shape[-1], 1)
        return M >= reconstruct_min_m(x.device, self.kind, self.factor, self._base.d)

    def _cached_weight(self) -> torch.Tensor:
        if self._versions() != self._cache_versions or self._weight_cache.device != self.V_values.device \
                or self._weight_cache.dtype != self.factor.dtype:
            self.cache_weight(True)
        return self._weight_cache

    # ---- forward ----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cast_input and x.is_floating_point() and x.dtype != self.compute_dtype:
            return self._forward(x.to(self.compute_dtype)).to(x.dtype)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight_cache is not None and not torch.is_grad_enabled() and self._large_m(x):
            return torch.nn.functional.linear(x, self._cached_weight(), self.bias)
        aux = [getattr(self, n) for n in self._aux_names] + [None, None]
        op = torch.ops.fips_kernels.expand if self.kind == "expand" else torch.ops.fips_kernels.contract
        base = self._base
        return op(x, base.U, base.U_scales, self.V_values, aux[0], aux[1], self.V_scales, self.bias,
                  self.format, self.meta)

    def extra_repr(self) -> str:
        f = self.factor
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"rank={self.rank}, format={self.format}, pattern={f.pattern()}, "
                f"density={f.density:.3f}, bias={self.bias is not None}"
                + (f", dtype={self.compute_dtype}, cast_input=True" if self.cast_input else ""))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, budget: float = 0.5, sparsity: Optional[float] = None,
                    pattern: str = "unstructured", kind: Optional[str] = None, **kwargs) -> "FiPSLinear":
        """A group of one: factorise a single ``nn.Linear`` into a layer that owns its base."""
        group = factorize_group([linear], budget=budget, sparsity=sparsity, pattern=pattern,
                                kinds=None if kind is None else [kind], **kwargs)
        layer = group.layers[0]
        layer.shared_base = layer.base
        return layer


class FiPSGroup(nn.Module):
    """One shared base and the layers that use it (what :func:`factorize_group` returns).

    Indexable like a list of :class:`FiPSLinear`. ``state_dict()`` holds
    ``base.U`` once and ``layers.<i>.*`` for each layer.
    """

    def __init__(self, base: SharedBase, layers: Sequence[FiPSLinear], info: Optional[dict] = None):
        super().__init__()
        for i, layer in enumerate(layers):
            if layer.base is not base:
                raise ValueError(f"FiPSGroup: layer {i} uses a different base")
        self.base = base
        self.layers = nn.ModuleList(layers)
        self.info = dict(info or {})

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
        int8 with per-column scales — in place. Round to nearest on a symmetric
        grid (see :meth:`SparseFactor.pack`); the sparsity patterns are kept."""
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


# --------------------------------------------------------------------------
# factorize_group: rank from the budget, SVD init, magnitude masks
# --------------------------------------------------------------------------

def rank_for_budget(d: int, hidden: Sequence[int], budget: float, sparsity: float) -> int:
    """The paper's rank formula, generalised to any hidden widths:
    ``r = floor(p·d·H / (d + (1−s)·H))`` with ``H = Σ h_i`` (``= F·n·h``).

    DeiT-B (d=768, 8 layers of h=3072), p=0.5, s=0.75 gives 1365.
    """
    H = sum(hidden)
    return int(math.floor(budget * d * H / (d + (1.0 - sparsity) * H) + 1e-9))


def stored_values(kind: str, r: int, h: int, pattern: Tuple, sparsity: float) -> int:
    """Values a layer's factor stores at rank ``r`` (what the budget counts).
    ``pattern`` is :func:`~fips_kernels.formats.parse_pattern`'s ``(kind, n, m)``."""
    ptype, n, m = pattern
    if ptype == "nm":
        K, N = (r, h) if kind == "expand" else (h, r)
        return -(-K // m) * n * N
    if ptype == "topk":
        return min(n, r) * h
    if ptype == "dense":
        return r * h
    return int(math.floor((1.0 - sparsity) * r * h))


def resolve_sparsity(pattern: str, sparsity: Optional[float]) -> Tuple[Tuple, float]:
    """``(parse_pattern(pattern), s)``: the sparsity an N:M pattern implies, 0 for
    dense, 0.75 by default for unstructured; a contradiction raises ValueError."""
    ptype, n, m = parse_pattern(pattern)
    if ptype == "nm":
        implied = 1.0 - n / m
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(f"pattern {pattern} implies sparsity {implied}, got {sparsity}")
        sparsity = implied
    elif ptype == "topk":
        if sparsity is not None:
            raise ValueError(f"pattern {pattern} fixes the non-zeros per unit; do not pass sparsity")
        sparsity = 0.0  # resolved against the rank by group_rank's caller
    elif ptype == "dense":
        if sparsity not in (None, 0, 0.0):
            raise ValueError(f"pattern 'dense' has sparsity 0, got {sparsity}")
        sparsity = 0.0
    elif sparsity is None:
        sparsity = 0.75
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return (ptype, n, m), sparsity


def group_rank(d: int, hidden: Sequence[int], kinds: Sequence[str], pattern: str = "unstructured",
               budget: float = 0.5, sparsity: Optional[float] = None) -> int:
    """The rank :func:`factorize_group` chooses: the paper's formula
    (:func:`rank_for_budget`; for ``topK``, ``d·r + K·Σh ≤ p·d·Σh``), then lowered
    until ``d·r + Σ stored values ≤ p·Σ d·h`` holds exactly (N:M tails and floors
    can overshoot the formula by a few values)."""
    pat, sparsity = resolve_sparsity(pattern, sparsity)
    dense_params = sum(d * h for h in hidden)
    if pat[0] == "topk":
        rank = int(math.floor((budget * dense_params - pat[1] * sum(hidden)) / d))
    else:
        rank = rank_for_budget(d, hidden, budget, sparsity)
    while rank > 0 and d * rank + sum(stored_values(k, rank, h, pat, sparsity)
                                      for k, h in zip(kinds, hidden)) > budget * dense_params:
        rank -= 1
    if rank < 1:
        raise ValueError(f"budget {budget} leaves no rank for d={d}, hidden={list(hidden)}")
    return rank


def _infer_kinds(weights: Sequence[torch.Tensor]) -> List[str]:
    kinds = []
    for i, w in enumerate(weights):
        out_f, in_f = w.shape
        if out_f == in_f:
            raise ValueError(f"factorize_group: cannot tell whether layer {i} ({in_f}→{out_f}) expands or "
                             f"contracts; pass kinds=[...]")
        kinds.append("expand" if out_f > in_f else "contract")
    return kinds


def _group_masks(Vs: List[torch.Tensor], kinds: Sequence[str], pattern: Tuple, sparsity: float,
                 scope: str) -> List[torch.Tensor]:
    """Magnitude masks on each layer's V (r × h)."""
    ptype, n, m = pattern
    if ptype == "dense":
        return [torch.ones_like(V, dtype=torch.bool) for V in Vs]
    if ptype == "topk":  # the n largest entries of every hidden unit (a column of V)
        return [torch.zeros_like(V, dtype=torch.bool).scatter_(0, torch.topk(V.abs(), min(n, V.shape[0]), dim=0).indices,
                                                               True) for V in Vs]
    if ptype == "nm":
        masks = []
        for V, kind in zip(Vs, kinds):
            B = V if kind == "expand" else V.t()  # N:M along the reduction axis (axis 0 of B)
            K, N = B.shape
            G = -(-K // m)
            padded = torch.nn.functional.pad(B.abs(), (0, 0, 0, G * m - K), value=-1.0).reshape(G, m, N)
            keep = torch.topk(padded, n, dim=1).indices
            mask = torch.zeros_like(padded, dtype=torch.bool).scatter_(1, keep, True).reshape(G * m, N)[:K]
            masks.append(mask if kind == "expand" else mask.t())
        return masks
    if scope == "layer":
        masks = []
        for V in Vs:
            k = int(math.floor((1.0 - sparsity) * V.numel()))
            flat = torch.zeros(V.numel(), dtype=torch.bool, device=V.device)
            flat[torch.topk(V.abs().flatten(), k).indices] = True
            masks.append(flat.view_as(V))
        return masks
    if scope != "global":
        raise ValueError(f"mask_scope must be 'global' or 'layer', got {scope!r}")
    scores = torch.cat([V.abs().flatten() for V in Vs])
    k = int(math.floor((1.0 - sparsity) * scores.numel()))
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[torch.topk(scores, k).indices] = True
    return [t.view_as(V) for t, V in zip(flat.split([V.numel() for V in Vs]), Vs)]


def factorize_group(linears: Sequence[nn.Module], *, budget: float = 0.5, sparsity: Optional[float] = None,
                    pattern: str = "unstructured", kinds: Optional[Sequence[str]] = None,
                    rank: Optional[int] = None, mask_scope: str = "global", format: Optional[str] = None,
                    tile: Tuple[int, int] = DEFAULT_TILE, dtype: Optional[torch.dtype] = None,
                    svd_device: Optional[torch.device] = None, qbits: Optional[int] = None,
                    qgroup: int = 64, base_qbits: Optional[int] = None, method: str = "svd",
                    pgd_steps: int = 100, gram: Optional[torch.Tensor] = None) -> FiPSGroup:
    """Factorise a group of linear layers into one shared base and sparse factors.

    The paper's initialisation (no training: that is ``fips_kernels.compress``):
    the weights are stacked in ``d × h`` orientation along the hidden axis into
    ``M (d × Σh)``; ``U`` = the left singular vectors, ``V = diag(S)·Vhᵀ``,
    truncated to the rank the budget allows. When ``r > d`` the base is
    overcomplete: ``U`` gets ``r−d`` zero columns and ``V`` extra rows copied
    from its top rows divided by 32 (``U·V`` is unchanged). Masks keep the
    largest-magnitude entries of ``V`` (over the whole group by default).

    Args:
        linears: the group's ``nn.Linear`` layers (expand: d→h, contract: h→d).
        budget: kept fraction ``p`` of the group's weight parameters; ``d·r +
            Σ nnz(V_i) ≤ p · Σ d·h_i`` holds exactly (biases not counted).
        sparsity: ``s`` of the factors (default 0.75 for unstructured; implied
            by an N:M pattern; 0 for ``"dense"``).
        pattern: ``"unstructured"``, ``"dense"``, ``"N:M"`` (e.g. ``"1:4"``)
            along each product's reduction axis (r for expand, h for contract),
            or ``"topK"`` (e.g. ``"top4"``): at most K non-zeros per hidden unit
            (a column of V; the ``ell`` format, served by the tile-reconstruct kernel).
        kinds: ``"expand"``/``"contract"`` per layer (inferred from the shapes when None).
        rank: override the budget's rank.
        mask_scope: ``"global"`` (one magnitude threshold over the group) or ``"layer"``.
        format: storage format (default: ``bitmap`` for unstructured, ``nm``, ``dense``, ``ell``).
        tile: bitmap tile.
        dtype: dtype of the result (default: the weights' dtype).
        svd_device: where to run the SVD (default: the weights' device).
        qbits, qgroup: quantise the factors' values to int8/int4 with one scale
            per ``qgroup`` rows of each reduction axis (docs/FORMATS.md).
        base_qbits: 8 for an int8 base with per-column scales.
        method: ``"svd"`` (mask the SVD factors, then round: the paper's init)
            or ``"pgd"`` (then :func:`fips_kernels.pgd.pgd_factorize`:
            projected gradient descent onto the sparse set and the grids).
        pgd_steps: PGD iterations. gram: optional ``(d, d)`` weighting of the
            error for PGD (e.g. ``XᵀX`` of calibration inputs of the expand layers).
    Returns:
        a :class:`FiPSGroup` whose ``info`` holds the rank, budget, parameter and
        byte counts and each layer's relative reconstruction error.
    """
    if len(linears) == 0:
        raise ValueError("factorize_group: needs at least one linear layer")
    weights = [lin.weight.detach() for lin in linears]
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"factorize_group: layer {i} weight must be 2-D, got {tuple(w.shape)}")
    kinds = list(kinds) if kinds is not None else _infer_kinds(weights)
    if len(kinds) != len(weights) or any(k not in KINDS for k in kinds):
        raise ValueError(f"factorize_group: kinds must list 'expand'/'contract' for each of the "
                         f"{len(weights)} layers, got {kinds}")
    # d×h orientation: expand weight (h×d) transposed, contract weight (d×h) as is.
    mats = [w.t() if k == "expand" else w for w, k in zip(weights, kinds)]
    d = mats[0].shape[0]
    for i, mat in enumerate(mats):
        if mat.shape[0] != d:
            raise ValueError(f"factorize_group: layer {i} ({kinds[i]}, weight {tuple(weights[i].shape)}) "
                             f"does not share the model width d={d} of layer 0; groups never cross a change of d")
    hidden = [mat.shape[1] for mat in mats]
    try:
        (ptype, n, m), sparsity = resolve_sparsity(pattern, sparsity)
    except ValueError as exc:
        if isinstance(exc, FormatError):
            raise
        raise ValueError(f"factorize_group: {exc}") from None
    if not 0.0 < budget <= 1.0 and rank is None:
        raise ValueError(f"factorize_group: budget must be in (0, 1], got {budget}")
    fmt = format or {"unstructured": "bitmap", "nm": "nm", "dense": "dense", "topk": "ell"}[ptype]
    if (ptype == "nm") != (fmt == "nm") or (ptype == "topk") != (fmt == "ell"):
        raise ValueError(f"factorize_group: format {fmt!r} does not fit pattern {pattern!r}")
    pat = (ptype, n, m)

    dense_params = sum(d * h for h in hidden)
    if rank is None:
        try:
            rank = group_rank(d, hidden, kinds, pattern, budget, sparsity if ptype == "unstructured" else None)
        except ValueError as exc:
            raise ValueError(f"factorize_group: {exc}") from None
    if rank < 1:
        raise ValueError(f"factorize_group: rank must be >= 1, got {rank}")

    out_dtype = dtype or weights[0].dtype
    device = weights[0].device
    work = torch.cat(mats, dim=1).to(device=svd_device or device, dtype=torch.float32)
    P, S, Qh = torch.linalg.svd(work, full_matrices=False)
    k = S.shape[0]
    Vfull = S.unsqueeze(1) * Qh  # (k × H)
    if rank <= k:
        U, Vall = P[:, :rank], Vfull[:rank]
    else:  # overcomplete: zero columns in U, V rows copied from the top rows / 32 (U·V unchanged)
        extra = rank - k
        U = torch.cat([P, P.new_zeros(d, extra)], dim=1)
        Vall = torch.cat([Vfull, Vfull[torch.arange(extra, device=Vfull.device) % k] / 32], dim=0)
    if method == "pgd":
        from .pgd import pgd_factorize

        if qbits and fmt not in ("dense", "nm", "bitmap"):
            raise ValueError(f"factorize_group: the {fmt} format cannot be quantised")
        result = pgd_factorize(work, U, Vall, widths=hidden, kinds=kinds, pattern=pattern, sparsity=sparsity,
                               scope=mask_scope, qbits=qbits, qgroup=qgroup, base_qbits=base_qbits,
                               steps=pgd_steps, G=gram)
        U, Vall = result.U, result.V  # already sparse and on the grids
    elif method != "svd":
        raise ValueError(f"factorize_group: method must be 'svd' or 'pgd', got {method!r}")
    U = U.to(device)
    Vs = [v.to(device) for v in Vall.split(hidden, dim=1)]
    masks = _group_masks(Vs, kinds, pat, sparsity, mask_scope)

    base = SharedBase(U.to(out_dtype).contiguous())
    if base_qbits:
        base.quantize_(base_qbits)
    layers, errors = [], []
    for lin, kind, V, mask, W in zip(linears, kinds, Vs, masks, weights):
        Vm = (V * mask).to(out_dtype)
        B = Vm if kind == "expand" else Vm.t()
        factor = SparseFactor.pack(B.contiguous(), fmt, n=n, m=m, tile=tile,
                                   k=min(n, rank) if ptype == "topk" else None,
                                   axis=(0 if kind == "expand" else 1) if ptype == "topk" else None,
                                   qbits=qbits, qgroup=qgroup)
        bias = lin.bias.detach().to(out_dtype).clone() if getattr(lin, "bias", None) is not None else None
        layer = FiPSLinear(base, factor, kind, bias)
        layers.append(layer)
        with torch.no_grad():
            W_hat = reference.linear_weight(base.operand, factor, kind).float()
            errors.append(float((W_hat - W.float()).norm() / W.float().norm().clamp_min(1e-30)))
    group = FiPSGroup(base, layers)
    if ptype == "topk":
        sparsity = 1.0 - min(n, rank) / rank
    group.info = {
        "rank": rank, "budget": budget, "sparsity": sparsity, "pattern": pattern, "format": fmt,
        "qbits": qbits, "qgroup": qgroup if qbits else None, "base_qbits": base_qbits, "method": method,
        "kinds": kinds, "d": d, "hidden": hidden,
        "dense_parameters": dense_params,
        "parameters": base.U.numel() + sum(layer.factor.nnz for layer in layers),
        "dense_bytes": dense_params * torch.empty((), dtype=out_dtype).element_size(),
        "bytes": group.nbytes() - _bias_bytes(layers),
        "relative_errors": errors,
    }
    return group


def _bias_params(layers) -> int:
    return sum(layer.bias.numel() for layer in layers if layer.bias is not None)


def _bias_bytes(layers) -> int:
    return sum(layer.bias.numel() * layer.bias.element_size() for layer in layers if layer.bias is not None)


# --------------------------------------------------------------------------
# Putting groups into a model
# --------------------------------------------------------------------------

def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(model, parent_path)
    setattr(parent, name, module)


def install(model: nn.Module, group: FiPSGroup, names: Sequence[str]) -> str:
    """Replace the modules at ``names`` (dotted paths) by the group's layers and
    register the group's base once — on ``model.fips_bases``, or, when ``model``
    is an ``nn.Sequential`` (whose forward would run an extra child), on the
    group's first layer as ``shared_base``. Returns the base's path."""
    if len(names) != len(group):
        raise ValueError(f"install: {len(names)} names for a group of {len(group)} layers")
    for name, layer in zip(names, group):
        old = get_submodule(model, name)
        if getattr(old, "in_features", layer.in_features) != layer.in_features or \
                getattr(old, "out_features", layer.out_features) != layer.out_features:
            raise ValueError(f"install: {name} is {old.in_features}→{old.out_features} but the FiPS layer "
                             f"is {layer.in_features}→{layer.out_features}")
        set_submodule(model, name, layer)
    if isinstance(model, nn.Sequential):
        group.layers[0].shared_base = group.base
        return f"{names[0]}.shared_base"
    if not isinstance(getattr(model, "fips_bases", None), nn.ModuleDict):
        model.fips_bases = nn.ModuleDict()
    key = str(len(model.fips_bases))
    while key in model.fips_bases:
        key = str(int(key) + 1)
    model.fips_bases[key] = group.base
    return f"fips_bases.{key}"


def bases_of(model: nn.Module) -> Dict[int, str]:
    """``id(base) -> path`` for every SharedBase registered in ``model``."""
    return {id(mod): name for name, mod in model.named_modules() if isinstance(mod, SharedBase)}
