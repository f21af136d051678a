"""Randomized parameter sharing (ROAST / STABLE-RPS): the mapping, the Triton
kernels against the PyTorch reference, the ops, the layers, gradient scaling,
training equivalences and checkpoints.

On CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest)
on small odd shapes, fp32 and fp16; on a GPU they run compiled, bf16 too.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fips_kernels as fk
from fips_kernels import dispatch
from fips_kernels.hashed import HashedEmbedding, HashedLinear, HashedMemory, convert_model, mapping, scale_gradients
from fips_kernels.hashed import ops as hops
from fips_kernels.hashed.mapping import P, make_spec

from conftest import HAS_CUDA, assert_close_to_truth

TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton needs a GPU or TRITON_INTERPRET=1")


@pytest.fixture
def dev():
    return torch.device("cuda" if HAS_CUDA else "cpu")


def _dtypes():
    return [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


# ---------------------------------------------------------------- an independent implementation of the spec
# Written from docs/HASHED.md / the mapping docstring alone, in plain Python.

def _splitmix(seed):
    mask = (1 << 64) - 1
    state = seed & mask
    while True:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        yield z ^ (z >> 31)


def _spec_index(method, out_f, in_f, m, o, i, *, seed, j=0, l0=0, tile=(1, 64), align=1, sign=True):
    gen = _splitmix(seed)
    k = [1 + next(gen) % (P - 1) for _ in range(8)]
    if method == "stable":
        ell = l0 + o * in_f + i
        c = ell // m
        g = align * (((k[0] * c + k[1]) % P) % -(-m // align))
        return (g + ell % m) % m, 1
    to, ti = tile
    a, b = o // to, i // ti
    off = align * (((k[0] * a + k[1] * b + k[2] * j + k[3]) % P) % ((m - to * ti) // align + 1))
    s = 1 - 2 * (((k[4] * a + k[5] * b + k[6] * j + k[7]) % P) % 2) if sign else 1
    return off + (o % to) * ti + i % ti, s


SPEC_CASES = [
    dict(method="stable", out_f=23, in_f=45, m=301, seed=3, l0=11, align=8),
    dict(method="stable", out_f=9, in_f=70, m=40, seed=12345678901, l0=5),
    dict(method="roast", out_f=37, in_f=70, m=500, seed=1, j=2, tile=(1, 16)),
    dict(method="roast", out_f=23, in_f=45, m=900, seed=2, j=0, tile=(4, 32), align=4),
    dict(method="roast", out_f=23, in_f=45, m=900, seed=7, j=5, tile=(2, 64), sign=False),
]


def _make(c):
    return make_spec(c["method"], c["out_f"], c["in_f"], c["m"], layer_index=c.get("j", 0), offset=c.get("l0", 0),
                     tile=c.get("tile", (1, 64)), align=c.get("align", 1), sign=c.get("sign"), seed=c["seed"])


@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda c: f"{c['method']}-{c['m']}")
def test_mapping_is_reproducible_from_the_spec_alone(case):
    spec = _make(case)
    idx, sign = mapping.layer_indices(spec, "cpu")
    kw = dict(seed=case["seed"], j=case.get("j", 0), l0=case.get("l0", 0), tile=case.get("tile", (1, 64)),
              align=case.get("align", 1), sign=case.get("sign", True))
    for o in range(spec.out_features):
        for i in range(spec.in_features):
            want = _spec_index(case["method"], spec.out_features, spec.in_features, spec.size, o, i, **kw)
            assert idx[o, i].item() == want[0], (o, i)
            if sign is not None:
                assert sign[o, i].item() == want[1]
            assert mapping.index_of(spec, o, i) == (want[0], want[1] if spec.sign else 1)
    assert HashSpec_roundtrip(spec)


def HashSpec_roundtrip(spec):
    return mapping.HashSpec.from_list(spec.to_list()) == spec


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="powers of two"):
        make_spec("roast", 4, 4, 100, tile=(1, 24))
    with pytest.raises(ValueError, match="at least one"):
        make_spec("roast", 4, 4, 32, tile=(1, 64))
    with pytest.raises(ValueError, match="2\\^30"):
        make_spec("stable", 4, 4, 2 ** 30 + 1)
    with pytest.raises(ValueError, match="method"):
        make_spec("hashnet", 4, 4, 100)
    bad = make_spec("stable", 4, 4, 100).to_list()
    bad[0] = 99
    with pytest.raises(ValueError, match="version"):
        mapping.HashSpec.from_list(bad)


@pytest.mark.parametrize("call, match", [
    (lambda: convert_model(nn.Sequential(nn.Linear(8, 8)), size=0), "convert_model: size must be >= 1 slot, got 0"),
    (lambda: convert_model(nn.Sequential(nn.Linear(8, 8)), size=-3), "convert_model: size must be >= 1 slot"),
    (lambda: convert_model(nn.Sequential(nn.Linear(8, 8)), size=2.5), "convert_model: size must be an integer"),
    (lambda: convert_model(nn.Sequential(nn.Linear(8, 8)), size=True), "convert_model: size must be an integer"),
    (lambda: convert_model(nn.Sequential(nn.Linear(8, 8)), size=8, align=0), "convert_model: align must be"),
    (lambda: HashedMemory(2.5), "HashedMemory: size must be an integer, got 2.5"),
    (lambda: HashedLinear(8, 8, size=7.9), "HashedMemory: size must be an integer"),
    (lambda: HashedMemory(8, seed=1.5), "seed must be an integer, got 1.5"),
    (lambda: HashedMemory(64, method="roast", tile=(1.5, 64)), "tile must be an integer"),
])
def test_values_int_would_change_are_refused(call, match):
    # each used to become something else silently: a 1-slot memory, 2 slots, seed 1, a 1x64 tile
    with pytest.raises(ValueError, match=match):
        call()


def _memory_with(method, shapes, m, **kw):
    mem = HashedMemory(m, method=method, **kw)
    layers = [HashedLinear(i, o, memory=mem) for o, i in shapes]
    return mem, layers


@pytest.mark.parametrize("m_extra", [0, 37])
def test_stable_is_a_bijection_at_full_size(m_extra):
    shapes = [(23, 45), (9, 70), (31, 8)]
    n = sum(o * i for o, i in shapes)
    mem, layers = _memory_with("stable", shapes, n + m_extra, seed=4)
    idx = torch.cat([mapping.layer_indices(layer.spec, "cpu")[0].flatten() for layer in layers])
    assert idx.unique().numel() == n and idx.min() >= 0 and idx.max() < n + m_extra


@pytest.mark.parametrize("m", [7, 64, 301, 1000, 2591])
def test_stable_slot_loads_are_floor_or_ceil(m):
    shapes = [(23, 45), (9, 70), (31, 8)]
    n = sum(o * i for o, i in shapes)
    mem, _ = _memory_with("stable", shapes, m, seed=9, align=8 if m % 16 == 0 else 1)
    loads = mem.slot_loads()
    assert loads.sum().item() == n
    assert set(loads.unique().tolist()) <= {n // m, -(-n // m)}


def test_roast_tiles_are_aligned_contiguous_and_in_range():
    spec = make_spec("roast", 37, 130, 1000, tile=(4, 32), seed=5, layer_index=1, align=8)
    idx, sign = mapping.layer_indices(spec, "cpu")
    assert idx.min() >= 0 and idx.max() < spec.size
    for a in range(spec.tiles[0]):
        for b in range(spec.tiles[1]):
            rows = slice(a * 4, min(a * 4 + 4, 37))
            cols = slice(b * 32, min(b * 32 + 32, 130))
            t = idx[rows, cols]
            assert t[0, 0] % 8 == 0 and t[0, 0] + 4 * 32 <= spec.size
            expect = t[0, 0] + torch.arange(t.shape[0])[:, None] * 32 + torch.arange(t.shape[1])[None, :]
            assert torch.equal(t, expect)
            assert sign[rows, cols].unique().numel() == 1
    assert set(sign.unique().tolist()) == {-1.0, 1.0}
    other = mapping.layer_indices(make_spec("roast", 37, 130, 1000, tile=(4, 32), seed=6, layer_index=1, align=8),
                                  "cpu")[0]
    again = mapping.layer_indices(make_spec("roast", 37, 130, 1000, tile=(4, 32), seed=5, layer_index=1, align=8),
                                  "cpu")[0]
    assert torch.equal(again, idx) and not torch.equal(other, idx)


# ---------------------------------------------------------------- kernels vs reference

KERNEL_CASES = [
    dict(method="stable", out_f=23, in_f=45, m=301, seed=3, l0=11),                    # unaligned
    dict(method="stable", out_f=24, in_f=64, m=320, seed=4, l0=64, align=8),           # aligned: hinted loads
    dict(method="stable", out_f=9, in_f=70, m=40, seed=5, l0=5),                       # rows span partitions
    dict(method="roast", out_f=19, in_f=40, m=200, seed=1, j=2, tile=(1, 16)),
    dict(method="roast", out_f=23, in_f=45, m=900, seed=2, tile=(4, 32), align=8),
    dict(method="roast", out_f=23, in_f=45, m=900, seed=7, tile=(2, 64), sign=False),
]
KERNEL_IDS = ["stable", "stable-aligned", "stable-wide", "roast1x16", "roast4x32", "roast2x64-nosign"]


def _truth_weight(memory, spec, scale):
    return mapping.materialize(memory.double(), spec, scale)


def _eps(dtype, truth):
    return (1e-5 if dtype == torch.float32 else 2e-3) * max(truth.abs().max().item(), 1e-30)


def _scatter_in(dtype, spec, scale, dW):
    """The array gradient by plain PyTorch in ``dtype`` (the baseline)."""
    idx, sign = mapping.layer_indices(spec, dW.device)
    v = dW.to(dtype) * scale
    if sign is not None:
        v = v * sign.to(dtype)
    return torch.zeros(spec.size, dtype=dtype, device=dW.device).index_put_((idx.flatten(),), v.flatten(),
                                                                            accumulate=True)


@needs_triton
@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
def test_kernels_match_reference(dev, case, dtype):
    from fips_kernels.triton import hashed as th

    spec, scale = _make(case), 0.37
    mem = torch.randn(spec.size, device=dev).to(dtype)
    W64 = _truth_weight(mem, spec, scale)
    W = mapping.materialize(mem, spec, scale)
    bias = torch.randn(spec.out_features, device=dev).to(dtype)
    assert torch.equal(th.weight(mem, spec, scale), W)  # the gather is exact
    for M in (1, 33):
        x = torch.randn(M, spec.in_features, device=dev).to(dtype)
        g = torch.randn(M, spec.out_features, device=dev).to(dtype)
        # forward
        truth = F.linear(x.double(), W64, bias.double())
        assert_close_to_truth(th.linear(x, mem, bias, spec, scale), truth, F.linear(x, W, bias), _eps(dtype, truth))
        # input gradient
        truth = g.double() @ W64
        assert_close_to_truth(th.grad_input(g, mem, spec, scale), truth, g @ W, _eps(dtype, truth))
        # array gradient: atomics, deterministic, and the scatter of a given dW
        dW64 = g.double().t() @ x.double()
        truth = _scatter_in(torch.float64, spec, scale, dW64)
        base = _scatter_in(dtype, spec, scale, (g.t() @ x))
        for det in (False, True):
            out = th.grad_memory(g, x, mem, spec, scale, det)
            assert out.dtype == dtype and out.shape == (spec.size,)
            assert_close_to_truth(out, truth, base, _eps(dtype, truth))
            out = th.scatter(dW64.to(dtype), mem, spec, scale, det)
            assert_close_to_truth(out, truth, base, _eps(dtype, truth))


@needs_triton
@pytest.mark.parametrize("case", [KERNEL_CASES[0], KERNEL_CASES[4]], ids=["stable", "roast4x32"])
def test_mapping_is_identical_for_any_block_size(dev, case):
    from fips_kernels.triton import hashed as th

    spec, scale = _make(case), 0.5
    mem = torch.randn(spec.size, device=dev)
    W = mapping.materialize(mem, spec, scale)
    x = torch.randn(21, spec.in_features, device=dev)
    g = torch.randn(21, spec.out_features, device=dev)
    ref_y = x.double() @ W.double().t()
    ref_dx = g.double() @ W.double()
    for blocks in (th.Blocks(16, 16, 16), th.Blocks(16, 32, 64), th.Blocks(32, 64, 32), th.Blocks(16, 128, 16)):
        assert torch.equal(th.weight(mem, spec, scale, blocks=blocks), W), blocks
        torch.testing.assert_close(th.linear(x, mem, None, spec, scale, blocks=blocks).double(), ref_y,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(th.grad_input(g, mem, spec, scale, blocks=blocks).double(), ref_dx,
                                   rtol=1e-5, atol=1e-5)
    # the M split of the atomic array gradient does not change it either
    a = th.grad_memory(g, x, mem, spec, scale, split=1)
    b = th.grad_memory(g, x, mem, spec, scale, split=3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_triton
def test_deterministic_array_gradient_is_bitwise_reproducible(dev):
    from fips_kernels.triton import hashed as th

    spec = _make(KERNEL_CASES[4])
    mem = torch.randn(spec.size, device=dev)
    x, g = torch.randn(70, spec.in_features, device=dev), torch.randn(70, spec.out_features, device=dev)
    first = th.grad_memory(g, x, mem, spec, 0.3, deterministic=True)
    for _ in range(2):
        assert torch.equal(th.grad_memory(g, x, mem, spec, 0.3, deterministic=True), first)


def test_triton_kernels_compile_for_sm90():
    """The compiled (not interpreted) kernels build for an H100 without one, and
    the aligned mapping's hints turn the weight-tile loads into cp.async copies."""
    import subprocess
    import sys

    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:  # noqa: BLE001
        pytest.skip("this Triton has no NVIDIA backend")
    script = os.path.join(os.path.dirname(__file__), "hashed_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {ln.split(" hints")[0]: ln for ln in out.stdout.splitlines()}
    hinted = lines["ok fwd method=1"]
    assert "cp_async=0" not in hinted and "scalar_b16_loads=0" in hinted, hinted
    assert "scalar_b16_loads=0" not in lines["ok fwd method=0"]  # align 1: scalar loads of the weight tile


# ---------------------------------------------------------------- ops and dispatch

def _layer(method="stable", in_f=13, out_f=9, m=200, dtype=torch.float32, device="cpu", **kw):
    mem = HashedMemory(m, method=method, dtype=dtype, device=device, **kw)
    return HashedLinear(in_f, out_f, memory=mem, own_memory=True)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_opcheck(backend, dev):
    layer = _layer("roast", tile=(1, 16), device=dev)
    mem = layer.shared_memory.weight
    x = torch.randn(2, 3, 13, device=dev, requires_grad=True)
    g = torch.randn(2, 3, 9, device=dev)
    s, lam = layer.spec.to_list(), layer.scale
    with fk.use_backend(backend):
        torch.library.opcheck(torch.ops.fips_kernels.hashed_linear, (x, mem, layer.bias, s, lam))
        torch.library.opcheck(torch.ops.fips_kernels.hashed_weight, (mem, s, lam))
        if backend == "reference":
            md = mem.detach()
            torch.library.opcheck(torch.ops.fips_kernels.hashed_grad_input, (g, md, s, lam))
            torch.library.opcheck(torch.ops.fips_kernels.hashed_grad_memory, (g, x.detach(), md, s, lam, True))
            torch.library.opcheck(torch.ops.fips_kernels.hashed_scatter, (torch.randn(9, 13, device=dev), md, s,
                                                                           lam, False))


def test_forced_backend_that_cannot_run_raises_with_reasons():
    layer = _layer("roast", tile=(1, 8))  # too narrow a tile for the Triton kernels
    x = torch.randn(4, 13)
    p = hops.problem("hashed_linear", layer.spec, x.dtype, x.device, 4)
    if TRITON_OK and not HAS_CUDA:
        with fk.use_backend("triton"), pytest.raises(dispatch.BackendUnavailable, match="tile width 8"):
            layer(x)
        assert hops.select(p, layer.spec) == "reference"  # automatic choice falls back
    with fk.use_backend("cuda"), pytest.raises(dispatch.BackendUnavailable, match="cuda"):
        layer(x)
    assert "reference" in hops.explain(p, layer.spec)


def test_bad_input_is_named():
    layer = _layer()
    with pytest.raises(ValueError, match="in_features=13"):
        layer(torch.randn(3, 12))
    with pytest.raises(TypeError, match="dtype mismatch"):
        layer(torch.randn(3, 13, dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D with 200 slots"):
        torch.ops.fips_kernels.hashed_linear(torch.randn(3, 13), torch.randn(199), None, layer.spec.to_list(), 1.0)
    with pytest.raises(ValueError, match="bad spec"):
        torch.ops.fips_kernels.hashed_weight(torch.randn(200), [1, 2, 3], 1.0)


def test_torch_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 16), nn.GELU(), nn.Linear(16, 4))
    convert_model(model, budget=0.5, method="roast", tile=(1, 16))
    x = torch.randn(5, 13)
    with fk.use_backend("reference"):
        compiled = torch.compile(model, fullgraph=True)
        y = compiled(x)
        y.square().sum().backward()
        mem = model[0].memory.weight
        got = mem.grad.clone()
        mem.grad = None
        eager = model(x)
        eager.square().sum().backward()
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, mem.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- layers

@pytest.mark.parametrize("method", ["stable", "roast"])
def test_hashed_linear_is_a_drop_in(method):
    torch.manual_seed(0)
    mem = HashedMemory(300, method=method, tile=(1, 16))
    a = HashedLinear(13, 9, memory=mem)
    b = HashedLinear(9, 5, bias=False, memory=mem)
    assert (a.in_features, a.out_features, tuple(a.weight.shape)) == (13, 9, (9, 13))
    assert "in_features=13" in repr(a) and "method=" + method in repr(a)
    x = torch.randn(2, 4, 13)
    with fk.use_backend("reference"):
        y = b(torch.tanh(a(x)))
        y.square().sum().backward()
    got = mem.weight.grad.clone()
    # the same through plain autograd on the materialised weights
    mem.weight.grad = None
    W1 = mapping.materialize(mem.weight, a.spec, a.scale)
    W2 = mapping.materialize(mem.weight, b.spec, b.scale)
    ref = F.linear(torch.tanh(F.linear(x, W1, a.bias)), W2)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, mem.weight.grad, rtol=1e-5, atol=1e-6)
    # the weight property is differentiable too
    mem.weight.grad = None
    a.weight.sum().backward()
    idx, sign = mapping.layer_indices(a.spec, "cpu")
    expect = torch.zeros(300).index_add_(0, idx.flatten(), (a.scale * (sign if sign is not None else 1.0)
                                                             * torch.ones(9, 13)).flatten())
    torch.testing.assert_close(mem.weight.grad, expect)
    assert sum(p.numel() for p in nn.ModuleList([a, b]).parameters()) == 9  # the array is not theirs


