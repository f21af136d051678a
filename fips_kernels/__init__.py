"""fips_kernels: compressed linear layers for transformer MLPs.

FiPS (a dense base ``U`` shared across layers times per-layer sparse factors
``V_i``) as drop-in ``nn.Linear`` replacements, with a pure-PyTorch reference
path, Triton and CUDA backends chosen by :mod:`fips_kernels.dispatch`, and
safetensors checkpoints.

Importing never fails because of the compiled modules: a missing or broken
``fips_kernels._C`` (CUDA) or ``fips_kernels._cpu`` (CPU kernels) is logged
once and the backend that needs it reports why it cannot run. On CPU tensors
FiPS layers follow :mod:`fips_kernels.cpu`'s modes (speed or compressed).
"""
from . import _extension

_extension.load()

from . import cpu, dispatch, reference  # noqa: E402
from .dispatch import BackendUnavailable, use_backend  # noqa: E402
from .formats import FormatError, SparseFactor  # noqa: E402
from .io import CheckpointError, load, save  # noqa: E402
from .meta import empty_weights  # noqa: E402
from . import hf  # noqa: E402  (never imports transformers: the quantizer registers when transformers loads it)
from .hf import from_pretrained, save_pretrained  # noqa: E402
from .modules import FiPSGatedMLP, FiPSGroup, FiPSLinear, SharedBase, install, prepare  # noqa: E402
from .budget import rank_for_budget  # noqa: E402
from .factorize import factorize_group  # noqa: E402
from .ops import fips_linear, gate_up, reconstruct  # noqa: E402
from . import pgd  # noqa: E402
from . import hashed  # noqa: E402  (registers the fips_kernels::hashed_* ops; never imports triton)
from .hashed import HashedEmbedding, HashedLinear, HashedMemory, scale_gradients  # noqa: E402
from . import compress  # noqa: E402  (callable: fips_kernels.compress(model, ...); timm/transformers load lazily)

__version__ = "0.1.0"

hf.install()  # `import fips_kernels` makes AutoModel.from_pretrained(DIR) load FiPS directories

__all__ = [
    "cpu",
    "BackendUnavailable",
    "HashedEmbedding",
    "HashedLinear",
    "HashedMemory",
    "gate_up",
    "hashed",
    "pgd",
    "scale_gradients",
    "CheckpointError",
    "FiPSGatedMLP",
    "FiPSGroup",
    "FiPSLinear",
    "FormatError",
    "SharedBase",
    "SparseFactor",
    "dispatch",
    "empty_weights",
    "from_pretrained",
    "save_pretrained",
    "factorize_group",
    "fips_linear",
    "install",
    "load",
    "prepare",
    "rank_for_budget",
    "reconstruct",
    "reference",
    "save",
    "use_backend",
]
