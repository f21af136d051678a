"""The quality benchmark's peers (fips_kernels/bench/quantizers.py) against small
exact cases, its metrics, and a tiny end-to-end run of ``bench-quality``."""
import csv

import pytest
import torch

import fips_kernels as fk
from fips_kernels import cli
from fips_kernels.bench import quality, quantizers as q

import compress_models as cm


pytestmark = pytest.mark.usefixtures("one_thread_reference")


def _correlated(n=400, k=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g)
    return X, X.t() @ X


# ---------------------------------------------------------------- grids and bytes

def test_rtn_rounds_each_group_onto_its_min_max_grid():
    W = torch.tensor([[-1.0, 0.0, 0.5, 2.0, 10.0, 10.0, 10.0, 12.0]])
    c = q.rtn(W, bits=2, group=4)
    # group 1: range [-1, 2] in 3 steps of 1 (0.5 rounds half to even: to 0); group 2: [0, 12] (0 stays
    # in the range), steps of 4 (10 / 4 = 2.5 rounds to 2)
    assert c.weight.tolist() == [[-1.0, 0.0, 0.0, 2.0, 8.0, 8.0, 8.0, 12.0]]
    # 8 values at 2 bits, and per group an fp16 scale and a 2-bit zero point
    assert c.nbytes == 2 + 2 * 2 + 1


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    H = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.5)
    assert torch.equal(q.gptq(W, H, bits=3, group=32, damp=0.0).weight, q.rtn(W, bits=3, group=32).weight)


def test_gptq_two_columns_match_the_optimal_brain_surgeon_update():
    """One row, two inputs: quantise w1, move w2 by -(w1 - q1)·[H⁻¹]₁₂/[H⁻¹]₁₁, quantise it."""
    W = torch.tensor([[0.37, -0.7]])
    H = torch.tensor([[2.0, 1.2], [1.2, 1.5]])
    bits = 3
    scale, zero = q.minmax_grid(W, bits)  # one group: the grid comes from both original values

    def rnd(v):
        return float(scale * (torch.clamp(torch.round(torch.tensor(v) / scale) + zero, 0, 2 ** bits - 1) - zero))

    Hinv = torch.linalg.inv(H.double())
    q1 = rnd(0.37)
    w2 = -0.7 - (0.37 - q1) * float(Hinv[0, 1] / Hinv[0, 0])
    expected = torch.tensor([[q1, rnd(w2)]])
    got = q.gptq(W, H, bits=bits, group=2, block=2, damp=0.0).weight
    assert torch.allclose(got, expected, atol=1e-6), (got, expected)
    assert rnd(w2) != rnd(-0.7)  # the case exercises the update


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    X, H = _correlated()
    W = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))

    def err(Wq):
        return float((X @ (Wq - W).t()).norm())

    for bits in (4, 3, 2):
        assert err(q.gptq(W, H, bits, group=16, block=32).weight) < err(q.rtn(W, bits, group=16).weight)


def test_sparsegpt_and_wanda_keep_their_patterns_and_count_indices_as_the_formats_do():
    X, H = _correlated()
    W = torch.randn(24, 32, generator=torch.Generator().manual_seed(4))
    s = q.sparsegpt(W, H, 0.5)
    assert float((s.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    nm = q.sparsegpt(W, H, pattern="2:4", bits=4, group=16, block=32).weight
    assert int((nm.view(24, 8, 4) != 0).sum(-1).max()) <= 2
    w = q.wanda(W, X.norm(dim=0), 0.5)
    assert ((w.weight != 0).sum(1) == 16).all()
    mask = w.weight != 0
    factor = fk.SparseFactor.pack((W * mask).t().contiguous().half(), "bitmap")
    assert w.nbytes == factor.nbytes  # fp16 values + bitmask words + tile offsets
    assert q.wanda(W, X.norm(dim=0), pattern="2:4").weight.view(24, 8, 4).ne(0).sum(-1).eq(2).all()


def test_hqq_and_torchao_peers_when_installed():
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(5))
    pytest.importorskip("hqq", reason="hqq is not installed (pip install 'fips-kernels[quality]')")
    h = q.hqq_weight(W, 4, 64)
    assert h.weight.shape == W.shape and float((h.weight - W).norm() / W.norm()) < 0.15
    assert h.nbytes == 32 * 128 // 2 + 4 * 32 * 2


def test_torchao_peer_when_installed():
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'fips-kernels[quality]')")
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(6))
    for bits, tol in ((8, 0.02), (4, 0.2)):
        t = q.torchao_weight(W, bits, 64)
        assert t.weight.shape == W.shape and float((t.weight - W).norm() / W.norm()) < tol


