"""Hugging Face directories (fips_kernels.save_pretrained, `compress --out DIR`) loaded by
AutoModel.from_pretrained through the 'fips' quantizer, by SentenceTransformer, by
fips_kernels.from_pretrained (timm) and by fips_kernels.load's meta-device route; edited or
damaged directories refused."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fips_kernels as fk
from fips_kernels import CheckpointError, cli
from fips_kernels.hf import directory as hfdir
from fips_kernels.meta import meta_tensors

import compress_models as cm

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

WORDS = "the a cat dog sat on mat ran fast slow big small red blue house tree water light".split()


pytestmark = pytest.mark.usefixtures("one_thread_reference")


def _compressed(model, data, group_size=2):
    """FiPS layers from the SVD init (steps=0: no training needed to test loading). Module fixtures
    call it before the per-test fixture, hence the backend here."""
    with fk.use_backend("reference"):
        return fk.compress(model, budget=0.5, group_size=group_size, calib_data=data, steps=0,
                           progress=False)[0].eval()


def _mlp_linears(model):
    """Dense nn.Linear modules left where the MLPs were."""
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear
            and any(k in n for k in ("intermediate.dense", "output.dense", "mlp."))
            and "attention" not in n]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _compressed(cm.tiny_bert(layers=2), cm.token_batches(vocab=120))
    d = tmp_path_factory.mktemp("bert") / "bert-fips"
    fk.save_pretrained(model, d)
    return model, d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _compressed(cm.tiny_llama(layers=2), cm.token_batches())
    d = tmp_path_factory.mktemp("llama") / "llama-fips"
    fk.save_pretrained(model, d)
    return model, d


# ---------------------------------------------------------------- BERT, Llama: AutoModel and fk.load

def test_bert_directory_loads_with_automodel_and_equals_the_fk_load_path(bert_dir):
    model, d = bert_dir
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fips" and qc["config_version"] == hfdir.CONFIG_VERSION
    assert qc["fips_kernels_version"] == fk.__version__ and qc["formats"] == ["bitmap"]
    assert qc["bits"] == {"factors": [32], "base": [32]} and len(qc["groups"]) == 1
    assert len(qc["groups"][0]["layers"]) == 4 and qc["layers"]["encoder.layer.0.intermediate.dense"]["kind"] == "expand"

    loaded = transformers.AutoModel.from_pretrained(d)
    assert type(loaded).__name__ == "BertModel" and not loaded.training
    layer = loaded.encoder.layer[1]
    assert isinstance(layer.intermediate.dense, fk.FiPSLinear) and isinstance(layer.output.dense, fk.FiPSLinear)
    assert isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Identity)  # GELU fused into the epilogue
    assert layer.intermediate.dense.activation == "gelu" and not _mlp_linears(loaded) and not meta_tensors(loaded)
    assert loaded.config.quantization_config.quant_method == "fips"

    via_load = fk.load(d, lambda: transformers.BertModel(model.config)).eval()
    assert not meta_tensors(via_load)
    x = cm.token_batches(vocab=120)[0]
    with torch.no_grad():
        want = model(**x).last_hidden_state
        assert torch.equal(loaded(**x).last_hidden_state, want)
        assert torch.equal(via_load(**x).last_hidden_state, want)
    for key, t in model.state_dict().items():  # bit-exact, dtypes kept
        assert torch.equal(loaded.state_dict()[key], t), key


def test_llama_directory_loads_with_its_class_and_fuses_gate_up(llama_dir):
    model, d = llama_dir
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert fk.modules.fusion_report(loaded) == {"activation_epilogues": 0, "gate_up": 2, "not_fused": {}}
    assert isinstance(loaded.model.layers[0].mlp, fk.FiPSGatedMLP) and not _mlp_linears(loaded)
    # the group's base is registered once, on its first layer; the other layers refer to it
    base = loaded.model.layers[0].mlp.gate_proj.base
    assert loaded.model.layers[1].mlp.down_proj.base is base
    assert [n for n, _ in loaded.named_modules() if n.endswith("shared_base")] == ["model.layers.0.mlp.gate_proj.shared_base"]

    with fk.empty_weights():  # the other meta route: a model built beforehand with its parameters on meta
        empty = transformers.LlamaForCausalLM(model.config)
    assert empty.model.layers[0].mlp.up_proj.weight.is_meta and not empty.model.rotary_emb.inv_freq.is_meta
    via_load = fk.load(d, empty).eval()
    x = cm.token_batches()[0]
    with torch.no_grad():
        want = model(**x).logits
        assert torch.equal(loaded(**x).logits, want)
        assert torch.equal(via_load(**x).logits, want)
    assert fk.from_pretrained(d).__class__.__name__ == "LlamaForCausalLM"


def test_a_requested_dtype_casts_the_other_weights_never_the_factors(llama_dir):
    model, d = llama_dir
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    gate = loaded.model.layers[0].mlp.gate_proj
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16 and gate.cast_input
    assert torch.equal(gate.V_values, model.model.layers[0].mlp.gate_proj.V_values)  # stored fp32 bytes, as checked
    x = cm.token_batches()[0]
    with torch.no_grad():
        got, want = loaded(**x).logits, model(**x).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.05 * want.abs().max()  # bf16 rounding of the other layers only


def test_safetensors_file_also_loads_through_the_meta_route(llama_dir, tmp_path):
    model, _ = llama_dir
    path = tmp_path / "llama.safetensors"
    fk.save(model, path)
    via_load = fk.load(path, lambda: transformers.LlamaForCausalLM(model.config)).eval()
    x = cm.token_batches()[1]
    with torch.no_grad():
        assert torch.equal(via_load(**x).logits, model(**x).logits)


def test_meta_route_refuses_a_model_whose_buffers_are_on_meta(llama_dir):
    model, d = llama_dir
    with torch.device("meta"):  # buffers on meta too: rotary frequencies are in no checkpoint
        empty = transformers.LlamaForCausalLM(model.config)
    with pytest.raises(CheckpointError, match="inv_freq.*meta device.*empty_weights"):
        fk.load(d, empty)
    assert type(empty.model.layers[0].mlp).__name__ == "LlamaMLP"  # untouched


def test_a_loaded_model_saves_again_with_save_pretrained(bert_dir, tmp_path):
    model, d = bert_dir
    again = tmp_path / "again"
    fk.save_pretrained(transformers.AutoModel.from_pretrained(d), again)
    reloaded = transformers.AutoModel.from_pretrained(again)
    assert json.loads((again / "config.json").read_text())["quantization_config"]["layers"] == \
        json.loads((d / "config.json").read_text())["quantization_config"]["layers"]
    for key, t in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], t), key


def test_automodel_loads_a_base_model_directory_into_a_task_model_and_back(bert_dir, llama_dir):
    _, d = bert_dir
    loaded = transformers.BertForSequenceClassification.from_pretrained(d)
    assert isinstance(loaded.bert.encoder.layer[0].output.dense, fk.FiPSLinear) and not _mlp_linears(loaded.bert)
    model, d = llama_dir  # a LlamaForCausalLM directory: AutoModel gives its LlamaModel
    base = transformers.AutoModel.from_pretrained(d)
    assert type(base).__name__ == "LlamaModel" and isinstance(base.layers[1].mlp, fk.FiPSGatedMLP)
    x = cm.token_batches()[0]
    with torch.no_grad():
        assert torch.equal(base(**x).last_hidden_state, model.model(**x).last_hidden_state)


# ---------------------------------------------------------------- timm

def test_vit_directory_loads_with_from_pretrained_and_fk_load(tmp_path):
    pytest.importorskip("timm", reason="timm is not installed")
    import timm

    model = _compressed(cm.tiny_vit(depth=2), cm.images(8))
    d = tmp_path / "vit-fips"
    fk.save_pretrained(model, d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["model_args"]["embed_dim"] == 32
    assert cfg["quantization_config"]["quant_method"] == "fips"

    loaded = fk.from_pretrained(d)
    assert isinstance(loaded.blocks[1].mlp.fc1, fk.FiPSLinear) and loaded.blocks[1].mlp.fc1.activation == "gelu"
    assert tuple(loaded.pretrained_cfg["input_size"]) == (3, 32, 32) and not meta_tensors(loaded)
    args = cfg["model_args"]
    via_load = fk.load(d, lambda: timm.create_model(cfg["architecture"], pretrained=False, **args)).eval()
    x = cm.images(3)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(loaded(x), want) and torch.equal(via_load(x), want)


# ---------------------------------------------------------------- sentence-transformers, via the CLI

@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    """A tiny BERT saved as a sentence-transformers model (tokenizer, modules.json, mean pooling)."""
    d = tmp_path_factory.mktemp("st") / "tiny-st"
    d.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    bert = cm.tiny_bert(layers=2)
    bert.resize_token_embeddings(len(vocab))
    bert.save_pretrained(str(d))
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                              "pooling_mode_mean_tokens": True}))
    (d / "README.md").write_text("the dense model's card\n")
    return d


@pytest.fixture(scope="module")
def cli_dir(st_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny-fips"
    with fk.use_backend("reference"):
        rc = cli.main(["compress", str(st_dir), "--out", str(out), "--steps", "2", "--group-size", "2",
                       "--batch-size", "8", "--num-samples", "24", "--no-progress"])
    assert rc == 0
    return out


def test_compress_out_dir_writes_a_hugging_face_directory(st_dir, cli_dir, capsys):
    names = sorted(os.listdir(cli_dir))
    for name in ("config.json", "model.safetensors", "modules.json", "sentence_bert_config.json", "1_Pooling",
                 "tokenizer.json", "tokenizer_config.json"):
        assert name in names, names
    assert "README.md" not in names  # the dense model's card does not describe this one
    report = json.loads(open(str(cli_dir) + ".report.json").read())
    assert report["checkpoint"]["bytes"] == os.path.getsize(cli_dir / "model.safetensors")
    loaded = transformers.AutoModel.from_pretrained(cli_dir)
    assert sum(isinstance(m, fk.FiPSLinear) for m in loaded.modules()) == 4


def test_out_dir_may_replace_a_fips_directory_but_never_another_folder(st_dir, cli_dir, capsys):
    from fips_kernels.compress.command import _check_folder_output

    _check_folder_output(str(cli_dir))  # an earlier FiPS directory: written over
    assert cli.main(["compress", str(st_dir), "--out", str(st_dir)]) == 2  # the source model's own folder
    assert "neither empty nor a FiPS model directory" in capsys.readouterr().err
    assert "quantization_config" not in (st_dir / "config.json").read_text()


def test_sentence_transformer_loads_the_directory_and_equals_the_fk_load_path(st_dir, cli_dir):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    model = st.SentenceTransformer(str(cli_dir), device="cpu")
    bert = next(m for m in model.modules() if isinstance(m, transformers.BertModel))
    assert isinstance(bert.encoder.layer[0].intermediate.dense, fk.FiPSLinear)
    sentences = ["the cat sat on the mat", "a big red house", "water"]
    got = model.encode(sentences, convert_to_tensor=True)

    config = transformers.AutoConfig.from_pretrained(st_dir)
    reference = fk.load(cli_dir, lambda: transformers.BertModel(config)).eval()
    features = (getattr(model, "preprocess", None) or model.tokenize)(sentences)  # renamed in sentence-transformers 6
    with torch.no_grad():
        tokens = reference(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                           token_type_ids=features.get("token_type_ids")).last_hidden_state
        pooled = model[1]({"token_embeddings": tokens, "attention_mask": features["attention_mask"]})
    assert torch.equal(got, pooled["sentence_embedding"])


# ---------------------------------------------------------------- refused directories

def _copy(d, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(d, out)
    return out


def _edit_config(d, edit):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


def _both_refuse(d, builder, match):
    with pytest.raises(CheckpointError, match=match):
        transformers.AutoModel.from_pretrained(d)
    with pytest.raises(CheckpointError, match=match):
        fk.load(d, builder)


@pytest.mark.parametrize("edit, match", [
    (lambda q: q["layers"]["encoder.layer.0.output.dense"].update(kind="expand"), "layers differs.*edited"),
    (lambda q: q["gated"].update({"encoder.layer.0": ["a", "b", "c"]}), "gated differs.*edited"),
    (lambda q: q.update(header_sha256="0" * 64), "another model.safetensors"),
    (lambda q: q.update(config_version=99), "version 99 is not supported.*newer fips_kernels"),
])
def test_edited_config_is_refused(bert_dir, tmp_path, edit, match):
    model, d = bert_dir
    d = _copy(d, tmp_path)
    _edit_config(d, edit)
    _both_refuse(d, lambda: transformers.BertModel(model.config), match)


def test_edited_tensor_shape_in_config_is_refused(bert_dir, tmp_path):
    _, d = bert_dir
    d = _copy(d, tmp_path)
    _edit_config(d, lambda q: q["tensors"]["encoder.layer.0.output.dense.bias"].update(shape=[7]))
    with pytest.raises(CheckpointError, match="output.dense.bias.*holds"):
        transformers.AutoModel.from_pretrained(d)


@pytest.mark.parametrize("where", ["factor", "other"])
def test_damaged_weights_are_refused(bert_dir, tmp_path, where):
    model, d = bert_dir
    d = _copy(d, tmp_path)
    path = d / "model.safetensors"
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    table = json.loads(raw[8:8 + header_len])
    key = "encoder.layer.1.output.dense.V_values" if where == "factor" else "embeddings.word_embeddings.weight"
    raw[8 + header_len + table[key]["data_offsets"][0] + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    _both_refuse(d, lambda: transformers.BertModel(model.config), f"{key}.*SHA-256")


def test_directory_from_another_architecture_is_refused(bert_dir):
    _, d = bert_dir
    with pytest.raises(CheckpointError, match="no module 'encoder.layer.0.intermediate.dense'"):
        transformers.LlamaModel.from_pretrained(d)


def test_from_pretrained_cannot_compress_a_dense_model(st_dir):
    from fips_kernels.hf.quantizer import FiPSConfig

    with pytest.raises(ValueError, match="cannot compress a dense model"):
        transformers.AutoModel.from_pretrained(st_dir, quantization_config=FiPSConfig())


def test_save_pretrained_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no FiPS layers"):
        fk.save_pretrained(cm.tiny_bert(layers=1), tmp_path / "dense")
    with pytest.raises(ValueError, match="source .* is not a directory"):
        fk.save_pretrained(cm.tiny_bert(layers=1), tmp_path / "x", source=str(tmp_path / "missing"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        fk.save_pretrained(cm.tiny_bert(layers=1), tmp_path / "file")


def test_is_serializable_points_at_save_pretrained(bert_dir, tmp_path, caplog):
    _, d = bert_dir
    loaded = transformers.AutoModel.from_pretrained(d)
    with pytest.raises(ValueError, match="not serializable"):
        loaded.save_pretrained(tmp_path / "again")
    assert "fips_kernels.save_pretrained" in caplog.text


# ---------------------------------------------------------------- registration

def test_quantizer_is_registered_with_transformers():
    from transformers.quantizers import auto

    from fips_kernels.hf.quantizer import FiPSConfig, FiPSHfQuantizer

    assert auto.AUTO_QUANTIZER_MAPPING["fips"] is FiPSHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["fips"] is FiPSConfig


def test_after_import_runs_once_the_module_is_imported(tmp_path, monkeypatch):
    from fips_kernels.hf.hook import after_import

    (tmp_path / "fk_hook_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    after_import("fk_hook_probe", lambda m: seen.append(m.VALUE))
    assert seen == []
    import fk_hook_probe  # noqa: F401

    assert seen == [42]
    after_import("fk_hook_probe", lambda m: seen.append(-m.VALUE))  # already imported: at once
    assert seen == [42, -42]
    sys.modules.pop("fk_hook_probe")


def test_import_fips_kernels_does_not_import_transformers():
    code = "import sys, fips_kernels; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
