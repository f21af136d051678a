"""``fips-kernels compress``: a Hugging Face model directory and a text file, an
image folder, the built-in text, bad arguments."""
import json
import os

import pytest
import torch

import fips_kernels as fk
from fips_kernels import cli
from fips_kernels.compress import calibration

import compress_models as cm

WORDS = ("the a an of to in on and is was it that train river city music light water time people year day "
         "house school book food tree bird sun rain road car city night world work life story game place "
         "small large old new good long high first last many most some other").split()


pytestmark = pytest.mark.usefixtures("one_thread_reference")


@pytest.fixture
def bert_dir(tmp_path):
    """A tiny BERT saved like a sentence-transformers model (weights, tokenizer, mean pooling)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    d = tmp_path / "tiny-bert"
    d.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    tok.save_pretrained(str(d))
    model = cm.tiny_bert(layers=4)
    model.config.vocab_size = len(vocab)
    model.resize_token_embeddings(len(vocab))
    model.save_pretrained(str(d))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return d


def _text_file(path, n=36, seed=0):
    g = torch.Generator().manual_seed(seed)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(4, 12, (1,),
                                                                                      generator=g)),), generator=g))
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_compresses_a_hf_directory_and_writes_checkpoint_and_report(bert_dir, tmp_path, capsys):
    data = _text_file(tmp_path / "calib.txt")
    out = tmp_path / "out" / "tiny.safetensors"
    out.parent.mkdir()
    rc = cli.main(["compress", str(bert_dir), "--data", str(data), "--out", str(out), "--steps", "12",
                   "--prune-every", "4", "--batch-size", "6", "--group-size", "2", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "FiPS compression of tiny-bert (preset bert, unit block)" in text
    assert "sentence embedding (mean pooling)" in text and "token states" in text
    report = json.loads((tmp_path / "out" / "tiny.report.json").read_text())
    assert report["totals"]["reached"] <= 0.5 and len(report["groups"]) == 2
    assert report["calibration"]["train_samples"] + report["calibration"]["holdout_samples"] == 36
    assert report["checkpoint"]["path"] == str(out)
    assert not (tmp_path / "out" / "tiny.state").exists()  # removed after success
    from transformers import BertModel

    model = fk.load(out, BertModel.from_pretrained(str(bert_dir)))
    assert isinstance(model.encoder.layer[3].output.dense, fk.FiPSLinear)
    assert sum(isinstance(m, fk.FiPSLinear) for m in model.modules()) == 8


def test_cli_factor_dtype_fp16_writes_16bit_factors(bert_dir, tmp_path, capsys):
    data = _text_file(tmp_path / "calib.txt", n=24)
    reports = {}
    for dt in ("fp32", "fp16"):
        out = tmp_path / f"{dt}.safetensors"
        rc = cli.main(["compress", str(bert_dir), "--data", str(data), "--out", str(out), "--steps", "6",
                       "--prune-every", "3", "--batch-size", "6", "--group-size", "2", "--no-progress",
                       "--factor-dtype", dt])
        text = capsys.readouterr().out
        assert rc == 0, text
        assert ("factor dtype float16" in text) == (dt == "fp16")
        reports[dt] = json.loads((tmp_path / f"{dt}.report.json").read_text())
    assert reports["fp16"]["config"]["factor_dtype"] == "float16"
    assert reports["fp32"]["config"]["factor_dtype"] == "float32"
    t32, t16 = reports["fp32"]["totals"], reports["fp16"]["totals"]
    assert t16["parameters"] == t32["parameters"] and 0.5 < t16["bytes"] / t32["bytes"] < 0.6
    from transformers import BertModel

    model = fk.load(tmp_path / "fp16.safetensors", BertModel.from_pretrained(str(bert_dir)))
    layer = model.encoder.layer[3].output.dense
    assert isinstance(layer, fk.FiPSLinear) and layer.cast_input
    assert layer.U.dtype == layer.V_values.dtype == layer.bias.dtype == torch.float16
    assert model.embeddings.word_embeddings.weight.dtype == torch.float32
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    with torch.no_grad():
        assert model(input_ids=ids).last_hidden_state.dtype == torch.float32


def test_cli_factor_dtype_parses_and_refuses_bad_values(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["compress"]).factor_dtype is None  # fp32, or what --ratio chooses
    assert parser.parse_args(["compress", "--factor-dtype", "bf16"]).factor_dtype == "bf16"
    for bad in ("fp8", "float16", "int8"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["compress", "--factor-dtype", bad])
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_cli_resume_continues_from_the_state_directory(bert_dir, tmp_path, capsys):
    data = _text_file(tmp_path / "calib.txt", n=16)
    out = tmp_path / "m.safetensors"
    args = ["compress", str(bert_dir), "--data", str(data), "--out", str(out), "--steps", "4", "--group-size", "1",
            "--no-progress", "--keep-state"]
    assert cli.main(args) == 0
    first = json.loads((tmp_path / "m.report.json").read_text())
    assert sorted(os.listdir(tmp_path / "m.state")) == ["group_0000.safetensors", "group_0001.safetensors",
                                                         "group_0002.safetensors", "group_0003.safetensors",
                                                         "manifest.json"]
    os.remove(tmp_path / "m.state" / "group_0003.safetensors")  # as if the run had stopped in the last group
    assert cli.main(args + ["--resume"]) == 0
    second = json.loads((tmp_path / "m.report.json").read_text())
    assert [g["resumed"] for g in second["groups"]] == [True, True, True, False]
    assert [g["errors_final"] for g in second["groups"]] == [g["errors_final"] for g in first["groups"]]
    assert "(resumed)" in capsys.readouterr().out


def test_cli_refuses_bad_input(tmp_path, capsys):
    assert cli.main(["compress", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fips-kernels compress: error:") and "nope" in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["compress", str(tmp_path / "empty")]) == 2
    assert "without config.json" in capsys.readouterr().err
    assert cli.main(["compress", "--steps", "-3"]) == 2
    assert "--steps -3 is out of range" in capsys.readouterr().err


def test_cli_refuses_data_that_does_not_fit_the_model(bert_dir, tmp_path, capsys):
    assert cli.main(["compress", str(bert_dir), "--data", str(tmp_path)]) == 2
    assert "is a folder (images) but the model takes text" in capsys.readouterr().err
    assert cli.main(["compress", str(bert_dir), "--data", str(_text_file(tmp_path / "c.txt", n=8)),
                     "--pattern", "3:5", "--no-progress"]) == 2
    assert "m must be one of 2, 4, 8, 16" in capsys.readouterr().err
    assert cli.main(["compress", str(bert_dir), "--blocks", r"encoder\.layer\.\d+"]) == 2
    assert "--blocks needs --linears" in capsys.readouterr().err


def test_cli_lists_compress_and_keeps_the_other_commands():
    parser = cli.build_parser()
    names = parser._subparsers._group_actions[0].choices
    assert {"bench", "info", "compress"} <= set(names)
    args = parser.parse_args(["compress"])
    # budget 0.5 and unstructured unless --ratio chooses (None: not given)
    assert args.model is None and args.budget is None and args.pattern is None and args.ratio is None


def test_image_folder_batches(tmp_path):
    pytest.importorskip("timm", reason="timm is not installed")
    PIL = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = (torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()
            PIL.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    model = cm.tiny_vit()
    batches = calibration.image_folder_batches(tmp_path, model=model, batch_size=4, input_size=32)
    assert [b.shape for b in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    picked = calibration.image_folder_batches(tmp_path, model=model, num_samples=3, input_size=32, seed=1)
    assert sum(b.shape[0] for b in picked) == 3
    with pytest.raises(calibration.CalibrationError, match="no such image folder"):
        calibration.image_folder_batches(tmp_path / "a" / "0.png")
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "x.txt").write_text("x")
    with pytest.raises(calibration.CalibrationError, match="no image files"):
        calibration.image_folder_batches(tmp_path / "text_only")
    model, report = fk.compress(model, calib_data=batches, group_size=4, steps=4, progress=False, holdout=1)
    assert report.calibration == {"train_batches": 1, "train_samples": 4, "holdout_batches": 1,
                                  "holdout_samples": 2}


def test_text_helpers(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first line\n\n  second line  \nthird\n")
    assert calibration.read_text_file(path) == ["first line", "second line", "third"]
    assert calibration.read_text_file(path, limit=2) == ["first line", "second line"]
    with pytest.raises(calibration.CalibrationError, match="no such text file"):
        calibration.read_text_file(tmp_path / "missing.txt")
    texts = calibration.builtin_texts()
    assert len(texts) >= 200 and len(set(texts)) == len(texts)


def test_cli_ratio_reaches_the_byte_target_and_says_what_it_chose(bert_dir, tmp_path, capsys):
    data = _text_file(tmp_path / "calib.txt", n=24)
    out = tmp_path / "r.safetensors"
    rc = cli.main(["compress", str(bert_dir), "--data", str(data), "--out", str(out), "--ratio", "3", "--steps", "4",
                   "--finetune-steps", "2", "--prune-every", "2", "--group-size", "2", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads((tmp_path / "r.report.json").read_text())
    assert report["totals"]["bytes"] <= report["totals"]["dense_bytes"] / 3
    assert report["config"]["ratio"] == 3 and "target ratio 3" in report["config"]["plan"]
    assert "--ratio 3 chose:" in text and "then 2 end-to-end steps" in text


def test_cli_ratio_errors(bert_dir, tmp_path, capsys):
    data = _text_file(tmp_path / "calib.txt", n=16)
    for extra, message in ((["--ratio", "3", "--budget", "0.4"], "not both"), (["--ratio", "0.5"], "out of range"),
                           (["--ratio", "100000"], "out of reach"), (["--finetune-steps", "-1"], "out of range")):
        rc = cli.main(["compress", str(bert_dir), "--data", str(data), "--out", str(tmp_path / "x.safetensors"),
                       "--steps", "2", "--no-progress", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)


def _cli_subprocess(*args, timeout=300):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FIPS_KERNELS_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: the CPU evaluation on the reference backend
    return subprocess.run([sys.executable, "-m", "fips_kernels.cli", "compress", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def no_model_loading(monkeypatch):
    """The checks under test must refuse before any model is loaded."""
    from fips_kernels.compress import command

    def load_model(*a, **k):
        raise AssertionError("the model was loaded before the bad argument was refused")

    monkeypatch.setattr(command, "load_model", load_model)


@pytest.mark.parametrize("argv, words", [
    (["--out", "{tmp}"], "--out {tmp} is a folder that is neither empty nor a FiPS model directory; give a new "
                         "or empty folder (or a .safetensors file)"),
    (["--out", "{tmp}/missing/new/"], "--out {tmp}/missing/new/: the folder {tmp}/missing does not exist"),
    (["--out", "{tmp}/file.txt"], "--out {tmp}/file.txt is a file; a path without .safetensors names a model "
                                  "directory to write"),
    (["--out", "{tmp}/missing/m.safetensors"], "the folder {tmp}/missing does not exist; create it first"),
    (["--out", "{tmp}/file.txt/m.safetensors"], "{tmp}/file.txt is a file, not a folder"),
    (["--out", "{tmp}/m.safetensors", "--report", "{tmp}"], "--report {tmp} is a folder"),
    (["--out", "{tmp}/m.safetensors", "--state-dir", "{tmp}/file.txt"], "the state folder {tmp}/file.txt is a file"),
    (["--out", "{tmp}/m.safetensors", "--state-dir", "{tmp}/file.txt/state"], "{tmp}/file.txt is a file"),
    (["--out", "{tmp}/m.safetensors", "--data", "{tmp}/m.safetensors"], "--out {tmp}/m.safetensors is also the "
                                                                        "--data path"),
    (["--out", "{tmp}/m.safetensors", "--report", "{tmp}/m.safetensors"], "--report {tmp}/m.safetensors is also "
                                                                          "the --out path"),
])
def test_bad_outputs_are_refused_before_the_model_is_loaded(argv, words, tmp_path, no_model_loading, capsys):
    (tmp_path / "file.txt").write_text("x")
    tmp = str(tmp_path)
    assert cli.main(["compress", *[a.format(tmp=tmp) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fips-kernels compress: error:") and words.format(tmp=tmp) in err, err


@pytest.mark.parametrize("argv, words", [
    (["--steps", "-3"], "--steps -3 is out of range: it must be >= 0"),
    (["--budget", "1.5"], "--budget 1.5 is out of range: it must be in (0, 1]"),
    (["--holdout", "1"], "--holdout 1.0 is out of range: it must be in [0, 1)"),
    (["--num-samples", "1"], "--num-samples 1 is out of range: it must be >= 2"),
    (["--prune-every", "0"], "--prune-every 0 is out of range: it must be >= 1"),
    (["--threads", "0"], "--threads 0 is out of range: it must be >= 1"),
    (["--input-size", "32"], "--input-size is for timm image models; all-MiniLM-L6-v2 is a Hugging Face model"),
    (["--no-pretrained"], "--no-pretrained is for timm image models"),
    (["--device", "tpu"], "--device 'tpu' is not a device; use cpu or cuda"),
    (["--blocks", "(", "--linears", "mlp.fc1:expand"], "preset 'custom': blocks='(' is not a regular expression"),
])
def test_bad_arguments_say_what_is_allowed(argv, words, tmp_path, no_model_loading, capsys):
    assert cli.main(["compress", "--out", str(tmp_path / "m.safetensors"), *argv]) == 2
    assert words in capsys.readouterr().err


def test_an_existing_folder_as_out_is_one_line_in_a_subprocess(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model directory")  # never overwritten
    proc = _cli_subprocess("--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fips-kernels compress: error: --out {tmp_path} is a folder that is neither empty nor a FiPS model "
        f"directory; give a new or empty folder (or a .safetensors file)"]


def test_short_runs_prune_gradually_and_an_explicit_jump_is_warned(capsys):
    from types import SimpleNamespace

    from fips_kernels.compress.command import prune_every

    args = SimpleNamespace(pattern="unstructured", pruning="gmp")
    assert prune_every(None, 600, args, print) == 50 and prune_every(None, 200, args, print) == 50
    assert capsys.readouterr().out == ""  # the defaults the measured runs used are unchanged
    assert prune_every(None, 20, args, print) == 5  # pruning ends at step 15: masks at 0, 5, 10, 15
    assert "masks updated every 5 steps instead of every 50 steps" in capsys.readouterr().out
    assert prune_every(50, 20, args, print) == 50
    err = capsys.readouterr().err
    assert "warning: --prune-every 50 with --steps 20" in err and "jumps from dense to final" in err
    assert prune_every(5, 20, args, print) == 5 and capsys.readouterr().err == ""


def test_a_run_says_what_it_did(bert_dir, tmp_path):
    """--no-progress silences the loading bars too; the real group size; the report's losses named."""
    data = _text_file(tmp_path / "calib.txt", n=16)
    out = tmp_path / "m.safetensors"
    proc = _cli_subprocess(str(bert_dir), "--data", str(data), "--out", str(out), "--steps", "3", "--group-size",
                           "100", "--prune-every", "50", "--no-progress", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "groups of 4 (group size 100; a group ends with its stage)" in proc.stdout
    assert "Loading weights" not in proc.stderr and "it/s]" not in proc.stderr  # transformers' bar
    assert ("warning: --prune-every 50 with --steps 3: the masks change only at step 0 and when pruning ends "
            "(step 2), so the sparsity jumps from dense to final in one step; --prune-every 1 prunes gradually"
            ) in proc.stderr.splitlines()
    group = json.loads((tmp_path / "m.report.json").read_text())["groups"][0]
    assert {"train_loss_first_step", "train_loss_last_step"} <= set(group) and "loss_first" not in group
    legend = json.loads((tmp_path / "m.report.json").read_text())["legend"]
    assert "before any update" in legend["train_loss_first_step"]


def test_a_failure_after_training_says_how_to_resume(bert_dir, tmp_path, monkeypatch, capsys):
    from fips_kernels import io

    data = _text_file(tmp_path / "calib.txt", n=16)
    out = tmp_path / "m.safetensors"
    args = ["compress", str(bert_dir), "--data", str(data), "--out", str(out), "--steps", "2", "--group-size", "2",
            "--no-progress", "--resume"]

    def disk_full(model, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "save", disk_full)
    assert cli.main(args) == 1
    captured = capsys.readouterr()
    assert f"--resume: no earlier run in {tmp_path / 'm.state'}; starting fresh" in captured.out
    assert (f"fips-kernels compress: error: writing {out} or {tmp_path / 'm.report.json'} failed (OSError: "
            f"[Errno 28] No space left on device); the 2 finished groups are kept in {tmp_path / 'm.state'}: run "
            f"the same command with --resume") in captured.err
    monkeypatch.undo()
    assert cli.main(args) == 0
    assert capsys.readouterr().out.count("(resumed)") == 2 and out.exists()


def test_the_built_in_recipe_trains_high_ratios_longer_at_higher_rates():
    """Issue 14: from --ratio 10 the built-in default on a CPU runs 1000 + 1000 steps at twice the
    learning rates; the default command (--ratio 4) and int4 below 10x keep theirs; given values win."""
    from fips_kernels.compress import command

    assert command.builtin_cpu_steps(4.0, None) == 150            # the default command: unchanged
    assert command.builtin_cpu_steps(None, None) == 150
    assert command.builtin_cpu_steps(8.0, None) == command.builtin_cpu_steps(None, 4) == 250
    assert command.builtin_cpu_steps(10.0, None) == command.builtin_cpu_steps(12.0, 4) == 1000
    assert command.learning_rates(4.0, None, None) == (1e-3, 1e-4)
    assert command.learning_rates(9.9, None, None) == (1e-3, 1e-4)
    assert command.learning_rates(12.0, None, None) == (2e-3, 2e-4)
    assert command.learning_rates(12.0, 5e-4, None) == (5e-4, 2e-4)
    assert command.learning_rates(None, None, 3e-4) == (1e-3, 3e-4)


@pytest.mark.parametrize("argv, steps, lr, finetune_lr", [
    ([], 150, 1e-3, 1e-4),
    (["--ratio", "12"], 1000, 2e-3, 2e-4),
    (["--ratio", "12", "--steps", "7", "--lr", "3e-3"], 7, 3e-3, 2e-4),
])
def test_the_built_in_default_passes_its_recipe_to_compress(argv, steps, lr, finetune_lr, bert_dir, tmp_path,
                                                            monkeypatch):
    """What the command hands compress() for the built-in default on a CPU (a tiny BERT stands in for it)."""
    from conftest import CallStopped, stop_and_record

    from fips_kernels.compress import api, command

    seen = {}
    real_load = command._load_hf
    monkeypatch.setattr(command, "load_model", lambda spec, args: real_load(str(bert_dir), spec.name))
    monkeypatch.setattr(api, "compress", stop_and_record(seen))
    with pytest.raises(CallStopped):
        cli.main(["compress", "--out", str(tmp_path / "m.safetensors"), "--device", "cpu", "--no-progress", *argv])
    assert (seen["steps"], seen["finetune_steps"], seen["lr"], seen["finetune_lr"]) == (steps, steps, lr,
                                                                                         finetune_lr)
