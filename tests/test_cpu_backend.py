"""The ``cpu`` backend (fips_kernels/cpu, csrc/cpu) beyond the conformance suite:
its kernel against fp64 truth for every copy (rows / walk path, AVX-512 / AVX2 /
baseline code), value kind and tile; its errors; the two CPU modes and their
memory policy; the ``cpu_mode`` arguments and ``FIPS_KERNELS_CPU_MODE``.

The conformance suite (test_backend_conformance.py) already runs the backend
on every layer row it supports (bitmap and dense factors, M = 1, 17, 130,
2-D and 3-D inputs, int8/int4, activations, gate/up, reconstruct)."""
import os

import pytest
import torch
import torch.nn.functional as F

import fips_kernels as fk
from fips_kernels import _extension, dispatch
from fips_kernels.compress import CompressConfig
from fips_kernels.formats import SparseFactor

from conftest import assert_close_to_truth

needs_kernels = pytest.mark.skipif(not _extension.CPU.available(),
                                   reason=f"fips_kernels._cpu unavailable: {_extension.CPU.error()}")


def test_cpu_kernels_available():
    """Under FIPS_KERNELS_REQUIRE_CPU_KERNELS=1 (CI: .ci/run) a missing build fails instead of skipping."""
    if os.environ.get("FIPS_KERNELS_REQUIRE_CPU_KERNELS") == "1":
        assert _extension.CPU.available(), f"fips_kernels._cpu is unavailable: {_extension.CPU.error()}"
    elif not _extension.CPU.available():
        pytest.skip(f"fips_kernels._cpu unavailable: {_extension.CPU.error()}")
    assert _extension.CPU.error() is None and torch.ops.fips_kernels_cpu.isa() in ("avx512", "avx2", "baseline")


def _copies():
    """(path, isa) pairs this CPU runs: the rows kernel if present, the walk in every ISA copy."""
    if not _extension.CPU.available():
        return [("walk", "")]
    best = torch.ops.fips_kernels_cpu.isa()
    isas = {"avx512": ["avx512", "avx2", "baseline"], "avx2": ["avx2", "baseline"]}.get(best, ["baseline"])
    out = [("walk", isa) for isa in isas]
    if torch.ops.fips_kernels_cpu.has_rows_kernel():
        out.insert(0, ("rows", ""))
    return out


COPIES = _copies()
COPY_IDS = [f"{p}-{i or 'best'}" for p, i in COPIES]
VALUES = [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.float16, 8),
          (torch.float32, 4), (torch.float16, 8, 32)]
VALUE_IDS = ["fp32", "fp16", "bf16", "int8", "int4", "int8-g32"]


def _factor(K, N, dtype, qbits, qgroup=64, tile=(64, 64), density=0.5):
    B = torch.randn(K, N) * (torch.rand(K, N) < density)
    if qbits:
        return SparseFactor.pack(B.to(dtype), "bitmap", tile=tile, qbits=qbits, qgroup=qgroup)
    return SparseFactor.pack(B.to(dtype), "bitmap", tile=tile)


def _run(x, f, bias=None, activation=0, path="auto", isa=""):
    K, N = f.shape
    bitmask, offsets = f.aux_tensors
    return torch.ops.fips_kernels_cpu.bitmap_mm(x, f.values, bitmask, offsets, f.scales, bias, K, N, *f.params.tile,
                                                f.qbits or 0, f.qgroup or 0, activation, path, isa)


def _dense(f):
    """The factor's exact values: ``q·s`` in fp32 for quantised ones (what the kernels compute),
    not rounded to the scales' dtype."""
    return f.to(torch.float32).to_dense() if f.quantized else f.to_dense().float()


def _truth(x, f, bias=None, activation=0):
    y = x.double() @ _dense(f).double()
    if bias is not None:
        y = y + bias.double()
    return {0: y, 1: F.gelu(y), 2: F.silu(y)}[activation]


@needs_kernels
@pytest.mark.parametrize("copy", COPIES, ids=COPY_IDS)
@pytest.mark.parametrize("values", VALUES, ids=VALUE_IDS)
@pytest.mark.parametrize("K, N, M", [(70, 100, 1), (70, 100, 17), (45, 37, 6), (130, 64, 130), (1, 33, 3),
                                     (200, 129, 65), (133, 37, 300), (70, 129, 257)])
