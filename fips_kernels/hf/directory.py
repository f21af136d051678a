"""Hugging Face model directories of FiPS-compressed models.

A directory written by :func:`save_pretrained` holds

* ``model.safetensors`` — every tensor of the model once (factors, bases and
  all other weights), written by :func:`fips_kernels.io.write`: the same file
  as a ``.safetensors`` checkpoint, with its header and SHA-256 checksums;
* ``config.json`` — the model's own config (a transformers config, or timm's
  ``architecture`` / ``model_args`` / ``pretrained_cfg``) plus a
  ``quantization_config`` with ``quant_method: "fips"`` (:func:`quantization_config`):
  everything needed to build the FiPS layers on the meta device, tied to the
  weights by the header's SHA-256;
* the source model's tokenizer files and, for a sentence-transformers model,
  its module files (``modules.json``, ``sentence_bert_config.json``,
  ``1_Pooling/`` …), copied by :func:`copy_companions`.

``AutoModel.from_pretrained(DIR)`` (after ``import fips_kernels``, which
registers the quantizer of :mod:`.quantizer`), ``SentenceTransformer(DIR)``,
:func:`from_pretrained` (also for timm models) and ``fips_kernels.load(DIR,
builder)`` read it. Format reference: docs/HF.md.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .. import io
from ..io import CheckpointError

__all__ = ["save_pretrained", "from_pretrained", "quantization_config", "check_binding", "check_directory",
           "is_fips_directory",
           "tensor_specs", "copy_companions", "read_config", "WEIGHTS_NAME", "CONFIG_NAME", "QUANT_METHOD",
           "CONFIG_VERSION"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
QUANT_METHOD = "fips"
# Version of the quantization_config's layout: a reader refuses a newer one (it may mean something it cannot build).
CONFIG_VERSION = 1

# Files of the source directory that describe or hold its dense weights: not copied.
_DENSE_FILES = ("config.json", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "rust_model.ot",
                "model.onnx", "README.md")
_DENSE_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".h5", ".msgpack", ".ot",
                   ".onnx", ".pt", ".pth", ".ckpt")


def _version() -> str:
    from .. import __version__

    return __version__


def _bits(dtype_name: str) -> int:
    dtype = getattr(torch, dtype_name)
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def _layer_keys(header: dict):
    return tuple(f"{name}." for name in header["layers"])


def quantization_config(header: dict, tensors: Dict[str, torch.Tensor]) -> dict:
    """The ``quantization_config`` of a model whose checkpoint is ``(header, tensors)``
    (:func:`fips_kernels.io.describe`): the header's layer, base and gated-MLP
    records, a summary by group, and the dtype and shape of every FiPS tensor."""
    layers = header["layers"]
    if not layers:
        raise ValueError("save_pretrained: the model has no FiPS layers (compress it first)")
    prefixes = _layer_keys(header)
    groups = []
    for bpath, brec in header["bases"].items():
        members = [n for n, rec in layers.items() if rec["base"] == bpath]
        factor_bits = sorted({rec["meta"][4] if rec.get("quantized") else _bits(rec["dtype"])
                              for rec in (layers[n] for n in members)})
        base_dtype = str(tensors[f"{bpath}.U_scales" if brec["quantized"] else f"{bpath}.U"].dtype)
        groups.append({"base": bpath, "d": brec["d"], "rank": brec["rank"], "layers": members,
                       "formats": sorted({layers[n]["format"] for n in members}), "factor_bits": factor_bits,
                       "base_bits": 8 if brec["quantized"] else _bits(base_dtype.replace("torch.", ""))})
    return {
        "quant_method": QUANT_METHOD,
        "config_version": CONFIG_VERSION,
        "fips_kernels_version": _version(),
        "checkpoint_format_version": header["format_version"],
        "weights": WEIGHTS_NAME,
        "header_sha256": header[io.HEADER_DIGEST],
        "formats": sorted({rec["format"] for rec in layers.values()}),
        "bits": {"factors": sorted({b for g in groups for b in g["factor_bits"]}),
                 "base": sorted({g["base_bits"] for g in groups})},
        "groups": groups,
        "layers": header["layers"],
        "bases": header["bases"],
        "gated": header["gated"],
        "tensors": {k: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                    for k, t in sorted(tensors.items()) if k.startswith(prefixes)},
    }


def check_config(qc: dict, where: str) -> None:
    """A ``quantization_config`` this fips_kernels can build (method, version, fields)."""
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: no quantization_config with quant_method {QUANT_METHOD!r}")
    version = qc.get("config_version")
    if not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        raise CheckpointError(f"{where}: quantization_config version {version!r} is not supported (this fips_kernels "
                              f"{_version()} reads versions 1 to {CONFIG_VERSION}; a newer one needs a newer "
                              f"fips_kernels)")
    missing = [k for k in ("header_sha256", "layers", "bases", "gated", "tensors") if k not in qc]
    if missing:
        raise CheckpointError(f"{where}: quantization_config lacks {missing}")


def check_binding(qc: dict, header: dict, where: str) -> None:
    """``config.json``'s quantization_config describes the checked header of the
    weights file (same header SHA-256, same layers, bases and gated MLPs)."""
    check_config(qc, where)
    if qc["header_sha256"] != header.get(io.HEADER_DIGEST):
        raise CheckpointError(f"{where}: config.json's quantization_config was written for another {WEIGHTS_NAME} "
                              f"(header_sha256 differs): the directory's files do not belong together")
    for key in ("layers", "bases", "gated"):
        if qc[key] != header.get(key):
            raise CheckpointError(f"{where}: config.json's quantization_config.{key} differs from the checksummed "
                                  f"header of {WEIGHTS_NAME}: config.json was edited")


def tensor_specs(qc: dict, entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]],
                 where: str) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of the FiPS tensors, from the config, checked
    against the weights file's own table ``entries`` (:func:`fips_kernels.io.verify_file`)."""
    specs = {}
    for key, rec in qc["tensors"].items():
        dtype, shape = getattr(torch, str(rec.get("dtype")), None), tuple(rec.get("shape", ()))
        if key not in entries or entries[key] != (dtype, shape):
            found = entries.get(key)
            raise CheckpointError(f"{where}: config.json gives FiPS tensor {key!r} as {rec}, but {WEIGHTS_NAME} "
                                  f"holds {'no such tensor' if found is None else found}")
        specs[key] = (dtype, shape)
    return specs


