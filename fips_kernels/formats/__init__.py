"""Sparse-factor formats: one module per format, each registering a
:class:`~.base.Format` (pack, exact unpack, gather, validate, pattern, a typed
parameter record); :mod:`.quant` is the int8/int4 grid; :mod:`.factor` holds
:class:`SparseFactor` and its :class:`Layout`; :mod:`.patterns` maps the
patterns users name to formats. Exact byte layouts: docs/FORMATS.md.

Adding a format: a module here that calls :func:`~.base.register`, one import
line below, and its tests (docs/CONTRIBUTING.md).
"""
from .base import Format, FormatError, NoParams, Params, get, names, register
# the formats, in the order messages list them (importing a module registers it)
from . import dense, nm, bitmap, csr, ell  # noqa: E402,F401
from . import quant
from .bitmap import DEFAULT_TILE, BitmapParams
from .ell import EllParams
from .factor import VALUE_DTYPES, Layout, SparseFactor, gather_values, unpack
from .nm import NMParams, nm_bits
from .patterns import PATTERN_FORMATS, Pattern, default_format, nm_sparsity, parse_pattern
from .quant import QBITS, Quant, qmax, scale_matrix

FORMATS = names()
QUANT_FORMATS = tuple(n for n in FORMATS if get(n).quantizable)
# tensor names each format stores besides ``values``, in the order the ops take them
AUX_NAMES = {n: get(n).aux for n in FORMATS}

# the int8 storage helpers under their historical names
decode_q = quant.decode
encode_q = quant.encode

__all__ = [
    "AUX_NAMES", "DEFAULT_TILE", "FORMATS", "QBITS", "QUANT_FORMATS", "VALUE_DTYPES",
    "BitmapParams", "EllParams", "Format", "FormatError", "Layout", "NMParams", "NoParams", "Params", "Pattern",
    "PATTERN_FORMATS", "Quant", "SparseFactor",
    "decode_q", "default_format", "encode_q", "gather_values", "get", "names", "nm_bits", "nm_sparsity",
    "parse_pattern", "qmax", "quant", "register", "scale_matrix", "unpack",
]
