"""The reference semantics equal F.linear with the reconstructed weight."""
import pytest
import torch
import torch.nn.functional as F

from fips_kernels import reference

from conftest import FORMAT_CASES, FORMAT_IDS, assert_close_to_truth, make_factor

# (d, r, h): odd sizes, an overcomplete base (r > d) and r = 1
DIMS = [(7, 5, 13), (9, 12, 20), (16, 1, 33)]
LEADING = [(0,), (1,), (5,), (2, 3), (1, 1, 4)]


def _layer(kind, d, r, h, dtype, bias, device="cpu"):
    U = torch.randn(d, r, dtype=torch.float64, device=device) / r ** 0.5
    V = torch.randn(r, h, dtype=torch.float64, device=device) * (torch.rand(r, h, device=device) < 0.4)
    b = torch.randn(h if kind == "expand" else d, dtype=torch.float64, device=device) if bias else None
    return U, V, b


@pytest.mark.parametrize("kind", ["expand", "contract"])
@pytest.mark.parametrize("d,r,h", DIMS)
@pytest.mark.parametrize("lead", LEADING, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear_with_reconstructed_weight_fp32(device, kind, d, r, h, lead, bias):
    U, V, b = _layer(kind, d, r, h, torch.float32, bias, device)
    in_f = d if kind == "expand" else h
    x = torch.randn(*lead, in_f, dtype=torch.float64, device=device)
    W = reference.linear_weight(U, V, kind)
    assert W.shape == ((h, d) if kind == "expand" else (d, h))
    truth = F.linear(x, W, b)
    # fp64 is exact up to rounding of the association order
    torch.testing.assert_close(reference.fips_linear(x, U, V, kind, b), truth, rtol=1e-12, atol=1e-12)
    f32 = [t.float() if t is not None else None for t in (x, U, V, b)]
    out = reference.fips_linear(f32[0], f32[1], f32[2], kind, f32[3])
    assert out.dtype == torch.float32 and out.shape == (*lead, W.shape[0])
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["expand", "contract"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_fp32(device, kind, dtype):
    d, r, h = 64, 96, 256
    U, V, b = _layer(kind, d, r, h, dtype, True, device)
    x = torch.randn(3, 11, d if kind == "expand" else h, dtype=torch.float64, device=device)
    lo = [t.to(dtype) for t in (x, U, V, b)]
    truth = F.linear(lo[0].double(), reference.linear_weight(lo[1].double(), lo[2].double(), kind), lo[3].double())
    out = reference.fips_linear(*lo[:3], kind, lo[3])
    assert out.dtype == dtype
    # baseline: what plain PyTorch does in this dtype (a materialised half-precision W)
    W_lo = reference.linear_weight(lo[1].double(), lo[2].double(), kind).to(dtype)
    assert_close_to_truth(out, truth, F.linear(lo[0], W_lo, lo[3]))


@pytest.mark.parametrize("kind", ["expand", "contract"])
@pytest.mark.parametrize("fmt,opts", FORMAT_CASES, ids=FORMAT_IDS)
def test_sparse_factor_equals_its_dense_matrix(kind, fmt, opts):
    d, r, h = 10, 24, 40
    K, N = (r, h) if kind == "expand" else (h, r)
    factor, B = make_factor(K, N, fmt, opts, dtype=torch.float64)
    V = B if kind == "expand" else B.t()
    U = torch.randn(d, r, dtype=torch.float64)
    x = torch.randn(6, d if kind == "expand" else h, dtype=torch.float64)
    assert torch.equal(reference.factor_matrix(factor, kind), V)
    torch.testing.assert_close(reference.fips_linear(x, U, factor, kind), reference.fips_linear(x, U, V, kind),
                               rtol=1e-13, atol=1e-13)


def test_reconstruct_is_U_times_V():
    U, V = torch.randn(7, 5, dtype=torch.float64), torch.randn(5, 13, dtype=torch.float64)
    torch.testing.assert_close(reference.reconstruct(U, V), U @ V, rtol=1e-14, atol=1e-14)
    assert torch.equal(reference.linear_weight(U, V, "expand"), reference.reconstruct(U, V).t())
    assert torch.equal(reference.linear_weight(U, V, "contract"), reference.reconstruct(U, V))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        reference.fips_linear(torch.randn(2, 3), torch.randn(3, 2), torch.randn(2, 4), "sideways")
