"""fips_kernels.compress on plain-PyTorch models (no timm/transformers needed):
presets, the pruning schedules, block-wise training against a plain PyTorch
reference, the budget, masks after packing, resume, bad input."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fips_kernels as fk
from fips_kernels.compress import api, calibration, schedule
from fips_kernels.compress.presets import Preset, PresetError, find_preset, find_units, make_groups
from fips_kernels.compress.state import ResumeError
from fips_kernels.budget import stored_values

from compress_models import PlainViT, plain_vit, tokens

SMALL = dict(steps=30, prune_every=10, progress=False, batch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread_reference")


def _fips_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, fk.FiPSLinear)}


def _block_io(model, x, names):
    """The blocks' inputs and outputs on ``x`` (plain forward hooks)."""
    got = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: got.__setitem__(n, (a[0].detach(), o.detach()))) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


def _dense_copy(model):
    """The compressed model with each FiPSLinear replaced by an nn.Linear holding
    the reference dense weight U·V (plain PyTorch from here on)."""
    ref = copy.deepcopy(model)
    for name, layer in _fips_layers(ref).items():
        lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(fk.reference.linear_weight(layer.U.detach(), layer.factor, layer.kind))
            if layer.bias is not None:
                lin.bias.copy_(layer.bias.detach())
        fk.modules.set_submodule(ref, name, lin)
    return ref


# ---------------------------------------------------------------- presets and groups

def test_vit_like_model_is_found_and_grouped():
    model = PlainViT(depth=5)
    preset = find_preset(model)
    assert preset.name == "vit"
    units = find_units(model, preset)
    assert [u.name for u in units] == [f"blocks.{i}" for i in range(5)]
    assert units[0].linears == ("blocks.0.mlp.fc1", "blocks.0.mlp.fc2")
    assert units[0].kinds == ("expand", "contract") and units[0].d == 32 and units[0].hidden == (64, 64)
    groups = make_groups(units, 2)
    assert [[u.name for u in g.units] for g in groups] == [["blocks.0", "blocks.1"], ["blocks.2", "blocks.3"],
                                                          ["blocks.4"]]
    assert groups[0].linears == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    mlp_units = find_units(model, preset, unit="mlp")
    assert mlp_units[1].name == "blocks.1.mlp" and mlp_units[1].block == "blocks.1"


def test_groups_never_cross_a_stage_or_a_change_of_width():
    class Staged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
            self.stages[0].blocks = torch.nn.ModuleList(PlainViT(d=16, h=32, depth=3).blocks)
            self.stages[1].blocks = torch.nn.ModuleList(PlainViT(d=16, h=32, depth=2).blocks)

    model = Staged()
    units = find_units(model, find_preset(model))
    assert [u.stage for u in units] == ["stages.0.blocks"] * 3 + ["stages.1.blocks"] * 2
    groups = make_groups(units, 4)
    assert [[u.name for u in g.units] for g in groups] == [
        ["stages.0.blocks.0", "stages.0.blocks.1", "stages.0.blocks.2"], ["stages.1.blocks.0", "stages.1.blocks.1"]]


def test_a_custom_preset_describes_any_model():
    class Ffn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 24), torch.nn.Linear(24, 8)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([Ffn() for _ in range(3)])})

        def forward(self, x):
            for layer in self.encoder["layers"]:
                x = layer(x)
            return x

    with pytest.raises(PresetError, match="no built-in preset fits Net"):
        find_preset(Net())
    preset = Preset("mine", r"encoder\.layers\.\d+", ["up", "down"], group_size=3)  # kinds from the shapes
    units = find_units(Net(), preset)
    assert [u.kinds for u in units] == [("expand", "contract")] * 3
    torch.manual_seed(0)
    model, report = fk.compress(Net(), calib_data=torch.randn(24, 5, 8), preset=preset, **SMALL)
    assert len(report.groups) == 1 and report.groups[0].units == ["encoder.layers.0", "encoder.layers.1",
                                                                   "encoder.layers.2"]
    assert isinstance(model.encoder["layers"][2].down, fk.FiPSLinear)


