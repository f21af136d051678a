"""Hashed layers: :class:`HashedMemory` (the shared array), :class:`HashedLinear`
(drop-in for ``nn.Linear``), :class:`HashedEmbedding` (for ``nn.Embedding``)
and :func:`convert_model`.

A memory is registered once — on the model (``model.hashed_memories``) after
:func:`convert_model`, or on a layer that owns it — and every layer holds a
plain (unregistered) reference to it, so the array appears once in
``parameters()``, ``state_dict()`` and checkpoints, and moves with the model
(the pattern of :class:`fips_kernels.SharedBase`).

Layers register with their memory in construction order; that order gives
each layer its place in the mapping (``ℓ₀`` for STABLE-RPS, the layer number
for ROAST), so the same conversion of the same architecture always yields the
same weights. Each layer keeps its mapping (:class:`~.mapping.HashSpec`) and
its scale λ in the int64 buffer ``hash_spec``, which loading checks.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import mapping, ops
from .mapping import HashSpec

__all__ = ["HashedMemory", "HashedLinear", "HashedEmbedding", "convert_model", "memories_of", "HashedLayer"]

DEFAULT_TILE = (1, 64)


class HashedMemory(nn.Module):
    """The shared array ``weight (m,)`` of randomized parameter sharing.

    Args:
        size: ``m``, the number of slots (≤ 2³⁰).
        method: ``"stable"`` (STABLE-RPS: partitions of the flattened weights,
            each a seeded rotation of the array) or ``"roast"`` (fixed hash
            tiles at seeded offsets, optional ±1 sign).
        seed: the seed of every hash (docs/HASHED.md gives the exact functions).
        tile: ROAST hash tile ``(TO, TI)`` (powers of two; ``TI ≥ 16`` for the
            Triton kernels). Ignored by STABLE-RPS.
        align: offsets (ROAST) and rotations (STABLE-RPS) are multiples of it
            (default 1). 8 lets the Triton kernels vectorise their loads but
            leaves 8× fewer distinct offsets/rotations, which costs accuracy
            at high compression (docs/HASHED.md); use it for large arrays only.
        sign: ROAST's ±1 sign hash (default True). STABLE-RPS has none.
        init_range: the array is drawn from ``U(−r, r)``; layers' default
            scales compensate, so the weights' init does not depend on ``r``.
        dtype, device: of the array.
    """

    def __init__(self, size: int, *, method: str = "stable", seed: int = 0, tile: Tuple[int, int] = DEFAULT_TILE,
                 align: int = 1, sign: Optional[bool] = None, init_range: float = 1.0,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        size = mapping.integer("size", size, "HashedMemory")
        if method not in mapping.METHODS:
            raise ValueError(f"HashedMemory: method must be one of {mapping.METHODS}, got {method!r}")
        # validate the parameters once with a 1×1 layer
        mapping.make_spec(method, 1, 1, size, tile=tile, align=align, sign=sign, seed=seed)
        if not init_range > 0:
            raise ValueError(f"HashedMemory: init_range must be > 0, got {init_range}")
        self.method = method
        self.seed = int(seed)
        self.tile = (int(tile[0]), int(tile[1]))
        self.align = int(align)
        self.sign = (True if sign is None else bool(sign)) if method == "roast" else False
        self.init_range = float(init_range)
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device))
        self.reset_parameters()
        self._layers: List["HashedLayer"] = []  # plain references, in registration order
        self._next_offset = 0
        self._slot_cache: Dict[tuple, torch.Tensor] = {}

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-self.init_range, self.init_range)

    @property
    def size(self) -> int:
        return self.weight.shape[0]

    def allocate(self, out_features: int, in_features: int) -> HashSpec:
        """The mapping of the next layer of shape ``(out × in)`` (registration order)."""
        spec = mapping.make_spec(self.method, out_features, in_features, self.size,
                                 layer_index=len(self._layers), offset=self._next_offset, tile=self.tile,
                                 align=self.align, sign=self.sign, seed=self.seed)
        self._next_offset += spec.numel
        return spec

    def _register(self, layer: "HashedLayer") -> None:
        self._layers.append(layer)
        self._slot_cache.clear()

    @property
    def layers(self) -> Tuple["HashedLayer", ...]:
        return tuple(self._layers)

    @property
    def virtual_parameters(self) -> int:
        """``n``: the weights all registered layers read from the array."""
        return sum(layer.spec.numel for layer in self._layers)

    def slot_lambda_sq(self, device=None) -> torch.Tensor:
        """``Σ λ²`` over the weights mapped to each slot (fp32, cached; for
        STABLE-RPS gradient scaling)."""
        device = torch.device(device) if device is not None else self.weight.device
        key = (str(device), tuple((tuple(l.spec.to_list()), l.scale) for l in self._layers))
        hit = self._slot_cache.get(key)
        if hit is None:
            self._slot_cache.clear()
            hit = mapping.slot_lambda_sq([l.spec for l in self._layers], [l.scale for l in self._layers],
                                         self.size, device).to(torch.float32)
            self._slot_cache[key] = hit
        return hit

    def slot_loads(self, device=None) -> torch.Tensor:
        """How many weights each slot holds (int64)."""
        device = torch.device(device) if device is not None else self.weight.device
        return mapping.slot_loads([l.spec for l in self._layers], self.size, device).to(torch.int64)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def info(self) -> dict:
        n = self.virtual_parameters
        return {"method": self.method, "size": self.size, "layers": len(self._layers), "virtual_parameters": n,
                "compression": n / self.size if self.size else math.inf, "bytes": self.nbytes(),
                "dtype": str(self.weight.dtype).replace("torch.", "")}

    def extra_repr(self) -> str:
        extra = f", tile={self.tile[0]}x{self.tile[1]}, sign={self.sign}" if self.method == "roast" else ""
        return (f"size={self.size}, method={self.method}, seed={self.seed}, align={self.align}{extra}, "
                f"layers={len(self._layers)}, dtype={self.weight.dtype}")


class HashedLayer(nn.Module):
    """What :class:`HashedLinear` and :class:`HashedEmbedding` share: a
    reference to the memory, the mapping and λ (and the ``hash_spec`` buffer)."""

    def _attach(self, memory: Optional[HashedMemory], out_rows: int, row_len: int, scale: Optional[float],
                default_scale: Callable[[HashedMemory], float], own_memory: bool, memory_kwargs: dict) -> None:
        if memory is None:
            if "size" not in memory_kwargs:
                raise ValueError(f"{type(self).__name__}: give a memory, or size=... (slots) or budget=... "
                                 f"(fraction of the {out_rows * row_len} weights) for a memory of its own")
            memory = HashedMemory(**memory_kwargs)
            own_memory = True
        elif memory_kwargs:
            raise ValueError(f"{type(self).__name__}: {sorted(memory_kwargs)} describe a new memory; "
                             f"they cannot be combined with memory=")
        if not isinstance(memory, HashedMemory):
            raise TypeError(f"{type(self).__name__}: memory must be a HashedMemory, got {type(memory).__name__}")
        object.__setattr__(self, "_memory", memory)  # a reference, not a submodule: stored once elsewhere
        if own_memory:
            self.memory = memory
        self.spec = memory.allocate(out_rows, row_len)
        self.scale = float(default_scale(memory) if scale is None else scale)
        if not math.isfinite(self.scale):
            raise ValueError(f"{type(self).__name__}: scale must be finite, got {self.scale}")
        self._spec_list = self.spec.to_list()
        self.register_buffer("hash_spec", torch.tensor(self._spec_list + [mapping.scale_bits(self.scale)],
                                                       dtype=torch.int64, device=memory.weight.device))
        memory._register(self)

    @property
    def shared_memory(self) -> HashedMemory:
        return self._memory

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "hash_spec"
        if key in state_dict:
            saved = [int(v) for v in state_dict[key].detach().cpu().tolist()]
            mine = self._spec_list + [mapping.scale_bits(self.scale)]
            if saved != mine:
                error_msgs.append(f"{type(self).__name__} {prefix[:-1] or '<root>'}: the checkpoint's mapping "
                                  f"{_describe_saved(saved)} differs from this layer's "
                                  f"{self.spec.describe()}, λ={self.scale!r}: convert the model with the same "
                                  f"method, seed, budget and layer order before loading")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def num_parameters(self) -> int:
        """Parameters this layer owns (its bias; the array is counted by its memory)."""
        return sum(p.numel() for n, p in self.named_parameters(recurse=False))


def _describe_saved(saved: List[int]) -> str:
    try:
        return f"({HashSpec.from_list(saved[:-1]).describe()}, λ={mapping.scale_from_bits(saved[-1])!r})"
    except (ValueError, IndexError):
        return f"{saved}"


class HashedLinear(HashedLayer):
    """A drop-in for ``nn.Linear`` whose weight is read from a shared array:
    ``W[o, i] = λ · s(o, i) · mem[idx(o, i)]``, ``y = x·Wᵀ + b``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        memory: a shared :class:`HashedMemory`. Without one, the layer makes
            and owns its own from ``size=`` (slots) or ``budget=`` (a fraction
            of ``out·in``) and the :class:`HashedMemory` keywords.
        scale: λ (default ``1/(r·√in)`` for the memory's ``init_range`` r, which
            reproduces ``nn.Linear``'s init distribution).
        own_memory: register ``memory`` as this layer's submodule.

    The dense ``weight`` is materialised only when the property is read
    (differentiable). Input ``(*, in_features)`` → ``(*, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 memory: Optional[HashedMemory] = None, scale: Optional[float] = None, own_memory: bool = False,
                 budget: Optional[float] = None, device=None, dtype=None, **memory_kwargs):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if memory is None:
            memory_kwargs = _own_memory_kwargs(memory_kwargs, budget, self.in_features * self.out_features,
                                               device, dtype)
        elif budget is not None:
            raise ValueError("HashedLinear: budget= describes a new memory; it cannot be combined with memory=")
        self._attach(memory, self.out_features, self.in_features, scale,
                     lambda mem: mapping.default_scale(self.in_features, mem.init_range), own_memory, memory_kwargs)
        mem = self._memory.weight
        if bias:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
            self.bias = nn.Parameter(torch.empty(self.out_features, device=mem.device, dtype=mem.dtype)
                                     .uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, rebuilt on every read."""
        return ops.hashed_weight(self._memory.weight, self.spec, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fips_kernels.hashed_linear(x, self._memory.weight, self.bias, self._spec_list, self.scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.spec.method}, memory={self.spec.size}, scale={self.scale:.4g}")


class HashedEmbedding(HashedLayer):
    """A drop-in for ``nn.Embedding`` (no ``max_norm``/``sparse``) whose table is
    read from a shared array: row ``e`` of the table is row ``e`` of a
    ``(num_embeddings × embedding_dim)`` hashed weight. Pure PyTorch (a gather);
    ``padding_idx`` rows read as zeros and get no gradient."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None, *,
                 memory: Optional[HashedMemory] = None, scale: Optional[float] = None, own_memory: bool = False,
                 budget: Optional[float] = None, device=None, dtype=None, **memory_kwargs):
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        if padding_idx is not None:
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(f"HashedEmbedding: padding_idx {padding_idx} out of range")
            padding_idx = padding_idx % self.num_embeddings
        self.padding_idx = padding_idx
        if memory is None:
            memory_kwargs = _own_memory_kwargs(memory_kwargs, budget, self.num_embeddings * self.embedding_dim,
                                               device, dtype)
        elif budget is not None:
            raise ValueError("HashedEmbedding: budget= describes a new memory; it cannot be combined with memory=")
        self._attach(memory, self.num_embeddings, self.embedding_dim, scale,
                     lambda mem: mapping.default_scale(self.embedding_dim, mem.init_range, embedding=True),
                     own_memory, memory_kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(num_embeddings, embedding_dim)`` table (differentiable)."""
        W = ops.hashed_weight(self._memory.weight, self.spec, self.scale)
        if self.padding_idx is not None:
            W = W.index_fill(0, torch.tensor([self.padding_idx], device=W.device), 0.0)
        return W

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"HashedEmbedding: indices must be int64 or int32, got {ids.dtype}")
        mem = self._memory.weight
        cols = torch.arange(self.embedding_dim, device=ids.device)
        idx, sign = mapping.indices(self.spec, ids.long().unsqueeze(-1), cols)
        acc = torch.float64 if mem.dtype == torch.float64 else torch.float32
        out = mem.to(acc)[idx]
        if sign is not None:
            out = out * sign.to(acc)
        out = out * self.scale
        if self.padding_idx is not None:
            out = out * (ids != self.padding_idx).unsqueeze(-1).to(acc)
        return out.to(mem.dtype)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}{pad}, method={self.spec.method}, "
                f"memory={self.spec.size}, scale={self.scale:.4g}")


def _round_size(n: float, align: int) -> int:
    return max(align, int(math.ceil(n / align - 1e-9)) * align)


def _own_memory_kwargs(kwargs: dict, budget: Optional[float], numel: int, device, dtype) -> dict:
    kwargs = dict(kwargs)
    if budget is not None:
        if "size" in kwargs:
            raise ValueError("give size= (slots) or budget= (fraction of the weights), not both")
        if not budget > 0:
            raise ValueError(f"budget must be > 0, got {budget}")
        kwargs["size"] = _round_size(budget * numel, int(kwargs.get("align", 1)))
    if kwargs:
        kwargs.setdefault("device", device)
        kwargs.setdefault("dtype", dtype)
    return kwargs


# ---------------------------------------------------------------- conversion

Selector = Union[None, Sequence[str], Callable[[str, nn.Module], bool]]


def _matches(sel: Selector, name: str, module: nn.Module) -> bool:
    if callable(sel):
        return bool(sel(name, module))
    return any(fnmatch.fnmatchcase(name, pat) for pat in sel)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def convert_model(model: nn.Module, budget: Optional[float] = None, *, size: Optional[int] = None,
                  method: str = "stable", seed: int = 0, include: Selector = None, exclude: Selector = None,
                  embeddings: bool = False, tile: Tuple[int, int] = DEFAULT_TILE, align: int = 1,
                  sign: Optional[bool] = None, init_range: float = 1.0, dtype: Optional[torch.dtype] = None,
                  device=None) -> HashedMemory:
    """Replace the model's ``nn.Linear`` layers (and ``nn.Embedding`` with
    ``embeddings=True``) by hashed layers that share one new memory, registered
    once on ``model.hashed_memories`` (on an ``nn.Sequential``/``ModuleList``/
    ``ModuleDict``, whose forward or contents are their children: as
    ``.memory`` of the first converted layer); returns the memory.

    The model is to be trained from scratch: the dense weights are discarded
    (biases are kept, as each layer's dense bias). Layers register in
    ``named_modules()`` order, so converting the same architecture with the same
    arguments always gives the same mapping (what a checkpoint needs).

    Args:
        budget: the array's size as a fraction of the replaced weights
            (``≥ 1``: no compression; STABLE-RPS is then a dense model). Or
        size: the array's size in slots. Either is rounded up to a multiple of
            ``align``.
        method, seed, tile, align, sign, init_range: see :class:`HashedMemory`.
        include, exclude: dotted-name glob patterns (``["blocks.*.mlp.*"]``) or
            a ``(name, module) -> bool`` function choosing the layers; exclude wins.
        embeddings: also replace ``nn.Embedding`` (without max_norm/sparse).
        dtype, device: of the memory (default: those of the first replaced weight).
    """
    if (budget is None) == (size is None):
        raise ValueError("convert_model: give exactly one of budget= (fraction of the weights) or size= (slots)")
    align = mapping.integer("align", align, "convert_model")
    if align < 1:
        raise ValueError(f"convert_model: align must be a power of two >= 1, got {align}")
    if size is not None and mapping.integer("size", size, "convert_model") < 1:  # else rounded up to 1 slot
        raise ValueError(f"convert_model: size must be >= 1 slot, got {size}")
    targets: List[Tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, HashedLayer):
            continue
        ok = type(mod) is nn.Linear or isinstance(mod, nn.Linear)
        if embeddings and isinstance(mod, nn.Embedding):
            if mod.max_norm is not None or mod.sparse:
                continue
            ok = True
        if not ok or not name:
            continue
        if include is not None and not _matches(include, name, mod):
            continue
        if exclude is not None and _matches(exclude, name, mod):
            continue
        targets.append((name, mod))
    if not targets:
        raise ValueError("convert_model: no nn.Linear" + ("/nn.Embedding" if embeddings else "") +
                         " layer matched")
    n = sum(mod.weight.numel() for _, mod in targets)
    if size is None:
        if not budget > 0:
            raise ValueError(f"convert_model: budget must be > 0, got {budget}")
        size = _round_size(budget * n, align)
    else:
        size = _round_size(size, align)
    first = targets[0][1].weight
    memory = HashedMemory(size, method=method, seed=seed, tile=tile, align=align, sign=sign, init_range=init_range,
                          dtype=dtype or first.dtype, device=device or first.device)
    for name, mod in targets:
        if isinstance(mod, nn.Embedding):
            new = HashedEmbedding(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, memory=memory)
        else:
            new = HashedLinear(mod.in_features, mod.out_features, mod.bias is not None, memory=memory)
            if mod.bias is not None:
                with torch.no_grad():
                    new.bias.copy_(mod.bias.to(new.bias.dtype))
        _set_submodule(model, name, new)
    if isinstance(model, _CONTAINERS):
        # their forward runs (or they hold) every child: keep the memory on the first converted layer
        model.get_submodule(targets[0][0]).memory = memory
        return memory
    if not isinstance(getattr(model, "hashed_memories", None), nn.ModuleDict):
        model.hashed_memories = nn.ModuleDict()
    key = str(len(model.hashed_memories))
    while key in model.hashed_memories:
        key = str(int(key) + 1)
    model.hashed_memories[key] = memory
    return memory


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def memories_of(model: nn.Module) -> List[HashedMemory]:
    """Every :class:`HashedMemory` the model's hashed layers read (once each, in order)."""
    seen: Dict[int, HashedMemory] = {}
    for mod in model.modules():
        if isinstance(mod, HashedMemory):
            seen.setdefault(id(mod), mod)
        elif isinstance(mod, HashedLayer):
            seen.setdefault(id(mod.shared_memory), mod.shared_memory)
    return list(seen.values())
