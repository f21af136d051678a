"""Checkpoints of compressed models and groups: safetensors plus a JSON header.

The header (stored in the safetensors metadata under ``"fips_kernels"``)
records the format version, every FiPS layer (path, kind, format, meta, base,
activation epilogue, ``cast_input``), every shared base, fused gated MLPs,
tensors stored once for several names (tied weights), a SHA-256 of every
tensor's bytes, and a SHA-256 of the header itself (``header_sha256``), so an
edit of its meaning (a layer's kind, a format parameter, a version …) is
refused like damaged tensor bytes are. :func:`load` refuses a truncated,
altered or mismatched file with :class:`CheckpointError`; what it loads is
bit-exact.

Versions: 2 (this one) registers each base on its group's first layer
(``<layer>.shared_base.U``). Version 1 files (bases under ``fips_bases.<i>``,
on the first layer of an ``nn.Sequential``, or ``base`` in a group file; no
header checksum) still load: their keys are moved on reading and the result
is the same model. Saving always writes version 2.

Loading without the dense model: ``load(path, builder)`` calls ``builder()``
under :func:`fips_kernels.meta.empty_weights` (parameters on the meta device,
buffers real), and ``load(path, model)`` with a model whose parameters are on
the meta device assigns the checkpoint's tensors to it instead of copying, so
the peak memory is the checkpoint's tensors once. ``path`` may also be a
Hugging Face directory written by :func:`fips_kernels.save_pretrained`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .formats import AUX_NAMES, FormatError, SparseFactor
from .meta import empty_weights, has_meta, meta_tensors
from .modules import FiPSGatedMLP, FiPSGroup, FiPSLinear, SharedBase, bases_of, get_submodule, set_submodule

__all__ = ["save", "load", "CheckpointError", "FORMAT_VERSION", "read_header", "verify_file", "describe", "write",
           "install_empty", "validate_layers", "tie_aliases"]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_KEY = "fips_kernels"
HEADER_DIGEST = "header_sha256"
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(RuntimeError):
    """A checkpoint is damaged, of an unknown version, or does not fit the model."""


# safetensors' dtype names (the file's own table) -> torch
FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
_CHUNK = 1 << 24


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()  # hashes the tensor's memory in place (no copy)


def header_digest(header: dict) -> str:
    """SHA-256 of the header's canonical JSON, without its own digest."""
    body = {k: v for k, v in header.items() if k != HEADER_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _layer_record(layer: FiPSLinear, base_path: str, absorbs: Optional[str]) -> dict:
    rec = {"kind": layer.kind, "format": layer.format, "meta": list(layer.meta), "base": base_path,
           "in_features": layer.in_features, "out_features": layer.out_features,
           "bias": layer.bias is not None, "dtype": str(layer.V_values.dtype).replace("torch.", ""),
           "quantized": layer.factor.quantized}
    if layer.cast_input:
        rec["cast_input"] = True
    if layer.activation != "none":
        rec["activation"] = layer.activation
        if absorbs:
            rec["absorbs"] = absorbs
    return rec


def _absorbed(module: nn.Module, name: str, layer: FiPSLinear) -> Optional[str]:
    """The sibling module the layer's epilogue replaced (an ``nn.Identity`` now), if any."""
    from .fusion import ACTIVATION_PARENTS, _class_matches

    parent = get_submodule(module, _parent(name))
    leaf = name.rpartition(".")[2]
    for test, expand, act in ACTIVATION_PARENTS:
        if _class_matches(parent, test) and expand == leaf and isinstance(getattr(parent, act, None), nn.Identity):
            return act
    return None


def describe(module: nn.Module) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """The header and the tensors :func:`save` writes for ``module`` (a
    :class:`FiPSGroup`, a :class:`FiPSLinear` that owns its base, or a model
    with FiPS layers: its full ``state_dict``, tied tensors once)."""
    bases = bases_of(module)
    layers = {}
    for name, mod in module.named_modules():
        if isinstance(mod, FiPSLinear):
            if id(mod.base) not in bases:
                raise CheckpointError(f"save: the shared base of layer {name or '<root>'!r} is not registered "
                                      f"in the saved module; save its FiPSGroup or the model it was installed in")
            layers[name] = _layer_record(mod, bases[id(mod.base)], _absorbed(module, name, mod))
    gated = {name: list(mod.names) for name, mod in module.named_modules() if isinstance(mod, FiPSGatedMLP)}
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
        "gated": gated,
        "aliases": aliases,
        "sha256": {k: _digest(t) for k, t in tensors.items()},
    }
    header[HEADER_DIGEST] = header_digest(header)
    return header, tensors


