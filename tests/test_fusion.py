"""Compressed models reach the fused kernels: ``install`` moves an exact GELU after an
expand layer into its epilogue (timm ``Mlp``, Hugging Face ``*Intermediate``) and runs a
Llama-style gated MLP on one gate/up op (``z = x·U`` once per block); outputs equal the
unfused path within the dtype's tolerance; checkpoints keep the fusions.

Which custom ops a forward calls is recorded with a ``TorchDispatchMode``."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fips_kernels as fk
from fips_kernels.modules import FiPSGatedMLP, fusion_report

import compress_models as cm



@pytest.fixture(autouse=True)
def _inference():
    # the op calls of the compressed CPU mode (the speed mode runs one dense GEMM per layer, no op)
    with torch.no_grad(), fk.cpu.override("compressed"):
        yield


class OpRecorder(TorchDispatchMode):
    """The ``fips_kernels`` custom ops (with an expand's activation) and the aten GELU/SiLU
    calls a forward makes at the top level (what runs inside a custom op is not seen)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("fips_kernels."):
            act = args[10] if name == "fips_kernels.expand" and len(args) > 10 else None
            self.calls.append((name.split(".", 1)[1], act) if act else name.split(".", 1)[1])
        elif name in ("aten.gelu", "aten.silu"):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _record(model, *args, **kwargs):
    with OpRecorder() as rec:
        out = model(*args, **kwargs)
    return rec.calls, out


def _compress(model, blocks, names_of, group_size=2, fuse=True, pattern="1:4"):
    """factorize_group + install per group of ``group_size`` blocks (the init only: no training)."""
    for start in range(0, blocks, group_size):
        names = [n for i in range(start, min(start + group_size, blocks)) for n in names_of(i)]
        group = fk.factorize_group([model.get_submodule(n) for n in names], pattern=pattern)
        fk.install(model, group, names, fuse=fuse)
    return model


def _outputs(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else getattr(out, "logits", out)


def _vit_names(i):
    return [f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"]


def test_timm_vit_fc1_runs_gelu_in_the_expand_epilogue():
    pytest.importorskip("timm")
    x = cm.images(2)
    fused = _compress(cm.tiny_vit(depth=4), 4, _vit_names)
    plain = _compress(cm.tiny_vit(depth=4), 4, _vit_names, fuse=False)
    calls, y = _record(fused, x)
    assert calls == [("expand", "gelu"), "contract"] * 4  # no separate GELU at all
    assert all(isinstance(b.mlp.act, nn.Identity) for b in fused.blocks)
    calls_plain, y_plain = _record(plain, x)
    assert calls_plain.count("aten.gelu") == 4
    torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-5)
    assert fusion_report(fused)["activation_epilogues"] == 4


def _bert_names(i):
    return [f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense"]


def test_hf_bert_intermediate_runs_gelu_in_the_expand_epilogue():
    pytest.importorskip("transformers")
    batch = cm.token_batches(1, vocab=120)[0]
    fused = _compress(cm.tiny_bert(layers=2), 2, _bert_names)
    plain = _compress(cm.tiny_bert(layers=2), 2, _bert_names, fuse=False)
    calls, y = _record(fused, **batch)
    assert calls == [("expand", "gelu"), "contract"] * 2
    assert all(isinstance(layer.intermediate.intermediate_act_fn, nn.Identity) for layer in fused.encoder.layer)
    torch.testing.assert_close(_outputs(y), _outputs(plain(**batch)), rtol=1e-5, atol=1e-5)


def _llama_names(i):
    return [f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj", f"model.layers.{i}.mlp.down_proj"]


def test_llama_calls_the_gate_up_op_once_per_block():
    pytest.importorskip("transformers")
    ids = cm.token_batches(1)[0]["input_ids"]
    fused = _compress(cm.tiny_llama(layers=2), 2, _llama_names)
    plain = _compress(cm.tiny_llama(layers=2), 2, _llama_names, fuse=False)
    assert all(isinstance(layer.mlp, FiPSGatedMLP) for layer in fused.model.layers)
    calls, y = _record(fused, input_ids=ids)
    assert calls == ["gate_up", "contract"] * 2  # x·U once per block, inside gate_up
    calls_plain, y_plain = _record(plain, input_ids=ids)
    assert [c for c in calls_plain if c.startswith("fips") or c in ("expand", "contract")] == \
        ["expand", "expand", "contract"] * 2
    torch.testing.assert_close(y.logits, y_plain.logits, rtol=1e-4, atol=1e-4)
    report = fusion_report(fused)
    assert report["gate_up"] == 2 and report["not_fused"] == {}
    keys = set(fused.state_dict())
    assert keys == set(plain.state_dict())  # the fused MLP keeps the original parameter names


def test_gemma_tanh_gelu_is_reported_not_fused():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GemmaConfig"):
        pytest.skip("this transformers has no Gemma")
    config = transformers.GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = _compress(transformers.GemmaForCausalLM(config).eval(), 1, _llama_names, group_size=1)
    assert not isinstance(model.model.layers[0].mlp, FiPSGatedMLP)
    (why,) = fusion_report(model)["not_fused"].values()
    assert "not SiLU" in why


def test_gate_and_up_in_different_groups_are_not_fused():
    pytest.importorskip("transformers")
    model = cm.tiny_llama(layers=1)
    mlp = "model.layers.0.mlp"
    for names in ([f"{mlp}.gate_proj", f"{mlp}.down_proj"], [f"{mlp}.up_proj"]):
        fk.install(model, fk.factorize_group([model.get_submodule(n) for n in names],
                                             kinds=["expand", "contract"][:len(names)], pattern="1:4"), names)
    assert not isinstance(model.model.layers[0].mlp, FiPSGatedMLP)
    (why,) = fusion_report(model)["not_fused"].values()
    assert "different groups" in why


@pytest.mark.parametrize("family", ["vit", "llama"])
def test_fused_models_round_trip_through_checkpoints(tmp_path, family):
    pytest.importorskip("timm" if family == "vit" else "transformers")
    if family == "vit":
        build, blocks, names, args = (lambda: cm.tiny_vit(depth=2)), 2, _vit_names, (cm.images(2),)
        kwargs = {}
    else:
        build, blocks, names, args = (lambda: cm.tiny_llama(layers=2)), 2, _llama_names, ()
        kwargs = {"input_ids": cm.token_batches(1)[0]["input_ids"]}
    model = _compress(build(), blocks, names)
    fk.save(model, tmp_path / "m.safetensors")
    loaded = fk.load(tmp_path / "m.safetensors", build())
    calls, y = _record(loaded, *args, **kwargs)
    calls_model, y_model = _record(model, *args, **kwargs)
    assert calls == calls_model  # the fusions came back with the layers
    torch.testing.assert_close(_outputs(y), _outputs(y_model), rtol=0, atol=0)


def test_compress_reports_the_fusion_and_takes_a_config():
    pytest.importorskip("transformers")
    with torch.enable_grad():
        config = fk.compress.CompressConfig(budget=0.6, pattern="1:4", group_size=2, steps=2, prune_every=1,
                                            seed=1)
        with fk.use_backend("reference"):
            model, report = fk.compress(cm.tiny_llama(layers=2), config, calib_data=cm.token_batches(3),
                                        progress=False)
            again, report_kw = fk.compress(cm.tiny_llama(layers=2), budget=0.6, pattern="1:4", group_size=2,
                                           steps=2, prune_every=1, seed=1, calib_data=cm.token_batches(3),
                                           progress=False)
    assert report.fusion["gate_up"] == 2 and "2 gate/up pairs on one op" in str(report)
    assert report.to_dict()["fusion"] == report.fusion
    for k, v in model.state_dict().items():  # the config is the same call as its keywords
        assert torch.equal(v, again.state_dict()[k]), k
    assert report.to_dict()["config"] == report_kw.to_dict()["config"]


def test_compress_config_matches_the_function_defaults():
    import dataclasses
    import inspect

    params = inspect.signature(fk.compress.api.compress).parameters
    for f in dataclasses.fields(fk.compress.CompressConfig):
        assert f.name in params, f"CompressConfig.{f.name} is not a compress() argument"
        assert params[f.name].default == f.default, f.name
