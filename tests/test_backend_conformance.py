"""One conformance suite for every backend: the same rows run under
``use_backend(name)`` for each name in ``dispatch.backend_names()`` and, for a
backend with strategies, under each strategy (``FIPS_KERNELS_STRATEGY``).

An engine that cannot run a row skips it with the backend's (or the
strategy's) own reasons — so a skip says why, and a row no engine but the
reference can run still runs once. Rows: format × kind × quantisation (int8 /
int4 factors, an int8 base) × dtype × M (1, odd, past a tile) with 2-D and 3-D
inputs and with and without bias; activation epilogues; gate/up; reconstruct.
One oracle (:func:`conftest.check_layer`): fp64 truth from the same factor,
within twice plain PyTorch's own error in the dtype.

Where the engines run: on a CPU-only machine the reference, Triton under
``TRITON_INTERPRET=1`` (fp32/fp16: its bf16 arithmetic is wrong, and the
backend says so) and the cuda backend's strategies on the CPU implementation
of ``fips_kernels_cuda::sparse_mm`` (the CUDA kernel's block program run warp
by warp: the "cpu twin", fp16/bf16); on a GPU, every backend on CUDA tensors.
What is specific to one backend (autotune pruning, the 2:4 packing cache, the
twin's emulation details) stays in that backend's own test file.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fips_kernels as fk
from fips_kernels import dispatch, reference
from fips_kernels.cuda import spmm
from fips_kernels.dispatch import Problem
from fips_kernels.formats import SparseFactor
from fips_kernels.ops import fips_linear, gate_up, reconstruct

from conftest import HAS_CUDA, assert_close_to_truth, check_layer, layer_case

D, R, H = 37, 45, 70  # none a multiple of 8, 16, 32 or 64: tails everywhere; R: an N:M tail on expand factors
MS = (1, 17, 130)     # decode, odd, past a 64-row tile
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
CUDA_TWIN = not HAS_CUDA and spmm.op_available()  # the cuda backend's strategies on the CPU op

# (format, options, factor qbits, base qbits)
CASES = [
    ("dense", {}, None, None),
    ("nm", {"n": 1, "m": 4}, None, None),
    ("nm", {"n": 2, "m": 4}, None, None),
    ("nm", {"n": 3, "m": 16}, None, None),
    ("bitmap", {}, None, None),
    ("bitmap", {"tile": (16, 32)}, None, None),
    ("csr", {}, None, None),
    ("ell", {"k": 2}, None, None),
    ("nm", {"n": 2, "m": 4}, None, 8),
    ("nm", {"n": 1, "m": 4}, 8, None),
    ("dense", {}, 4, 8),
    ("bitmap", {}, 4, 8),
    ("bitmap", {"tile": (16, 32)}, 8, None),
]
IDS = ["dense", "nm1:4", "nm2:4", "nm3:16", "bitmap", "bitmap16x32", "csr", "ell2", "nm2:4+int8base", "nm1:4-int8",
       "dense-int4+int8base", "bitmap-int4+int8base", "bitmap16x32-int8"]
FEW = [CASES[1], CASES[4], CASES[5], CASES[7], CASES[11]]  # for the epilogue and gate/up rows
FEW_IDS = [IDS[1], IDS[4], IDS[5], IDS[7], IDS[11]]


def _engines():
    """(backend, strategy) pairs: every backend, each of its strategies."""
    out = []
    for name, b in dispatch.backends().items():
        if name == "cuda" and not (HAS_CUDA or CUDA_TWIN):
            out.append(pytest.param((name, None), id=name))  # it will skip with its reasons
            continue
        s = b.strategies()
        for strategy in (s.names if s is not None else (None,)):
            label = name + ("-twin" if name == "cuda" and CUDA_TWIN else "") + (f"-{strategy}" if strategy else "")
            out.append(pytest.param((name, strategy), id=label))
    return out


ENGINES = _engines()
# gate/up always runs factored; the reconstruct op is the reconstruct strategy's weight
FACTORED = [e for e in ENGINES if e.values[0][1] in (None, "factored")]
RECONSTRUCT = [e for e in ENGINES if e.values[0][1] in (None, "reconstruct")]


def _dtypes():
    return [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):  # parametrised over ENGINES, or a subset by indirect parametrisation
    """Runs the test body under one backend (and strategy); skips with the reasons when it cannot run."""
    name, strategy = request.param
    if name == "cuda" and CUDA_TWIN:
        # the op runs on CPU tensors through the CPU twin: let the backend take them
        real = type(dispatch.backend("cuda")).device_reasons
        monkeypatch.setattr(type(dispatch.backend("cuda")), "device_reasons",
                            lambda self, device: [] if device.type == "cpu" else real(self, device))
    if strategy:
        monkeypatch.setenv("FIPS_KERNELS_STRATEGY", strategy)
    else:
        monkeypatch.delenv("FIPS_KERNELS_STRATEGY", raising=False)
    return Engine(name, strategy)


class Engine:
    def __init__(self, name, strategy):
        self.name, self.strategy = name, strategy
        self.backend = dispatch.backend(name)

    def skip_unless_runs(self, p: Problem):
        """Skip (with the reasons) unless this backend and strategy can run ``p``."""
        why = self.backend.not_supported_reasons(p)
        if not why and self.strategy and p.op in ("expand", "contract"):
            why = self.backend.strategies().by_name[self.strategy].reasons(p)
        if why:
            pytest.skip(f"{self.name}/{self.strategy}: " + "; ".join(why))

    @contextlib.contextmanager
    def forced(self):
        with fk.use_backend(self.name):
            yield


def _problem(op, kind, factor, dtype, M, activation="none"):
    return Problem.for_layer(op, kind, factor.layout, dtype, DEVICE, M, D, activation)


def _case(kind, case, dtype):
    fmt, opts, qbits, base_bits = case
    return layer_case(kind, fmt, opts, qbits, base_bits, dtype=dtype, device=DEVICE, d=D, r=R, h=H)


# ---------------------------------------------------------------- layers

@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("kind", ["expand", "contract"])
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
def test_layer(engine, case, kind, dtype):
    factor, base, bias = _case(kind, case, dtype)
    engine.skip_unless_runs(_problem(kind, kind, factor, dtype, max(MS)))
    in_f = D if kind == "expand" else H
    with engine.forced():
        for i, M in enumerate(MS):
            lead = (M,) if i % 2 == 0 else (1, M)  # 2-D and 3-D inputs
            x = torch.randn(*lead, in_f, device=DEVICE).to(dtype)
            b = bias if i % 2 == 0 else None
            out = fips_linear(x, base, factor, kind, b)
            check_layer(out.reshape(M, -1), x.reshape(M, -1), base, factor, kind, b)


@pytest.mark.parametrize("case", FEW, ids=FEW_IDS)
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
def test_activation_epilogue(engine, case, activation, dtype):
    factor, base, bias = _case("expand", case, dtype)
    engine.skip_unless_runs(_problem("expand", "expand", factor, dtype, 33, activation))
    with engine.forced():
        for M in (1, 33):
            x = torch.randn(M, D, device=DEVICE).to(dtype)
            check_layer(fips_linear(x, base, factor, "expand", bias, activation), x, base, factor, "expand", bias,
                        activation)


@pytest.mark.parametrize("engine", FACTORED, indirect=True)
@pytest.mark.parametrize("case", FEW, ids=FEW_IDS)
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_gate_up(engine, case, dtype, with_bias):
    gate, base, bg = _case("expand", case, dtype)
    up, _, bu = _case("expand", (case[0], case[1], case[2], None), dtype)
    if case[0] not in ("bitmap", "csr"):  # same pattern: pack up with gate's positions
        up = SparseFactor.from_layout(gate.layout, *_like(gate, up))
    if not with_bias:
        bg = bu = None
    engine.skip_unless_runs(_problem("gate_up", "expand", gate, dtype, 64))
    Ud = reference.base_matrix(base)
    Bg, Bu = gate.to_dense(), up.to_dense()
    with engine.forced():
        for M in (1, 3, 64):
            x = torch.randn(2, M, D, device=DEVICE).to(dtype)
            out = gate_up(x, base, gate, up, bg, bu)
            xd, Udd = x.double(), Ud.double()
            truth = F.silu(reference.expand(xd, Udd, Bg.double(), None if bg is None else bg.double())) * \
                reference.expand(xd, Udd, Bu.double(), None if bu is None else bu.double())
            z = x @ Ud
            g_lo, u_lo = z @ Bg, z @ Bu
            if bg is not None:
                g_lo, u_lo = g_lo + bg, u_lo + bu
            baseline = (F.silu(g_lo.float()) * u_lo.float()).to(dtype)
            assert out.dtype == dtype and out.shape == truth.shape
            eps = 1e-5 if dtype == torch.float32 else 1e-3
            assert_close_to_truth(out, truth, baseline, eps=eps * truth.abs().max().item())


def _like(gate, up):
    """``up``'s values on ``gate``'s stored positions (a gate/up pair shares its layout)."""
    values = torch.randn_like(gate.values, dtype=torch.float32).to(gate.values.dtype) if not gate.quantized \
        else gate.values.clone()
    return values, gate.aux_tensors, (gate.scales * 1.5 if gate.quantized else None)


@pytest.mark.parametrize("engine", RECONSTRUCT, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("kind", ["expand", "contract"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_reconstruct(engine, case, kind, dtype):
    factor, base, _ = _case(kind, case, dtype)
    engine.skip_unless_runs(_problem("reconstruct", kind, factor, dtype, 0))
    with engine.forced():
        W = reconstruct(base, factor, kind)
    Ud, V = reference.base_matrix(base), reference.factor_matrix(factor, kind)
    truth = reference.linear_weight(Ud.double(), V.double(), kind)
    baseline = (Ud @ V).t() if kind == "expand" else Ud @ V  # plain PyTorch in the dtype
    assert W.shape == truth.shape and W.dtype == dtype and W.is_contiguous()
    eps = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close_to_truth(W, truth, baseline, eps=eps * truth.abs().max().item())


def test_empty_and_non_contiguous_inputs(engine):
    factor, base, bias = _case("contract", CASES[1], torch.float16)
    engine.skip_unless_runs(_problem("contract", "contract", factor, torch.float16, 9))
    with engine.forced():
        assert fips_linear(torch.randn(0, H, device=DEVICE).half(), base, factor, "contract", bias).shape == (0, D)
        x = torch.randn(H, 9, device=DEVICE).half().t()
        # fp16's default tolerance, not bit-exact: a GEMM may block a strided input differently (1 ulp);
        # reading the transposed view as if it were contiguous would be off by O(1)
        torch.testing.assert_close(fips_linear(x, base, factor, "contract", bias),
                                   fips_linear(x.contiguous(), base, factor, "contract", bias))


# ---------------------------------------------------------------- the suite itself

def test_the_oracle_fails_on_one_wrong_value():
    """A kernel that dropped one stored value (the largest) must fail the check."""
    factor, base, bias = layer_case("expand", "nm", {"n": 1, "m": 4}, dtype=torch.float16)
    values = factor.values.clone()
    values.view(-1)[values.abs().argmax()] = 0
    wrong = SparseFactor.from_layout(factor.layout, values, factor.aux_tensors, validate=False)
    x = torch.randn(7, D).half()
    with fk.use_backend("reference"):
        check_layer(fips_linear(x, base, factor, "expand", bias), x, base, factor, "expand", bias)
        with pytest.raises(AssertionError, match="max error"):
            check_layer(fips_linear(x, base, wrong, "expand", bias), x, base, factor, "expand", bias)


def test_every_backend_is_in_the_suite():
    names = {p.values[0][0] for p in ENGINES}
    assert names == set(dispatch.backend_names())
