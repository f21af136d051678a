"""Hugging Face integration: model directories (:mod:`.directory`) and the
transformers quantizer that loads them (:mod:`.quantizer`, registered when
transformers loads its quantizer registry: :func:`install`).

::

    fips_kernels.save_pretrained(model, "minilm-fips", source=original_dir)
    model = transformers.AutoModel.from_pretrained("minilm-fips")   # after `import fips_kernels`
    model = fips_kernels.from_pretrained("vit-fips")                  # timm models too
"""
from __future__ import annotations

import logging

from .directory import from_pretrained, save_pretrained
from .hook import after_import

__all__ = ["save_pretrained", "from_pretrained", "install"]

REGISTRY = "transformers.quantizers.auto"


def _register(auto) -> None:
    # Runs inside transformers' own import: a failure here must never break transformers.
    try:
        from .quantizer import register

        register(auto)
    except Exception as exc:  # an unforeseen transformers version
        logging.getLogger(__name__).warning("fips_kernels: could not register the 'fips' quantizer with "
                                            "transformers (%s: %s); FiPS directories load with "
                                            "fips_kernels.load(DIR, builder)", type(exc).__name__, exc)


def install() -> None:
    """Register the FiPS quantizer with transformers now if its registry is
    loaded, else as soon as it is (importing transformers here would cost seconds)."""
    after_import(REGISTRY, _register)
