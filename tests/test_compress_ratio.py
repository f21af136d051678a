"""``compress(ratio=R)`` (the byte model, the plan, never above the target,
clear errors), end-to-end fine-tuning, and the accelerated sparsity schedule."""
import pytest
import torch

import fips_kernels as fk
from fips_kernels.compress import schedule
from fips_kernels.compress.factors import pack_group
from fips_kernels.compress.ratio import Form, RatioError, group_bytes, plan_ratio
from fips_kernels.compress.schedule import nm_keep
from fips_kernels.budget import resolve_sparsity, stored_values

from compress_models import plain_vit, tokens

FAST = dict(steps=6, prune_every=2, progress=False, batch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread_reference")


def _masked_factors(d, hidden, kinds, rank, form, seed=0):
    """Random ``U`` and factors ``V_i`` holding exactly what ``form`` stores at ``rank``."""
    g = torch.Generator().manual_seed(seed)
    pat, s = resolve_sparsity(form.pattern, form.sparsity)
    U = torch.randn(d, rank, generator=g)
    Vs = []
    for kind, h in zip(kinds, hidden):
        V = torch.randn(rank, h, generator=g)
        if pat[0] == "unstructured":
            keep = torch.zeros(V.numel(), dtype=torch.bool)
            keep[torch.randperm(V.numel(), generator=g)[:stored_values(kind, rank, h, pat, s)]] = True
            V = V * keep.view_as(V)
        elif pat[0] == "nm":
            B = V if kind == "expand" else V.t()
            B = B * nm_keep(B.abs(), pat[1], pat[2])
            V = B if kind == "expand" else B.t()
        Vs.append(V)
    return U, Vs, pat


@pytest.mark.parametrize("form", [
    Form("unstructured", 0.75, None, 64, None, None),
    Form("unstructured", 0.5, 4, 64, 8, torch.float16),
    Form("unstructured", 0.75, 8, 32, None, torch.bfloat16),
    Form("dense", None, 4, 64, 8, torch.float16),
    Form("2:4", None, 4, 16, 8, None),
    Form("1:4", None, None, 64, None, torch.float16),
], ids=lambda f: f.describe())
@pytest.mark.parametrize("rank", [7, 64, 97])
def test_group_bytes_is_what_the_packed_group_stores(form, rank):
    d, hidden, kinds = 48, [80, 80, 80, 80], ["expand", "contract", "expand", "contract"]
    U, Vs, pat = _masked_factors(d, hidden, kinds, rank, form)
    fmt = {"unstructured": "bitmap", "nm": "nm", "dense": "dense"}[pat[0]]
    group = pack_group(U, Vs, [None] * 4, kinds, pat, fmt, dtype=torch.float32, qbits=form.qbits,
                       qgroup=form.qgroup, base_qbits=form.base_qbits, factor_dtype=form.factor_dtype)
    assert group.nbytes() == group_bytes(d, hidden, kinds, rank, form)


def _report_bytes_of_the_model(model):
    """Every stored byte of the installed FiPS layers and bases, biases left out."""
    layers = [m for m in model.modules() if isinstance(m, fk.FiPSLinear)]
    bases = {id(layer.base): layer.base for layer in layers}
    return sum(b.nbytes() for b in bases.values()) + sum(layer.factor.nbytes for layer in layers)


@pytest.mark.parametrize("ratio", [2.5, 5.0, 9.0])
def test_ratio_is_reached_and_never_exceeded(ratio):
    model = plain_vit(d=64, h=256, depth=2)
    dense = sum(b.mlp.fc1.weight.numel() + b.mlp.fc2.weight.numel() for b in model.blocks) * 4
    out, report = fk.compress(model, ratio=ratio, calib_data=tokens(n=24, d=64), group_size=2, finetune_steps=2,
                              **FAST)
    assert report.dense_bytes == dense
    assert report.bytes <= dense / ratio
    assert report.bytes == _report_bytes_of_the_model(out)
    assert report.config["ratio"] == ratio and "target ratio" in report.config["plan"]
    assert f"--ratio {ratio:g} chose" in report.format()
    # close to the target: one more rank would break it
    plan = plan_ratio([type("G", (), dict(d=64, hidden=[256] * 4, kinds=["expand", "contract"] * 2))()], ratio)
    assert group_bytes(64, [256] * 4, ["expand", "contract"] * 2, plan.ranks[0] + 1, plan.form) > dense / ratio


def test_ratio_rules_and_explicit_overrides():
    groups = [type("G", (), dict(d=384, hidden=[1536] * 6, kinds=["expand", "contract"] * 3))()] * 2
    p4 = plan_ratio(groups, 4)
    assert p4.form.qbits == 8 and p4.form.sparsity == 0.5 and p4.form.factor_dtype == torch.float16
    assert plan_ratio(groups, 1.5).budget > 1  # overcomplete: the bytes bind, not the parameter count
    p8 = plan_ratio(groups, 8)
    assert p8.form.qbits == 4 and p8.form.base_qbits == 8 and p8.bytes <= p8.dense_bytes / 8
    assert plan_ratio(groups, 8, torch.bfloat16).form.factor_dtype is None  # bf16 models keep bf16
    assert plan_ratio(groups, 8, torch.bfloat16).dense_bytes == p8.dense_bytes // 2
    forced = plan_ratio(groups, 8, qbits=8, pattern="2:4")
    assert forced.form.qbits == 8 and forced.form.pattern == "2:4" and forced.form.sparsity is None
    assert forced.bytes <= forced.dense_bytes / 8


def test_unreachable_or_bad_ratios_are_refused():
    model = plain_vit(d=64, h=256, depth=2)
    with pytest.raises(RatioError, match="out of reach"):
        fk.compress(model, ratio=1000, calib_data=tokens(n=16, d=64), **FAST)
    for bad in (1.0, 0.5, -3, float("nan"), "8"):
        with pytest.raises(RatioError, match="ratio must be a number > 1"):
            fk.compress(model, ratio=bad, calib_data=tokens(n=16, d=64), **FAST)
    with pytest.raises(ValueError, match="budget or ratio, not both"):
        fk.compress(model, ratio=4, budget=0.3, calib_data=tokens(n=16, d=64), **FAST)
    with pytest.raises(ValueError, match="finetune_steps"):
        fk.compress(model, finetune_steps=-1, calib_data=tokens(n=16, d=64), **FAST)
    # nothing was touched
    assert not any(isinstance(m, fk.FiPSLinear) for m in model.modules())


def _rel_error(a, b):
    return float((a - b).norm() / b.norm())


def test_end_to_end_fine_tuning_lowers_the_output_error():
    x = tokens(n=32, d=32)
    dense = plain_vit(depth=3)
    with torch.no_grad():
        ref = dense(x)
    errors = {}
    for ft in (0, 40):
        model, report = fk.compress(plain_vit(depth=3), budget=0.3, calib_data=x, group_size=1, holdout=0,
                                    finetune_steps=ft, finetune_lr=3e-3, **dict(FAST, steps=20))
        with torch.no_grad():
            errors[ft] = _rel_error(model(x), ref)
        assert report.config["finetune_steps"] == ft
    assert errors[40] < 0.8 * errors[0], errors


def test_quantised_fine_tuning_stays_on_the_packed_grid():
    x = tokens(n=24, d=32)
    model, report = fk.compress(plain_vit(depth=2), budget=0.5, calib_data=x, group_size=2, qbits=4,
                                base_qbits=8, finetune_steps=6, **FAST)
    layers = [m for m in model.modules() if isinstance(m, fk.FiPSLinear)]
    assert all(layer.factor.qbits == 4 and layer.base.quantized for layer in layers)
    assert "then 6 end-to-end steps" in report.format()


def test_accelerated_schedule():
    t_end, t_accel, final = 300, 50, 0.75
    fr = [schedule.accelerated_fraction(t, t_end, t_accel, final) for t in range(0, 320, 10)]
    assert fr[0] == pytest.approx(0.05 / 0.75)
    assert schedule.accelerated_fraction(50, t_end, t_accel, final) == pytest.approx(0.5 / 0.75)
    assert all(a <= b for a, b in zip(fr, fr[1:])) and fr[-1] == 1.0
    assert schedule.accelerated_fraction(t_end, t_end, t_accel, final) == 1.0
    # a final sparsity below the jump goes straight there
    assert schedule.accelerated_fraction(60, t_end, t_accel, 0.3) == pytest.approx(1.0)
    model, report = fk.compress(plain_vit(depth=2), calib_data=tokens(n=24), prune_schedule="accelerated",
                                **dict(FAST, steps=12))
    assert report.reached <= 0.5
    with pytest.raises(ValueError, match="prune_schedule"):
        fk.compress(plain_vit(depth=2), calib_data=tokens(n=24), prune_schedule="linear", **FAST)