def write(header: dict, tensors: Dict[str, torch.Tensor], path: PathLike) -> None:
    """Write ``tensors`` and ``header`` (from :func:`describe`) as one safetensors file,
    through a temporary name, so a crash never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        # "format": "pt" is what transformers and other safetensors readers expect of a PyTorch file
        save_file(tensors, tmp, metadata={HEADER_KEY: json.dumps(header, sort_keys=True), "format": "pt"})
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # safetensors creates 0600 files; a model directory is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(module: nn.Module, path: PathLike) -> dict:
    """Save a :class:`FiPSGroup`, a :class:`FiPSLinear` that owns its base, or a
    whole model containing FiPS layers (its full ``state_dict``) to ``path``.
    Returns the header written."""
    header, tensors = describe(module)
    write(header, tensors, path)
    return header


def read_header(path: PathLike) -> dict:
    """The checked header of a checkpoint (no tensors are read)."""
    return _read(_resolve(path)[0], tensors=False)[0]


def _resolve(path: PathLike) -> Tuple[str, Optional[str]]:
    """``(weights file, directory or None)``: a directory holds its weights in ``model.safetensors``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from .hf.directory import WEIGHTS_NAME

        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{path}: a directory without {WEIGHTS_NAME}; not a fips_kernels directory")
        return weights, path
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    return path, None


def _check_header(meta: dict, path: str) -> dict:
    """The fips_kernels header of a file's safetensors metadata, its version and SHA-256 checked."""
    if HEADER_KEY not in meta:
        raise CheckpointError(f"{path}: no fips_kernels header; not a fips_kernels checkpoint")
    try:
        header = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the fips_kernels header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the fips_kernels header is not a JSON object")
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported "
                              f"(this fips_kernels reads versions {READABLE_VERSIONS}; a newer file needs a newer "
                              f"fips_kernels)")
    if version == 1 and HEADER_DIGEST in header:  # version 1 had no header checksum: this one was edited
        raise CheckpointError(f"{path}: the fips_kernels header fails its SHA-256 check: a version-1 header "
                              f"with a checksum was edited")
    if version >= 2 and header.get(HEADER_DIGEST) != header_digest(header):
        raise CheckpointError(f"{path}: the fips_kernels header fails its SHA-256 check: the header was edited or "
                              f"damaged")
    return header


def _check_keys(header: dict, keys, path: str) -> None:
    sums = header.get("sha256", {})
    if set(sums) != set(keys):
        missing, extra = sorted(set(sums) - set(keys)), sorted(set(keys) - set(sums))
        raise CheckpointError(f"{path}: tensors do not match the header (missing {missing}, unexpected {extra})")
    for key, target in header.get("aliases", {}).items():
        if target not in sums:
            raise CheckpointError(f"{path}: alias {key!r} points at missing tensor {target!r}")


def _safe_open(path: str):
    from safetensors import safe_open

    try:  # pread copies each tensor once into its own memory; mmap would also keep the file's pages mapped
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:  # safetensors without the backend argument
        return safe_open(path, framework="pt")


def _read(path: str, tensors: bool = True):
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a .safetensors checkpoint")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with _safe_open(path) as f:
            meta = f.metadata() or {}
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (truncated or damaged?): "
                              f"{type(exc).__name__}: {exc}") from None
    header = _check_header(meta, path)
    if not tensors:
        return header, {}
    _check_keys(header, data, path)
    sums = header["sha256"]
    for key, t in data.items():
        if _digest(t) != sums[key]:
            raise CheckpointError(f"{path}: tensor {key!r} fails its SHA-256 check: the file is damaged")
    for key, target in header.get("aliases", {}).items():
        data[key] = data[target]
    if header["format_version"] == 1:
        header, data = _migrate_v1(header, data)
    return header, data