def read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not a Hugging Face model directory") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return cfg


def is_fips_directory(directory: str) -> bool:
    """Whether ``directory`` holds a model directory written by :func:`save_pretrained`."""
    try:
        qc = read_config(directory).get("quantization_config")
    except CheckpointError:
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def check_directory(directory: str, header: dict) -> None:
    """The directory's config.json belongs to the checked ``header`` of its weights."""
    check_binding(read_config(directory).get("quantization_config"), header, os.path.join(directory, CONFIG_NAME))


# ---------------------------------------------------------------- writing

def _model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _hf_config(model: nn.Module, qc: dict) -> Optional[dict]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(config, "model_type"):
        return None
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    dtype = _model_dtype(model)
    if dtype is not None:
        config.dtype = dtype  # what from_pretrained builds the non-FiPS layers in
    data = config.to_dict()
    data["quantization_config"] = qc
    return data


def _timm_config(model: nn.Module, qc: dict) -> Optional[dict]:
    if not type(model).__module__.startswith("timm.") or not hasattr(model, "pretrained_cfg"):
        return None
    import tempfile

    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:  # timm writes its config to a file only
        path = os.path.join(tmp, CONFIG_NAME)
        save_config_for_hf(model, path)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    data["quantization_config"] = qc
    return data


def copy_companions(source: str, directory: str) -> list:
    """Copy what a model directory holds besides its dense weights and config:
    tokenizer files and other top-level files, and the sub-directories a
    sentence-transformers ``modules.json`` names (e.g. ``1_Pooling``, ``2_Dense``).
    Weight files, ``config.json``, the model card (it describes the dense
    model) and exports (``onnx/``, ``openvino/``) are left out. Returns the
    names copied."""
    copied = []
    for name in sorted(os.listdir(source)):
        src = os.path.join(source, name)
        if os.path.isfile(src) and not name.startswith(".") and name not in _DENSE_FILES \
                and not name.endswith(_DENSE_SUFFIXES):
            shutil.copy2(src, os.path.join(directory, name))
            copied.append(name)
    modules = os.path.join(source, "modules.json")
    if os.path.isfile(modules):
        with open(modules, encoding="utf-8") as f:
            entries = json.load(f)
        for entry in entries:
            sub = entry.get("path") or ""
            src = os.path.join(source, sub)
            if sub and os.path.isdir(src):
                shutil.copytree(src, os.path.join(directory, sub), dirs_exist_ok=True)
                copied.append(sub + "/")
    return copied