# ---------------------------------------------------------------- metrics

def test_spearman_and_agreement():
    a = torch.tensor([0.1, 0.5, 0.2, 0.9])
    assert q_spearman(a, a ** 3) == pytest.approx(1.0)
    assert q_spearman(a, -a) == pytest.approx(-1.0)
    # a textbook case: ranks (1,2,3,4,5) vs (2,1,4,3,5): 1 - 6·4/(5·24) = 0.8
    assert q_spearman(torch.tensor([1., 2, 3, 4, 5]), torch.tensor([2., 1, 4, 3, 5])) == pytest.approx(0.8)
    ref = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    m = quality.agreement(ref * 2.0, ref)
    assert m["cos_mean"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    assert quality.agreement(-ref, ref)["cos_min"] == pytest.approx(-1.0)


def q_spearman(a, b):
    return quality.spearman(a, b)


# ---------------------------------------------------------------- the benchmark end to end

def _tiny_context():
    model = cm.tiny_bert(layers=2)
    batches = cm.token_batches(n_batches=6, batch=4, length=10, vocab=120)
    return quality.build_context("tiny-bert", model, batches[:4], batches[4:])


def test_benchmark_rows_count_bytes_and_list_what_cannot_run(tmp_path):
    ctx = _tiny_context()
    ctx.extra.update(steps=4, finetune_steps=2)
    out = tmp_path / "q.csv"
    rows = quality.run(ctx, ["rtn", "gptq", "fips", "llmcompressor"], out=str(out), progress=False,
                       settings={"rtn": [dict(bits=4, group=32)], "gptq": [dict(bits=4, group=32)],
                                 "fips": [dict(ratio=6, prune_every=2)]})
    by = {r["method"]: r for r in rows}
    assert by["dense"]["cos_mean"] == "1.000000" and by["dense"]["mlp_bytes"] == str(ctx.dense_bytes)
    assert ctx.dense_bytes == 2 * 2 * 32 * 96 * 4
    for name in ("rtn", "gptq", "fips"):
        assert by[name]["status"] == "ok", by[name]["reason"]
        assert float(by[name]["ratio"]) == pytest.approx(ctx.dense_bytes / int(by[name]["mlp_bytes"]), rel=1e-3)
        assert 0.0 < float(by[name]["cos_mean"]) <= 1.0
    # per layer and weight: 3072 int4 values, 96 groups of 32 inputs with an fp16 scale and a 4-bit zero point
    assert int(by["rtn"]["mlp_bytes"]) == 4 * (3072 // 2 + 96 * 2 + 96 // 2)
    assert float(by["fips"]["ratio"]) >= 6.0  # never above the byte target
    assert by["llmcompressor"]["status"] == "skipped" and "torch" in by["llmcompressor"]["reason"]
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["method"] for r in written] == [r["method"] for r in rows]
    assert all(r["commit"] and r["torch"] and r["date"] for r in written)
    table = quality.markdown_table(rows)
    assert "| fips |" in table and "llmcompressor" in table


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    rows = [dict(method=m, ratio=str(r), cos_mean=str(c), status="ok") for m, r, c in
            (("rtn", 4, 0.99), ("rtn", 8, 0.95), ("fips", 8, 0.97), ("fips", 12, 0.95))]
    assert quality.plot(rows, str(tmp_path / "p.png")) is None
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_pareto_front():
    rows = [dict(method=m, ratio=str(r), cos_mean=str(c), status="ok") for m, r, c in
            (("a", 4, 0.99), ("b", 8, 0.95), ("c", 8, 0.97), ("d", 3, 0.98))]
    assert sorted(r["method"] for r in quality.pareto(rows)) == ["a", "c"]


def test_held_back_text_is_not_calibration_text():
    from fips_kernels.bench.quality_text import HELD_BACK
    from fips_kernels.compress.builtin_text import SENTENCES

    assert len(HELD_BACK) >= 100 and len(set(HELD_BACK)) == len(HELD_BACK)
    assert not set(HELD_BACK) & set(SENTENCES)


def test_cli_refuses_bad_arguments(capsys):
    assert cli.main(["bench-quality", "--ratios", "0.5", "--quick"]) == 2
    assert "ratios must be > 1" in capsys.readouterr().err


def test_fips_is_compared_with_the_peers_curve():
    rows = [dict(method=m, setting=st, ratio=str(r), cos_mean=str(c), spearman=str(c), status="ok") for m, st, r, c in
            (("rtn", "bits=4", 4, 0.99), ("gptq", "bits=3", 16, 0.91), ("rtn", "bits=2", 16, 0.5),
             ("fips", "ratio=8", 8, 0.96), ("fips", "ratio=20", 20, 0.9))]
    # the peers' front: (4, 0.99) -> (16, 0.91); at 8 (halfway in log ratio): 0.95
    assert quality.peer_curve(rows, 8) == pytest.approx(0.95)
    assert quality.peer_curve(rows, 20) is None
    table = quality.fips_against_peers(rows).splitlines()
    assert "| ratio=8 | 8.00x | 0.9600 |" in table[2] and "0.9500" in table[2] and table[2].endswith("| yes |")
    assert table[3].endswith("| yes |") and "none" in table[3]
    rows[3]["cos_mean"] = "0.94"
    assert quality.fips_against_peers(rows).splitlines()[2].endswith("| no |")


@pytest.mark.parametrize("setting, steps, lrs", [(dict(ratio=12), 1000, (2e-3, 2e-4)), (dict(ratio=8), 250, (1e-3, 1e-4)),
                                                 (dict(ratio=4), 150, (1e-3, 1e-4)), (dict(budget=0.5), 150, (1e-3, 1e-4))])
def test_fips_rows_train_as_the_compress_command_does_on_a_cpu(monkeypatch, setting, steps, lrs):
    """Without --steps on a CPU the benchmark's FiPS rows run the command's built-in recipe at their
    ratio (compress/command.py: builtin_cpu_steps, learning_rates), so its curve is the command's."""
    import fips_kernels.compress as compress_pkg
    from conftest import CallStopped, stop_and_record

    seen = {}
    monkeypatch.setattr(compress_pkg, "compress", stop_and_record(seen))
    ctx = _tiny_context()
    ctx.extra.update(steps=None, finetune_steps=None, cli_recipe=True)
    with pytest.raises(CallStopped):
        quality._fips(ctx, **setting)
    assert seen["steps"] == steps and (seen["lr"], seen["finetune_lr"]) == lrs
    assert "finetune_steps" not in seen  # as many as the block-wise steps (compress's default)


def test_the_model_argument_is_parsed_before_loading(monkeypatch):
    """``bench-quality`` with no model loads the built-in default and with a name parses it (a bare
    string or None handed to the loader crashed with an AttributeError)."""
    import argparse

    from conftest import CallStopped, stop_and_record

    from fips_kernels.compress import command

    seen = {}
    monkeypatch.setattr(command, "load_model", stop_and_record(seen))
    args = argparse.Namespace(model=None, input_size=None, checkpoint=None, no_pretrained=False)
    with pytest.raises(CallStopped):
        quality._load(args)
    spec = seen["args"][0]
    assert spec.source == "default" and spec.name == "all-MiniLM-L6-v2"
    pytest.importorskip("timm")
    args.model, args.input_size = "vit_tiny_patch16_224", 96
    with pytest.raises(CallStopped):
        quality._load(args)
    assert seen["args"][0].source == "timm"


def test_an_unknown_model_is_a_clean_error(capsys):
    assert cli.main(["bench-quality", "no-such-model-xyz", "--quick"]) == 2
    assert "no-such-model-xyz" in capsys.readouterr().err
