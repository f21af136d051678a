"""Custom ops: opcheck, gradients, torch.compile, CUDA graphs, and dispatch."""

import pytest
import torch
import torch.nn.functional as F

import fips_kernels as fk
from fips_kernels import dispatch, reference
from fips_kernels.ops import fips_linear, reconstruct

from conftest import FORMAT_CASES, FORMAT_IDS, make_factor

KINDS = ["expand", "contract"]


def _problem_tensors(kind, fmt, opts, d=10, r=12, h=40, M=(3,), dtype=torch.float32, device="cpu", bias=True):
    K, N = (r, h) if kind == "expand" else (h, r)
    factor, B = make_factor(K, N, fmt, opts, dtype=dtype, device=device)
    U = torch.randn(d, r, dtype=dtype, device=device)
    x = torch.randn(*M, d if kind == "expand" else h, dtype=dtype, device=device)
    b = torch.randn(h if kind == "expand" else d, dtype=dtype, device=device) if bias else None
    return x, U, factor, B, b


def _op_args(kind, x, U, factor, b):
    aux = list(factor.aux_tensors) + [None, None]
    return (x, U, None, factor.values, aux[0], aux[1], factor.scales, b, factor.format, factor.meta)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt,opts", FORMAT_CASES, ids=FORMAT_IDS)
def test_opcheck_layer_ops(device, kind, fmt, opts):
    x, U, factor, _, b = _problem_tensors(kind, fmt, opts, device=device)
    for t in (x, U, factor.values, b):
        t.requires_grad_(True)
    op = getattr(torch.ops.fips_kernels, kind)
    torch.library.opcheck(op, _op_args(kind, x, U, factor, b))
    torch.library.opcheck(op, _op_args(kind, x.detach(), U.detach(), factor, None))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt,opts", FORMAT_CASES, ids=FORMAT_IDS)
