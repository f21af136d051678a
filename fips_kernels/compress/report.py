"""What a compression run reports: per group the parameters and bytes before
and after (bytes as stored in the chosen format: values + indices + bitmasks +
offsets), the budget reached, each unit's reconstruction error at the SVD init
and after training; for the model the end-to-end agreement on held-back
calibration samples (cosine similarity of the final outputs; top-1 agreement
for classifiers) and the time taken.

Parameters and bytes count the factorised weights (``d·r + Σ stored values``
against ``Σ d·h``); the MLP biases are kept dense and unchanged in size and
are not counted on either side.

What each error and loss is measured on is in :data:`LEGEND`, which the JSON
report carries under ``"legend"``. ``train_loss_first_step`` and
``train_loss_last_step`` were called ``loss_first`` and ``loss_last`` before
(renamed because they read as if training made things worse: the first is
taken before GMP has pruned anything).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

__all__ = ["GroupReport", "CompressionReport", "output_agreement", "LEGEND"]

LEGEND = {
    "errors_init": "per unit: MSE and relative error |y_hat - y| / |y| against the original unit's output, over "
                   "all training batches, at the SVD init with magnitude masks at the final sparsity (no training)",
    "errors_final": "the same after training, with the final masks",
    "train_loss_first_step": "training loss (sum over the group's units of the MSE) on the one calibration batch "
                             "of the first step, before any update, with that step's masks: under the gradual "
                             "GMP schedule nothing is pruned yet, so it is usually the lowest loss of the run",
    "train_loss_last_step": "training loss on the one calibration batch of the last step, with the final masks "
                            "(errors_final covers all training batches)",
    "end_to_end": "the model's final outputs against the original model's, on the held-back batches",
}


@dataclass
class GroupReport:
    index: int
    units: List[str]
    layers: List[str]
    kinds: List[str]
    d: int
    hidden: List[int]
    rank: int
    format: str
    dense_parameters: int
    parameters: int
    dense_bytes: int
    bytes: int
    errors_init: List[Dict[str, float]]
    errors_final: List[Dict[str, float]]
    train_loss_first_step: Optional[float] = None  # what each is measured on: LEGEND
    train_loss_last_step: Optional[float] = None
    seconds: float = 0.0
    resumed: bool = False
    process: int = 0  # the rank that trained (or resumed) the group

    @property
    def reached(self) -> float:
        """Kept fraction of the dense parameters."""
        return self.parameters / self.dense_parameters

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reached"] = self.reached
        return d


@dataclass
class CompressionReport:
    model: str
    preset: str
    unit: str
    config: dict
    groups: List[GroupReport] = field(default_factory=list)
    end_to_end: Dict[str, object] = field(default_factory=dict)
    calibration: Dict[str, int] = field(default_factory=dict)
    model_parameters: Dict[str, int] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    fusion: Dict[str, object] = field(default_factory=dict)  # modules.fusion_report of the compressed model

    # ---- totals ------------------------------------------------------------
    @property
    def dense_parameters(self) -> int:
        return sum(g.dense_parameters for g in self.groups)

    @property
    def parameters(self) -> int:
        return sum(g.parameters for g in self.groups)

    @property
    def dense_bytes(self) -> int:
        return sum(g.dense_bytes for g in self.groups)

    @property
    def bytes(self) -> int:
        return sum(g.bytes for g in self.groups)

    @property
    def reached(self) -> float:
        return self.parameters / self.dense_parameters if self.dense_parameters else float("nan")

    def to_dict(self) -> dict:
        return {"model": self.model, "preset": self.preset, "unit": self.unit, "config": self.config,
                "totals": {"dense_parameters": self.dense_parameters, "parameters": self.parameters,
                           "reached": self.reached, "budget": self.config.get("budget"),
                           "dense_bytes": self.dense_bytes, "bytes": self.bytes,
                           "bytes_ratio": self.bytes / self.dense_bytes if self.dense_bytes else None},
                "groups": [g.to_dict() for g in self.groups], "end_to_end": self.end_to_end,
                "calibration": self.calibration, "model_parameters": self.model_parameters,
                "seconds": self.seconds, "fusion": self.fusion, "legend": LEGEND}

    def to_json(self, path: Optional[os.PathLike] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            with open(os.fspath(path), "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    def format(self) -> str:
        """A plain-text summary (what the CLI prints)."""
        c = self.config
        pattern = c.get("pattern")
        lines = [
            f"FiPS compression of {self.model} (preset {self.preset}, unit {self.unit}): budget {c.get('budget'):.4g}, "
            f"{pattern} (s={c.get('sparsity')}, {c.get('format')}), groups of {self._group_sizes()}, "
            f"{c.get('steps')} steps, {c.get('pruning')} ({c.get('mask_scope')}), seed {c.get('seed')}"
            + (f", factor dtype {c['factor_dtype']}" if c.get("factor_dtype", "float32") != "float32" else "")
            + (f", int{c['qbits']} values (scale per {c.get('qgroup')})" if c.get("qbits") else "")
            + (", int8 base" if c.get("base_qbits") else "")
            + (f", then {c['finetune_steps']} end-to-end steps" if c.get("finetune_steps") else ""),
            *([f"--ratio {c['ratio']:g} chose: {c['plan']}"] if c.get("ratio") else []),
            f"calibration: {self.calibration.get('train_samples')} samples in {self.calibration.get('train_batches')} "
            f"batches for training, {self.calibration.get('holdout_samples')} held back",
            "",
            f"{'group':>5}  {'units':<28} {'d':>5} {'rank':>5}  {'parameters dense -> FiPS':>26} {'kept':>6}  "
            f"{'bytes dense -> FiPS':>22} {'ratio':>6}  rel. error per unit: SVD init -> trained"
            + (" (block-wise, before the end-to-end steps)" if c.get("finetune_steps") else ""),
        ]
        for g in self.groups:
            errs = ", ".join(f"{a['rel']:.3f}->{b['rel']:.3f}" for a, b in zip(g.errors_init, g.errors_final))
            lines.append(
                f"{g.index:>5}  {_units(g.units):<28} {g.d:>5} {g.rank:>5}  "
                f"{g.dense_parameters:>12,} -> {g.parameters:>10,} {g.reached:>6.3f}  "
                f"{_mb(g.dense_bytes):>9} -> {_mb(g.bytes):>9} {g.dense_bytes / g.bytes:>5.2f}x  {errs}"
                + ("  (resumed)" if g.resumed else "")
                + (f"  [rank {g.process}]" if any(x.process for x in self.groups) else ""))
        if self.groups:
            lines.append(
                f"{'total':>5}  {'':<28} {'':>5} {'':>5}  {self.dense_parameters:>12,} -> {self.parameters:>10,} "
                f"{self.reached:>6.3f}  {_mb(self.dense_bytes):>9} -> {_mb(self.bytes):>9} "
                f"{self.dense_bytes / self.bytes:>5.2f}x")
        mp = self.model_parameters
        if mp:
            lines.append(f"whole model: {mp.get('before'):,} -> {mp.get('after'):,} parameters")
        e = self.end_to_end
        for name, a in (e.get("outputs") or {}).items():
            text = (f"end-to-end on {e.get('samples')} held-back samples, {name}: cosine similarity "
                    f"mean {a['cosine_mean']:.4f}, min {a['cosine_min']:.4f} over {a['positions']} positions")
            if a.get("top1_agreement") is not None:
                text += f"; top-1 agreement {a['top1_agreement']:.4f}"
            lines.append(text)
        f = self.fusion
        if f:
            text = (f"fused: {f.get('activation_epilogues', 0)} activation epilogues (GELU/SiLU in the expand "
                    f"kernel), {f.get('gate_up', 0)} gate/up pairs on one op")
            for mlp, why in (f.get("not_fused") or {}).items():
                text += f"; {mlp} not fused: {why}"
            lines.append(text)
        if self.seconds:
            lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def _group_sizes(self) -> str:
        """The sizes the groups have (a group stops at the end of a stage, so a requested size
        larger than a stage is not what the model gets)."""
        asked = self.config.get("group_size")
        sizes = sorted({len(g.units) for g in self.groups}, reverse=True)
        if not sizes:
            return str(asked)
        text = " and ".join(map(str, sizes))
        return text if asked in sizes else f"{text} (group size {asked}; a group ends with its stage)"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _units(names: List[str]) -> str:
    if len(names) == 1:
        return names[0]
    first, last = names[0], names[-1]
    prefix = os.path.commonprefix([first, last])
    prefix = prefix[:prefix.rfind(".") + 1] if "." in prefix else ""
    return f"{first} .. {last[len(prefix):]}"


def output_agreement(outputs: List[torch.Tensor], references: List[torch.Tensor],
                     masks: List[Optional[torch.Tensor]], logits: bool) -> Dict[str, float]:
    """Cosine similarity along the last axis per position (token, patch or
    sample; positions an attention mask drops are skipped), and top-1
    agreement when the outputs are logits."""
    cos, agree = [], []
    for out, ref, mask in zip(outputs, references, masks):
        o, r = out.float(), ref.float()
        c = torch.nn.functional.cosine_similarity(o, r, dim=-1, eps=1e-12)
        a = (o.argmax(-1) == r.argmax(-1)) if logits else None
        if mask is not None and tuple(c.shape) == tuple(mask.shape):
            c = c[mask]
            a = a[mask] if a is not None else None
        cos.append(c.flatten())
        if a is not None:
            agree.append(a.flatten().float())
    cos_all = torch.cat(cos)
    result = {"cosine_mean": float(cos_all.mean()), "cosine_min": float(cos_all.min()), "positions": cos_all.numel()}
    result["top1_agreement"] = float(torch.cat(agree).mean()) if agree else None
    return result
