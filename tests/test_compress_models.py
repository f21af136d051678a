"""fips_kernels.compress on small models of the real families, built from configs
with a fixed seed (nothing downloads): timm ViT and Swin, Hugging Face BERT and
Llama. Skipped, with the reason, when timm / transformers are not installed."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fips_kernels as fk
from fips_kernels.compress import calibration
from fips_kernels.compress.presets import find_preset, find_units, make_groups

import compress_models as cm

SMALL = dict(steps=40, prune_every=10, progress=False, lr=3e-3)


pytestmark = pytest.mark.usefixtures("one_thread_reference")


def _needs(module):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'fips-kernels[compress]')")


def _check_result(model, report, budget=0.5):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, fk.FiPSLinear)}
    for g in report.groups:
        group_layers = [layers[n] for n in g.layers]
        stored = group_layers[0].U.numel() + sum(layer.V_values.numel() for layer in group_layers)
        assert g.parameters == stored <= budget * g.dense_parameters
        for init, final in zip(g.errors_init, g.errors_final):
            assert final["rel"] < init["rel"], (g.index, init, final)
    assert len(layers) == sum(len(g.layers) for g in report.groups)


def _round_trip(model, build, batch, tmp_path):
    path = tmp_path / "model.safetensors"
    fk.save(model, path)
    fresh = fk.load(path, build(seed=99))
    with torch.no_grad():
        a, b = calibration.model_forward(fresh, batch), calibration.model_forward(model, batch)
    a, b = calibration.default_output(a)[0], calibration.default_output(b)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_timm_vit(tmp_path):
    _needs("timm")
    model = cm.tiny_vit(depth=4)
    preset = find_preset(model)
    assert preset.name == "vit"
    groups = make_groups(find_units(model, preset), 2)
    assert [g.linears for g in groups] == [
        [f"blocks.{i}.mlp.{fc}" for i in (0, 1) for fc in ("fc1", "fc2")],
        [f"blocks.{i}.mlp.{fc}" for i in (2, 3) for fc in ("fc1", "fc2")]]
    original = copy.deepcopy(model)
    x = cm.images(n=40)
    model, report = fk.compress(model, calib_data=x, group_size=2, **SMALL)
    assert report.preset == "vit" and report.unit == "block"
    _check_result(model, report)
    held = x[32:]
    with torch.no_grad():
        cos = F.cosine_similarity(model(held), original(held), dim=-1)
    out = report.end_to_end["outputs"]["output"]
    assert out["cosine_mean"] == pytest.approx(cos.mean().item(), abs=1e-5)
    assert out["top1_agreement"] is not None  # a classifier
    _round_trip(model, lambda seed: cm.tiny_vit(seed=seed), x[:4], tmp_path)


def test_timm_swin_groups_stay_within_stages(tmp_path):
    _needs("timm")
    model = cm.tiny_swin()  # depths (2, 2, 2), widths 16, 32, 64
    preset = find_preset(model)
    assert preset.name == "swin"
    units = find_units(model, preset)
    assert [u.block for u in units] == [f"layers.{s}.blocks.{i}" for s in range(3) for i in range(2)]
    groups = make_groups(units, 4)  # larger than a stage: still one group per stage
    assert [[u.block for u in g.units] for g in groups] == [
        [f"layers.{s}.blocks.0", f"layers.{s}.blocks.1"] for s in range(3)]
    assert [g.d for g in groups] == [16, 32, 64]
    model, report = fk.compress(model, calib_data=cm.images(n=24), group_size=4, **SMALL)
    assert [g.d for g in report.groups] == [16, 32, 64]
    _check_result(model, report)
    for g in report.groups:  # one base per group, never shared across stages
        bases = {id(model.get_submodule(n).base) for n in g.layers}
        assert len(bases) == 1
    _round_trip(model, lambda seed: cm.tiny_swin(seed=seed), cm.images(n=2), tmp_path)


@pytest.mark.parametrize("classifier", [False, True], ids=["encoder", "classifier"])
def test_hf_bert(classifier, tmp_path):
    _needs("transformers")
    model = cm.tiny_bert(classifier=classifier)
    prefix = "bert." if classifier else ""
    preset = find_preset(model)
    assert preset.name == "bert"
    units = find_units(model, preset)
    assert [u.linears for u in units] == [
        (f"{prefix}encoder.layer.{i}.intermediate.dense", f"{prefix}encoder.layer.{i}.output.dense") for i in (0, 1)]
    assert all(u.kinds == ("expand", "contract") for u in units)
    data = cm.token_batches(vocab=120)
    model, report = fk.compress(model, calib_data=data, group_size=2, **SMALL)
    _check_result(model, report)
    key = "logits" if classifier else "last_hidden_state"
    assert key in report.end_to_end["outputs"]
    if not classifier:  # padded tokens are left out of the agreement
        assert report.end_to_end["outputs"][key]["positions"] == int(data[-1]["attention_mask"].sum())
    _round_trip(model, lambda seed: cm.tiny_bert(seed=seed, classifier=classifier), data[0], tmp_path)


def test_hf_llama_mlp_unit(tmp_path):
    _needs("transformers")
    model = cm.tiny_llama(layers=2)
    preset = find_preset(model)
    assert preset.name == "llama" and preset.unit == "mlp"
    units = find_units(model, preset)
    assert [u.name for u in units] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert units[0].linears == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                "model.layers.0.mlp.down_proj")
    assert units[0].kinds == ("expand", "expand", "contract")
    data = cm.token_batches()
    model, report = fk.compress(model, calib_data=data, group_size=2, **SMALL)
    assert report.unit == "mlp" and len(report.groups) == 1 and len(report.groups[0].layers) == 6
    _check_result(model, report)
    assert report.end_to_end["outputs"]["logits"]["top1_agreement"] is not None
    _round_trip(model, lambda seed: cm.tiny_llama(seed=seed), data[0], tmp_path)


def test_hf_llama_block_unit_sees_the_mlp_units_error():
    """In a pre-norm residual block the block-output error equals the MLP-output
    error (the residual cancels): the same SVD-init MSE, the same training signal."""
    _needs("transformers")
    data = cm.token_batches()
    _, ra = fk.compress(cm.tiny_llama(), calib_data=data, unit="mlp", **SMALL)
    _, rb = fk.compress(cm.tiny_llama(), calib_data=data, unit="block", **SMALL)
    assert rb.unit == "block" and rb.groups[0].units == ["model.layers.0", "model.layers.1"]
    for a, b in zip(ra.groups[0].errors_init, rb.groups[0].errors_init):
        assert b["mse"] == pytest.approx(a["mse"], rel=1e-3)
        assert b["rel"] < a["rel"]  # the same error over a larger output (residual included)
    for a, b in zip(ra.groups[0].errors_final, rb.groups[0].errors_final):
        assert b["mse"] == pytest.approx(a["mse"], rel=0.1)
