"""Group scope: every layer of one FiPS group run back to back.

The per-layer rows charge each call the whole shared base ``U`` (L2 is
flushed between timed calls), so one layer moves about as many bytes as a
dense one. In a model the ``2n`` (or ``3n``) layers of a group run one after
another and ``U`` — read by each of them — can stay in L2: DESIGN §2's
compression ratios (1.6–1.8× at p = 0.5) are group ratios. These rows time
the whole group (L2 flushed once per group call, as between two inference
steps) against the same number of dense layers, so the bytes column counts
``U`` once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from ..modules import FiPSGroup, FiPSLinear
from .cases import random_dense, random_layers
from .peers import peers_with
from .registry import OURS
from .shapes import BUDGET, Pattern, Preset, preset_rank
from .sizes import tensor_bytes

__all__ = ["GroupCase", "build_group_case", "GroupRun", "GroupProvider", "GROUP_PROVIDERS", "group_provider_reasons"]


@dataclass
class GroupCase:
    preset: Preset
    pattern: Pattern
    rank: int
    group: FiPSGroup  # every layer of the group, in model order (block by block)
    dense: List[Tuple[torch.Tensor, Optional[torch.Tensor]]]  # a dense (W, b) per layer, same shapes
    seed: int = 0

    @property
    def layers(self) -> List[FiPSLinear]:
        return list(self.group)

    @property
    def dtype(self) -> torch.dtype:
        return self.group.layers[0].factor.dtype

    @property
    def device(self) -> torch.device:
        return self.group.base.U.device

    @property
    def fips_bytes(self) -> int:
        """U once, every factor and bias: what a group call must read at least."""
        return self.group.nbytes()

    @property
    def dense_bytes(self) -> int:
        return sum(tensor_bytes(W, b) for W, b in self.dense)

    def activation_bytes(self, M: int) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(M * (layer.in_features + layer.out_features) * item for layer in self.layers)

    def inputs(self, M: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator(device=self.device).manual_seed(self.seed + 2000 + M)
        d, h = self.preset.d, self.preset.h
        return {kind: torch.randn(M, width, generator=g, device=self.device).to(self.dtype)
                for kind, width in (("expand", d), ("contract", h))}

    def dense_flops(self, M: int) -> int:
        return sum(2 * M * W.shape[0] * W.shape[1] for W, _ in self.dense)

    def factored_flops(self, M: int) -> int:
        d = self.preset.d
        return sum(2 * M * (d * self.rank + layer.factor.nnz) for layer in self.layers)


def build_group_case(preset: Preset, pattern: Pattern, dtype: torch.dtype, device, *, seed: int = 0,
                     budget: float = BUDGET) -> GroupCase:
    """Every layer of one group of ``preset`` from random factors (see :mod:`.cases`)."""
    device = torch.device(device)
    r = preset_rank(preset, pattern, budget)
    g = torch.Generator(device=device).manual_seed(seed + 7)
    base, layers = random_layers(preset.d, r, [(kind, preset.h, preset.bias) for kind in preset.group_kinds],
                                 pattern, dtype, g, device)
    dense = [random_dense(layer.out_features, layer.in_features, preset.bias, dtype, g, device) for layer in layers]
    group = FiPSGroup(base, layers, info={"rank": r, "pattern": pattern.name, "preset": preset.name,
                                          "random": True})
    return GroupCase(preset, pattern, r, group, dense, seed)


Runner = Callable[[Dict[str, torch.Tensor]], torch.Tensor]


class GroupRun(NamedTuple):
    """A group provider ready to time: ``run(xs)`` (``xs``: the expand and contract inputs), the bytes it
    stores (all read per call), its arithmetic ``flops(M)`` and what runs it."""

    run: Runner
    weight_bytes: int
    flops: Callable[[int], int]
    backend: str = "torch"


Made = GroupRun


@dataclass(frozen=True)
class GroupProvider:
    """One way of running a whole group: ``make(case) -> GroupRun``."""

    name: str
    role: str
    make: Callable[[GroupCase], Made]
    reasons: Callable[[Preset, torch.device, torch.dtype, str], List[str]] = lambda *a: []

    def __call__(self, case: GroupCase) -> Made:
        return self.make(case)


def _fips(case: GroupCase) -> Made:
    layers = case.layers

    def run(xs):
        y = None
        for layer in layers:
            y = layer(xs[layer.kind])
        return y

    return GroupRun(run, case.fips_bytes, case.factored_flops, "")  # backend: dispatch's pick, per M


def _fips_gate_up(case: GroupCase) -> Made:
    """Gated MLPs as a model runs them: gate and up fused (``z = x·U`` once), then down."""
    from ..ops import gate_up

    layers = case.layers
    blocks = [layers[i:i + 3] for i in range(0, len(layers), 3)]

    def run(xs):
        y = None
        for gate, up, down in blocks:
            gate_up(xs["expand"], gate.base.operand, gate.factor, up.factor, gate.bias, up.bias)
            y = down(xs["contract"])
        return y

    return GroupRun(run, case.fips_bytes, case.factored_flops, "")  # backend: dispatch's pick, per M


def _gated_only(preset: Preset, device, dtype, pattern) -> List[str]:
    if preset.layers_per_mlp != 3:
        return [f"{preset.name} has no gated MLP (F={preset.layers_per_mlp})"]
    return []


def _providers() -> Dict[str, GroupProvider]:
    """The baseline, ours, then every peer with the speed face (:mod:`.peers`)."""
    speed = peers_with("speed")
    out = {"dense": GroupProvider("dense", speed["dense"].role, speed["dense"].group)}
    out["fips"] = GroupProvider("fips", OURS, _fips)
    out["fips_gate_up"] = GroupProvider("fips_gate_up", OURS, _fips_gate_up, _gated_only)
    for name, peer in speed.items():
        if name not in out:
            out[name] = GroupProvider(name, peer.role, peer.group,
                                      lambda preset, device, dtype, pattern, p=peer:
                                      p.not_supported_reasons(device, dtype, pattern))
    return out


GROUP_PROVIDERS: Dict[str, GroupProvider] = _providers()


def group_provider_reasons(name: str, preset: Preset, device: torch.device, dtype: torch.dtype,
                           pattern: str) -> List[str]:
    """Why group provider ``name`` cannot run ``preset`` here (empty: it can)."""
    return GROUP_PROVIDERS[name].reasons(preset, torch.device(device), dtype, pattern)
