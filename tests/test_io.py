"""Checkpoints: bit-exact round trips, the base stored once, damaged files refused."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from torch import nn

import fips_kernels as fk

from test_modules import TinyViT, _mlp_group, compress_tiny_vit

PATTERNS = ["unstructured", "1:4", "2:8", "dense"]


def _tensors_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bfloat16 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.bfloat16 else b[k]), k


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_group_round_trip_is_bit_exact(tmp_path, pattern, dtype):
    g = fk.factorize_group(_mlp_group(d=24, h=40, dtype=dtype), pattern=pattern)
    path = tmp_path / "group.safetensors"
    fk.save(g, path)
    back = fk.load(path)
    assert isinstance(back, fk.FiPSGroup)
    _tensors_equal(g.state_dict(), back.state_dict())
    assert all(layer.base is back.base for layer in back)
    assert [layer.kind for layer in back] == [layer.kind for layer in g]
    x = torch.randn(3, 24, dtype=dtype)
    assert torch.equal(back[0](x), g[0](x))


def test_model_round_trip_into_a_fresh_dense_model(tmp_path):
    torch.manual_seed(0)
    model = TinyViT()
    compress_tiny_vit(model, group_size=2, pattern="1:4")
    path = tmp_path / "model.safetensors"
    fk.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert sorted(k for k in keys if k.endswith(".U")) == ["blocks.0.mlp.fc1.shared_base.U",
                                                           "blocks.2.mlp.fc1.shared_base.U"]

    fresh = TinyViT()  # the dense architecture, as built from its config
    loaded = fk.load(path, fresh)
    assert isinstance(loaded.blocks[1].mlp.fc2, fk.FiPSLinear)
    assert loaded.blocks[1].mlp.fc2.base is loaded.blocks[0].mlp.fc1.shared_base
    _tensors_equal(model.state_dict(), loaded.state_dict())
    x = torch.randn(2, 4, 32)
    assert torch.equal(loaded(x), model(x))


def test_single_layer_with_its_own_base(tmp_path):
    layer = fk.FiPSLinear.from_linear(nn.Linear(16, 64), pattern="2:4")
    fk.save(layer, tmp_path / "layer.safetensors")
    back = fk.load(tmp_path / "layer.safetensors")
    x = torch.randn(5, 16)
    assert torch.equal(back(x), layer(x))


def test_tied_weights_are_stored_once_and_retied(tmp_path):
    model = TinyViT()
    compress_tiny_vit(model, pattern="dense")
    model.extra = nn.Linear(32, 5)
    model.extra.weight = model.head.weight  # tied
    fk.save(model, tmp_path / "tied.safetensors")
    with safe_open(str(tmp_path / "tied.safetensors"), framework="pt") as f:
        assert "extra.weight" not in f.keys()
    fresh = TinyViT()
    fresh.extra = nn.Linear(32, 5)
    loaded = fk.load(tmp_path / "tied.safetensors", fresh)
    assert torch.equal(loaded.extra.weight, model.head.weight)


def test_a_layer_whose_base_is_not_saved_is_refused(tmp_path):
    g = fk.factorize_group(_mlp_group())
    with pytest.raises(fk.CheckpointError, match="shared base of layer .* is not registered"):
        fk.save(g[1], tmp_path / "x.safetensors")  # the base lives on layer 0


# ---------------------------------------------------------------- damaged files

@pytest.fixture
def saved_group(tmp_path):
    g = fk.factorize_group(_mlp_group(d=24, h=40), pattern="unstructured")
    path = tmp_path / "g.safetensors"
    fk.save(g, path)
    return path


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def test_truncated_file_is_refused(saved_group):
    data = saved_group.read_bytes()
    saved_group.write_bytes(data[: len(data) - 100])
    with pytest.raises(fk.CheckpointError, match="truncated or damaged"):
        fk.load(saved_group)
    saved_group.write_bytes(data[:5])
    with pytest.raises(fk.CheckpointError):
        fk.load(saved_group)


def test_altered_tensor_bytes_are_refused(saved_group):
    data = bytearray(saved_group.read_bytes())
    data[-3] ^= 0x40  # one bit in the last tensor's data
    saved_group.write_bytes(bytes(data))
    with pytest.raises(fk.CheckpointError, match="fails its SHA-256 check"):
        fk.load(saved_group)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    n = _header_len(data)
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_altered_header_is_refused(saved_group):
    def bump_version(h):
        meta = json.loads(h["__metadata__"]["fips_kernels"])
        meta["format_version"] = 99
        h["__metadata__"]["fips_kernels"] = json.dumps(meta)

    _rewrite_header(saved_group, bump_version)
    with pytest.raises(fk.CheckpointError, match="version 99 is not supported"):
        fk.load(saved_group)


def test_header_that_lies_about_a_factor_is_refused(saved_group):
    """Even with the header's own checksum recomputed, a factor the tensors contradict is refused."""
    from fips_kernels.io import header_digest

    def change_meta(h):
        meta = json.loads(h["__metadata__"]["fips_kernels"])
        meta["layers"]["layers.0"]["meta"][2] = 32  # bitmap tile 64 -> 32 rows
        meta["header_sha256"] = header_digest(meta)
        h["__metadata__"]["fips_kernels"] = json.dumps(meta)

    _rewrite_header(saved_group, change_meta)
    with pytest.raises(fk.CheckpointError, match="invalid factor"):
        fk.load(saved_group)


