"""What is specific to the Triton backend: split-K, its reasons, the
``FIPS_KERNELS_STRATEGY`` errors, tile-reconstruct's list lengths, autotune
pruning and the autotuned launch. The layer ops of every format, quantisation,
dtype and strategy against the reference are in
``test_backend_conformance.py``. Every test here pins ``use_backend("triton")``.

On CPU these run under ``TRITON_INTERPRET=1`` (set by conftest before
anything imports triton); on a GPU they run compiled.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fips_kernels as fk
from fips_kernels import dispatch
from fips_kernels.dispatch import Problem
from fips_kernels.formats import Layout
from fips_kernels.ops import fips_linear

from conftest import HAS_CUDA, assert_close_to_truth, check_layer, layer_case, make_factor

pytestmark = pytest.mark.skipif(
    not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a GPU or TRITON_INTERPRET=1")

TRITON_FORMATS = [
    ("dense", {}),
    ("nm", {"n": 1, "m": 4}),
    ("nm", {"n": 2, "m": 4}),
    ("bitmap", {"tile": (16, 32)}),
    ("bitmap", {}),
]
TRITON_IDS = ["dense", "nm1:4", "nm2:4", "bitmap16x32", "bitmap64x64"]
MS = [1, 3, 17, 64, 130]
D, R, H = 37, 45, 70  # none a multiple of 16, 32 or 4 (R: an N:M tail on expand factors)


@pytest.fixture
def dev():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def triton_only():
    with fk.use_backend("triton"):
        yield


@pytest.fixture
def strategy(request, monkeypatch):
    monkeypatch.setenv("FIPS_KERNELS_STRATEGY", request.param)
    return request.param


def _case(kind, fmt, opts, dtype, device, d=D, r=R, h=H):
    K, N = (r, h) if kind == "expand" else (h, r)
    factor, B = make_factor(K, N, fmt, opts, dtype=dtype, device=device, density=0.35)
    U = (torch.randn(d, r, device=device) / r ** 0.5).to(dtype)
    bias = torch.randn(h if kind == "expand" else d, device=device).to(dtype)
    return factor, B, U, bias


def _problem(fmt, meta, dtype, dev, op="expand"):
    return Problem.for_layer(op, op, Layout.from_meta(fmt, meta), dtype, dev, 4, D)


@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_split_k_is_deterministic_and_correct(dev, split_k):  # the kernel itself: no dispatch
    from fips_kernels.triton.sparse_matmul import sparse_matmul

    factor, B, _, bias = _case("expand", "nm", {"n": 1, "m": 4}, torch.float32, dev, r=300, h=70)
    a = torch.randn(3, 300, device=dev)
    out = sparse_matmul(a, factor, bias, split_k=split_k)
    torch.testing.assert_close(out, a @ B + bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, sparse_matmul(a, factor, bias, split_k=split_k))


def test_unsupported_cases_fall_back_with_reasons(dev):
    p = _problem("csr", (R, H, 0, 0), torch.float32, dev)
    reasons = dispatch.not_supported_reasons(p)["triton"]
    assert reasons == ["no triton kernel for the 'csr' format (it runs dense, nm, bitmap, ell)"]
    assert dispatch.select(p).name == "reference"
    p = _problem("bitmap", (R, H, 24, 32), torch.float32, dev)
    assert any("power of two" in r for r in dispatch.not_supported_reasons(p)["triton"])
    p = _problem("nm", (R, H, 1, 4), torch.float64, dev)
    assert any("float64" in r for r in dispatch.not_supported_reasons(p)["triton"])
    p = _problem("ell", (R, H, 2, 0), torch.float32, dev, op="gate_up")
    assert any("no fused Triton gate/up for ell" in r for r in dispatch.not_supported_reasons(p)["triton"])


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's bf16 (CPU only)")
def test_bf16_under_the_interpreter_is_a_reason_not_garbage():
    """The interpreter's bf16 arithmetic is wrong (errors up to 1e21): automatic dispatch
    must not pick triton for bf16 CPU tensors, and forcing it must say why."""
    factor, base, bias = layer_case("expand", "nm", {"n": 1, "m": 4}, dtype=torch.bfloat16)
    p = Problem.for_layer("expand", "expand", factor.layout, torch.bfloat16, "cpu", 5, D)
    assert any("bfloat16 is not supported under the Triton interpreter" in r
               for r in dispatch.not_supported_reasons(p)["triton"])
    x = torch.randn(5, D).bfloat16()
    check_layer(fips_linear(x, base, factor, "expand", bias), x, base, factor, "expand", bias)
    with fk.use_backend("triton"), pytest.raises(fk.BackendUnavailable, match="bfloat16"):
        fips_linear(x, base, factor, "expand", bias)


def test_bad_strategy_name_is_refused(dev, monkeypatch, triton_only):
    factor, _, U, bias = _case("expand", "nm", {"n": 1, "m": 4}, torch.float32, dev)
    monkeypatch.setenv("FIPS_KERNELS_STRATEGY", "fastest")
    with pytest.raises(ValueError, match="FIPS_KERNELS_STRATEGY='fastest'"):
        fips_linear(torch.randn(2, D, device=dev), U, factor, "expand", bias)


def test_fips_linear_module_runs_on_triton(dev):
    from torch import nn

    group = fk.factorize_group([nn.Linear(D, H), nn.Linear(H, D)], pattern="2:4").to(dev)
    x = torch.randn(5, D, device=dev)
    with fk.use_backend("triton"):
        y = group[1](F.gelu(group[0](x)))
    with fk.use_backend("reference"):
        ref = group[1](F.gelu(group[0](x)))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- tile-reconstruct (ell factors)

def _ell_case(kind, k, dtype, device, d=D, r=R, h=H):
    from fips_kernels.formats import SparseFactor

    V = torch.randn(r, h, device=device)
    keep = torch.topk(V.abs(), k, dim=0).indices  # k non-zeros per hidden unit (column of V)
    V = (V * torch.zeros_like(V, dtype=torch.bool).scatter_(0, keep, True)).to(dtype)
    B = V if kind == "expand" else V.t()
    factor = SparseFactor.pack(B.contiguous(), "ell", k=k, axis=0 if kind == "expand" else 1)
    U = (torch.randn(d, r, device=device) / r ** 0.5).to(dtype)
    bias = torch.randn(h if kind == "expand" else d, device=device).to(dtype)
    return factor, B, U, bias


@pytest.mark.parametrize("strategy", ["tile_reconstruct", "reconstruct"], indirect=True)
@pytest.mark.parametrize("k", [1, 16])
@pytest.mark.parametrize("kind", ["expand", "contract"])
def test_tile_reconstruct_list_lengths(dev, strategy, k, kind, triton_only):
    """ell lists of 1 and 16 entries (the conformance suite runs k = 2)."""
    factor, B, U, bias = _ell_case(kind, k, torch.float16, dev)
    assert factor.format == "ell" and factor.k == k
    in_f = D if kind == "expand" else H
    for i, M in enumerate((1, 17)):
        x = torch.randn(M, in_f, device=dev).half()
        b = bias if i % 2 == 0 else None
        check_layer(fips_linear(x, U, factor, kind, b), x, U, factor, kind, b)


def test_strategy_that_does_not_fit_the_format_is_refused(dev, monkeypatch, triton_only):
    factor, _, U, _ = _ell_case("expand", 2, torch.float32, dev)
    monkeypatch.setenv("FIPS_KERNELS_STRATEGY", "factored")
    with pytest.raises(ValueError, match="'factored' cannot run this expand layer on the triton backend"):
        fips_linear(torch.randn(2, D, device=dev), U, factor, "expand")
    monkeypatch.setenv("FIPS_KERNELS_STRATEGY", "sparse24")
    with pytest.raises(ValueError, match="'sparse24' is not a strategy of the triton backend"):
        fips_linear(torch.randn(2, D, device=dev), U, factor, "expand")


def test_factorize_group_top_k_uses_tile_reconstruct(dev):
    from torch import nn

    group = fk.factorize_group([nn.Linear(D, H), nn.Linear(H, D)], pattern="top4").to(dev)
    assert [layer.format for layer in group] == ["ell", "ell"]
    assert group.info["parameters"] <= 0.5 * 2 * D * H
    x = torch.randn(3, D, device=dev)
    with fk.use_backend("triton"):
        y = group[1](group[0](x))
    with fk.use_backend("reference"):
        ref = group[1](group[0](x))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_autotune_configs_are_pruned_to_valid_ones():
    from fips_kernels.triton.sparse_matmul import FMT_CODES, m_bucket, prune_configs, tune_configs

    configs = tune_configs()
    base = dict(FMT=FMT_CODES["nm"], TRANS_B=False, M_BUCKET=m_bucket(3), NM_M=4, TILE_K=0, TILE_N=0)
    nm = prune_configs(configs, {}, **base)
    assert nm and all(c.kwargs["BLOCK_M"] == 16 and c.kwargs["BLOCK_K"] % 4 == 0 and c.kwargs["BLOCK_K"] >= 64
                      for c in nm)
    bitmap = prune_configs(configs, {}, **dict(base, FMT=FMT_CODES["bitmap"], TILE_K=64, TILE_N=32, M_BUCKET=128))
    assert bitmap and all((c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]) == (64, 32, 128)
                          for c in bitmap)
    trans = prune_configs(configs, {}, **dict(base, FMT=FMT_CODES["bitmap"], TILE_K=64, TILE_N=32, TRANS_B=True))
    assert trans and all((c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"]) == (32, 64) for c in trans)
    assert [m_bucket(M) for M in (1, 16, 17, 33, 65, 4096)] == [16, 16, 32, 64, 128, 128]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,opts", TRITON_FORMATS, ids=TRITON_IDS)
def test_autotuned_launch_matches_reference(fmt, opts):
    from fips_kernels.triton import sparse_matmul as sm

    if not sm.AUTOTUNE:
        pytest.skip("autotuning is off (FIPS_KERNELS_AUTOTUNE=0)")
    factor, B, _, bias = _case("expand", fmt, opts, torch.float16, torch.device("cuda"), r=1365, h=3077)
    for M in (1, 16, 130, 1024):
        a = torch.randn(M, 1365, device="cuda", dtype=torch.float16)
        out = sm.sparse_matmul(a, factor, bias)
        truth = a.double() @ B.double() + bias.double()
        baseline = (a @ B + bias)
        assert_close_to_truth(out, truth, baseline, eps=1e-3 * truth.abs().max().item())
