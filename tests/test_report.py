"""benchmarks/report.py on SYNTHETIC CSVs written into a tmp dir by this test.

The values below are made up (random numbers under a GPU name that says so);
they exist only inside the test's tmp dir and are never committed. The checks:
every table cell is the value of the CSV row it stands for, every table names
its CSV, the plots are written, CPU CSVs are ignored, and without a GPU CSV
the report holds no numbers.
"""
import csv
import importlib.util
import json
import random
import re
from pathlib import Path

import pytest

from fips_kernels.bench.e2e import E2E_COLUMNS, E2E_ROLES
from fips_kernels.bench.group import GROUP_PROVIDERS
from fips_kernels.bench.layer import COLUMNS
from fips_kernels.bench.providers import PROVIDERS

ROOT = Path(__file__).resolve().parents[1]
GPU = "SYNTHETIC TEST GPU (made-up numbers)"
SLUG = "SYNTHETIC_TEST_GPU_made-up_numbers"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_MPL = importlib.util.find_spec("matplotlib") is not None  # the test extra installs it; a GPU box may not


def _load_report():
    spec = importlib.util.spec_from_file_location("fips_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _load_report()


def _meta(device="cuda", gpu=GPU, date="2000-01-02T03:04:05Z"):
    return {"device": device, "gpu_name": gpu if device == "cuda" else "none", "driver": "000.00-synthetic",
            "torch": "0.0.0-synthetic", "triton": "0.0.0-synthetic", "cuda": "0.0-synthetic", "date": date,
            "commit": "deadbee-synthetic"}


def _g(x):
    return f"{x:.6g}"


def synthetic_layer_rows(device="cuda", seed=0):
    rnd = random.Random(seed)
    rows = []
    providers = ("dense", "fips", "triton_factored", "cuda_factored", "two_gemm", "csr_rebuild", "semi_structured_24")
    for preset, d, h in (("deit-b", 768, 3072), ("llama3-8b", 4096, 14336)):
        for pattern in ("unstructured", "1:4", "2:4"):
            for kind in ("expand", "contract", "group"):
                provs = ("dense", "fips", "fips_gate_up", "two_gemm") if kind == "group" else providers
                for M in (1, 16, 256, 4096):
                    dense_t = rnd.uniform(0.01, 2.0)
                    for prov in provs:
                        registry = GROUP_PROVIDERS if kind == "group" else PROVIDERS
                        row = dict(_meta(device), preset=preset, d=d, h=h, r=1365, kind=kind, layer="fc1",
                                   pattern=pattern, format="nm", dtype="fp16", M=M, provider=prov,
                                   role=registry[prov].role,
                                   backend="triton" if prov.startswith(("fips", "triton")) else "torch",
                                   bandwidth_GBps="1234.7", peak_TFLOPs="543.21")
                        skip = (prov == "semi_structured_24" and pattern != "2:4") or \
                            (prov == "fips_gate_up" and preset == "deit-b")
                        if skip:
                            row.update(status="skipped", reason="synthetic reason: cannot run here")
                        elif prov == "csr_rebuild" and M == 4096:
                            row.update(status="failed", reason="running failed: synthetic error")
                        else:
                            t = dense_t if prov == "dense" else rnd.uniform(0.01, 2.0)
                            row.update(status="ok", reason="WARNING: rel_err synthetic" if (prov == "fips" and M == 16
                                                                                            and kind == "contract") else "",
                                       time_ms=_g(t), bytes=rnd.randint(10 ** 6, 10 ** 9), flops=rnd.randint(1, 10 ** 12),
                                       roofline_ms=_g(t * 0.5), frac_of_roofline=_g(rnd.uniform(0.05, 1.0)),
                                       speedup_vs_dense=_g(dense_t / t), compressed_ratio=_g(rnd.uniform(0.5, 2)))
                        rows.append(row)
    return rows


def synthetic_e2e_rows(device="cuda", seed=1, date="2000-01-02T03:04:05Z", modes=("eager", "cudagraph"),
                       status_override=None):
    rnd = random.Random(seed)
    rows = []
    for model, unit, task, batches in (("deit-b", "images/s", "images", (1, 8, 64, 256)),
                                       ("llama3-8b-mlp", "tokens/s", "decode", (1, 4, 16, 64))):
        for dtype in ("fp16", "bf16"):
            for mode in modes:
                for prov, pattern in (("dense", "none"), ("fips", "1:4"), ("fips", "2:4"), ("two_gemm", "1:4"),
                                      ("semi_structured_24", "1:4"), ("semi_structured_24", "2:4")):
                    wb = rnd.randint(10 ** 8, 10 ** 9)
                    for b in batches:
                        row = dict(_meta(device, date=date), model=model, arch="synthetic", task=task, provider=prov,
                                   role=E2E_ROLES[prov],
                                   pattern=pattern, format="nm", dtype=dtype, mode=mode, batch=b, unit=unit,
                                   weight_bytes=wb, mlp_weight_bytes=wb // 2,
                                   weight_ratio_vs_dense=_g(rnd.uniform(0.5, 1)),
                                   mlp_weight_ratio_vs_dense=_g(rnd.uniform(0.4, 0.7)), ranks="1365 1365")
                        if prov == "semi_structured_24" and pattern != "2:4":
                            row.update(status="skipped", reason="synthetic: needs 2:4", weight_bytes="",
                                       mlp_weight_bytes="", weight_ratio_vs_dense="", mlp_weight_ratio_vs_dense="")
                        else:
                            t = rnd.uniform(0.1, 50)
                            row.update(status="ok", time_ms=_g(t), throughput=_g(b / (t * 1e-3)),
                                       speedup_vs_dense=_g(rnd.uniform(0.5, 2)),
                                       run_peak_bytes=rnd.randint(10 ** 8, 10 ** 10))
                            if task == "decode":
                                row.update(bytes=wb, roofline_ms=_g(t / 2), frac_of_roofline=_g(rnd.uniform(0.1, 1)),
                                           bandwidth_GBps="1234.5")
                        if status_override:
                            row.update(status_override)
                        rows.append(row)
    return rows


def _write(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
    return path


def _tables(md):
    """{marker: (caption, header, rows)} of every table the report marks."""
    out = {}
    lines = md.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"<!-- table: (.*) -->", line)
        if not m:
            continue
        caption = lines[i + 1]
        j = i + 2
        while not lines[j].startswith("|"):
            j += 1
        header = [c.strip() for c in lines[j].strip("|").split("|")]
        body = []
        j += 2
        while j < len(lines) and lines[j].startswith("|"):
            body.append([c.strip() for c in re.split(r"(?<!\\)\|", lines[j].strip().strip("|"))])
            j += 1
        out[m.group(1)] = (caption, header, body)
    return out


def _expected_cell(row, value):
    if row is None or row["status"] == "skipped":
        return "–"
    if row["status"] == "failed":
        return "✗"
    return value + ("!" if "WARNING" in row["reason"] else "")


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    results = tmp_path / "results"
    results.mkdir()
    layer_rows = synthetic_layer_rows()
    e2e_rows = synthetic_e2e_rows()
    _write(results / "layer_SYNTHETIC_20000102T030405Z.csv", COLUMNS, layer_rows)
    _write(results / "e2e_SYNTHETIC_20000102T030405Z.csv", E2E_COLUMNS, e2e_rows)
    _write(results / "fips_bench_cpu_x.csv", COLUMNS, synthetic_layer_rows(device="cpu"))  # must be ignored
    out = tmp_path / "BENCHMARKS.md"
    info = report.build(results, out, tmp_path / "plots", plots_enabled=HAS_MPL)
    return info, out.read_text(), layer_rows, e2e_rows


def test_layer_tables_carry_the_csv_values(gpu_results):
    info, md, rows, _ = gpu_results
    tables = _tables(md)
    checked = 0
    for preset in ("deit-b", "llama3-8b"):
        for kind in ("expand", "contract", "group"):
            for tag, column, fmt in (("speedup", "speedup_vs_dense", lambda v: f"{float(v):.2f}"),
                                     ("roofline", "frac_of_roofline", lambda v: f"{100 * float(v):.0f}%")):
                caption, header, body = tables[f"layer-{tag} gpu={SLUG} preset={preset} kind={kind}"]
                assert "layer_SYNTHETIC_20000102T030405Z.csv" in caption
                ms = [int(h[2:]) for h in header[3:]]
                assert ms == [1, 16, 256, 4096]
                for line in body:
                    pattern, provider = line[0], line[1]
                    if provider.startswith("↳"):
                        continue
                    for M, got in zip(ms, line[3:]):
                        match = [r for r in rows if (r["preset"], r["kind"], r["pattern"], r["provider"], r["M"])
                                 == (preset, kind, pattern, provider, M)]
                        assert len(match) == 1
                        r = match[0]
                        assert line[2] == r["role"]  # read from the CSV: cuda_factored is ours, not a peer
                        want = _expected_cell(r, fmt(r[column]) if r["status"] == "ok" else "")
                        assert got == want, (preset, kind, pattern, provider, M, got, want)
                        checked += 1
                # every provider of the CSV has its line: ours next to the peers and the baseline
                provs = {line[1] for line in body}
                assert provs >= {r["provider"] for r in rows if (r["preset"], r["kind"]) == (preset, kind)}
    assert checked > 500


def test_layer_metadata_and_dense_times(gpu_results):
    _, md, rows, _ = gpu_results
    for value in (GPU, "000.00-synthetic", "0.0.0-synthetic", "0.0-synthetic", "2000-01-02T03:04:05Z",
                  "deadbee-synthetic", "1235", "543"):
        assert value in md, value
    caption, header, body = _tables(md)[f"layer-dense-time gpu={SLUG} preset=deit-b"]
    assert "layer_SYNTHETIC_20000102T030405Z.csv" in caption
    for line in body:
        kind, pattern = line[0], line[1]
        for M, got in zip((1, 16, 256, 4096), line[2:]):
            r = next(r for r in rows if (r["preset"], r["kind"], r["pattern"], r["provider"], r["M"])
                     == ("deit-b", kind, pattern, "dense", M))
            assert got == f"{float(r['time_ms']):.3g}"


def test_e2e_tables_carry_the_csv_values(gpu_results):
    _, md, _, rows = gpu_results
    tables = _tables(md)
    for model in ("deit-b", "llama3-8b-mlp"):
        caption, header, body = tables[f"e2e-weights gpu={SLUG} model={model}"]
        assert "e2e_SYNTHETIC_20000102T030405Z.csv" in caption
        for line in body:
            dtype, provider, pattern = line[:3]
            r = next(r for r in rows if (r["model"], r["dtype"], r["provider"], r["pattern"]) ==
                     (model, dtype, provider, pattern) and r["weight_bytes"] != "")
            assert line[4] == f"{r['weight_bytes'] / 2 ** 20:.1f}"
            assert line[5] == f"{float(r['weight_ratio_vs_dense']):.2f}"
            assert line[7] == f"{float(r['mlp_weight_ratio_vs_dense']):.2f}"
        for dtype in ("fp16", "bf16"):
            for mode in ("eager", "cudagraph"):
                caption, header, body = tables[f"e2e-throughput gpu={SLUG} model={model} dtype={dtype} mode={mode}"]
                assert "e2e_SYNTHETIC_20000102T030405Z.csv" in caption
                batches = [int(h.split()[1]) for h in header[3:]]
                assert len(body) == 6
                for line in body:
                    for b, got in zip(batches, line[3:]):
                        r = next(r for r in rows if (r["model"], r["dtype"], r["mode"], r["provider"], r["pattern"],
                                                     r["batch"]) == (model, dtype, mode, line[0], line[1], b))
                        if r["status"] != "ok":
                            assert got == "–"
                            continue
                        x = float(r["throughput"])
                        rate = f"{x:.0f}" if x >= 100 else f"{x:.3g}"
                        assert got == f"{rate} ({float(r['speedup_vs_dense']):.2f}×)"
            caption, header, body = tables[f"e2e-peak gpu={SLUG} model={model} dtype={dtype}"]
            for line in body:
                for b, got in zip([int(h.split()[1]) for h in header[3:]], line[3:]):
                    r = next(r for r in rows if (r["model"], r["dtype"], r["mode"], r["provider"], r["pattern"],
                                                 r["batch"]) == (model, dtype, line[0], line[1], line[2], b))
                    assert got == ("–" if r["status"] != "ok" else f"{r['run_peak_bytes'] / 2 ** 20:.1f}")
    assert f"e2e-roofline gpu={SLUG} model=llama3-8b-mlp dtype=fp16" in tables
    assert f"e2e-roofline gpu={SLUG} model=deit-b dtype=fp16" not in tables


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed (pip install -e .[test])")
def test_plots_are_written_and_linked(gpu_results):
    info, md, _, _ = gpu_results
    tmp_path = info["out"].parent
    plots = info["plots"]
    # per layer preset: speed-up and bandwidth; per e2e model: speed-up
    assert len(plots) == 2 * 2 + 2
    for path in plots:
        assert path.exists() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert f"]({Path('plots') / path.name})" in md
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {p.name for p in plots}


def test_cpu_csvs_are_ignored(gpu_results):
    info, md, _, _ = gpu_results
    assert [p.name for p, _ in info["ignored"]] == ["fips_bench_cpu_x.csv"]
    assert "fips_bench_cpu_x.csv" in md and "no GPU rows" in md


def test_e2e_files_merge_ok_rows_first(tmp_path):
    """A point measured in two e2e files: the ok row wins over a skipped one, then the newer."""
    results = tmp_path / "results"
    results.mkdir()
    older = synthetic_e2e_rows(seed=2, date="2000-01-01T00:00:00Z", modes=("eager", "compile"))
    newer = synthetic_e2e_rows(seed=3, date="2000-01-03T00:00:00Z", modes=("compile",),
                               status_override={"status": "skipped", "reason": "not run: the time budget"})
    _write(results / "e2e_old.csv", E2E_COLUMNS, older)
    _write(results / "e2e_new.csv", E2E_COLUMNS, newer)
    rows = report.merge_e2e([report.CsvFile(results / "e2e_old.csv",
                                            list(csv.DictReader(open(results / "e2e_old.csv"))), "e2e"),
                             report.CsvFile(results / "e2e_new.csv",
                                            list(csv.DictReader(open(results / "e2e_new.csv"))), "e2e")])
    compile_rows = [r for r in rows if r["mode"] == "compile" and r["provider"] == "fips"]
    assert compile_rows and all(r["_file"] == "e2e_old.csv" and r["status"] == "ok" for r in compile_rows)
    info = report.build(results, tmp_path / "B.md", tmp_path / "plots", plots_enabled=False)
    md = (tmp_path / "B.md").read_text()
    assert ".png" not in md
    caption = _tables(md)[f"e2e-throughput gpu={SLUG} model=deit-b dtype=fp16 mode=compile"][0]
    assert "e2e_old.csv" in caption
    assert info["e2e"]


def test_without_a_gpu_csv_the_report_has_no_numbers(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _write(results / "fips_bench_cpu_x.csv", COLUMNS, synthetic_layer_rows(device="cpu"))
    _write(results / "fips_bench_e2e_cpu_x.csv", E2E_COLUMNS, synthetic_e2e_rows(device="cpu"))
    out = tmp_path / "BENCHMARKS.md"
    info = report.build(results, out, tmp_path / "plots", plots_enabled=HAS_MPL)
    md = out.read_text()
    assert info["gpus"] == [] and info["plots"] == []
    assert "No GPU results yet" in md
    assert "|---" not in md and "<!-- table" not in md and ".png" not in md
    # no measured quantity: no number followed by a unit of time, rate, size or a percentage
    assert not re.search(UNITS, md), re.search(UNITS, md)
    assert not (tmp_path / "plots").exists() or not list((tmp_path / "plots").iterdir())


UNITS = r"\d\s*(?:ms|s\b|µs|us\b|GB/s|TB/s|TFLOP|GiB|MiB|MB|images/s|tokens/s|%|×)"


def test_committed_report_matches_the_committed_results():
    """BENCHMARKS.md names every committed GPU CSV; with none, it says so and holds no numbers."""
    committed = ROOT / "BENCHMARKS.md"
    assert committed.exists(), "run python3 benchmarks/report.py"
    md = committed.read_text()
    files, _ = report.load_csvs(ROOT / "benchmarks" / "results")
    if not files:
        assert "No GPU results yet" in md
        assert not re.search(UNITS, md) and "|---" not in md
    for cf in files:
        assert cf.path.name in md, "BENCHMARKS.md is stale: rebuild it (python3 benchmarks/report.py)"


def test_import_places_files(tmp_path):
    src = tmp_path / "gpu-check-out"
    src.mkdir()
    _write(src / "layer_SYNTHETIC_1.csv", COLUMNS, synthetic_layer_rows())
    _write(src / "e2e_SYNTHETIC_1.csv", E2E_COLUMNS, synthetic_e2e_rows())
    _write(src / "fips_bench_cpu_1.csv", COLUMNS, synthetic_layer_rows(device="cpu"))
    (src / "bench.log").write_text("log\n")
    data = {"machine_info": {"system": "Linux", "python_implementation": "CPython", "python_version": "3.10.12"},
            "benchmarks": [{"name": "test_layer_point[x]", "extra_info": {"gpu_name": GPU, "device": "cuda"}}],
            "datetime": "2000-01-02T03:04:05", "commit_info": {"id": "deadbeef"}}
    (src / "pytest-benchmark_SYNTHETIC_1.json").write_text(json.dumps(data))
    cpu = dict(data, benchmarks=[{"name": "t", "extra_info": {"gpu_name": "none", "device": "cpu"}}])
    (src / "pytest-benchmark_cpu.json").write_text(json.dumps(cpu))  # a CPU run: not imported
    results = tmp_path / "results"
    written = report.import_run(src, results, log=lambda s: None)
    names = sorted(p.relative_to(results).as_posix() for p in written)
    assert names == ["e2e_SYNTHETIC_1.csv", "layer_SYNTHETIC_1.csv",
                     "pytest-benchmark/Linux-CPython-3.10-64bit/0001_SYNTHETIC_1.json"]
    again = report.import_run(src, results, log=lambda s: None)  # a second run is numbered after the first
    assert any(p.name == "0002_SYNTHETIC_1.json" for p in again)
    assert report.main(["--results", str(results), "--out", str(tmp_path / "B.md"),
                        "--plots", str(tmp_path / "plots"), "--no-plots"]) == 0
    md = (tmp_path / "B.md").read_text()
    assert "pytest-benchmark/Linux-CPython-3.10-64bit/0001_SYNTHETIC_1.json" in md


def test_roles_come_from_the_csv():
    """No rule on provider names: the role column decides, and a CSV without it says so."""
    rows = [{"provider": "cuda_factored", "role": "ours"}, {"provider": "dense", "role": "baseline"},
            {"provider": "fips_new_peer", "role": "peer"}, {"provider": "old", "role": ""}]
    roles = report.roles_of(rows)
    assert roles == {"cuda_factored": "ours", "dense": "baseline", "fips_new_peer": "peer", "old": "?"}
    assert report.sort_providers(["old", "fips_new_peer", "cuda_factored", "dense"], roles) == [
        "dense", "cuda_factored", "fips_new_peer", "old"]


def test_import_merges_tuned_configs_and_reports_tuned_rows_apart(tmp_path):
    """gpu-check.sh's tuned stage: its configs go into the package's table, its rows into a section of their own."""
    src = tmp_path / "gpu-check-out"
    src.mkdir()
    _write(src / "layer_SYNTHETIC_1.csv", COLUMNS, synthetic_layer_rows())
    _write(src / "layer-tuned_SYNTHETIC_1.csv", COLUMNS, synthetic_layer_rows(seed=5))
    entry = {"key": {"M_BUCKET": 16}, "config": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}}
    (src / "triton_configs_SYNTHETIC.json").write_text(json.dumps({"gpu": GPU, "source": "synthetic",
                                                                    "configs": [entry]}))
    table = tmp_path / "triton_configs.json"
    table.write_text(json.dumps({"default": {"source": "not measured", "configs": []}}))
    results = tmp_path / "results"
    report.import_run(src, results, log=lambda s: None, triton_configs=table)
    assert json.loads(table.read_text())[GPU]["configs"] == [entry]
    report.build(results, tmp_path / "B.md", tmp_path / "plots", plots_enabled=False)
    tables = _tables((tmp_path / "B.md").read_text())
    assert "layer_SYNTHETIC_1.csv" in tables[f"layer-speedup gpu={SLUG} preset=deit-b kind=expand"][0]
    assert "layer-tuned_SYNTHETIC_1.csv" in tables[f"layer-tuned-speedup gpu={SLUG} preset=deit-b kind=expand"][0]
