import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # The Triton kernels run on CPU tensors under the interpreter; it must be on
    # before the kernels are first imported (fips_kernels imports them lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fips_kernels import dispatch  # noqa: E402

dispatch.backend_names()  # import the Triton kernels now, with the interpreter flag in place

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    torch.manual_seed(0)
    # Tests choose backends explicitly; a developer's shell setting must not leak in.
    monkeypatch.delenv("FIPS_KERNELS_BACKEND", raising=False)
    yield


@pytest.fixture
def one_thread_reference():
    """Whole-model tests: one thread (tiny ops run far faster on a shared CPU) and the
    reference backend (the kernels are tested elsewhere; the interpreter is slow)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with dispatch.use_backend("reference"):
        yield
    torch.set_num_threads(old)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def assert_close_to_truth(out, truth64, baseline, eps=1e-6):
    """flash-attention style: ``|out − truth| ≤ 2·|baseline − truth| + eps``,
    where ``baseline`` is the same computation done by plain PyTorch in the
    same dtype and ``truth64`` is fp64. Also ``out`` may not be NaN."""
    assert not torch.isnan(out).any(), "NaN in output"
    err = (out.double() - truth64).abs().max().item()
    base = (baseline.double() - truth64).abs().max().item()
    assert err <= 2 * base + eps, f"max error {err:.3e} > 2 × baseline error {base:.3e} + {eps:g}"


def run_csv_command(argv, cwd, columns, timeout=600):
    """Run a benchmark command line (``argv`` after the Python executable) in a clean
    environment (this checkout first on the path; no forced backend, no interpreter
    flag), check it succeeded, and return ``(CSV rows, stdout)`` of the file it wrote
    (the argument after ``--out``), whose header must be ``columns``."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("FIPS_KERNELS_BACKEND", "TRITON_INTERPRET"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(argv[list(argv).index("--out") + 1], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == tuple(columns)
        return list(reader), proc.stdout


def layer_case(kind, fmt, opts, qbits=None, base_bits=None, dtype=torch.float32, device="cpu", d=37, r=45, h=70,
               qgroup=16):
    """A random layer: ``(factor, base, bias)`` with the factor ``(r, h)`` for expand,
    ``(h, r)`` for contract (``ell`` lists along the rank axis), quantised to
    ``qbits`` and an int8 base (a quantised dense factor) when asked."""
    from fips_kernels.formats import SparseFactor

    K, N = (r, h) if kind == "expand" else (h, r)
    if fmt == "ell":
        opts = dict(opts, axis=0 if kind == "expand" else 1)
    factor, _ = make_factor(K, N, fmt, opts, dtype=dtype, device=device, density=0.35)
    if qbits:
        factor = factor.quantize(qbits, qgroup=qgroup)
    U = (torch.randn(d, r, device=device) / r ** 0.5).to(dtype)
    base = SparseFactor.pack(U, "dense", qbits=8, qgroup=d) if base_bits else U
    bias = torch.randn(h if kind == "expand" else d, device=device).to(dtype)
    return factor, base, bias


def check_layer(out, x, base, factor, kind, bias, activation="none"):
    """The one oracle for layer outputs: against fp64 truth computed from the same
    (dequantised) factor and base, no worse than twice plain PyTorch's own
    two-GEMM error in the same dtype, plus ``1e-5`` (fp32) / ``1e-3`` (16-bit)
    of the output's scale."""
    from fips_kernels import reference

    Ud, V = reference.base_matrix(base), reference.factor_matrix(factor, kind)
    truth = reference.fips_linear(x.double(), Ud.double(), V.double(), kind,
                                  None if bias is None else bias.double())
    truth = reference.activate(truth, activation)
    baseline = (x @ Ud) @ V if kind == "expand" else (x @ V.t()) @ Ud.t()
    if bias is not None:
        baseline = baseline + bias
    baseline = reference.activate(baseline.float(), activation).to(x.dtype)
    assert out.dtype == x.dtype and out.shape == truth.shape, (out.dtype, out.shape, truth.shape)
    eps = 1e-5 if x.dtype in (torch.float32, torch.float64) else 1e-3
    assert_close_to_truth(out, truth, baseline, eps=eps * max(truth.abs().max().item(), 1e-30))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()



def nm_mask(B, n, m):
    """Keep the n largest-magnitude entries of every group of m rows (axis 0)."""
    K, N = B.shape
    G = -(-K // m)
    padded = torch.nn.functional.pad(B.abs().float(), (0, 0, 0, G * m - K), value=-1.0).reshape(G, m, N)
    keep = torch.topk(padded, n, dim=1).indices
    mask = torch.zeros_like(padded, dtype=torch.bool).scatter_(1, keep, True)
    return mask.reshape(G * m, N)[:K]


def random_factor_dense(K, N, fmt, *, n=1, m=4, density=0.3, dtype=torch.float32, device="cpu", k=2, axis=0):
    """A random dense (K, N) tensor whose zeros follow ``fmt``'s pattern."""
    B = torch.randn(K, N, dtype=torch.float32, device=device)
    if fmt == "nm":
        B = B * nm_mask(B, n, m)
    elif fmt == "ell":
        L = B if axis == 0 else B.t()
        kk = min(k, L.shape[0])
        if kk > 0:
            keep = torch.topk(L.abs(), kk, dim=0).indices
            L = L * torch.zeros_like(L, dtype=torch.bool).scatter_(0, keep, True)
        B = L if axis == 0 else L.t()
    elif fmt in ("bitmap", "csr"):
        B = B * (torch.rand(K, N, device=device) < density)
    return B.to(dtype)


FORMAT_CASES = [
    ("dense", {}),
    ("nm", {"n": 1, "m": 4}),
    ("nm", {"n": 2, "m": 4}),
    ("nm", {"n": 2, "m": 8}),
    ("bitmap", {"tile": (16, 32)}),
    ("bitmap", {}),
    ("csr", {}),
    ("ell", {"k": 2, "axis": 0}),
    ("ell", {"k": 3, "axis": 1}),
]
FORMAT_IDS = ["dense", "nm1:4", "nm2:4", "nm2:8", "bitmap16x32", "bitmap64x64", "csr", "ell2col", "ell3row"]


def make_factor(K, N, fmt, opts, dtype=torch.float32, device="cpu", density=0.3):
    from fips_kernels.formats import SparseFactor

    dense = random_factor_dense(K, N, fmt, n=opts.get("n", 1), m=opts.get("m", 4), density=density,
                                dtype=dtype, device=device, k=opts.get("k", 2), axis=opts.get("axis", 0))
    if fmt == "ell":  # k cannot exceed the list length of a small factor
        opts = dict(opts, k=max(1, min(opts["k"], (K, N)[opts["axis"]])))
    return SparseFactor.pack(dense, fmt, **opts), dense


class CallStopped(Exception):
    """Raised by :func:`stop_and_record`'s stand-in once it has recorded its call."""


def stop_and_record(seen: dict):
    """A stand-in for a long call (``compress``, a model loader): records its keyword arguments in
    ``seen`` (its positional ones under ``"args"``) and raises :class:`CallStopped`, so a test checks
    what a command would hand the call without running it."""
    def stand_in(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise CallStopped

    return stand_in