def save_pretrained(model: nn.Module, directory, *, tokenizer=None, source: Optional[str] = None) -> dict:
    """Write ``model`` (with FiPS layers installed) as a Hugging Face directory.

    Args:
        model: a transformers model (config.json: its config), a timm model
            (timm's config.json: ``architecture``, ``model_args``,
            ``pretrained_cfg``), or any other module (config.json holds the
            quantization_config only; load it with ``fips_kernels.load(DIR, builder)``).
        directory: created if needed; files of the same names are replaced.
        tokenizer: saved into the directory (``tokenizer.save_pretrained``).
        source: the original model's directory: its tokenizer files and
            sentence-transformers module files are copied (:func:`copy_companions`).

    Returns the ``quantization_config`` written.
    """
    directory = os.fspath(directory)
    if source is not None and not os.path.isdir(source):
        raise ValueError(f"save_pretrained: source {source!r} is not a directory")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_pretrained: {directory!r} exists and is not a directory")
    header, tensors = io.describe(model)
    qc = quantization_config(header, tensors)
    config = _hf_config(model, qc) or _timm_config(model, qc) or {"quantization_config": qc}
    os.makedirs(directory, exist_ok=True)
    if source is not None:
        copy_companions(source, directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    io.write(header, tensors, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return qc


# ---------------------------------------------------------------- reading

def from_pretrained(directory, *, cpu_mode: Optional[str] = None, **kwargs) -> nn.Module:
    """Load a directory written by :func:`save_pretrained`, without the dense model.

    A transformers model loads through its class's ``from_pretrained`` (the
    class in ``architectures``; ``kwargs`` are passed on) and the FiPS
    quantizer; a timm model is built by ``timm.create_model`` from the saved
    ``architecture`` and ``model_args`` (``kwargs`` added) with its parameters on
    the meta device, then filled by :func:`fips_kernels.load`. Returns the
    model in eval mode. ``cpu_mode``: as in :func:`fips_kernels.load`."""
    from .. import cpu

    if cpu_mode is not None:
        cpu.check_mode(cpu_mode)
        return cpu.set_mode(from_pretrained(directory, **kwargs), cpu_mode)
    directory = os.fspath(directory)
    cfg = read_config(directory)
    check_config(cfg.get("quantization_config"), os.path.join(directory, CONFIG_NAME))
    if "model_type" in cfg:
        import transformers

        arch = (cfg.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        return (cls or transformers.AutoModel).from_pretrained(directory, **kwargs).eval()
    if "architecture" in cfg:
        import timm

        def build():
            args = dict(cfg.get("model_args") or {}, **kwargs)
            args.setdefault("pretrained_cfg_overlay", cfg.get("pretrained_cfg"))  # the saved input size, mean, std
            return timm.create_model(cfg["architecture"], pretrained=False, **args)

        return io.load(directory, build).eval()
    raise CheckpointError(f"{directory}: config.json is neither a transformers nor a timm config; load it with "
                          f"fips_kernels.load({directory!r}, build_model)")
