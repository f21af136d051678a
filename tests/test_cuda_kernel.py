"""``fips_kernels_cuda::sparse_mm`` (csrc/) against fp64 truth.

On the CPU the op runs the CUDA kernel's block program thread by thread and
warp by warp (csrc/sparse_mm_host.cpp: same staging, decode and mma fragment
code, with an mma.sync emulated from the PTX fragment tables), so these tests
check the GPU kernel's indexing here; with a GPU the same tests run the real
kernel. bf16 is tested on the CPU too: the emulation's arithmetic is exact C++.
"""
import pytest
import torch
import torch.nn.functional as F

from fips_kernels import _extension
from fips_kernels.formats import SparseFactor

from conftest import DEVICES, assert_close_to_truth, random_factor_dense

pytestmark = pytest.mark.skipif(
    not (_extension.available() and hasattr(torch.ops.fips_kernels_cuda, "sparse_mm")),
    reason=f"the compiled extension is not available: {_extension.error()}")

DTYPES = [torch.float16, torch.bfloat16]
PATTERNS = {  # name: (fmt, pack options)
    "dense": ("dense", {}),
    "1:4": ("nm", {"n": 1, "m": 4}),
    "2:4": ("nm", {"n": 2, "m": 4}),
    "1:2": ("nm", {"n": 1, "m": 2}),
    "3:8": ("nm", {"n": 3, "m": 8}),
    "5:16": ("nm", {"n": 5, "m": 16}),
    "bitmap": ("bitmap", {}),
}


def _factor(K, N, pattern, dtype, device, qbits=None, qgroup=64):
    fmt, opts = PATTERNS[pattern]
    dense = random_factor_dense(K, N, fmt, n=opts.get("n", 1), m=opts.get("m", 4), dtype=dtype, device=device)
    return SparseFactor.pack(dense, fmt, qbits=qbits, qgroup=qgroup, **opts)


def sparse_mm(a, f, bias=None, act="none", split_k=0, transpose=False, out_dtype=None):
    aux = list(f.aux_tensors) + [None, None]
    p0, p1 = (f.n, f.m) if f.format == "nm" else f.tile if f.format == "bitmap" else (0, 0)
    K, N = f.shape[::-1] if transpose else f.shape
    return torch.ops.fips_kernels_cuda.sparse_mm(
        a, f.values, aux[0], aux[1], f.scales if f.quantized else None, bias, f.format, K, N, p0, p1,
        f.qbits or 0, f.qgroup or 0, transpose, act, split_k, out_dtype)


def _act(y, act):
    return F.gelu(y) if act == "gelu" else F.silu(y) if act == "silu" else y


def check(a, f, bias=None, act="none", split_k=0, transpose=False, out_dtype=None):
    """The op against fp64 truth, within twice plain PyTorch's error in the same dtype."""
    out = sparse_mm(a, f, bias, act, split_k, transpose, out_dtype)
    B = f.to_dense()  # dequantised values rounded to the dtype, as the kernel rounds them
    B = B.t() if transpose else B
    M, N = a.shape[0], B.shape[1]
    assert out.shape == (M, N)
    assert out.dtype == (out_dtype or a.dtype)
    truth = a.double() @ B.double()
    base = (a.float() @ B.float()).to(a.dtype)
    if bias is not None:
        truth = truth + bias.double()
        base = base + bias
    truth, base = _act(truth, act), _act(base.float(), act).to(a.dtype)
    if out_dtype == torch.float32:
        base = base.float()
    scale = truth.abs().max().item() if truth.numel() else 0.0
    assert_close_to_truth(out.cpu(), truth.cpu(), base.cpu(), eps=1e-5 * max(scale, 1.0))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("M", [1, 2, 7, 16, 33, 128, 4096])