def test_preset_errors_are_clear():
    model = PlainViT()
    with pytest.raises(PresetError, match="unknown preset 'nope'"):
        fk.compress(model, calib_data=tokens(), preset="nope", **SMALL)
    with pytest.raises(PresetError, match="names no MLP module"):
        find_units(model, Preset("x", r"blocks\.\d+", {"mlp.fc1": "expand", "mlp.fc2": "contract"}), unit="mlp")
    with pytest.raises(PresetError, match="cannot tell expand from contract"):
        find_units(model, Preset("x", r"blocks\.\d+", ["attn.out_proj"]))
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        make_groups(find_units(model, find_preset(model)), 0)


# ---------------------------------------------------------------- schedules

def test_cubic_schedule_and_update_steps():
    assert schedule.cubic_fraction(0, 450) == 0.0
    assert schedule.cubic_fraction(450, 450) == 1.0 and schedule.cubic_fraction(599, 450) == 1.0
    assert schedule.cubic_fraction(225, 450) == pytest.approx(1 - 0.5 ** 3)
    # the paper: 600 steps, updates every 50, full sparsity at 75 % of the steps
    assert schedule.update_steps(600, 50) == list(range(0, 451, 50))
    assert schedule.update_steps(20, 50) == [0, 15]  # T_end is always an update
    assert schedule.update_steps(0, 50) == []


def _factors(r=12, hs=(20, 20, 36, 36), seed=0):
    g = torch.Generator().manual_seed(seed)
    kinds = ["expand", "contract", "expand", "contract"]
    return [torch.randn(r, h, generator=g) for h in hs], kinds, r, list(hs)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gmp_masks_reach_the_budgets_count_and_never_revive(scope):
    Vs, kinds, r, hs = _factors()
    pat = ("unstructured", None, None)
    keep = schedule.final_keep_counts(kinds, r, hs, pat, 0.75)
    assert keep == [stored_values(k, r, h, pat, 0.75) for k, h in zip(kinds, hs)]
    prev = None
    for t in schedule.update_steps(100, 10):
        frac = schedule.cubic_fraction(t, 75)
        masks = schedule.magnitude_masks(Vs, prev, kinds, pat, frac, keep, scope)
        if scope == "global":
            total = sum(V.numel() for V in Vs)
            assert sum(int(m.sum()) for m in masks) == total - round(frac * (total - sum(keep)))
        else:
            assert [int(m.sum()) for m in masks] == [V.numel() - round(frac * (V.numel() - k))
                                                     for V, k in zip(Vs, keep)]
        if prev is not None:
            assert all(not (m & ~p).any() for m, p in zip(masks, prev))  # pruned stays pruned
        Vs = [V * m + 0.5 * torch.randn_like(V) * m for V, m in zip(Vs, masks)]  # weights move, pruned stay 0
        prev = masks
    assert t == 75 and frac == 1.0
    if scope == "layer":
        assert [int(m.sum()) for m in prev] == keep
    else:
        assert sum(int(m.sum()) for m in prev) == sum(keep)


def test_global_magnitude_mask_is_one_threshold():
    Vs, kinds, r, hs = _factors()
    pat = ("unstructured", None, None)
    keep = schedule.final_keep_counts(kinds, r, hs, pat, 0.75)
    masks = schedule.magnitude_masks(Vs, None, kinds, pat, 1.0, keep, "global")
    kept = torch.cat([V.abs()[m] for V, m in zip(Vs, masks)])
    dropped = torch.cat([V.abs()[~m] for V, m in zip(Vs, masks)])
    assert kept.min() >= dropped.max()
    assert sum(int(m.sum()) for m in masks) == sum(keep)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4)])