def verify_file(path: PathLike) -> Tuple[dict, Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]]:
    """Check a version-2 checkpoint without loading it: the header's SHA-256 and
    every tensor's, hashed from the file in 16 MiB chunks (memory: one chunk).

    Returns ``(header, {tensor name: (dtype, shape)})``. For loaders that read
    the tensors themselves (the Hugging Face quantizer): what they then read
    is what was checked, unless the file changes in between."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            table = json.loads(f.read(n))
            meta = table.pop("__metadata__", None) or {}
            entries = {k: (FILE_DTYPES[v["dtype"]], tuple(int(d) for d in v["shape"])) for k, v in table.items()}
            header = _check_header(meta, path)
            if header["format_version"] != FORMAT_VERSION:
                raise CheckpointError(f"{path}: a version-{header['format_version']} checkpoint; load it with "
                                      f"fips_kernels.load and save it again to convert it")
            _check_keys(header, table, path)
            for key, entry in table.items():
                begin, end = (8 + n + int(o) for o in entry["data_offsets"])
                if not 8 + n <= begin <= end <= size:
                    raise ValueError(f"tensor {key!r} lies outside the file (truncated?)")
                f.seek(begin)
                h = hashlib.sha256()
                while begin < end:
                    chunk = f.read(min(_CHUNK, end - begin))
                    h.update(chunk)
                    begin += len(chunk)
                if h.hexdigest() != header["sha256"][key]:
                    raise CheckpointError(f"{path}: tensor {key!r} fails its SHA-256 check: the file is damaged")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (truncated or damaged?): "
                              f"{type(exc).__name__}: {exc}") from None
    return header, entries


def _layer_order_key(name: str):
    """Module order of sibling paths: numeric parts by value ("blocks.10" after "blocks.2")."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _migrate_v1(header: dict, tensors: Dict[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Version 1 → 2: each base moves to ``<its first layer>.shared_base``."""
    moves: Dict[str, str] = {}
    for bpath in header.get("bases", {}):
        users = sorted((n for n, rec in header["layers"].items() if rec["base"] == bpath), key=_layer_order_key)
        if not users:
            raise CheckpointError(f"version-1 checkpoint: base {bpath!r} is used by no layer")
        moves[bpath] = _join(users[0], "shared_base")
    for rec in header["layers"].values():
        rec["base"] = moves[rec["base"]]
    header["bases"] = {moves[b]: v for b, v in header["bases"].items()}
    moved = {}
    for key, t in tensors.items():
        for old, new in moves.items():
            if key.startswith(old + "."):
                key = new + key[len(old):]
                break
        moved[key] = t
    return header, moved


