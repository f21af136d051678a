"""``fips-kernels compress timm:NAME --no-pretrained`` as a user runs it: random weights drawn from
``--seed``, built for ``--input-size``, resumed after an interrupt, and the same under torchrun with
two processes. timm's ``test_vit`` (6 blocks, width 64) at 32x32 pixels keeps each run to seconds."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fips_kernels as fk
from fips_kernels import cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = "timm:test_vit"
RUN = ["--no-pretrained", "--input-size", "32", "--steps", "4", "--batch-size", "4", "--group-size", "2",
       "--no-progress", "--threads", "1"]

pytest.importorskip("timm", reason="timm is not installed")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("FIPS_KERNELS_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: the CPU evaluation on the reference backend
    return env


def _compress(*args, launcher=(), timeout=300):
    return subprocess.run([sys.executable, *launcher, "-m", "fips_kernels.cli", "compress", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a, b):
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(autouse=True)
def _in_process_like_a_user():
    old = torch.get_num_threads()
    try:
        with fk.use_backend("reference"):  # not the Triton interpreter the test session turns on
            yield
    finally:
        torch.set_num_threads(old)  # the in-process runs set --threads 1


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def reference_run(images, tmp_path_factory):
    """One uninterrupted single-process run, seed 0: the checkpoint the other runs must equal."""
    out = tmp_path_factory.mktemp("reference") / "ref.safetensors"
    proc = _compress(MODEL, "--data", str(images), "--out", str(out), *RUN)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return out, proc


def test_random_weights_follow_the_seed(images, reference_run, tmp_path):
    out, first = reference_run
    assert "img_size=32" in first.stdout  # the rebuild hint builds the model for the input size
    again = _compress(MODEL, "--data", str(images), "--out", str(tmp_path / "again.safetensors"), *RUN)
    assert again.returncode == 0, again.stderr
    assert _same(out, tmp_path / "again.safetensors")
    assert cli.main(["compress", MODEL, "--data", str(images), "--out", str(tmp_path / "seed1.safetensors"), *RUN,
                     "--seed", "1"]) == 0
    assert not _same(out, tmp_path / "seed1.safetensors")


def test_an_interrupted_random_weight_run_resumes(images, reference_run, tmp_path, monkeypatch, capsys):
    """Interrupted (Ctrl-C) in its last group, then --resume: the same checkpoint as without the interrupt."""
    from fips_kernels.compress import api

    train_group = api.train_group

    def interrupted_in_group_2(model, spec, *a, **k):
        if spec.index == 2:
            raise KeyboardInterrupt
        return train_group(model, spec, *a, **k)

    out = tmp_path / "m.safetensors"
    args = ["compress", MODEL, "--data", str(images), "--out", str(out), *RUN]
    monkeypatch.setattr(api, "train_group", interrupted_in_group_2)
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert "the 2 finished groups are kept in" in err and "--resume" in err
    monkeypatch.setattr(api, "train_group", train_group)
    assert cli.main(args + ["--resume"]) == 0
    text = capsys.readouterr().out
    assert text.count("(resumed)") == 2
    assert _same(reference_run[0], out)


def test_two_processes_equal_one_with_random_weights(images, reference_run, tmp_path):
    pytest.importorskip("torch.distributed.run")
    out = tmp_path / "two.safetensors"
    proc = _compress(MODEL, "--data", str(images), "--out", str(out), *RUN,
                     launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert _same(reference_run[0], out)


def test_bad_input_size_is_one_line(images, capsys):
    proc = _compress(MODEL, "--data", str(images), "--no-pretrained", "--input-size", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fips-kernels compress: error: --input-size 0 is out of range: it must be >= 1 "
                                   "(pixels)")
    assert cli.main(["compress", MODEL, "--data", str(images), "--no-pretrained", "--input-size", "8"]) == 2
    assert "timm model 'test_vit' does not run on 8x8 images" in capsys.readouterr().err  # smaller than a patch


def test_timm_messages(images, capsys):
    assert cli.main(["compress", "timm:test_vitt", "--no-pretrained", "--data", str(images)]) == 2
    err = capsys.readouterr().err
    assert "unknown timm model 'test_vitt'; did you mean test_vit" in err and "pretrained" not in err
    assert cli.main(["compress", "timm:test_resnet", "--no-pretrained", "--input-size", "32",
                     "--data", str(images)]) == 2
    assert "takes no image size; drop --input-size" in capsys.readouterr().err