def test_gradual_nm_masks_keep_the_pattern_along_the_reduction_axis(n, m):
    Vs, kinds, r, hs = _factors(r=14)  # r = 14: a padded tail group on the expand axis
    pat = ("nm", n, m)
    for frac, n_t in [(0.0, 4), (0.5, m - round(0.5 * (m - n))), (1.0, n)]:
        masks = schedule.magnitude_masks(Vs, None, kinds, pat, frac, [0] * 4, nm_gradual=True)
        for mask, kind in zip(masks, kinds):
            B = mask if kind == "expand" else mask.t()  # the reduction axis is axis 0 of B
            K = B.shape[0]
            G = -(-K // m)
            counts = F.pad(B.float(), (0, 0, 0, G * m - K)).reshape(G, m, -1).sum(1)
            full = counts[: K // m]
            assert int(full.min()) == int(full.max()) == n_t
            assert int(counts.max()) <= n_t
    fixed = schedule.magnitude_masks(Vs, None, kinds, pat, 0.0, [0] * 4, nm_gradual=False)
    assert all(int(mk.sum()) < mk.numel() // 2 + mk.numel() // 4 for mk in fixed)  # the final n:m from the start


def test_rigl_drops_small_weights_and_grows_large_gradients():
    V = torch.tensor([[5.0, 0.1, 3.0, 0.0], [0.0, 4.0, 0.2, 0.0]])
    mask = V != 0
    grad = torch.tensor([[0.0, 0.0, 0.0, 9.0], [7.0, 0.0, 0.0, 0.1]])
    (new,) = schedule.rigl_update([V], [grad], [mask], 0.4, "layer")  # 5 active: drop 2, grow 2
    assert int(new.sum()) == int(mask.sum())
    assert not new[0, 1] and not new[1, 2]  # the two smallest active
    assert new[0, 3] and new[1, 0]          # the two largest gradients
    assert schedule.rigl_fraction(0, 100) == pytest.approx(0.3) and schedule.rigl_fraction(100, 100) == 0.0


# ---------------------------------------------------------------- compress: training and the reference

@pytest.fixture(scope="module")
def compressed():
    torch.set_num_threads(1)
    model = plain_vit()
    original = copy.deepcopy(model)
    x = tokens()
    # no end-to-end steps: the per-unit errors reported are then those of the packed blocks
    out, report = fk.compress(model, budget=0.5, calib_data=x, group_size=2, finetune_steps=0,
                              **dict(SMALL, steps=60, lr=3e-3))
    return original, out, report, x


def test_compression_meets_the_budget_exactly_as_reported(compressed):
    original, model, report, _ = compressed
    layers = _fips_layers(model)
    assert len(layers) == 8 and len(report.groups) == 2
    for g in report.groups:
        group_layers = [layers[n] for n in g.layers]
        base = group_layers[0].base
        assert all(layer.base is base for layer in group_layers)
        stored = base.U.numel() + sum(layer.V_values.numel() for layer in group_layers)
        assert g.parameters == stored
        assert g.dense_parameters == sum(original.get_submodule(n).weight.numel() for n in g.layers)
        assert stored <= 0.5 * g.dense_parameters
        assert g.rank == fk.modules.group_rank(32, [64] * 4, g.kinds, "unstructured", 0.5)
        assert stored == 32 * g.rank + sum(stored_values(k, g.rank, 64, ("unstructured", None, None), 0.75)
                                           for k in g.kinds)
        base_bytes = base.U.numel() * base.U.element_size()
        assert g.bytes == base_bytes + sum(layer.factor.nbytes for layer in group_layers)
        assert g.dense_bytes == g.dense_parameters * 4
    assert report.reached <= 0.5 and report.parameters == sum(g.parameters for g in report.groups)
    assert report.model_parameters["before"] - report.model_parameters["after"] > 0


def test_training_lowers_the_block_error_below_the_svd_init(compressed):
    original, model, report, x = compressed
    train_x = x[:32]  # 5 batches of 8, the last held back
    names = [f"blocks.{i}" for i in range(4)]
    ref_io = _block_io(original, train_x, names)
    dense = _dense_copy(model)
    for g in report.groups:
        for unit, init, final in zip(g.units, g.errors_init, g.errors_final):
            assert final["rel"] < 0.9 * init["rel"], (unit, init, final)
            # the reported error is the plain-PyTorch error of the packed block on the original input
            inp, target = ref_io[unit]
            with torch.no_grad():
                y = dense.get_submodule(unit)(inp)
            rel = ((y - target).norm() / target.norm()).item()
            assert rel == pytest.approx(final["rel"], rel=1e-3, abs=1e-6)
            assert ((y - target).square().mean()).item() == pytest.approx(final["mse"], rel=1e-3)


def test_the_packed_model_computes_what_the_dense_reference_does(compressed):
    _, model, _, x = compressed
    dense = _dense_copy(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)


def test_end_to_end_agreement_is_reported_on_held_back_samples(compressed):
    original, model, report, x = compressed
    held = x[32:]
    with torch.no_grad():
        ref, out = original(held), model(held)
    cos = F.cosine_similarity(out, ref, dim=-1)
    e = report.end_to_end
    assert e["samples"] == 8 and report.calibration["train_samples"] == 32
    a = e["outputs"]["output"]
    assert a["cosine_mean"] == pytest.approx(cos.mean().item(), abs=1e-6)
    assert a["cosine_min"] == pytest.approx(cos.min().item(), abs=1e-6)
    assert a["top1_agreement"] == pytest.approx((out.argmax(-1) == ref.argmax(-1)).float().mean().item())
    text = report.format()
    assert "held-back" in text and "SVD init -> trained" in text
    assert report.to_dict()["totals"]["parameters"] == report.parameters


def test_steps_zero_is_factorize_group():
    """No training: SVD init + magnitude masks, as fips_kernels.factorize_group builds them."""
    for pattern, scope in [("unstructured", "layer"), ("1:4", "global"), ("2:4", "global")]:
        model = plain_vit(depth=2)
        fcs = [model.get_submodule(n) for n in ("blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1",
                                                 "blocks.1.mlp.fc2")]
        ref = fk.factorize_group(copy.deepcopy(fcs), pattern=pattern, mask_scope=scope)
        model, report = fk.compress(model, calib_data=tokens(n=16), pattern=pattern, mask_scope=scope,
                                    **dict(SMALL, steps=0))
        assert report.groups[0].errors_init == report.groups[0].errors_final
        for name, layer in zip(report.groups[0].layers, ref):
            ours = model.get_submodule(name)
            torch.testing.assert_close(ours.weight.detach(), layer.weight.detach(), rtol=1e-4, atol=1e-5)
            assert ours.factor.nnz == layer.factor.nnz


@pytest.mark.parametrize("pattern", ["1:4", "2:4"])
def test_nm_patterns_are_exact_after_packing(pattern):
    n, m = int(pattern[0]), int(pattern[2])
    model, report = fk.compress(plain_vit(depth=2), calib_data=tokens(n=24), pattern=pattern, **SMALL)
    for layer in _fips_layers(model).values():
        f = layer.factor
        assert f.format == "nm" and (f.n, f.m) == (n, m)
        B = f.to_dense()  # reduction-major: N:M along axis 0
        K = B.shape[0]
        G = -(-K // m)
        counts = (F.pad(B, (0, 0, 0, G * m - K)).reshape(G, m, -1) != 0).sum(1)
        assert int(counts.max()) <= n
    g = report.groups[0]
    assert g.parameters <= 0.5 * g.dense_parameters
    assert all(b["rel"] < a["rel"] for a, b in zip(g.errors_init, g.errors_final))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_sparsity_after_packing(scope):
    model, report = fk.compress(plain_vit(depth=2), calib_data=tokens(n=24), mask_scope=scope, **SMALL)
    g = report.groups[0]
    layers = [model.get_submodule(n) for n in g.layers]
    assert all(layer.factor.format == "bitmap" for layer in layers)
    want = [stored_values(k, g.rank, 64, ("unstructured", None, None), 0.75) for k in g.kinds]
    nnz = [layer.factor.nnz for layer in layers]
    if scope == "layer":
        assert nnz == want
    else:
        assert sum(nnz) == sum(want) and len(set(nnz)) > 1  # one threshold: layers keep different counts


def test_rigl_keeps_the_budget_and_lowers_the_error():
    model, report = fk.compress(plain_vit(depth=2), calib_data=tokens(n=24), pruning="rigl", **SMALL)
    g = report.groups[0]
    assert g.parameters <= 0.5 * g.dense_parameters
    assert sum(model.get_submodule(n).factor.nnz for n in g.layers) == sum(
        stored_values(k, g.rank, 64, ("unstructured", None, None), 0.75) for k in g.kinds)
    assert all(b["rel"] < a["rel"] for a, b in zip(g.errors_init, g.errors_final))


def test_deterministic_with_a_seed():
    def run(seed):
        model, _ = fk.compress(plain_vit(depth=2), calib_data=tokens(n=24), seed=seed, **SMALL)
        return [t.detach().clone() for t in model.state_dict().values()]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_token_mask_restricts_the_loss():
    out = torch.randn(2, 3, 4)
    target = out.clone()
    target[1, 2] += 10.0  # a padded position
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    from fips_kernels.compress.train import masked_mse

    mse, sq, ref, count = masked_mse(out, target, mask)
    assert float(mse) == 0.0 and count == 5 * 4
    assert float(masked_mse(out, target, None)[0]) > 0


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_round_trips(compressed, tmp_path):
    _, model, _, x = compressed
    path = tmp_path / "vit.safetensors"
    fk.save(model, path)
    fresh = fk.load(path, plain_vit(seed=123))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    base = fresh.blocks[3].mlp.fc2.base  # registered once, on the first layer of its group
    assert [n for n, m in fresh.named_modules() if m is base] == ["blocks.2.mlp.fc1.shared_base"]


# ---------------------------------------------------------------- resume

def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    kw = dict(calib_data=tokens(), group_size=1, **SMALL)
    full, full_report = fk.compress(plain_vit(), resume_dir=tmp_path / "a", **kw)

    real = api.train_group
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(args[1].index)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "train_group", crash_on_third)
    model = plain_vit()
    before = _state(model)
    with pytest.raises(KeyboardInterrupt):
        fk.compress(model, resume_dir=tmp_path / "b", **kw)
    assert sorted(p.name for p in (tmp_path / "b").glob("group_*")) == ["group_0000.safetensors",
                                                                          "group_0001.safetensors"]
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())  # the crash left the model as it was

    calls.clear()
    resumed, report = fk.compress(plain_vit(), resume_dir=tmp_path / "b", **kw)
    assert calls == [2, 3]  # only the unfinished groups are trained
    assert [g.resumed for g in report.groups] == [True, True, False, False]
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [g.errors_final for g in report.groups] == [g.errors_final for g in full_report.groups]


def test_resume_refuses_the_state_of_another_run(tmp_path):
    kw = dict(calib_data=tokens(n=16), **SMALL)
    fk.compress(plain_vit(depth=2), resume_dir=tmp_path, **kw)
    with pytest.raises(ResumeError, match="differs in: config.steps"):
        fk.compress(plain_vit(depth=2), resume_dir=tmp_path, **dict(kw, steps=5))
    with pytest.raises(ResumeError, match="other weights"):
        fk.compress(plain_vit(depth=2, seed=7), resume_dir=tmp_path, **kw)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0.0), "budget must be in"),
    (dict(budget=1.5), "budget must be in"),
    (dict(steps=-1), "steps must be a non-negative integer"),
    (dict(pattern="top4"), "not supported here"),
    (dict(pattern="1:4", sparsity=0.5), "implies sparsity 0.75"),
    (dict(pattern="1:4", format="bitmap"), "does not fit pattern"),
    (dict(pattern="1:4", pruning="rigl"), "RigL keeps unstructured masks"),
    (dict(pruning="obs"), "pruning must be"),
    (dict(mask_scope="row"), "mask_scope must be"),
    (dict(holdout=5), "leaves none to train on"),
    (dict(budget=0.01), "leaves no rank"),
])
def test_bad_arguments_are_refused_with_a_clear_error(kwargs, match):
    model = plain_vit(depth=2)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        fk.compress(model, calib_data=tokens(n=40), **dict(SMALL, **kwargs))
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_bad_calibration_data_is_refused():
    with pytest.raises(calibration.CalibrationError, match="needs calibration data"):
        fk.compress(plain_vit(depth=2), **SMALL)
    with pytest.raises(calibration.CalibrationError, match="is a path"):
        fk.compress(plain_vit(depth=2), calib_data="images/", **SMALL)
    with pytest.raises(calibration.CalibrationError, match="one batch size"):
        calibration.as_batches({"a": torch.zeros(4, 2), "b": torch.zeros(3, 2)})
    with pytest.raises(RuntimeError, match="recorded output has"):
        from fips_kernels.compress.train import masked_mse
        masked_mse(torch.zeros(2, 3), torch.zeros(3, 2), None)


