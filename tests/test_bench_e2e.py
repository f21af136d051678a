"""The end-to-end benchmark's harness (``fips-kernels bench-e2e``), on the CPU.

The tiny models run once through the command line (a subprocess, as CI and a
user run it: FiPS layers on the reference backend); the checks read its CSV.
Timings are not checked, only the bookkeeping around them: one row per point,
speed-ups against the dense row of the same point, weight bytes (the part
outside the MLPs never changes; FiPS MLPs within the budget), FiPS-family
outputs equal to the reference, and a clear reason on every skipped row.
"""
import csv
import importlib.util
import itertools
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fips_kernels import _extension, dispatch
from fips_kernels.bench import e2e
from fips_kernels.bench.layer import METADATA_COLUMNS, BenchError

from conftest import run_csv_command

ROOT = Path(__file__).resolve().parents[1]
HAS_TIMM = importlib.util.find_spec("timm") is not None
TINY = tuple(e2e.TINY_MODELS)
PATTERNS = ("unstructured", "1:4", "2:4")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "tiny.csv"
    return run_csv_command([ROOT / "benchmarks" / "bench_e2e.py", "--tiny", "--device", "cpu", "--out", out,
                            "--no-progress"], tmp_path_factory.getbasetemp(), e2e.E2E_COLUMNS)


def _key(r):
    return r["model"], r["dtype"], r["mode"], r["provider"], r["pattern"], int(r["batch"])


