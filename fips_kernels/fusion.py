"""Where a model's MLP can run fused, found from the model's structure alone:

* **activation epilogues** — an exact GELU applied right after an expand
  linear: timm's ``Mlp`` (``fc1 → act → … → fc2``: ViT, DeiT, Swin) and Hugging
  Face's ``*Intermediate`` modules (``dense → intermediate_act_fn``: BERT,
  RoBERTa, MiniLM, ViT, DeiT …);
* **gated MLPs** — Hugging Face's ``*MLP`` modules computing
  ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU (Llama, Mistral,
  Qwen2; Gemma's tanh-GELU is reported, not fused).

Only classes whose forward order is known are listed (a module that merely has
the same children could apply them differently). :func:`fips_kernels.install`
applies the sites whose layers are FiPS layers; nothing here imports them.
Adding a model family: a row in :data:`ACTIVATION_PARENTS` or :data:`GATED_PARENTS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["ActivationSite", "GatedSite", "activation_sites", "gated_sites", "activation_name",
           "ACTIVATION_PARENTS", "GATED_PARENTS"]

# (class-name test, expand child, activation child): the activation runs on the expand child's output
ACTIVATION_PARENTS: Tuple[Tuple[str, str, str], ...] = (
    ("=Mlp", "fc1", "act"),                              # timm.layers.Mlp
    ("*Intermediate", "dense", "intermediate_act_fn"),   # transformers BERT-family / ViT intermediate
)
# (class-name test, (gate, up, down) children, activation child)
GATED_PARENTS: Tuple[Tuple[str, Tuple[str, str, str], str], ...] = (
    ("*MLP", ("gate_proj", "up_proj", "down_proj"), "act_fn"),  # transformers Llama / Mistral / Qwen2 / Gemma
)


@dataclass(frozen=True)
class ActivationSite:
    layer: str       # path of the expand linear
    act: str         # path of the activation module the epilogue replaces
    activation: str  # "gelu" or "silu"


@dataclass(frozen=True)
class GatedSite:
    mlp: str                          # path of the MLP module
    children: Tuple[str, str, str]    # gate, up, down child names
    activation: str                   # "silu" when fusable
    reasons: List[str] = field(default_factory=list)  # why it cannot fuse (explain mode)


def _class_matches(module: nn.Module, test: str) -> bool:
    name = type(module).__name__
    return name == test[1:] if test.startswith("=") else name.endswith(test[1:])


def activation_name(module: Optional[nn.Module]) -> Optional[str]:
    """``"gelu"`` for an exact (erf) GELU module, ``"silu"`` for SiLU, else None."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    if isinstance(module, nn.SiLU):
        return "silu"
    cls = type(module).__name__
    if cls == "GELUActivation":  # transformers: exact unless it uses its own python form
        return "gelu" if getattr(module, "act", None) is torch.nn.functional.gelu else None
    if cls == "SiLUActivation":
        return "silu"
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parents(model: nn.Module, names: Optional[Sequence[str]]) -> Iterator[Tuple[str, nn.Module]]:
    """(path, module) of the parents of ``names`` (every module when None)."""
    if names is None:
        yield from model.named_modules()
        return
    seen = set()
    for name in names:
        parent = name.rpartition(".")[0]
        if parent not in seen:
            seen.add(parent)
            yield parent, (model.get_submodule(parent) if parent else model)


def activation_sites(model: nn.Module, names: Optional[Sequence[str]] = None) -> List[ActivationSite]:
    """Expand linears (among ``names``, or all) followed by an activation the kernels can fuse."""
    out = []
    for path, parent in _parents(model, names):
        for test, expand, act in ACTIVATION_PARENTS:
            if not _class_matches(parent, test) or not hasattr(parent, expand):
                continue
            kind = activation_name(getattr(parent, act, None))
            if kind is not None and (names is None or _join(path, expand) in names):
                out.append(ActivationSite(_join(path, expand), _join(path, act), kind))
    return out


def gated_sites(model: nn.Module, names: Optional[Sequence[str]] = None, explain: bool = False) -> List[GatedSite]:
    """Gated MLPs whose gate is among ``names`` (or all) and whose activation is SiLU;
    with ``explain``, the others too, with the reason."""
    out = []
    for path, parent in _parents(model, names):
        for test, children, act in GATED_PARENTS:
            if not _class_matches(parent, test) or not all(hasattr(parent, c) for c in children):
                continue
            if names is not None and _join(path, children[0]) not in names:
                continue
            kind = activation_name(getattr(parent, act, None))
            if kind == "silu":
                out.append(GatedSite(path, children, kind))
            elif explain:
                act_mod = getattr(parent, act, None)
                out.append(GatedSite(path, children, kind or "?",
                                     [f"the gate activation {type(act_mod).__name__} is not SiLU (the fused "
                                      f"gate/up op computes silu(gate) * up)"]))
    return out
