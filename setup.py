"""Build script for fips_kernels.

Project metadata lives in pyproject.toml; this file only adds the packages
and two optional compiled modules: the CPU kernels ``fips_kernels._cpu``
(csrc/cpu/*.cpp, the ``cpu`` backend, docs/CPU.md) and the CUDA extension
``fips_kernels._C`` (csrc/*.cpp + csrc/*.cu).

The CPU kernels are built whenever torch is importable and a C++ compiler
(``CXX``, else ``c++``) is on PATH; without them the ``cpu`` backend runs only dense factors and
bitmap layers fall back to the reference backend.

The extension is built only when torch is importable, torch is a CUDA build
(``torch.version.cuda`` is set) and a CUDA toolkit with ``bin/nvcc`` is found
(``CUDA_HOME``, ``CUDA_PATH``, else ``/usr/local/cuda``). Otherwise, or with
``FIPS_KERNELS_SKIP_CUDA_BUILD=1``, a pure-Python package is installed and a
line saying why is printed. torch must be installed beforehand:

    pip install --no-build-isolation -e .

Environment:
    FIPS_KERNELS_SKIP_CPU_BUILD=1    do not build the CPU kernels
    FIPS_KERNELS_SKIP_CUDA_BUILD=1   do not build the extension
    FIPS_KERNELS_DEBUG_BUILD=1       -g -O0 host code, -G device code
    TORCH_CUDA_ARCH_LIST             default "8.0;9.0"
    MAX_JOBS                         parallel compile jobs, default: all cores
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "fips_kernels._C"
CPU_EXT_NAME = "fips_kernels._cpu"
DEFAULT_ARCH_LIST = "8.0;9.0"


def _say(msg):
    print(f"fips_kernels setup.py: {msg}", file=sys.stderr, flush=True)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _has_nvcc(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc"))


def _find_cuda_home():
    """Returns (toolkit dir or None, list of places looked at)."""
    tried = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path:
            if _has_nvcc(path):
                return path, tried
            tried.append(f"{var}={path} (no bin/nvcc)")
    if _has_nvcc("/usr/local/cuda"):
        return "/usr/local/cuda", tried
    tried.append("/usr/local/cuda (no bin/nvcc)")
    return None, tried


def _num_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _limited_api(cpp_extension):
    """(py_limited_api, bdist_wheel tag, extra define) for this torch.

    torch >= 2.6 adds -DPy_LIMITED_API=<its minimum CPython> itself when an
    extension has py_limited_api=True; older torch does not, so we add the
    define (CPython 3.9, as pytorch/extension-cpp does).
    """
    torch_min = getattr(cpp_extension, "min_supported_cpython", None)
    if torch_min:
        version = int(torch_min, 16)
        tag = f"cp{(version >> 24) & 0xFF}{(version >> 16) & 0xFF}"
        return True, tag, None
    return True, "cp39", "-DPy_LIMITED_API=0x03090000"


def _skip(reason):
    _say(f"not building the CUDA extension {EXT_NAME}: {reason}. "
         "fips_kernels will use its Triton, CPU and reference backends only.")
    return None


def _sources(folder, patterns):
    return sorted(os.path.relpath(p, ROOT) for pattern in patterns for p in glob.glob(os.path.join(ROOT, folder,
                                                                                                   pattern)))


def _cpu_extension(cpp_extension, cxx_flags, limited_api):
    """The CPU kernels (a CppExtension: no CUDA toolkit needed), or None."""
    if _env_flag("FIPS_KERNELS_SKIP_CPU_BUILD"):
        _say(f"not building the CPU kernels {CPU_EXT_NAME}: FIPS_KERNELS_SKIP_CPU_BUILD is set")
        return None
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler.split()[0]) is None:
        _say(f"not building the CPU kernels {CPU_EXT_NAME}: no C++ compiler ({compiler!r} is not on PATH; set CXX). "
             "Bitmap layers in the CPU's compressed mode will run on the reference backend.")
        return None
    import torch

    _say(f"building {CPU_EXT_NAME} (csrc/cpu) for torch {torch.__version__}")
    return cpp_extension.CppExtension(
        name=CPU_EXT_NAME,
        sources=_sources("csrc/cpu", ("*.cpp",)),
        depends=_sources("csrc/cpu", ("*.h",)),
        extra_compile_args={"cxx": list(cxx_flags)},
        py_limited_api=limited_api,
    )


def _cuda_extension(cxx_flags, nvcc_flags, limited_api, cuda_home, tried):
    from torch.utils.cpp_extension import CUDAExtension
    import torch

    if tried:
        _say("ignored " + ", ".join(tried))
    _say(f"building {EXT_NAME} with CUDA toolkit {cuda_home} for torch "
         f"{torch.__version__} (CUDA {torch.version.cuda}), "
         f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
         f"MAX_JOBS={os.environ['MAX_JOBS']}, py_limited_api={limited_api}")
    return CUDAExtension(
        name=EXT_NAME,
        sources=_sources("csrc", ("*.cpp", "*.cu")),
        depends=_sources("csrc", ("*.h",)),
        extra_compile_args={"cxx": list(cxx_flags), "nvcc": nvcc_flags},
        py_limited_api=limited_api,
    )


def _cuda_toolkit():
    """(toolkit dir, places tried) when the CUDA extension should be built, else None (says why)."""
    if _env_flag("FIPS_KERNELS_SKIP_CUDA_BUILD"):
        return _skip("FIPS_KERNELS_SKIP_CUDA_BUILD is set")
    import torch

    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)")
    cuda_home, tried = _find_cuda_home()
    if cuda_home is None:
        return _skip("no CUDA toolkit found (looked at: " + ", ".join(tried)
                     + "); set CUDA_HOME to a toolkit with bin/nvcc")
    return cuda_home, tried


def get_extensions():
    """Returns (ext_modules, cmdclass, options)."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        _say(f"not building {CPU_EXT_NAME} nor {EXT_NAME}: torch is not importable ({exc}); install torch "
             "first and use `pip install --no-build-isolation`")
        return [], {}, {}

    cuda = _cuda_toolkit()
    if cuda is not None:
        # Must happen before torch.utils.cpp_extension is imported: it resolves
        # CUDA_HOME and reads the arch list at import / build time.
        os.environ["CUDA_HOME"] = cuda[0]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", str(_num_cores()))

    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension

    debug = _env_flag("FIPS_KERNELS_DEBUG_BUILD")
    # No -std flag: torch adds the standard its headers need (C++17 up to
    # torch 2.9, C++20 from 2.10; an explicit -std=c++17 breaks torch >= 2.10).
    # No --use_fast_math / -ffast-math: results must match the reference exactly enough.
    cxx_flags = ["-g", "-O0"] if debug else ["-O3"]
    nvcc_flags = ["-g", "-G", "-O0"] if debug else ["-O3", "-lineinfo"]
    limited_api, abi_tag, define = _limited_api(cpp_extension)
    if define:
        cxx_flags.append(define)

    exts = [e for e in (_cpu_extension(cpp_extension, cxx_flags, limited_api),
                        _cuda_extension(cxx_flags, nvcc_flags, limited_api, *cuda) if cuda else None) if e]
    if not exts:
        return [], {}, {}
    options = {"bdist_wheel": {"py_limited_api": abi_tag}} if limited_api else {}
    return exts, {"build_ext": BuildExtension}, options


ext_modules, cmdclass, options = get_extensions()

setup(
    packages=find_packages(include=["fips_kernels", "fips_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
)
