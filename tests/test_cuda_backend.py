"""What is specific to the ``cuda`` backend (``fips_kernels.cuda``).

CPU: the reasons it gives and dispatch's fallback; the strategy choice; the
``sparse_mm`` wrapper's checks; the 2:4 path's packing cache with torch's
semi-structured conversion replaced by a dense copy (the real one needs CUDA).
The layer ops of every format, quantisation and strategy against the reference
run in ``test_backend_conformance.py`` — on the CPU through the CPU
implementation of ``fips_kernels_cuda::sparse_mm``, which runs the CUDA
kernel's block program warp by warp. GPU: the layer ops through automatic
dispatch, the 2:4 strategy, torch.compile and CUDA graphs.

Numeric checks use the suite's oracle (:func:`conftest.check_layer`).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fips_kernels as fk
from fips_kernels import _extension, dispatch
from fips_kernels.bench import providers
from fips_kernels.cuda import pack_for_cuda, sparse24, spmm
from fips_kernels.cuda.strategies import STRATEGIES
from fips_kernels.dispatch import Problem
from fips_kernels.formats import Layout, SparseFactor
from fips_kernels.ops import fips_linear, gate_up

from conftest import assert_close_to_truth, check_layer as _check, make_factor

HAS_OP = spmm.op_available()
needs_op = pytest.mark.skipif(not HAS_OP, reason=f"fips_kernels_cuda::sparse_mm is not available: "
                                                 f"{spmm.unavailable_reason()}")

D, R, H = 37, 45, 70  # no multiple of 8, 16 or 64: tails everywhere
MS = (1, 2, 7, 16, 33)
DTYPES = [torch.float16, torch.bfloat16]
# (format, options, factor qbits, base qbits)
CASES = [
    ("dense", {}, None, None),
    ("nm", {"n": 1, "m": 4}, None, None),
    ("nm", {"n": 2, "m": 4}, None, None),
    ("nm", {"n": 2, "m": 8}, None, None),
    ("nm", {"n": 3, "m": 16}, None, None),
    ("bitmap", {}, None, None),
    ("nm", {"n": 2, "m": 4}, None, 8),
    ("nm", {"n": 1, "m": 4}, 8, None),
    ("bitmap", {}, 4, 8),
    ("dense", {}, 8, 8),
]
IDS = ["dense", "nm1:4", "nm2:4", "nm2:8", "nm3:16", "bitmap", "nm2:4+int8base", "nm1:4-int8", "bitmap-int4+int8base",
       "dense-int8+int8base"]


def _case(kind, fmt, opts, qbits, base_bits, dtype, device="cpu", d=D, r=R, h=H):
    K, N = (r, h) if kind == "expand" else (h, r)
    factor, _ = make_factor(K, N, fmt, opts, dtype=dtype, device=device, density=0.35)
    if qbits:
        factor = factor.quantize(qbits, qgroup=16)
    U = (torch.randn(d, r, device=device) / r ** 0.5).to(dtype)
    base = SparseFactor.pack(U, "dense", qbits=8, qgroup=d) if base_bits else U
    bias = torch.randn(h if kind == "expand" else d, device=device).to(dtype)
    return factor, base, bias


def _run(kind, x, base, factor, bias, strategy, activation="none"):
    if kind == "expand":
        return STRATEGIES.expand(x, base, factor, bias, activation, strategy=strategy)
    return STRATEGIES.contract(x, base, factor, bias, strategy=strategy)


def _cuda_problem(fmt="nm", dtype=torch.float16, meta=(R, H, 1, 4), op="expand", device="cuda", M=16):
    return Problem.for_layer(op, op, Layout.from_meta(fmt, meta), dtype, device, M, D)


def _choose(M, factor, kind="expand", dtype=torch.float16, forced=None):
    """(strategy name, forced?) the cuda backend picks for a call on the CPU."""
    p = Problem.for_layer(kind, kind, factor.layout, dtype, "cpu", M, D)
    from fips_kernels.tuning import forced_strategy

    return STRATEGIES.choose(p, forced).name, bool(forced_strategy(forced))


@pytest.fixture
def sm90(monkeypatch):
    """Pretend a CUDA device of capability 9.0 with the op built: only the problem's own reasons remain."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(spmm, "unavailable_reason", lambda: None)


