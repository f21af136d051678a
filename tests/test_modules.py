"""SharedBase / FiPSLinear / FiPSGroup / factorize_group / install."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fips_kernels as fk
from fips_kernels import reference
from fips_kernels.budget import stored_values

from conftest import rel_err

PATTERNS = ["unstructured", "1:4", "2:4", "2:8", "dense"]


def _mlp_group(d=24, h=40, blocks=2, bias=True, dtype=torch.float32):
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(d, h, bias=bias, dtype=dtype), nn.Linear(h, d, bias=bias, dtype=dtype)]
    return layers


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(d, h)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TinyViT(nn.Module):
    def __init__(self, d=32, h=96, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(depth))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def compress_tiny_vit(model, group_size=2, **kw):
    names_all = []
    for start in range(0, len(model.blocks), group_size):
        names = []
        for i in range(start, start + group_size):
            names += [f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"]
        group = fk.factorize_group([model.get_submodule(n) for n in names], **kw)
        fk.install(model, group, names)
        names_all += names
    return names_all


# ---------------------------------------------------------------- rank and budget

def test_rank_formula_matches_the_paper():
    # DESIGN §1: DeiT-B, p = 0.5, s = 0.75, n = 4 blocks of fc1 + fc2 -> r = 1365 (overcomplete)
    assert fk.rank_for_budget(768, [3072] * 8, 0.5, 0.75) == 1365
    d, h, n, F_, p, s = 4096, 14336, 4, 3, 0.5, 0.75
    assert fk.rank_for_budget(d, [h] * (n * F_), p, s) == math.floor(p * F_ * n * d * h / (d + (1 - s) * F_ * n * h))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_factorize_group_meets_the_budget(pattern, budget, scope):
    layers = _mlp_group(d=24, h=40, blocks=2)
    g = fk.factorize_group(layers, budget=budget, pattern=pattern, mask_scope=scope)
    dense = sum(lin.weight.numel() for lin in layers)
    stored = g.base.U.numel() + sum(layer.V_values.numel() for layer in g)
    assert g.info["parameters"] == stored
    assert stored <= budget * dense
    # and not wastefully below it: one more rank would break the budget
    r, d = g.info["rank"], 24
    s = g.info["sparsity"]
    kinds = g.info["kinds"]
    pat = ("nm", int(pattern[0]), int(pattern[2])) if ":" in pattern else (pattern, None, None)
    more = d * (r + 1) + sum(stored_values(k, r + 1, 40, pat, s) for k in kinds)
    assert more > budget * dense or pattern == "unstructured" and scope == "layer"


def test_factorize_group_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="does not share the model width"):
        fk.factorize_group([nn.Linear(8, 32), nn.Linear(16, 64)])
    with pytest.raises(ValueError, match="cannot tell whether layer 0"):
        fk.factorize_group([nn.Linear(8, 8)])
    with pytest.raises(ValueError, match="implies sparsity 0.75"):
        fk.factorize_group(_mlp_group(), pattern="1:4", sparsity=0.5)
    with pytest.raises(ValueError, match="budget"):
        fk.factorize_group(_mlp_group(), budget=1.5)
    with pytest.raises(fk.FormatError, match="pattern"):
        fk.factorize_group(_mlp_group(), pattern="3-of-4")


def test_low_rank_plus_noise_is_reconstructed():
    torch.manual_seed(1)
    d, h, r0 = 32, 64, 6
    U0 = torch.randn(d, r0)
    layers = []
    for i in range(4):
        W = U0 @ torch.randn(r0, h)  # d x h: a contract weight; expand layers store its transpose
        W = W + 1e-3 * W.std() * torch.randn_like(W)
        lin = nn.Linear(d, h) if i % 2 == 0 else nn.Linear(h, d)
        with torch.no_grad():
            lin.weight.copy_(W.t() if i % 2 == 0 else W)
        layers.append(lin)
    g = fk.factorize_group(layers, budget=0.5, pattern="dense")
    assert g.info["rank"] >= r0
    for lin, layer, err in zip(layers, g, g.info["relative_errors"]):
        assert rel_err(layer.weight.detach(), lin.weight) < 5e-3
        assert err < 5e-3
    # sparsity on top of the exact low rank: worse, but still a good approximation
    g = fk.factorize_group(layers, budget=0.5, sparsity=0.5, pattern="unstructured")
    assert max(g.info["relative_errors"]) < 0.5


def test_overcomplete_base_keeps_the_product():
    layers = _mlp_group(d=16, h=64, blocks=4)
    g = fk.factorize_group(layers, budget=0.5, pattern="dense", rank=24)  # r = 24 > d = 16
    U = g.base.U.detach()
    assert U.shape == (16, 24)
    assert torch.equal(U[:, 16:], torch.zeros(16, 8))
    V0 = g[0].V.detach()
    torch.testing.assert_close(V0[16:], V0[:8] / 32)
    for lin, layer in zip(layers, g):  # dense pattern at full rank: exact up to fp32 SVD error
        assert rel_err(layer.weight.detach(), lin.weight) < 1e-4


def test_global_and_per_layer_masks():
    layers = _mlp_group(d=16, h=48, blocks=2)
    per_layer = fk.factorize_group(layers, budget=0.5, sparsity=0.75, mask_scope="layer")
    r = per_layer.info["rank"]
    assert all(layer.factor.nnz == math.floor(0.25 * r * 48) for layer in per_layer)
    glob = fk.factorize_group(layers, budget=0.5, sparsity=0.75)
    assert sum(layer.factor.nnz for layer in glob) == math.floor(0.25 * r * 48 * 4)


@pytest.mark.parametrize("pattern", ["1:4", "2:4", "2:8"])
def test_nm_masks_are_along_each_layers_reduction_axis(pattern):
    g = fk.factorize_group(_mlp_group(d=20, h=36), pattern=pattern)
    n, m = int(pattern[0]), int(pattern[2])
    for layer in g:
        V = layer.V.detach()
        B = V if layer.kind == "expand" else V.t()  # the reduction axis is axis 0 of B
        K = B.shape[0]
        G = -(-K // m)
        counts = (F.pad(B, (0, 0, 0, G * m - K)).reshape(G, m, -1) != 0).sum(1)
        assert int(counts.max()) <= n
        assert layer.factor.format == "nm" and (layer.factor.n, layer.factor.m) == (n, m)


# ---------------------------------------------------------------- FiPSLinear

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("lead", [(0,), (1,), (7,), (2, 3)], ids=str)
def test_fips_linear_is_a_drop_in_linear(pattern, lead):
    g = fk.factorize_group(_mlp_group(d=24, h=40), pattern=pattern)
    for layer in g:
        x = torch.randn(*lead, layer.in_features)
        W = layer.weight.detach()
        assert W.shape == (layer.out_features, layer.in_features)
        torch.testing.assert_close(W, reference.linear_weight(layer.U.detach(), layer.factor, layer.kind))
        y = layer(x)
        assert y.shape == (*lead, layer.out_features)
        torch.testing.assert_close(y, F.linear(x, W, layer.bias), rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_give_correct_results():
    g = fk.factorize_group(_mlp_group(d=24, h=40), pattern="1:4")
    for layer in g:
        base = torch.randn(layer.in_features, 9)
        x = base.t()  # (9, in) with strides (1, 9)
        assert not x.is_contiguous()
        torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)
        x3 = torch.randn(4, 2 * layer.in_features)[:, ::2].unsqueeze(0)
        torch.testing.assert_close(layer(x3), layer(x3.contiguous()), rtol=0, atol=0)


def test_extra_repr_and_attributes():
    g = fk.factorize_group(_mlp_group(d=24, h=40, bias=False), pattern="2:4")
    fc1, fc2 = g[0], g[1]
    assert (fc1.in_features, fc1.out_features, fc2.in_features, fc2.out_features) == (24, 40, 40, 24)
    text = repr(fc1)
    for part in ("in_features=24", "out_features=40", "kind=expand", f"rank={g.info['rank']}",
                 "format=nm", "pattern=2:4", "density=", "bias=False"):
        assert part in text
    assert fc1.bias is None


def test_base_is_stored_once():
    g = fk.factorize_group(_mlp_group(d=24, h=40, blocks=2))
    keys = list(g.state_dict())
    assert [k for k in keys if k.endswith(".U")] == ["layers.0.shared_base.U"]  # on the first layer
    params = list(g.parameters())
    assert sum(p is g.base.U for p in params) == 1
    assert all(layer.base is g.base for layer in g)


def test_install_into_a_model_stores_each_base_once_and_keeps_outputs():
    torch.manual_seed(0)
    model = TinyViT()
    x = torch.randn(2, 5, 32)
    compress_tiny_vit(model, group_size=2, budget=0.9, pattern="dense")
    keys = [k for k in model.state_dict() if k.endswith(".U")]
    assert keys == ["blocks.0.mlp.fc1.shared_base.U", "blocks.2.mlp.fc1.shared_base.U"]
    assert isinstance(model.blocks[3].mlp.fc2, fk.FiPSLinear)
    assert model.blocks[3].mlp.fc2.base is model.blocks[2].mlp.fc1.shared_base
    assert not hasattr(model, "fips_bases")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(t.numel() for k, t in model.state_dict().items() if t.is_floating_point())
    assert model(x).shape == (2, 5, 5)


def test_model_to_dtype_moves_the_shared_base():
    model = TinyViT()
    compress_tiny_vit(model, pattern="1:4")
    model = model.to(torch.float64)
    assert model.blocks[0].mlp.fc1.U.dtype == torch.float64
    assert model.blocks[0].mlp.fc1.V_indices.dtype == torch.int32
    assert model(torch.randn(1, 3, 32, dtype=torch.float64)).dtype == torch.float64


def test_deepcopy_keeps_the_sharing():
    model = TinyViT()
    compress_tiny_vit(model, pattern="2:4")
    clone = copy.deepcopy(model)
    assert clone.blocks[1].mlp.fc2.base is clone.blocks[0].mlp.fc1.shared_base
    assert clone.blocks[1].mlp.fc2.base is not model.blocks[0].mlp.fc1.shared_base
    x = torch.randn(2, 32)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_from_linear_owns_its_base():
    lin = nn.Linear(32, 80)
    layer = fk.FiPSLinear.from_linear(lin, budget=0.6, pattern="2:4")
    assert "shared_base.U" in layer.state_dict()
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_layer_constructor_checks():
    g = fk.factorize_group(_mlp_group(d=24, h=40))
    f = g[0].factor
    with pytest.raises(ValueError, match="kind must be one of"):
        fk.FiPSLinear(g.base, f, "up")
    with pytest.raises(ValueError, match="needs a base of rank"):
        fk.FiPSLinear(fk.SharedBase(torch.randn(24, 3)), f, "expand")
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        fk.FiPSLinear(g.base, f, "expand", torch.zeros(24))
    with pytest.raises(TypeError, match="factor must be a SparseFactor"):
        fk.FiPSLinear(g.base, f.to_dense(), "expand")


def test_fine_tuning_updates_factor_values_and_base():
    g = fk.factorize_group(_mlp_group(d=16, h=32), pattern="1:4")
    layer = g[1]
    before_U, before_v = g.base.U.detach().clone(), layer.V_values.detach().clone()
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    loss = layer(torch.randn(8, 32)).pow(2).sum()
    loss.backward()
    opt.step()
    assert not torch.equal(g.base.U.detach(), before_U)
    assert not torch.equal(layer.V_values.detach(), before_v)
    assert layer.V_values.grad.shape == layer.V_values.shape


def test_weight_cache_for_large_m_trades_memory_for_the_rebuild(monkeypatch):
    from fips_kernels import tuning

    g = fk.factorize_group(_mlp_group(d=16, h=48), pattern="1:4")
    held = g.cache_weights(True)
    assert held == sum(layer.in_features * layer.out_features * 4 for layer in g)
    monkeypatch.setattr(tuning, "reconstruct_min_m", lambda *a, **k: 8)
    calls = []
    monkeypatch.setattr(torch.ops.fips_kernels, "expand", lambda *a: calls.append(a) or None, raising=False)
    x_small, x_large = torch.randn(4, 16), torch.randn(2, 8, 16)
    # the compressed CPU mode: no speed-mode GEMM for every M, so the crossover decides (as on a GPU)
    with torch.no_grad(), fk.cpu.override("compressed"):
        large = g[0](x_large)  # 16 rows >= 8: served from the cache, no op call
        assert not calls
        torch.testing.assert_close(large, F.linear(x_large, g[0].weight, g[0].bias))
        g[0](x_small)  # below the crossover: the op
        assert len(calls) == 1
        g.base.U.mul_(2.0)  # an in-place change refreshes the cache
        torch.testing.assert_close(g[0](x_large), F.linear(x_large, g[0].weight, g[0].bias))
    assert g.cache_weights(False) == 0 and g[0]._weight_cache is None
