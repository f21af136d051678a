"""Quantised sparse factors: the format rules, the ops' checks, and the
projected-gradient-descent factorisation with its special cases. (Every
backend's kernels on int8/int4 factors and the int8 base are in
``test_backend_conformance.py``.)"""
import pytest
import torch
from torch import nn

import fips_kernels as fk
from fips_kernels.formats import FormatError, SparseFactor, decode_q, qmax
from fips_kernels.ops import fips_linear
from fips_kernels.pgd import pgd_factorize, quantize_dequantize

from conftest import layer_case, make_factor

QUANT_CASES = [("dense", {}), ("nm", {"n": 1, "m": 4}), ("nm", {"n": 2, "m": 4}), ("bitmap", {"tile": (16, 32)})]
QUANT_IDS = ["dense", "nm1:4", "nm2:4", "bitmap16x32"]


# ---------------------------------------------------------------- formats

@pytest.mark.parametrize("fmt,opts", QUANT_CASES, ids=QUANT_IDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(13, 7), (130, 33), (1, 1), (64, 0)], ids=str)
def test_quantised_round_trip_and_grid(fmt, opts, bits, shape):
    f, B = make_factor(*shape, fmt, opts, dtype=torch.float16)
    q = f.quantize(bits, qgroup=32)
    assert q.quantized and q.values.dtype == torch.int8 and q.dtype == torch.float16
    ints = decode_q(q.values, bits)
    assert ints.numel() == 0 or int(ints.abs().max()) <= qmax(bits)
    D = q.to_dense()
    assert D.dtype == torch.float16 and D.shape == shape
    # every element within half a grid step of the original (scales from the group's max),
    # plus the fp16 rounding of the dequantised value
    s = fk.formats.scale_matrix(q.scales, shape[0], 32)
    slack = 0.5 * s * (1 + 1e-3) + B.float().abs() * 2.0 ** -10 + 1e-7
    assert bool(((D.float() - B.float()).abs() <= slack).all())
    assert bool(((B == 0) <= (D == 0)).all())  # pruned entries stay zero
    again = SparseFactor.from_parts(fmt, q.meta, q.values, q.aux_tensors, scales=q.scales)
    assert torch.equal(again.to_dense(), D)
    assert q.nnz == f.nnz


def test_quantised_bytes_by_hand():
    f, _ = make_factor(16, 3, "nm", {"n": 1, "m": 4}, dtype=torch.float16)
    # G = 4 groups → 4x3 values; 2-bit indices: 1 word row of 3 int32; scales: ceil(16/8)=2 rows x 3 fp16
    assert f.quantize(8, qgroup=8).nbytes == 4 * 3 * 1 + 3 * 4 + 2 * 3 * 2
    assert f.quantize(4, qgroup=8).nbytes == 2 * 3 * 1 + 3 * 4 + 2 * 3 * 2  # two int4 values per byte
    d = SparseFactor.pack(torch.randn(10, 5), "dense", qbits=4, qgroup=10)
    assert d.values.shape == (5, 5) and d.nbytes == 25 + 1 * 5 * 4


def test_quantised_validation_rules():
    q = SparseFactor.pack(torch.randn(8, 3), "dense", qbits=8, qgroup=4)
    bad = q.values.clone()
    bad[0, 0] = -128
    with pytest.raises(FormatError, match="outside the symmetric int8 grid -127..127"):
        SparseFactor("dense", (8, 3), bad, scales=q.scales, qbits=8, qgroup=4)
    with pytest.raises(FormatError, match=r"scales must have shape \(2, 3\)"):
        SparseFactor("dense", (8, 3), q.values, scales=q.scales[:1], qbits=8, qgroup=4)
    with pytest.raises(FormatError, match="quantised values must be an int8 tensor"):
        SparseFactor("dense", (8, 3), q.values.float(), scales=q.scales, qbits=8, qgroup=4)
    q4 = SparseFactor.pack(torch.randn(7, 3), "dense", qbits=4, qgroup=4)
    bad = q4.values.clone()
    bad[-1, 0] = bad[-1, 0] | 0x30  # the unused high nibble of the last byte row
    with pytest.raises(FormatError, match="unused half of the last int4 byte row"):
        SparseFactor("dense", (7, 3), bad, scales=q4.scales, qbits=4, qgroup=4)
    with pytest.raises(FormatError, match="csr format cannot be quantised"):
        SparseFactor.pack(torch.eye(4), "csr", qbits=8)
    with pytest.raises(FormatError, match="bits must be 8 or 4"):
        SparseFactor.pack(torch.eye(4), "dense", qbits=3)


