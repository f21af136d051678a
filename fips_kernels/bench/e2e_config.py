"""The end-to-end benchmark's configuration: the models, the variants (the
baseline, ours and the peers, with their roles), the modes, and the checked
arguments of a run (:func:`resolve_config`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .env import utc_now
from .layer import DTYPES, BenchError, resolve_device, timing_overrides
from .layer import _choose as _choose_names  # the same checks and messages as the layer benchmark
from .peers import peers_with
from .registry import OURS
from .shapes import PATTERNS
from .timing import TimingConfig

__all__ = [
    "MODELS", "TINY_MODELS", "ALL_MODELS", "MODES", "E2E_PROVIDERS", "E2E_ROLES", "E2E_PATTERNS", "ModelSpec",
    "E2EConfig", "resolve_config", "IMAGE_BATCHES", "DECODE_BATCHES", "TINY_BATCHES", "TOLERANCE", "CPU_NOTE",
    "TIMM_MISSING",
]

MODES = ("eager", "cudagraph", "compile", "compile-cudagraph")
# The variants: the dense baseline, ours (the FiPS model: fips_kernels.install), then every peer with the
# speed face (bench/peers.py), each built from the same factors as the FiPS model.
E2E_ROLES: Dict[str, str] = {"dense": peers_with("speed")["dense"].role, "fips": OURS,
                             **{n: p.role for n, p in peers_with("speed").items() if n != "dense"}}
E2E_PROVIDERS = tuple(E2E_ROLES)
E2E_PATTERNS = ("unstructured", "1:4", "2:4")  # the default; any pattern of the layer benchmark is accepted
# rel_err (vs the FiPS model on the reference backend, eager, same dtype) above this flags a row
TOLERANCE = {torch.float16: 5e-2, torch.bfloat16: 1e-1, torch.float32: 1e-3}
CPU_NOTE = "CPU timings only check the harness: they are not model figures."
TIMM_MISSING = "timm is not installed (pip install timm): the image models are built from timm configs"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model.

    ``task="images"``: a timm model (``arch``, built with ``timm_kwargs``), its
    ``fc1``/``fc2`` MLPs grouped ``group_size`` consecutive blocks at a time
    within a stage. ``task="decode"``: ``blocks`` gated MLP blocks of width
    ``d`` and hidden ``h``, one group.
    """

    name: str
    task: str  # "images" or "decode"
    arch: str
    group_size: int
    batches: Tuple[int, ...]
    timm_kwargs: Tuple[Tuple[str, object], ...] = ()
    d: int = 0
    h: int = 0
    blocks: int = 0
    description: str = ""

    @property
    def unit(self) -> str:
        return "images/s" if self.task == "images" else "tokens/s"


IMAGE_BATCHES = (1, 8, 64, 256)
DECODE_BATCHES = (1, 4, 16, 64)
TINY_BATCHES = (1, 4)

MODELS: Dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("deit-b", "images", "deit_base_patch16_224", 4, IMAGE_BATCHES,
              description="timm DeiT-B/16 at 224 px; 12 blocks, 3 groups of 4"),
    ModelSpec("swin-l", "images", "swin_large_patch4_window7_224", 6, IMAGE_BATCHES,
              description="timm Swin-L window 7 at 224 px; stages of 2, 2, 18, 2 blocks, groups of up to 6 within a stage"),
    ModelSpec("llama3-8b-mlp", "decode", "gated-mlp", 4, DECODE_BATCHES, d=4096, h=14336, blocks=4,
              description="Llama-3-8B MLP stack for decode: one group of 4 gate/up/down blocks, SiLU gating"),
)}

# Harness checks on a CPU in seconds (CI); not model figures.
TINY_MODELS: Dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("tiny-vit", "images", "deit_base_patch16_224", 4, TINY_BATCHES,
              (("img_size", 32), ("patch_size", 8), ("embed_dim", 64), ("depth", 8), ("num_heads", 2),
               ("num_classes", 10)),
              description="harness check: DeiT config shrunk to 32 px, width 64, 8 blocks (2 groups of 4)"),
    ModelSpec("tiny-swin", "images", "swin_large_patch4_window7_224", 6, TINY_BATCHES,
              (("img_size", 32), ("patch_size", 4), ("window_size", 4), ("embed_dim", 32),
               ("depths", (2, 8)), ("num_heads", (1, 2)), ("num_classes", 10)),
              description="harness check: Swin config shrunk to 32 px, width 32, stages of 2 and 8 blocks "
                          "(groups of 2, then 6 and 2)"),
    ModelSpec("tiny-mlp", "decode", "gated-mlp", 4, TINY_BATCHES, d=64, h=256, blocks=4,
              description="harness check: 4 gated MLP blocks, d=64, h=256"),
)}

ALL_MODELS: Dict[str, ModelSpec] = {**MODELS, **TINY_MODELS}


