"""The CPU benchmark (``fips-kernels bench-cpu``, fips_kernels/bench/cpu.py): its
``--tiny`` path end to end (a random BERT compressed in-process, the CSV and its
columns), the byte count of the MLP modules, and a bad argument."""
import csv

import pytest
import torch

pytest.importorskip("transformers")

from fips_kernels import cli  # noqa: E402
from fips_kernels.bench import cpu as bench_cpu  # noqa: E402
from fips_kernels.bench.env import METADATA_COLUMNS  # noqa: E402


def test_tiny_run_writes_one_row_per_threads_batch_and_variant(tmp_path, capsys):
    out = tmp_path / "cpu.csv"
    rc = cli.main(["bench-cpu", "--tiny", "--out", str(out), "--batch", "1", "4", "--reps", "2", "--warmup", "1",
                   "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    with open(out, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert set(bench_cpu.COLUMNS) <= set(reader.fieldnames) and set(METADATA_COLUMNS) <= set(reader.fieldnames)
    assert [(r["batch"], r["variant"]) for r in rows] == [(b, v) for b in ("1", "4") for v in bench_cpu.VARIANTS]
    roles = {r["variant"]: r["role"] for r in rows}
    assert roles == {"dense": "baseline", "fips-speed": "ours", "fips-compressed": "ours"}
    for r in rows:
        assert r["status"] == "ok" and not r["reason"], r
        assert float(r["median_ms"]) > 0 and float(r["ratio_vs_dense"]) > 0 and int(r["tokens"]) > 0
        assert float(r["cos_min"]) > bench_cpu.COS_FLOOR and r["threads"] == "1" and r["device"] == "cpu"
        assert r["meets_target"] in (("",) if r["variant"] == "dense" else ("yes", "no"))
    dense = [r for r in rows if r["variant"] == "dense"]
    assert all(float(r["ratio_vs_dense"]) == 1.0 for r in dense)
    assert int(dense[0]["tokens"]) < int(dense[1]["tokens"])
    # the compressed mode holds fewer MLP bytes than the dense fp32 MLP weights (the tiny model is compressed 4x)
    compressed = next(r for r in rows if r["variant"] == "fips-compressed")
    assert 0 < int(compressed["mlp_resident_bytes"]) < int(dense[0]["mlp_resident_bytes"])
    assert "fips-speed" in printed.out and "≤ 1.1x" in printed.out and "≤ 1.5x" in printed.out


def test_mlp_bytes_counts_parameters_buffers_and_cached_tensors_once():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    model[0].register_buffer("scale", torch.ones(3))
    model[0]._weight_cache = torch.zeros(8, 4)
    model[1]._alias = model[1].weight  # a registered tensor seen again is not counted twice
    n = bench_cpu.mlp_bytes(model, ["0", "1"])
    assert n == {"resident": 4 * (32 + 8 + 3 + 32 + 32 + 4), "cache": 4 * 32}


def test_interleaved_rotates_the_order_every_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench_cpu.interleaved(fns, warmup=1, reps=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t) == 3 for t in times.values())


def test_bad_arguments_are_refused(capsys):
    assert cli.main(["bench-cpu", "--tiny", "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err


def test_a_variant_that_cannot_load_or_run_gets_a_failed_row():
    from transformers import BertConfig, BertModel

    dense = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64)).eval()

    class Broken(torch.nn.Module):
        def forward(self, **batch):
            raise RuntimeError("boom")

    setup = bench_cpu.Setup("tiny", dense, bench_cpu._word_tokenize(64), "", bench_cpu._mlp_linears(dense))
    variants = [bench_cpu.Variant("dense", "baseline", "dense", dense),
                bench_cpu.Variant("fips-speed", "ours", "speed", error="ImportError: no backend"),
                bench_cpu.Variant("fips-compressed", "ours", "compressed", Broken())]
    rows = bench_cpu.run(setup, variants, batches=[2], reps=1, warmup=1, progress=False)
    assert [r["status"] for r in rows] == ["ok", "failed", "failed"]
    assert rows[1]["reason"] == "ImportError: no backend" and rows[2]["reason"] == "RuntimeError: boom"
    assert "failed: RuntimeError: boom" in bench_cpu.summary_table(rows)


def test_kernels_mode_times_the_kernel_against_the_dense_gemm(tmp_path, capsys):
    """``--kernels``: one row per (factor, M), the kernel's output checked against fp64 truth, both
    timings and the rate ratio present; ``--rows`` outside ``--kernels`` and ``--batch`` inside are refused."""
    from fips_kernels import _extension

    if not _extension.CPU.available():
        pytest.skip("the CPU kernels are not built")
    out = tmp_path / "kernel.csv"
    rc = cli.main(["bench-cpu", "--tiny", "--kernels", "--rows", "1", "150", "--out", str(out), "--reps", "2",
                   "--warmup", "1", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kind"], r["M"]) for r in rows] == [("expand", "1"), ("expand", "150"), ("contract", "1"),
                                                   ("contract", "150")]
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["kernel_median_ms"]) > 0 and float(r["gemm_median_ms"]) > 0
        assert float(r["max_rel_err"]) < 1e-4 and 0 < float(r["density"]) <= 1 and r["value_bits"] == "8"
        assert float(r["useful_rate_vs_gemm"]) > 0 and r["device"] == "cpu" and r["commit"]
    assert "useful MAC/s vs GEMM" in printed.out
    assert cli.main(["bench-cpu", "--tiny", "--rows", "4"]) == 2
    assert "--rows goes with --kernels" in capsys.readouterr().err
    assert cli.main(["bench-cpu", "--tiny", "--kernels", "--batch", "4"]) == 2
    assert "give --rows, not --batch" in capsys.readouterr().err
