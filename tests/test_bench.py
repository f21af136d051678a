"""The layer benchmark's harness (``fips-kernels bench``), on the CPU.

The tiny sweep runs once through the command line (a subprocess, as CI and a
user run it); the checks read its CSV. Timings are not checked, only that the
bookkeeping around them is right.
"""
import csv
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fips_kernels import factorize_group
from fips_kernels.bench import layer, providers, shapes
from fips_kernels.bench.cases import build_cases
from fips_kernels.bench.layer import COLUMNS, METADATA_COLUMNS, BenchError, resolve_config

from conftest import run_csv_command

ROOT = Path(__file__).resolve().parents[1]
TINY = ("tiny", "tiny-f3")
KINDS = ("expand", "contract")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.csv"
    return run_csv_command(["-m", "fips_kernels.cli", "bench", "--tiny", "--device", "cpu", "--out", out,
                            "--no-progress"], tmp_path_factory.getbasetemp(), COLUMNS, timeout=300)


def _key(row):
    return row["preset"], row["kind"], row["pattern"], int(row["M"]), row["provider"]


def test_one_row_per_point(tiny_run):
    from fips_kernels.bench.group import GROUP_PROVIDERS

    rows, _ = tiny_run
    expected = set(itertools.product(TINY, KINDS, shapes.PATTERNS, shapes.TINY_M, providers.PROVIDERS))
    expected |= set(itertools.product(TINY, ("group",), shapes.PATTERNS, shapes.TINY_M, GROUP_PROVIDERS))
    keys = [_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == len(expected)
    assert set(keys) == expected


def test_metadata_filled(tiny_run):
    rows, _ = tiny_run
    always = ("preset", "d", "h", "r", "kind", "layer", "pattern", "format", "dtype", "M", "provider", "status",
              "bandwidth_GBps", "peak_TFLOPs") + METADATA_COLUMNS
    for row in rows:
        for col in always:
            assert row[col] != "", (col, row)
        assert row["device"] == "cpu" and row["gpu_name"] == "none" and row["dtype"] == "fp32"
        assert row["torch"] == torch.__version__
        assert row["date"].endswith("Z") and "T" in row["date"]
        assert row["commit"] == "unknown" or row["commit"].split("-")[0]
    assert len({(r["date"], r["commit"], r["bandwidth_GBps"], r["peak_TFLOPs"]) for r in rows}) == 1


def test_ok_and_skipped_rows(tiny_run):
    rows, stdout = tiny_run
    ok = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["status"] for r in rows} == {"ok", "skipped"}
    for r in ok:
        assert float(r["time_ms"]) > 0 and int(r["bytes"]) > 0 and int(r["flops"]) > 0, r
        assert r["backend"], r
        assert not r["reason"].startswith("WARNING"), r
    for r in skipped:
        assert r["reason"], r
    # 2:4 sparse tensor cores need a GPU: every semi_structured_24 row is skipped, saying why.
    semi = [r for r in rows if r["provider"] == "semi_structured_24"]
    assert semi and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in semi)
    # The package's own providers and the dense baseline always run on the CPU.
    assert all(r["status"] == "ok" for r in rows if r["provider"] in ("dense", "fips", "reference", "two_gemm"))
    assert "CPU timings" in stdout and "speed-up over dense" in stdout


def test_speedup_and_roofline_columns(tiny_run):
    rows, _ = tiny_run
    dense = {_key(r)[:4]: float(r["time_ms"]) for r in rows if r["provider"] == "dense"}
    for r in rows:
        if r["status"] != "ok":
            assert r["speedup_vs_dense"] == "" and r["time_ms"] == ""
            continue
        t = float(r["time_ms"])
        assert float(r["speedup_vs_dense"]) == pytest.approx(dense[_key(r)[:4]] / t, rel=1e-4)
        B, P = float(r["bandwidth_GBps"]) * 1e9, float(r["peak_TFLOPs"]) * 1e12
        roof = max(int(r["bytes"]) / B, int(r["flops"]) / P) * 1e3
        assert float(r["roofline_ms"]) == pytest.approx(roof, rel=1e-4)
        assert float(r["frac_of_roofline"]) == pytest.approx(float(r["roofline_ms"]) / t, rel=1e-4)
        if r["provider"] == "dense":
            assert float(r["speedup_vs_dense"]) == 1.0 and float(r["compressed_ratio"]) == 1.0