def test_header_missing_or_garbled_is_refused(tmp_path, saved_group):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(fk.CheckpointError, match="not a fips_kernels checkpoint"):
        fk.load(plain)

    def garble(h):
        h["__metadata__"]["fips_kernels"] = "{not json"

    _rewrite_header(saved_group, garble)
    with pytest.raises(fk.CheckpointError, match="not valid JSON"):
        fk.load(saved_group)
    with pytest.raises(fk.CheckpointError, match="no such checkpoint"):
        fk.load(tmp_path / "missing.safetensors")


def test_mismatched_model_is_refused(tmp_path):
    model = TinyViT(d=32, h=96)
    compress_tiny_vit(model, pattern="1:4")
    fk.save(model, tmp_path / "m.safetensors")
    small = TinyViT(d=32, h=64)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(fk.CheckpointError, match="'blocks.0.mlp.fc1' has out_features=64 .* has 96"):
        fk.load(tmp_path / "m.safetensors", small)
    _tensors_equal(before, small.state_dict())  # a refused load leaves the model untouched
    assert isinstance(small.blocks[0].mlp.fc1, nn.Linear)
    with pytest.raises(fk.CheckpointError, match="holds a whole model"):
        fk.load(tmp_path / "m.safetensors")
    other = TinyViT(d=32, h=96)
    other.head = nn.Linear(32, 7)
    with pytest.raises(fk.CheckpointError, match=r"'head.(weight|bias)' is \(5"):
        fk.load(tmp_path / "m.safetensors", other)
    assert isinstance(other.blocks[0].mlp.fc1, nn.Linear)