def test_calibration_batches_from_tensors_dicts_and_loaders():
    x = torch.randn(10, 3)
    assert [b.shape[0] for b in calibration.as_batches(x, 4)] == [4, 4, 2]
    d = calibration.as_batches({"input_ids": torch.zeros(5, 7), "flag": True}, 2)
    assert [b["input_ids"].shape[0] for b in d] == [2, 2, 1] and d[0]["flag"] is True
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(10)), batch_size=5)
    batches = calibration.as_batches(loader)
    assert len(batches) == 2 and torch.equal(batches[1], x[5:])  # labels dropped
    train, held = calibration.split_holdout(list(range(10)), 0.15)
    assert (train, held) == (list(range(8)), [8, 9])
    assert calibration.fingerprint([x]) == calibration.fingerprint([x.clone()]) != calibration.fingerprint([x + 1])


def test_import_does_not_pull_timm_or_transformers():
    code = ("import sys, fips_kernels as fk; import fips_kernels.compress.api; "
            "assert callable(fk.compress); "
            "bad = [m for m in ('timm', 'transformers', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_recording_per_group_gives_the_same_result():
    kw = dict(calib_data=tokens(n=24), group_size=1, **SMALL)
    a, ra = fk.compress(plain_vit(depth=2), **kw)
    b, rb = fk.compress(plain_vit(depth=2), record_per_group=True, **kw)
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [g.errors_final for g in ra.groups] == [g.errors_final for g in rb.groups]


# ---------------------------------------------------------------- quantised factors (straight-through training)

def test_quantised_compression_trains_through_the_grid_and_packs_it():
    """int8/int4 factors and an int8 base: training sees the rounded values (straight-through
    estimator), the packed layers hold exactly that grid, and training beats rounding the init."""
    torch.manual_seed(0)
    x = tokens()
    results = {}
    for qbits, steps in ((8, 60), (4, 0), (4, 60)):
        model = plain_vit()
        out, report = fk.compress(model, budget=0.5, calib_data=x, group_size=2, qbits=qbits, qgroup=16,
                                  base_qbits=8, **dict(SMALL, steps=steps, lr=3e-3))
        layers = _fips_layers(out)
        assert all(layer.factor.quantized and layer.factor.qbits == qbits for layer in layers.values())
        assert all(layer.base.quantized for layer in layers.values())
        for g in report.groups:  # the same stored values as the float run: the budget is unchanged
            assert g.parameters <= 0.5 * g.dense_parameters
            group_layers = [layers[n] for n in g.layers]
            assert g.bytes == group_layers[0].base.nbytes() + sum(layer.factor.nbytes for layer in group_layers)
        # the packed model computes what the dense reference of its (dequantised) factors does
        dense = copy.deepcopy(out)
        for name, layer in _fips_layers(dense).items():
            lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(fk.reference.linear_weight(layer.base.operand, layer.factor, layer.kind))
                lin.bias.copy_(layer.bias.detach())
            fk.modules.set_submodule(dense, name, lin)
        with torch.no_grad():
            torch.testing.assert_close(out(x), dense(x), rtol=1e-4, atol=1e-5)
        results[(qbits, steps)] = [e["rel"] for g in report.groups for e in g.errors_final]
    assert max(results[(4, 60)]) < min(results[(4, 0)]), results  # trained int4 beats rounded SVD init
    assert max(results[(8, 60)]) < max(results[(4, 60)]) * 1.05, results


def test_quantised_compression_refuses_bad_settings():
    with pytest.raises(ValueError, match="qbits must be None, 8 or 4"):
        fk.compress(plain_vit(), calib_data=tokens(), qbits=3, **SMALL)
    with pytest.raises(ValueError, match="csr format cannot be quantised"):
        fk.compress(plain_vit(), calib_data=tokens(), qbits=8, format="csr", **SMALL)