def test_kernel_matches_truth(copy, values, K, N, M):
    """Every path and instruction-set copy against fp64 truth. The walk replays a per-strip list
    from two passes on (M > 128 rows with AVX-512, > 64 with AVX2, > 32 baseline): M = 130, 257
    and 300 run it with short last passes; N = 37 and the 1-column strip of N = 129 take the
    epilogue's ragged edges (fewer than 16 columns), M = 300 its ragged rows."""
    path, isa = copy
    dtype, qbits, *group = values
    if path == "rows" and qbits == 4:
        pytest.skip("the rows kernel takes float and int8 values (int4 runs the walk)")
    f = _factor(K, N, dtype, qbits, *group)
    x = torch.randn(M, K)
    bias = torch.randn(N).to(dtype if dtype != torch.float32 or not qbits else torch.float32)
    out = _run(x, f, bias, 0, path, isa)
    truth = _truth(x, f, bias)
    baseline = x @ _dense(f) + bias.float()  # plain fp32 PyTorch
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert_close_to_truth(out, truth, baseline, eps=1e-5 * truth.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("copy", COPIES, ids=COPY_IDS)
@pytest.mark.parametrize("tile", [(64, 64), (32, 32), (17, 64), (64, 32), (1, 32)], ids=str)
@pytest.mark.parametrize("M", [9, 150])
def test_kernel_tiles_and_epilogue(copy, tile, M):
    path, isa = copy
    if path == "rows" and tile[1] != 64:
        with pytest.raises(RuntimeError, match="path 'rows' cannot run"):
            _run(torch.randn(3, 50), _factor(50, 70, torch.float32, None, tile=tile), path=path, isa=isa)
        return
    f = _factor(50, 70, torch.float32, 8, 16, tile=tile, density=0.3)
    x = torch.randn(M, 50)
    bias = torch.randn(70)
    for activation in (0, 1, 2):
        out = _run(x, f, bias, activation, path, isa)
        truth = _truth(x, f, bias, activation)
        torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5 * truth.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("M", [5, 300])
def test_kernel_threads_give_the_single_thread_result(M):
    """Strips run in parallel, each thread with its own scratch (the replayed list included):
    the same bits as one thread, since a strip's sums do not depend on the split."""
    f = _factor(150, 333, torch.float16, 8)
    x = torch.randn(M, 150)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(x, f)
        torch.set_num_threads(2)
        two = _run(x, f)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two, one, rtol=0, atol=0)
    assert_close_to_truth(two, _truth(x, f), x @ _dense(f), eps=1e-5 * _truth(x, f).abs().max().item())


@needs_kernels
def test_a_wrong_value_fails_the_check():
    """The oracle catches one dropped stored value."""
    f = _factor(70, 100, torch.float32, None)
    x = torch.randn(17, 70)
    values = f.values.clone()
    values[values.abs().argmax()] = 0
    broken = SparseFactor.from_layout(f.layout, values, f.aux_tensors, None)
    out = _run(x, broken)
    with pytest.raises(AssertionError):
        assert_close_to_truth(out, _truth(x, f), x @ _dense(f), eps=1e-5)


@needs_kernels
@pytest.mark.parametrize("values", VALUES, ids=VALUE_IDS)
def test_bitmap_to_dense(values):
    dtype, qbits, *group = values
    f = _factor(70, 100, dtype, qbits, *group)
    bitmask, offsets = f.aux_tensors
    dense = torch.ops.fips_kernels_cpu.bitmap_to_dense(f.values, bitmask, offsets, f.scales, 70, 100,
                                                       *f.params.tile, f.qbits or 0, f.qgroup or 0)
    assert dense.dtype == torch.float32
    torch.testing.assert_close(dense, _dense(f), rtol=0, atol=0)


@needs_kernels
def test_kernel_errors_name_the_argument():
    f = _factor(70, 100, torch.float32, None)
    x = torch.randn(4, 70)
    with pytest.raises(RuntimeError, match="x must be float32"):
        _run(x.double(), f)
    with pytest.raises(RuntimeError, match=r"x must be float32 \(M × K=70\)"):
        _run(torch.randn(4, 69), f)
    bitmask, offsets = f.aux_tensors
    op = torch.ops.fips_kernels_cpu.bitmap_mm
    with pytest.raises(RuntimeError, match="bitmask must be int32"):
        op(x, f.values, bitmask[:-1], offsets, None, None, 70, 100, 64, 64, 0, 0, 0)
    with pytest.raises(RuntimeError, match="offsets must start at 0 and end within"):
        op(x, f.values[:-1], bitmask, offsets, None, None, 70, 100, 64, 64, 0, 0, 0)
    with pytest.raises(RuntimeError, match="qbits must be 0, 8 or 4"):
        op(x, f.values.to(torch.int8), bitmask, offsets, None, None, 70, 100, 64, 64, 3, 64, 0)
    with pytest.raises(RuntimeError, match="int8 values need scales"):
        op(x, f.values.to(torch.int8), bitmask, offsets, None, None, 70, 100, 64, 64, 8, 64, 0)
    with pytest.raises(RuntimeError, match="tiles of 1..64 rows and 32 or 64 columns"):
        op(x, f.values, bitmask, offsets, None, None, 70, 100, 64, 128, 0, 0, 0)
    with pytest.raises(RuntimeError, match="path must be"):
        _run(x, f, path="fast")
    with pytest.raises(RuntimeError, match="isa must be"):
        _run(x, f, isa="sse9")
    with pytest.raises(RuntimeError, match="activation must be"):
        _run(x, f, activation=5)


