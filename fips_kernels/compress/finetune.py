"""End-to-end fine-tuning after the block-wise stage (the quantised-factor
paper's last step, Kuzmin et al., arXiv 2207.11048 §4).

Block-wise training fits each group to the original blocks' outputs given the
original inputs; errors then add up through the model. Here every group's
``U``, ``V_i`` (masks fixed) and MLP biases are trained together, inside the
whole model, so that the model's final output matches the original model's
output on the calibration batches (distillation). Quantised factors and bases
are trained through the same straight-through estimator as block-wise
training, so the result stays on the grid that is packed.

Loss: the relative squared error ``Σ(ŷ − y)² / Σy²`` of the outputs the
report compares (``output_fn``'s, e.g. a sentence embedding and the token
states, averaged; else ``logits``, else ``last_hidden_state``; the positions
an attention mask keeps), which is scale-free, so one learning rate serves
any model. AdamW, no weight decay, cosine decay to 0.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modules import get_submodule, set_submodule
from . import calibration
from .presets import GroupSpec
from .train import GroupResult, TrainableGroup, adamw

__all__ = ["FinetuneConfig", "record_targets", "finetune"]


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 0
    lr: float = 1e-4
    seed: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _outputs(out, batch, output_fn: Optional[Callable]) -> List[torch.Tensor]:
    """The tensors compared end to end: those ``output_fn`` returns (a tensor or a
    dict of them, e.g. a sentence embedding and the token states), else the
    model's default output (logits, else the last hidden state)."""
    if output_fn is None:
        return [calibration.default_output(out)[0]]
    y = output_fn(out, batch)
    return list(y.values()) if isinstance(y, dict) else [y]


def record_targets(model: nn.Module, batches: Sequence[Any], forward: Callable, device,
                   output_fn: Optional[Callable] = None, store_device="cpu") -> List[List[torch.Tensor]]:
    """The original model's outputs (:func:`_outputs`) on every calibration batch."""
    targets = []
    with torch.no_grad():
        for batch in batches:
            ys = _outputs(forward(model, batch, device), batch, output_fn)
            targets.append([y.detach().float().to(store_device) for y in ys])
    return targets


def _loss(ys: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the outputs of ``Σ(ŷ − y)² / Σy²`` (kept positions only)."""
    total = 0.0
    for y, target in zip(ys, targets):
        target = target.to(y.device)
        diff = (y.float() - target).square()
        ref = target.square()
        if mask is not None and y.dim() >= 3 and tuple(y.shape[:2]) == tuple(mask.shape):
            w = mask.to(y.device, torch.float32).reshape(*mask.shape, *([1] * (y.dim() - 2)))
            diff, ref = diff * w, ref * w
        total = total + diff.sum() / ref.sum().clamp_min(1e-12)
    return total / max(len(ys), 1)


def finetune(model: nn.Module, specs: Sequence[GroupSpec], results: Dict[int, GroupResult],
             batches: Sequence[Any], targets: Sequence[torch.Tensor], config: FinetuneConfig, *,
             qbits: Optional[int], qgroup: int, base_qbits: Optional[int], forward: Callable, device,
             output_fn: Optional[Callable] = None, progress: bool = True) -> Tuple[List[Tuple[int, float]], float]:
    """Train every group's factors end to end; updates ``results`` in place
    (``U``, ``Vs``, ``biases``; masks unchanged) and returns ``(losses, seconds)``.
    The model's layers are put back afterwards (also after an error)."""
    start = time.perf_counter()
    if config.steps <= 0:
        return [], 0.0
    groups: Dict[int, TrainableGroup] = {}
    originals: List[Tuple[str, nn.Module]] = []
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    try:
        for spec in specs:
            res = results[spec.index]
            g = TrainableGroup(res.U, res.Vs, res.biases, spec.kinds).to(device)
            g.qbits, g.qgroup, g.base_qbits = qbits, qgroup, base_qbits
            g.set_masks([m.to(device) for m in res.masks])
            groups[spec.index] = g
            for i, name in enumerate(spec.linears):
                originals.append((name, get_submodule(model, name)))
                set_submodule(model, name, g.linear(i))
        model.eval()  # no dropout: the targets were recorded in eval mode
        params = [p for g in groups.values() for p in g.parameters()]
        opt = adamw(params, config.lr, weight_decay=0.0)
        steps = config.steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)))
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + 7919)
        order: List[int] = []
        losses: List[Tuple[int, float]] = []
        log_every = max(1, steps // 50)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc="end-to-end fine-tuning", leave=True, dynamic_ncols=True)
        try:
            for t in range(steps):
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                j = order.pop()
                batch = batches[j]
                ys = _outputs(forward(model, batch, device), batch, output_fn)
                loss = _loss(ys, targets[j], calibration.token_mask_of(batch))
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                for g in groups.values():
                    g.apply_masks()
                if t % log_every == 0 or t == steps - 1:
                    losses.append((t, float(loss.detach())))
                if bar is not None:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3e}", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    finally:
        for name, module in reversed(originals):
            set_submodule(model, name, module)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    for index, g in groups.items():
        res = results[index]
        res.U = g.U.detach().cpu().clone()
        res.Vs = [(v.detach() * mk).cpu().clone() for v, mk in zip(g.V, g.masks)]
        res.biases = [None if g.bias(i) is None else g.bias(i).detach().cpu().clone() for i in range(len(g.V))]
    return losses, time.perf_counter() - start