def _cuda_reasons(p):
    return dispatch.backend("cuda").not_supported_reasons(p)


# ---------------------------------------------------------------- reasons and dispatch

def test_a_supported_problem_has_no_reasons(sm90):
    for fmt, meta in (("nm", (R, H, 1, 4)), ("bitmap", (R, H, 64, 64)), ("dense", (R, H, 0, 0))):
        for dtype in DTYPES:
            assert _cuda_reasons(_cuda_problem(fmt, dtype, meta)) == []
    # quantised factors run on the cuda kernels
    assert _cuda_reasons(_cuda_problem("nm", meta=(R, H, 1, 4, 4, 16))) == []


def test_extension_missing_is_a_reason(monkeypatch):
    monkeypatch.setattr(_extension, "available", lambda: False)
    monkeypatch.setattr(_extension, "error", lambda: "not built (test)")
    reasons = _cuda_reasons(_cuda_problem())
    assert "the CUDA extension is not available: not built (test)" in reasons


def test_cpu_device_is_a_reason():
    assert "input is on cpu, not a cuda device" in _cuda_reasons(_cuda_problem(device="cpu"))


def test_old_gpu_is_a_reason(sm90, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert _cuda_reasons(_cuda_problem()) == [
        "GPU compute capability 7.5 is below 8.0: needs sm80+ for mma.sync bf16"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_is_a_reason(sm90, dtype):
    assert _cuda_reasons(_cuda_problem(dtype=dtype)) == [
        f"dtype {dtype} is not supported (needs float16, bfloat16)"]


@pytest.mark.parametrize("fmt,meta", [("csr", (R, H, 0, 0)), ("ell", (R, H, 2, 0))])
def test_csr_and_ell_are_reasons(sm90, fmt, meta):
    assert _cuda_reasons(_cuda_problem(fmt, meta=meta)) == [
        f"no cuda kernel for the {fmt!r} format (it runs dense, nm, bitmap)"]


def test_bitmap_tile_other_than_64x64_is_a_reason(sm90):
    (reason,) = _cuda_reasons(_cuda_problem("bitmap", meta=(R, H, 16, 32)))
    assert reason.startswith("no strategy can run it") and \
        "bitmap tile (16, 32) is not supported by the cuda kernel (only 64x64)" in reason


def test_dense_int4_reconstructs_through_the_decoded_factor(sm90):
    """sparse_mm has no transposed int4 operand: the contract weight of an int4 dense factor is
    built from the decoded factor, so the backend has no reason against it (a GPU run used to raise)."""
    meta = (H, R, 0, 0, 4, 16)
    assert _cuda_reasons(_cuda_problem("dense", meta=meta, op="reconstruct")) == []
    assert _cuda_reasons(_cuda_problem("dense", meta=meta, op="contract", M=1 << 20)) == []
    assert STRATEGIES.mm.sparse_reasons(Layout.from_meta("dense", meta), transpose=True)


def test_forced_cuda_backend_on_cpu_raises_with_reasons():
    factor, U, bias = _case("expand", "nm", {"n": 1, "m": 4}, None, None, torch.float16)
    x = torch.randn(3, D).half()
    with fk.use_backend("cuda"), pytest.raises(fk.BackendUnavailable) as info:
        fips_linear(x, U, factor, "expand", bias)
    msg = str(info.value)
    assert "backend 'cuda' was forced but cannot run expand" in msg
    assert "input is on cpu, not a cuda device" in msg


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
def test_automatic_dispatch_falls_back(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no triton either: the cpu backend (or the reference)
    factor, U, bias = _case("contract", "bitmap", {}, None, None, dtype)
    x = torch.randn(2, 5, H).to(dtype)
    p = Problem.for_layer("contract", "contract", factor.layout, dtype, x.device, 10, D)
    assert dispatch.select(p).name == ("cpu" if _extension.CPU.available() else "reference")
    with fk.use_backend("reference"):
        expected = fips_linear(x, U, factor, "contract", bias)
    torch.testing.assert_close(fips_linear(x, U, factor, "contract", bias), expected)


# ---------------------------------------------------------------- strategy choice

def test_strategy_by_m_and_the_environment(monkeypatch):
    from fips_kernels import tuning

    factor, U, _ = _case("expand", "nm", {"n": 2, "m": 4}, None, None, torch.float16, h=128)
    cpu = torch.device("cpu")
    big = tuning.reconstruct_min_m(cpu, "expand", factor, D, backend="cuda")
    assert _choose(big - 1, factor) == ("factored", False)
    # on the CPU 2:4 sparse tensor cores cannot run: large M reconstructs
    assert _choose(big, factor) == ("reconstruct", False)
    monkeypatch.setattr(sparse24, "reasons", lambda *a: [])
    assert _choose(big, factor) == ("sparse24", False)
    monkeypatch.setenv("FIPS_KERNELS_STRATEGY", "reconstruct")
    assert _choose(1, factor) == ("reconstruct", True)


def test_the_cuda_backend_can_have_its_own_crossovers(monkeypatch):
    from fips_kernels import tuning

    table = {"default": {"reconstruct_min_m": 1024, "by_format": {"nm": {"contract": 512}},
                         "by_backend": {"cuda": {"reconstruct_min_m": 256, "by_format": {"bitmap": {"expand": 64}}}}}}
    monkeypatch.setattr(tuning, "crossovers", lambda: table)
    cpu = torch.device("cpu")
    nm, _, _ = _case("expand", "nm", {"n": 1, "m": 4}, None, None, torch.float16)
    bitmap, _, _ = _case("expand", "bitmap", {}, None, None, torch.float16)
    assert tuning.reconstruct_min_m(cpu, "expand", nm, D) == 1024
    assert tuning.reconstruct_min_m(cpu, "contract", nm, D) == 512
    assert tuning.reconstruct_min_m(cpu, "expand", nm, D, backend="cuda") == 256
    assert tuning.reconstruct_min_m(cpu, "expand", bitmap, D, backend="cuda") == 64
    assert _choose(64, bitmap) == ("reconstruct", False)


def test_forcing_a_strategy_that_cannot_run_raises(monkeypatch):
    factor, U, bias = _case("expand", "nm", {"n": 1, "m": 4}, None, None, torch.float16)
    x = torch.randn(3, D).half()
    monkeypatch.setenv("FIPS_KERNELS_STRATEGY", "sparse24")
    with pytest.raises(ValueError, match="'sparse24' cannot run this expand layer") as info:
        STRATEGIES.expand(x, U, factor, bias)
    assert "2:4 nm factor, got the 1:4 pattern" in str(info.value) and "CUDA device" in str(info.value)
    monkeypatch.setenv("FIPS_KERNELS_STRATEGY", "tile_reconstruct")
    with pytest.raises(ValueError, match="not a strategy of the cuda backend"):
        STRATEGIES.expand(x, U, factor, bias)


# ---------------------------------------------------------------- the sparse_mm wrapper

@needs_op
def test_sparse_mm_options():
    factor, _, bias = _case("expand", "bitmap", {}, None, None, torch.float16, r=300)
    a = torch.randn(5, 300).half()
    ref = spmm.sparse_mm(a, factor, bias)
    for split_k in (1, 2, 3):
        out = spmm.sparse_mm(a, factor, bias, split_k=split_k)
        torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
        assert torch.equal(out, spmm.sparse_mm(a, factor, bias, split_k=split_k))  # deterministic
    wide = spmm.sparse_mm(a, factor, bias, out_dtype=torch.float32)
    assert wide.dtype == torch.float32
    torch.testing.assert_close(wide.half(), ref, rtol=2e-3, atol=2e-3)
    # a base address that is not 16-byte aligned (a view 2 bytes in) is copied, not misread
    buf = torch.randn(5 * 300 + 1).half()
    odd = buf[1:].view(5, 300)
    assert odd.data_ptr() % 16
    torch.testing.assert_close(spmm.sparse_mm(odd, factor, bias), spmm.sparse_mm(odd.clone(), factor, bias),
                               rtol=0, atol=0)
    # strided input
    torch.testing.assert_close(spmm.sparse_mm(a.t().contiguous().t(), factor, bias), ref, rtol=0, atol=0)


@needs_op
def test_sparse_mm_transposed_int8_base():
    U = (torch.randn(D, R) / R ** 0.5).half()
    base = SparseFactor.pack(U, "dense", qbits=8, qgroup=D)
    z = torch.randn(6, R).half()
    bias = torch.randn(D).half()
    out = spmm.sparse_mm(z, base, bias, transpose=True)
    Ud = base.to_dense()
    truth = z.double() @ Ud.double().t() + bias.double()
    assert out.shape == (6, D)
    assert_close_to_truth(out, truth, z @ Ud.t() + bias, eps=1e-3 * truth.abs().max().item())


def test_sparse_mm_degenerate_shapes_need_no_kernel():
    factor, _, bias = _case("expand", "nm", {"n": 1, "m": 4}, None, None, torch.float16)
    assert spmm.sparse_mm(torch.randn(0, R).half(), factor, bias).shape == (0, H)
    empty = SparseFactor.pack(torch.zeros(0, H).half(), "dense")
    out = spmm.sparse_mm(torch.randn(3, 0).half(), empty, bias[:H], activation="gelu")
    torch.testing.assert_close(out, F.gelu(bias.float()).half().expand(3, H))


@pytest.mark.parametrize("change,message", [
    (dict(a=torch.randn(3, R)), "must be float16 or bfloat16"),
    (dict(a=torch.randn(3, R + 1).half()), "A has 46 columns but B has 45 rows"),
    (dict(a=torch.randn(3, R).bfloat16()), "dtype mismatch: A is torch.bfloat16"),
    (dict(a=torch.randn(R).half()), "must be a 2-D tensor"),
    (dict(bias=torch.randn(H + 1).half()), r"bias must have shape \(70,\)"),
    (dict(bias=torch.randn(H)), "bias is torch.float32"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(split_k=-1), "split_k must be an int >= 0"),
    (dict(out_dtype=torch.float64), "out_dtype must be None"),
    (dict(transpose=True), "transpose=True needs a dense factor"),
    (dict(factor="tile"), r"bitmap tile \(16, 32\) is not supported"),
    (dict(factor="csr"), "no cuda kernel for the 'csr' format"),
])
def test_sparse_mm_refuses_bad_arguments(change, message):
    factor, _, bias = _case("expand", "nm", {"n": 1, "m": 4}, None, None, torch.float16)
    change = dict(change)
    if change.get("factor") == "tile":
        change["factor"], _ = make_factor(R, H, "bitmap", {"tile": (16, 32)}, dtype=torch.float16)
    elif change.get("factor") == "csr":
        change["factor"], _ = make_factor(R, H, "csr", {}, dtype=torch.float16)
    args = dict(a=torch.randn(3, R).half(), factor=factor, bias=bias, activation=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        spmm.sparse_mm(**args)


# ---------------------------------------------------------------- the 2:4 path (conversion replaced)

def test_sparse24_reasons(sm90, monkeypatch):
    def reasons(kind="expand", fmt="nm", opts={"n": 2, "m": 4}, qbits=None, dtype=torch.float16, h=128,
                device=torch.device("cuda")):
        factor, _, _ = _case(kind, fmt, opts, qbits, None, torch.float16, h=h)
        return sparse24.reasons(factor, kind, dtype, device)

    assert reasons() == [] and reasons("contract") == []
    assert reasons(opts={"n": 1, "m": 4}) == ["sparse tensor cores need a 2:4 nm factor, got the 1:4 pattern (nm)"]
    assert reasons(fmt="bitmap", opts={}) == [
        "sparse tensor cores need a 2:4 nm factor, got the unstructured pattern (bitmap)"]
    assert reasons(qbits=8) == ["sparse tensor cores need float factor values, not int8"]
    assert reasons(dtype=torch.float32) == ["sparse tensor cores need float16 or bfloat16, not float32"]
    assert reasons(h=70) == ["the hidden width h=70 is not a positive multiple of 64 (torch's semi-structured "
                             "kernels; padding h would copy x or y on every call)"]
    assert reasons(device=torch.device("cpu")) == ["sparse tensor cores need a CUDA device (input is on cpu)"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert reasons() == ["sparse tensor cores need compute capability 8.0+, this GPU is 7.5"]


@pytest.fixture
def dense_conversion(monkeypatch):
    """torch's conversion replaced by a dense copy, the device requirement dropped: the glue runs on the CPU."""
    calls = []

    def convert(t):
        calls.append(tuple(t.shape))
        return t.clone()

    real = sparse24.reasons
    monkeypatch.setattr(sparse24, "_convert", convert)
    monkeypatch.setattr(sparse24, "reasons", lambda *a: [r for r in real(*a) if "CUDA device" not in r])
    sparse24.clear_packs()
    yield calls
    sparse24.clear_packs()


@pytest.mark.parametrize("base_bits", [None, 8], ids=["fp-base", "int8-base"])
@pytest.mark.parametrize("kind", ["expand", "contract"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse24_glue_pads_and_caches(dense_conversion, base_bits, kind, dtype):
    h = 128
    factor, base, bias = _case(kind, "nm", {"n": 2, "m": 4}, None, base_bits, dtype, h=h)
    x = torch.randn(33, D if kind == "expand" else h).to(dtype)
    activation = "gelu" if kind == "expand" else "none"
    run = (lambda: STRATEGIES.expand(x, base, factor, bias, activation, strategy="sparse24")) \
        if kind == "expand" else (lambda: STRATEGIES.contract(x, base, factor, bias, strategy="sparse24"))
    _check(run(), x, base, factor, kind, bias, activation)
    r_pad = 64  # R = 45 padded
    assert dense_conversion == [(h, r_pad) if kind == "expand" else (r_pad, h)]
    entries = len(sparse24._cache)
    size = sparse24.packed_bytes()
    assert size == (h * r_pad + D * r_pad) * 2  # the padded Bᵀ and the padded base
    run()
    assert len(dense_conversion) == 1 and sparse24.packed_bytes() == size  # cached
    with torch.no_grad():
        factor.values.mul_(2)  # an in-place update: a new version, packed again, the old pack dropped
    _check(run(), x, base, factor, kind, bias, activation)
    assert len(dense_conversion) == 2 and len(sparse24._cache) == entries
    sparse24.clear_packs()
    assert sparse24.packed_bytes() == 0


def test_pack_for_cuda_packs_only_what_the_cuda_backend_would_run(dense_conversion, monkeypatch):
    torch.manual_seed(0)
    group = fk.factorize_group([nn.Linear(64, 128), nn.Linear(128, 64)], pattern="2:4").half()
    other = fk.factorize_group([nn.Linear(64, 128), nn.Linear(128, 64)], pattern="1:4").half()
    model = nn.Sequential(group, other)
    assert sparse24.pack_for_cuda(model) == 0  # on the CPU the cuda backend cannot run
    cuda = type(dispatch.backend("cuda"))
    monkeypatch.setattr(cuda, "availability_reasons", lambda self: [])
    monkeypatch.setattr(cuda, "device_reasons", lambda self, device: [])
    r_pad = -(-group.base.rank // 64) * 64
    added = sparse24.pack_for_cuda(model)
    expected = 2 * 128 * r_pad * 2 + (64 * r_pad * 2 if r_pad != group.base.rank else 0)
    assert added == expected == sparse24.packed_bytes()
    assert len(dense_conversion) == 2  # the 2:4 group's layers only
    assert sparse24.pack_for_cuda(model) == 0  # already packed
    x = torch.randn(4, 64).half()
    y = STRATEGIES.expand(x, group.base.operand, group[0].factor, group[0].bias.detach(), strategy="sparse24")
    _check(y, x, group.base.operand, group[0].factor, "expand", group[0].bias.detach())
    assert len(dense_conversion) == 2


def test_a_failed_conversion_falls_back_and_becomes_a_reason(monkeypatch, dense_conversion):
    def broken(t):
        raise RuntimeError("no cuSPARSELt here")

    monkeypatch.setattr(sparse24, "_convert", broken)
    factor, U, bias = _case("expand", "nm", {"n": 2, "m": 4}, None, None, torch.float16, h=128)
    assert sparse24.operands(U, factor, "expand") is None
    with pytest.raises(sparse24.ConversionError, match="no cuSPARSELt here"):
        sparse24.operands(U, factor, "expand", strict=True)
    why = sparse24.reasons(factor, "expand", torch.float16, torch.device("cpu"))
    assert any("semi-structured conversion failed" in r and "no cuSPARSELt here" in r for r in why)


def test_no_packing_during_cuda_graph_capture(dense_conversion, monkeypatch):
    factor, U, _ = _case("contract", "nm", {"n": 2, "m": 4}, None, None, torch.float16, h=128)
    monkeypatch.setattr(sparse24, "_capturing", lambda device: True)
    assert sparse24.operands(U, factor, "contract") is None  # recorded kernels would not run: no pack now
    with pytest.raises(sparse24.ConversionError, match="pack_for_cuda"):
        sparse24.operands(U, factor, "contract", strict=True)
    assert dense_conversion == [] and sparse24.packed_bytes() == 0
    monkeypatch.setattr(sparse24, "_capturing", lambda device: False)
    packed = sparse24.operands(U, factor, "contract")
    monkeypatch.setattr(sparse24, "_capturing", lambda device: True)
    again = sparse24.operands(U, factor, "contract")
    assert again[0] is packed[0] and again[1] is packed[1] and len(dense_conversion) == 1


# ---------------------------------------------------------------- benchmark providers

def test_cuda_providers_are_registered_with_reasons():
    names = [n for n in providers.PROVIDERS if n.startswith("cuda_")]
    assert names == ["cuda_factored", "cuda_reconstruct", "cuda_sparse24"]
    cpu = torch.device("cpu")
    for n in names:
        why = providers.PROVIDERS[n].not_supported_reasons(cpu, torch.float16, "2:4")
        assert any("needs a CUDA GPU" in r for r in why)
        assert any("fp16/bf16" in r for r in providers.PROVIDERS[n].not_supported_reasons(cpu, torch.float32, "1:4"))
    assert any("2:4 pattern" in r for r in providers.PROVIDERS["cuda_sparse24"].not_supported_reasons(
        cpu, torch.float16, "1:4"))


def test_every_layer_provider_is_documented():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "README.md").read_text()
    missing = [n for n in providers.PROVIDERS if f"`{n}`" not in text]
    assert not missing, f"benchmarks/results/README.md does not describe {missing}"


# ---------------------------------------------------------------- GPU

GPU_CASES = [CASES[1], CASES[2], CASES[5], CASES[7], ("nm", {"n": 1, "m": 4}, 8, 8)]
GPU_IDS = ["nm1:4", "nm2:4", "bitmap", "nm1:4-int8", "nm1:4-int8+int8base"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
@pytest.mark.parametrize("kind", ["expand", "contract"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_layer_ops_run_on_cuda_and_match(case, kind, dtype):
    if not HAS_OP:
        pytest.fail(f"sparse_mm unavailable on a GPU machine: {spmm.unavailable_reason()}")
    dev = torch.device("cuda")
    factor, base, bias = _case(kind, *case, dtype, device=dev, d=96, r=130, h=256)
    p = Problem.for_layer(kind, kind, factor.layout, dtype, dev, 1, 96)
    assert dispatch.select(p).name == "cuda", dispatch.explain(p)
    in_f = 96 if kind == "expand" else 256
    for i, M in enumerate((1, 2, 7, 16, 33, 128, 4096)):
        lead = (M,) if i % 2 == 0 else (1, M)
        x = torch.randn(*lead, in_f, device=dev).to(dtype)
        b = bias if i % 2 == 0 else None
        out = fips_linear(x, base, factor, kind, b)
        _check(out.reshape(M, -1), x.reshape(M, -1), base, factor, kind, b)
    if kind == "expand":
        up, _, bu = _case(kind, *case, dtype, device=dev, d=96, r=130, h=256)
        x = torch.randn(33, 96, device=dev).to(dtype)
        with fk.use_backend("reference"):
            ref = gate_up(x, base, factor, up, bias, bu)
        torch.testing.assert_close(gate_up(x, base, factor, up, bias, bu), ref, rtol=2e-2, atol=2e-2)


def _semi_structured_or_skip(base, factor, kind):
    why = sparse24.reasons(factor, kind, factor.dtype, factor.device)
    if why:
        pytest.skip("2:4 sparse tensor cores unavailable: " + "; ".join(why))
    try:
        sparse24.operands(base, factor, kind, strict=True)
    except sparse24.ConversionError as exc:
        pytest.skip(f"torch's semi-structured conversion fails here: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["expand", "contract"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sparse24_matches_reference(kind, dtype, monkeypatch):
    dev = torch.device("cuda")
    factor, base, bias = _case(kind, "nm", {"n": 2, "m": 4}, None, None, dtype, device=dev, d=96, r=130, h=256)
    _semi_structured_or_skip(base, factor, kind)
    x = torch.randn(4096, 96 if kind == "expand" else 256, device=dev).to(dtype)
    _check(_run(kind, x, base, factor, bias, "sparse24"), x, base, factor, kind, bias)
    monkeypatch.setenv("FIPS_KERNELS_STRATEGY", "sparse24")
    _check(fips_linear(x, base, factor, kind, bias), x, base, factor, kind, bias)


def _gpu_group(pattern):
    torch.manual_seed(0)
    return fk.factorize_group([nn.Linear(96, 256), nn.Linear(256, 96)], pattern=pattern).to("cuda", torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [5, 4096])
def test_gpu_torch_compile_matches_eager(M):
    torch._dynamo.reset()
    group = _gpu_group("1:4")
    model = nn.Sequential(group[0], nn.GELU(), group[1])
    x = torch.randn(M, 96, device="cuda", dtype=torch.float16)
    with fk.use_backend("cuda"), torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern,M", [("1:4", 5), ("1:4", 4096), ("2:4", 4096)])
def test_gpu_cuda_graph_replay_matches_eager(pattern, M):
    group = _gpu_group(pattern)
    layer = group[0]
    if pattern == "2:4":
        _semi_structured_or_skip(group.base.operand, layer.factor, "expand")
        assert pack_for_cuda(group) >= 0
    static_x = torch.randn(M, 96, device="cuda", dtype=torch.float16)
    with fk.use_backend("cuda"), torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        torch.testing.assert_close(static_y, layer(new_x), rtol=1e-3, atol=1e-3)