# ---------------------------------------------------------------- the backend in dispatch

def _layer(qbits=8, dtype=torch.float16, tile=(64, 64), pattern="unstructured"):
    torch.manual_seed(0)
    fc = torch.nn.Linear(70, 150)
    layer = fk.FiPSLinear.from_linear(fc, budget=0.5, pattern=pattern, tile=tile) if pattern == "unstructured" \
        else fk.FiPSLinear.from_linear(fc, budget=0.5, pattern=pattern)
    group_like = torch.nn.Sequential(layer)
    if qbits:
        layer._set_factor(layer.factor.quantize(qbits, 64))
    group_like.to(dtype)
    layer.cast_input = True
    return group_like, layer


@needs_kernels
def test_dispatch_picks_cpu_for_cpu_bitmap_layers_and_says_why_not_otherwise():
    _, layer = _layer()
    assert dispatch.select(layer.dispatch_problem(5)).name == "cpu"
    p64 = dispatch.Problem.for_layer("expand", "expand", layer.factor.layout, torch.float64, "cpu", 5, 70)
    assert dispatch.select(p64).name != "cpu"
    assert "dtype torch.float64 is not supported" in dispatch.explain(p64)
    _, nm = _layer(qbits=None, dtype=torch.float32, pattern="2:4")
    assert "no cpu kernel for the 'nm' format" in dispatch.explain(nm.dispatch_problem(5))
    _, wide = _layer(qbits=None, dtype=torch.float32, tile=(64, 128))
    assert "bitmap tiles of 1..64 rows and 32 or 64 columns" in dispatch.explain(wide.dispatch_problem(5))


