"""Autotuning of the Triton sparse matmul, checked on the CPU (the kernels under TRITON_INTERPRET=1).

On a GPU every launch takes its block sizes from the per-GPU table, else from
autotuning over the configs that ``prune_configs`` keeps; here each kept
config is launched under the interpreter and compared with the truth, so a
pruning rule that keeps a wrong block shape fails (issue 13, bug a: a bitmap
tile with a side of 16 kept no matching config and fell back to the first
one, off by ~17). Also: the keys are bucketed, and the committed table holds
only what a GPU run measured.
"""
import json

import pytest
import torch

from fips_kernels.formats import SparseFactor
from fips_kernels.triton import sparse_matmul as sm
from fips_kernels.tuning import triton_configs


def _bitmap(K, N, tile, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(K, N, generator=g)
    B[torch.rand(K, N, generator=g) < 0.7] = 0
    return B, SparseFactor.pack(B, "bitmap", tile=tile)


def _kept(fmt, M, transpose=False, tile=(0, 0), nm_m=2):
    return sm.prune_configs(sm.tune_configs(), {}, FMT=sm.FMT_CODES[fmt], TRANS_B=transpose,
                            M_BUCKET=sm.m_bucket(M), NM_M=nm_m, TILE_K=tile[0], TILE_N=tile[1])


def _launch(config):
    return sm.LaunchConfig(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], 1,
                           config.num_warps, config.num_stages)


@pytest.mark.parametrize("tile", [(16, 32), (16, 64), (32, 32), (64, 64)], ids=lambda t: f"tile{t[0]}x{t[1]}")
@pytest.mark.parametrize("transpose", [False, True], ids=["expand", "transposed"])
def test_every_kept_bitmap_config_computes_the_product(tile, transpose):
    K, N, M = 48, 64, 3  # K not a multiple of the tile: the last tile is partial
    B, _ = _bitmap(K, N, tile)
    stored = B.t().contiguous() if transpose else B
    factor = SparseFactor.pack(stored, "bitmap", tile=tile)
    a = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    kept = _kept("bitmap", M, transpose, tile)
    assert kept
    for config in kept:
        out = sm.sparse_matmul(a, factor, config=_launch(config), transpose=transpose)
        truth = a.double() @ B.double()
        assert (out.double() - truth).abs().max().item() < 1e-4, (tile, transpose, str(config))


def test_pruning_keeps_valid_configs_only():
    # bitmap: the storage tile (transposed for a transposed factor), one config per warp count, tile side 16 too
    for tile in ((16, 32), (16, 64), (64, 32), (128, 32)):
        for transpose in (False, True):
            kept = _kept("bitmap", 5, transpose, tile)
            want = tile[::-1] if transpose else tile
            assert kept and {(c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]) for c in kept} == \
                {want + (16,)}, (tile, transpose)
            assert sorted(c.num_warps for c in kept) == list(sm.BITMAP_WARPS)
    # nm: whole groups per K block (the N block when transposed), at least 64
    for M in (1, 40, 4096):
        for transpose in (False, True):
            kept = _kept("nm", M, transpose, nm_m=16)
            grouped = [c.kwargs["BLOCK_N" if transpose else "BLOCK_K"] for c in kept]
            assert kept and all(g % 16 == 0 and g >= 64 for g in grouped)
            assert {c.kwargs["BLOCK_M"] for c in kept} == {sm.m_bucket(M)}
    dense = _kept("dense", 100)
    assert len(dense) == len(sm.BLOCK_SHAPES) and {c.kwargs["BLOCK_M"] for c in dense} == {128}
    with pytest.raises(ValueError, match="no autotune config fits"):
        sm.prune_configs([], {}, FMT=sm.FMT_CODES["dense"], TRANS_B=False, M_BUCKET=16, NM_M=2, TILE_K=0, TILE_N=0)


def test_a_block_shape_that_cannot_run_is_refused():
    _, factor = _bitmap(48, 64, (16, 32))
    with pytest.raises(ValueError, match="cannot run a bitmap factor"):
        sm.sparse_matmul(torch.randn(3, 48), factor, config=sm.LaunchConfig(16, 32, 32, 1))


def test_keys_are_bucketed():
    assert [sm.shape_bucket(n) for n in (1, 16, 17, 768, 1365, 3072, 4096, 14336)] == [
        16, 16, 32, 1024, 2048, 4096, 4096, 16384]
    _, f = _bitmap(48, 64, (64, 64))
    keys = {tuple(sm.tune_key(M, 64, 48, f, False, False, 1, torch.float16).items()) for M in (1, 7, 16)}
    assert len(keys) == 1  # decode rows share one key (and one config)
    k = sm.tune_key(300, 3072, 1365, f, True, False, 2, torch.bfloat16)
    assert list(k) == sm.TUNE_KEY and (k["M_BUCKET"], k["N_BUCKET"], k["K_BUCKET"]) == (128, 4096, 2048)
    assert (k["TILE_K"], k["TILE_N"], k["TRANS_B"], k["SPLIT_K"], str(k["DOT_DTYPE"])) == (64, 64, True, 2, "bf16")


def test_committed_table_holds_no_measurement_yet():
    data = triton_configs.table()
    assert data["default"]["configs"] == [] and "not measured" in data["default"]["source"]


def test_tuned_configs_round_trip_into_the_table(tmp_path, monkeypatch):
    """What the tuned stage dumps (the autotuner's cache) is what a later launch looks up, by the same key."""
    _, f = _bitmap(48, 64, (64, 64))
    key = sm.tune_key(5, 64, 48, f, False, False, 1, torch.float16)
    config = sm.prune_configs(sm.tune_configs(), {}, **key)[1]
    fake = type("Tuned", (), {"cache": {tuple(key.values()) + ("torch.float16",): config}})
    monkeypatch.setattr(sm, "_sparse_b_kernel_tuned", fake)
    entries = sm.tuned_configs()
    assert entries == [{"key": dict(key, DOT_DTYPE="fp16"),
                        "config": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}}]
    run = tmp_path / "triton_configs_X.json"
    run.write_text(json.dumps({"gpu": "SYNTHETIC GPU", "source": "test", "configs": entries}))
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"default": {"source": "not measured", "configs": []}}))
    assert triton_configs.merge(run, table) == ("SYNTHETIC GPU", 1)
    assert triton_configs.merge(run, table) == ("SYNTHETIC GPU", 1)  # measured again: replaced, not added
    monkeypatch.setattr(triton_configs, "table", lambda: json.loads(table.read_text()))
    triton_configs._index.cache_clear()
    try:
        index = triton_configs._index("SYNTHETIC GPU")
        assert index[triton_configs._frozen(dict(key, DOT_DTYPE="fp16"))]["num_warps"] == 8
        assert triton_configs._index("another GPU") == {}
    finally:
        triton_configs._index.cache_clear()
    with pytest.raises(ValueError, match="not a tuned stage"):
        triton_configs.merge(table, table)