def test_default_init_matches_nn_linear():
    torch.manual_seed(0)
    layer = HashedLinear(256, 512, budget=1.0, init_range=7.0)
    W = layer.weight.detach()
    bound = 1 / math.sqrt(256)
    assert W.abs().max() <= bound * (1 + 1e-6)
    assert W.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)


def test_hashed_embedding_matches_its_table():
    torch.manual_seed(0)
    mem = HashedMemory(500, method="stable")
    emb = HashedEmbedding(40, 24, padding_idx=3, memory=mem)
    lin = HashedLinear(24, 7, memory=mem)
    ids = torch.tensor([[1, 3, 39], [0, 5, 5]])
    out = emb(ids)
    ref = F.embedding(ids, emb.weight, padding_idx=3)
    torch.testing.assert_close(out, ref)
    assert out[0, 1].abs().sum() == 0
    out.square().sum().backward()
    g = mem.weight.grad.clone()
    mem.weight.grad = None
    F.embedding(ids, emb.weight).square().sum().backward()
    torch.testing.assert_close(g, mem.weight.grad)
    assert lin.spec.offset == 40 * 24  # registered after the embedding


class _Net(nn.Module):
    def __init__(self, emb=False):
        super().__init__()
        self.emb = nn.Embedding(30, 16) if emb else None
        self.fc1 = nn.Linear(16, 40)
        self.fc2 = nn.Linear(40, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        if self.emb is not None:
            x = self.emb(x).mean(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_convert_model_budget_selection_and_registration():
    model = _Net(emb=True)
    mem = convert_model(model, budget=0.1, method="roast", exclude=["head"], embeddings=True, tile=(1, 16))
    n = 30 * 16 + 40 * 16 + 24 * 40
    assert mem.size == math.ceil(0.1 * n) and mem.virtual_parameters == n
    assert isinstance(model.emb, HashedEmbedding) and isinstance(model.fc2, HashedLinear)
    assert type(model.head) is nn.Linear
    assert model.hashed_memories["0"] is mem
    params = list(model.parameters())
    assert sum(p is mem.weight for p in params) == 1
    assert [k for k in model.state_dict() if "memor" in k] == ["hashed_memories.0.weight"]
    y = model(torch.randint(0, 30, (3, 4)))
    assert y.shape == (3, 5)
    seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    m2 = convert_model(seq, size=50, include=lambda name, mod: mod.out_features == 8)
    assert seq[0].memory is m2 and type(seq[2]) is nn.Linear and m2.size == 50
    assert seq(torch.randn(2, 8)).shape == (2, 2)
    with pytest.raises(ValueError, match="exactly one"):
        convert_model(_Net(), budget=0.5, size=10)


# ---------------------------------------------------------------- training

def _mlp():
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))