def _factor_bytes(kind, r, h, pattern, itemsize):
    """Stored bytes of one factor, counted from docs/FORMATS.md."""
    K, N = (r, h) if kind == "expand" else (h, r)
    if pattern.qbits:  # int8 values (1 byte) + one scale per 64 rows and column
        plain = _factor_bytes(kind, r, h, shapes.Pattern(pattern.structure, pattern.format, pattern.sparsity,
                                                         pattern.n, pattern.m), itemsize)
        values = math.ceil(K / pattern.m) * pattern.n * N
        return plain - values * itemsize + values * pattern.qbits // 8 + math.ceil(K / 64) * N * itemsize
    if pattern.format == "bitmap":
        nnz = math.floor((1 - pattern.sparsity) * r * h)
        tiles = math.ceil(K / 64) * math.ceil(N / 64)
        return nnz * itemsize + tiles * 64 * (64 // 32) * 4 + (tiles + 1) * 4
    groups = math.ceil(K / pattern.m)
    rows = groups * pattern.n
    per_word = 32 // {2: 1, 4: 2, 8: 4, 16: 4}[pattern.m]
    return rows * N * itemsize + math.ceil(rows / per_word) * N * 4


def test_fips_bytes_are_the_stored_bytes(tiny_run):
    rows, _ = tiny_run
    itemsize = 4
    for r in rows:
        if r["provider"] not in ("fips", "reference") or r["kind"] == "group":
            continue
        preset, pattern = shapes.ALL_PRESETS[r["preset"]], shapes.PATTERNS[r["pattern"]]
        d, h, rank, M = int(r["d"]), int(r["h"]), int(r["r"]), int(r["M"])
        in_f, out_f = (d, h) if r["kind"] == "expand" else (h, d)
        bias = out_f * itemsize if preset.bias else 0
        base = d * rank + rank * itemsize if pattern.qbits else d * rank * itemsize  # int8 U + per-column scales
        expected = (base + _factor_bytes(r["kind"], rank, h, pattern, itemsize) + bias
                    + M * in_f * itemsize + M * out_f * itemsize)
        assert int(r["bytes"]) == expected, r
        assert float(r["rel_err"]) < 1e-5, r


def test_fips_bytes_match_the_group():
    """The same count through the package's own byte accounting."""
    for preset, pattern in itertools.product(shapes.TINY_PRESETS.values(), shapes.PATTERNS.values()):
        for case in build_cases(preset, pattern, torch.float32, "cpu"):
            base = case.group.base
            base_bytes = sum(t.numel() * t.element_size() for t in (base.U, base.U_scales) if t is not None)
            assert base.quantized == bool(pattern.qbits)
            assert case.fips_weight_bytes == base_bytes + case.layer.nbytes()
            assert case.layer.factor.nbytes == _factor_bytes(case.kind, case.rank, preset.h, pattern, 4)
            assert case.factor.nnz == shapes.stored_values(case.kind, case.rank, preset.h, pattern)


def test_rank_is_factorize_groups():
    """The benchmark's rank rule is the one factorize_group applies."""
    torch.manual_seed(0)
    for preset in shapes.TINY_PRESETS.values():
        linears = []
        for kind in preset.group_kinds:
            linears.append(nn.Linear(preset.d, preset.h) if kind == "expand" else nn.Linear(preset.h, preset.d))
        for name, pattern in shapes.PATTERNS.items():
            group = factorize_group(linears, budget=shapes.BUDGET, pattern=pattern.structure,
                                    kinds=list(preset.group_kinds), qbits=pattern.qbits)
            assert group.info["rank"] == shapes.preset_rank(preset, pattern), (preset.name, name)


def test_random_factors_follow_the_pattern():
    """N:M along axis 0 of the reduction-major factor (pack would refuse otherwise), exact nnz."""
    preset = shapes.TINY_PRESETS["tiny"]
    for pattern in shapes.PATTERNS.values():
        for case in build_cases(preset, pattern, torch.float16, "cpu", seed=3):
            B = case.factor.to_dense()
            assert case.factor.format == pattern.format
            if pattern.format == "nm":
                K, N = B.shape
                G = -(-K // pattern.m)
                padded = torch.nn.functional.pad(B, (0, 0, 0, G * pattern.m - K)).reshape(G, pattern.m, N)
                assert int((padded != 0).sum(1).max()) <= pattern.n
            else:
                assert int((B != 0).sum()) == case.factor.nnz


def test_group_ratio_matches_design_table():
    """DESIGN §2: DeiT-B at p = 0.5 is about 1.64× (bitmap; 1.625 with the bitmask's tile padding) and 1.80× (1:4)."""
    deit = shapes.PRESETS["deit-b"]
    unstructured = build_cases(deit, shapes.PATTERNS["unstructured"], torch.float16, "cpu")[0]
    one_four = build_cases(deit, shapes.PATTERNS["1:4"], torch.float16, "cpu")[0]
    assert unstructured.rank == 1365
    assert unstructured.group_compressed_ratio == pytest.approx(1.64, abs=0.02)
    assert one_four.group_compressed_ratio == pytest.approx(1.80, abs=0.02)


def test_rows_are_written_incrementally(tmp_path, monkeypatch):
    """An interrupted run keeps the rows it wrote."""

    class Boom(providers.Provider):
        name = "boom"

        def prepare(self, case):
            def run(x):
                if x.shape[0] > 1:
                    raise KeyboardInterrupt
                return torch.zeros(x.shape[0], case.out_features, dtype=x.dtype)

            return providers.Prepared(run=run, weight_bytes=1, flops=lambda M: 1, same_layer=False)

    monkeypatch.setitem(providers.PROVIDERS, "boom", Boom())
    out = tmp_path / "partial.csv"
    config = resolve_config(presets=["tiny"], patterns=["1:4"], ms=[1, 16], providers=["dense", "boom"],
                            device="cpu", out=str(out), progress=False)
    with pytest.raises(KeyboardInterrupt):
        layer.run(config, log=lambda s: None)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["M"], r["provider"]) for r in rows] == [("1", "dense"), ("1", "boom"), ("16", "dense")]


