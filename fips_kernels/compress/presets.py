"""Finding a model's MLPs and its block structure, and cutting the blocks into groups.

A :class:`Preset` describes a model family by module-name patterns:

* ``blocks``: a regular expression that matches (in full) the dotted names of
  the blocks, e.g. ``r"(?:.*\\.)?blocks\\.\\d+"`` for a timm ViT;
* ``linears``: the MLP's linear layers relative to a block, with their kind
  (``"expand"`` d→h, ``"contract"`` h→d; inferred from the shapes when None);
* ``mlp``: the MLP module relative to a block (needed for ``unit="mlp"``,
  where the loss is the MLP's output instead of the block's);
* ``stage``: optional regular expression whose first group names a block's
  stage. By default a block's stage is the module that holds it (``layers.2``
  for ``layers.2.blocks.5``), so groups never cross a Swin stage; they also
  never cross a change of the model width ``d``.

Built-in presets: ``vit`` (timm ViT/DeiT: ``blocks[i].mlp.fc1/fc2``), ``swin``
(timm Swin: ``layers[s].blocks[i].mlp.fc1/fc2``), ``bert`` (Hugging Face
BERT-family encoders: ``encoder.layer[i].intermediate.dense`` /
``output.dense``), ``llama`` (Hugging Face Llama, Gemma, Mistral, Qwen2:
``layers[i].mlp.gate_proj/up_proj/down_proj``; the unit is the MLP).
:func:`find_preset` picks the first that fits a model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

__all__ = ["Preset", "Unit", "GroupSpec", "PRESETS", "find_preset", "resolve_preset", "find_units",
           "make_groups", "PresetError"]


class PresetError(ValueError):
    """The model does not fit the preset (or no preset fits the model)."""


@dataclass(frozen=True)
class Preset:
    """How to find the FiPS layers of a model family (see the module docstring).

    Args:
        name: a label for reports.
        blocks: regular expression matching the full dotted names of the blocks.
        linears: ``{relative path: kind}`` (kind ``"expand"``/``"contract"``, or
            None to infer it from the weight's shape), or a list of relative paths.
        mlp: relative path of the MLP module (``unit="mlp"`` needs it).
        unit: the default unit of the local loss, ``"block"`` or ``"mlp"``.
        group_size: default number of consecutive blocks that share a base.
        stage: optional regular expression (``re.search`` on the block name)
            whose first group is the block's stage.
    """

    name: str
    blocks: str
    linears: Union[Dict[str, Optional[str]], Tuple[str, ...]]
    mlp: Optional[str] = None
    unit: str = "block"
    group_size: int = 2
    stage: Optional[str] = None
    description: str = ""

    def __post_init__(self):
        for field, regex in (("blocks", self.blocks), ("stage", self.stage)):
            try:
                if regex is not None:
                    re.compile(regex)
            except (re.error, TypeError) as exc:
                raise PresetError(f"preset {self.name!r}: {field}={regex!r} is not a regular expression ({exc})") \
                    from None

    def linear_kinds(self) -> List[Tuple[str, Optional[str]]]:
        if isinstance(self.linears, dict):
            return list(self.linears.items())
        return [(path, None) for path in self.linears]


@dataclass(frozen=True)
class Unit:
    """One block (or MLP) the local loss is computed on."""

    name: str                  # module whose input/output are recorded (the block or its MLP)
    block: str                 # the block's dotted name
    linears: Tuple[str, ...]   # full dotted names of its FiPS layers
    kinds: Tuple[str, ...]
    stage: str
    d: int
    hidden: Tuple[int, ...]


@dataclass(frozen=True)
class GroupSpec:
    """Consecutive units of one stage that share one base ``U``."""

    index: int
    units: Tuple[Unit, ...]

    @property
    def linears(self) -> List[str]:
        return [name for u in self.units for name in u.linears]

    @property
    def kinds(self) -> List[str]:
        return [k for u in self.units for k in u.kinds]

    @property
    def hidden(self) -> List[int]:
        return [h for u in self.units for h in u.hidden]

    @property
    def d(self) -> int:
        return self.units[0].d

    @property
    def dense_parameters(self) -> int:
        return sum(self.d * h for h in self.hidden)

    def describe(self) -> dict:
        return {"index": self.index, "units": [u.name for u in self.units], "linears": self.linears,
                "kinds": self.kinds, "d": self.d, "hidden": self.hidden}


PRESETS: Dict[str, Preset] = {
    "swin": Preset("swin", r"(?:.*\.)?layers\.\d+\.blocks\.\d+", {"mlp.fc1": "expand", "mlp.fc2": "contract"},
                   mlp="mlp", group_size=2, description="timm Swin: layers[s].blocks[i].mlp.fc1/fc2; "
                                                         "groups stay within a stage"),
    "vit": Preset("vit", r"(?:.*\.)?blocks\.\d+", {"mlp.fc1": "expand", "mlp.fc2": "contract"},
                  mlp="mlp", group_size=4, description="timm ViT / DeiT: blocks[i].mlp.fc1/fc2"),
    "bert": Preset("bert", r"(?:.*\.)?encoder\.layer\.\d+",
                   {"intermediate.dense": "expand", "output.dense": "contract"}, group_size=3,
                   description="Hugging Face BERT-family encoders (BERT, RoBERTa, MiniLM, ...): "
                               "encoder.layer[i].intermediate.dense / output.dense"),
    "llama": Preset("llama", r"(?:.*\.)?layers\.\d+",
                    {"mlp.gate_proj": "expand", "mlp.up_proj": "expand", "mlp.down_proj": "contract"},
                    mlp="mlp", unit="mlp", group_size=4,
                    description="Hugging Face Llama / Gemma / Mistral / Qwen2: layers[i].mlp.gate_proj, "
                                "up_proj, down_proj; the unit is the MLP (input -> output)"),
}
PRESETS["deit"] = PRESETS["vit"]
PRESETS["gemma"] = PRESETS["llama"]
DETECTION_ORDER = ("swin", "vit", "bert", "llama")


def _is_linear(mod: Optional[nn.Module]) -> bool:
    return isinstance(mod, nn.Linear) or (
        mod is not None and getattr(mod, "weight", None) is not None and getattr(mod.weight, "dim", lambda: 0)() == 2
        and hasattr(mod, "in_features") and hasattr(mod, "out_features"))


def _child(module: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _candidate_blocks(model: nn.Module, preset: Preset) -> List[Tuple[str, nn.Module]]:
    pattern = re.compile(preset.blocks)
    found = []
    for name, mod in model.named_modules():
        if name and pattern.fullmatch(name) and all(_child(mod, rel) is not None for rel, _ in preset.linear_kinds()):
            found.append((name, mod))
    return found


def find_preset(model: nn.Module) -> Preset:
    """The first built-in preset (swin, vit, bert, llama) that finds blocks with
    all of its linear layers in ``model``; raises :class:`PresetError` otherwise."""
    for key in DETECTION_ORDER:
        preset = PRESETS[key]
        blocks = _candidate_blocks(model, preset)
        if blocks and all(_is_linear(_child(mod, rel)) for _, mod in blocks for rel, _ in preset.linear_kinds()):
            return preset
    raise PresetError(
        f"no built-in preset fits {type(model).__name__}: looked for timm Swin (layers[s].blocks[i].mlp.fc1/fc2), "
        f"timm ViT/DeiT (blocks[i].mlp.fc1/fc2), Hugging Face BERT (encoder.layer[i].intermediate.dense / "
        f"output.dense) and Llama/Gemma (layers[i].mlp.gate_proj/up_proj/down_proj). Describe the model with "
        f"Preset(name, blocks=<regex of block names>, linears={{relative path: 'expand'|'contract'}}, mlp=...)")


def resolve_preset(model: nn.Module, preset: Union[None, str, Preset]) -> Preset:
    """``None`` → :func:`find_preset`; a name → ``PRESETS[name]``; a :class:`Preset` as is."""
    if preset is None:
        return find_preset(model)
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise PresetError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)} or pass a Preset")
        return PRESETS[preset]
    raise TypeError(f"preset must be None, a name or a Preset, got {type(preset).__name__}")


def _stage_of(name: str, preset: Preset) -> str:
    if preset.stage is not None:
        m = re.search(preset.stage, name)
        if m is None:
            raise PresetError(f"preset {preset.name!r}: stage pattern {preset.stage!r} does not match block {name!r}")
        return m.group(1) if m.groups() else m.group(0)
    return name.rpartition(".")[0]


def find_units(model: nn.Module, preset: Preset, unit: Optional[str] = None) -> List[Unit]:
    """The model's blocks (in module order) as :class:`Unit` s with their linear
    layers, kinds (given or inferred) and widths."""
    unit = unit or preset.unit
    if unit not in ("block", "mlp"):
        raise ValueError(f"unit must be 'block' or 'mlp', got {unit!r}")
    if unit == "mlp" and preset.mlp is None:
        raise PresetError(f"preset {preset.name!r} names no MLP module, so unit='mlp' is not possible; "
                          f"use unit='block'")
    blocks = _candidate_blocks(model, preset)
    if not blocks:
        rels = [rel for rel, _ in preset.linear_kinds()]
        raise PresetError(f"preset {preset.name!r}: no module of {type(model).__name__} matches {preset.blocks!r} "
                          f"with linear layers {rels}")
    # drop blocks nested inside another matched block (the outer one is the unit)
    names = [n for n, _ in blocks]
    blocks = [(n, m) for n, m in blocks if not any(n != o and n.startswith(o + ".") for o in names)]
    units = []
    for name, block in blocks:
        linears, kinds, hidden = [], [], []
        d = None
        for rel, kind in preset.linear_kinds():
            lin = _child(block, rel)
            full = f"{name}.{rel}"
            if not _is_linear(lin):
                raise PresetError(f"{full} is a {type(lin).__name__}, not a linear layer "
                                  f"(already compressed? compress a model only once)")
            out_f, in_f = lin.weight.shape
            if kind is None:
                if out_f == in_f:
                    raise PresetError(f"{full} is {in_f}->{out_f}: cannot tell expand from contract; "
                                      f"give its kind in the preset's linears")
                kind = "expand" if out_f > in_f else "contract"
            if kind not in ("expand", "contract"):
                raise PresetError(f"{full}: kind must be 'expand' or 'contract', got {kind!r}")
            width, h = (in_f, out_f) if kind == "expand" else (out_f, in_f)
            if d is not None and width != d:
                raise PresetError(f"{full} has model width {width} but the block's other layers have {d}")
            d = width
            linears.append(full)
            kinds.append(kind)
            hidden.append(h)
        unit_name = name if unit == "block" else f"{name}.{preset.mlp}"
        if unit == "mlp" and _child(block, preset.mlp) is None:
            raise PresetError(f"preset {preset.name!r}: block {name} has no MLP module {preset.mlp!r}")
        units.append(Unit(unit_name, name, tuple(linears), tuple(kinds), _stage_of(name, preset), d, tuple(hidden)))
    return units


def make_groups(units: Sequence[Unit], group_size: int) -> List[GroupSpec]:
    """Consecutive runs of ``group_size`` units; a group never crosses a stage or a
    change of ``d`` (the last group of a stage may be smaller)."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    groups: List[GroupSpec] = []
    current: List[Unit] = []
    for u in units:
        if current and (len(current) == group_size or u.stage != current[-1].stage or u.d != current[-1].d):
            groups.append(GroupSpec(len(groups), tuple(current)))
            current = []
        current.append(u)
    if current:
        groups.append(GroupSpec(len(groups), tuple(current)))
    return groups