# ---------------------------------------------------------------- layers and kernels

def _case(kind, fmt, opts, bits, device, dtype=torch.float32, base_bits=None):
    return layer_case(kind, fmt, opts, bits, base_bits, dtype=dtype, device=device)


@pytest.mark.parametrize("kind", ["expand", "contract"])
def test_opcheck_quantised(kind):
    q, base, bias = _case(kind, "nm", {"n": 1, "m": 4}, 4, "cpu", base_bits=8)
    x = torch.randn(3, 37 if kind == "expand" else 70)
    aux = list(q.aux_tensors) + [None, None]
    op = getattr(torch.ops.fips_kernels, kind)
    torch.library.opcheck(op, (x, base.values, base.scales, q.values, aux[0], aux[1], q.scales, bias, q.format,
                               q.meta))
    torch.library.opcheck(torch.ops.fips_kernels.reconstruct,
                          (base.values, base.scales, q.values, aux[0], aux[1], q.scales, q.format, q.meta, kind))


def test_bad_quantised_input_is_refused():
    q, base, bias = _case("expand", "nm", {"n": 1, "m": 4}, 8, "cpu", base_bits=8)
    aux = list(q.aux_tensors) + [None, None]
    x = torch.randn(2, 37)
    with pytest.raises(ValueError, match=r"factor scales must have shape \(3, 70\)"):
        torch.ops.fips_kernels.expand(x, base.values, base.scales, q.values, aux[0], aux[1], q.scales[:1], bias,
                                      q.format, q.meta)
    with pytest.raises(TypeError, match="a base with U_scales must be int8"):
        torch.ops.fips_kernels.expand(x, base.values.float(), base.scales, q.values, aux[0], aux[1], q.scales,
                                      bias, q.format, q.meta)
    with pytest.raises(TypeError, match="dtype mismatch: input is torch.float16"):
        fips_linear(x.half(), base, q, "expand", bias)


def test_group_quantize_keeps_outputs_close_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    layers = [nn.Linear(32, 96), nn.Linear(96, 32), nn.Linear(32, 96), nn.Linear(96, 32)]
    g = fk.factorize_group(layers, pattern="1:4")
    x = torch.randn(4, 32)
    before = g[0](x).detach()
    float_bytes = g.nbytes()
    g.quantize_(8, qgroup=32)
    assert g.base.quantized and all(layer.factor.quantized for layer in g)
    assert g.nbytes() < 0.6 * float_bytes
    after = g[0](x).detach()
    assert (after - before).norm() / before.norm() < 0.02  # int8: within ~1 % here
    fk.save(g, tmp_path / "q.safetensors")
    back = fk.load(tmp_path / "q.safetensors")
    assert torch.equal(back[0](x), g[0](x)) and back.base.quantized
    assert torch.equal(back[1].V_values, g[1].V_values) and back[1].V_values.dtype == torch.int8


# ---------------------------------------------------------------- PGD and its special cases

def _one(d, H):
    return dict(widths=[H], kinds=["contract"])


def test_pgd_without_constraints_reaches_the_truncated_svd():
    torch.manual_seed(0)
    M = torch.randn(16, 24) @ torch.diag(torch.linspace(3, 0.1, 24)) @ torch.randn(24, 24) / 5
    r = 5
    P, S, Qh = torch.linalg.svd(M, full_matrices=False)
    svd_err = float(S[r:].norm() / S.norm())
    res = pgd_factorize(M, torch.randn(16, r), torch.randn(r, 24), steps=150, **_one(16, 24))
    assert res.losses[-1] == pytest.approx(svd_err, rel=1e-3)
    assert all(b <= a + 1e-6 for a, b in zip(res.losses, res.losses[1:]))