def test_one_row_per_point(tiny_run):
    rows, stdout = tiny_run
    variants = [("dense", "none")] + [(p, pat) for p in e2e.E2E_PROVIDERS[1:] for pat in PATTERNS]
    expected = {(m, "fp32", "eager", p, pat, b) for m in TINY for p, pat in variants for b in e2e.TINY_BATCHES}
    keys = [_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == len(expected)
    assert set(keys) == expected
    config = e2e.resolve_config(tiny=True, device="cpu")
    assert config.points == len(rows)
    assert "speed-up over the dense model" in stdout and "CPU timings" in stdout


def test_metadata_and_statuses(tiny_run):
    rows, _ = tiny_run
    for r in rows:
        for col in METADATA_COLUMNS + ("model", "arch", "task", "provider", "pattern", "format", "dtype", "mode",
                                       "batch", "unit", "status"):
            assert r[col] != "", (col, r)
        assert r["device"] == "cpu" and r["gpu_name"] == "none" and r["torch"] == torch.__version__
        assert r["status"] in ("ok", "skipped"), r  # nothing fails on the CPU
        assert r["role"] == {"dense": "baseline", "fips": "ours"}.get(r["provider"], "peer"), r
        if r["status"] == "skipped":
            assert r["reason"] and r["time_ms"] == "" and r["throughput"] == "", r
        else:
            assert float(r["time_ms"]) > 0 and "WARNING" not in r["reason"], r
            assert float(r["throughput"]) == pytest.approx(int(r["batch"]) / (float(r["time_ms"]) * 1e-3), rel=1e-4)
            assert r["run_peak_bytes"] == ""  # measured on CUDA only
    # 2:4 sparse tensor cores need a GPU; everything else runs on the CPU (timm permitting)
    for r in rows:
        if r["provider"] == "semi_structured_24":
            assert r["status"] == "skipped" and "CUDA" in r["reason"]
        elif r["task"] == "images" and not HAS_TIMM:
            assert r["status"] == "skipped" and r["reason"] == e2e.TIMM_MISSING
        else:
            assert r["status"] == "ok", r


def test_speedup_is_against_the_dense_row_of_the_point(tiny_run):
    rows, _ = tiny_run
    dense = {_key(r)[:3] + (_key(r)[5],): float(r["time_ms"]) for r in rows
             if r["provider"] == "dense" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        k = _key(r)
        assert float(r["speedup_vs_dense"]) == pytest.approx(dense[k[:3] + (k[5],)] / float(r["time_ms"]), rel=1e-4)


def test_weight_bytes(tiny_run):
    """The layers outside the MLPs are untouched by every variant; FiPS MLPs stay within the budget's bytes."""
    rows, _ = tiny_run
    ok = [r for r in rows if r["status"] == "ok"]
    for model in {r["model"] for r in ok}:
        mine = [r for r in ok if r["model"] == model]
        dense = next(r for r in mine if r["provider"] == "dense")
        outside = {int(r["weight_bytes"]) - int(r["mlp_weight_bytes"]) for r in mine}
        assert len(outside) == 1, (model, outside)
        if model == "tiny-mlp":
            assert outside == {0}  # the stack is nothing but MLPs
        for r in mine:
            assert float(r["weight_ratio_vs_dense"]) == pytest.approx(
                int(r["weight_bytes"]) / int(dense["weight_bytes"]), rel=1e-4)
            assert float(r["mlp_weight_ratio_vs_dense"]) == pytest.approx(
                int(r["mlp_weight_bytes"]) / int(dense["mlp_weight_bytes"]), rel=1e-4)
            if r["provider"] == "fips":
                # p = 0.5 of the parameters; indices, bitmaps and tile padding of tiny shapes on top
                assert float(r["mlp_weight_ratio_vs_dense"]) < 0.7, r
                assert r["ranks"] and int(r["groups"]) == len(r["ranks"].split())
            if r["provider"] == "two_gemm":  # V stored dense: larger than FiPS
                fips = next(f for f in mine if (f["provider"], f["pattern"], f["batch"])
                            == ("fips", r["pattern"], r["batch"]))
                assert int(r["mlp_weight_bytes"]) > int(fips["mlp_weight_bytes"])


def test_groups_and_rows(tiny_run):
    rows, _ = tiny_run
    ok = [r for r in rows if r["status"] == "ok" and r["provider"] == "fips"]
    groups = {r["model"]: int(r["groups"]) for r in ok}
    assert groups["tiny-mlp"] == 1
    if HAS_TIMM:
        assert groups["tiny-vit"] == 2  # 8 blocks, 4 per group
        assert groups["tiny-swin"] == 3  # stages of 2 and 8 blocks, at most 6 per group: 2 | 6 + 2
    for r in ok:
        M = int(r["mlp_rows"])
        b = int(r["batch"])
        if r["model"] == "tiny-mlp":
            assert M == b
        elif r["model"] == "tiny-vit":
            assert M == b * 17  # 16 patches + the class token
        # the CPU without TRITON_INTERPRET: the cpu backend runs bitmap factors, the reference the rest
        cpu = r["pattern"] == "unstructured" and _extension.CPU.available()
        assert r["backend"] == ("cpu" if cpu else "reference"), (r["pattern"], r["backend"])


def test_fips_family_outputs_match_the_reference(tiny_run):
    rows, _ = tiny_run
    for r in rows:
        if r["status"] == "ok" and r["provider"] != "dense":
            assert float(r["rel_err"]) < 1e-4, r


def test_decode_rows_have_a_roofline(tiny_run):
    rows, _ = tiny_run
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["task"] == "decode":
            B = float(r["bandwidth_GBps"]) * 1e9
            assert float(r["roofline_ms"]) == pytest.approx(int(r["bytes"]) / B * 1e3, rel=1e-4)
            assert float(r["frac_of_roofline"]) == pytest.approx(float(r["roofline_ms"]) / float(r["time_ms"]),
                                                                 rel=1e-4)
            assert r["unit"] == "tokens/s"
        else:
            assert r["bytes"] == r["roofline_ms"] == "" and r["unit"] == "images/s"


def test_without_timm_the_image_models_are_skipped_and_the_stack_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(e2e, "_timm", lambda: None)
    config = e2e.resolve_config(models=["tiny-vit", "tiny-mlp"], providers=["fips"], patterns=["1:4"],
                                batch=[2], decode_batch=[2], device="cpu", out=str(tmp_path / "x.csv"), reps=1,
                                progress=False)
    with dispatch.use_backend("reference"):
        rows = e2e.run(config, log=lambda s: None)
    assert len(rows) == config.points == 4
    for r in rows:
        if r["model"] == "tiny-vit":
            assert r["status"] == "skipped" and r["reason"] == e2e.TIMM_MISSING
        else:
            assert r["status"] == "ok"
            if r["provider"] == "fips":
                assert float(r["rel_err"]) < 1e-4


def test_budget_spent_marks_the_rest_skipped(tmp_path):
    config = e2e.resolve_config(models=["tiny-mlp"], providers=["fips"], patterns=["1:4", "2:4"], decode_batch=[1, 2],
                                device="cpu", out=str(tmp_path / "x.csv"), budget_s=1e-9, progress=False)
    rows = e2e.run(config, log=lambda s: None)
    assert len(rows) == config.points == 3 * 2
    assert all(r["status"] == "skipped" and "--budget-s" in r["reason"] for r in rows)
    with open(tmp_path / "x.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_cuda_graph_modes_are_skipped_on_the_cpu(tmp_path):
    config = e2e.resolve_config(models=["tiny-mlp"], providers=["dense"], modes=["cudagraph", "compile-cudagraph"],
                                decode_batch=[1], device="cpu", out=str(tmp_path / "x.csv"), progress=False)
    rows = e2e.run(config, log=lambda s: None)
    assert [(r["mode"], r["status"]) for r in rows] == [("cudagraph", "skipped"), ("compile-cudagraph", "skipped")]
    assert all("CUDA" in r["reason"] for r in rows)


def test_config_defaults_and_errors(tmp_path):
    cpu = e2e.resolve_config(device="cpu")
    assert cpu.models == TINY and cpu.modes == ("eager",) and cpu.dtypes == (torch.float32,)
    assert cpu.providers[0] == "dense" and cpu.patterns == PATTERNS
    assert cpu.out.name.startswith("fips_bench_e2e_cpu_")
    full = e2e.resolve_config(device="cpu", models=["deit-b", "llama3-8b-mlp"], batch=[2, 2, 1])
    assert full.batches(e2e.MODELS["deit-b"]) == (2, 1)
    assert full.batches(e2e.MODELS["llama3-8b-mlp"]) == e2e.DECODE_BATCHES
    only = e2e.resolve_config(device="cpu", providers=["fips"])
    assert only.providers == ("dense", "fips") and any("always run" in n for n in only.notes)
    assert only.variants() == [("dense", "")] + [("fips", p) for p in PATTERNS]
    for kwargs, words in [
        (dict(models=["nope"]), "unknown model"),
        (dict(providers=["nope"]), "unknown provider"),
        (dict(modes=["jit"]), "unknown mode"),
        (dict(patterns=["3:8"]), "unknown pattern"),
        (dict(dtypes=["int8"]), "unknown dtype"),
        (dict(dtypes=["bf16"]), "bf16"),
        (dict(batch=[0]), "positive"),
        (dict(budget_s=-1), "budget"),
        (dict(device="tpu"), "device"),
        (dict(out=str(tmp_path)), "directory"),
    ]:
        with pytest.raises(BenchError, match=words):
            e2e.resolve_config(device=kwargs.pop("device", "cpu"), **kwargs)


def test_cli_list_and_bad_argument(capsys):
    from fips_kernels.cli import main

    assert main(["bench-e2e", "--list"]) == 0
    out = capsys.readouterr().out
    for word in itertools.chain(e2e.ALL_MODELS, e2e.E2E_PROVIDERS, e2e.MODES):
        assert word in out
    assert main(["bench-e2e", "--device", "cpu", "--models", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_real_configs_group_within_stages():
    """DeiT-B: 3 groups of 4 blocks; Swin-L: groups of at most 6 within a stage (built on the meta device)."""
    import timm

    expected = {"deit-b": ([4, 4, 4], [768] * 3), "swin-l": ([2, 2, 6, 6, 6, 2], [192, 384, 768, 768, 768, 1536])}
    for name, (sizes, widths) in expected.items():
        spec = e2e.MODELS[name]
        with torch.device("meta"):
            model = timm.create_model(spec.arch, pretrained=False)
        groups = e2e.mlp_groups(model, spec.group_size)
        assert [len(g) for g in groups] == sizes
        for g, d in zip(groups, widths):
            assert {model.get_submodule(f"{m}.fc1").in_features for m in g} == {d}
            stage = {m.rsplit(".", 2)[0] for m in g}
            assert len(stage) == 1  # one container: never across a change of width


def test_module_bytes_counts_shared_tensors_once():
    from fips_kernels.bench.cases import random_factor
    from fips_kernels.bench.shapes import PATTERNS as PATS
    from fips_kernels.modules import FiPSGroup, FiPSLinear, SharedBase, install

    g = torch.Generator().manual_seed(0)
    base = SharedBase(torch.randn(8, 6))
    layers = [FiPSLinear(base, random_factor(6, 16, PATS["1:4"], torch.float32, g, torch.device("cpu")), "expand"),
              FiPSLinear(base, random_factor(16, 6, PATS["1:4"], torch.float32, g, torch.device("cpu")), "contract")]
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
    install(model, FiPSGroup(base, layers), ["0", "1"])
    want = base.U.numel() * 4 + sum(layer.factor.nbytes for layer in layers) + sum(
        layer.bias.numel() * 4 for layer in layers if layer.bias is not None)
    assert e2e.module_bytes(model) == want
    assert e2e.module_bytes(model, model) == want
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR is in beta
        csr = torch.eye(4).to_sparse_csr()
    assert e2e.tensor_nbytes(csr) == (5 + 4) * 8 + 4 * 4