def test_opcheck_reconstruct(device, kind, fmt, opts):
    _, U, factor, _, _ = _problem_tensors(kind, fmt, opts, device=device)
    U.requires_grad_(True)
    factor.values.requires_grad_(True)
    aux = list(factor.aux_tensors) + [None, None]
    torch.library.opcheck(torch.ops.fips_kernels.reconstruct,
                          (U, None, factor.values, aux[0], aux[1], None, factor.format, factor.meta, kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt,opts", FORMAT_CASES, ids=FORMAT_IDS)
def test_ops_match_reference(device, kind, fmt, opts):
    x, U, factor, B, b = _problem_tensors(kind, fmt, opts, M=(2, 5), device=device)
    V = B if kind == "expand" else B.t()
    torch.testing.assert_close(fips_linear(x, U, factor, kind, b), reference.fips_linear(x, U, V, kind, b))
    torch.testing.assert_close(reconstruct(U, factor, kind), reference.linear_weight(U, V, kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt,opts", FORMAT_CASES, ids=FORMAT_IDS)
def test_gradients_match_finite_differences(kind, fmt, opts):
    x, U, factor, _, b = _problem_tensors(kind, fmt, opts, d=5, r=6, h=9, M=(2, 2), dtype=torch.float64)
    values = factor.values.clone().requires_grad_(True)
    aux = list(factor.aux_tensors) + [None, None]
    op = getattr(torch.ops.fips_kernels, kind)

    def f(x_, U_, v_, b_):
        return op(x_, U_, None, v_, aux[0], aux[1], None, b_, factor.format, factor.meta)

    inputs = (x.requires_grad_(True), U.requires_grad_(True), values, b.requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs)

    def g(U_, v_):
        return torch.ops.fips_kernels.reconstruct(U_, None, v_, aux[0], aux[1], None, factor.format, factor.meta, kind)

    assert torch.autograd.gradcheck(g, (U, values))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_equal_those_of_the_dense_layer(kind):
    x, U, factor, B, b = _problem_tensors(kind, "nm", {"n": 2, "m": 4}, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, U, factor.values, b)]
    aux = list(factor.aux_tensors) + [None, None]
    op = getattr(torch.ops.fips_kernels, kind)
    op(leaves[0], leaves[1], None, leaves[2], aux[0], aux[1], None, leaves[3], factor.format,
       factor.meta).square().sum().backward()
    xd, Ud, Bd, bd = (t.clone().requires_grad_(True) for t in (x, U, B, b))
    Vd = Bd if kind == "expand" else Bd.t()
    F.linear(xd, reference.linear_weight(Ud, Vd, kind), bd).square().sum().backward()
    torch.testing.assert_close(leaves[0].grad, xd.grad)
    torch.testing.assert_close(leaves[1].grad, Ud.grad)
    torch.testing.assert_close(leaves[3].grad, bd.grad)
    # the values' gradient is the dense gradient at the stored positions
    dense_grad_at_values = fk.formats.gather_values("nm", factor.meta, Bd.grad, *factor.aux_tensors,
                                                    nnz=factor.nnz)
    torch.testing.assert_close(leaves[2].grad, dense_grad_at_values)


def _small_group(pattern="1:4"):
    from torch import nn

    layers = [nn.Linear(16, 48), nn.Linear(48, 16)]
    return fk.factorize_group(layers, pattern=pattern)


@pytest.mark.parametrize("pattern", ["1:4", "unstructured", "dense"])
def test_torch_compile_fullgraph(pattern):
    torch._dynamo.reset()
    g = _small_group(pattern)
    model = torch.nn.Sequential(g[0], torch.nn.GELU(), g[1])
    x = torch.randn(3, 7, 16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    x1 = torch.randn(1, 16)  # another shape: recompiles or runs dynamic, never breaks the graph
    torch.testing.assert_close(compiled(x1), model(x1), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager():
    g = _small_group("1:4").cuda()
    layer = g[0]
    x = torch.randn(5, 16, device="cuda")
    eager = layer(x)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = layer(static_x)
    new_x = torch.randn(5, 16, device="cuda")
    static_x.copy_(new_x)
    graph.replay()
    torch.testing.assert_close(static_y, layer(new_x))
    assert not torch.equal(static_y, eager)


# ---------------------------------------------------------------- dispatch

def _layout(fmt, K=12, N=40):
    from fips_kernels.formats import Layout

    return Layout.from_meta(fmt, [K, N, 1, 4] if fmt == "nm" else [K, N, 0, 0])


def _cpu_problem(op="expand", fmt="nm", dtype=torch.float32, device="cpu", M=4):
    return dispatch.Problem.for_layer(op, "expand" if op == "gate_up" else op, _layout(fmt), dtype, device, M, 10)


def test_cpu_runs_the_reference_backend_and_explains_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = _cpu_problem()
    assert dispatch.select(p).name == "reference"
    reasons = dispatch.not_supported_reasons(p)
    assert list(reasons) == ["cuda", "cpu", "triton", "reference"]
    assert any("not a cuda device" in r for r in reasons["cuda"])
    assert any("no cpu kernel for the 'nm' format" in r for r in reasons["cpu"])
    assert reasons["reference"] == []
    text = dispatch.explain(p)
    assert "reference  runs" in text and "cuda       cannot run" in text


def test_forced_backend_that_cannot_run_raises_with_its_reasons(monkeypatch):
    x, U, factor, _, b = _problem_tensors("expand", "nm", {"n": 1, "m": 4})
    monkeypatch.setenv("FIPS_KERNELS_BACKEND", "cuda")
    with pytest.raises(fk.BackendUnavailable) as info:
        fips_linear(x, U, factor, "expand", b)
    msg = str(info.value)
    assert "backend 'cuda' was forced but cannot run expand" in msg
    assert "not a cuda device" in msg and "\n  - " in msg
    monkeypatch.setenv("FIPS_KERNELS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fk.BackendUnavailable, match="TRITON_INTERPRET=1 is not set"):
        fips_linear(x, U, factor, "expand", b)
    monkeypatch.setenv("FIPS_KERNELS_BACKEND", "reference")
    torch.testing.assert_close(fips_linear(x, U, factor, "expand", b),
                               reference.expand(x, U, factor, b))
    monkeypatch.setenv("FIPS_KERNELS_BACKEND", "fastest")
    with pytest.raises(fk.BackendUnavailable, match="not a backend"):
        fips_linear(x, U, factor, "expand", b)


def test_use_backend_context_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("FIPS_KERNELS_BACKEND", "cuda")
    x, U, factor, _, b = _problem_tensors("contract", "bitmap", {})
    with fk.use_backend("reference"):
        fips_linear(x, U, factor, "contract", b)
    with pytest.raises(ValueError, match="unknown backend"):
        with fk.use_backend("magic"):
            pass


def test_first_backend_without_reasons_runs(monkeypatch):
    """The mechanism is real: a higher-priority backend that can run a problem takes it."""
    calls = []

    class Fake(dispatch.Backend):
        name = "triton"  # stands in for the registered triton backend
        ops = dispatch.FIPS_OPS
        device_types = ("cpu",)
        dtypes = (torch.float32,)
        formats = ("nm",)

        def kernel(self, op):
            def run(x2, U, factor, bias, activation="none"):
                calls.append(x2.shape)
                return reference.expand(x2, U, factor, bias, activation)
            return run

    monkeypatch.setitem(dispatch._REGISTRY, "triton", Fake())
    x, U, factor, _, b = _problem_tensors("expand", "nm", {"n": 1, "m": 4}, M=(2, 3))
    assert dispatch.select(_cpu_problem(M=6)).name == "triton"
    fips_linear(x, U, factor, "expand", b)
    assert calls == [torch.Size([6, 10])]
    # what it does not declare falls through to the reference, with its reasons
    assert dispatch.select(_cpu_problem(fmt="csr")).name == "reference"
    assert dispatch.not_supported_reasons(_cpu_problem(fmt="csr"))["triton"] == [
        "no triton kernel for the 'csr' format (it runs nm)"]


def test_the_runner_serves_the_hashed_ops_too():
    from fips_kernels.hashed import make_spec
    from fips_kernels.hashed.ops import HashedProblem

    spec = make_spec("stable", 8, 12, 40)
    p = HashedProblem("hashed_linear", spec, torch.float64, torch.device("cpu"), 3)
    reasons = dispatch.not_supported_reasons(p)
    assert reasons["reference"] == [] and any("float64" in r for r in reasons["triton"])
    assert "cuda" in reasons and any("no cuda kernel for op 'hashed_linear'" in r for r in reasons["cuda"])


def test_cuda_backend_reports_the_extension_state():
    from fips_kernels import _extension
    from fips_kernels.cuda import op_available

    p = _cpu_problem("reconstruct", dtype=torch.float16, device="cuda", M=0)
    reasons = dispatch.not_supported_reasons(p)["cuda"]
    if op_available():
        assert not any("extension" in r for r in reasons)
    elif _extension.available():
        assert any("no sparse_mm op" in r for r in reasons)
    else:
        assert any("extension is not available" in r for r in reasons)
    p = _cpu_problem("expand", "csr", dtype=torch.float16, device="cuda", M=1)
    assert any("no cuda kernel for the 'csr' format" in r for r in dispatch.not_supported_reasons(p)["cuda"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_reconstruct_nm_dispatches_to_cuda_and_matches(kind, dtype):
    from fips_kernels import _extension

    x, U, factor, B, b = _problem_tensors(kind, "nm", {"n": 1, "m": 4}, d=77, r=130, h=301,
                                          dtype=dtype, device="cuda")
    p = dispatch.Problem.for_layer("reconstruct", kind, factor.layout, dtype, U.device, 0, U.shape[0])
    if _extension.available() and dtype != torch.float32:  # fp32 runs on triton (no fp32 tensor-core kernel)
        assert dispatch.select(p).name == "cuda"
    V = B if kind == "expand" else B.t()
    W = reconstruct(U, factor, kind)
    with fk.use_backend("reference"):
        ref = reconstruct(U, factor, kind)
    truth = reference.linear_weight(U.double(), V.double(), kind)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(W.double(), truth, rtol=tol, atol=tol * truth.abs().max().item())
    torch.testing.assert_close(W, ref, rtol=tol, atol=tol * truth.abs().max().item())