def _lloyd(X, C, steps):
    """Plain k-means on the columns of X (d × n) from centroids C (d × k)."""
    for _ in range(steps):
        assign = torch.cdist(X.t(), C.t()).argmin(1)
        C = torch.stack([X[:, assign == k].mean(1) for k in range(C.shape[1])], 1)
    return C, torch.cdist(X.t(), C.t()).argmin(1)


def test_pgd_with_one_unit_entry_per_column_is_k_means():
    torch.manual_seed(0)
    centers = torch.randn(6, 4) * 4
    labels = torch.arange(60) % 4
    X = centers[:, labels] + 0.3 * torch.randn(6, 60)
    C0 = X[:, [0, 1, 2, 3]].clone()  # one point of each cluster
    V0 = torch.zeros(4, 60).scatter_(0, torch.cdist(X.t(), C0.t()).argmin(1, keepdim=True).t(), 1.0)
    res = pgd_factorize(X, C0, V0, vq=True, steps=10, **_one(6, 60))
    C, assign = _lloyd(X, C0, 10)
    assert torch.equal(res.V.argmax(0), assign)
    assert torch.equal(res.V.sum(0), torch.ones(60)) and set(res.V.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(res.U, C, rtol=1e-4, atol=1e-4)


def test_pgd_with_sparsity_is_sparse_coding_and_beats_svd_then_prune():
    torch.manual_seed(0)
    d, r, H, k = 24, 8, 80, 2
    D = torch.linalg.qr(torch.randn(d, r))[0]
    codes = torch.zeros(r, H)
    for c in range(H):  # every column uses k atoms: an exactly sparse factorisation exists
        idx = torch.randperm(r)[:k]
        codes[idx, c] = torch.randn(k) + torch.sign(torch.randn(k)) * 2
    M = D @ codes + 0.01 * torch.randn(d, H)
    P, S, Qh = torch.linalg.svd(M, full_matrices=False)
    U0, V0 = P[:, :r], S[:r, None] * Qh[:r]
    res = pgd_factorize(M, U0, V0, pattern=f"top{k}", steps=200, **_one(d, H))
    assert int((res.V != 0).sum(0).max()) <= k
    assert res.losses[-1] < 0.5 * res.losses[0]  # from SVD-then-prune (the first, projected point)
    assert res.losses[-1] < 0.05


def test_pgd_lowers_the_error_below_svd_then_quantise_at_the_same_bytes():
    torch.manual_seed(0)
    d, h = 32, 96
    U0 = torch.randn(d, 12)
    layers = []
    for kind in ("expand", "contract") * 2:
        W = U0 @ torch.randn(12, h) + 0.05 * torch.randn(d, h)
        lin = nn.Linear(d, h) if kind == "expand" else nn.Linear(h, d)
        with torch.no_grad():
            lin.weight.copy_(W.t() if kind == "expand" else W)
        layers.append(lin)
    for bits in (8, 4):
        kw = dict(budget=0.5, pattern="1:4", qbits=bits, qgroup=32, base_qbits=8)
        svd = fk.factorize_group(layers, method="svd", **kw)
        pgd = fk.factorize_group(layers, method="pgd", pgd_steps=60, **kw)
        assert svd.nbytes() == pgd.nbytes()
        err_svd, err_pgd = sum(svd.info["relative_errors"]), sum(pgd.info["relative_errors"])
        assert err_pgd < 0.9 * err_svd, (bits, err_svd, err_pgd)


def test_quantize_dequantize_is_the_storage_grid():
    B = torch.randn(40, 6)
    grid = quantize_dequantize(B, 4, 16)
    stored = SparseFactor.pack(B, "dense", qbits=4, qgroup=16)
    torch.testing.assert_close(stored.to_dense(), grid, rtol=1e-6, atol=1e-6)
