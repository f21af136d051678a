"""``compress(..., factor_dtype=torch.float16 | torch.bfloat16)``: training stays fp32, the
packed U, factor values (or the scales of int8/int4 values), base scales and biases are
rounded to 16 bits, the stored bytes and the end-to-end check reflect that, and the
16-bit FiPS layers run inside the fp32 model (``cast_input``)."""
import pytest
import torch
import torch.nn.functional as F

import fips_kernels as fk
from fips_kernels.compress.factors import pack_group

from compress_models import plain_vit, tokens

SMALL = dict(steps=30, prune_every=10, progress=False, batch_size=8, group_size=2, lr=3e-3)


pytestmark = pytest.mark.usefixtures("one_thread_reference")


def _fips_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, fk.FiPSLinear)}


@pytest.fixture(scope="module")
def runs():
    """The same compression with fp32, fp16 and bf16 factors (identical training)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    x = tokens()
    out = {}
    with fk.use_backend("reference"):
        for dt in (None, torch.float16, torch.bfloat16):
            model, report = fk.compress(plain_vit(), calib_data=x, factor_dtype=dt, **SMALL)
            out[dt] = (model, report)
    torch.set_num_threads(old)
    return x, out


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_packed_tensors_are_the_fp32_result_rounded_once(runs, dt):
    _, out = runs
    m32, m16 = out[None][0], out[dt][0]
    l32, l16 = _fips_layers(m32), _fips_layers(m16)
    assert l32.keys() == l16.keys() and len(l16) == 8
    for name, layer in l16.items():
        ref = l32[name]
        assert layer.cast_input and not ref.cast_input
        assert layer.compute_dtype == dt and layer.U.dtype == dt and layer.bias.dtype == dt
        assert layer.V_values.dtype == dt
        # the same training (fp32), the same masks; the values rounded to nearest once
        assert torch.equal(layer.V_values, ref.V_values.detach().to(dt))
        assert torch.equal(layer.U, ref.U.detach().to(dt))
        assert torch.equal(layer.bias, ref.bias.detach().to(dt))
        for a in layer._aux_names:
            assert torch.equal(getattr(layer, a), getattr(ref, a))
    for k, v in m16.state_dict().items():  # nothing else in the model changed dtype
        if ".mlp." not in k:
            assert v.dtype == torch.float32, k


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_stored_bytes_halve_the_float_bytes(runs, dt):
    _, out = runs
    r32, r16 = out[None][1], out[dt][1]
    layers = _fips_layers(out[dt][0])
    assert r16.config["factor_dtype"] == str(dt).replace("torch.", "") and r32.config["factor_dtype"] == "float32"
    assert f"factor dtype {r16.config['factor_dtype']}" in r16.format()
    assert "factor dtype" not in r32.format()
    for g32, g16 in zip(r32.groups, r16.groups):
        assert g16.parameters == g32.parameters and g16.dense_bytes == g32.dense_bytes
        assert [e["rel"] for e in g16.errors_final] == [e["rel"] for e in g32.errors_final]
        # by hand: 32·r base values + the kept factor values, 2 bytes each instead of 4; the
        # bitmap's words and offsets unchanged
        group = [layers[n] for n in g16.layers]
        float_values = 32 * g16.rank + sum(layer.V_values.numel() for layer in group)
        assert float_values == g16.parameters
        aux = sum(getattr(layer, a).numel() * 4 for layer in group for a in layer._aux_names)
        assert g32.bytes == 4 * float_values + aux
        assert g16.bytes == 2 * float_values + aux
        assert g16.bytes == group[0].base.nbytes() + sum(layer.factor.nbytes for layer in group)
        assert 0.5 < g16.bytes / g32.bytes < 0.6
    assert r16.bytes == sum(g.bytes for g in r16.groups)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_output_stays_close_to_the_fp32_factors_and_the_report_measures_it(runs, dt):
    x, out = runs
    m32, m16 = out[None][0], out[dt][0]
    with torch.no_grad():
        y32, y16 = m32(x), m16(x)
    assert y16.dtype == torch.float32
    tol = 2e-3 if dt == torch.float16 else 2e-2
    assert (y16 - y32).abs().max().item() < tol * y32.abs().max().item()
    assert not torch.equal(y16, y32)  # the rounding is really there
    # the report's end-to-end numbers are the 16-bit model's on the held-back batch
    original = plain_vit()
    held = x[32:]
    with torch.no_grad():
        cos = F.cosine_similarity(m16(held), original(held), dim=-1)
    a16 = out[dt][1].end_to_end["outputs"]["output"]
    a32 = out[None][1].end_to_end["outputs"]["output"]
    assert a16["cosine_mean"] == pytest.approx(cos.mean().item(), abs=1e-6)
    assert a16["cosine_mean"] == pytest.approx(a32["cosine_mean"], abs=5e-3 if dt == torch.float16 else 2e-2)


def test_a_16bit_layer_computes_in_its_dtype_inside_an_fp32_model(runs):
    """The input is rounded to fp16, the fp16 factors multiply it (fp32 accumulation on the
    reference backend), the output is rounded to fp16 and handed back as fp32."""
    x, out = runs
    layer = out[torch.float16][0].blocks[1].mlp.fc2  # contract
    h = torch.randn(5, 7, layer.in_features)
    W = fk.reference.linear_weight(layer.U, layer.factor, layer.kind).float()  # the fp16 weight, exactly
    expect = (h.half().float() @ W.t() + layer.bias.float()).half().float()
    with torch.no_grad():
        got = layer(h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expect, rtol=2e-3, atol=2e-3)
    with torch.no_grad():  # an input already in the layer's dtype runs as before
        assert layer(h.half()).dtype == torch.float16
    # trainable through the casts
    h.requires_grad_(True)
    layer(h).sum().backward()
    assert h.grad is not None and h.grad.dtype == torch.float32 and layer.V_values.grad is not None
    layer.zero_grad(set_to_none=True)
    # without cast_input a mismatch is still refused
    layer.cast_input = False
    try:
        with pytest.raises(TypeError, match="dtype mismatch: input is torch.float32"):
            layer(h.detach())
    finally:
        layer.cast_input = True


def test_quantised_factors_keep_their_integers_and_take_16bit_scales():
    x = tokens()
    kw = dict(SMALL, steps=20, qbits=8, qgroup=16, base_qbits=8)
    m32, r32 = fk.compress(plain_vit(), calib_data=x, **kw)
    m16, r16 = fk.compress(plain_vit(), calib_data=x, factor_dtype="fp16", **kw)
    l32, l16 = _fips_layers(m32), _fips_layers(m16)
    for name, layer in l16.items():
        ref = l32[name]
        assert layer.V_values.dtype == torch.int8 and torch.equal(layer.V_values, ref.V_values)
        assert layer.V_scales.dtype == torch.float16 and torch.equal(layer.V_scales, ref.V_scales.half())
        assert layer.base.quantized and layer.U.dtype == torch.int8 and torch.equal(layer.U, ref.U)
        assert layer.base.U_scales.dtype == torch.float16
        assert layer.bias.dtype == torch.float16 and layer.compute_dtype == torch.float16
    for g32, g16 in zip(r32.groups, r16.groups):
        group = [l16[n] for n in g16.layers]
        scale_values = group[0].base.U_scales.numel() + sum(layer.V_scales.numel() for layer in group)
        assert g32.bytes - g16.bytes == 2 * scale_values
    with torch.no_grad():
        y32, y16 = m32(x), m16(x)
    assert (y16 - y32).abs().max().item() < 2e-3 * y32.abs().max().item()


@pytest.mark.parametrize("bad", [torch.float64, torch.int8, "fp8", "half ", 16])
def test_an_unsupported_factor_dtype_is_refused_before_the_model_is_touched(bad):
    model = plain_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="factor_dtype must be None, torch.float32, torch.float16 or torch.bfloat16"):
        fk.compress(model, calib_data=tokens(), factor_dtype=bad, **SMALL)
    assert not _fips_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fp32_names_the_default():
    x = tokens()
    kw = dict(SMALL, steps=10)
    a, ra = fk.compress(plain_vit(), calib_data=x, **kw)
    b, rb = fk.compress(plain_vit(), calib_data=x, factor_dtype="fp32", **kw)
    assert ra.config == rb.config and ra.bytes == rb.bytes
    assert not any(layer.cast_input for layer in _fips_layers(b).values())
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_value_beyond_the_fp16_range_is_refused():
    U = torch.randn(8, 4)
    V = torch.zeros(4, 16)
    V[0, 0] = 1e5  # > 65504
    kw = dict(kinds=["expand"], pattern=("dense", None, None), fmt="dense", dtype=torch.float32)
    with pytest.raises(ValueError, match="beyond the torch.float16 range"):
        pack_group(U, [V], [torch.zeros(16)], factor_dtype=torch.float16, **kw)
    group = pack_group(U, [V], [torch.zeros(16)], factor_dtype=torch.bfloat16, **kw)  # bf16 has the range
    assert group[0].V_values.dtype == torch.bfloat16 and group[0].cast_input


def test_the_checkpoint_of_a_16bit_result_is_bit_exact(runs, tmp_path):
    x, out = runs
    model = out[torch.float16][0]
    path = tmp_path / "vit_fp16.safetensors"
    fk.save(model, path)
    fresh = fk.load(path, plain_vit(seed=123))  # an fp32 model built from scratch
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    layers = _fips_layers(fresh)
    assert all(layer.cast_input and layer.compute_dtype == torch.float16 for layer in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # an fp32 checkpoint's header stays as it was (no cast_input entry)
    fk.save(out[None][0], tmp_path / "vit_fp32.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "vit_fp32.safetensors"), framework="pt") as f:
        assert "cast_input" not in f.metadata()["fips_kernels"]
    with safe_open(str(path), framework="pt") as f:
        assert '"cast_input": true' in f.metadata()["fips_kernels"]


def test_a_casting_layer_compiles_without_graph_breaks():
    torch.manual_seed(0)
    group = fk.factorize_group([torch.nn.Linear(24, 40), torch.nn.Linear(40, 24)]).to(torch.float16)
    for layer in group:
        layer.cast_input = True
    x = torch.randn(3, 24)
    f = torch.compile(lambda x: group[1](group[0](x)), fullgraph=True, backend="aot_eager")
    y = f(x)
    assert y.dtype == torch.float32 and torch.equal(y, group[1](group[0](x)))