def _bytes(module):
    """Every tensor byte a module holds: parameters, buffers and tensor attributes (caches)."""
    seen, total = set(), 0
    for m in module.modules():
        tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)) + \
            [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


@needs_kernels
@pytest.mark.parametrize("shape", [(5, 70), (2, 9, 70), (1, 70)], ids=["2d", "3d", "M1"])
def test_modes_agree_with_the_reference_and_keep_their_memory_policy(shape):
    model, layer = _layer()
    x = torch.randn(*shape)
    with torch.no_grad(), dispatch.use_backend("reference"):
        fk.cpu.set_mode(model, "compressed")
        truth = layer(x.half()).float()  # the reference on the layer's own dtype
    compressed_bytes = _bytes(model)
    with torch.no_grad():
        fk.cpu.set_mode(model, "compressed")
        y_c = layer(x)
        assert layer._weight_cache is None and _bytes(model) == compressed_bytes
        fk.cpu.set_mode(model, "speed")
        assert layer._weight_cache is not None and layer._weight_cache.dtype == torch.float32  # built at set_mode
        assert _bytes(model) == compressed_bytes + 150 * 70 * 4
        y_s = layer(x)
    assert y_c.dtype == y_s.dtype == torch.float32 and y_c.shape == y_s.shape == (*shape[:-1], 150)
    scale = truth.abs().max().item()
    # fp32 activations (not rounded to fp16 as the reference's input was): within fp16 rounding
    torch.testing.assert_close(y_c, truth, rtol=0, atol=4e-3 * scale)
    torch.testing.assert_close(y_s, y_c, rtol=0, atol=1e-5 * scale)


@needs_kernels
def test_speed_mode_builds_on_first_call_and_follows_in_place_edits():
    model, layer = _layer(qbits=None, dtype=torch.float32)
    fk.cpu.set_mode(model, "speed", prepare=False)
    assert layer._weight_cache is None
    x = torch.randn(3, 70)
    with torch.no_grad():
        y0 = layer(x)
        assert layer._weight_cache is not None
        layer.V_values.mul_(2)  # an in-place edit: the rebuilt weight must follow
        y1 = layer(x)
    bias = layer.bias.detach()
    torch.testing.assert_close(y1 - bias, 2 * (y0 - bias), rtol=1e-5, atol=1e-5)


def test_modes_are_checked_and_the_environment_variable_is_read(monkeypatch):
    model, layer = _layer(qbits=None, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"cpu_mode must be one of \('speed', 'compressed'\)"):
        fk.cpu.set_mode(model, "fast")
    monkeypatch.setenv("FIPS_KERNELS_CPU_MODE", "compressed")
    assert fk.cpu.mode_of(layer) == "compressed"
    with torch.no_grad():
        layer(torch.randn(2, 70))
    assert layer._weight_cache is None
    monkeypatch.setenv("FIPS_KERNELS_CPU_MODE", "tiny")
    with pytest.raises(ValueError, match="FIPS_KERNELS_CPU_MODE must be one of"):
        fk.cpu.mode_of(layer)
    fk.cpu.set_mode(model, "speed", prepare=False)  # the model's own mode wins over the variable
    assert fk.cpu.mode_of(layer) == "speed"


def test_training_ignores_the_speed_mode():
    model, layer = _layer(qbits=None, dtype=torch.float32)
    fk.cpu.set_mode(model, "speed", prepare=False)
    layer(torch.randn(2, 70, requires_grad=True)).sum().backward()
    assert layer._weight_cache is None and layer.V_values.grad is not None


def test_load_and_compress_take_cpu_mode(tmp_path):
    model, layer = _layer(qbits=None, dtype=torch.float32)
    path = tmp_path / "m.safetensors"
    fk.save(model, path)
    with pytest.raises(ValueError, match="cpu_mode must be one of"):
        fk.load(path, _layer(qbits=None, dtype=torch.float32)[0], cpu_mode="slow")
    loaded = fk.load(path, torch.nn.Sequential(torch.nn.Linear(70, 150)), cpu_mode="compressed")
    assert all(m.cpu_mode == "compressed" for m in loaded.modules() if isinstance(m, fk.FiPSLinear))
    with pytest.raises(ValueError, match="cpu_mode must be one of"):
        fk.compress(torch.nn.Sequential(torch.nn.Linear(8, 8)), cpu_mode="quick")
    assert CompressConfig(cpu_mode="speed").cpu_mode == "speed"


@needs_kernels
def test_gated_mlp_speed_and_compressed_agree():
    torch.manual_seed(0)
    d, h = 40, 96
    gate, up, down = torch.nn.Linear(d, h), torch.nn.Linear(d, h), torch.nn.Linear(h, d)
    group = fk.factorize_group([gate, up, down], budget=0.6, kinds=["expand", "expand", "contract"])
    mlp = fk.FiPSGatedMLP(group.layers[0], group.layers[1], group.layers[2])
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        with dispatch.use_backend("reference"):
            truth = mlp(x)
        fk.cpu.set_mode(mlp, "compressed")
        y_c = mlp(x)
        fk.cpu.set_mode(mlp, "speed")
        y_s = mlp(x)
    torch.testing.assert_close(y_c, truth, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_s, truth, rtol=1e-4, atol=1e-5)


def test_an_override_wins_and_compress_runs_compressed():
    model, layer = _layer(qbits=None, dtype=torch.float32)
    fk.cpu.set_mode(model, "speed", prepare=False)
    with torch.no_grad(), fk.cpu.override("compressed"):
        layer(torch.randn(2, 70))
        seen = fk.cpu.mode_of(layer)
    assert seen == "compressed" and layer._weight_cache is None and fk.cpu.mode_of(layer) == "speed"
    with pytest.raises(ValueError, match="cpu_mode must be one of"):
        with fk.cpu.override("turbo"):
            pass
    from fips_kernels.compress.api import compress

    assert compress.__wrapped__  # compression trains and evaluates under override("compressed")


def test_cast_input_layers_of_every_dtype_take_fp32_inputs_in_compressed_mode():
    """fp32 activations reach half factors as they are; a float64 layer still casts them."""
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        model, layer = _layer(qbits=None, dtype=dtype)
        fk.cpu.set_mode(model, "compressed")
        x = torch.randn(4, 70)
        with torch.no_grad():
            y = layer(x)
            with dispatch.use_backend("reference"):
                truth = layer(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, truth, rtol=0, atol=1e-2 * truth.abs().max().item())