def test_matches_truth_odd_shapes(device, dtype, pattern, M):
    K, N = 133, 70  # K tail of 5 (a partial N:M group for m = 8, 16) and N tail of 6
    f = _factor(K, N, pattern, dtype, device)
    a = torch.randn(M, K, dtype=dtype, device=device)
    bias = torch.randn(N, dtype=dtype, device=device)
    check(a, f, bias)
    check(a, f, None, "gelu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("pattern", ["dense", "1:4", "2:4", "5:16", "bitmap"])
@pytest.mark.parametrize("qbits", [8, 4])
@pytest.mark.parametrize("qgroup", [64, 20])
def test_quantised_values_dequantised_in_kernel(device, dtype, pattern, qbits, qgroup):
    K, N = 150, 67
    f = _factor(K, N, pattern, dtype, device, qbits=qbits, qgroup=qgroup)
    for M in (1, 16, 40):
        a = torch.randn(M, K, dtype=dtype, device=device)
        check(a, f, torch.randn(N, dtype=dtype, device=device), "silu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("qbits", [None, 8])
def test_transposed_dense_is_the_int8_base_times_z(device, dtype, qbits):
    """``z · Uᵀ`` with U (d, r) stored as a (possibly int8, one scale per column) dense factor."""
    d, r = 77, 45
    U = SparseFactor.pack(torch.randn(d, r, dtype=dtype, device=device), "dense",
                          qbits=qbits, qgroup=d)
    for M in (1, 9, 33):
        z = torch.randn(M, r, dtype=dtype, device=device)
        check(z, U, torch.randn(d, dtype=dtype, device=device), transpose=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", ["1:4", "bitmap"])
def test_split_k_is_deterministic_and_agrees(device, pattern):
    K, N = 700, 96
    f = _factor(K, N, pattern, torch.float16, device)
    a = torch.randn(3, K, dtype=torch.float16, device=device)
    outs = [check(a, f, split_k=s) for s in (1, 4, 11)]
    again = sparse_mm(a, f, split_k=11)
    assert torch.equal(outs[2], again), "split-K reduction must be bitwise reproducible"
    for o in outs[1:]:
        assert (o.float() - outs[0].float()).abs().max().item() <= 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_output_and_3d_free_large_m(device):
    f = _factor(96, 72, "2:4", torch.bfloat16, device)
    a = torch.randn(4096 if device == "cuda" else 600, 96, dtype=torch.bfloat16, device=device)
    check(a, f, torch.randn(72, dtype=torch.bfloat16, device=device), out_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_dimensions(device):
    f = _factor(64, 40, "1:4", torch.float16, device)
    assert sparse_mm(torch.randn(0, 64, dtype=torch.float16, device=device), f).shape == (0, 40)
    empty = SparseFactor.pack(torch.zeros(0, 40, dtype=torch.float16, device=device), "nm", n=1, m=4)
    bias = torch.randn(40, dtype=torch.float16, device=device)
    out = sparse_mm(torch.randn(3, 0, dtype=torch.float16, device=device), empty, bias, "gelu")
    # GELU is a transcendental: libm builds and vector paths differ in the last bits, so the
    # comparison uses fp16's own tolerance, not bit equality (a wrong epilogue is off by far more).
    torch.testing.assert_close(out, F.gelu(bias.float()).to(torch.float16).expand(3, 40))


def test_misaligned_views_are_realigned():
    """A view starting 2 bytes into its storage is copied, not read misaligned."""
    K, N = 64, 64
    f = _factor(K, N, "1:4", torch.float16, "cpu")
    big = torch.randn(5, K + 1, dtype=torch.float16)
    a = big[:, 1:]  # not contiguous and 2-byte offset
    check(a, f)


def test_inf_in_the_next_row_does_not_leak():
    """Columns past K of a staged A row hold the next row's bytes; they must be masked."""
    K, N = 70, 64
    f = _factor(K, N, "1:4", torch.float16, "cpu")
    a = torch.randn(2, K, dtype=torch.float16)
    a[1, :] = float("inf")
    out = sparse_mm(a, f)
    assert torch.isfinite(out[0]).all()


# ---------------------------------------------------------------- bad input

def _nm():
    return _factor(64, 32, "1:4", torch.float16, "cpu")


@pytest.mark.parametrize("mutate, message", [
    (lambda a, f: (a.float(), f, {}), "A must be float16 or bfloat16"),
    (lambda a, f: (a[:, :10], f, {}), r"A must be \(M, K\) with K=64"),
    (lambda a, f: (a[0], f, {}), "A must be 2-D"),
    (lambda a, f: (a, f, {"act": "relu"}), "activation must be"),
    (lambda a, f: (a, f, {"split_k": 999}), "split_k must be in"),
    (lambda a, f: (a, f, {"out_dtype": torch.float64}), "out_dtype must be"),
    (lambda a, f: (a, f, {"transpose": True}), "transpose=True is only for the dense format"),
    (lambda a, f: (a, f, {"bias": torch.randn(31, dtype=torch.float16)}), "bias must have shape"),
    (lambda a, f: (a, f, {"bias": torch.randn(32)}), "bias dtype must match"),
    (lambda a, f: (a.bfloat16(), f, {}), "values dtype must match A"),
])
def test_bad_input_is_named(mutate, message):
    a = torch.randn(3, 64, dtype=torch.float16)
    a2, f, kw = mutate(a, _nm())
    with pytest.raises(RuntimeError, match=message):
        sparse_mm(a2, f, **kw)


def test_bad_formats_are_named():
    a = torch.randn(3, 64, dtype=torch.float16)
    f = _nm()
    ops = torch.ops.fips_kernels_cuda
    with pytest.raises(RuntimeError, match="format must be 'dense', 'nm' or 'bitmap'"):
        ops.sparse_mm(a, f.values, f.aux["indices"], None, None, None, "csr", 64, 32, 1, 4, 0, 0, False,
                      "none", 0, None)
    with pytest.raises(RuntimeError, match="nm m must be one of"):
        ops.sparse_mm(a, f.values, f.aux["indices"], None, None, None, "nm", 64, 32, 1, 3, 0, 0, False,
                      "none", 0, None)
    with pytest.raises(RuntimeError, match=r"indices\) must have shape"):
        ops.sparse_mm(a, f.values, f.aux["indices"][:, :5], None, None, None, "nm", 64, 32, 1, 4, 0, 0,
                      False, "none", 0, None)
    with pytest.raises(RuntimeError, match="needs aux0"):
        ops.sparse_mm(a, f.values, None, None, None, None, "nm", 64, 32, 1, 4, 0, 0, False, "none", 0, None)
    bm = SparseFactor.pack(torch.randn(64, 64, dtype=torch.float16), "bitmap", tile=(32, 64))
    with pytest.raises(RuntimeError, match=r"bitmap tiles of \(64, 64\) only"):
        sparse_mm(a, bm)
    q = _factor(64, 32, "1:4", torch.float16, "cpu", qbits=8)
    with pytest.raises(RuntimeError, match="need scales"):
        ops.sparse_mm(a, q.values, q.aux["indices"], None, None, None, "nm", 64, 32, 1, 4, 8, 64, False,
                      "none", 0, None)
    with pytest.raises(RuntimeError, match="scales given but qbits is 0"):
        ops.sparse_mm(a, f.values, f.aux["indices"], None, q.scales, None, "nm", 64, 32, 1, 4, 0, 0, False,
                      "none", 0, None)


@pytest.mark.gpu
def test_cpu_and_cuda_tensors_mixed_are_named():
    a = torch.randn(3, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        sparse_mm(a, _nm())


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    f = _nm()
    with FakeTensorMode(allow_non_fake_inputs=True):
        a = torch.empty(5, 64, dtype=torch.float16)
        out = sparse_mm(a, f, out_dtype=torch.float32)
    assert out.shape == (5, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern, qbits", [("2:4", None), ("bitmap", 8), ("dense", 4)])
def test_opcheck(device, pattern, qbits):
    """Schema, fake implementation and dispatcher registration agree with the real kernel."""
    f = _factor(70, 40, pattern, torch.float16, device, qbits=qbits)
    aux = list(f.aux_tensors) + [None, None]
    p0, p1 = (f.n, f.m) if f.format == "nm" else f.tile if f.format == "bitmap" else (0, 0)
    a = torch.randn(5, 70, dtype=torch.float16, device=device)
    args = (a, f.values, aux[0], aux[1], f.scales if f.quantized else None,
            torch.randn(40, dtype=torch.float16, device=device), f.format, 70, 40, p0, p1,
            f.qbits or 0, f.qgroup or 0, False, "silu", 0, None)
    torch.library.opcheck(torch.ops.fips_kernels_cuda.sparse_mm.default, args)


# ---------------------------------------------------------------- gated (gate and up in one K loop)

def sparse_mm_gated(a, g, u, bias_g=None, bias_u=None, split_k=0, out_dtype=None):
    ga, ua = list(g.aux_tensors) + [None, None], list(u.aux_tensors) + [None, None]
    p0, p1 = (g.n, g.m) if g.format == "nm" else g.tile if g.format == "bitmap" else (0, 0)
    return torch.ops.fips_kernels_cuda.sparse_mm_gated(
        a, g.values, ga[0], ga[1], g.scales if g.quantized else None, bias_g,
        u.values, ua[0], ua[1], u.scales if u.quantized else None, bias_u,
        g.format, *g.shape, p0, p1, g.qbits or 0, g.qgroup or 0, split_k, out_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("pattern, qbits", [("1:4", None), ("2:4", None), ("5:16", None), ("bitmap", None),
                                            ("dense", None), ("1:4", 8), ("bitmap", 4)])
def test_gated_matches_truth(device, dtype, pattern, qbits):
    K, N = 133, 70
    g = _factor(K, N, pattern, dtype, device, qbits=qbits)
    u = _factor(K, N, pattern, dtype, device, qbits=qbits)
    bg, bu = (torch.randn(N, dtype=dtype, device=device) for _ in range(2))
    Bg, Bu = g.to_dense().double(), u.to_dense().double()
    for M, split in ((1, 0), (7, 3), (16, 1), (33, 0), (130, 2)):
        a = torch.randn(M, K, dtype=dtype, device=device)
        out = sparse_mm_gated(a, g, u, bg, bu, split)
        truth = F.silu(a.double() @ Bg + bg.double()) * (a.double() @ Bu + bu.double())
        gate = (a.float() @ Bg.float()).to(dtype) + bg
        up = (a.float() @ Bu.float()).to(dtype) + bu
        base = (F.silu(gate.float()).to(dtype) * up)
        assert_close_to_truth(out.cpu(), truth.cpu(), base.cpu(), eps=1e-5 * max(truth.abs().max().item(), 1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_gated_equals_its_two_halves(device):
    """Same decode and fragments as the single op: silu(gate) * up from two fp32 calls, rounded once."""
    g, u = (_factor(200, 96, "1:4", torch.float16, device) for _ in range(2))
    a = torch.randn(5, 200, dtype=torch.float16, device=device)
    for split in (1, 4):
        fused = sparse_mm_gated(a, g, u, split_k=split, out_dtype=torch.float32)
        halves = (sparse_mm(a, g, act="silu", split_k=split, out_dtype=torch.float32)
                  * sparse_mm(a, u, split_k=split, out_dtype=torch.float32))
        assert torch.equal(fused, halves)


def test_gated_bad_input_is_named():
    a = torch.randn(3, 64, dtype=torch.float16)
    g = _nm()
    u = _factor(64, 32, "2:4", torch.float16, "cpu")
    with pytest.raises(RuntimeError, match=r"up values must have shape"):
        sparse_mm_gated(a, g, u)
    u8 = _factor(64, 32, "1:4", torch.float16, "cpu", qbits=8)
    with pytest.raises(RuntimeError, match="up values must be stored as int8|up int8"):
        torch.ops.fips_kernels_cuda.sparse_mm_gated(
            a, u8.values, u8.aux["indices"], None, u8.scales, None, g.values, g.aux["indices"], None, u8.scales,
            None, "nm", 64, 32, 1, 4, 8, 64, 0, None)
    with pytest.raises(RuntimeError, match="up bias must have shape"):
        sparse_mm_gated(a, g, g, None, torch.randn(31, dtype=torch.float16))


@pytest.mark.parametrize("device", DEVICES)
def test_gated_opcheck(device):
    g, u = (_factor(70, 40, "bitmap", torch.float16, device) for _ in range(2))
    a = torch.randn(5, 70, dtype=torch.float16, device=device)
    args = (a, g.values, *g.aux_tensors, None, None, u.values, *u.aux_tensors, None,
            torch.randn(40, dtype=torch.float16, device=device), "bitmap", 70, 40, 64, 64, 0, 0, 0, None)
    torch.library.opcheck(torch.ops.fips_kernels_cuda.sparse_mm_gated.default, args)


def test_gated_wrapper_checks_and_empty_reduction():
    from fips_kernels.cuda import sparse_mm_gated as wrapper

    a = torch.randn(3, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="gate and up must share format, shape, pattern"):
        wrapper(a, _nm(), _factor(64, 32, "2:4", torch.float16, "cpu"))
    empty = SparseFactor.pack(torch.zeros(0, 8, dtype=torch.float16), "nm", n=1, m=4)
    bg, bu = torch.randn(8, dtype=torch.float16), torch.randn(8, dtype=torch.float16)
    out = wrapper(torch.randn(2, 0, dtype=torch.float16), empty, empty, bg, bu)
    want = (F.silu(bg.float()) * bu.float()).to(torch.float16).expand(2, 8)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    f, u = _nm(), _factor(64, 32, "1:4", torch.float16, "cpu")
    got = wrapper(a, f, u)
    torch.testing.assert_close(got, sparse_mm_gated(a, f, u), rtol=0, atol=0)
