"""The hash mappings of randomized parameter sharing: where each weight of a
layer is read from the shared array. Pure functions of (seed, the shapes of the
layers in the order they were registered with the array, array size); no
kernel block size, batch size or device enters them.

Notation: the shared array ``mem`` has ``m`` slots. A layer's torch-layout
weight ``W`` is ``(out × in)`` (an embedding's is ``(num_embeddings × dim)``),
its element ``(o, i)`` is::

    W[o, i] = λ · s(o, i) · mem[idx(o, i)]

with ``λ`` the layer's scale (a float) and ``s`` a ±1 sign (ROAST only;
``s = 1`` for STABLE-RPS). All hashes are integer arithmetic, exact:

* ``P = 2³¹ − 1`` (a prime). ``A`` is the alignment (``align``, default 1).
* eight coefficients ``k₀ … k₇ ∈ [1, P−1]`` from the memory's ``seed`` by
  splitmix64 (:func:`coefficients`): ``kᵢ = 1 + (zᵢ mod (P − 1))`` where
  ``z₀, z₁, …`` are the successive outputs of splitmix64 seeded with ``seed``.

**STABLE-RPS** (``method="stable"``). The weights of all layers of the
memory are flattened, layer after layer in registration order and each layer
row-major, to a global index ``ℓ = ℓ₀ + o·in + i`` (``ℓ₀``: the total size of
the layers registered before). ``ℓ`` is cut into partitions of ``m``; partition
``c = ⌊ℓ / m⌋`` is a rotation of the array by ``g(c)``::

    g(c)    = A · (((k₀·c + k₁) mod P) mod ⌈m / A⌉)
    idx(ℓ)  = (g(⌊ℓ/m⌋) + ℓ mod m) mod m

Each partition is a bijection onto the array, so every slot receives
``⌊n/m⌋`` or ``⌈n/m⌉`` of the ``n`` weights, and at ``m ≥ n`` the whole map is
injective (zero compression is a plain dense model).

**ROAST** (``method="roast"``). ``W`` is cut into fixed hash tiles of
``TO × TI`` elements (``tile=(TO, TI)``, powers of two; default ``(1, 64)``:
64 consecutive weights of a row). Tile ``(a, b) = (⌊o/TO⌋, ⌊i/TI⌋)`` of layer
number ``j`` (its registration index in the memory) is stored contiguously,
row-major, at an aligned offset::

    h(a, b)   = (k₀·a + k₁·b + k₂·j + k₃) mod P
    off(a, b) = A · (h(a, b) mod (⌊(m − TO·TI) / A⌋ + 1))
    idx(o, i) = off(a, b) + (o mod TO)·TI + (i mod TI)
    s(o, i)   = 1 − 2 · (((k₄·a + k₅·b + k₆·j + k₇) mod P) mod 2)   (1 when sign=False)

Tiles never wrap (``off + TO·TI ≤ m``), so a tile row is ``TI`` contiguous
slots: kernels load them coalesced. Products are below ``2⁶²``; an
implementation in 64-bit arithmetic reduces each product mod ``P`` before
summing (the result is the same).

``λ`` (per layer): by default ``gain / (r·√in)`` for a memory initialised
``U(−r, r)`` (``r = init_range``), which gives every weight the distribution
of ``nn.Linear``'s default init, ``U(−1/√in, 1/√in)``; ``√3/r`` for embeddings
(unit variance, as ``nn.Embedding``).
"""
from __future__ import annotations

import functools
import math
import numbers
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = [
    "P",
    "METHODS",
    "SPEC_VERSION",
    "MAX_SIZE",
    "HashSpec",
    "coefficients",
    "splitmix64",
    "make_spec",
    "stable_rotation",
    "roast_offset",
    "roast_sign",
    "indices",
    "layer_indices",
    "index_of",
    "materialize",
    "slot_loads",
    "slot_lambda_sq",
    "scale_bits",
    "scale_from_bits",
]

P = 2 ** 31 - 1
METHODS = ("stable", "roast")
METHOD_CODES = {"stable": 0, "roast": 1}
SPEC_VERSION = 1
MAX_SIZE = 2 ** 30  # slots; keeps the kernels' per-element index arithmetic in int32
_MASK64 = (1 << 64) - 1