def _build_layer(name: str, rec: dict, base: SharedBase, tensors: Dict[str, torch.Tensor], path,
                 validate: bool) -> FiPSLinear:
    prefix = f"{name}." if name else ""
    try:
        values = tensors[prefix + "V_values"]
        aux = [tensors[prefix + "V_" + a] for a in AUX_NAMES[rec["format"]]]
        scales = tensors[prefix + "V_scales"] if rec.get("quantized") else None
        factor = SparseFactor.from_parts(rec["format"], rec["meta"], values, aux, validate=validate, scales=scales)
        bias = tensors[prefix + "bias"] if rec["bias"] else None
        return FiPSLinear(base, factor, rec["kind"], bias, cast_input=bool(rec.get("cast_input", False)),
                          activation=rec.get("activation", "none"), own_base=rec["base"] == prefix + "shared_base")
    except KeyError as exc:
        raise CheckpointError(f"{path}: layer {name!r}: {exc} is missing from the checkpoint") from None
    except (FormatError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: layer {name!r}: invalid factor in the checkpoint: {exc}") from None


def _build(header: dict, tensors: Dict[str, torch.Tensor], path, validate: bool = True):
    """The bases and layers a header describes, checked (the factors' contents
    too unless ``validate`` is False: tensors on the meta device have none yet)."""
    bases: Dict[str, SharedBase] = {}
    for bpath, rec in header.get("bases", {}).items():
        key = f"{bpath}.U"
        if key not in tensors:
            raise CheckpointError(f"{path}: base tensor {key!r} is missing")
        quantized = rec.get("quantized", False)
        if quantized and f"{bpath}.U_scales" not in tensors:
            raise CheckpointError(f"{path}: base tensor {bpath + '.U_scales'!r} is missing")
        try:
            bases[bpath] = SharedBase(tensors[key], tensors[f"{bpath}.U_scales"] if quantized else None)
        except ValueError as exc:
            raise CheckpointError(f"{path}: invalid base {bpath!r}: {exc}") from None
    built = {}
    for name, rec in header.get("layers", {}).items():
        if rec.get("base") not in bases:
            raise CheckpointError(f"{path}: layer {name!r} refers to base {rec.get('base')!r}, which is not stored")
        built[name] = _build_layer(name, rec, bases[rec["base"]], tensors, path, validate)
    for bpath, base in bases.items():
        owner = bpath.rpartition(".")[0] if bpath.endswith("shared_base") else None
        if owner is None or owner not in built or built[owner].base is not base:
            raise CheckpointError(f"{path}: base {bpath!r} is not on one of its layers (a version-2 checkpoint "
                                  f"keeps each base on its group's first layer)")
    return bases, built


def load(path: PathLike, model: Union[nn.Module, Callable[[], nn.Module], None] = None, *,
         map_location: Union[str, torch.device] = "cpu", strict: bool = True,
         cpu_mode: Optional[str] = None) -> nn.Module:
    """Load a checkpoint written by :func:`save` (a ``.safetensors`` file) or
    :func:`fips_kernels.save_pretrained` (a directory).

    * ``model=None``: the checkpoint must hold a group or a single layer; it is
      rebuilt from the header alone and returned.
    * ``model`` an ``nn.Module`` (e.g. the dense architecture built from its
      config): the checkpoint's FiPS layers replace the modules at the same
      paths (with their fusions: activation epilogues, fused gated MLPs), every
      tensor is loaded (``strict`` as in ``load_state_dict``), and the model is
      returned. A model whose parameters are on the meta device (built under
      :func:`fips_kernels.empty_weights`) gets the checkpoint's tensors
      assigned, not copied: no memory for the dense model is ever used.
    * ``model`` a callable (e.g. ``lambda: BertModel(config)``): it is called
      under :func:`fips_kernels.empty_weights`, then loaded as above.

    ``cpu_mode``: ``"speed"`` or ``"compressed"`` (:mod:`fips_kernels.cpu`; None:
    ``FIPS_KERNELS_CPU_MODE`` or the default, applied on first use).

    Raises :class:`CheckpointError` for a damaged, truncated, edited,
    unknown-version or mismatched file; a refused load leaves ``model`` as it was.
    """
    if cpu_mode is None:
        return _load(path, model, map_location, strict)
    from . import cpu

    cpu.check_mode(cpu_mode)
    return cpu.set_mode(_load(path, model, map_location, strict), cpu_mode)


def _load(path, model, map_location, strict) -> nn.Module:
    file, directory = _resolve(path)
    if model is not None and not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"load: model must be an nn.Module or a callable that builds one, "
                            f"got {type(model).__name__}")
        with empty_weights():
            model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"load: the model builder returned {type(model).__name__}, not an nn.Module")
    header, tensors = _read(file)
    if directory is not None:
        from .hf.directory import check_directory

        check_directory(directory, header)
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    bases, built = _build(header, tensors, file)
    container = header.get("container")

    if model is None:
        if container == "group":
            if len(bases) != 1:
                raise CheckpointError(f"{file}: a group checkpoint must hold exactly one base")
            order = sorted(built, key=lambda n: int(n.split(".")[-1]))
            group = FiPSGroup(next(iter(bases.values())), [built[n] for n in order])
            _load_state(group, tensors, file, strict)
            return group
        if container == "layer":
            layer = built[""]
            _load_state(layer, tensors, file, strict)
            return layer
        raise CheckpointError(f"{file}: holds a whole model; pass the model to load it into "
                              f"(fips_kernels.load(path, model)) or a function that builds it")

    # Check everything before touching the model, so a refused checkpoint leaves it as it was.
    fusions = _plan(header, built, model, file)
    replaced = tuple(f"{name}." for name in built) + tuple(f"{act}." for act in fusions[0])
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(replaced)}
    for name, layer in built.items():
        expected.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    _check_fits(expected, tensors, file, strict)
    on_meta = has_meta(model)
    if on_meta:
        left = [n for n in meta_tensors(model) if n not in tensors and not n.startswith(replaced)]
        if left:
            raise CheckpointError(f"{file}: {left[:4]} of the model are on the meta device and not in the checkpoint "
                                  f"(non-persistent buffers?); build the model under fips_kernels.empty_weights() "
                                  f"(parameters on meta, buffers real) or pass a function that builds it")
    _install(model, built, fusions)
    if on_meta:
        _assign_state(model, tensors, header.get("aliases", {}), strict)
        if torch.device(map_location).type != "cpu":
            model.to(map_location)  # the buffers the builder made on the CPU
    else:
        _load_state(model, tensors, file, strict)
    return model