def _train(model, opt, X, Y, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()


def test_stable_rps_at_full_size_trains_exactly_like_dense():
    torch.manual_seed(0)
    hashed = _mlp()
    convert_model(hashed, budget=1.0, method="stable", seed=3)
    dense = _mlp()
    with torch.no_grad():
        for i in (0, 2):
            dense[i].weight.copy_(hashed[i].weight)
            dense[i].bias.copy_(hashed[i].bias)
    oh = torch.optim.SGD(hashed.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    od = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    scale_gradients(oh, hashed)
    X, Y = torch.randn(64, 12), torch.randint(0, 5, (64,))
    with fk.use_backend("reference"):
        _train(hashed, oh, X, Y, 25)
    _train(dense, od, X, Y, 25)
    moved = (dense[0].weight - _mlp()[0].weight).abs().max()
    assert moved > 0.05  # it trained
    for i in (0, 2):
        torch.testing.assert_close(hashed[i].weight, dense[i].weight, rtol=0, atol=2e-6)
        torch.testing.assert_close(hashed[i].bias, dense[i].bias, rtol=0, atol=2e-6)


def _trained_weight(init_range, scaled, method="stable", steps=25):
    torch.manual_seed(1)
    model = _mlp()
    mem = convert_model(model, budget=0.4, method=method, seed=3, init_range=init_range, tile=(1, 16))
    with torch.no_grad():  # the same array up to the scale r, so the same initial weights
        u = torch.rand(mem.size, generator=torch.Generator().manual_seed(7))
        mem.weight.copy_((2 * u - 1) * init_range)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if scaled:
        scale_gradients(opt, model)
    torch.manual_seed(2)
    X, Y = torch.randn(64, 12), torch.randint(0, 5, (64,))
    start = model[0].weight.detach().clone()
    with fk.use_backend("reference"):
        _train(model, opt, X, Y, steps)
    return start, model[0].weight.detach()


@pytest.mark.parametrize("method", ["stable", "roast"])
def test_gradient_scaling_makes_training_invariant_to_the_init_scale(method):
    s1, w1 = _trained_weight(1.0, True, method)
    s2, w2 = _trained_weight(1000.0, True, method)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-7)  # same initial weights
    assert (w1 - s1).abs().max() > 1e-2  # it trained
    torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-5)
    # without the scaling the init scale changes the trajectory
    _, u1 = _trained_weight(1.0, False, method)
    _, u2 = _trained_weight(1000.0, False, method)
    assert (u1 - u2).abs().max() > 1e-2