def splitmix64(seed: int):
    """The splitmix64 generator (Steele, Lea, Flood 2014): an endless stream of 64-bit ints."""
    state = seed & _MASK64
    while True:
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        yield z ^ (z >> 31)


@functools.lru_cache(maxsize=None)
def coefficients(seed: int) -> Tuple[int, ...]:
    """``k₀ … k₇``, each in ``[1, P − 1]``, from ``seed``."""
    gen = splitmix64(int(seed))
    return tuple(1 + next(gen) % (P - 1) for _ in range(8))


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


@dataclass(frozen=True)
class HashSpec:
    """Everything the mapping of one layer depends on.

    ``layer_index`` (``j``) and ``offset`` (``ℓ₀``) are given by the memory when
    the layer registers; ``coef`` derives from ``seed``. :meth:`to_list` is the
    form the custom ops take and checkpoints store.
    """

    method: str
    out_features: int
    in_features: int
    size: int
    layer_index: int
    offset: int
    tile: Tuple[int, int]
    align: int
    sign: bool
    seed: int
    coef: Tuple[int, ...]

    LIST_LEN = 20

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"hashed mapping: method must be one of {METHODS}, got {self.method!r}")
        for name in ("out_features", "in_features", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"hashed mapping: {name} must be >= 1, got {getattr(self, name)}")
        if self.size > MAX_SIZE:
            raise ValueError(f"hashed mapping: the array may hold at most 2^30 = {MAX_SIZE} slots, got {self.size}")
        if not _is_pow2(self.align):
            raise ValueError(f"hashed mapping: align must be a power of two, got {self.align}")
        to, ti = self.tile
        if not (_is_pow2(to) and _is_pow2(ti)):
            raise ValueError(f"hashed mapping: tile dimensions must be powers of two, got {self.tile}")
        if self.method == "roast" and self.size < to * ti:
            raise ValueError(f"hashed mapping: a ROAST array must hold at least one {to}×{ti} tile "
                             f"({to * ti} slots), got {self.size}")
        if self.method == "stable" and (self.offset + self.numel - 1) // self.size >= P:
            raise ValueError("hashed mapping: too many partitions for the hash (n / m must be below 2^31 − 1)")
        if len(self.coef) != 8 or not all(1 <= k < P for k in self.coef):
            raise ValueError(f"hashed mapping: coef must be 8 ints in [1, P−1], got {self.coef}")

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def tile_numel(self) -> int:
        return self.tile[0] * self.tile[1]

    @property
    def choices(self) -> int:
        """How many values the rotation (STABLE) or the tile offset (ROAST) can take."""
        if self.method == "stable":
            return -(-self.size // self.align)
        return (self.size - self.tile_numel) // self.align + 1

    @property
    def tiles(self) -> Tuple[int, int]:
        """ROAST tile grid ``(⌈out/TO⌉, ⌈in/TI⌉)``."""
        return -(-self.out_features // self.tile[0]), -(-self.in_features // self.tile[1])

    def layer_term(self, which: int) -> int:
        """``(k₂·j + k₃) mod P`` (``which=0``, offsets) or ``(k₆·j + k₇) mod P`` (signs)."""
        kj, kc = self.coef[4 * which + 2], self.coef[4 * which + 3]
        return (kj * self.layer_index + kc) % P

    def to_list(self) -> List[int]:
        return [SPEC_VERSION, METHOD_CODES[self.method], self.out_features, self.in_features, self.size,
                self.layer_index, self.offset, self.tile[0], self.tile[1], self.align, int(self.sign),
                self.seed, *self.coef]

    @classmethod
    def from_list(cls, spec: Sequence[int]) -> "HashSpec":
        spec = [int(v) for v in spec]
        if len(spec) != cls.LIST_LEN:
            raise ValueError(f"hashed mapping: a spec list has {cls.LIST_LEN} ints, got {len(spec)}")
        if spec[0] != SPEC_VERSION:
            raise ValueError(f"hashed mapping: spec version {spec[0]} is not supported (this is {SPEC_VERSION})")
        method = {v: k for k, v in METHOD_CODES.items()}.get(spec[1])
        if method is None:
            raise ValueError(f"hashed mapping: unknown method code {spec[1]}")
        return cls(method, spec[2], spec[3], spec[4], spec[5], spec[6], (spec[7], spec[8]), spec[9],
                   bool(spec[10]), spec[11], tuple(spec[12:20]))

    def describe(self) -> str:
        extra = (f", tile={self.tile[0]}x{self.tile[1]}, sign={self.sign}, layer={self.layer_index}"
                 if self.method == "roast" else f", offset={self.offset}")
        return f"{self.method}, m={self.size}, seed={self.seed}, align={self.align}{extra}"


def make_spec(method: str, out_features: int, in_features: int, size: int, *, layer_index: int = 0,
              offset: int = 0, tile: Tuple[int, int] = (1, 64), align: int = 1, sign: Optional[bool] = None,
              seed: int = 0) -> HashSpec:
    """A :class:`HashSpec` with the coefficients of ``seed``; STABLE-RPS ignores
    ``tile`` and ``sign`` (stored as ``(1, 1)`` and False)."""
    if method == "stable":
        tile, sign = (1, 1), False
    elif sign is None:
        sign = True
    if len(tile) != 2:
        raise ValueError(f"hashed mapping: tile must be two integers (TO, TI), got {tile!r}")
    tile = (integer("tile", tile[0]), integer("tile", tile[1]))
    seed = integer("seed", seed)
    return HashSpec(method, integer("out_features", out_features), integer("in_features", in_features),
                    integer("size", size), integer("layer_index", layer_index), integer("offset", offset), tile,
                    integer("align", align), bool(sign), seed, coefficients(seed))


def integer(name: str, value, where: str = "hashed mapping") -> int:
    """``value`` as an int, refusing what ``int()`` would silently change (2.5, True)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------- torch (vectorised, exact int64)

def _mulmod(k: int, x: torch.Tensor) -> torch.Tensor:
    return (x * k) % P  # x < 2^31, k < 2^31: the product fits int64


def stable_rotation(spec: HashSpec, c: torch.Tensor) -> torch.Tensor:
    """``g(c)`` for partition indices ``c`` (int64)."""
    h = (_mulmod(spec.coef[0], c) + spec.coef[1]) % P
    return spec.align * (h % spec.choices)


def _roast_hash(spec: HashSpec, a: torch.Tensor, b: torch.Tensor, which: int) -> torch.Tensor:
    ka, kb = spec.coef[4 * which], spec.coef[4 * which + 1]
    return (_mulmod(ka, a) + _mulmod(kb, b) + spec.layer_term(which)) % P


def roast_offset(spec: HashSpec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``off(a, b)``: the first slot of tile ``(a, b)``."""
    return spec.align * (_roast_hash(spec, a, b, 0) % spec.choices)


def roast_sign(spec: HashSpec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``s`` of tile ``(a, b)`` as int64 ±1."""
    return 1 - 2 * (_roast_hash(spec, a, b, 1) % 2)


def indices(spec: HashSpec, rows: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(idx, sign)`` of the elements ``(rows, cols)`` (broadcast; int64).
    ``sign`` is None when the mapping has no sign hash."""
    rows = rows.long()
    cols = cols.long()
    if spec.method == "stable":
        ell = spec.offset + rows * spec.in_features + cols
        c = ell // spec.size
        return (stable_rotation(spec, c) + ell - c * spec.size) % spec.size, None
    to, ti = spec.tile
    a, b = rows // to, cols // ti
    idx = roast_offset(spec, a, b) + (rows % to) * ti + cols % ti
    return idx, (roast_sign(spec, a, b) if spec.sign else None)


@functools.lru_cache(maxsize=32)
def _layer_indices(spec: HashSpec, device: str):
    dev = torch.device(device)
    rows = torch.arange(spec.out_features, device=dev)[:, None]
    cols = torch.arange(spec.in_features, device=dev)[None, :]
    idx, sign = indices(spec, rows, cols)
    idx = idx.expand(spec.out_features, spec.in_features).contiguous()
    if sign is not None:
        sign = sign.expand_as(idx).to(torch.float32).contiguous()
    return idx, sign


def layer_indices(spec: HashSpec, device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The whole layer's ``(idx (out × in) int64, sign (out × in) fp32 or None)``,
    cached per (spec, device): what the reference path gathers with."""
    return _layer_indices(spec, str(torch.device(device)))


def materialize(memory: torch.Tensor, spec: HashSpec, scale: float,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``W = λ · s ⊙ mem[idx]`` ``(out × in)``, computed in fp32 (fp64 stays
    fp64) and returned in ``dtype`` (default: the memory's). Differentiable."""
    acc = torch.float64 if memory.dtype == torch.float64 else torch.float32
    idx, sign = layer_indices(spec, memory.device)
    W = memory.to(acc).index_select(0, idx.view(-1)).view(idx.shape)
    if sign is not None:
        W = W * sign.to(acc)
    return (W * scale).to(dtype or memory.dtype)


def slot_loads(specs: Sequence[HashSpec], size: int, device="cpu", weights: Optional[Sequence[float]] = None,
               rows_per_chunk: int = 4096) -> torch.Tensor:
    """How many weights each slot holds (fp64; with ``weights``: Σ weightⱼ over
    the weights mapped to it, one weight per layer). Chunked over rows."""
    out = torch.zeros(size, dtype=torch.float64, device=device)
    for n, spec in enumerate(specs):
        if spec.size != size:
            raise ValueError(f"slot_loads: layer {n} maps into {spec.size} slots, not {size}")
        w = 1.0 if weights is None else float(weights[n])
        cols = torch.arange(spec.in_features, device=device)[None, :]
        for r0 in range(0, spec.out_features, rows_per_chunk):
            rows = torch.arange(r0, min(r0 + rows_per_chunk, spec.out_features), device=device)[:, None]
            idx, _ = indices(spec, rows, cols)
            out += torch.bincount(idx.expand(rows.shape[0], cols.shape[1]).reshape(-1), minlength=size).to(
                torch.float64) * w
    return out


def slot_lambda_sq(specs: Sequence[HashSpec], scales: Sequence[float], size: int, device="cpu") -> torch.Tensor:
    """``Σ λ²`` over the weights mapped to each slot (STABLE-RPS gradient scaling), fp64."""
    return slot_loads(specs, size, device, [float(s) ** 2 for s in scales])


# ---------------------------------------------------------------- one element, plain Python

def index_of(spec: HashSpec, o: int, i: int) -> Tuple[int, int]:
    """``(idx, s)`` of element ``(o, i)`` in plain Python ints: the mapping
    written out once more, term by term as in the module docstring."""
    k = spec.coef
    if spec.method == "stable":
        ell = spec.offset + o * spec.in_features + i
        c = ell // spec.size
        g = spec.align * (((k[0] * c + k[1]) % P) % spec.choices)
        return (g + ell % spec.size) % spec.size, 1
    to, ti = spec.tile
    a, b, j = o // to, i // ti, spec.layer_index
    off = spec.align * (((k[0] * a + k[1] * b + k[2] * j + k[3]) % P) % spec.choices)
    s = 1 - 2 * (((k[4] * a + k[5] * b + k[6] * j + k[7]) % P) % 2) if spec.sign else 1
    return off + (o % to) * ti + i % ti, s


def scale_bits(scale: float) -> int:
    """A float64 as the int64 with the same bits (so an int buffer can keep λ exactly)."""
    return struct.unpack("<q", struct.pack("<d", float(scale)))[0]


def scale_from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def default_scale(in_features: int, init_range: float, gain: float = 1.0, embedding: bool = False) -> float:
    """λ that gives ``nn.Linear``'s (``U(−1/√in, 1/√in)``) or ``nn.Embedding``'s
    (unit variance) init from a memory drawn from ``U(−r, r)``."""
    if embedding:
        return gain * math.sqrt(3.0) / init_range
    return gain / (init_range * math.sqrt(in_features))


__all__ += ["default_scale", "METHOD_CODES"]
