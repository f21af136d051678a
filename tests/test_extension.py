"""Tests of the compiled extension fips_kernels._C (torch.ops.fips_kernels_cuda).

On CPU (CI): the extension loads, the CPU implementation of reconstruct_nm
(which uses the same decode helpers, csrc/nm_decode.h, as the CUDA kernel)
matches a dense reference, bad input raises readable errors, opcheck passes.
On a GPU: the CUDA implementation matches the CPU one and is graph-capturable.

Set FIPS_KERNELS_REQUIRE_EXTENSION=1 to turn "extension unavailable" into a
failure instead of a skip (CI does, so a silently skipped build fails CI).
"""

import importlib.util
import logging
import os
import types

import pytest
import torch

from fips_kernels import _extension

REQUIRE_EXTENSION = os.environ.get("FIPS_KERNELS_REQUIRE_EXTENSION", "") == "1"
HAS_EXTENSION = _extension.available()

# When the extension is unavailable, everything but test_extension_available
# skips; that one test fails instead under FIPS_KERNELS_REQUIRE_EXTENSION=1.
needs_extension = pytest.mark.skipif(
    not HAS_EXTENSION,
    reason=f"fips_kernels._C unavailable: {_extension.error()}",
)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_gpu(test):
    """The op on CUDA tensors: needs the extension and a GPU (and is marked gpu)."""
    return needs_extension(needs_gpu(pytest.mark.gpu(test)))

NM_PATTERNS = [(1, 4), (2, 4), (2, 8), (1, 2), (4, 16), (3, 8), (1, 16), (16, 16), (2, 2)]
NM_IDS = [f"{n}:{m}" for n, m in NM_PATTERNS]
BITS = {2: 1, 4: 2, 8: 4, 16: 4}


def _op():
    return torch.ops.fips_kernels_cuda.reconstruct_nm


# --------------------------------------------------------------------------
# A private packer written from docs/FORMATS.md, deliberately naive (loops),
# independent of fips_kernels.formats; cross-checked against it below.
# --------------------------------------------------------------------------