def test_scale_gradients_hooks_any_optimizer():
    model = _mlp()
    mem = convert_model(model, budget=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    handle = scale_gradients(opt, model)
    X, Y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    F.cross_entropy(model(X), Y).backward()
    g = mem.weight.grad.clone()
    opt.step()
    expected = g / mem.slot_lambda_sq()
    torch.testing.assert_close(mem.weight.grad, expected)
    handle.remove()
    with pytest.raises(ValueError, match="not parameters of this optimizer"):
        scale_gradients(torch.optim.SGD([model[0].bias], lr=0.1), model)


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_round_trip_is_bit_exact_and_stores_the_array_once(tmp_path, dtype):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = _Net().to(dtype)
    mem = convert_model(model, budget=0.3, method="stable", seed=11)
    with torch.no_grad():
        mem.weight.add_(0.01 * torch.randn_like(mem.weight))
    path = tmp_path / "hashed.safetensors"
    fk.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert [k for k in f.keys() if k.endswith("memories.0.weight")] == ["hashed_memories.0.weight"]
    fresh = _Net().to(dtype)
    convert_model(fresh, budget=0.3, method="stable", seed=11)
    loaded = fk.load(path, fresh)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bfloat16 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.bfloat16 else b[k]), k
    assert loaded.fc1.shared_memory is loaded.hashed_memories["0"]
    x = torch.randn(3, 16, dtype=dtype)
    assert torch.equal(loaded(x), model(x))

    other = _Net().to(dtype)
    convert_model(other, budget=0.3, method="stable", seed=12)  # a different mapping
    with pytest.raises(RuntimeError, match="different|differs"):
        fk.load(path, other)


# ---------------------------------------------------------------- benchmark

def test_bench_provider_and_training_sweep(tmp_path):
    from fips_kernels.bench import hashed_providers as hp
    from fips_kernels.bench.providers import PROVIDERS

    assert {"hashed_fwd", "hashed_materialize"} <= set(PROVIDERS)
    rows = hp.run_sweep(shapes=[("tiny", 48, 80)], ms=[4], methods=["stable"], budgets=[0.25], aligns=[8],
                        dtype=torch.float32, device=torch.device("cpu"), out=tmp_path / "h.csv", reps=1,
                        backend="reference", log=lambda s: None)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"dense", "hashed"}
    assert {r["pass"] for r in ok} == {"fwd", "fwd_bwd"}
    assert all(float(r["time_ms"]) > 0 for r in ok)
    assert (tmp_path / "h.csv").read_text().splitlines()[0].startswith("shape,")
