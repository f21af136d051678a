"""The layers the benchmark times, built from random factors.

Factorising a real group by SVD (:func:`fips_kernels.factorize_group`) at
Llama sizes takes minutes and changes nothing about the timing, so the
benchmark draws the factors at random instead, at the rank, sparsity and
pattern the group would have:

* ``U (d × r)`` and each factor from a normal distribution (scaled so that
  outputs stay O(1) in fp16),
* a magnitude mask on each factor: the largest ``floor((1−s)·r·h)`` entries
  (unstructured, ``bitmap`` format) or the largest ``n`` of every ``m``
  consecutive entries along the reduction axis — axis 0 of the
  reduction-major factor ``B`` (``nm`` format, docs/FORMATS.md),
* packed with :meth:`SparseFactor.pack` and wrapped in
  :class:`SharedBase` / :class:`FiPSLinear` / :class:`FiPSGroup`.

Only one expand and one contract layer of the group are built (they share the
base, as in the real group); the group's byte count is extrapolated from them
(every expand layer of a preset has the same shape and stored-byte count, and
so has every contract layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ..formats import SparseFactor
from ..modules import FiPSGroup, FiPSLinear, SharedBase
from .shapes import BUDGET, QGROUP, Pattern, Preset, preset_rank
from .sizes import tensor_bytes

__all__ = ["LayerCase", "build_cases", "random_factor", "random_layers", "random_dense", "tensor_bytes"]

KINDS = ("expand", "contract")


@dataclass
class LayerCase:
    """One timed layer: the FiPS layer, its group, and a dense layer of the same shape."""

    preset: Preset
    pattern: Pattern
    kind: str
    rank: int
    group: FiPSGroup
    layer: FiPSLinear
    dense_weight: torch.Tensor  # (out_features, in_features), random
    dense_bias: Optional[torch.Tensor]
    group_dense_bytes: int  # Σ d·h·itemsize over the whole group (weights only)
    group_bytes: int  # U + every layer's factor bytes (biases not counted)
    seed: int = 0
    _inputs: dict = field(default_factory=dict, repr=False)

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.factor.dtype

    @property
    def device(self) -> torch.device:
        return self.layer.U.device

    @property
    def factor(self) -> SparseFactor:
        return self.layer.factor

    @property
    def fips_weight_bytes(self) -> int:
        """What one call of the FiPS layer must read: the whole base, its factor, its bias."""
        return self.layer.base.nbytes() + self.layer.nbytes()

    @property
    def dense_weight_bytes(self) -> int:
        """What the dense layer stores: weight and bias."""
        return tensor_bytes(self.dense_weight, self.dense_bias)

    @property
    def group_compressed_ratio(self) -> float:
        return self.group_dense_bytes / self.group_bytes

    def make_input(self, M: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(self.seed + 1000 + M)
        return torch.randn(M, self.in_features, generator=g, device=self.device,
                           dtype=torch.float32).to(self.dtype)


def _mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Magnitude mask of a reduction-major ``B (K, N)`` (``scores = |B|``)."""
    K, N = scores.shape
    if pattern.format == "nm":
        n, m = pattern.n, pattern.m
        G = -(-K // m)
        padded = torch.nn.functional.pad(scores, (0, 0, 0, G * m - K), value=-1.0).reshape(G, m, N)
        keep = torch.topk(padded, n, dim=1).indices
        mask = torch.zeros_like(padded, dtype=torch.bool).scatter_(1, keep, True)
        return mask.reshape(G * m, N)[:K]
    k = int(math.floor((1.0 - pattern.sparsity) * K * N))
    flat = torch.zeros(K * N, dtype=torch.bool, device=scores.device)
    flat[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return flat.view(K, N)


def random_factor(K: int, N: int, pattern: Pattern, dtype: torch.dtype, generator: torch.Generator,
                  device: torch.device) -> SparseFactor:
    """A random reduction-major factor ``B (K, N)`` with a magnitude mask, packed."""
    density = 1.0 - pattern.sparsity
    B = torch.randn(K, N, generator=generator, device=device, dtype=torch.float32)
    B.mul_(1.0 / math.sqrt(max(1.0, density * K)))
    mask = _mask(B.abs(), pattern)
    values = torch.where(mask, B, torch.zeros((), device=device)).to(dtype)
    del B
    # A kept entry that rounds to 0 in a narrow dtype would silently drop out of
    # the count: give it the smallest normal fp16 value instead.
    values = torch.where(mask & (values == 0), torch.full((), 2.0 ** -14, device=device, dtype=dtype), values)
    del mask
    return SparseFactor.pack(values, pattern.format, n=pattern.n, m=pattern.m, qbits=pattern.qbits,
                             qgroup=QGROUP)


def random_dense(out_features: int, in_features: int, bias: bool, dtype: torch.dtype, generator: torch.Generator,
                 device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A random dense ``(W (out × in), b)`` of that shape (the dense baseline's weights)."""
    W = (torch.randn(out_features, in_features, generator=generator, device=device) / math.sqrt(in_features))
    b = (0.02 * torch.randn(out_features, generator=generator, device=device)).to(dtype) if bias else None
    return W.to(dtype), b


def random_layers(d: int, r: int, slots: Sequence[Tuple[str, int, bool]], pattern: Pattern, dtype: torch.dtype,
                  generator: torch.Generator, device: torch.device) -> Tuple[SharedBase, List[FiPSLinear]]:
    """A random base ``U (d × r)`` (int8 for a quantised pattern) and one FiPS layer per
    ``(kind, hidden, has_bias)`` slot sharing it, with random packed factors; no gradients."""
    U = (torch.randn(d, r, generator=generator, device=device, dtype=torch.float32) / math.sqrt(d)).to(dtype)
    base = SharedBase(U.contiguous())
    if pattern.qbits:
        base.quantize_(8)
    base.requires_grad_(False)
    layers = []
    for kind, h, has_bias in slots:
        K, N = (r, h) if kind == "expand" else (h, r)
        factor = random_factor(K, N, pattern, dtype, generator, device)
        out_f = h if kind == "expand" else d
        bias = (0.02 * torch.randn(out_f, generator=generator, device=device)).to(dtype) if has_bias else None
        layers.append(FiPSLinear(base, factor, kind, bias).requires_grad_(False))
    return base, layers


def build_cases(preset: Preset, pattern: Pattern, dtype: torch.dtype, device, *, seed: int = 0,
                budget: float = BUDGET) -> List[LayerCase]:
    """One expand and one contract :class:`LayerCase` of ``preset`` sharing a random base."""
    device = torch.device(device)
    r = preset_rank(preset, pattern, budget)
    d, h = preset.d, preset.h
    g = torch.Generator(device=device).manual_seed(seed)
    base, layers = random_layers(d, r, [(kind, h, preset.bias) for kind in KINDS], pattern, dtype, g, device)
    dense = [random_dense(layer.out_features, layer.in_features, preset.bias, dtype, g, device) for layer in layers]
    group = FiPSGroup(base, layers, info={
        "rank": r, "budget": budget, "sparsity": pattern.sparsity, "pattern": pattern.name,
        "format": pattern.format, "preset": preset.name, "random": True, "built_layers": list(KINDS),
    })
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_kind = {layer.kind: layer.factor.nbytes for layer in layers}
    group_bytes = base.nbytes() + sum(per_kind[k] for k in preset.group_kinds)
    group_dense = sum(d * hh for hh in preset.group_hidden) * itemsize
    return [LayerCase(preset, pattern, layer.kind, r, group, layer, W, Wb, group_dense, group_bytes, seed)
            for layer, (W, Wb) in zip(layers, dense)]