def _plan(header: dict, built: Dict[str, FiPSLinear], model: nn.Module, path):
    """Check that ``model`` has a module of the right shape for every built layer
    and the modules the header's fusions name; returns the fusions."""
    for name, layer in built.items():
        try:
            old = get_submodule(model, name)
        except AttributeError:
            raise CheckpointError(f"{path}: the model has no module {name!r} for a FiPS layer") from None
        for attr in ("in_features", "out_features"):
            if getattr(old, attr, getattr(layer, attr)) != getattr(layer, attr):
                raise CheckpointError(f"{path}: module {name!r} has {attr}={getattr(old, attr)} but the "
                                      f"checkpoint's layer has {getattr(layer, attr)}")
    return _fusions(header, model, path)


def _install(model: nn.Module, built: Dict[str, FiPSLinear], fusions) -> None:
    for name, layer in built.items():
        set_submodule(model, name, layer)
    _apply_fusions(model, fusions)


def install_empty(model: nn.Module, header: dict, specs: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]],
                  path) -> Dict[str, FiPSLinear]:
    """Put the FiPS layers (and fusions) a checked header describes into
    ``model``, with tensors on the meta device shaped by ``specs`` (name ->
    (dtype, shape)), for a loader that fills them afterwards (the Hugging Face
    quantizer). Their factors are validated once filled: :func:`validate_layers`."""
    tensors = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in specs.items()}
    _, built = _build(header, tensors, path, validate=False)
    _install(model, built, _plan(header, built, model, path))
    return built


def validate_layers(model: nn.Module, header: dict, path) -> None:
    """After a loader filled the layers :func:`install_empty` made: every FiPS
    tensor is real and every factor keeps its format's rules."""
    left = [n for n in meta_tensors(model) if n.startswith(tuple(f"{name}." for name in header["layers"]))]
    if left:
        raise CheckpointError(f"{path}: FiPS tensors {left[:4]} were not loaded")
    for name in header["layers"]:
        try:
            get_submodule(model, name).factor.validate()
        except (FormatError, ValueError) as exc:
            raise CheckpointError(f"{path}: layer {name!r}: invalid factor in the checkpoint: {exc}") from None


def _assign_state(model: nn.Module, tensors: Dict[str, torch.Tensor], aliases: Dict[str, str], strict: bool) -> None:
    """``load_state_dict(assign=True)``: the model's meta tensors become the
    checkpoint's tensors (no copy); tied names get the very same object back."""
    model.load_state_dict(tensors, strict=strict, assign=True)
    tie_aliases(model, aliases)


def tie_aliases(model: nn.Module, aliases: Dict[str, str]) -> None:
    """Make each tied name (``aliases``: name -> name stored) hold the stored
    name's very parameter or buffer again, as in the saved model."""
    for key, target in aliases.items():
        owner_path, _, leaf = key.rpartition(".")
        owner = get_submodule(model, owner_path)
        source_path, _, source_leaf = target.rpartition(".")
        source = get_submodule(model, source_path)
        if leaf in owner._parameters and source_leaf in source._parameters:
            owner._parameters[leaf] = source._parameters[source_leaf]
        elif leaf in owner._buffers and source_leaf in source._buffers:
            owner._buffers[leaf] = source._buffers[source_leaf]


def _fusions(header: dict, model: nn.Module, path) -> Tuple[List[str], Dict[str, List[str]]]:
    """(activation modules to replace by Identity, gated MLPs to wrap), checked against ``model``."""
    absorbed = []
    for name, rec in header.get("layers", {}).items():
        if rec.get("absorbs"):
            act = _join(_parent(name), rec["absorbs"])
            try:
                get_submodule(model, act)
            except AttributeError:
                raise CheckpointError(f"{path}: the model has no module {act!r} for layer {name!r}'s "
                                      f"activation epilogue") from None
            absorbed.append(act)
    gated = header.get("gated", {})
    for mlp, names in gated.items():
        try:
            parent = get_submodule(model, mlp)
        except AttributeError:
            raise CheckpointError(f"{path}: the model has no gated MLP {mlp!r}") from None
        if len(names) != 3 or not all(hasattr(parent, n) for n in names):
            raise CheckpointError(f"{path}: gated MLP {mlp!r} has no children {names}")
    return absorbed, gated


def _apply_fusions(model: nn.Module, fusions) -> None:
    absorbed, gated = fusions
    for act in absorbed:
        set_submodule(model, act, nn.Identity())
    for mlp, names in gated.items():
        parent = get_submodule(model, mlp)
        set_submodule(model, mlp, FiPSGatedMLP(*(getattr(parent, n) for n in names), names=tuple(names)))


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
