"""The ``fips-kernels`` command: ``info`` and argument errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fips_kernels
from fips_kernels import dispatch
from fips_kernels.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=120, **env_vars):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FIPS_KERNELS_BACKEND", None)
    env.update(env_vars)
    return subprocess.run([sys.executable, "-m", "fips_kernels.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_info_names_versions_and_backends():
    proc = _cli("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"fips-kernels {fips_kernels.__version__}" in out
    assert f"torch {torch.__version__}" in out and "triton" in out
    assert "CUDA extension (fips_kernels._C):" in out
    for name in dispatch.backend_names():
        assert name in out
    for fmt in ("[bitmap]", "[nm]", "[dense]", "[csr]"):
        assert fmt in out
    assert "runs" in out and "Traceback" not in proc.stderr
    if not torch.cuda.is_available():
        assert "GPU: none" in out
        assert "input is on cpu, not a cuda device" in out  # the cuda backend says why it cannot run


def test_info_in_process(capsys):
    assert main(["info", "--device", "cpu", "--dtype", "fp16", "--m", "16"]) == 0
    out = capsys.readouterr().out
    assert "M=16, fp16 on cpu" in out
    assert "reference  runs" in out or "runs" in out


@pytest.mark.parametrize("argv, words", [
    (["bench", "--presets", "nope"], "unknown preset 'nope'"),
    (["bench", "--patterns", "3:7"], "unknown pattern"),
    (["bench", "--providers", "fips,nope"], "unknown provider 'nope'"),
    (["bench", "--dtype", "int8"], "unknown dtype"),
    (["bench", "--device", "cpu", "--dtype", "bf16"], "bf16"),
    (["bench", "--m", "0"], "positive"),
    (["bench", "--m", "one"], "integers"),
    (["bench", "--device", "tpu"], "device"),
    (["bench", "--device", "cpu", "--reps", "0"], "--reps"),
    (["info", "--dtype", "int4"], "unknown dtype"),
    (["info", "--device", "tpu"], "device"),
])
def test_bad_arguments_exit_nonzero_with_a_message(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "error" in err


@pytest.mark.parametrize("argv", [["bench", "--bogus"], ["frobnicate"], ["bench", "--rep-ms", "x"]])
def test_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_bad_argument_in_a_subprocess_has_no_traceback():
    proc = _cli("bench", "--providers", "nope")
    assert proc.returncode == 2
    assert "unknown provider 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("deit-b", "swin-l-s3", "llama3-8b", "semi_structured_24", "csr_rebuild", "two_gemm"):
        assert name in out
    assert "r=1365" in out  # DeiT-B unstructured at p = 0.5 (DESIGN §1)


def test_version():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"fips-kernels {fips_kernels.__version__}"


def test_info_shows_what_a_forced_backend_does():
    """Forced and unable to run: the error a call raises, with its reasons, for every sample; forced and
    able: that backend runs, whatever the priority order says."""
    cannot = _cli("info", "--device", "cpu", FIPS_KERNELS_BACKEND="cuda")
    assert cannot.returncode == 0, cannot.stderr
    assert cannot.stdout.count("error: a call raises BackendUnavailable: backend 'cuda' was forced but cannot "
                               "run expand") == 4
    assert "input is on cpu, not a cuda device" in cannot.stdout and "runs (forced)" not in cannot.stdout
    forced = _cli("info", "--device", "cpu", FIPS_KERNELS_BACKEND="reference")
    assert forced.stdout.count("reference  runs (forced)") == 4 and "error" not in forced.stdout
    assert "Traceback" not in cannot.stderr + forced.stderr


def test_info_follows_use_backend_and_names_a_bad_variable(capsys, monkeypatch):
    with dispatch.use_backend("cuda"):
        assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "(forced: cuda)" in out and out.count("error: a call raises BackendUnavailable") == 4
    monkeypatch.setenv("FIPS_KERNELS_BACKEND", "nope")
    assert main(["info", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("FIPS_KERNELS_BACKEND='nope' is not a backend") == 5  # header + samples