def test_a_provider_is_one_class(monkeypatch, tmp_path):
    from fips_kernels.bench import registry as reg

    registry = dict(providers.PROVIDERS)
    for module in (reg, providers, layer):
        monkeypatch.setattr(module, "PROVIDERS", registry)

    @providers.register
    class Twice(providers.Provider):
        name = "twice_dense"
        description = "F.linear twice (a test provider)"

        def not_supported_reasons(self, device, dtype, pattern):
            return ["not for 2:4"] if pattern == "2:4" else []

        def prepare(self, case):
            W, b = case.dense_weight, case.dense_bias
            return providers.Prepared(run=lambda x: torch.nn.functional.linear(x, W, b), weight_bytes=7,
                                      flops=lambda M: 0, same_layer=False)

    config = resolve_config(presets=["tiny"], patterns=["1:4", "2:4"], ms=[4], providers=["twice_dense"],
                            device="cpu", out=str(tmp_path / "t.csv"), progress=False)
    assert config.providers == ("dense", "twice_dense")  # the baseline is always timed
    rows = layer.run(config, log=lambda s: None)
    mine = [r for r in rows if r["provider"] == "twice_dense"]
    assert len(mine) == 4
    assert {(r["pattern"], r["status"]) for r in mine} == {("1:4", "ok"), ("2:4", "skipped")}
    assert {r["role"] for r in mine} == {"peer"}  # the default role of a provider
    assert all(r["reason"] == "not for 2:4" for r in mine if r["status"] == "skipped")


