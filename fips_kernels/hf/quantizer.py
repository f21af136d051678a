"""The transformers quantizer of FiPS directories (``quant_method: "fips"``).

Imported only once transformers has loaded its quantizer registry
(:mod:`.hook`). ``from_pretrained(DIR)`` on a directory of
:func:`fips_kernels.save_pretrained` then runs:

1. ``_process_model_before_weight_loading`` — the model exists on the meta
   device. The weights file is checked without loading it
   (:func:`fips_kernels.io.verify_file`: header and every tensor's SHA-256),
   ``config.json``'s quantization_config is checked against that header, and the
   FiPS layers (meta tensors shaped by the config) replace the dense MLP
   modules, with their fusions. The dense MLP weights never exist.
2. transformers loads every tensor of ``model.safetensors`` by name into
   the model — the FiPS tensors in their stored dtype (:meth:`get_new_dtype`).
3. ``_process_model_after_weight_loading`` — every FiPS tensor is real and
   of its recorded dtype and shape, and every factor keeps its format's rules.
"""
from __future__ import annotations

import logging
import os

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import io
from ..io import CheckpointError
from ..modules import get_submodule
from . import directory as fmt

__all__ = ["FiPSConfig", "FiPSHfQuantizer", "register"]

log = logging.getLogger(__name__)


class FiPSConfig(QuantizationConfigMixin):
    """``config.json``'s quantization_config of a FiPS directory (fields:
    :func:`fips_kernels.hf.directory.quantization_config`). It describes a saved
    model; it cannot ask ``from_pretrained`` to compress a dense one."""

    def __init__(self, quant_method: str = fmt.QUANT_METHOD, config_version: int = fmt.CONFIG_VERSION, **fields):
        self.quant_method = quant_method
        self.config_version = config_version
        for key, value in fields.items():
            setattr(self, key, value)