def _encode_positions(pos, m):
    """(G·n, N) int64 in-group positions -> (ceil(G·n/P), N) int32 words."""
    b = BITS[m]
    P = 32 // b
    rows, N = pos.shape
    words = torch.zeros(-(-rows // P), N, dtype=torch.int64)
    for j in range(rows):
        words[j // P] |= pos[j].to(torch.int64) << ((j % P) * b)
    words = torch.where(words >= 2**31, words - 2**32, words)  # same bits as int32
    return words.to(torch.int32)


def _pack_nm_private(B, n, m):
    """Returns (values (G·n, N), indices int32) of the dense (K, N) tensor B."""
    K, N = B.shape
    G = -(-K // m)
    values = torch.zeros(G * n, N, dtype=B.dtype)
    pos = torch.zeros(G * n, N, dtype=torch.int64)
    for g in range(G):
        for c in range(N):
            rows = range(g * m, g * m + m)
            nz = [r - g * m for r in rows if r < K and B[r, c] != 0]
            assert len(nz) <= n, "B breaks the n:m pattern"
            free = [q for q in range(m) if q not in nz]
            kept = sorted(nz + free[: n - len(nz)])  # explicit zeros at lowest free slots
            for t, q in enumerate(kept):
                pos[g * n + t, c] = q
                r = g * m + q
                values[g * n + t, c] = B[r, c] if r < K else 0
    return values, _encode_positions(pos, m)


def _random_nm_dense(K, N, n, m, dtype=torch.float32, drop=0.2):
    """Random (K, N) tensor with at most n non-zeros in every group of m rows
    (random positions; some kept entries zeroed, so some groups are short)."""
    G = -(-K // m)
    keys = torch.rand(G, m, N)
    keep = keys.argsort(dim=1)[:, :n]
    mask = torch.zeros(G, m, N, dtype=torch.bool).scatter_(1, keep, True)
    mask = mask.reshape(G * m, N)[:K] & (torch.rand(K, N) >= drop)
    B = torch.randn(K, N) * mask
    return B.to(dtype)


def _pack(B, n, m):
    """Packed (values, indices) of B: fips_kernels.formats if importable, else
    the private packer."""
    try:
        from fips_kernels.formats import SparseFactor
    except ImportError:
        return _pack_nm_private(B, n, m)
    f = SparseFactor.pack(B, "nm", n=n, m=m)
    return f.values, _indices_of(f)


def _indices_of(f):
    idx = getattr(f, "indices", None)
    if idx is None:
        idx = f.aux["indices"]
    return idx


def _reference(U, B, contract):
    """Torch-layout dense weight in fp64."""
    U64, B64 = U.double(), B.double()
    return U64 @ B64.t() if contract else (U64 @ B64).t()


# --------------------------------------------------------------------------
# (a) availability
# --------------------------------------------------------------------------

def test_extension_available():
    if REQUIRE_EXTENSION:
        assert _extension.available(), (
            f"FIPS_KERNELS_REQUIRE_EXTENSION=1 but fips_kernels._C is unavailable: "
            f"{_extension.error()}")
    elif not _extension.available():
        pytest.skip(f"fips_kernels._C unavailable: {_extension.error()}")
    assert _extension.error() is None
    assert hasattr(torch.ops.fips_kernels_cuda, "reconstruct_nm")
    assert hasattr(torch.ops.fips_kernels_cuda, "sparse_mm"), "an old build: reinstall to compile csrc/sparse_mm*"


def _fresh_extension_module():
    """A private copy of fips_kernels/_extension.py with its own cache."""
    spec = importlib.util.spec_from_file_location("_fips_extension_probe", _extension.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("exc, expect", [
    (ModuleNotFoundError("No module named 'fips_kernels._C'", name="fips_kernels._C"), None),
    (ImportError("/x/_C.abi3.so: undefined symbol: _ZN3c10foo"), "undefined symbol"),
    (OSError("libcudart.so.13: cannot open shared object file"), "libcudart"),
])
def test_load_failure_never_raises_and_warns_once(monkeypatch, caplog, exc, expect):
    mod = _fresh_extension_module()
    calls = []

    def fake_import(name):
        calls.append(name)
        raise exc

    monkeypatch.setattr(mod, "importlib", types.SimpleNamespace(import_module=fake_import))
    with caplog.at_level(logging.INFO, logger="fips_kernels"):
        assert mod.load() is False
        assert mod.available() is False
        assert mod.load() is False
        err = mod.error()
    assert calls == ["fips_kernels._C"], "the import must be tried exactly once"
    records = [r for r in caplog.records if r.name == "fips_kernels"]
    assert len(records) == 1, "exactly one log message"
    assert err in records[0].getMessage()
    if expect is None:
        # "Not built" is a deliberate install choice: logged (at INFO or WARNING).
        assert records[0].levelno in (logging.INFO, logging.WARNING)
        assert err == mod.NOT_BUILT
        assert "not built" in err and "FIPS_KERNELS_SKIP_CUDA_BUILD" in err
    else:
        # A build that does not load is a fault: a warning.
        assert records[0].levelno == logging.WARNING
        assert expect in err and type(exc).__name__ in err


# --------------------------------------------------------------------------
# the private packer against the spec and against fips_kernels.formats
# --------------------------------------------------------------------------

def test_private_packer_matches_spec_by_hand():
    # m=4, n=2: column [0, a, 0, b] keeps rows 1 and 3 -> entries 1 | 3 << 2 = 13.
    B = torch.tensor([[0.0], [2.0], [0.0], [5.0]])
    values, indices = _pack_nm_private(B, 2, 4)
    assert values.tolist() == [[2.0], [5.0]]
    assert indices.dtype == torch.int32 and indices.tolist() == [[13]]
    # Short group: one non-zero at row 2 -> explicit zero at the lowest free row 0.
    B = torch.tensor([[0.0], [0.0], [7.0], [0.0]])
    values, indices = _pack_nm_private(B, 2, 4)
    assert values.tolist() == [[0.0], [7.0]] and indices.tolist() == [[0 | 2 << 2]]
    # m=2, n=1, 32 entries fill one word exactly; entry 31 set -> sign bit.
    B = torch.zeros(64, 1)
    B[1::2] = 1.0  # every group keeps its second row
    values, indices = _pack_nm_private(B, 1, 2)
    assert indices.tolist() == [[-1]]
    # K=5, m=4, n=1: two groups, the second padded (rows 5..7 do not exist).
    B = torch.tensor([[0.0], [0.0], [0.0], [3.0], [4.0]])
    values, indices = _pack_nm_private(B, 1, 4)
    assert values.tolist() == [[3.0], [4.0]] and indices.tolist() == [[3 | 0 << 2]]


def test_private_packer_agrees_with_formats():
    formats = pytest.importorskip("fips_kernels.formats")
    for (n, m) in NM_PATTERNS:
        for (K, N) in [(13, 7), (16, 5), (1, 3), (37, 9)]:
            B = _random_nm_dense(K, N, n, m)
            values, indices = _pack_nm_private(B, n, m)
            f = formats.SparseFactor.pack(B, "nm", n=n, m=m)
            assert tuple(f.shape) == (K, N)
            assert torch.equal(f.values, values), (n, m, K, N)
            assert torch.equal(_indices_of(f), indices), (n, m, K, N)
            assert torch.equal(f.to_dense(), B)


# --------------------------------------------------------------------------
# (b) CPU implementation vs a dense reference
# --------------------------------------------------------------------------

SHAPES = [  # (d, K, N) for B (K x N)
    (5, 13, 7),
    (1, 13, 7),
    (5, 1, 3),
    (3, 32, 64),
    (7, 37, 1),
    (4, 70, 33),
]


def _case(d, K, N, n, m, contract, dtype):
    B = _random_nm_dense(K, N, n, m).to(dtype)
    values, indices = _pack(B, n, m)
    U = torch.randn(d, N if contract else K).to(dtype)
    return U, B, values, indices


@needs_extension
@pytest.mark.parametrize("contract", [False, True], ids=["expand", "contract"])
@pytest.mark.parametrize("n, m", NM_PATTERNS, ids=NM_IDS)
@pytest.mark.parametrize("d, K, N", SHAPES)
def test_cpu_fp32_matches_dense(d, K, N, n, m, contract):
    U, B, values, indices = _case(d, K, N, n, m, contract, torch.float32)
    out = _op()(U, values, indices, K, N, n, m, contract)
    ref = _reference(U, B, contract)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert out.shape == ((d, K) if contract else (N, d))
    # fp32 accumulation over <= 70 terms of size ~1: errors ~1e-6; a wrong
    # decode moves entries by O(1).
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("contract", [False, True], ids=["expand", "contract"])
@pytest.mark.parametrize("n, m", NM_PATTERNS, ids=NM_IDS)
@pytest.mark.parametrize("d, K, N", [(5, 13, 7), (1, 13, 7), (4, 70, 33)])
def test_cpu_half_matches_fp32_math(d, K, N, n, m, contract, dtype):
    U, B, values, indices = _case(d, K, N, n, m, contract, dtype)
    out = _op()(U, values, indices, K, N, n, m, contract)
    assert out.dtype == dtype
    # Reference: exact math on the same (already rounded) inputs. With fp32
    # accumulation the only error left is the final rounding to `dtype`: at
    # most one unit in the last place, i.e. eps * |ref|.
    ref = _reference(U, B, contract)
    eps = torch.finfo(dtype).eps
    err = (out.double() - ref).abs()
    bound = eps * ref.abs() + 1e-5
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def _garbage_in_padding(K, N, n, m):
    """Packed factor whose last group points every kept entry at padding rows
    (>= K) holding huge values: they must contribute nothing. Returns
    (values, indices, B) with B the dense matrix the op must see."""
    assert K % m and K % m <= m - n, "needs >= n padding rows in the last group"
    B = _random_nm_dense(K, N, n, m)
    values, indices = _pack_nm_private(B, n, m)
    G = -(-K // m)
    b = BITS[m]
    P = 32 // b
    pos = torch.stack([(indices[j // P].to(torch.int64) >> ((j % P) * b)) & (2**b - 1)
                       for j in range(G * n)])
    pos[(G - 1) * n:] = (K % m + torch.arange(n)).unsqueeze(1)  # rows K, K+1, ...
    values = values.clone()
    values[(G - 1) * n:] = 1e4
    B = B.clone()
    B[(G - 1) * m:] = 0
    return values, _encode_positions(pos, m), B


@needs_extension
@pytest.mark.parametrize("contract", [False, True], ids=["expand", "contract"])
def test_cpu_ignores_padding_rows_and_accepts_noncontiguous(contract):
    d, K, N, n, m = 6, 13, 9, 2, 8  # last group: rows 8..15, of which 13..15 are padding
    values, indices, B = _garbage_in_padding(K, N, n, m)
    # Non-contiguous inputs: the op calls .contiguous() itself.
    U = torch.randn(d, 2 * (N if contract else K))[:, ::2]
    values_nc = torch.cat([values, values], dim=1)[:, :N]
    assert not U.is_contiguous() and not values_nc.is_contiguous()
    out = _op()(U, values_nc, indices, K, N, n, m, contract)
    torch.testing.assert_close(out.double(), _reference(U, B, contract), rtol=1e-5, atol=1e-5)


@needs_extension
@pytest.mark.parametrize("contract", [False, True], ids=["expand", "contract"])
@pytest.mark.parametrize("d, K, N", [(0, 13, 7), (5, 0, 7), (5, 13, 0), (0, 0, 0)])
def test_cpu_empty_sizes(d, K, N, contract):
    n, m = 1, 4
    B = torch.zeros(K, N)
    values, indices = _pack_nm_private(B, n, m)
    U = torch.randn(d, N if contract else K)
    out = _op()(U, values, indices, K, N, n, m, contract)
    assert out.shape == ((d, K) if contract else (N, d))
    assert bool((out == 0).all())


# --------------------------------------------------------------------------
# (c) TORCH_CHECKs
# --------------------------------------------------------------------------

def _good_args(contract=False):
    d, K, N, n, m = 5, 13, 7, 2, 4
    B = _random_nm_dense(K, N, n, m)
    values, indices = _pack_nm_private(B, n, m)
    U = torch.randn(d, N if contract else K)
    return [U, values, indices, K, N, n, m, contract]


def _bad(i, value, contract=False):
    args = _good_args(contract)
    args[i] = value(args[i]) if callable(value) else value
    return args


BAD_INPUTS = [
    ("indices_int64", _bad(2, lambda t: t.to(torch.int64)), r"indices must be int32.*Long"),
    ("indices_shape", _bad(2, lambda t: torch.cat([t, t])), r"indices must have shape \(ceil\(G\*n/P\), N\) = \(1, 7\).*got \[2, 7\]"),
    ("values_shape", _bad(1, lambda t: t[:-1]), r"values must have shape \(G\*n, N\) = \(8, 7\).*got \[7, 7\]"),
    ("values_cols", _bad(1, lambda t: t[:, :-1]), r"values must have shape"),
    ("values_dtype", _bad(1, lambda t: t.double()), r"values dtype must match U dtype \(Float\), got Double"),
    ("U_dtype", [torch.randn(5, 13).double(), *_good_args()[1:]], r"U must be float32, float16 or bfloat16, got Double"),
    ("U_cols_expand", _bad(0, lambda t: t[:, :-1]), r"contract=False needs U of shape \(d, K\) with K=13.*got U of shape \[5, 12\]"),
    ("U_cols_contract", _bad(0, lambda t: t[:, :-1], contract=True), r"contract=True needs U of shape \(d, N\) with N=7.*\[5, 6\]"),
    ("U_1d", _bad(0, lambda t: t[0]), r"U must be 2-D \(d x r\), got 1-D"),
    ("values_3d", _bad(1, lambda t: t[None]), r"values must be 2-D"),
    ("indices_1d", _bad(2, lambda t: t[0]), r"indices must be 2-D"),
    ("m_3", _bad(6, 3), r"m must be one of 2, 4, 8, 16, got m=3"),
    ("m_32", _bad(6, 32), r"m must be one of 2, 4, 8, 16, got m=32"),
    ("n_0", _bad(5, 0), r"n must satisfy 1 <= n <= m, got n=0"),
    ("n_gt_m", _bad(5, 5), r"n must satisfy 1 <= n <= m, got n=5, m=4"),
    ("K_negative", _bad(3, -1), r"K and N must be >= 0"),
]


@needs_extension
@pytest.mark.parametrize("args, match", [pytest.param(a, r, id=i) for i, a, r in BAD_INPUTS])
def test_bad_input_raises_readable_error(args, match):
    with pytest.raises(RuntimeError, match=match) as info:
        _op()(*args)
    assert "fips_kernels_cuda::reconstruct_nm" in str(info.value)


# --------------------------------------------------------------------------
# (d) schema, autograd registration and the fake implementation
# --------------------------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("contract", [False, True], ids=["expand", "contract"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(contract, dtype):
    args = _good_args(contract)
    args[0] = args[0].to(dtype).requires_grad_()
    args[1] = args[1].to(dtype)
    torch.library.opcheck(
        _op().default, tuple(args),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@needs_extension
@pytest.mark.parametrize("contract", [False, True], ids=["expand", "contract"])
def test_fake_shapes(contract):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _good_args(contract)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake[0] = torch.empty(11, fake[0].shape[1], dtype=torch.float16)
        fake[1] = fake[1].half()
        out = _op()(*fake)
    assert out.dtype == torch.float16
    assert tuple(out.shape) == ((11, 13) if contract else (7, 11))


# --------------------------------------------------------------------------
# (e) CUDA implementation (GPU only)
# --------------------------------------------------------------------------

def _cuda_case(d, K, N, n, m, contract, dtype):
    B = _random_nm_dense(K, N, n, m)
    values, indices = _pack(B, n, m)
    U = torch.randn(d, N if contract else K)
    return U.to(dtype), values.to(dtype), indices


def _assert_matches_cpu(out, U, values, indices, K, N, n, m, contract):
    ref = _op()(U.cpu(), values.cpu(), indices.cpu(), K, N, n, m, contract)
    assert out.device.type == "cuda" and out.dtype == U.dtype and out.is_contiguous()
    assert out.shape == ref.shape
    # Both accumulate in fp32 in the same order; they may differ by FMA
    # contraction (~1e-6 relative in fp32) and so by one rounding step in
    # fp16/bf16: eps * |ref| plus a small absolute term.
    eps = torch.finfo(U.dtype).eps
    atol = 1e-4 if U.dtype == torch.float32 else 1e-3
    err = (out.cpu().double() - ref.double()).abs()
    bound = 2 * eps * ref.double().abs() + atol
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("contract", [False, True], ids=["expand", "contract"])
@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (2, 8)], ids=["1:4", "2:4", "2:8"])
def test_cuda_matches_cpu_large(dtype, contract, n, m):
    d, r, h = 768 + 3, 1365, 3072 + 5
    K, N = (h, r) if contract else (r, h)
    U, values, indices = _cuda_case(d, K, N, n, m, contract, dtype)
    out = _op()(U.cuda(), values.cuda(), indices.cuda(), K, N, n, m, contract)
    torch.cuda.synchronize()
    _assert_matches_cpu(out, U, values, indices, K, N, n, m, contract)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("contract", [False, True], ids=["expand", "contract"])
@pytest.mark.parametrize("n, m", NM_PATTERNS, ids=NM_IDS)
@pytest.mark.parametrize("d, K, N", [(5, 13, 7), (1, 13, 7), (65, 37, 129), (130, 97, 63)])
def test_cuda_matches_cpu_small(d, K, N, n, m, contract, dtype):
    U, values, indices = _cuda_case(d, K, N, n, m, contract, dtype)
    out = _op()(U.cuda(), values.cuda(), indices.cuda(), K, N, n, m, contract)
    _assert_matches_cpu(out, U, values, indices, K, N, n, m, contract)


@on_gpu
@pytest.mark.parametrize("contract", [False, True], ids=["expand", "contract"])
def test_cuda_padding_rows_noncontiguous_and_empty(contract):
    d, K, N, n, m = 70, 13, 9, 2, 8
    values, indices, B = _garbage_in_padding(K, N, n, m)
    U = torch.randn(d, 2 * (N if contract else K))[:, ::2]
    out = _op()(U.cuda(), values.cuda(), indices.cuda(), K, N, n, m, contract)
    _assert_matches_cpu(out, U, values, indices, K, N, n, m, contract)
    torch.testing.assert_close(out.double().cpu(), _reference(U, B, contract), rtol=1e-5, atol=1e-5)
    # Empty sizes: no zero-size launch, correct (empty or zero) outputs.
    for (d0, K0, N0) in [(0, 13, 7), (5, 0, 7), (5, 13, 0)]:
        v, i = _pack_nm_private(torch.zeros(K0, N0), 1, 4)
        U0 = torch.randn(d0, N0 if contract else K0, device="cuda")
        out0 = _op()(U0, v.cuda(), i.cuda(), K0, N0, 1, 4, contract)
        assert out0.shape == ((d0, K0) if contract else (N0, d0))
        assert bool((out0 == 0).all())
    torch.cuda.synchronize()


@on_gpu
def test_cuda_device_mismatch_raises():
    args = _good_args()
    args[0] = args[0].cuda()
    with pytest.raises(RuntimeError, match="all tensors must be on the same device"):
        _op()(*args)


@on_gpu
@pytest.mark.parametrize("contract", [False, True], ids=["expand", "contract"])
def test_cuda_graph_capture(contract):
    d, K, N, n, m = 300, 517, 259, 1, 4
    U, values, indices = _cuda_case(d, K, N, n, m, contract, torch.float16)
    U, values, indices = U.cuda(), values.cuda(), indices.cuda()
    op = _op()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        op(U, values, indices, K, N, n, m, contract)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(U, values, indices, K, N, n, m, contract)
    U.copy_(torch.randn_like(U))
    values.mul_(-0.5)
    graph.replay()
    torch.cuda.synchronize()
    expected = op(U, values, indices, K, N, n, m, contract)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    _assert_matches_cpu(out, U, values, indices, K, N, n, m, contract)