def test_config_defaults_and_errors(tmp_path):
    cpu = resolve_config(device="cpu")
    assert cpu.presets == TINY and cpu.ms == shapes.TINY_M and cpu.dtype == torch.float32
    assert any("not kernel figures" in n for n in cpu.notes)
    assert cpu.out.name.startswith("fips_bench_cpu_") and cpu.out.suffix == ".csv"
    from fips_kernels.bench.group import GROUP_PROVIDERS

    P = len(shapes.PATTERNS)
    assert cpu.points == 2 * P * 3 * (2 * len(providers.PROVIDERS) + len(GROUP_PROVIDERS))
    assert resolve_config(tiny=True, scopes=["layer"]).points == 2 * P * 2 * 3 * len(providers.PROVIDERS)
    with pytest.raises(BenchError, match="unknown scope"):
        resolve_config(tiny=True, scopes=["model"])
    narrowed = resolve_config(device="cpu", presets=["tiny"], patterns=["2:4"], ms=[8, 8, 2], providers=["fips"])
    assert narrowed.ms == (8, 2) and narrowed.providers == ("dense", "fips")
    for kwargs, words in [
        (dict(presets=["nope"]), "unknown preset"),
        (dict(patterns=["3:8"]), "unknown pattern"),
        (dict(providers=["nope"]), "unknown provider"),
        (dict(dtype="int8"), "unknown dtype"),
        (dict(dtype="bf16"), "bf16"),
        (dict(ms=[0]), "positive"),
        (dict(device="tpu"), "device"),
        (dict(out=str(tmp_path)), "directory"),
    ]:
        with pytest.raises(BenchError, match=words):
            resolve_config(device=kwargs.pop("device", "cpu"), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the default of a machine without CUDA")
def test_default_without_cuda_is_the_tiny_cpu_sweep():
    config = resolve_config()
    assert config.device.type == "cpu" and config.presets == TINY and config.ms == shapes.TINY_M
    assert any("tiny sweep" in n for n in config.notes)


def test_summary_table(tiny_run, tmp_path):
    rows, _ = tiny_run
    text = layer.summary_table(rows, providers=["fips", "semi_structured_24"])
    lines = text.splitlines()
    assert lines[0].startswith("speed-up over dense")
    assert lines[1].split()[-3:] == ["1", "16", "64"]
    # per preset and pattern: fips for expand, contract and the group; semi_structured_24 never ran on the CPU,
    # so it has no line but one line below the table with each of its reasons and the rows it covers
    table = lines[2:lines.index("")]
    assert len(table) == len(TINY) * len(shapes.PATTERNS) * 3
    assert all(line.split()[3] == "fips" for line in table)
    skipped = lines[lines.index("") + 1:]
    assert skipped[0].startswith("skipped") and len(skipped) == 2
    semi = [r for r in rows if r["provider"] == "semi_structured_24"]
    assert skipped[1].split()[:3] == ["semi_structured_24", str(len(semi)), "rows:"]
    assert f"needs a CUDA GPU (input is on cpu) [{len(semi)}]" in skipped[1]


def test_summary_lists_each_reason_once():
    from fips_kernels.bench.table import not_run_summary, split_reasons

    assert split_reasons("needs a GPU (on cpu; or X=1); fp32 is not supported") == [
        "needs a GPU (on cpu; or X=1)", "fp32 is not supported"]
    rows = [dict(provider="p", status="skipped", reason="a; b"), dict(provider="p", status="skipped", reason="a"),
            dict(provider="q", status="failed", reason="boom"), dict(provider="r", status="ok", reason="")]
    assert not_run_summary(rows) == [
        "skipped (not run here), by provider: rows, then each reason [rows it covers]:",
        "  p  2 rows: a [2]; b [1]",
        "FAILED, by provider: rows, then each error [rows]:",
        "  q  1 rows: boom [1]"]


def test_commit_and_driver_metadata(monkeypatch):
    from fips_kernels.bench import env

    monkeypatch.setenv(env.COMMIT_ENV, "abc1234-dirty")
    assert env.git_commit() == "abc1234-dirty"
    monkeypatch.delenv(env.COMMIT_ENV)
    commit = env.git_commit()
    assert commit and (commit.startswith("unknown") or len(commit.split("-")[0]) >= 4)
    meta = env.run_metadata(torch.device("cpu"))
    assert set(meta) == set(METADATA_COLUMNS) and all(meta.values())


def test_group_rows_count_the_base_once(tiny_run):
    """Group scope: every layer of a group back to back; bytes = U once + all factors + activations."""
    from fips_kernels.bench.group import build_group_case

    rows, _ = tiny_run
    group_rows = [r for r in rows if r["kind"] == "group"]
    assert group_rows
    for preset_name in TINY:
        preset = shapes.ALL_PRESETS[preset_name]
        for pattern_name, pattern in shapes.PATTERNS.items():
            case = build_group_case(preset, pattern, torch.float32, "cpu")
            assert len(case.layers) == preset.blocks * preset.layers_per_mlp
            assert all(layer.base is case.group.base for layer in case.layers)
            for M in shapes.TINY_M:
                point = {r["provider"]: r for r in group_rows
                         if (r["preset"], r["pattern"], int(r["M"])) == (preset_name, pattern_name, M)}
                fips, dense = point["fips"], point["dense"]
                assert fips["status"] == dense["status"] == "ok"
                assert int(fips["bytes"]) == case.group.nbytes() + case.activation_bytes(M)
                assert int(dense["bytes"]) == case.dense_bytes + case.activation_bytes(M)
                assert math.isclose(float(fips["speedup_vs_dense"]),
                                    float(dense["time_ms"]) / float(fips["time_ms"]), rel_tol=1e-4)
                gated = point["fips_gate_up"]
                assert gated["status"] == ("ok" if preset.layers_per_mlp == 3 else "skipped")


def test_group_runners_compute_the_group(tmp_path):
    """The timed group runners compute what the layers compute (the last layer's output)."""
    from fips_kernels.bench.group import GROUP_PROVIDERS, build_group_case

    case = build_group_case(shapes.ALL_PRESETS["tiny-f3"], shapes.PATTERNS["2:4"], torch.float32, "cpu")
    xs = case.inputs(5)
    last = case.layers[-1]
    want = last(xs[last.kind])
    for name in ("fips", "fips_gate_up", "two_gemm", "csr_rebuild"):
        assert GROUP_PROVIDERS[name].role == ("peer" if name in ("two_gemm", "csr_rebuild") else "ours")
        torch.testing.assert_close(GROUP_PROVIDERS[name](case).run(xs), want, rtol=1e-4, atol=1e-4)


def test_every_row_carries_its_providers_role(tiny_run):
    """The role column comes from the registry entry that wrote the row (no rule on names)."""
    from fips_kernels.bench.group import GROUP_PROVIDERS

    rows, _ = tiny_run
    for r in rows:
        registry = GROUP_PROVIDERS if r["kind"] == "group" else providers.PROVIDERS
        assert r["role"] == registry[r["provider"]].role, r
    roles = {r["provider"]: r["role"] for r in rows}
    assert roles["dense"] == "baseline"
    assert {roles[p] for p in ("fips", "reference", "fips_gate_up", "triton_factored", "cuda_factored",
                               "cuda_reconstruct", "cuda_sparse24", "hashed_fwd")} == {"ours"}
    assert {roles[p] for p in ("two_gemm", "csr_rebuild", "semi_structured_24")} == {"peer"}


def test_peers_have_faces_and_compute_the_layer(monkeypatch):
    """Each peer is defined once: its speed face gives the layer, group and end-to-end forms; a peer
    with only the quality face (e.g. a future round-to-nearest int8) stays out of the speed benchmarks."""
    from fips_kernels.bench import peers, registry

    speed = peers.peers_with("speed")
    assert list(speed) == ["dense", "two_gemm", "csr_rebuild", "semi_structured_24"]
    assert speed["dense"].role == "baseline" and all(p.role == "peer" for n, p in speed.items() if n != "dense")
    case = build_cases(shapes.TINY_PRESETS["tiny"], shapes.PATTERNS["1:4"], torch.float32, "cpu")[1]
    x = case.make_input(3)
    want = case.layer(x)
    for name in ("two_gemm", "csr_rebuild"):
        prepared = speed[name].prepare(case)
        torch.testing.assert_close(prepared.run(x), want, rtol=1e-4, atol=1e-5)
        shared, (mod,) = speed[name].replace(case.layer.base, [case.layer])
        assert prepared.weight_bytes > case.layer.factor.nbytes and mod.flops(3) > 0

    quality = peers.peers_with("quality")  # the quality benchmark's peers: no speed face, not providers
    assert {"rtn", "gptq", "sparsegpt", "wanda", "hqq", "torchao"} <= set(quality)
    assert all(quality[n].faces == ("quality",) and n not in peers.PROVIDERS for n in quality)
    W = torch.randn(8, 128)
    c = quality["rtn"].compress_weight(W, None, bits=8, group=64)
    assert c.weight.shape == W.shape and (c.weight - W).abs().max() < 0.02 * W.abs().max()
    assert c.nbytes < W.numel() * 4 / 3  # 8-bit values plus scales and zero points

    monkeypatch.setattr(peers, "PEERS", dict(peers.PEERS))
    monkeypatch.setattr(peers, "PROVIDERS", dict(registry.PROVIDERS))

    @peers.register_peer
    class Halves(peers.Peer):  # a new peer with only the quality face is one subclass
        name = "halves_test"
        quality_settings = (dict(),)

        def compress_weight(self, W, stats):
            from fips_kernels.bench.quantizers import Compressed

            return Compressed(W.half().float(), W.numel() * 2)

    assert peers.PEERS["halves_test"].faces == ("quality",)
    assert "halves_test" in peers.peers_with("quality") and "halves_test" not in peers.PROVIDERS


def test_cli_summary_names_skipped_providers_once(tiny_run):
    """`fips-kernels bench --tiny`: no table line of dashes only; each skipped provider once, with its reasons."""
    rows, stdout = tiny_run
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("speed-up over dense"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("skipped"))
    table = [line for line in lines[start + 2:end] if line.strip()]
    assert table and not any(set(line.split()[-3:]) == {"-"} for line in table)
    never_ran = {r["provider"] for r in rows} - {r["provider"] for r in rows if r["status"] == "ok"}
    listed = [line.split()[0] for line in lines[end + 1:] if line.startswith("  ")]
    assert sorted(set(listed) & never_ran) == sorted(never_ran) and len(listed) == len(set(listed))
    assert len(lines) < 130  # it was ~230 with a line of dashes per skipped provider and point