@dataclass(frozen=True)
class E2EConfig:
    models: Tuple[str, ...]
    providers: Tuple[str, ...]
    patterns: Tuple[str, ...]
    modes: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    image_batches: Optional[Tuple[int, ...]]  # None: each model's default
    decode_batches: Optional[Tuple[int, ...]]
    device: torch.device
    out: Path
    timing: TimingConfig = field(default_factory=TimingConfig)
    budget_s: Optional[float] = None
    seed: int = 0
    check: bool = True
    progress: bool = True
    notes: Tuple[str, ...] = ()

    def batches(self, spec: ModelSpec) -> Tuple[int, ...]:
        given = self.image_batches if spec.task == "images" else self.decode_batches
        return tuple(given) if given else spec.batches

    def variants(self) -> List[Tuple[str, str]]:
        """``(provider, pattern)`` in run order: dense first (the baseline), then
        FiPS for every pattern, then each peer for every pattern (a run cut
        short by ``--budget-s`` loses peers before FiPS)."""
        out = [("dense", "")]
        for provider in self.providers:
            if provider != "dense":
                out += [(provider, pattern) for pattern in self.patterns]
        return out

    @property
    def points(self) -> int:
        per = len(self.variants()) * len(self.modes) * len(self.dtypes)
        return sum(per * len(self.batches(ALL_MODELS[m])) for m in self.models)


def _positive_ints(values, flag) -> Optional[Tuple[int, ...]]:
    if values is None:
        return None
    vals = tuple(dict.fromkeys(int(v) for v in values))
    if not vals or any(v < 1 for v in vals):
        raise BenchError(f"{flag} must be positive integers, got {list(values)}")
    return vals


def resolve_config(*, models=None, providers=None, patterns=None, modes=None, dtypes=None, batch=None,
                   decode_batch=None, device=None, tiny=False, out=None, warmup_ms=None, rep_ms=None,
                   reps=None, budget_s=None, seed=0, check=True, progress=True) -> E2EConfig:
    """Validate the arguments and fill in the defaults (without CUDA and without
    a choice of models: the tiny models on the CPU, eager only)."""
    notes: List[str] = []
    dev = resolve_device(device)
    if dev.type == "cpu" and not tiny and models is None:
        tiny = True
        notes.append("no CUDA GPU: running the tiny models on the CPU (choose --models for others).")
    if dev.type == "cpu":
        notes.append(CPU_NOTE)

    chosen_models = _choose_names("model", models, ALL_MODELS, list(TINY_MODELS if tiny else MODELS))
    chosen_providers = _choose_names("provider", providers, E2E_PROVIDERS, E2E_PROVIDERS)
    if "dense" not in chosen_providers:
        notes.append("dense is always run: it is the baseline of speedup_vs_dense.")
    chosen_providers = ("dense",) + tuple(p for p in chosen_providers if p != "dense")
    chosen_patterns = _choose_names("pattern", patterns, PATTERNS, [p for p in E2E_PATTERNS if p in PATTERNS])
    default_modes = MODES if dev.type == "cuda" else ("eager",)
    chosen_modes = _choose_names("mode", modes, MODES, default_modes)

    if dtypes is None:
        names = ["fp16", "bf16"] if dev.type == "cuda" else ["fp32"]
    else:
        names = [n.strip().lower() for n in dtypes if n.strip()]
        if not names:
            raise BenchError("no dtype given; choose from fp16, bf16, fp32")
    chosen_dtypes = []
    for n in names:
        if n not in DTYPES:
            raise BenchError(f"unknown dtype {n!r}; choose from fp16, bf16, fp32")
        if DTYPES[n] not in chosen_dtypes:
            chosen_dtypes.append(DTYPES[n])
    if dev.type == "cpu" and torch.bfloat16 in chosen_dtypes:
        raise BenchError("bf16 is not timed on the CPU (bf16 arithmetic is wrong under the Triton interpreter "
                         "and CPU bf16 timings say nothing about the kernels); use fp32 or fp16 on the CPU")

    timing = TimingConfig(warmup_ms=10.0, rep_ms=50.0, cpu_warmup=1, cpu_reps=3)
    timing = timing_overrides(timing, warmup_ms, rep_ms, reps)
    if budget_s is not None and budget_s <= 0:
        raise BenchError(f"--budget-s must be > 0, got {budget_s}")

    if out is None:
        out_path = Path.cwd() / f"fips_bench_e2e_{dev.type}_{utc_now():%Y%m%dT%H%M%SZ}.csv"
    else:
        out_path = Path(out)
        if out_path.is_dir():
            raise BenchError(f"--out {out} is a directory; give a file name")
    return E2EConfig(chosen_models, chosen_providers, chosen_patterns, chosen_modes, tuple(chosen_dtypes),
                     _positive_ints(batch, "--batch"), _positive_ints(decode_batch, "--decode-batch"), dev,
                     out_path, timing, budget_s, seed, check, progress, tuple(notes))