class FiPSHfQuantizer(HfQuantizer):
    """Puts FiPS layers into a model built on the meta device, then checks what
    transformers loaded into them (module docstring)."""

    requires_calibration = True  # a FiPS directory is compressed already; nothing is compressed at load

    def __init__(self, quantization_config, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise ValueError("fips: from_pretrained loads FiPS directories; it cannot compress a dense model. "
                             "Compress with `fips-kernels compress` or fips_kernels.compress, then "
                             "fips_kernels.save_pretrained")
        super().__init__(quantization_config, **kwargs)
        self._header = None
        self._path = None
        self._specs = {}
        self._prefix = ""

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
            raise ValueError("fips: a FiPS group's layers share one base, so the model loads on one device; load it "
                             "without a multi-device device_map")

    def update_dtype(self, dtype):
        return dtype

    update_torch_dtype = update_dtype  # the name in transformers 4

    def _weights_file(self, model, checkpoint_files) -> str:
        if checkpoint_files is None:  # transformers 4 does not pass the files: a local directory only
            checkpoint_files = [os.path.join(getattr(model.config, "_name_or_path", "") or "", fmt.WEIGHTS_NAME)]
        files = [f for f in checkpoint_files if f.endswith(".safetensors")]
        if len(files) != 1 or not os.path.isfile(files[0]):
            raise CheckpointError(f"fips: a FiPS directory has exactly one weights file, {fmt.WEIGHTS_NAME}; "
                                  f"got {list(checkpoint_files)}")
        return files[0]

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        path = self._weights_file(model, checkpoint_files)
        header, entries = io.verify_file(path)
        qc = self.quantization_config.to_dict()
        fmt.check_binding(qc, header, path)
        specs = fmt.tensor_specs(qc, entries, path)
        target, local, prefix = _install_target(model, header)
        if local is not header:  # paths cut to the base model: so are the tensor names
            cut = len(next(iter(header["layers"]))) - len(next(iter(local["layers"])))
            specs = {k[cut:]: v for k, v in specs.items()}
        io.install_empty(target, local, specs, path)
        self._header, self._path = local, path
        self._specs = {prefix + k: v for k, v in specs.items()}
        self._prefix = prefix
        return model

    def get_new_dtype(self, converter, param, dtype):
        # FiPS tensors keep their stored dtype (int8 values, fp16 factors in an fp32 model ...): the
        # checksummed bytes are what the kernels run on
        targets = getattr(converter, "_original_target_patterns", None) or getattr(converter, "target_patterns", ())
        if any(t in self._specs for t in targets):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        target = get_submodule(model, self._prefix[:-1]) if self._prefix else model
        io.validate_layers(target, self._header, self._path)
        state = model.state_dict()
        for key, (dtype, shape) in self._specs.items():
            t = state.get(key)
            if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                raise CheckpointError(f"{self._path}: FiPS tensor {key!r} loaded as "
                                      f"{None if t is None else (t.dtype, tuple(t.shape))}, stored as {(dtype, shape)}")
        io.tie_aliases(target, self._header.get("aliases", {}))
        _match_model_dtype(target, self._header)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        log.warning("fips: save a FiPS model with fips_kernels.save_pretrained(model, DIR), which writes the "
                    "checksummed header and the quantization_config the loader needs")
        return False

    @property
    def is_trainable(self) -> bool:
        return True  # float factors, bases and biases are parameters with autograd through the custom ops

    @property
    def is_compileable(self) -> bool:
        return True  # torch.library custom ops with fake implementations


def _match_model_dtype(model, header) -> None:
    """``from_pretrained(..., dtype=...)`` casts the other weights, never the FiPS tensors
    (their stored bytes are what was checked): a layer whose factors are in another
    dtype than the model then casts its input to its own dtype and its output back."""
    dtype = next((p.dtype for n, p in model.named_parameters() if p.is_floating_point()
                  and not n.startswith(tuple(f"{name}." for name in header["layers"]))), None)
    for name in header["layers"]:
        layer = get_submodule(model, name)
        if dtype is not None and layer.compute_dtype != dtype and not layer.cast_input:
            layer.cast_input = True


def _install_target(model, header):
    """(module to install into, the header with paths relative to it, prefix of that
    module in ``model``). The directory may have been saved from the base model and
    be loaded into a task model (``BertModel`` -> ``BertForSequenceClassification``:
    the base model's paths under ``bert.``) or the other way round (a
    ``LlamaForCausalLM`` directory loaded by ``AutoModel`` as a ``LlamaModel``:
    ``model.`` cut off), as transformers allows for the weights."""
    first = next(iter(header["layers"]))
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if _has(model, first):
        return model, header, ""
    if isinstance(base, torch.nn.Module) and _has(base, first):
        return base, header, prefix + "."
    if prefix and base is None and all(n.startswith(prefix + ".") for n in header["layers"]) \
            and _has(model, first[len(prefix) + 1:]):
        return model, _strip(header, prefix + "."), ""
    raise CheckpointError(f"fips: the model {type(model).__name__} has no module {first!r} for a FiPS layer: the "
                          f"directory holds another architecture")


def _has(model, path: str) -> bool:
    try:
        get_submodule(model, path)
        return True
    except AttributeError:
        return False


def _strip(header: dict, prefix: str) -> dict:
    """``header`` with ``prefix`` cut off every path (tied names outside it dropped)."""
    def cut(name: str) -> str:
        return name[len(prefix):]

    out = dict(header)
    out["layers"] = {cut(n): dict(rec, base=cut(rec["base"])) for n, rec in header["layers"].items()}
    out["bases"] = {cut(b): rec for b, rec in header["bases"].items()}
    out["gated"] = {cut(m): names for m, names in header["gated"].items()}
    out["aliases"] = {cut(k): cut(v) for k, v in header.get("aliases", {}).items()
                      if k.startswith(prefix) and v.startswith(prefix)}
    return out


def register(auto) -> None:
    """Register the config and the quantizer under ``"fips"`` in transformers'
    registry module ``auto`` (``transformers.quantizers.auto``)."""
    if fmt.QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(fmt.QUANT_METHOD)(FiPSConfig)
    if fmt.QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(fmt.QUANT_METHOD)(FiPSHfQuantizer)