def test_sequential_models_keep_working_and_round_trip(tmp_path):
    """An nn.Sequential runs every child: its group bases live on the groups' first layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16), nn.Linear(16, 48), nn.GELU(),
                          nn.Linear(48, 16))
    x = torch.randn(3, 16)
    group = fk.factorize_group([model[0], model[2], model[3], model[5]], pattern="2:4")
    path = fk.install(model, group, ["0", "2", "3", "5"])
    assert path == "0.shared_base" and not hasattr(model, "fips_bases")
    y = model(x)
    assert [k for k in model.state_dict() if k.endswith(".U")] == ["0.shared_base.U"]
    fk.save(model, tmp_path / "seq.safetensors")
    fresh = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16), nn.Linear(16, 48), nn.GELU(),
                          nn.Linear(48, 16))
    loaded = fk.load(tmp_path / "seq.safetensors", fresh)
    assert loaded[5].base is loaded[0].shared_base
    assert torch.equal(loaded(x), y)


# ---------------------------------------------------------------- versions and the header checksum

DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_version_1_checkpoints_still_load_and_move_their_bases():
    """Files written by fips_kernels 0.1 (format version 1: bases under ``fips_bases.<i>`` or a
    group's ``base``) load bit-exactly, with each base moved to its group's first layer."""
    from safetensors.torch import load_file

    expected = load_file(str(DATA / "v1_expected.safetensors"))
    raw = load_file(str(DATA / "v1_tinyvit_1to4.safetensors"))
    assert "fips_bases.0.U" in raw  # it really is a version-1 file
    model = fk.load(DATA / "v1_tinyvit_1to4.safetensors", TinyViT(d=32, h=96, depth=4))
    assert torch.equal(model.blocks[0].mlp.fc1.shared_base.U, raw["fips_bases.0.U"])
    assert torch.equal(model.blocks[2].mlp.fc1.shared_base.U, raw["fips_bases.1.U"])
    assert model.blocks[3].mlp.fc2.base is model.blocks[2].mlp.fc1.shared_base
    for key, t in raw.items():
        if not key.startswith("fips_bases."):
            assert torch.equal(model.state_dict()[key], t), key
    torch.testing.assert_close(model(expected["x"]), expected["y"], rtol=1e-5, atol=1e-5)

    group = fk.load(DATA / "v1_group_int8.safetensors")
    assert group.base.quantized and "layers.0.shared_base.U" in group.state_dict()
    torch.testing.assert_close(group[1](group[0](expected["xg"])), expected["yg"], rtol=1e-5, atol=1e-5)


def _edits(header):
    """An edit of each field's meaning: (label, function editing the parsed header)."""
    edits = [("format_version", lambda h: h.update(format_version=1)),
             ("container", lambda h: h.update(container="model"))]
    flips = {"kind": lambda v: "contract" if v == "expand" else "expand",
             "format": lambda v: "nm" if v == "dense" else "dense", "bias": lambda v: not v,
             "in_features": lambda v: v + 1, "out_features": lambda v: v + 1, "quantized": lambda v: not v,
             "activation": lambda v: "silu" if v == "gelu" else "gelu", "cast_input": lambda v: not v,
             "dtype": lambda v: "float16" if v != "float16" else "float32"}
    for name, rec in header["layers"].items():
        for field, flip in flips.items():
            new = flip(rec.get(field))
            edits.append((f"{name}.{field}", lambda h, n=name, f=field, v=new: h["layers"][n].update({f: v})))
        edits.append((f"{name}.meta", lambda h, n=name: h["layers"][n]["meta"].__setitem__(2, 32)))
    for base in header["bases"]:
        edits.append((f"{base}.rank", lambda h, b=base: h["bases"][b].update(rank=1)))
    edits.append(("aliases", lambda h: h["aliases"].update({"x": "y"})))
    edits.append(("sha256", lambda h: h["sha256"].update({next(iter(h["sha256"])): "0" * 64})))
    return edits


def test_every_header_edit_is_refused(tmp_path):
    """The header's meaning is covered by a checksum: editing any field (a square layer's
    kind included, which the tensors alone cannot contradict) is refused."""
    g = fk.factorize_group([nn.Linear(24, 24), nn.Linear(24, 24)], kinds=["expand", "contract"], pattern="1:4")
    path = tmp_path / "square.safetensors"
    fk.save(g, path)
    data = path.read_bytes()
    header = json.loads(json.loads(data[8:8 + _header_len(data)])["__metadata__"]["fips_kernels"])
    edits = _edits(header)
    assert len(edits) > 20
    for label, edit in edits:
        path.write_bytes(data)

        def apply(h, edit=edit):
            meta = json.loads(h["__metadata__"]["fips_kernels"])
            edit(meta)
            h["__metadata__"]["fips_kernels"] = json.dumps(meta)

        _rewrite_header(path, apply)
        with pytest.raises(fk.CheckpointError, match="header fails its SHA-256 check"):
            fk.load(path)
    path.write_bytes(data)
    assert torch.equal(fk.load(path)[0].V_values, g[0].V_values)
