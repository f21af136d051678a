"""Checkpoints of compressed models and groups: safetensors plus a JSON header.

The header (stored in the safetensors metadata under ``"fips_kernels"``)
records the format version, every FiPS layer (path, kind, format, meta,
base; ``cast_input`` when set), every shared base, tensors stored once for
several names (tied weights) and a SHA-256 of every tensor's bytes.
:func:`load` refuses a truncated, altered or mismatched file with
:class:`CheckpointError`; what it loads is bit-exact.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional, Union

import torch
from torch import nn

from .formats import AUX_NAMES, FormatError, SparseFactor
from .modules import FiPSGroup, FiPSLinear, SharedBase, bases_of, get_submodule, set_submodule

__all__ = ["save", "load", "CheckpointError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
HEADER_KEY = "fips_kernels"
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(RuntimeError):
    """A checkpoint is damaged, of an unknown version, or does not fit the model."""


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def _layer_record(layer: FiPSLinear, base_path: str) -> dict:
    return {"kind": layer.kind, "format": layer.format, "meta": list(layer.meta), "base": base_path,
            "in_features": layer.in_features, "out_features": layer.out_features,
            "bias": layer.bias is not None, "dtype": str(layer.V_values.dtype).replace("torch.", ""),
            "quantized": layer.factor.quantized, **({"cast_input": True} if layer.cast_input else {})}


def save(module: nn.Module, path: PathLike) -> None:
    """Save a :class:`FiPSGroup`, a :class:`FiPSLinear` that owns its base, or a
    whole model containing FiPS layers (its full ``state_dict``) to ``path``."""
    bases = bases_of(module)
    layers = {}
    for name, mod in module.named_modules():
        if isinstance(mod, FiPSLinear):
            if id(mod.base) not in bases:
                raise CheckpointError(f"save: the shared base of layer {name or '<root>'!r} is not registered "
                                      f"in the saved module; save its FiPSGroup or the model it was installed in")
            layers[name] = _layer_record(mod, bases[id(mod.base)])
    state = module.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for key, t in state.items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]  # tied weights: store once
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.contiguous().cpu()
    header = {
        "format_version": FORMAT_VERSION,
        "container": "group" if isinstance(module, FiPSGroup) else
                     ("layer" if isinstance(module, FiPSLinear) else "model"),
        "layers": layers,
        "bases": {p: {"d": get_submodule(module, p).d, "rank": get_submodule(module, p).rank,
                      "quantized": get_submodule(module, p).quantized} for p in bases.values()},
        "aliases": aliases,
        "sha256": {k: _digest(t) for k, t in tensors.items()},
    }
    from safetensors.torch import save_file

    save_file(tensors, os.fspath(path), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})


def _read(path: PathLike):
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (truncated or damaged?): "
                              f"{type(exc).__name__}: {exc}") from None
    if HEADER_KEY not in meta:
        raise CheckpointError(f"{path}: no fips_kernels header; not a fips_kernels checkpoint")
    try:
        header = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the fips_kernels header is not valid JSON ({exc})") from None
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported "
                              f"(this fips_kernels reads version {FORMAT_VERSION})")
    sums = header.get("sha256", {})
    if set(sums) != set(tensors):
        missing, extra = sorted(set(sums) - set(tensors)), sorted(set(tensors) - set(sums))
        raise CheckpointError(f"{path}: tensors do not match the header (missing {missing}, unexpected {extra})")
    for key, t in tensors.items():
        if _digest(t) != sums[key]:
            raise CheckpointError(f"{path}: tensor {key!r} fails its SHA-256 check: the file is damaged")
    for key, target in header.get("aliases", {}).items():
        if target not in tensors:
            raise CheckpointError(f"{path}: alias {key!r} points at missing tensor {target!r}")
        tensors[key] = tensors[target]
    return header, tensors


def _build_layer(name: str, rec: dict, base: SharedBase, tensors: Dict[str, torch.Tensor]) -> FiPSLinear:
    prefix = f"{name}." if name else ""
    try:
        values = tensors[prefix + "V_values"]
        aux = [tensors[prefix + "V_" + a] for a in AUX_NAMES[rec["format"]]]
        scales = tensors[prefix + "V_scales"] if rec.get("quantized") else None
        factor = SparseFactor.from_parts(rec["format"], rec["meta"], values, aux, validate=True, scales=scales)
        bias = tensors[prefix + "bias"] if rec["bias"] else None
        return FiPSLinear(base, factor, rec["kind"], bias, cast_input=bool(rec.get("cast_input", False)))
    except KeyError as exc:
        raise CheckpointError(f"layer {name!r}: tensor {exc} is missing from the checkpoint") from None
    except (FormatError, ValueError, TypeError) as exc:
        raise CheckpointError(f"layer {name!r}: invalid factor in the checkpoint: {exc}") from None


def _set_base(root: nn.Module, path: str, base: SharedBase) -> None:
    parts = path.split(".")
    parent = root
    for part in parts[:-1]:
        if not hasattr(parent, part):
            setattr(parent, part, nn.ModuleDict())
        parent = getattr(parent, part)
    if isinstance(parent, nn.ModuleDict):
        parent[parts[-1]] = base
    else:
        setattr(parent, parts[-1], base)


def load(path: PathLike, model: Optional[nn.Module] = None, *, map_location: Union[str, torch.device] = "cpu",
         strict: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save`.

    * ``model=None``: the checkpoint must hold a group or a single layer; it is
      rebuilt from the header alone and returned.
    * ``model`` given (e.g. the dense architecture built from its config): the
      checkpoint's FiPS layers replace the modules at the same paths, the bases
      are registered, every tensor is loaded (``strict`` as in
      ``load_state_dict``), and the model is returned.

    Raises :class:`CheckpointError` for a damaged, truncated, unknown-version
    or mismatched file.
    """
    header, tensors = _read(path)
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    bases: Dict[str, SharedBase] = {}
    for bpath in header["bases"]:
        key = f"{bpath}.U"
        if key not in tensors:
            raise CheckpointError(f"{path}: base tensor {key!r} is missing")
        quantized = header["bases"][bpath].get("quantized", False)
        if quantized and f"{bpath}.U_scales" not in tensors:
            raise CheckpointError(f"{path}: base tensor {bpath + '.U_scales'!r} is missing")
        try:
            bases[bpath] = SharedBase(tensors[key], tensors[f"{bpath}.U_scales"] if quantized else None)
        except ValueError as exc:
            raise CheckpointError(f"{path}: invalid base {bpath!r}: {exc}") from None
    built = {name: _build_layer(name, rec, bases[rec["base"]], tensors) for name, rec in header["layers"].items()}
    container = header.get("container")

    if model is None:
        if container == "group":
            if len(bases) != 1:
                raise CheckpointError(f"{path}: a group checkpoint must hold exactly one base")
            order = sorted(built, key=lambda n: int(n.split(".")[-1]))
            group = FiPSGroup(next(iter(bases.values())), [built[n] for n in order])
            _load_state(group, tensors, path, strict)
            return group
        if container == "layer":
            layer = built[""]
            layer.shared_base = layer.base
            _load_state(layer, tensors, path, strict)
            return layer
        raise CheckpointError(f"{path}: holds a whole model; pass the model to load it into "
                              f"(fips_kernels.load(path, model))")

    # Check everything before touching the model, so a refused checkpoint leaves it as it was.
    for name, layer in built.items():
        try:
            old = get_submodule(model, name)
        except AttributeError:
            raise CheckpointError(f"{path}: the model has no module {name!r} for a FiPS layer") from None
        for attr in ("in_features", "out_features"):
            if getattr(old, attr, getattr(layer, attr)) != getattr(layer, attr):
                raise CheckpointError(f"{path}: module {name!r} has {attr}={getattr(old, attr)} but the "
                                      f"checkpoint's layer has {getattr(layer, attr)}")
    replaced = tuple(f"{name}." for name in built) + tuple(f"{b}." for b in bases)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(replaced)}
    for name, layer in built.items():
        expected.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    for bpath, base in bases.items():
        expected.update({f"{bpath}.{k}": v for k, v in base.state_dict().items()})
    _check_fits(expected, tensors, path, strict)
    for name, layer in built.items():
        set_submodule(model, name, layer)
    for bpath, base in bases.items():
        _set_base(model, bpath, base)
    _load_state(model, tensors, path, strict)
    return model


def _check_fits(expected: Dict[str, torch.Tensor], tensors: Dict[str, torch.Tensor], path, strict: bool) -> None:
    for key, t in tensors.items():
        if key in expected and (expected[key].shape != t.shape or expected[key].dtype != t.dtype):
            raise CheckpointError(f"{path}: tensor {key!r} is {tuple(t.shape)} {t.dtype} in the checkpoint but "
                                  f"{tuple(expected[key].shape)} {expected[key].dtype} in the model")
    if strict:
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path}: does not fit the model: missing {missing[:8]}, "
                                  f"unexpected {unexpected[:8]}")


def _load_state(module: nn.Module, tensors: Dict[str, torch.Tensor], path, strict: bool) -> None:
    _check_fits(module.state_dict(), tensors, path, strict)
    module.load_state_dict(tensors, strict=strict)
