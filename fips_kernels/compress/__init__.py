"""FiPS compression of trained models: ``fips_kernels.compress(model, ...)``.

The paper's algorithm end to end (DESIGN §1): find the MLPs and blocks
(presets for timm ViT/DeiT/Swin, Hugging Face BERT-family, Llama and Gemma, or
a :class:`Preset` of module-name patterns), record the original blocks' inputs
and outputs on calibration data, and per group of blocks train one shared base
``U`` and sparse factors ``V_i`` from the SVD init so that every compressed
block reproduces the original block's output (AdamW, cosine decay, gradual
magnitude pruning or RigL), then pack the factors and put
:class:`~fips_kernels.FiPSLinear` layers in place. See ``docs/COMPRESS.md``.

This package is callable: ``fips_kernels.compress(model, ...)`` is
:func:`fips_kernels.compress.api.compress`. timm and transformers are only
imported by the functions that need them.

Modules: :mod:`.presets` (finding blocks and groups), :mod:`.calibration`
(batches, recording), :mod:`.schedule` (GMP, RigL), :mod:`.factors` (SVD init
in, packed layers out), :mod:`.train` (one group's optimisation),
:mod:`.report`, :mod:`.state` (resume), :mod:`.distributed` (torchrun),
:mod:`.api` (``compress``), :mod:`.command` (the CLI's model and data loading).
"""
import sys as _sys
import types as _types

from .api import compress
from .config import CompressConfig
from .calibration import (CalibrationError, as_batches, builtin_texts, image_folder_batches, read_text_file,
                          text_batches)
from .presets import PRESETS, GroupSpec, Preset, PresetError, Unit, find_preset, find_units, make_groups
from .report import CompressionReport, GroupReport
from .state import ResumeError

__all__ = ["compress", "CompressConfig", "Preset", "PRESETS", "PresetError", "find_preset", "find_units", "make_groups", "Unit",
           "GroupSpec", "CompressionReport", "GroupReport", "ResumeError", "CalibrationError", "as_batches",
           "text_batches", "read_text_file", "builtin_texts", "image_folder_batches"]


class _CallableModule(_types.ModuleType):
    """``fips_kernels.compress`` is both this package and the function."""

    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
