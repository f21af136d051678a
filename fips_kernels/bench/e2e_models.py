"""The end-to-end benchmark's models and how each variant is put into them.

* image models: timm DeiT-B and Swin-L built from their configs
  (``pretrained=False``: random weights, nothing downloaded), their MLPs
  (``fc1``/``fc2``) grouped by :func:`mlp_groups`;
* decode: a stack of Llama-shaped gated MLP blocks (:class:`GatedMLP`, the
  structure of Hugging Face's ``LlamaMLP``: ``gate_proj``, ``up_proj``,
  ``down_proj``, SiLU).

:class:`ModelUnderTest` swaps the MLP layers between variants: the dense
baseline (random ``nn.Linear``), FiPS (random factors at each group's rank,
put in with :func:`fips_kernels.install`: whatever ``install`` makes of the
layers is what is timed) and each peer's form of the same factors
(:meth:`fips_kernels.bench.peers.Peer.replace`).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import FiPSGroup, FiPSLinear, SharedBase, install
from ..fusion import activation_sites, gated_sites
from .cases import random_layers
from .e2e_config import ModelSpec
from .peers import PEERS, DenseBaseline
from .shapes import BUDGET, PATTERNS, Pattern, group_rank

__all__ = ["mlp_groups", "GatedMLP", "MLPStack", "ModelUnderTest", "timm_module"]

# Where each variant registers the tensors its layers share (one base per group).
SHARED_ATTRS = ("e2e_shared",)


def timm_module():
    """The ``timm`` module, or None when it is missing or broken."""
    try:
        import timm
    except Exception:  # noqa: BLE001 - missing or broken install
        return None
    return timm


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
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: a Llama MLP (no biases)."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLPStack(nn.Module):
    """Decode blocks: ``x = x + mlp(x)`` for each gated MLP."""

    def __init__(self, blocks: Sequence[GatedMLP]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


Slot = Tuple[str, str, int, int, bool]  # (dotted path, kind, in_features, out_features, has bias)


def _image_model(spec: ModelSpec, device: torch.device) -> Tuple[nn.Module, Tuple[int, ...], List[List[Slot]]]:
    with torch.device(device):
        model = timm_module().create_model(spec.arch, pretrained=False, **dict(spec.timm_kwargs))
    size = getattr(model.patch_embed, "img_size", (224, 224))
    slots = []
    for group in mlp_groups(model, spec.group_size):
        slot = []
        for mlp in group:
            for fc, kind in (("fc1", "expand"), ("fc2", "contract")):
                lin = model.get_submodule(f"{mlp}.{fc}")
                slot.append((f"{mlp}.{fc}", kind, lin.in_features, lin.out_features, lin.bias is not None))
        slots.append(slot)
    return model, (3, *tuple(size)), slots


def _decode_model(spec: ModelSpec, device: torch.device) -> Tuple[nn.Module, Tuple[int, ...], List[List[Slot]]]:
    d, h = spec.d, spec.h
    with torch.device("meta"):  # the variants install every MLP layer: nothing to allocate here
        model = MLPStack([GatedMLP(d, h) for _ in range(spec.blocks)])
    slots = []
    for gi in range(0, spec.blocks, spec.group_size):
        slot = []
        for b in range(gi, min(spec.blocks, gi + spec.group_size)):
            slot += [(f"blocks.{b}.gate_proj", "expand", d, h, False), (f"blocks.{b}.up_proj", "expand", d, h, False),
                     (f"blocks.{b}.down_proj", "contract", h, d, False)]
        slots.append(slot)
    return model, (d,), slots


class ModelUnderTest:
    """A model whose MLP layers can be swapped between variants.

    ``slots``: per group, the dotted paths of its layers with
    ``(kind, in_features, out_features, has_bias)``.
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device, seed: int):
        self.spec, self.dtype, self.device, self.seed = spec, dtype, device, seed
        torch.manual_seed(seed)  # timm's initialisation draws from the global generator
        build = _image_model if spec.task == "images" else _decode_model
        model, self.input_shape, self.slots = build(spec, device)
        self.model = model.to(dtype=dtype).eval().requires_grad_(False)
        # install() fuses (an activation module becomes Identity, a gated MLP a FiPSGatedMLP): the
        # modules it may replace, to put back before the dense and peer variants
        paths = [path for slot in self.slots for path, *_ in slot]
        self._unfused = {site.act: self.model.get_submodule(site.act) for site in activation_sites(self.model, paths)}
        self._unfused.update({site.mlp: self.model.get_submodule(site.mlp) for site in gated_sites(self.model, paths)})
        self.variant: Tuple[str, str] = ("", "")
        self.ranks: List[int] = []

    # -- helpers
    def _set(self, path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(self.model.get_submodule(parent), name, module)

    def _clear_shared(self) -> None:
        for path, module in self._unfused.items():  # undo the last FiPS variant's fusions
            self._set(path, module)
        for name in SHARED_ATTRS:
            if hasattr(self.model, name):
                delattr(self.model, name)

    def mlp_modules(self) -> List[nn.Module]:
        mods = [self.model.get_submodule(path) for slot in self.slots for path, *_ in slot]
        return mods + [getattr(self.model, name) for name in SHARED_ATTRS if hasattr(self.model, name)]

    def make_input(self, batch: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(self.seed + 5000 + batch)
        return torch.randn(batch, *self.input_shape, generator=g, device=self.device).to(self.dtype)

    def first_mlp(self) -> nn.Module:
        return self.model.get_submodule(self.slots[0][0][0])

    # -- variants
    def install_dense(self) -> None:
        self._clear_shared()
        g = torch.Generator(device=self.device).manual_seed(self.seed + 11)
        for slot in self.slots:
            for path, kind, in_f, out_f, has_bias in slot:
                self._set(path, DenseBaseline.linear(in_f, out_f, has_bias, self.dtype, self.device, g))
        self.variant, self.ranks = ("dense", ""), []

    def install_fips(self, pattern: Pattern) -> List[Tuple[SharedBase, List[FiPSLinear]]]:
        """Random FiPS groups at the budget's rank, put in by :func:`fips_kernels.install`
        (seeded by pattern: every variant of a pattern gets the same factors)."""
        self._clear_shared()
        salt = list(PATTERNS).index(pattern.name) if pattern.name in PATTERNS else 7
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + 100 + salt)
        groups, self.ranks = [], []
        for slot in self.slots:
            kinds = [kind for _, kind, *_ in slot]
            d = slot[0][2] if kinds[0] == "expand" else slot[0][3]
            hidden = [out_f if kind == "expand" else in_f for _, kind, in_f, out_f, _ in slot]
            r = group_rank(d, kinds, hidden, pattern, BUDGET)
            base, layers = random_layers(d, r, [(kind, h, s[4]) for s, kind, h in zip(slot, kinds, hidden)],
                                         pattern, self.dtype, g, self.device)
            install(self.model, FiPSGroup(base, layers), [path for path, *_ in slot])
            groups.append((base, layers))
            self.ranks.append(r)
        self.variant = ("fips", pattern.name)
        return groups

    def install_peer(self, provider: str, groups: List[Tuple[SharedBase, List[FiPSLinear]]],
                     pattern: Pattern) -> None:
        """Replace the installed FiPS ``groups`` by ``provider``'s form of the same factors."""
        self._clear_shared()  # the FiPS layers still hold their bases until replaced
        self.model.e2e_shared = nn.ModuleList()
        for (base, layers), slot in zip(groups, self.slots):
            shared, mods = PEERS[provider].replace(base, layers)
            self.model.e2e_shared.append(shared)
            for (path, *_), mod in zip(slot, mods):
                self._set(path, mod)
        del groups
        self.variant = (provider, pattern.name)
